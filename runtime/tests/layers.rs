//! The modules of `runtime/src` point one way: each belongs to a layer and uses only
//! modules of its own layer or below (docs/ARCHITECTURE.md, "Layers"). This test reads
//! every source file, resolves the paths that name other modules (`use` statements,
//! groups included, and inline `crate::`/`super::`/`self::`/child-module paths) to the
//! module they reach, and fails on any that climbs. It also checks that the table in
//! ARCHITECTURE.md is [`LAYERS`], and tests the checker itself on a file that climbs.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

/// The layers, bottom up, and the module paths in each. A path of a file inside a
/// directory (`bitstack::build`) overrides the directory's layer, for a directory
/// that mixes layers: the longest entry that is a prefix of a module's path wins.
const LAYERS: &[(&str, &[&str])] = &[
    ("storage", &["error", "weights", "bitstack", "synthetic", "tokenizer", "chat", "sampling", "energy"]),
    ("backends", &["backend"]),
    ("model", &["model"]),
    ("long prompts", &["longctx"]),
    ("engine", &["engine", "needle"]),
    ("front ends", &["cli", "bench", "convert", "pull", "bitstack::build", "server", "route", "main"]),
];

type ModPath = Vec<String>;

/// A module path as written in the table: `a::b`.
fn show(p: &[String]) -> String {
    if p.is_empty() {
        "crate".into()
    } else {
        p.join("::")
    }
}

/// The layer of a module path: the longest table entry that is a prefix of it.
fn layer_of(p: &[String]) -> Option<usize> {
    let mut best: Option<(usize, usize)> = None;
    for (layer, (_, entries)) in LAYERS.iter().enumerate() {
        for e in entries.iter() {
            let e: Vec<&str> = e.split("::").collect();
            let hit = e.len() <= p.len() && e.iter().zip(p).all(|(a, b)| a == b);
            if hit && best.is_none_or(|(len, _)| e.len() > len) {
                best = Some((e.len(), layer));
            }
        }
    }
    best.map(|(_, layer)| layer)
}

fn layer_name(l: usize) -> String {
    format!("layer {} ({})", l + 1, LAYERS[l].0)
}

/// The module a file under `src/` defines: `backend/cpu/mod.rs` is `backend::cpu`,
/// `lib.rs` the crate root (empty), `main.rs` the binary's `main`.
fn module_of(rel: &str) -> ModPath {
    let rel = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut p: ModPath = rel.split('/').map(String::from).collect();
    if p.last().is_some_and(|l| l == "mod") || p == ["lib"] {
        p.pop();
    }
    p
}

/// `src` with comments, string and character literals blanked (newlines kept), so
/// that neither text about paths nor braces inside strings is read as code.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, s: &[char]| out.extend(s.iter().map(|&ch| if ch == '\n' { '\n' } else { ' ' }));
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied();
        let start = i;
        if c[i] == '/' && at(i + 1) == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && at(i + 1) == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == Some('*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == Some('/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_at(&c, i) {
            // r"…", r#"…"#, br"…": up to a quote followed by as many hashes.
            i += hashes + 2;
            while i < c.len() && !(c[i] == '"' && c[i + 1..].iter().take(hashes).all(|&ch| ch == '#')) {
                i += 1;
            }
            i = (i + 1 + hashes).min(c.len());
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i = (i + 1).min(c.len());
        } else if c[i] == '\'' && at(i + 1) == Some('\\') {
            // '\n', '\'', '\u{…}': the escaped character, then up to the closing quote.
            i += 3;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i = (i + 1).min(c.len());
        } else if c[i] == '\'' && at(i + 2) == Some('\'') {
            i += 3;
        } else {
            // Code, and the quote of a lifetime or label.
            out.push(c[i]);
            i += 1;
            continue;
        }
        blank(&mut out, &c[start..i]);
    }
    out
}

fn ident_char(ch: char) -> bool {
    ch.is_ascii_alphanumeric() || ch == '_'
}

/// The number of hashes when a raw string starts at `c[i]` (its `r`, not inside an
/// identifier; `br` too).
fn raw_string_at(c: &[char], i: usize) -> Option<usize> {
    let word_start = |k: usize| k == 0 || !ident_char(c[k - 1]);
    if c[i] != 'r' || !(word_start(i) || (c[i - 1] == 'b' && word_start(i - 1))) {
        return None;
    }
    let hashes = c[i + 1..].iter().take_while(|&&ch| ch == '#').count();
    (c.get(i + 1 + hashes) == Some(&'"')).then_some(hashes)
}

struct Tok {
    text: String,
    line: usize,
}

/// Identifiers (and numbers), `::`, and single punctuation characters.
fn tokens(code: &str) -> Vec<Tok> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < c.len() {
        let start = i;
        if c[i] == '\n' {
            line += 1;
            i += 1;
            continue;
        } else if c[i].is_whitespace() {
            i += 1;
            continue;
        } else if ident_char(c[i]) {
            while i < c.len() && ident_char(c[i]) {
                i += 1;
            }
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            i += 1;
        }
        out.push(Tok { text: c[start..i].iter().collect(), line });
    }
    out
}

fn is_ident(s: &str) -> bool {
    s.starts_with(|ch: char| ch.is_ascii_alphabetic() || ch == '_')
}

/// One use tree from `t[*i]` on, under `prefix`: every full path it names, with the
/// name it binds (`*` for a glob). `self` in a group names the group's own path.
fn use_tree(t: &[&str], i: &mut usize, mut prefix: Vec<String>, out: &mut Vec<(ModPath, String)>) {
    loop {
        match t.get(*i).copied() {
            Some("{") => {
                *i += 1;
                while let Some(&tok) = t.get(*i) {
                    match tok {
                        "}" => break,
                        "," => *i += 1,
                        _ => use_tree(t, i, prefix.clone(), out),
                    }
                }
                *i += 1;
                return;
            }
            Some("*") => {
                *i += 1;
                prefix.push("*".into());
                out.push((prefix, "*".into()));
                return;
            }
            Some("::") => {
                *i += 1;
                if prefix.is_empty() {
                    // `::name`: an external crate.
                    prefix.push("::".into());
                }
            }
            Some(id) if is_ident(id) => {
                *i += 1;
                if id != "self" || prefix.is_empty() {
                    prefix.push(id.into());
                }
                if t.get(*i) == Some(&"::") {
                    continue;
                }
                let mut name = prefix.last().cloned().unwrap_or_default();
                if t.get(*i) == Some(&"as") {
                    name = t.get(*i + 1).map_or("_".into(), |n| n.to_string());
                    *i += 2;
                }
                out.push((prefix, name));
                return;
            }
            _ => {
                *i += 1;
                return;
            }
        }
    }
}

/// A path in a file, as written, with the inline modules (`mod tests { … }`) around it.
struct Found {
    line: usize,
    path: ModPath,
    inline: ModPath,
}

/// Every path of `src` that may name a module: the full paths of its `use` statements
/// and each inline `a::b…` chain (not preceded by `::`).
fn paths(src: &str) -> Vec<Found> {
    let t = tokens(&strip(src));
    let text = |k: usize| t.get(k).map_or("", |x| x.text.as_str());
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut mods: Vec<(String, usize)> = Vec::new();
    let mut i = 0;
    while i < t.len() {
        let inline: ModPath = mods.iter().map(|(m, _)| m.clone()).collect();
        match text(i) {
            "mod" if is_ident(text(i + 1)) && text(i + 2) == "{" => {
                mods.push((text(i + 1).into(), depth));
                depth += 1;
                i += 3;
            }
            "{" => {
                depth += 1;
                i += 1;
            }
            "}" => {
                depth = depth.saturating_sub(1);
                if mods.last().is_some_and(|&(_, d)| d == depth) {
                    mods.pop();
                }
                i += 1;
            }
            "use" if text(i + 1) != "<" => {
                let end = (i..t.len()).find(|&k| t[k].text == ";").unwrap_or(t.len());
                let toks: Vec<&str> = t[i + 1..end].iter().map(|x| x.text.as_str()).collect();
                let (mut j, mut trees) = (0, Vec::new());
                while j < toks.len() {
                    use_tree(&toks, &mut j, Vec::new(), &mut trees);
                }
                for (path, _) in trees {
                    out.push(Found { line: t[i].line, path, inline: inline.clone() });
                }
                i = end + 1;
            }
            id if is_ident(id) && text(i + 1) == "::" && (i == 0 || text(i - 1) != "::") => {
                let mut path = vec![id.to_string()];
                let mut j = i + 1;
                while text(j) == "::" && is_ident(text(j + 1)) {
                    path.push(text(j + 1).into());
                    j += 2;
                }
                out.push(Found { line: t[i].line, path, inline });
                i = j;
            }
            _ => i += 1,
        }
    }
    out
}

/// What the checker knows about the crate: its modules (one per file) and the names
/// the root re-exports (`pub use error::{Error, Result}` makes `crate::Error` mean
/// `crate::error::Error`).
struct Crate {
    modules: HashSet<ModPath>,
    aliases: HashMap<String, ModPath>,
}

impl Crate {
    fn new(files: &[String], lib_rs: &str) -> Crate {
        let modules: HashSet<ModPath> = files.iter().map(|f| module_of(f)).collect();
        let mut c = Crate { modules, aliases: HashMap::new() };
        let toks = tokens(&strip(lib_rs));
        for (k, tok) in toks.iter().enumerate() {
            if tok.text != "use" {
                continue;
            }
            let end = (k..toks.len()).find(|&e| toks[e].text == ";").unwrap_or(toks.len());
            let t: Vec<&str> = toks[k + 1..end].iter().map(|x| x.text.as_str()).collect();
            let (mut j, mut trees) = (0, Vec::new());
            while j < t.len() {
                use_tree(&t, &mut j, Vec::new(), &mut trees);
            }
            for (path, name) in trees {
                if let Some(abs) = c.resolve(&[], &path) {
                    c.aliases.insert(name, abs);
                }
            }
        }
        c
    }

    /// The absolute path (from the crate root) that `path`, written in module `m`,
    /// names; `None` for paths outside the crate's modules (std, other crates, items
    /// in scope). `Err` for a `super` past the root.
    fn resolve(&self, m: &[String], path: &[String]) -> Option<ModPath> {
        let mut abs: ModPath;
        let mut rest = path;
        match path.first().map(String::as_str) {
            Some("crate") => {
                abs = Vec::new();
                rest = &path[1..];
            }
            Some("super" | "self") => {
                abs = m.to_vec();
                while let Some(s) = rest.first().filter(|s| *s == "super" || *s == "self") {
                    if s == "super" {
                        // Past the root: keep a marker that names no module.
                        if abs.pop().is_none() {
                            return Some(vec!["super".into()]);
                        }
                    }
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                // A child module of `m` (or, in the root, any top-level module).
                let mut child = m.to_vec();
                child.push(first.to_string());
                if !self.modules.contains(&child) {
                    return None;
                }
                abs = m.to_vec();
            }
            None => return None,
        }
        abs.extend(rest.iter().cloned());
        if let Some(target) = abs.first().and_then(|f| self.aliases.get(f)) {
            let mut a = target.clone();
            a.extend(abs[1..].iter().cloned());
            abs = a;
        }
        Some(abs)
    }

    /// Every import of file `rel` (relative to `src/`) that climbs, or names what the
    /// checker cannot place.
    fn check(&self, rel: &str, src: &str) -> Vec<Problem> {
        let m = module_of(rel);
        if m.is_empty() {
            // lib.rs: the root only declares modules and re-exports.
            return Vec::new();
        }
        let Some(from) = layer_of(&m) else {
            return vec![Problem { file: rel.into(), line: 0, import: String::new(), kind: Kind::Unplaced(show(&m)) }];
        };
        let mut out = Vec::new();
        for f in paths(src) {
            let mut here = m.clone();
            here.extend(f.inline.iter().cloned());
            let Some(abs) = self.resolve(&here, &f.path) else { continue };
            let import = f.path.join("::");
            let problem = |kind| Problem { file: rel.into(), line: f.line, import: import.clone(), kind };
            let top = abs.first().cloned().unwrap_or_default();
            if !self.modules.contains(&vec![top.clone()]) {
                out.push(problem(Kind::Unknown(show(&abs))));
                continue;
            }
            match layer_of(&abs) {
                None => out.push(problem(Kind::Unplaced(show(&abs)))),
                Some(to) if to > from => out.push(problem(Kind::Climbs { from, to, target: show(&abs) })),
                Some(_) => {}
            }
        }
        out
    }
}

#[derive(Debug, PartialEq)]
enum Kind {
    /// An import from layer `from` into the higher layer `to`.
    Climbs { from: usize, to: usize, target: String },
    /// A module that no table entry covers.
    Unplaced(String),
    /// A path into the crate that names no module of it.
    Unknown(String),
}

#[derive(Debug)]
struct Problem {
    file: String,
    line: usize,
    import: String,
    kind: Kind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = format!("runtime/src/{}", self.file);
        match &self.kind {
            Kind::Climbs { from, to, target } => write!(
                f,
                "{file}:{}: import `{}` climbs: this file is in {}, `{target}` is in {}. A module may use \
                 only its own layer and those below (docs/ARCHITECTURE.md, Layers): move what both need down \
                 to a layer both can see, or hand it in from above",
                self.line,
                self.import,
                layer_name(*from),
                layer_name(*to)
            ),
            Kind::Unplaced(m) => write!(
                f,
                "{file}:{}: module `{m}` has no layer: add it to LAYERS in runtime/tests/layers.rs and to the \
                 table in docs/ARCHITECTURE.md",
                self.line
            ),
            Kind::Unknown(p) => {
                write!(f, "{file}:{}: `{}` (`{p}`) names no module of runtime/src", self.line, self.import)
            }
        }
    }
}

fn rs_files(dir: &Path, rel: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let r = if rel.is_empty() { name.clone() } else { format!("{rel}/{name}") };
        if e.file_type().unwrap().is_dir() {
            rs_files(&e.path(), &r, out);
        } else if name.ends_with(".rs") {
            out.push(r);
        }
    }
}

#[test]
fn imports_never_climb_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rs_files(&src, "", &mut files);
    let read = |f: &str| std::fs::read_to_string(src.join(f)).unwrap();
    let krate = Crate::new(&files, &read("lib.rs"));
    assert_eq!(krate.aliases.get("Error"), Some(&vec!["error".to_string(), "Error".to_string()]));
    let problems: Vec<String> = files.iter().flat_map(|f| krate.check(f, &read(f))).map(|p| p.to_string()).collect();
    assert!(files.len() > 20, "found only {files:?}");
    assert!(problems.is_empty(), "{} import(s) break the layers:\n{}", problems.len(), problems.join("\n"));
}

#[test]
fn the_table_is_well_formed() {
    let mut seen = HashSet::new();
    for (_, entries) in LAYERS {
        for e in entries.iter() {
            assert!(seen.insert(*e), "{e} is in two layers");
        }
    }
    let p = |s: &str| -> ModPath { s.split("::").map(String::from).collect() };
    assert_eq!(layer_of(&p("bitstack::build::run")), Some(5));
    assert_eq!(layer_of(&p("bitstack::linalg")), Some(0));
    assert_eq!(layer_of(&module_of("server/http.rs")), Some(5));
    assert_eq!(layer_of(&module_of("backend/cpu/mod.rs")), Some(1));
    assert_eq!(layer_of(&p("nowhere")), None);
}

/// docs/ARCHITECTURE.md's "Layers" table lists the same layers and modules, in order.
#[test]
fn the_architecture_doc_shows_this_table() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/ARCHITECTURE.md")).unwrap();
    let rows: Vec<(String, Vec<String>)> = doc
        .lines()
        .skip_while(|l| l.trim() != "## Layers")
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let modules = cells[3].split('`').skip(1).step_by(2).map(String::from).collect();
            (cells[2].to_string(), modules)
        })
        .collect();
    let want: Vec<(String, Vec<String>)> =
        LAYERS.iter().map(|(n, m)| (n.to_string(), m.iter().map(|s| s.to_string()).collect())).collect();
    assert_eq!(rows, want, "docs/ARCHITECTURE.md's Layers table differs from LAYERS in runtime/tests/layers.rs");
}

/// The checker on a made-up backend file: every way of writing an import that climbs
/// is caught, and comments, strings and imports downward are not.
#[test]
fn the_checker_catches_an_upward_import() {
    let files: Vec<String> = ["lib.rs", "error.rs", "weights.rs", "engine.rs", "needle.rs", "longctx.rs"]
        .iter()
        .chain(&["model/mod.rs", "backend/mod.rs", "backend/cpu/mod.rs", "backend/cpu/ops.rs", "cli/mod.rs"])
        .chain(&["bitstack/mod.rs", "bitstack/build.rs", "bitstack/linalg.rs"])
        .map(|s| s.to_string())
        .collect();
    let krate = Crate::new(&files, "pub mod error;\npub use error::{Error, Result};\n");
    let ops = r##"//! Not an import: use crate::engine::Engine;
use super::{AttnParams, Backend};
use crate::{error::Result, weights::{HostTensor, ModelFile}};
use crate::{engine::{self, Engine}, model::Runner as R};
/* use crate::cli; /* nested */ use crate::cli; */
fn f() -> crate::Result<()> {
    let s = "crate::cli::run() {";
    let c = '"';
    let l: &'static str = r#"crate::cli"#;
    crate::longctx::filter_pass();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use super::super::super::super::needle::run;
    use super::super::super::Backend;
}
"##;
    let got: Vec<(usize, String, Kind)> =
        krate.check("backend/cpu/ops.rs", ops).into_iter().map(|p| (p.line, p.import, p.kind)).collect();
    let climbs = |from: usize, to: usize, target: &str| Kind::Climbs { from, to, target: target.into() };
    assert_eq!(
        got,
        vec![
            (4, "crate::engine".into(), climbs(1, 4, "engine")),
            (4, "crate::engine::Engine".into(), climbs(1, 4, "engine::Engine")),
            (4, "crate::model::Runner".into(), climbs(1, 2, "model::Runner")),
            (10, "crate::longctx::filter_pass".into(), climbs(1, 3, "longctx::filter_pass")),
            (17, "super::super::super::super::needle::run".into(), climbs(1, 4, "needle::run")),
        ]
    );

    // The message names the file, the import and both layers.
    let msg = krate.check("backend/cpu/ops.rs", "use crate::engine::Engine;\n")[0].to_string();
    assert!(msg.starts_with("runtime/src/backend/cpu/ops.rs:1: import `crate::engine::Engine` climbs"), "{msg}");
    assert!(msg.contains("layer 2 (backends)") && msg.contains("layer 5 (engine)"), "{msg}");

    // A directory that mixes layers: bitstack's run-time part may not use its builder,
    // however the path is written; the builder may use the run-time part.
    for import in ["use build::StackOptions;", "use self::build::run;", "fn f() { build::run(); }"] {
        let got = krate.check("bitstack/mod.rs", import);
        assert!(
            matches!(got.as_slice(), [Problem { kind: Kind::Climbs { from: 0, to: 5, .. }, .. }]),
            "{import}: {got:?}"
        );
    }
    assert!(krate.check("bitstack/build.rs", "use super::{linalg, Stack};\nuse crate::engine::Engine;").is_empty());

    // Modules the table does not place, and paths to no module, are reported too.
    assert!(matches!(krate.check("newthing.rs", "")[0].kind, Kind::Unplaced(_)));
    assert!(matches!(krate.check("engine.rs", "use crate::nothing::X;")[0].kind, Kind::Unknown(_)));
    assert!(krate.check("server/mod.rs", "use crate::engine::Engine;\nuse crate::cli;").is_empty());
}
