//! The binary crate's modules depend on each other in one direction only
//! (docs/ARCHITECTURE.md, "Layers"): every `crate::X` a module names must
//! be its own or one of a lower layer. No exception list: a new module gets
//! a layer here, and an upward reference fails this test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Layers, lowest first. Modules of one line are siblings that must not
/// name each other either.
const LAYERS: &[&[&str]] = &[
    // plumbing: records on disk, signals, log output
    &["store", "sys"],
    // the audit log on disk (hash chain, decisions queue, heads held for peers)
    &["audit"],
    // statistics history: series files (rings) and their queries
    &["history"],
    // how nodes reach each other: identities, TLS, dialing, the listener, settings
    &["transport"],
    // the estimator's observers: the write taps the engines hold, block
    // devices ferry does not serve yet, the estimator's settings
    &["estimate"],
    // the engines (volume first: shares reuse its write permit and link flag),
    // the QEMU processes of VM workloads
    &["volume", "vm"],
    // the image archive: chunks, manifests, create/restore/verify/prune of
    // disks and trees the agent hands it (uses the volume's Merkle leaves)
    &["archive"],
    &["share"],
    // the node's configuration file: every section's settings
    &["config"],
    // workload definitions and their hooks (and VM start/stop)
    &["workload"],
    // what moves a workload's ownership: members, the handover driver
    &["handover"],
    // decisions that use handovers
    &["cluster", "migration"],
    // the composition root: owns every engine, implements their host traits
    &["agent"],
    // the REST server (routes → Action → agent's dispatch)
    &["api"],
    // the command line (grammar in cli/mod.rs; commands in remote, demo, export)
    &["cli"],
];

fn layer_of(module: &str) -> Option<(usize, usize)> {
    LAYERS
        .iter()
        .enumerate()
        .find_map(|(i, line)| line.iter().position(|m| *m == module).map(|j| (i, j)))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its comments (line comments, doc comments and
/// block comments) and without the contents of string literals.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if b[i] == b'"' {
            // Skip to the closing quote (escapes honoured); raw strings
            // without inner quotes are covered too.
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && i + 2 < b.len() && (b[i + 2] == b'\'' || b[i + 1] == b'\\') {
            // A char literal such as '"' or '\n' (lifetimes have no closing quote).
            let end = b[i + 1..]
                .iter()
                .position(|&c| c == b'\'')
                .map_or(b.len(), |p| i + 2 + p);
            i = end;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Every top-level module named as `crate::X` (also inside `crate::{X, Y}`).
fn referenced_modules(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(p) = rest.find("crate::") {
            let before = &rest[..p];
            rest = &rest[p + "crate::".len()..];
            // `ferry_core::…` etc. end in "crate::"? Only a bare `crate`.
            if before
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
            {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.push((n + 1, name));
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                found.push((n + 1, name));
            }
        }
    }
    found
}

#[test]
fn modules_only_name_their_own_layer_or_lower_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} files under {}",
        files.len(),
        src.display()
    );
    let mut violations = Vec::new();
    let mut unknown = BTreeMap::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .to_string();
        let module = first.trim_end_matches(".rs").to_string();
        if module == "main" {
            // The crate root composes everything.
            continue;
        }
        let Some((layer, _)) = layer_of(&module) else {
            unknown.insert(module.clone(), rel.display().to_string());
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for (line, target) in referenced_modules(&code_only(&text)) {
            if target == module {
                continue;
            }
            match layer_of(&target) {
                Some((l, _)) if l < layer => {}
                Some((l, _)) => violations.push(format!(
                    "{}:{line}: {module} (layer {layer}) names crate::{target} (layer {l}){}",
                    rel.display(),
                    if l == layer {
                        ", a sibling"
                    } else {
                        ", above it"
                    }
                )),
                // Items of the crate root (main.rs) are the top.
                None => violations.push(format!(
                    "{}:{line}: {module} names crate::{target}, which is not a layered module \
                     (the crate root's items are above every module)",
                    rel.display()
                )),
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "modules without a layer in tests/layering.rs: {unknown:?}"
    );
    assert!(
        violations.is_empty(),
        "{} references against the layers:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

#[test]
fn the_scanner_sees_references_and_skips_comments_and_strings() {
    let code = code_only(
        "use crate::agent::X; // crate::api\n/* crate::cluster */ let s = \"crate::migrate\";\nuse crate::{store, sys::logging};\nlet c = '\"'; f(crate::volume::y);",
    );
    let names: Vec<String> = referenced_modules(&code)
        .into_iter()
        .map(|(_, n)| n)
        .collect();
    assert_eq!(names, ["agent", "store", "sys", "volume"]);
}
