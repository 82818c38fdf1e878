//! The crate's layout holds: its rooms (the folders of `src/`, and the few files beside
//! `lib.rs`) import each other without a cycle, so each can be read knowing only the rooms
//! below it; few files sit beside `lib.rs`; no source file grows past what one reader holds.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines past which a source file should be split (its tests included).
const MAX_LINES: usize = 800;
/// Files beside `lib.rs` in `src/`, at most.
const MAX_ROOT_FILES: usize = 5;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The room of a file: its top folder under `src/`, or its own name beside `lib.rs`.
fn room_of(relative: &Path) -> String {
    let first = relative.components().next().expect("a path under src");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

/// The code of a file without comments and without its `mod tests`.
fn code_of(text: &str) -> String {
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names `crate::` paths in `code` start with (`crate::{a::X, b}` names `a` and `b`).
fn crate_paths(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find(';').unwrap_or(group.len())];
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.push(first_segment(&item));
                        item.clear();
                    }
                    _ => item.push(c),
                }
            }
            names.push(first_segment(&item));
        } else {
            names.push(first_segment(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

fn first_segment(path: &str) -> String {
    path.trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Each name `lib.rs` re-exports, and the room it comes from (`pub use step::batch::X;`).
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest.trim_end_matches(';');
        let room = first_segment(rest);
        let names = match (rest.find('{'), rest.rfind("::")) {
            (Some(open), _) => rest[open + 1..rest.len() - 1].to_string(),
            (None, Some(sep)) => rest[sep + 2..].to_string(),
            _ => continue,
        };
        for name in names.split(',') {
            map.insert(name.trim().to_string(), room.clone());
        }
    }
    map
}

/// Which rooms import which, with the files that do.
fn room_imports() -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let src = src();
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let exported = reexports(&lib);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src").to_path_buf();
        let room = room_of(&relative);
        if room == "lib" {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&file).expect("a source file"));
        for name in crate_paths(&code) {
            let target = exported.get(&name).cloned().unwrap_or(name);
            let is_room = src.join(&target).is_dir() || src.join(format!("{target}.rs")).is_file();
            // Anything else `crate::` names is lib.rs's own, which imports nothing.
            if is_room && target != room {
                edges
                    .entry(room.clone())
                    .or_default()
                    .entry(target)
                    .or_default()
                    .insert(relative.display().to_string());
            }
        }
    }
    edges
}

/// The rooms that reach themselves again through `edges`, as strongly connected components
/// of more than one room.
fn cycles(edges: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) -> Vec<BTreeSet<String>> {
    let rooms: BTreeSet<&String> = edges
        .keys()
        .chain(edges.values().flat_map(|to| to.keys()))
        .collect();
    let reaches = |from: &String| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(room) = todo.pop() {
            for next in edges.get(&room).into_iter().flat_map(|to| to.keys()) {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        rooms.iter().map(|r| (*r, reaches(r))).collect();
    let mut found: Vec<BTreeSet<String>> = Vec::new();
    for room in &rooms {
        let component: BTreeSet<String> = rooms
            .iter()
            .filter(|other| reach[*room].contains(**other) && reach[**other].contains(*room))
            .map(|r| r.to_string())
            .collect();
        if component.len() > 1 && !found.contains(&component) {
            found.push(component);
        }
    }
    found
}

#[test]
fn no_import_cycle_crosses_two_rooms() {
    let edges = room_imports();
    let found = cycles(&edges);
    let mut report = String::new();
    for component in &found {
        report.push_str(&format!("cycle among {component:?}:\n"));
        for from in component {
            for (to, files) in edges.get(from).into_iter().flatten() {
                if component.contains(to) {
                    report.push_str(&format!("  {from} -> {to} in {files:?}\n"));
                }
            }
        }
    }
    assert!(found.is_empty(), "{report}");
    // The check sees imports at all: the families build on attention, attention on the step.
    assert!(edges["families"].contains_key("attention"), "{edges:?}");
    assert!(edges["attention"].contains_key("step"), "{edges:?}");
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let mut edges: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        edges
            .entry(from.into())
            .or_default()
            .insert(to.into(), BTreeSet::new());
    }
    let found = cycles(&edges);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0], ["a", "b", "c"].map(String::from).into());
    assert_eq!(
        crate_paths("use crate::{a::X, b};\nlet y = crate::c::f();"),
        ["a", "b", "c"]
    );
}

#[test]
fn few_files_beside_lib_and_none_too_long() {
    let src = src();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let beside_lib: Vec<_> = files
        .iter()
        .filter(|f| f.parent() == Some(src.as_path()) && !f.ends_with("lib.rs"))
        .collect();
    assert!(
        beside_lib.len() <= MAX_ROOT_FILES,
        "{} files beside lib.rs (at most {MAX_ROOT_FILES}; the rest belong in a folder): {beside_lib:?}",
        beside_lib.len()
    );
    let long: Vec<_> = files
        .iter()
        .map(|f| {
            (
                f,
                std::fs::read_to_string(f)
                    .expect("a source file")
                    .lines()
                    .count(),
            )
        })
        .filter(|(_, lines)| *lines > MAX_LINES)
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines: {long:?}");
}
