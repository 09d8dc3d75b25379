//! The house's floors: no import cycle between the modules of either crate.
//!
//! Each file is a module (`src/dispatch/planner.rs` is `dispatch::planner`, a `mod.rs` is its
//! folder's module). Module A depends on module B when A's code names a path into B:
//! `crate::b::...` (in a `use`, braces expanded, or inline), `super::...`, `self::...` or a
//! child module named bare, resolved from A; a path names the deepest module it reaches. A
//! module's use of its own ancestors (a folder's shared vocabulary, `super::Step`) is not an
//! edge; a folder's use of its children is. Comments, string literals and `#[cfg(test)]`
//! modules are not code. A cycle (A reaches B and B reaches A) fails the test, naming the
//! modules and one path of each edge.
//!
//! `cargo test -p gridweaver-actors --test layout -- --nocapture` prints every edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files of a crate's `src`, by module path (`""` is the crate root).
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    files
        .into_iter()
        .map(|f| {
            let rel = f.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                parts.pop();
            }
            (parts.join("::"), f)
        })
        .collect()
}

/// The code of a file without comments, string and char literals, and `#[cfg(test)]`
/// modules (tests may reach anywhere).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(at) => &text[..at],
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'r'
            && (b.get(i + 1) == Some(&b'#') || b.get(i + 1) == Some(&b'"'))
            && (i == 0 || !b[i - 1].is_ascii_alphanumeric() && b[i - 1] != b'_')
        {
            // A raw string r#"..."# (any number of #).
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(b[i] as char);
                i += 1;
                continue;
            }
            let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            i = text[j + 1..].find(&close).map_or(b.len(), |k| j + 1 + k + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            i = text[i + 2..].find('\'').map_or(b.len(), |k| i + 3 + k);
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// Every path the code names from `crate::`, `super::`, `self::` or one of `children`
/// (the module's own submodules, named bare), braces expanded, as segments.
fn paths(code: &str, children: &[String]) -> Vec<Vec<String>> {
    fn ident(c: char) -> bool {
        c.is_alphanumeric() || c == '_'
    }
    /// Expands `prefix::{a, b::{c, d}}` at `s` (just after `prefix::`).
    fn expand(prefix: &[String], s: &str, out: &mut Vec<Vec<String>>) {
        let s = s.trim_start();
        if let Some(rest) = s.strip_prefix('{') {
            // Split the top-level items of the group.
            let (mut depth, mut start) = (0, 0);
            for (k, ch) in rest.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        let item = &rest[start..k];
                        if !item.trim().is_empty() {
                            expand(prefix, item, out);
                        }
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(prefix, &rest[start..k], out);
                        start = k + 1;
                    }
                    _ => {}
                }
            }
            return;
        }
        let mut path = prefix.to_vec();
        let mut rest = s;
        loop {
            let name: String = rest.chars().take_while(|c| ident(*c)).collect();
            if name.is_empty() {
                break;
            }
            rest = &rest[name.len()..];
            path.push(name);
            match rest.strip_prefix("::") {
                Some(r) if r.starts_with('{') => return expand(&path, r, out),
                Some(r) => rest = r,
                None => break,
            }
        }
        out.push(path);
    }
    let mut out = Vec::new();
    let roots: Vec<String> = ["crate::".to_owned(), "super::".to_owned(), "self::".to_owned()]
        .into_iter()
        .chain(children.iter().map(|c| format!("{c}::")))
        .collect();
    for root in &roots {
        let mut at = 0;
        while let Some(k) = code[at..].find(root.as_str()) {
            let start = at + k;
            at = start + root.len();
            let before = code[..start].chars().last();
            if before.is_some_and(ident) || code[..start].ends_with("::") {
                continue;
            }
            let first = root.trim_end_matches(':');
            let mut prefix =
                vec![if children.iter().any(|c| c == first) { format!("self::{first}") } else { first.to_owned() }];
            let mut rest = &code[at..];
            // super::super::...
            while let Some(r) = rest.strip_prefix("super::") {
                prefix.push("super".into());
                rest = r;
            }
            expand(&prefix, rest, &mut out);
        }
    }
    out
}

/// The module a path from module `from` names: the deepest known module it reaches.
fn resolve(from: &str, path: &[String], known: &BTreeSet<String>) -> Option<String> {
    let mut base: Vec<&str> = if from.is_empty() { Vec::new() } else { from.split("::").collect() };
    let expanded: Vec<&str> = path.iter().flat_map(|p| p.split("::")).collect();
    let mut segs = expanded.into_iter().peekable();
    match segs.next()? {
        "crate" => base.clear(),
        "self" => {}
        // The module path's parent, whether the module is a file or a folder's `mod.rs`.
        "super" => {
            base.pop();
        }
        _ => return None,
    }
    while segs.peek() == Some(&"super") {
        segs.next();
        base.pop();
    }
    let mut best = base.join("::");
    for s in segs {
        base.push(s);
        let name = base.join("::");
        if known.contains(&name) {
            best = name;
        } else {
            break;
        }
    }
    Some(best)
}

/// Module -> the modules it depends on, with one line that shows each edge.
fn graph(src: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let mods = modules(src);
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    let mut g: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (m, file) in &mods {
        if m.ends_with("tests") {
            // Test code may reach anywhere.
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read a source file");
        let code = code(&text);
        let edges = g.entry(m.clone()).or_default();
        if m.is_empty() {
            // The crate root only declares and re-exports its modules.
            continue;
        }
        let prefix = format!("{m}::");
        let children: Vec<String> = known
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .filter(|rest| !rest.contains("::"))
            .map(str::to_owned)
            .collect();
        for p in paths(&code, &children) {
            let Some(to) = resolve(m, &p, &known) else { continue };
            // A module may use what its own folders share (`super::Step` in `dispatch::machine`
            // is `dispatch`'s vocabulary): no edge to an ancestor. Every other use is one,
            // a folder's use of its own children included.
            if &to == m || m.starts_with(&format!("{to}::")) || to.is_empty() {
                continue;
            }
            edges.entry(to).or_insert_with(|| p.join("::"));
        }
    }
    g
}

/// Strongly connected components of more than one module (Tarjan's algorithm).
fn cycles(g: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeMap<String, String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        if let Some(edges) = t.g.get(v) {
            for w in edges.keys() {
                let w = w.as_str();
                if !t.g.contains_key(w) {
                    continue;
                }
                if !t.index.contains_key(w) {
                    visit(t, w);
                    let lw = t.low[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w) {
                    let iw = t.index[w];
                    let lv = t.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut scc = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                scc.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                t.out.push(scc);
            }
        }
    }
    let mut t =
        T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), out: Vec::new() };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            visit(&mut t, v);
        }
    }
    t.out
}

fn check(krate: &str, src: PathBuf) {
    let g = graph(&src);
    for (m, edges) in &g {
        for (to, how) in edges {
            println!("{krate}: {m} -> {to}   ({how})");
        }
    }
    let found = cycles(&g);
    let shown: Vec<String> = found
        .iter()
        .map(|scc| {
            let members: BTreeSet<&String> = scc.iter().collect();
            let edges: Vec<String> = scc
                .iter()
                .flat_map(|m| {
                    g[m].iter()
                        .filter(|(to, _)| members.contains(to))
                        .map(move |(to, how)| format!("{m} -> {to} ({how})"))
                })
                .collect();
            format!("[{}]: {}", scc.join(", "), edges.join("; "))
        })
        .collect();
    assert!(found.is_empty(), "import cycles in {krate}:\n{}", shown.join("\n"));
}

#[test]
fn the_core_has_no_import_cycle() {
    check("gridweaver-core", Path::new(env!("CARGO_MANIFEST_DIR")).join("../src"));
}

#[test]
fn the_runtime_has_no_import_cycle() {
    check("gridweaver-actors", Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
}
