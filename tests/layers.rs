//! The layer check: reads `src/**/*.rs` and fails when a module imports a module of its
//! own or a higher layer, or when the relay breaks one of its internal rules.
//!
//! The layers are read from the "Import layers" section of docs/ARCHITECTURE.md (its first
//! ```text block), so the document and the check cannot drift apart. An import is any
//! `crate::…` or `super::…` path in code (comments and string literals do not count),
//! `use crate::{a, b::c}` groups included. Test code (`tests.rs` files, `tests/` folders
//! and items marked `#[cfg(test)]`) is not checked: a test may use a higher layer to build
//! its inputs (the handshake's tests seal a record with the tunnel).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The only files in `src/relay/` that may name the scheduler: the module root, the
/// daemon that starts it and the context that holds its handle. Workers take jobs and
/// report back through `jobs::Lane` instead.
const MAY_IMPORT_SCHEDULER: &[&str] = &["mod", "scheduler", "daemon", "context"];

/// Pure cores inside `src/relay/` (checked when the file exists): no tokio, no clock,
/// and no import of a relay file that runs tasks.
const RELAY_PURE_CORES: &[&str] = &["sender", "admission", "schedule", "outcome"];

/// Whether the relay's own files must form no circle (enforced since issue 12).
const RELAY_ACYCLIC: bool = true;

/// The crate to check: this one, or `SIPMAIL_LAYERS_ROOT` (to try the check on another tree).
fn root() -> PathBuf {
    std::env::var_os("SIPMAIL_LAYERS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Module name -> layer number, from docs/ARCHITECTURE.md.
fn layers() -> BTreeMap<String, u32> {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md")).unwrap();
    let section = doc
        .split("\n## Import layers")
        .nth(1)
        .expect("docs/ARCHITECTURE.md has a \"## Import layers\" section");
    let block = section
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the Import layers section has a ```text block");
    let mut map = BTreeMap::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (n, mods) = line
            .trim()
            .split_once(char::is_whitespace)
            .expect("a layer line is `N  module, module`");
        let n: u32 = n.parse().expect("a layer number");
        for m in mods.split(',').map(str::trim).filter(|m| !m.is_empty()) {
            // "relay (scheduler, ...)" style notes after a name are allowed.
            let m = m.split_whitespace().next().unwrap();
            assert!(
                map.insert(m.to_string(), n).is_none(),
                "{m} is in two layers"
            );
        }
    }
    map
}

/// Every `.rs` file under `dir`, with its module path (`src/relay/mod.rs` -> `[relay]`).
fn rust_files(dir: &Path, module: &[String], out: &mut Vec<(PathBuf, Vec<String>)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if p.is_dir() {
            if name == "tests" {
                continue;
            }
            let mut m = module.to_vec();
            m.push(name);
            rust_files(&p, &m, out);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem == "tests" {
                continue;
            }
            let mut m = module.to_vec();
            if !matches!(stem, "mod" | "lib" | "main") {
                m.push(stem.to_string());
            }
            out.push((p, m));
        }
    }
}

/// The code of a file with comments removed and string and char literals emptied.
/// Newlines are kept, so offsets still map to lines.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    let at = |i: usize, s: &str| {
        s.chars()
            .enumerate()
            .all(|(k, ch)| c.get(i + k) == Some(&ch))
    };
    while i < c.len() {
        let prev_ident = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
        if at(i, "//") {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if at(i, "/*") {
            let mut depth = 0;
            while i < c.len() {
                if at(i, "/*") {
                    depth += 1;
                    i += 2;
                } else if at(i, "*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if c[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
            out.push(' ');
        } else if !prev_ident && (at(i, "r\"") || at(i, "r#") || at(i, "br\"") || at(i, "br#")) {
            // Raw string: r#"..."#
            i += if c[i] == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while c.get(i) == Some(&'#') {
                hashes += 1;
                i += 1;
            }
            if c.get(i) != Some(&'"') {
                // `r#ident` (a raw identifier), not a string.
                out.push_str("r#");
                continue;
            }
            i += 1;
            let close: String = std::iter::once('"')
                .chain((0..hashes).map(|_| '#'))
                .collect();
            while i < c.len() && !at(i, &close) {
                if c[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += close.chars().count();
            out.push_str("\"\"");
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if c.get(i) == Some(&'\n') {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if c[i] == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if c.get(i + 1) == Some(&'\\') {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if c.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push('\'');
                i += 1;
            }
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Removes the items marked `#[cfg(test)]` (a `mod tests { … }`, a helper function, a `use`).
fn drop_test_items(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(start) = out.find("#[cfg(test)]") {
        let b: Vec<char> = out.chars().collect();
        let s = out[..start].chars().count();
        let mut i = s + "#[cfg(test)]".len();
        let mut depth = 0;
        while i < b.len() {
            match b[i] {
                ';' if depth == 0 => break,
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        let newlines = b[s..i.min(b.len())]
            .iter()
            .filter(|&&ch| ch == '\n')
            .count();
        let mut kept: String = b[..s].iter().collect();
        kept.extend(std::iter::repeat_n('\n', newlines));
        kept.extend(b[(i + 1).min(b.len())..].iter());
        out = kept;
    }
    out
}

/// One path found in code: where, and its segments after `crate::` resolution.
struct Import {
    line: usize,
    path: Vec<String>,
    /// Part of a `pub use` / `pub(crate) use` re-export.
    reexport: bool,
}

fn ident_at(c: &[char], mut i: usize) -> (String, usize) {
    let mut s = String::new();
    while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
        s.push(c[i]);
        i += 1;
    }
    (s, i)
}

fn skip_ws(c: &[char], mut i: usize) -> usize {
    while i < c.len() && c[i].is_whitespace() {
        i += 1;
    }
    i
}

/// The paths that continue at `i` (after a `::`): `a::b`, `{a, b::{c, d}}`.
fn tails(c: &[char], i: usize) -> Vec<Vec<String>> {
    let i = skip_ws(c, i);
    if c.get(i) == Some(&'{') {
        let mut all = Vec::new();
        let mut j = i + 1;
        loop {
            j = skip_ws(c, j);
            match c.get(j) {
                None | Some('}') => break,
                Some(',') => j += 1,
                _ => {
                    all.extend(tails(c, j));
                    // Skip this element up to the next `,` or `}` at this depth.
                    let mut depth = 0;
                    while j < c.len() {
                        match c[j] {
                            '{' => depth += 1,
                            '}' if depth == 0 => break,
                            '}' => depth -= 1,
                            ',' if depth == 0 => break,
                            _ => {}
                        }
                        j += 1;
                    }
                }
            }
        }
        return all;
    }
    let (id, j) = ident_at(c, i);
    if id.is_empty() {
        return vec![vec![]];
    }
    let k = skip_ws(c, j);
    if c.get(k) == Some(&':') && c.get(k + 1) == Some(&':') {
        tails(c, k + 2)
            .into_iter()
            .map(|mut t| {
                t.insert(0, id.clone());
                t
            })
            .collect()
    } else {
        vec![vec![id]]
    }
}

/// Every `crate::`, `super::` and (in a `mod.rs` file) `child::` path of `code`, as an
/// absolute module path.
fn imports(code: &str, module: &[String], children: &BTreeSet<String>) -> Vec<Import> {
    let c: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    let mut line = 1;
    let mut stmt_start = 0;
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '\n' => line += 1,
            ';' | '{' | '}' => stmt_start = i + 1,
            _ => {}
        }
        let starts_path = (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
            && !(i >= 2 && c[i - 1] == ':' && c[i - 2] == ':');
        if !starts_path || !(c[i].is_alphabetic() || c[i] == '_') {
            i += 1;
            continue;
        }
        let (id, j) = ident_at(&c, i);
        let k = skip_ws(&c, j);
        let is_path = c.get(k) == Some(&':') && c.get(k + 1) == Some(&':');
        if !is_path {
            i = j.max(i + 1);
            continue;
        }
        let stmt: String = c[stmt_start..i].iter().collect();
        let stmt = stmt.trim_start();
        let reexport = stmt.starts_with("pub use") || stmt.starts_with("pub(crate) use");
        let base: Option<Vec<String>> = match id.as_str() {
            "crate" => Some(vec![]),
            "super" => {
                // super::super::… : count them.
                let mut up = 1;
                let mut m = k + 2;
                loop {
                    let n = skip_ws(&c, m);
                    let (next, e) = ident_at(&c, n);
                    let e2 = skip_ws(&c, e);
                    if next == "super" && c.get(e2) == Some(&':') && c.get(e2 + 1) == Some(&':') {
                        up += 1;
                        m = e2 + 2;
                    } else {
                        break;
                    }
                }
                let start = module.len().saturating_sub(up);
                let segs = tails(&c, m);
                for t in segs {
                    let mut p = module[..start].to_vec();
                    p.extend(t);
                    found.push(Import {
                        line,
                        path: p,
                        reexport,
                    });
                }
                i = j;
                continue;
            }
            "self" => Some(module.to_vec()),
            _ if children.contains(&id) => {
                let mut p = module.to_vec();
                p.push(id.clone());
                for t in tails(&c, k + 2) {
                    let mut q = p.clone();
                    q.extend(t);
                    found.push(Import {
                        line,
                        path: q,
                        reexport,
                    });
                }
                i = j;
                continue;
            }
            _ => None,
        };
        if let Some(base) = base {
            for t in tails(&c, k + 2) {
                let mut p = base.clone();
                p.extend(t);
                found.push(Import {
                    line,
                    path: p,
                    reexport,
                });
            }
        }
        i = j;
    }
    found
}

/// Circles in a directed graph, each as a list of nodes (one per strongly connected
/// component with more than one node).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let nodes: BTreeSet<&String> = edges
        .iter()
        .flat_map(|(a, bs)| std::iter::once(a).chain(bs))
        .collect();
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for m in edges.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> = nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in &nodes {
        if done.contains(*n) || !reach[n].contains(*n) {
            continue;
        }
        let comp: Vec<String> = nodes
            .iter()
            .filter(|m| reach[n].contains(**m) && reach[*m].contains(*n))
            .map(|m| m.to_string())
            .collect();
        done.extend(comp.iter().cloned());
        if comp.len() > 1 {
            out.push(comp);
        }
    }
    out
}

struct Source {
    rel: String,
    module: Vec<String>,
    code: String,
}

fn sources() -> Vec<Source> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &[], &mut files);
    files
        .into_iter()
        .map(|(p, module)| Source {
            rel: p.strip_prefix(root()).unwrap().display().to_string(),
            module,
            code: drop_test_items(&strip(&std::fs::read_to_string(&p).unwrap())),
        })
        .collect()
}

/// The submodule names of each module (from the files found).
fn children(srcs: &[Source]) -> BTreeMap<Vec<String>, BTreeSet<String>> {
    let mut map: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    for s in srcs {
        if let Some((last, parent)) = s.module.split_last() {
            map.entry(parent.to_vec()).or_default().insert(last.clone());
        }
    }
    map
}

fn is_binary(s: &Source) -> bool {
    s.rel == "src/main.rs" || s.rel.starts_with("src/cli/")
}

#[test]
fn modules_import_only_lower_layers() {
    let layers = layers();
    let srcs = sources();
    let kids = children(&srcs);
    let mut errors = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in srcs.iter().filter(|s| !is_binary(s)) {
        let Some(from) = s.module.first() else {
            continue; // lib.rs: declarations only
        };
        let Some(&from_layer) = layers.get(from) else {
            errors.push(format!(
                "{}: module `{from}` is in no layer of docs/ARCHITECTURE.md",
                s.rel
            ));
            continue;
        };
        let none = BTreeSet::new();
        let my_kids = kids.get(&s.module).unwrap_or(&none);
        for imp in imports(&s.code, &s.module, my_kids) {
            let Some(to) = imp.path.first() else { continue };
            if to == from || !kids[&vec![]].contains(to) {
                continue; // inside the module, or a crate-root item
            }
            edges.entry(from.clone()).or_default().insert(to.clone());
            let to_layer = layers.get(to).copied().unwrap_or(u32::MAX);
            if to_layer >= from_layer {
                errors.push(format!(
                    "{}:{}: `{from}` (layer {from_layer}) imports `{}` (layer {to_layer}); \
                     a module may only import lower layers",
                    s.rel,
                    imp.line,
                    imp.path.join("::"),
                ));
            }
        }
    }
    for c in circles(&edges) {
        errors.push(format!(
            "import circle between the modules {}",
            c.join(", ")
        ));
    }
    assert!(errors.is_empty(), "layer check:\n{}", errors.join("\n"));
}

#[test]
fn every_module_has_a_layer() {
    let layers = layers();
    let srcs = sources();
    for top in children(&srcs)[&vec![]].iter().filter(|t| *t != "cli") {
        assert!(
            layers.contains_key(top),
            "src module `{top}` is in no layer of docs/ARCHITECTURE.md"
        );
    }
}

/// The library never reaches the binary's paths, and the binary uses the library by name.
#[test]
fn library_does_not_use_the_binary() {
    for s in sources().iter().filter(|s| !is_binary(s)) {
        assert!(!s.code.contains("sipmail::"), "{} names `sipmail::`", s.rel);
        assert!(!s.code.contains("crate::cli"), "{} names the CLI", s.rel);
    }
}

/// The relay's own file graph: `relay/F.rs` -> the relay files it imports (`mod` for items
/// of relay/mod.rs). Re-exports in mod.rs do not count as imports.
fn relay_graph(srcs: &[Source]) -> BTreeMap<String, BTreeSet<String>> {
    let kids = children(srcs);
    let relay = vec!["relay".to_string()];
    let none = BTreeSet::new();
    let relay_kids = kids.get(&relay).unwrap_or(&none);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in srcs.iter().filter(|s| s.module.first() == Some(&relay[0])) {
        let from = s.module.get(1).cloned().unwrap_or_else(|| "mod".into());
        let my_kids = kids.get(&s.module).unwrap_or(&none);
        for imp in imports(&s.code, &s.module, my_kids) {
            if imp.path.first() != Some(&relay[0]) || (from == "mod" && imp.reexport) {
                continue;
            }
            let to = match imp.path.get(1) {
                Some(k) if relay_kids.contains(k) => k.clone(),
                _ => "mod".into(),
            };
            if to != from {
                g.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    g
}

#[test]
fn relay_internal_rules() {
    let srcs = sources();
    let g = relay_graph(&srcs);
    let mut errors = Vec::new();
    for (from, tos) in &g {
        if tos.contains("scheduler") && !MAY_IMPORT_SCHEDULER.contains(&from.as_str()) {
            errors.push(format!(
                "src/relay/{from}: imports the scheduler; workers report back instead \
                 (tests/layers.rs MAY_IMPORT_SCHEDULER)"
            ));
        }
    }
    let is_async = |code: &str| {
        code.contains("tokio::") || code.contains("async fn") || code.contains(".await")
    };
    // The relay files that run tasks: spawn, select, sleep, own sockets or channels (mod.rs,
    // the facade, is left out; an async writer adaptor such as trace.rs's is not a task).
    let runs_tasks = |code: &str| {
        [
            "tokio::spawn",
            "tokio::net",
            "tokio::time",
            "tokio::sync",
            "tokio::select",
            "JoinSet",
        ]
        .iter()
        .any(|t| code.contains(t))
    };
    let async_files: BTreeSet<String> = srcs
        .iter()
        .filter(|s| s.module.len() >= 2 && s.module[0] == "relay" && runs_tasks(&s.code))
        .map(|s| s.module[1].clone())
        .collect();
    for s in srcs.iter().filter(|s| {
        s.module.len() >= 2 && s.module[0] == "relay" && RELAY_PURE_CORES.contains(&&*s.module[1])
    }) {
        let name = &s.module[1];
        if is_async(&s.code) || s.code.contains("::now()") {
            errors.push(format!(
                "{}: a pure core uses tokio or reads the clock",
                s.rel
            ));
        }
        for to in g.get(name).into_iter().flatten() {
            if async_files.contains(to) {
                errors.push(format!(
                    "{}: a pure core imports relay/{to}, which runs tasks",
                    s.rel
                ));
            }
        }
    }
    let relay_circles = circles(&g);
    if RELAY_ACYCLIC {
        for c in &relay_circles {
            errors.push(format!("relay import circle: {}", c.join(", ")));
        }
    } else if !relay_circles.is_empty() {
        eprintln!("relay import circles (not enforced yet, RELAY_ACYCLIC): {relay_circles:?}");
    }
    assert!(errors.is_empty(), "relay rules:\n{}", errors.join("\n"));
}

/// The checker itself: comments, strings and test items do not count; groups do.
#[test]
fn the_checker_reads_paths() {
    let src = r##"
use crate::{a::X, b::{self, Y}, c};
// use crate::commented;
/* use crate::block; */
let s = "crate::string";
let r = r#"crate::raw"#;
let ch = '"';
fn f<'a>(x: &'a str) { crate::d::f(x) }
#[cfg(test)]
mod tests { use crate::testonly; }
use super::e;
"##;
    let code = drop_test_items(&strip(src));
    let kids = BTreeSet::new();
    let mut tops: Vec<String> = imports(&code, &["m".to_string(), "n".to_string()], &kids)
        .into_iter()
        .map(|i| i.path.join("::"))
        .collect();
    tops.sort();
    assert_eq!(tops, ["a::X", "b::Y", "b::self", "c", "d::f", "m::e"]);
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert(
        "b".to_string(),
        BTreeSet::from(["a".to_string(), "c".to_string()]),
    );
    assert_eq!(circles(&g), vec![vec!["a".to_string(), "b".to_string()]]);
}
