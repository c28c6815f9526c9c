//! The real default model with its header, metadata and tensor directory mutated a few
//! hundred times (seeded): the GGUF parser, the model file, the model loader and (when
//! the result still loads) a forward pass must return errors, never panic.
//!
//! Two kinds of input:
//! - header prefixes: the bytes before the data section (plus a little data), copied and
//!   then mutated freely (bytes set, flipped, inserted, deleted, spliced, truncated);
//!   a prefix never holds its tensors, so this exercises the parser's own checks;
//! - the whole file, patched in place on disk (same length) and opened through
//!   `ModelFile::open`, so that mutations which keep the file parseable reach
//!   `model::load` and a forward pass. Patches aim at the hyper-parameters and the tensor
//!   directory (dims, types, offsets) as well as at random header bytes.

mod common;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Instant;

use cairn::backend::cpu::CpuBackend;
use cairn::model::{self, Logits};
use cairn::synthetic::{llama_gguf, SplitMix, SyntheticConfig};
use cairn::tokenizer::Tokenizer;
use cairn::weights::ModelFile;
use cairn_formats::{Gguf, GgufBuilder, MetaValue};

/// Iterations of each test, and the seed. `CAIRN_SOAK_ITERATIONS` and `CAIRN_SOAK_SEED`
/// override them for a longer hunt (budgets below scale with the iterations).
const ITERATIONS: usize = 300;
const SEED: u64 = 0x0C0F_FEE5;

fn iterations() -> usize {
    std::env::var("CAIRN_SOAK_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(ITERATIONS)
}

fn seed() -> u64 {
    std::env::var("CAIRN_SOAK_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(SEED)
}

/// Forward passes and tokenizer builds are the slow part; a few dozen cover them.
fn max_forwards() -> usize {
    iterations() / 20
}
fn max_tokenizers() -> usize {
    iterations() * 2 / 15
}

struct Rng(SplitMix);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.0.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn byte(&mut self) -> u8 {
        self.0.next_u64() as u8
    }
}

/// Where things are in the real file.
struct Layout {
    /// Start of the data section.
    data_offset: usize,
    /// Start of the tensor directory (the first tensor name's length prefix).
    directory: usize,
    /// Byte offset of each integer hyper-parameter's value (`llama.*` u32s).
    hparams: Vec<(String, usize)>,
    /// For each tensor: offset of its `n_dims` field (name precedes it).
    tensor_fields: Vec<(String, usize, usize)>,
    /// Where the tokenizer's metadata starts (`tokenizer.ggml.*` keys, up to the directory).
    tokenizer: usize,
    /// (offset, length) of the text of every vocabulary token and merge rule.
    strings: Vec<(usize, usize)>,
    /// Offset of each value of `tokenizer.ggml.token_type` (i32s).
    token_types: Vec<usize>,
    /// Offset of each `tokenizer.ggml.*_token_id` value (u32s).
    token_ids: Vec<(String, usize)>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A string as GGUF stores it: u64 length, bytes.
fn gguf_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn layout(bytes: &[u8]) -> Layout {
    let g = Gguf::parse(bytes).expect("the real model parses");
    let data_offset = g.data_offset as usize;
    let header = &bytes[..data_offset];
    let directory = find(header, &gguf_str(&g.tensors[0].name)).expect("first tensor name in the directory");
    let value_at = |k: &str| find(header, &gguf_str(k)).expect("key in header") + 8 + k.len() + 4;
    let mut hparams = Vec::new();
    let mut token_ids = Vec::new();
    for (k, v) in &g.metadata {
        if k.starts_with("llama.") && v.as_u64().is_some() {
            hparams.push((k.clone(), value_at(k)));
        }
        if k.starts_with("tokenizer.ggml.") && k.ends_with("_token_id") {
            token_ids.push((k.clone(), value_at(k)));
        }
    }
    let le64 = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap()) as usize;
    // An array value: element type (u32), count (u64), elements.
    let mut strings = Vec::new();
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.merges"] {
        let at = value_at(key);
        let mut p = at + 4 + 8;
        for _ in 0..le64(at + 4) {
            let n = le64(p);
            strings.push((p + 8, n));
            p += 8 + n;
        }
    }
    let at = value_at("tokenizer.ggml.token_type");
    let token_types = (0..le64(at + 4)).map(|i| at + 12 + 4 * i).collect();
    let tokenizer = find(header, &gguf_str("tokenizer.ggml.model")).expect("tokenizer metadata");
    assert!(hparams.len() >= 6, "hyper-parameters found: {hparams:?}");
    let mut tensor_fields = Vec::new();
    let mut from = directory;
    for t in &g.tensors {
        let at = from + find(&header[from..], &gguf_str(&t.name)).expect("tensor name") + 8 + t.name.len();
        tensor_fields.push((t.name.clone(), at, t.dims.len()));
        from = at;
    }
    assert!(strings.len() > 90_000 && token_ids.len() >= 2, "{} strings, {token_ids:?}", strings.len());
    Layout { data_offset, directory, hparams, tensor_fields, tokenizer, strings, token_types, token_ids }
}

// ---------------------------------------------------------------- header prefixes

const INTERESTING: [u64; 12] =
    [0, 1, 2, 3, 7, 31, 0xFFFF_FFFF, 1 << 32, 1 << 60, i64::MAX as u64, u64::MAX - 31, u64::MAX];

/// A position in the header: anywhere, near the start (counts, general.* and llama.*
/// metadata) or in the tensor directory.
fn header_pos(rng: &mut Rng, l: &Layout, len: usize) -> usize {
    let p = match rng.below(3) {
        0 => rng.below(l.data_offset),
        1 => rng.below(2048),
        _ => l.directory + rng.below(l.data_offset - l.directory),
    };
    p.min(len.saturating_sub(1))
}

/// Mutate `buf` (a copy of the header prefix) in one of several ways; returns what it did.
fn mutate_prefix(rng: &mut Rng, l: &Layout, buf: &mut Vec<u8>) -> String {
    if buf.is_empty() {
        return "nothing left".into();
    }
    let p = header_pos(rng, l, buf.len());
    match rng.below(7) {
        0 => {
            let n = 1 + rng.below(4);
            for i in p..(p + n).min(buf.len()) {
                buf[i] = rng.byte();
            }
            format!("set {n} bytes at {p}")
        }
        1 => {
            let v = INTERESTING[rng.below(INTERESTING.len())];
            let end = (p + 8).min(buf.len());
            buf[p..end].copy_from_slice(&v.to_le_bytes()[..end - p]);
            format!("word {v:#x} at {p}")
        }
        2 => {
            let ins: Vec<u8> = (0..1 + rng.below(40)).map(|_| rng.byte()).collect();
            buf.splice(p..p, ins.iter().copied());
            format!("insert {} bytes at {p}", ins.len())
        }
        3 => {
            let n = 1 + rng.below(64);
            let end = (p + n).min(buf.len());
            buf.drain(p..end);
            format!("delete {n} bytes at {p}")
        }
        4 => {
            // Splice: a chunk of the header copied over another place.
            let from = header_pos(rng, l, buf.len());
            let n = 1 + rng.below(256);
            let chunk: Vec<u8> = buf[from..(from + n).min(buf.len())].to_vec();
            let end = (p + chunk.len()).min(buf.len());
            buf[p..end].copy_from_slice(&chunk[..end - p]);
            format!("splice {n} bytes from {from} to {p}")
        }
        5 => {
            buf.truncate(p);
            format!("truncate at {p}")
        }
        _ => {
            buf[p] ^= 1 << rng.below(8);
            format!("flip a bit at {p}")
        }
    }
}

/// Everything a caller may rely on after `Gguf::parse` succeeds.
fn check_parsed(f: &ModelFile, len: usize, what: &str) {
    for t in &f.tensors {
        let end = t.offset.checked_add(t.size);
        assert!(end.is_some_and(|e| e <= len as u64), "{what}: tensor {} out of bounds", t.name);
        assert_eq!(f.tensor_bytes(t).len() as u64, t.size, "{what}");
    }
}

/// An error must be one line a user can read.
fn check_error(e: &dyn std::fmt::Display, what: &str) {
    let s = e.to_string();
    assert!(!s.trim().is_empty() && !s.contains('\n'), "{what}: error text {s:?}");
    // File contents (a corrupt key, a name whose length is garbage) must not flood it.
    assert!(
        s.chars().count() <= 1000,
        "{what}: {}-character error: {}...",
        s.len(),
        s.chars().take(300).collect::<String>()
    );
}

#[derive(Default, Debug)]
struct Tally {
    parsed: usize,
    loaded: usize,
    forwards: usize,
    tokenizers: usize,
    errors: usize,
    /// Seconds spent building tokenizers and running forward passes.
    tokenizer_s: f64,
    forward_s: f64,
}

/// Open as a model file, build its tokenizer (when `tokenizer`), load, and (when
/// `forward`) run a forward pass, each while its budget lasts. Anything but clean errors fails, with `what` in the message.
fn exercise(file: cairn::Result<ModelFile>, forward: bool, tokenizer: bool, t: &mut Tally, what: &str) {
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            check_error(&e, what);
            t.errors += 1;
            return;
        }
    };
    t.parsed += 1;
    check_parsed(&file, file.file_bytes(), what);
    // The tokenizer reads the strings most header mutations land in.
    if tokenizer && t.tokenizers < max_tokenizers() {
        t.tokenizers += 1;
        let start = Instant::now();
        match Tokenizer::from_metadata(&file.metadata) {
            Ok(tok) => match tok.encode("Hello, world! <|im_start|> 123", true) {
                Ok(ids) => {
                    if let Err(e) = tok.decode(&ids) {
                        check_error(&e, what);
                    }
                }
                Err(e) => check_error(&e, what),
            },
            Err(e) => check_error(&e, what),
        }
        t.tokenizer_s += start.elapsed().as_secs_f64();
    }
    let runner = match model::load(&file, CpuBackend::new(1).expect("backend")) {
        Ok(r) => r,
        Err(e) => {
            check_error(&e, what);
            t.errors += 1;
            return;
        }
    };
    t.loaded += 1;
    if !forward || t.forwards >= max_forwards() {
        return;
    }
    t.forwards += 1;
    let start = Instant::now();
    let vocab = runner.config().vocab;
    let run = || -> cairn::Result<Vec<f32>> {
        let mut cache = runner.new_cache(4)?;
        runner.forward(cache.as_mut(), &[1], Logits::Last)
    };
    match run() {
        Ok(logits) => assert_eq!(logits.len(), vocab, "{what}"),
        Err(e) => check_error(&e, what),
    }
    t.forward_s += start.elapsed().as_secs_f64();
}

/// Runs `f`, turning a panic into a test failure that says which mutation caused it.
fn guarded(what: &str, f: impl FnOnce()) {
    if let Err(p) = catch_unwind(AssertUnwindSafe(f)) {
        let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
        panic!("panic on a mutated model ({what}): {}", msg.unwrap_or_default());
    }
}

#[test]
fn mutated_header_prefixes_never_panic() {
    let start = Instant::now();
    let bytes = std::fs::read(common::model_path()).expect("read model");
    let l = layout(&bytes);
    // The header and a little of the first tensor's data.
    let prefix = &bytes[..l.data_offset + 4096];
    let (n, mut rng) = (iterations(), Rng(SplitMix(seed())));
    let mut tally = Tally::default();
    for i in 0..n {
        let mut buf = prefix.to_vec();
        let mut what = format!("prefix #{i}:");
        for _ in 0..1 + rng.below(3) {
            what += &format!(" {};", mutate_prefix(&mut rng, &l, &mut buf));
        }
        guarded(&what, || {
            if let Err(e) = Gguf::parse(&buf) {
                check_error(&e, &what);
            }
            exercise(ModelFile::from_bytes("mutated.gguf", buf), true, false, &mut tally, &what);
        });
    }
    eprintln!("{n} mutated prefixes: {tally:?} in {:.1} s", start.elapsed().as_secs_f64());
    assert_eq!(tally.errors, n, "a prefix without its tensors' data cannot load: {tally:?}");
}

/// The real file cut anywhere before the end of its last tensor is an error: at random
/// points, and just before, at and after tensor boundaries. (Slices of the original, so
/// no copies.)
#[test]
fn truncated_real_model_is_an_error() {
    let start = Instant::now();
    let bytes = std::fs::read(common::model_path()).expect("read model");
    let g = Gguf::parse(&bytes).unwrap();
    let end = g.tensors.iter().map(|t| t.offset + t.size).max().unwrap() as usize;
    let mut rng = Rng(SplitMix(seed() ^ 0x5A5A));
    let mut cuts: Vec<usize> = (0..iterations() / 4).map(|_| rng.below(end)).collect();
    for _ in 0..iterations() / 30 {
        let t = &g.tensors[rng.below(g.tensors.len())];
        for edge in [t.offset, t.offset + t.size] {
            cuts.extend([edge as usize - 1, edge as usize, edge as usize + 1].into_iter().filter(|&c| c < end));
        }
    }
    cuts.extend([0, 3, 4, 8, 23, 24, g.data_offset as usize - 1, g.data_offset as usize, end - 1]);
    for &cut in &cuts {
        let what = format!("cut at {cut} of {}", bytes.len());
        guarded(&what, || match Gguf::parse(&bytes[..cut]) {
            Ok(g) => panic!("{what}: parsed with {} tensors", g.tensors.len()),
            Err(e) => check_error(&e, &what),
        });
    }
    // The cut file's trailing padding, if any, is all it can lose.
    assert!(Gguf::parse(&bytes[..end]).is_ok());
    eprintln!("{} cuts in {:.1} s", cuts.len(), start.elapsed().as_secs_f64());
}

// ---------------------------------------------------------------- whole-file patches

/// A temp copy of the model, patched in place and restored after each use.
struct Patchable {
    path: PathBuf,
    file: File,
}

impl Patchable {
    fn new(original: &Path) -> Patchable {
        let dir = std::env::temp_dir().join(format!("cairn-robustness-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("mutated.gguf");
        std::fs::copy(original, &path).expect("copy model");
        let file = OpenOptions::new().write(true).open(&path).expect("open copy");
        Patchable { path, file }
    }

    fn write(&mut self, at: usize, data: &[u8]) {
        self.file.seek(SeekFrom::Start(at as u64)).expect("seek");
        self.file.write_all(data).expect("write patch");
    }
}

impl Drop for Patchable {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

const SMALL: [u64; 24] = [
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    12,
    18,
    32,
    64,
    96,
    192,
    576,
    1536,
    8192,
    49152,
    1 << 20,
    1 << 31,
    0xFFFF_FFFF,
    1 << 40,
];
const TYPE_IDS: [u32; 16] = [0, 1, 2, 3, 6, 7, 8, 10, 12, 13, 14, 15, 30, 4, 99, u32::MAX];

/// What a patch aims at, which decides what is worth running on the result.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Aim {
    /// Hyper-parameters or the tensor directory: worth a forward pass if it loads.
    Model,
    /// Tokenizer metadata: worth building the tokenizer.
    Tokenizer,
}

/// One same-length patch of the file: (offset, new bytes, aim, description).
fn patch(rng: &mut Rng, l: &Layout, bytes: &[u8]) -> (usize, Vec<u8>, Aim, String) {
    match rng.below(8) {
        0 | 1 => {
            let (key, at) = &l.hparams[rng.below(l.hparams.len())];
            if rng.chance(0.15) {
                let ty = rng.below(14) as u32;
                return (at - 4, ty.to_le_bytes().to_vec(), Aim::Model, format!("{key} type -> {ty}"));
            }
            let orig = u32::from_le_bytes(bytes[*at..at + 4].try_into().unwrap()) as u64;
            let v = match rng.below(4) {
                0 => orig + 1,
                1 => orig.saturating_sub(1),
                2 => orig * 2,
                _ => SMALL[rng.below(SMALL.len())],
            } as u32;
            (*at, v.to_le_bytes().to_vec(), Aim::Model, format!("{key} = {v}"))
        }
        2 | 3 => {
            let (name, at, n_dims) = &l.tensor_fields[rng.below(l.tensor_fields.len())];
            let (ty_at, off_at) = (at + 4 + 8 * n_dims, at + 4 + 8 * n_dims + 4);
            let (p, v, desc) = match rng.below(4) {
                0 => {
                    let n = [0u32, 1, 2, 3, 4, 5, u32::MAX][rng.below(7)];
                    (*at, n.to_le_bytes().to_vec(), format!("{name} n_dims = {n}"))
                }
                1 => {
                    let i = rng.below(*n_dims);
                    let p = at + 4 + 8 * i;
                    let orig = u64::from_le_bytes(bytes[p..p + 8].try_into().unwrap());
                    let v = match rng.below(4) {
                        0 => orig / 2,
                        1 => orig * 2,
                        2 => u64::MAX - rng.below(3) as u64,
                        _ => SMALL[rng.below(SMALL.len())],
                    };
                    (p, v.to_le_bytes().to_vec(), format!("{name} dims[{i}] = {v}"))
                }
                2 => {
                    let ty = TYPE_IDS[rng.below(TYPE_IDS.len())];
                    (ty_at, ty.to_le_bytes().to_vec(), format!("{name} type = {ty}"))
                }
                _ => {
                    let orig = u64::from_le_bytes(bytes[off_at..off_at + 8].try_into().unwrap());
                    let data_len = (bytes.len() - l.data_offset) as u64;
                    let v = match rng.below(6) {
                        0 => 0,
                        1 => orig + 32,
                        2 => orig.saturating_sub(32),
                        3 => orig + 1,
                        4 => data_len - data_len % 32,
                        _ => INTERESTING[rng.below(INTERESTING.len())],
                    };
                    (off_at, v.to_le_bytes().to_vec(), format!("{name} offset = {v}"))
                }
            };
            (p, v, Aim::Model, desc)
        }
        4 => {
            // The text of a token or merge rule, same length: spaces, byte-level BPE's
            // Ġ, special-token punctuation, invalid UTF-8, NUL, newlines.
            const PIECES: [&[u8]; 9] = [b" ", b"a", b"\xC4\xA0", b"<", b"|", b">", b"\xFF", b"\0", b"\n"];
            let (at, n) = l.strings[rng.below(l.strings.len())];
            let mut v = Vec::with_capacity(n);
            while v.len() < n {
                v.extend_from_slice(PIECES[rng.below(PIECES.len())]);
            }
            v.truncate(n);
            (at, v, Aim::Tokenizer, format!("{n}-byte token text at {at}"))
        }
        5 => {
            if rng.chance(0.5) {
                let at = l.token_types[rng.below(l.token_types.len())];
                let t = [0i32, 1, 2, 3, 4, 5, 6, 7, -1, i32::MAX][rng.below(10)];
                (at, t.to_le_bytes().to_vec(), Aim::Tokenizer, format!("token type {t} at {at}"))
            } else {
                let (key, at) = &l.token_ids[rng.below(l.token_ids.len())];
                let v = [0u32, 1, 2, 49151, 49152, 1 << 31, u32::MAX][rng.below(7)];
                (*at, v.to_le_bytes().to_vec(), Aim::Tokenizer, format!("{key} = {v}"))
            }
        }
        6 => {
            let p = header_pos(rng, l, l.data_offset);
            let n = (1 + rng.below(4)).min(l.data_offset - p);
            let v: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            (p, v, aim_at(l, p), format!("{n} random bytes at {p}"))
        }
        _ => {
            let p = header_pos(rng, l, l.data_offset - 8);
            let v = INTERESTING[rng.below(INTERESTING.len())];
            (p, v.to_le_bytes().to_vec(), aim_at(l, p), format!("word {v:#x} at {p}"))
        }
    }
}

fn aim_at(l: &Layout, p: usize) -> Aim {
    if p < l.tokenizer {
        Aim::Model
    } else if p < l.directory {
        Aim::Tokenizer
    } else {
        Aim::Model
    }
}

#[test]
fn patched_models_never_panic() {
    let start = Instant::now();
    let path = common::model_path();
    let bytes = std::fs::read(&path).expect("read model");
    let l = layout(&bytes);
    let mut copy = Patchable::new(&path);
    let (n, mut rng) = (iterations(), Rng(SplitMix(seed() ^ 0xA5A5)));
    let mut tally = Tally::default();
    for i in 0..n {
        let mut what = format!("patch #{i}:");
        let mut touched = Vec::new();
        let mut aims = Vec::new();
        for _ in 0..1 + rng.below(2) {
            let (at, data, aim, desc) = patch(&mut rng, &l, &bytes);
            copy.write(at, &data);
            touched.push((at, data.len()));
            aims.push(aim);
            what += &format!(" {desc};");
        }
        let (model, tokenizer) = (aims.contains(&Aim::Model), aims.contains(&Aim::Tokenizer));
        if n != ITERATIONS {
            // A soak run: an abort (say, a failed allocation) leaves no panic message.
            eprintln!("{what}");
        }
        guarded(&what, || exercise(ModelFile::open(&copy.path), model, tokenizer, &mut tally, &what));
        for (at, n) in touched.into_iter().rev() {
            copy.write(at, &bytes[at..at + n]);
        }
    }
    // The restored copy is the model again.
    let restored = ModelFile::open(&copy.path).expect("restored copy parses");
    model::load(&restored, CpuBackend::new(1).unwrap()).expect("restored copy loads");
    eprintln!("{n} patched models: {tally:?} in {:.1} s", start.elapsed().as_secs_f64());
    // The mix must reach every stage, or the test proves little.
    assert!(tally.errors >= n / 10, "{tally:?}");
    assert!(tally.loaded >= n / 10, "{tally:?}");
    assert!(tally.forwards >= max_forwards() / 2 && tally.tokenizers >= max_tokenizers() / 2, "{tally:?}");
}

// ---------------------------------------------------------------- hostile hyper-parameters

/// `bytes` rebuilt with the metadata values in `set` (added when absent).
fn with_metadata(bytes: &[u8], set: &[(&str, MetaValue)]) -> Vec<u8> {
    let g = Gguf::parse(bytes).unwrap();
    let mut b = GgufBuilder::new();
    for (k, v) in &g.metadata {
        if !set.iter().any(|(s, _)| s == k) {
            b = b.meta(k, v.clone());
        }
    }
    for (k, v) in set {
        b = b.meta(k, v.clone());
    }
    for t in &g.tensors {
        b = b.tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec()).unwrap();
    }
    b.build()
}

/// Huge, zero and overflowing hyper-parameters (as u32 and u64, alone and in pairs whose
/// products overflow) are load errors: no panic, no allocation sized by a count.
#[test]
fn hostile_hyper_parameters_are_errors() {
    let base = llama_gguf(&SyntheticConfig::default(), 1).unwrap();
    let keys = [
        "llama.block_count",
        "llama.context_length",
        "llama.embedding_length",
        "llama.feed_forward_length",
        "llama.attention.head_count",
        "llama.attention.head_count_kv",
        "llama.attention.key_length",
    ];
    let values = [0u64, 1, 3, 1 << 31, u32::MAX as u64, 1 << 32, 1 << 40, 1 << 62, u64::MAX];
    let mut cases: Vec<Vec<(&str, MetaValue)>> = Vec::new();
    for key in keys {
        for v in values {
            cases.push(vec![(key, MetaValue::U64(v))]);
            if let Ok(v) = u32::try_from(v) {
                cases.push(vec![(key, MetaValue::U32(v))]);
            }
            cases.push(vec![(key, MetaValue::I64(v as i64))]);
            for other in ["llama.attention.key_length", "llama.attention.head_count_kv"] {
                if other != key {
                    cases.push(vec![(key, MetaValue::U64(v)), (other, MetaValue::U64(v))]);
                }
            }
        }
        cases.push(vec![(key, MetaValue::String("64".into()))]);
        cases.push(vec![(key, MetaValue::F32(f32::NAN))]);
    }
    for f in ["llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"] {
        for v in [f32::NAN, f32::INFINITY, -1.0, 0.0, f32::MAX] {
            cases.push(vec![(f, MetaValue::F32(v))]);
        }
    }
    let mut loaded = 0;
    for set in &cases {
        let what = format!("{set:?}");
        let bytes = with_metadata(&base, set);
        guarded(&what, || {
            let file = ModelFile::from_bytes("hostile.gguf", bytes).expect("still a valid GGUF file");
            match model::load(&file, CpuBackend::new(1).unwrap()) {
                Ok(runner) => {
                    loaded += 1;
                    let run = || -> cairn::Result<Vec<f32>> {
                        let mut cache = runner.new_cache(4)?;
                        runner.forward(cache.as_mut(), &[1, 2], Logits::Last)
                    };
                    if let Err(e) = run() {
                        check_error(&e, &what);
                    }
                }
                Err(e) => check_error(&e, &what),
            }
        });
    }
    // Only values equal to the model's own, or harmless ones, load.
    assert!(loaded < cases.len() / 4, "{loaded} of {} hostile variants loaded", cases.len());
}
