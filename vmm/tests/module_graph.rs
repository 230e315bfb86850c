//! No module of `vmm` imports one that imports it back, directly or around a circle: a
//! module graph without circles is one that can be read (and split into crates) from the
//! leaves up. The graph is read from the sources: module `a` uses `b` when code outside
//! `a`'s tests names `crate::b`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules: `x.rs` files and `x/mod.rs` directories, but the crate roots.
fn modules(src: &Path) -> BTreeSet<String> {
    fs::read_dir(src)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let name = path.file_stem()?.to_str()?.to_string();
            let is_module =
                path.extension().is_some_and(|x| x == "rs") || path.join("mod.rs").exists();
            (is_module && name != "lib" && name != "main").then_some(name)
        })
        .collect()
}

/// Every non-test source file of module `name`.
fn files(src: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = vec![src.join(format!("{name}.rs"))];
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.retain(|p| {
        let stem = p.file_stem().unwrap().to_str().unwrap();
        p.exists() && !stem.contains("test") && !p.components().any(|c| c.as_os_str() == "tests")
    });
    out
}

/// The code of a file without its comments and its trailing `mod tests`.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let modules = modules(src);
    let mut graph = BTreeMap::new();
    for m in &modules {
        let mut uses = BTreeSet::new();
        for file in files(src, m) {
            for (at, _) in code(&file).match_indices("crate::") {
                let rest = &code(&file)[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if &name != m && modules.contains(&name) {
                    uses.insert(name);
                }
            }
        }
        graph.insert(m.clone(), uses);
    }
    graph
}

/// A circle through `from`, if any (depth-first, with the path so far).
fn circle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    for next in &graph[path.last().unwrap()] {
        if next == from {
            let mut found = path.clone();
            found.push(next.clone());
            return Some(found);
        }
        if !path.contains(next) && next.as_str() > from {
            path.push(next.clone());
            if let Some(found) = circle(graph, from, path) {
                return Some(found);
            }
            path.pop();
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = graph(&src());
    assert!(graph.len() > 10, "modules found: {:?}", graph.keys());
    let circles: Vec<String> = graph
        .keys()
        .filter_map(|m| circle(&graph, m, &mut vec![m.clone()]))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(circles.is_empty(), "module circles: {circles:#?}");
}

#[test]
fn a_circle_is_found_when_there_is_one() {
    let edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")];
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for name in ["a", "b", "c", "d"] {
        graph.entry(name.into()).or_default();
    }
    for (a, b) in edges {
        graph.get_mut(a).unwrap().insert(b.into());
    }
    let found = circle(&graph, "a", &mut vec!["a".into()]).unwrap();
    assert_eq!(found, ["a", "b", "c", "a"]);
    assert!(circle(&graph, "d", &mut vec!["d".into()]).is_none());
}
