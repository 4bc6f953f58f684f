//! The module map keeps its shape: no module imports one that imports it
//! back (at the top level and inside each directory module), the domain
//! never imports `config`, and each module stays in its layer of
//! ARCHITECTURE.md. Read from the source, so a new `use` that breaks the
//! rule fails here, naming the edge.

// (A test or benchmark stops at what it cannot set up: the panic is the report.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use regex::Regex;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A file's module path below `src` (`store/db.rs` -> `["store", "db"]`),
/// and its source without its unit tests (tests may reach anywhere).
fn modules() -> Vec<(Vec<String>, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files
        .into_iter()
        .filter(|p| !p.ends_with("tests.rs"))
        .filter_map(|p| {
            let rel = p.strip_prefix(&src).unwrap().with_extension("");
            let mut path: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if matches!(path.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                path.pop();
            }
            let text = std::fs::read_to_string(&p).unwrap();
            // (Comments name modules without importing them.)
            let code: String = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap_or("")
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| format!("{l}\n"))
                .collect();
            (!path.is_empty()).then_some((path, code))
        })
        .collect()
}

/// The names a source refers to below `prefix` (`crate::`, `super::`):
/// `prefix::name` and `prefix::{a, b::c}`.
fn referenced(code: &str, prefix: &str) -> BTreeSet<String> {
    let one = Regex::new(&format!(r"\b{prefix}::([a-z_][a-z0-9_]*)\b")).unwrap();
    let group = Regex::new(&format!(r"\b{prefix}::\{{([^}}]*)\}}")).unwrap();
    let name = Regex::new(r"(?:^|,)\s*([a-z_][a-z0-9_]*)").unwrap();
    let mut out: BTreeSet<String> = one.captures_iter(code).map(|c| c[1].to_string()).collect();
    for g in group.captures_iter(code) {
        out.extend(name.captures_iter(&g[1]).map(|c| c[1].to_string()));
    }
    out
}

/// The top-level graph (`crate::x` from anywhere in module `m`) and, per
/// directory module, the graph of its children (`super::x` and
/// `crate::dir::x` between them).
fn graphs() -> (Graph, BTreeMap<String, Graph>) {
    let mods = modules();
    let tops: BTreeSet<String> = mods.iter().map(|(p, _)| p[0].clone()).collect();
    let mut top = Graph::new();
    let mut inner: BTreeMap<String, Graph> = BTreeMap::new();
    for (path, code) in &mods {
        let me = &path[0];
        for t in referenced(code, "crate") {
            if tops.contains(&t) && &t != me {
                top.entry(me.clone()).or_default().insert(t);
            }
        }
        if path.len() < 2 {
            continue;
        }
        let children: BTreeSet<String> = mods
            .iter()
            .filter(|(p, _)| p.len() > 1 && p[0] == *me)
            .map(|(p, _)| p[1].clone())
            .collect();
        let mut refs = referenced(code, &format!("crate::{me}"));
        if path.len() == 2 {
            // (`super::` from a grandchild is its own directory's parent.)
            refs.extend(referenced(code, "super"));
        }
        for t in refs {
            if children.contains(&t) && t != path[1] {
                inner
                    .entry(me.clone())
                    .or_default()
                    .entry(path[1].clone())
                    .or_default()
                    .insert(t);
            }
        }
    }
    (top, inner)
}

/// Strongly connected components of more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        for w in t.g.get(v).into_iter().flatten() {
            if !t.index.contains_key(w.as_str()) {
                visit(t, w);
                let lw = t.low[w.as_str()];
                t.low.insert(v, t.low[v].min(lw));
            } else if t.stack.contains(&w.as_str()) {
                let iw = t.index[w.as_str()];
                t.low.insert(v, t.low[v].min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let (top, inner) = graphs();
    assert!(top.len() > 20, "the scan found too little: {top:?}");
    assert!(inner.contains_key("fhir") && inner.contains_key("store"), "{inner:?}");
    let mut found: Vec<String> = cycles(&top).into_iter().map(|c| c.join(" <-> ")).collect();
    for (dir, g) in &inner {
        found.extend(cycles(g).into_iter().map(|c| format!("{dir}/{{{}}}", c.join(" <-> "))));
    }
    assert!(found.is_empty(), "import cycles: {found:?}");
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into()).or_default().insert(b.into());
    }
    assert_eq!(cycles(&g), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
}

/// ARCHITECTURE.md's layers, bottom first; `config` sits above the
/// domain it configures and below the work that takes a whole `Config`.
const LAYERS: &[&[&str]] = &[
    &[
        "types",
        "privacy",
        "crypto",
        "fsutil",
        "secret_file",
        "exit",
        "duration",
        "shutdown",
        "crashpoint",
        "retry",
        "pace",
        "progress",
        "owner",
        "fxhash",
        "harden",
        "logger",
    ],
    &["fhir", "tasks", "bloom", "vocab"],
    &["store", "audit"],
    &["report", "page", "serve", "sim"],
    &["config"],
    &["net", "auth", "client", "agent", "enroll", "import", "demo"],
    &["commands", "error", "main"],
];

#[test]
fn modules_import_only_their_layer_and_below() {
    let (top, _) = graphs();
    let layer = |m: &str| LAYERS.iter().position(|l| l.contains(&m));
    let unplaced: Vec<&String> = top
        .keys()
        .chain(top.values().flatten())
        .filter(|m| layer(m).is_none())
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules missing from LAYERS (and ARCHITECTURE.md): {unplaced:?}"
    );
    let upward: Vec<String> = top
        .iter()
        .flat_map(|(from, tos)| tos.iter().map(move |to| (from, to)))
        .filter(|(from, to)| layer(to) > layer(from))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(upward.is_empty(), "imports up the layers: {upward:?}");
    for domain in ["bloom", "crypto", "store", "audit", "fhir", "tasks"] {
        assert!(
            !top.get(domain).is_some_and(|t| t.contains("config")),
            "{domain} imports config"
        );
    }
}
