//! The documentation keeps up with the code: every audit record kind and
//! outcome the source can write is in the README's audit section, which
//! trust-centre operators read to interpret the log.

use regex::Regex;
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
    let mut src = String::new();
    sources(&root.join("src"), &mut src);
    let mut words: Vec<(String, &str)> = Vec::new();
    let patterns = [
        (r#"AuditRecord::new\(\s*"([a-z_]+)",\s*"([a-z_]+)""#, "kind and outcome"),
        (r#"AuditRecord::new\(\s*"([a-z_]+)","#, "kind"),
        (
            r#"\.(?:finish|commit|outcome|record_for)\(\s*[^,()]+,\s*"([a-z_]+)""#,
            "outcome",
        ),
        (r#"rec\.outcome = "([a-z_]+)""#, "outcome"),
        (r#"\("([a-z_]+)", EnrolmentStatus::"#, "enroll outcome"),
        (r#"if [a-z_]+ \{ "([a-z_]+)" \} else \{ "([a-z_]+)" \}"#, "outcome"),
        (
            r#"let outcome = if [^{]+\{ "([a-z_]+)" \} else \{ "([a-z_]+)" \}"#,
            "outcome",
        ),
    ];
    for (pattern, what) in patterns {
        for caps in Regex::new(pattern).unwrap().captures_iter(&src) {
            for m in caps.iter().skip(1).flatten() {
                words.push((m.as_str().to_string(), what));
            }
        }
    }
    // The task kinds and the service's operations, named by the code.
    for kind in [
        "dic_psn_available",
        "send_idat",
        "repeat_request",
        "pseudonymize",
        "dePseudonymize",
    ] {
        words.push((kind.to_string(), "kind"));
    }
    assert!(words.len() > 30, "the patterns found too little: {words:?}");
    let missing: Vec<String> = words
        .iter()
        .filter(|(w, _)| !section.contains(&format!("`{w}`")))
        .map(|(w, what)| format!("{w} ({what})"))
        .collect();
    assert!(missing.is_empty(), "the README's audit section lacks: {missing:?}");
}
