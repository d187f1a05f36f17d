//! The library's layers (issue 13, D8), read from its source: every `use crate::` path and
//! inline `crate::` path in src/ (not src/bin/) must point down, never up or sideways, so that the
//! module graph has no cycle; and the hook-safe layer must not allocate or lock. The layers and
//! their order are the ones src/lib.rs, src/hooksafe/mod.rs and src/watchdog/mod.rs describe.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// (layer, order within the layer) of a module, by its path below `crate::`.
fn rank(module: &str) -> Option<(u32, u32)> {
    let base = ["sys", "real", "config", "event", "addr", "alloc"];
    let hooksafe = ["settings", "ring", "fdtable", "ownfd", "log", "wake", "keepalive", "release", "emfile"];
    let hooksafe_order = [0, 0, 1, 2, 3, 4, 5, 6, 7];
    let watchdog = ["stats", "fds", "monitor", "detector", "metrics", "report", "control"];
    let watchdog_order = [0, 0, 1, 2, 3, 4, 5];
    let mut parts = module.split("::");
    let head = parts.next()?;
    let sub = parts.next();
    Some(match (head, sub) {
        (h, _) if base.contains(&h) => (0, 0),
        ("hooksafe", Some(s)) => (1, hooksafe_order[hooksafe.iter().position(|&x| x == s)?]),
        ("watchdog", Some(s)) => (2, watchdog_order[watchdog.iter().position(|&x| x == s)?]),
        ("hooks", _) => (3, 0),
        ("lifecycle", Some("adopt")) => (3, 0),
        ("lifecycle", None) => (3, 1),
        _ => return None,
    })
}

fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                if prefix.is_empty() && name == "bin" {
                    continue;
                }
                walk(&p, &format!("{prefix}{name}::"), out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let m =
                    if stem == "mod" { prefix.trim_end_matches("::").to_string() } else { format!("{prefix}{stem}") };
                if m != "lib" {
                    out.insert(m, std::fs::read_to_string(&p).unwrap());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), "", &mut out);
    out
}

/// Code without its comments (line comments and doc comments).
fn code(src: &str) -> String {
    src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Every module path a source names: `crate::a::b` inline, and each leaf of `use crate::{…}`.
fn imports(src: &str) -> BTreeSet<String> {
    let src = code(src);
    let mut out = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + 7..];
        let path: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        let path = path.trim_end_matches(':').to_string();
        if rest[path.len()..].trim_start_matches(':').starts_with('{') {
            // use crate::a::{b, c::{d}}: the leaves, one level deep is enough for module names.
            let open = rest.find('{').unwrap();
            let mut depth = 0;
            let mut end = open;
            for (k, ch) in rest[open..].char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = open + k;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let inner = &rest[open + 1..end];
            let mut depth = 0;
            let mut item = String::new();
            for ch in inner.chars().chain(std::iter::once(',')) {
                match ch {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        let leaf = item.trim().split(['{', ' ']).next().unwrap_or("").trim_end_matches(':').to_string();
                        if !leaf.is_empty() {
                            out.insert(if path.is_empty() { leaf } else { format!("{path}::{leaf}") });
                        }
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
        } else if !path.is_empty() {
            out.insert(path);
        }
    }
    out
}

/// The module a path names: its longest prefix that is a module.
fn module_of<'a>(path: &str, mods: &'a BTreeMap<String, String>) -> Option<&'a str> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len()).rev().map(|k| parts[..k].join("::")).find_map(|c| mods.get_key_value(&c).map(|(k, _)| k.as_str()))
}

#[test]
fn every_import_points_down_and_the_graph_has_no_cycle() {
    let mods = modules();
    let mut bad = Vec::new();
    let mut edges = 0;
    for (m, src) in &mods {
        if m == "hooksafe" || m == "watchdog" {
            continue;
        }
        let Some(from) = rank(m) else {
            bad.push(format!("{m}: not in any layer (add it to src/lib.rs's list and to this test)"));
            continue;
        };
        for p in imports(src) {
            let Some(t) = module_of(&p, &mods) else { continue };
            if t == m || t == "hooksafe" || t == "watchdog" {
                continue;
            }
            edges += 1;
            let to = rank(t).unwrap_or((9, 9));
            let down = to.0 < from.0 || (to.0 == from.0 && to.1 < from.1) || (to.0 == 0 && from.0 == 0 && t == "sys");
            if !down {
                bad.push(format!("{m} {from:?} uses {t} {to:?} (crate::{p})"));
            }
        }
    }
    assert!(edges > 40, "only {edges} imports found: the parser is broken");
    assert!(bad.is_empty(), "imports that do not point down:\n{}", bad.join("\n"));
}

#[test]
fn the_hook_safe_layer_neither_allocates_nor_locks() {
    // Types and macros that allocate or lock. settings.rs holds the Runtime the constructor
    // builds once (the program's name is a String), before any hook is active: that line is
    // the one exception, read by the watchdog only.
    let banned = [
        "Vec<",
        "vec!",
        "String",
        "format!",
        "Box<",
        "HashMap",
        "BTreeMap",
        "Mutex",
        "RwLock",
        "to_string()",
        "to_owned()",
    ];
    let mut bad = Vec::new();
    for (m, src) in modules() {
        if !m.starts_with("hooksafe::") {
            continue;
        }
        let body = code(&src);
        let body = body.split("#[cfg(test)]").next().unwrap_or("");
        for (i, line) in body.lines().enumerate() {
            if m == "hooksafe::settings" && line.contains("pub program: String") {
                continue;
            }
            for b in banned {
                if line.contains(b) {
                    bad.push(format!("src/{}.rs:{}: {}", m.replace("::", "/"), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "allocation or locking in the hook-safe layer:\n{}", bad.join("\n"));
}
