//! The text the MoE² gate is trained on (DESIGN §5): windows of four kinds of text found
//! on the machine itself, so that training needs no network and no data set.
//!
//! Everything is deterministic: each category's files are listed, sorted, shuffled with
//! a fixed seed, and split by *file* into training and held-out files (a held-out file
//! never gives a training window, so held-out scores are not inflated by text the gate
//! saw from the same document); windows are fixed-size byte ranges cut at a line (or
//! at least a character) boundary.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The kind of text a window is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    /// English prose: licenses, copyright files, READMEs, manuals.
    Prose,
    /// Source code: Python, C headers, Rust.
    Code,
    /// Natural language other than English (translations).
    Multilingual,
    /// Data formats: JSON, XML, TOML, CSV, INI, YAML.
    Structured,
}

impl Category {
    pub const ALL: [Category; 4] = [Category::Prose, Category::Code, Category::Multilingual, Category::Structured];

    pub fn name(self) -> &'static str {
        match self {
            Category::Prose => "prose",
            Category::Code => "code",
            Category::Multilingual => "multilingual",
            Category::Structured => "structured",
        }
    }

    /// The category of a name as [`Category::name`] writes it.
    pub fn parse(name: &str) -> Result<Category> {
        Category::ALL.into_iter().find(|c| c.name() == name).ok_or_else(|| {
            Error::input(format!("unknown text category {name:?} (known: prose, code, multilingual, structured)"))
        })
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a file's text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    /// The file as it is (UTF-8; other files are skipped).
    Text,
    /// A gettext `.mo` catalogue: its translations (msgstr), one per line.
    Mo,
}

/// Where one category's files come from: every file under `root` (a file or a
/// directory, walked to `max_depth` levels) whose path `accept` takes.
#[derive(Clone)]
pub struct Source {
    pub category: Category,
    pub root: PathBuf,
    pub max_depth: usize,
    pub accept: fn(&Path) -> bool,
    pub format: Format,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Source({}, {}, depth {})", self.category, self.root.display(), self.max_depth)
    }
}

/// One training or held-out text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub category: Category,
    pub source: PathBuf,
    pub text: String,
    /// From a held-out file: for evaluation only, never for training.
    pub held_out: bool,
}

/// How windows are cut and split.
#[derive(Debug, Clone)]
pub struct CorpusOptions {
    /// At most this many windows per category, training and held-out together.
    pub max_windows: usize,
    /// Target window size in bytes (a window ends at the last line break before it,
    /// or at a character boundary when a line is longer than half a window).
    pub window_bytes: usize,
    /// The share of each category's files held out (at least one file when a category
    /// has two or more).
    pub held_out_fraction: f64,
    /// At most this many windows from one file (so that a few long files do not make
    /// up a whole category).
    pub windows_per_file: usize,
    /// Seed of the shuffles.
    pub seed: u64,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions { max_windows: 64, window_bytes: 1500, held_out_fraction: 0.25, windows_per_file: 2, seed: 0 }
    }
}

/// Windows of every category, and which categories had no usable file.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    pub windows: Vec<Window>,
    /// Categories for which no source gave a file (reported, not an error: the gate
    /// trains on what there is).
    pub missing: Vec<Category>,
}

/// Bytes read from one file at most (windows come from its start).
const READ_LIMIT: u64 = 256 << 10;

/// Windows with fewer visible characters than this are skipped (blank padding).
const MIN_VISIBLE: usize = 32;

impl Corpus {
    /// Windows from this machine's own files ([`default_sources`]).
    pub fn gather(max_windows_per_category: usize, seed: u64) -> Result<Corpus> {
        let opts = CorpusOptions { max_windows: max_windows_per_category, seed, ..CorpusOptions::default() };
        Corpus::gather_from(&default_sources(), &opts)
    }

    /// Windows from `sources`, cut and split as `opts` says.
    pub fn gather_from(sources: &[Source], opts: &CorpusOptions) -> Result<Corpus> {
        if opts.window_bytes < 64 {
            return Err(Error::input(format!("windows of {} bytes are too small (at least 64)", opts.window_bytes)));
        }
        if !(0.0..1.0).contains(&opts.held_out_fraction) {
            return Err(Error::input(format!("held-out fraction {} is not in [0, 1)", opts.held_out_fraction)));
        }
        let mut corpus = Corpus::default();
        for (ci, category) in Category::ALL.into_iter().enumerate() {
            let mut files: Vec<(PathBuf, Format)> = Vec::new();
            for s in sources.iter().filter(|s| s.category == category) {
                let mut found = Vec::new();
                walk(&s.root, s.max_depth, s.accept, &mut found);
                files.extend(found.into_iter().map(|p| (p, s.format)));
            }
            files.sort();
            files.dedup_by(|a, b| a.0 == b.0);
            if files.is_empty() {
                corpus.missing.push(category);
                continue;
            }
            let mut rng = SplitMix(opts.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(ci as u64 + 1)));
            shuffle(&mut files, &mut rng);
            // The first files of the shuffled order are held out.
            let n_held = if files.len() < 2 || opts.held_out_fraction == 0.0 {
                0
            } else {
                ((files.len() as f64 * opts.held_out_fraction).round() as usize).clamp(1, files.len() - 1)
            };
            // At least one window on each side when there are files and room for both.
            let want_held = if n_held == 0 || opts.max_windows < 2 {
                0
            } else {
                ((opts.max_windows as f64 * opts.held_out_fraction).round() as usize).clamp(1, opts.max_windows - 1)
            };
            let want_train = opts.max_windows - want_held;
            let (held, train) = files.split_at(n_held);
            corpus.windows.extend(take_windows(category, held, true, want_held, opts));
            corpus.windows.extend(take_windows(category, train, false, want_train, opts));
        }
        Ok(corpus)
    }

    /// The windows for training (`false`) or held out (`true`).
    pub fn split(&self, held_out: bool) -> impl Iterator<Item = &Window> {
        self.windows.iter().filter(move |w| w.held_out == held_out)
    }
}

/// Up to `want` windows from `files` in order, at most `windows_per_file` each.
fn take_windows(
    category: Category,
    files: &[(PathBuf, Format)],
    held_out: bool,
    want: usize,
    opts: &CorpusOptions,
) -> Vec<Window> {
    let mut out = Vec::new();
    for (path, format) in files {
        if out.len() >= want {
            break;
        }
        let Some(text) = read_text(path, *format) else { continue };
        for text in cut_windows(&text, opts.window_bytes).into_iter().take(opts.windows_per_file) {
            if out.len() >= want {
                break;
            }
            out.push(Window { category, source: path.clone(), text, held_out });
        }
    }
    out
}

/// Every file under `root` (itself, if a file) that `accept` takes, at most `depth`
/// directory levels down; unreadable entries are skipped, links are not followed.
fn walk(root: &Path, depth: usize, accept: fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    let Ok(meta) = std::fs::symlink_metadata(root) else { return };
    if meta.is_file() {
        if accept(root) {
            out.push(root.to_path_buf());
        }
        return;
    }
    if !meta.is_dir() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_file() {
            if accept(&p) {
                out.push(p);
            }
        } else if t.is_dir() && depth > 0 {
            walk(&p, depth - 1, accept, out);
        }
    }
}

/// A file's text, or `None` when it is unreadable, binary, not UTF-8, or empty.
fn read_text(path: &Path, format: Format) -> Option<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    let limit = if format == Format::Mo { 8 * READ_LIMIT } else { READ_LIMIT };
    file.take(limit).read_to_end(&mut bytes).ok()?;
    let text = match format {
        Format::Text => {
            if bytes.contains(&0) {
                return None;
            }
            // A read cut short may end inside a character: keep the valid prefix.
            match std::str::from_utf8(&bytes) {
                Ok(s) => s.to_string(),
                Err(e) if e.error_len().is_none() => String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned(),
                Err(_) => return None,
            }
        }
        Format::Mo => mo_translations(&bytes)?,
    };
    (!text.trim().is_empty()).then_some(text)
}

/// The translations of a gettext `.mo` catalogue (either byte order), one per line,
/// without the header entry; `None` when the file is not a catalogue or not UTF-8.
pub fn mo_translations(bytes: &[u8]) -> Option<String> {
    let word = |off: usize, le: bool| -> Option<usize> {
        let b: [u8; 4] = bytes.get(off..off + 4)?.try_into().ok()?;
        Some(if le { u32::from_le_bytes(b) } else { u32::from_be_bytes(b) } as usize)
    };
    let le = match word(0, true)? {
        0x9504_12de => true,
        0xde12_0495 => false,
        _ => return None,
    };
    let (count, trans) = (word(8, le)?, word(16, le)?);
    let mut out = String::new();
    for i in 0..count.min(1 << 20) {
        let (len, off) = (word(trans + 8 * i, le)?, word(trans + 8 * i + 4, le)?);
        let s = std::str::from_utf8(bytes.get(off..off.checked_add(len)?)?).ok()?;
        // Entry 0 with an empty msgid is the header (charset, translators).
        if s.is_empty() || (i == 0 && s.contains("Content-Type:")) {
            continue;
        }
        // Plural forms are separated by NULs: each on its own line.
        for part in s.split('\0').filter(|p| !p.is_empty()) {
            out.push_str(part);
            out.push('\n');
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Consecutive windows of about `size` bytes: each ends after the last line break in
/// its range when that is past half the range, else at the last character boundary.
/// Mostly blank windows are dropped.
pub fn cut_windows(text: &str, size: usize) -> Vec<String> {
    // Room for any character, so that every window makes progress.
    let size = size.max(4);
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = if rest.len() <= size {
            rest.len()
        } else {
            let mut cut = size;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            match rest[..cut].rfind('\n') {
                Some(nl) if nl + 1 > size / 2 => nl + 1,
                _ => cut,
            }
        };
        // A window shorter than half the size is the file's tail: it ends the file.
        let (w, tail) = rest.split_at(end.max(1));
        if w.len() < size / 2 && !out.is_empty() {
            break;
        }
        if w.chars().filter(|c| !c.is_whitespace()).count() >= MIN_VISIBLE {
            out.push(w.to_string());
        }
        rest = tail;
    }
    out
}

/// A small deterministic generator (SplitMix64): the corpus must not depend on a
/// crate's generator changing between versions.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Fisher–Yates.
fn shuffle<T>(v: &mut [T], rng: &mut SplitMix) {
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn ext_in(p: &Path, exts: &[&str]) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn name_of(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or("")
}

fn any_file(_: &Path) -> bool {
    true
}

fn is_copyright(p: &Path) -> bool {
    name_of(p) == "copyright"
}

fn is_readme(p: &Path) -> bool {
    let n = name_of(p).to_ascii_lowercase();
    n.starts_with("readme") && !n.ends_with(".gz") && !n.ends_with(".html")
}

fn is_vim_help(p: &Path) -> bool {
    ext_in(p, &["txt"])
}

fn is_python(p: &Path) -> bool {
    ext_in(p, &["py"])
}

fn is_c_header(p: &Path) -> bool {
    ext_in(p, &["h"])
}

fn is_rust(p: &Path) -> bool {
    ext_in(p, &["rs"])
}

/// A `.mo` catalogue of a language other than English.
fn is_foreign_mo(p: &Path) -> bool {
    ext_in(p, &["mo"]) && !p.components().any(|c| c.as_os_str().to_str().is_some_and(|s| s.starts_with("en")))
}

fn is_structured(p: &Path) -> bool {
    ext_in(p, &["json", "xml", "toml", "csv", "ini", "yaml", "yml"])
}

/// Where the text of each category lives on a Debian-like system (missing roots are
/// simply empty): prose from licenses, copyright files, READMEs and Vim's manual; code
/// from Python's standard library, C headers and the Cargo registry's sources;
/// multilingual text from gettext catalogues; structured text from data files under
/// /usr/share and /etc.
pub fn default_sources() -> Vec<Source> {
    let src = |category, root: PathBuf, max_depth, accept: fn(&Path) -> bool, format| Source {
        category,
        root,
        max_depth,
        accept,
        format,
    };
    let mut v = vec![
        src(Category::Prose, "/usr/share/common-licenses".into(), 0, any_file, Format::Text),
        src(Category::Prose, "/usr/share/doc".into(), 1, is_copyright, Format::Text),
        src(Category::Prose, "/usr/share/doc".into(), 2, is_readme, Format::Text),
    ];
    // The newest Vim and Python installed (their directories carry the version).
    for (dir, prefix, sub) in [("/usr/share/vim", "vim", "doc"), ("/usr/lib", "python3.", "")] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| name_of(p).strip_prefix(prefix).is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit())))
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            if prefix == "vim" {
                v.push(src(Category::Prose, p.join(sub), 0, is_vim_help, Format::Text));
            } else {
                v.push(src(Category::Code, p, 1, is_python, Format::Text));
            }
        }
    }
    v.push(src(Category::Code, "/usr/include".into(), 1, is_c_header, Format::Text));
    if let Some(home) = std::env::var_os("CARGO_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| {
            let mut p = PathBuf::from(h);
            p.push(".cargo");
            p.into_os_string()
        })
    }) {
        v.push(src(Category::Code, PathBuf::from(home).join("registry/src"), 4, is_rust, Format::Text));
    }
    v.push(src(Category::Multilingual, "/usr/share/locale".into(), 3, is_foreign_mo, Format::Mo));
    v.push(src(Category::Multilingual, "/usr/share/vim".into(), 5, is_foreign_mo, Format::Mo));
    v.push(src(Category::Structured, "/usr/share".into(), 4, is_structured, Format::Text));
    v.push(src(Category::Structured, "/etc".into(), 3, is_structured, Format::Text));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("cairn-corpus-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create temp dir");
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A tree of `files` text files per category directory, each long enough for
    /// several windows, the file's name inside every line.
    fn tree(tag: &str, files: usize) -> (TempDir, Vec<Source>) {
        let dir = TempDir::new(tag);
        let mut sources = Vec::new();
        for c in [Category::Prose, Category::Code, Category::Structured] {
            let d = dir.0.join(c.name());
            std::fs::create_dir_all(d.join("sub")).expect("mkdir");
            for f in 0..files {
                let name = format!("f{f:02}.txt");
                let line = format!("{} file {name}: some words that fill a line of text.\n", c.name());
                let p = if f % 2 == 0 { d.join(&name) } else { d.join("sub").join(&name) };
                std::fs::write(p, line.repeat(60)).expect("write");
            }
            // Binary and non-UTF-8 files are skipped.
            std::fs::write(d.join("zz.bin"), [0u8, 1, 2, 3].repeat(100)).expect("write");
            std::fs::write(d.join("zz.latin1"), [b'a', 0xe9, b'\n'].repeat(100)).expect("write");
            sources.push(Source { category: c, root: d, max_depth: 2, accept: any_file, format: Format::Text });
        }
        // Multilingual: a root that does not exist.
        sources.push(Source {
            category: Category::Multilingual,
            root: dir.0.join("nowhere"),
            max_depth: 2,
            accept: any_file,
            format: Format::Mo,
        });
        (dir, sources)
    }

    fn opts(seed: u64) -> CorpusOptions {
        CorpusOptions { max_windows: 12, window_bytes: 400, held_out_fraction: 0.25, windows_per_file: 2, seed }
    }

    #[test]
    fn split_is_by_file_and_deterministic() {
        let (_dir, sources) = tree("split", 10);
        let a = Corpus::gather_from(&sources, &opts(7)).expect("gather");
        let b = Corpus::gather_from(&sources, &opts(7)).expect("gather");
        assert_eq!(a.windows, b.windows, "same seed, same corpus");
        assert_eq!(a.missing, vec![Category::Multilingual]);
        for c in [Category::Prose, Category::Code, Category::Structured] {
            let ws: Vec<&Window> = a.windows.iter().filter(|w| w.category == c).collect();
            assert_eq!(ws.len(), 12, "{c}: max_windows windows");
            let held: std::collections::BTreeSet<&PathBuf> =
                ws.iter().filter(|w| w.held_out).map(|w| &w.source).collect();
            let train: std::collections::BTreeSet<&PathBuf> =
                ws.iter().filter(|w| !w.held_out).map(|w| &w.source).collect();
            assert_eq!(ws.iter().filter(|w| w.held_out).count(), 3, "{c}: a quarter held out");
            assert!(!held.is_empty() && !train.is_empty());
            assert!(held.is_disjoint(&train), "{c}: a file gives windows to one side only");
            for w in &ws {
                assert!(w.text.len() <= 400 && w.text.len() >= 200, "{c}: window of {} bytes", w.text.len());
                assert!(w.text.ends_with('\n'), "cut at a line break");
                let name = w.source.file_name().and_then(|n| n.to_str()).expect("name");
                assert!(w.text.contains(name), "the text comes from its source");
                assert!(name.ends_with(".txt"), "binary and non-UTF-8 files are skipped, not {name}");
            }
            // Never more than windows_per_file from one file.
            for f in held.iter().chain(&train) {
                assert!(ws.iter().filter(|w| &&w.source == f).count() <= 2);
            }
        }
        // Another seed shuffles the files another way.
        let c = Corpus::gather_from(&sources, &opts(8)).expect("gather");
        assert_ne!(a.windows, c.windows);
        assert_eq!(c.windows.len(), a.windows.len());
    }

    #[test]
    fn held_out_files_never_train_whatever_the_budget() {
        let (_dir, sources) = tree("budget", 6);
        for max in [1, 2, 5, 40] {
            let mut o = opts(3);
            o.max_windows = max;
            let corpus = Corpus::gather_from(&sources, &o).expect("gather");
            let held: Vec<&PathBuf> = corpus.split(true).map(|w| &w.source).collect();
            assert!(corpus.split(false).all(|w| !held.contains(&&w.source)), "max {max}");
            for c in [Category::Prose, Category::Code, Category::Structured] {
                let n = corpus.windows.iter().filter(|w| w.category == c).count();
                assert!(n <= max && n > 0, "{c}: {n} windows for max {max}");
                assert!(corpus.windows.iter().any(|w| w.category == c && !w.held_out), "{c}: training windows");
            }
        }
    }

    #[test]
    fn bad_options_are_errors() {
        let (_dir, sources) = tree("bad", 2);
        let mut o = opts(0);
        o.window_bytes = 10;
        assert!(Corpus::gather_from(&sources, &o).is_err());
        let mut o = opts(0);
        o.held_out_fraction = 1.0;
        assert!(Corpus::gather_from(&sources, &o).is_err());
        assert!(Category::parse("poetry").is_err());
        assert_eq!(Category::parse("code").ok(), Some(Category::Code));
    }

    #[test]
    fn windows_cut_at_lines_and_characters() {
        let text = "ééééé\n".repeat(50);
        for w in cut_windows(&text, 100) {
            assert!(w.len() <= 100 && w.ends_with('\n'));
        }
        // One long line: cut at a character boundary.
        let text = "é".repeat(300);
        let ws = cut_windows(&text, 101);
        assert!(ws.iter().all(|w| w.len() <= 101 && w.len() >= 100));
        assert_eq!(ws.concat(), text[..ws.concat().len()]);
        assert!(cut_windows("   \n\n  ", 100).is_empty());
    }

    #[test]
    fn mo_catalogues_give_their_translations() {
        // Header + two entries, little-endian, as msgfmt writes them.
        let entries: [(&str, &str); 3] =
            [("", "Content-Type: text/plain; charset=UTF-8\n"), ("File", "Datei"), ("Open", "Öffnen\0Öffnet")];
        let n = entries.len();
        let mut strings = Vec::new();
        let mut table_o = Vec::new();
        let mut table_t = Vec::new();
        let base = 28 + 16 * n;
        for (o, _) in &entries {
            table_o.push((o.len(), base + strings.len()));
            strings.extend_from_slice(o.as_bytes());
            strings.push(0);
        }
        for (_, t) in &entries {
            table_t.push((t.len(), base + strings.len()));
            strings.extend_from_slice(t.as_bytes());
            strings.push(0);
        }
        let mut b = Vec::new();
        for w in [0x9504_12deu32, 0, n as u32, 28, 28 + 8 * n as u32, 0, 0] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        for (len, off) in table_o.iter().chain(&table_t) {
            b.extend_from_slice(&(*len as u32).to_le_bytes());
            b.extend_from_slice(&(*off as u32).to_le_bytes());
        }
        b.extend_from_slice(&strings);
        assert_eq!(mo_translations(&b).as_deref(), Some("Datei\nÖffnen\nÖffnet\n"));
        assert_eq!(mo_translations(&b[..20]), None, "truncated");
        assert_eq!(mo_translations(b"not a catalogue at all"), None);
    }
}
