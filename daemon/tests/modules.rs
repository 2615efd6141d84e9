#![allow(clippy::unwrap_used)]

//! The daemon's top-level modules depend on each other in one direction
//! only: a cycle (A uses B, B uses A) means a type sits in the wrong
//! module. Read from the source, `use crate::…` and `crate::…` paths
//! outside comments and `#[cfg(test)]` code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
    found
}

/// The top-level modules a file's code names, tests and comments aside.
fn used_modules(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    let code: String = code
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut used = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let names = match rest.strip_prefix('{') {
            Some(group) => top_level_items(group),
            None => vec![first_segment(rest)],
        };
        used.extend(
            names
                .into_iter()
                .filter(|n| modules.contains(*n))
                .map(str::to_owned),
        );
    }
    used
}

/// The first path segment of each item of a `{a::b, c::{d, e}, f}` group
/// (given without its opening brace), up to its closing brace.
fn top_level_items(group: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                items.push(first_segment(&group[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(first_segment(&group[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    items
}

fn first_segment(path: &str) -> &str {
    path.trim_start()
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or_default()
}

/// The daemon's top-level modules and the others each one uses.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for path in sources(&src) {
        let relative = path.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str();
        let name = top.to_string_lossy().trim_end_matches(".rs").to_owned();
        if name != "lib" && name != "main" {
            files.entry(name).or_default().push(path);
        }
    }
    let modules: BTreeSet<String> = files.keys().cloned().collect();
    files
        .into_iter()
        .map(|(name, paths)| {
            let mut used = BTreeSet::new();
            for path in paths {
                used.extend(used_modules(
                    &std::fs::read_to_string(path).unwrap(),
                    &modules,
                ));
            }
            used.remove(&name);
            (name, used)
        })
        .collect()
}

/// A cycle through `start`, if any: the modules along it.
fn cycle_from(start: &str, graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(next.clone());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn the_daemons_modules_have_no_cycle() {
    let graph = dependencies();
    assert!(graph.contains_key("registry") && graph.contains_key("policy"));
    assert!(
        graph["registry"].contains("policy"),
        "the reader sees what the registry uses: {:?}",
        graph["registry"]
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|name| cycle_from(name, &graph))
        .map(|cycle| cycle.join(" → "))
        .collect();
    assert!(cycles.is_empty(), "module cycles: {cycles:#?}");
}

#[test]
fn a_cycle_is_found() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(cycle_from("a", &graph).unwrap(), ["a", "b", "c", "a"]);
    assert_eq!(cycle_from("d", &graph), None);
    let modules: BTreeSet<String> = ["registry", "policy", "outbox", "access", "worker"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let used = used_modules(
        "use crate::{\n    policy::{self, X},\n    outbox::EventSink,\n};\n// crate::access\nfn f() { crate::registry::go() }\n#[cfg(test)]\nuse crate::worker;",
        &modules,
    );
    assert_eq!(
        used.into_iter().collect::<Vec<_>>(),
        ["outbox", "policy", "registry"]
    );
}
