//! The layering of `src/`: every module imports only from its own layer or
//! the layers below it, and no modules import each other in a cycle.
//!
//! Reads the source (outside `#[cfg(test)]` modules), collects each
//! module's `crate::` and `super::` paths, and maps each to the most
//! specific module that exists. A parent module naming its own children
//! (`mod x; pub use x::Y;`) is not an import.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the bottom up; a module's layer is that of its longest
/// matching prefix. The list in `src/lib.rs`'s doc says the same.
const LAYERS: &[(&str, u8)] = &[
    ("util", 0),
    ("metrics", 1),
    ("tls", 1),
    // The config names key sources and ring sizes, so these two sit below it.
    ("routing::ring", 2),
    ("routing::key", 2),
    ("config", 3),
    ("routing", 4),
    ("http", 5),
    ("upstream", 6),
    ("tunnel", 7),
    ("server", 8),
    ("proxy", 8),
    ("ops", 9),
    // `[[discovery]]`: resolves names and applies them through `ops::reload`.
    ("ops::discovery", 9),
    ("app", 10),
    ("tools", 11),
    ("cli", 12),
    // Test-only (`#[cfg(test)] mod fuzz_tests`): drives every layer it fuzzes.
    ("fuzz_tests", 13),
];

fn layer_of(module: &str) -> Option<u8> {
    LAYERS
        .iter()
        .filter(|(prefix, _)| module == *prefix || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|&(_, layer)| layer)
}

/// Module path of a source file: `src/routing/table.rs` → `routing::table`.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?.with_extension("");
    let mut parts: Vec<String> = relative.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.is_empty() || parts == ["lib"] || parts == ["main"] {
        return None;
    }
    Some(parts.join("::"))
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read src").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code that ships: comments and `#[cfg(test)]` modules removed.
fn shipped_code(text: &str) -> String {
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]" && lines.peek().is_some_and(|next| next.trim_start().starts_with("mod ")) {
            // Skip the module: to the line that closes it at its indentation.
            let indent = line.len() - trimmed.len();
            let header = lines.next().unwrap_or_default();
            if header.trim_end().ends_with(';') {
                continue;
            }
            for inner in lines.by_ref() {
                if inner.len() > indent && inner[..indent].trim().is_empty() && inner[indent..].starts_with('}') {
                    break;
                }
                if indent == 0 && inner.starts_with('}') {
                    break;
                }
            }
            continue;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        let without_comment = match line.find("//") {
            // A `//` inside a string is rare here; a URL in a string would
            // only hide the rest of its line.
            Some(at) if !line[..at].contains('"') => &line[..at],
            _ => line,
        };
        code.push_str(without_comment);
        code.push('\n');
    }
    code
}

/// Every path a module names: `use` trees expanded, plus inline
/// `crate::a::b` and `super::a` paths.
fn named_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    let mut rest = code;
    while let Some(at) = find_use(rest) {
        let after = &rest[at..];
        let Some(end) = after.find(';') else { break };
        expand_use_tree(after[..end].trim(), "", &mut paths);
        rest = &after[end..];
    }
    let bytes = code.as_bytes();
    for start in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(found) = code[from..].find(start) {
            let at = from + found;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_' || bytes[at - 1] == b':') {
                continue;
            }
            let path: String =
                code[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
            paths.push(path.trim_end_matches(':').to_string());
        }
    }
    paths
}

/// Where the next `use` statement's tree starts.
fn find_use(code: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = code[from..].find("use ") {
        let at = from + found;
        let before = code[..at].chars().last();
        if before.is_none_or(|c| c.is_whitespace() || c == ';' || c == '{' || c == '}') {
            return Some(at + 4);
        }
        from = at + 4;
    }
    None
}

/// `a::{b, c::{d, e}}` → `a::b`, `a::c::d`, `a::c::e`.
fn expand_use_tree(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    match tree.find('{') {
        None => {
            let item = tree.split(" as ").next().unwrap_or(tree).trim();
            if !item.is_empty() {
                out.push(format!("{prefix}{item}"));
            }
        }
        Some(open) => {
            let head = &tree[..open];
            let inner = tree[open + 1..].trim_end().strip_suffix('}').unwrap_or(&tree[open + 1..]);
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand_use_tree(&inner[start..i], &format!("{prefix}{head}"), out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            expand_use_tree(&inner[start..], &format!("{prefix}{head}"), out);
        }
    }
}

/// The module a path points into: `crate::routing::table::Backend` seen
/// from anywhere → `routing::table`; `super::x` seen from `tunnel::session`
/// → `tunnel::x`. `None` for paths outside the crate.
fn target_module(from: &str, path: &str, modules: &BTreeSet<String>) -> Option<String> {
    let mut segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    let mut base: Vec<&str> = match segments.first() {
        Some(&"crate") => {
            segments.remove(0);
            Vec::new()
        }
        Some(&"super") => {
            // `super` is the parent module, whichever file holds the module.
            let mut base: Vec<&str> = from.split("::").collect();
            while segments.first() == Some(&"super") {
                segments.remove(0);
                base.pop();
            }
            base
        }
        _ => return None,
    };
    let mut best = (!base.is_empty()).then(|| base.join("::"));
    for segment in segments {
        base.push(segment);
        let candidate = base.join("::");
        if modules.contains(&candidate) {
            best = Some(candidate);
        } else {
            break;
        }
    }
    best
}

struct Imports {
    /// module → modules it imports (children excluded).
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn read_imports() -> Imports {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let sources: Vec<(String, String)> = files
        .iter()
        .filter_map(|file| {
            let module = module_of(&src, file)?;
            let text = std::fs::read_to_string(file).expect("read source");
            Some((module, shipped_code(&text)))
        })
        .collect();
    let modules: BTreeSet<String> = sources.iter().map(|(m, _)| m.clone()).collect();
    let mut edges = BTreeMap::new();
    for (module, code) in &sources {
        let targets: BTreeSet<String> = named_paths(code)
            .iter()
            .filter_map(|path| target_module(module, path, &modules))
            .filter(|target| target != module && !target.starts_with(&format!("{module}::")))
            .collect();
        edges.insert(module.clone(), targets);
    }
    Imports { edges }
}

/// `module imports target`, each as "module (layer) -> target (layer)".
fn upward_imports(imports: &Imports) -> Vec<String> {
    let mut wrong = Vec::new();
    for (module, targets) in &imports.edges {
        let from = layer_of(module);
        for target in targets {
            let to = layer_of(target);
            if let (Some(from), Some(to)) = (from, to) {
                if to > from {
                    wrong.push(format!("{module} (layer {from}) imports {target} (layer {to})"));
                }
            }
        }
    }
    wrong
}

/// A cycle among the modules, if there is one.
fn find_cycle(imports: &Imports) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        node: &str,
        imports: &Imports,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in imports.edges.get(node).into_iter().flatten() {
            match marks.get(next.as_str()).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let at = stack.iter().position(|m| m == next).unwrap_or(0);
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, imports, marks, stack) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for module in imports.edges.keys() {
        if marks.get(module.as_str()).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(cycle) = visit(module, imports, &mut marks, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

#[test]
fn every_module_has_a_layer() {
    let imports = read_imports();
    let missing: Vec<&String> = imports.edges.keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(missing.is_empty(), "modules without a layer in LAYERS: {missing:?}");
}

#[test]
fn no_module_imports_from_a_layer_above_it() {
    let imports = read_imports();
    let wrong = upward_imports(&imports);
    assert!(wrong.is_empty(), "imports that point up:\n{}", wrong.join("\n"));
}

#[test]
fn no_modules_import_each_other_in_a_cycle() {
    let imports = read_imports();
    assert_eq!(find_cycle(&imports), None, "modules that import each other in a cycle");
}

#[test]
fn the_checker_sees_what_it_must() {
    let imports = read_imports();
    // Known edges, so that a parser that sees nothing can't pass.
    let expect = [
        ("proxy", "routing"),
        ("tunnel::handshake", "upstream"),
        ("tunnel::handshake", "tunnel"),
        ("upstream::pool", "upstream::connector"),
        ("upstream::health", "upstream::connector"),
        ("routing::candidates", "routing::table"),
        ("config", "routing::key"),
        ("app", "proxy"),
    ];
    for (from, to) in expect {
        let seen = imports.edges.get(from).is_some_and(|t| t.contains(to));
        assert!(seen, "{from} -> {to} not seen; {from} imports {:?}", imports.edges.get(from));
    }
    // And the rules catch what they are for.
    let mut up = Imports { edges: BTreeMap::new() };
    up.edges.insert("routing::table".into(), BTreeSet::from(["proxy".to_string()]));
    assert_eq!(upward_imports(&up).len(), 1);
    let mut cycle = Imports { edges: BTreeMap::new() };
    cycle.edges.insert("a".into(), BTreeSet::from(["b".to_string()]));
    cycle.edges.insert("b".into(), BTreeSet::from(["a".to_string()]));
    assert!(find_cycle(&cycle).is_some());
}

#[test]
fn use_trees_and_relative_paths_resolve() {
    let mut out = Vec::new();
    expand_use_tree("crate::a::{b, c::{d, e as f}}", "", &mut out);
    assert_eq!(out, ["crate::a::b", "crate::a::c::d", "crate::a::c::e"]);
    let modules: BTreeSet<String> =
        ["tunnel", "tunnel::session", "tunnel::splice", "routing", "routing::table"].map(String::from).into();
    let from_file = target_module("tunnel::session", "super::splice::Splice", &modules);
    assert_eq!(from_file.as_deref(), Some("tunnel::splice"));
    let from_mod = target_module("tunnel", "super::routing::table::Backend", &modules);
    assert_eq!(from_mod.as_deref(), Some("routing::table"));
    let via_reexport = target_module("tunnel::session", "crate::routing::Backend", &modules);
    assert_eq!(via_reexport.as_deref(), Some("routing"));
}
