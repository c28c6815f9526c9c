//! Bad input to the `cairn` binary: each case must exit non-zero with exactly one line
//! on stderr, starting `error: `, and never panic. Every run gets an empty `CAIRN_HOME`
//! and an index URL on a closed port, so nothing is ever downloaded.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cairn::synthetic::{llama_gguf, SyntheticConfig};
use cairn_formats::{GgmlType, Gguf, GgufBuilder, MetaValue};

/// An index nobody listens on: connections are refused at once.
const CLOSED_INDEX: &str = "http://127.0.0.1:1";

/// Unique temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("cairn-cli-errors-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).expect("write test file");
        p.to_str().expect("utf-8 temp path").to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run `cairn args...` with an empty `CAIRN_HOME` under `dir` and the closed index;
/// killed (and failed) after a minute.
fn cairn(dir: &TempDir, args: &[&str]) -> Output {
    let home = dir.0.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env("CAIRN_HOME", &home)
        .env("CAIRN_INDEX_URL", CLOSED_INDEX)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cairn");
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cairn {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { code: status.code(), stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// The contract: a non-zero exit, no panic, and stderr holding exactly one non-empty
/// line, `error: ...`, that mentions each of `expect`. Returns that line.
fn assert_one_error(o: &Output, args: &[&str], expect: &[&str]) -> String {
    let all = format!("exit {:?}\n--- stdout\n{}--- stderr\n{}", o.code, o.stdout, o.stderr);
    assert!(o.code.is_some_and(|c| c != 0), "cairn {args:?} should fail: {all}");
    assert!(!o.stderr.contains("panicked") && !o.stdout.contains("panicked"), "cairn {args:?} panicked: {all}");
    let lines: Vec<&str> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "cairn {args:?}: stderr should be one line: {all}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "cairn {args:?}: {all}");
    assert!(line.len() < 600, "cairn {args:?}: a {}-byte error line", line.len());
    for e in expect {
        assert!(line.contains(e), "cairn {args:?}: error should mention {e:?}: {line}");
    }
    line.to_string()
}

fn check(dir: &TempDir, args: &[&str], expect: &[&str]) -> String {
    let line = assert_one_error(&cairn(dir, args), args, expect);
    eprintln!("cairn {}\n  {line}", args.join(" "));
    line
}

/// A small synthetic llama (F32 weights), as bytes.
fn synthetic() -> Vec<u8> {
    llama_gguf(&SyntheticConfig::default(), 7).unwrap()
}

/// `bytes` rebuilt tensor by tensor: `edit` returns, for each tensor, what to write
/// instead (name, dims, type, data), or `None` to leave it out. Metadata is kept, with
/// `meta` values replacing or adding keys.
fn rebuild(
    bytes: &[u8],
    meta: &[(&str, MetaValue)],
    mut edit: impl FnMut(&str, &[u64], GgmlType, &[u8]) -> Option<(Vec<u64>, GgmlType, Vec<u8>)>,
) -> Vec<u8> {
    let g = Gguf::parse(bytes).unwrap();
    let mut b = GgufBuilder::new();
    for (k, v) in &g.metadata {
        if !meta.iter().any(|(m, _)| m == k) {
            b = b.meta(k, v.clone());
        }
    }
    for (k, v) in meta {
        b = b.meta(k, v.clone());
    }
    for t in &g.tensors {
        if let Some((dims, ty, data)) = edit(&t.name, &t.dims, t.ty, g.tensor_data(t)) {
            b = b.tensor(&t.name, &dims, ty, data).unwrap();
        }
    }
    b.build()
}

fn keep(_: &str, dims: &[u64], ty: GgmlType, data: &[u8]) -> Option<(Vec<u64>, GgmlType, Vec<u8>)> {
    Some((dims.to_vec(), ty, data.to_vec()))
}

// ---------------------------------------------------------------- malformed files

#[test]
fn truncated_synthetic_model() {
    let dir = TempDir::new();
    let bytes = synthetic();
    let half = dir.file("half.gguf", &bytes[..bytes.len() / 2]);
    check(&dir, &["eval", "-m", &half, "--ids", "1,2"], &["half.gguf", "truncated"]);
    check(&dir, &["info", "-m", &half], &["half.gguf", "truncated"]);
    // Cut inside the header.
    let head = dir.file("head.gguf", &bytes[..100]);
    check(&dir, &["generate", "-m", &head, "-p", "hi"], &["head.gguf", "truncated"]);
}

#[test]
fn truncated_real_model() {
    let dir = TempDir::new();
    let mut head = vec![0u8; 2 << 20];
    let mut f = std::fs::File::open(common::model_path()).expect("open model");
    f.read_exact(&mut head).expect("read model head");
    let cut = dir.file("cut.gguf", &head);
    check(&dir, &["generate", "-t", "1", "-m", &cut, "-p", "hi"], &["cut.gguf", "truncated", "token_embd.weight"]);
    check(&dir, &["chat", "-t", "1", "-m", &cut, "-p", "hi"], &["cut.gguf", "truncated"]);
    // Cut in the middle of the metadata (the vocabulary).
    let cut = dir.file("cut-meta.gguf", &head[..500_000]);
    check(&dir, &["info", "-m", &cut], &["cut-meta.gguf", "truncated"]);
}

#[test]
fn empty_file() {
    let dir = TempDir::new();
    let empty = dir.file("empty.gguf", b"");
    check(&dir, &["eval", "-m", &empty, "--ids", "1"], &["empty.gguf", "truncated"]);
}

#[test]
fn bad_magic() {
    let dir = TempDir::new();
    let mut bytes = synthetic();
    bytes[..4].copy_from_slice(b"GGML");
    let bad = dir.file("magic.gguf", &bytes);
    check(&dir, &["eval", "-m", &bad, "--ids", "1"], &["magic.gguf", "not a GGUF file"]);
}

#[test]
fn tensor_offset_past_the_end() {
    let dir = TempDir::new();
    let mut bytes = synthetic();
    let g = Gguf::parse(&bytes).unwrap();
    let (t, data_offset) = (g.tensors.last().unwrap().clone(), g.data_offset);
    // The directory entry: name (u64 length + bytes), n_dims, dims, type, offset.
    let mut needle = (t.name.len() as u64).to_le_bytes().to_vec();
    needle.extend_from_slice(t.name.as_bytes());
    let at = bytes.windows(needle.len()).position(|w| w == needle).unwrap() + needle.len();
    let offset_at = at + 4 + 8 * t.dims.len() + 4;
    let rel = u64::from_le_bytes(bytes[offset_at..offset_at + 8].try_into().unwrap());
    assert_eq!(rel + data_offset, t.offset, "found the offset field");
    let past = (bytes.len() as u64 - data_offset).next_multiple_of(32) + 64;
    bytes[offset_at..offset_at + 8].copy_from_slice(&past.to_le_bytes());
    let bad = dir.file("offset.gguf", &bytes);
    check(&dir, &["eval", "-m", &bad, "--ids", "1"], &["offset.gguf", &t.name]);
}

#[test]
fn not_a_gguf_file() {
    let dir = TempDir::new();
    let text = dir.file("notes.txt", b"These are my notes.\nNot a model at all.\n");
    check(&dir, &["generate", "-m", &text, "-p", "hi"], &["notes.txt", "not a GGUF file"]);
    check(&dir, &["info", "-m", &text], &["notes.txt", "not a GGUF file"]);
}

#[test]
fn missing_model_file() {
    let dir = TempDir::new();
    let missing = dir.0.join("nowhere.gguf");
    let missing = missing.to_str().unwrap();
    check(&dir, &["eval", "-m", missing, "--ids", "1"], &["nowhere.gguf"]);
    // A directory is not a model either.
    let d = dir.0.to_str().unwrap();
    check(&dir, &["info", "-m", d], &[]);
}

// ---------------------------------------------------------------- well-formed, not runnable

#[test]
fn unknown_architecture() {
    let dir = TempDir::new();
    let bytes = rebuild(&synthetic(), &[("general.architecture", MetaValue::String("mamba9".into()))], keep);
    let m = dir.file("mamba.gguf", &bytes);
    check(&dir, &["eval", "-m", &m, "--ids", "1"], &["mamba.gguf", "mamba9", "not supported"]);
    check(&dir, &["generate", "-m", &m, "-p", "hi"], &["mamba9", "not supported"]);
    // A file with nothing but the architecture.
    let bare = GgufBuilder::new().meta("general.architecture", MetaValue::String("mamba9".into())).build();
    let m = dir.file("bare.gguf", &bare);
    check(&dir, &["chat", "-m", &m, "-p", "hi"], &["mamba9", "not supported"]);
}

#[test]
fn unsupported_tensor_type() {
    let dir = TempDir::new();
    // Q2_K blocks hold 256 values: a model whose rows are a multiple of that.
    let c = SyntheticConfig { dim: 256, ffn_dim: 256, n_heads: 4, n_kv_heads: 2, ..SyntheticConfig::default() };
    let bytes = rebuild(&llama_gguf(&c, 3).unwrap(), &[], |name, dims, ty, data| {
        if name == "blk.1.ffn_down.weight" {
            let q = GgmlType::Q2K;
            let n = q.row_bytes(dims[0]).unwrap() * dims[1];
            Some((dims.to_vec(), q, vec![0u8; n as usize]))
        } else {
            keep(name, dims, ty, data)
        }
    });
    let m = dir.file("q2k.gguf", &bytes);
    check(&dir, &["eval", "-m", &m, "--ids", "1"], &["q2k.gguf", "blk.1.ffn_down.weight", "Q2_K", "not support"]);
}

#[test]
fn missing_tensor() {
    let dir = TempDir::new();
    let bytes = rebuild(&synthetic(), &[], |name, dims, ty, data| {
        (name != "blk.1.ffn_up.weight").then(|| keep(name, dims, ty, data)).flatten()
    });
    let m = dir.file("missing.gguf", &bytes);
    check(&dir, &["eval", "-m", &m, "--ids", "1"], &["missing.gguf", "missing tensor blk.1.ffn_up.weight"]);
}

#[test]
fn wrong_tensor_shape() {
    let dir = TempDir::new();
    let bytes = rebuild(&synthetic(), &[("llama.embedding_length", MetaValue::U32(32))], keep);
    let m = dir.file("shape.gguf", &bytes);
    check(&dir, &["eval", "-m", &m, "--ids", "1"], &["shape.gguf", "shape"]);
}

// ---------------------------------------------------------------- bad requests

#[test]
fn prompt_longer_than_the_context() {
    let dir = TempDir::new();
    let model = common::model_path();
    let model = model.to_str().unwrap();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(4);
    let line = check(
        &dir,
        &["generate", "-t", "1", "-m", model, "--ctx-size", "8", "-n", "4", "-p", &prompt],
        &["context length 8"],
    );
    assert!(line.contains("prompt") || line.contains("tokens"), "{line}");
}

#[test]
fn empty_prompt() {
    let dir = TempDir::new();
    let model = common::model_path();
    let model = model.to_str().unwrap();
    check(&dir, &["generate", "-t", "1", "-m", model, "-n", "4", "-p", ""], &["empty prompt"]);
}

#[test]
fn token_id_outside_the_vocabulary() {
    let dir = TempDir::new();
    let model = common::model_path();
    let model = model.to_str().unwrap();
    check(&dir, &["eval", "-t", "1", "-m", model, "--ids", "1,99999999"], &["99999999", "vocabulary"]);
}

#[test]
fn more_ids_than_the_context() {
    let dir = TempDir::new();
    let c = SyntheticConfig { context: 8, ..SyntheticConfig::default() };
    // `eval` loads a tokenizer: give the synthetic model a tiny byte-level BPE one.
    let tokens: Vec<MetaValue> = ["a", "b", "ab"].iter().map(|s| MetaValue::String(s.to_string())).collect();
    let meta = [
        ("tokenizer.ggml.model", MetaValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", MetaValue::String("smollm".into())),
        ("tokenizer.ggml.tokens", MetaValue::array(tokens)),
        ("tokenizer.ggml.token_type", MetaValue::array(vec![MetaValue::I32(1); 3])),
        ("tokenizer.ggml.merges", MetaValue::array(vec![MetaValue::String("a b".into())])),
    ];
    let bytes = rebuild(&llama_gguf(&c, 5).unwrap(), &meta, keep);
    let m = dir.file("ctx8.gguf", &bytes);
    let ids = ["1"; 9].join(",");
    check(&dir, &["eval", "-m", &m, "--ids", &ids], &["9 tokens", "context length 8"]);
    // The same file with a prompt that fits runs: the failure above is the context's.
    let ok = cairn(&dir, &["eval", "-m", &m, "--ids", "1,2"]);
    assert_eq!(ok.code, Some(0), "{}", ok.stderr);
}

// ---------------------------------------------------------------- no network

#[test]
fn unreachable_index_on_pull() {
    let dir = TempDir::new();
    check(&dir, &["pull"], &[CLOSED_INDEX]);
    check(&dir, &["pull", "smollm2-135m-instruct"], &[CLOSED_INDEX]);
    // Nothing was left behind in the models directory.
    let models = dir.0.join("home").join("models");
    let left: Vec<_> = std::fs::read_dir(&models).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn unreachable_index_when_no_model_is_present() {
    let dir = TempDir::new();
    check(&dir, &["chat", "-p", "hi"], &[CLOSED_INDEX]);
    check(&dir, &["generate", "-p", "hi"], &[CLOSED_INDEX]);
}

#[test]
fn unknown_model_name() {
    let dir = TempDir::new();
    check(&dir, &["pull", "no-such-model"], &["no-such-model", "smollm2-135m-instruct"]);
    check(&dir, &["info", "-m", "no-such-model"], &["no-such-model"]);
}

/// The harness itself: a successful command is not mistaken for a clean failure.
#[test]
fn harness_sees_success_and_output() {
    let dir = TempDir::new();
    let m = dir.file("ok.gguf", &synthetic());
    let o = cairn(&dir, &["info", "-m", &m]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("llama"), "{}", o.stdout);
}

#[test]
fn convert_refuses_bad_arguments_and_inputs() {
    let dir = TempDir::new();
    let model = dir.file("m.gguf", &synthetic());
    let out = dir.0.join("out.cairn");
    let out = out.to_str().unwrap();
    check(&dir, &["convert", "-m", &model, "-q", "fq5", "-o", out], &["unknown --quant fq5"]);
    check(&dir, &["convert", "-m", &model, "-q", "fq4", "-g", "48", "-o", out], &["--group 48", "multiple of 32"]);
    check(&dir, &["convert", "-m", &model, "-q", "fq4-auto", "-g", "64", "-o", out], &["--group does not apply"]);
    let missing = dir.0.join("missing.gguf");
    check(&dir, &["convert", "-m", missing.to_str().unwrap(), "-q", "fq4", "-o", out], &["missing.gguf"]);
    // A corrupt .cairn as the source: the tensor is named.
    let o = cairn(&dir, &["convert", "-m", &model, "-q", "fq4", "-g", "32", "-o", out]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let mut bytes = std::fs::read(out).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    let bad = dir.file("bad.cairn", &bytes);
    check(&dir, &["info", "-m", &bad], &["output_norm.weight", "checksum"]);
    check(&dir, &["generate", "-m", &bad, "-p", "hi"], &["checksum"]);
}

/// Without an NVIDIA driver (this machine, CI): `--backend cuda` is one clear error,
/// `auto` falls back and says so, `info --devices` says why there is no CUDA device.
#[test]
fn cuda_without_a_driver() {
    if cairn::backend::cuda::CudaBackend::new().is_ok() {
        eprintln!("skipping: a CUDA device is present");
        return;
    }
    let dir = TempDir::new();
    let path = common::model_path();
    let m = path.to_str().expect("utf-8 model path");
    let msg = check(&dir, &["generate", "-t", "1", "-m", m, "-p", "hi", "-n", "1", "--backend", "cuda"], &["cuda"]);
    assert!(msg.contains("driver") || msg.contains("feature"), "{msg}");
    let o = cairn(&dir, &["generate", "-t", "1", "-m", m, "-p", "hi", "-n", "1", "--temp", "0", "--backend", "auto"]);
    assert_eq!(o.code, Some(0), "auto falls back: {}", o.stderr);
    assert!(o.stderr.contains("no CUDA device") && o.stderr.contains("CPU backend"), "{}", o.stderr);
    let o = cairn(&dir, &["info", "--devices"]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stdout.contains("no CUDA devices"), "{}", o.stdout);
}
