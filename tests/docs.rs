//! The documentation keeps up with the code: every audit record kind and
//! outcome the source can write is in the README's audit section, which
//! trust-centre operators read to interpret the log.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fttp_agent::vocab::{AuditKind, Outcome};
use std::path::Path;

fn sources(dir: &Path, out: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("tests.rs") {
            // (A module's own tests write records of their own.)
            let text = std::fs::read_to_string(&path).unwrap();
            out.push_str(text.split("#[cfg(test)]\nmod tests").next().unwrap_or(""));
            out.push('\n');
        }
    }
}

#[test]
fn the_readme_lists_every_audit_kind_and_outcome_the_code_writes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let start = readme.find("## Audit log").unwrap();
    let end = readme[start + 1..]
        .find("\n## ")
        .map_or(readme.len(), |i| start + 1 + i);
    let section = &readme[start..end];
    // (Every record the code writes is built from these enums; the test
    // below sees that no word bypasses them.)
    let mut words: Vec<(String, &str)> = Vec::new();
    words.extend(AuditKind::ALL.iter().map(|k| (k.as_str().to_string(), "kind")));
    words.extend(Outcome::ALL.iter().map(|o| (o.as_str().to_string(), "outcome")));
    let missing: Vec<String> = words
        .iter()
        .filter(|(w, _)| !section.contains(&format!("`{w}`")))
        .map(|(w, what)| format!("{w} ({what})"))
        .collect();
    assert!(missing.is_empty(), "the README's audit section lacks: {missing:?}");
}

#[test]
fn outcomes_and_kinds_are_written_through_the_vocabulary_only() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut src = String::new();
    sources(&root.join("src"), &mut src);
    let literal = regex::Regex::new(r#"\b(outcome|kind)(: | = | == | != )"[a-zA-Z_]+""#).unwrap();
    let found: Vec<&str> = literal.find_iter(&src).map(|m| m.as_str()).collect();
    assert!(found.is_empty(), "outcome or kind words written as strings: {found:?}");
    // (The pattern itself matches what it must refuse.)
    assert!(literal.is_match(r#"rec.outcome = "failed".into()"#));
}
