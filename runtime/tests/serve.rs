//! `cairn serve` end to end, through the official `openai` Python client.
//!
//! Each test starts the real binary on a free loopback port, waits for `/health`, and
//! runs one script of `tests/serve/` against it with the expected answers computed
//! here by the `cairn` CLI (greedy chat and completion, `cairn eval` logits). The Python
//! is `$CAIRN_SERVE_PYTHON`, else `target/serve-venv/bin/python` (`.ci/run` creates it
//! with `openai`); without it, or without `openai`, the tests say so and pass, unless
//! `CAIRN_REQUIRE_TOOLS=1` (CI), which makes that a failure.
//!
//! The tests run one at a time (they measure memory and timing on a small machine), and
//! every wait is bounded: the server's start, each CLI run, each script.
#![cfg(feature = "server")]

mod common;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const API_KEY: &str = "cairn-test-key";
const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/serve");
const THREADS: &str = "2";

/// Eight different chat prompts (the concurrency check runs them together).
const PROMPTS: [&str; 8] = [
    "What is the capital of France?",
    "Describe the water cycle in a few sentences.",
    "Write a haiku about autumn leaves.",
    "Explain what a black hole is.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Tell me a fun fact about octopuses.",
    "How does a bicycle stay upright?",
];
const CHAT_TOKENS: usize = 48;
const GENERATE_PROMPT: &str = "The history of the printing press begins";
const GENERATE_TOKENS: usize = 24;

/// One server at a time in this binary.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_tools() -> bool {
    std::env::var_os("CAIRN_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

/// The Python with `openai`, or None (after saying why) when the test should skip.
fn python() -> Option<PathBuf> {
    let py = std::env::var_os("CAIRN_SERVE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/serve-venv/bin/python")));
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import openai"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return Some(py);
    }
    let why = format!(
        "{} with the `openai` package is needed (set CAIRN_SERVE_PYTHON, or run .ci/run to create target/serve-venv)",
        py.display()
    );
    assert!(!require_tools(), "{why} (CAIRN_REQUIRE_TOOLS=1)");
    eprintln!("skipping the cairn serve end-to-end test: {why}");
    None
}

/// Unique temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("cairn-serve-{tag}-{}-{n}", std::process::id()));
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

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Run `cmd` to its end, killed (and failed) past `limit`. Each stdout line goes to
/// `on_line` as it comes.
fn run_bounded(mut cmd: Command, limit: Duration, mut on_line: impl FnMut(&str)) -> Run {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let (tx, rx) = mpsc::channel::<String>();
    let out = child.stdout.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut err = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let mut stdout = String::new();
    let status = loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(line) => {
                on_line(&line);
                stdout.push_str(&line);
                stdout.push('\n');
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let _ = out_thread.join();
            while let Ok(l) = rx.try_recv() {
                stdout.push_str(&l);
                stdout.push('\n');
            }
            let stderr = err_thread.join().unwrap_or_default();
            panic!("{what} ran past {limit:?}; killed.\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
        }
    };
    let _ = out_thread.join();
    for line in rx.try_iter() {
        on_line(&line);
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let stderr = err_thread.join().unwrap_or_default();
    Run { status, stdout, stderr }
}

/// `cairn ARGS` (the CLI), which must succeed within two minutes: its stdout.
fn cairn(args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
    cmd.args(args);
    let r = run_bounded(cmd, Duration::from_secs(120), |_| {});
    assert!(r.status.success(), "cairn {args:?} failed ({}):\n{}\n{}", r.status, r.stdout, r.stderr);
    r.stdout
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().unwrap().port()
}

/// A tiny HTTP/1.0 GET: (status, body), or None when nothing answers.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Some((status, body))
}

fn refused(port: u16) -> bool {
    TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_millis(500)).is_err()
}

/// A running `cairn serve`, killed when dropped. Its stderr goes to a file.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
    api_key: Option<String>,
}

impl Server {
    fn start(model: &Path, args: &[&str], api_key: Option<&str>, dir: &TempDir) -> Server {
        Server::start_with(&[OsStr::new("-m"), model.as_os_str()], args, api_key, dir)
    }

    /// `cairn serve` with `what` (`-m MODEL`, or `--route REGISTRY`) and `args`.
    fn start_with(what: &[&OsStr], args: &[&str], api_key: Option<&str>, dir: &TempDir) -> Server {
        let port = free_port();
        let log = dir.0.join(format!("serve-{port}.log"));
        let f = std::fs::File::create(&log).expect("server log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
        cmd.arg("serve").args(what).args(["--port", &port.to_string(), "-t", THREADS]).args(args);
        if let Some(k) = api_key {
            cmd.args(["--api-key", k]);
        }
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(f).spawn().expect("start cairn serve");
        let mut s = Server { child, port, log, api_key: api_key.map(str::to_string) };
        s.wait_healthy(Duration::from_secs(60));
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// The server's log without the request lines of 2xx-4xx answers.
    fn log_digest(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.lines()
            .filter(|l| {
                let status = l.split_whitespace().nth(2).and_then(|w| w.parse::<u16>().ok());
                let request = l.starts_with("GET ") || l.starts_with("POST ");
                !request || status.is_none_or(|s| s >= 500)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `/health` 200 within `limit`, with no key: 503 while loading is fine, an exit is not.
    fn wait_healthy(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                panic!("cairn serve exited ({status}) before it was healthy:\n{}", self.log_tail());
            }
            if let Some((200, body)) = http_get(self.port, "/health") {
                assert!(body.contains("ok"), "/health body {body:?}");
                return;
            }
            assert!(start.elapsed() < limit, "cairn serve not healthy after {limit:?}:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the process to end by itself within `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn sigterm(&self) {
        let s = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().expect("run kill");
        assert!(s.success(), "kill -TERM {} failed", self.pid());
    }

    /// Run `script` against this server; it must exit 0 within `limit`. `on_line` sees
    /// each line it prints. Returns its stdout.
    fn script(&self, py: &Path, script: &str, expect: &Value, limit: Duration, on_line: impl FnMut(&str)) -> String {
        let mut cmd = Command::new(py);
        cmd.arg("-u")
            .arg(Path::new(SCRIPTS).join(script))
            .current_dir(SCRIPTS)
            .env("BASE_URL", self.base_url())
            .env("API_KEY", self.api_key.as_deref().unwrap_or(""))
            .env("SERVER_PID", self.pid().to_string())
            .env("CAIRN_EXPECT", expect.to_string())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("OPENAI_API_KEY")
            .env_remove("OPENAI_BASE_URL");
        let t = Instant::now();
        let r = run_bounded(cmd, limit, on_line);
        println!("--- {script} ({:.1}s)\n{}", t.elapsed().as_secs_f64(), r.stdout);
        println!("--- server log: its own lines and the 5xx answers\n{}", self.log_digest());
        if !r.stderr.is_empty() {
            println!("--- {script} stderr\n{}", r.stderr);
        }
        assert!(
            r.status.success(),
            "{script} failed ({}):\n--- stdout\n{}\n--- stderr\n{}\n--- server log (tail)\n{}",
            r.status,
            r.stdout,
            r.stderr,
            self.log_tail()
        );
        r.stdout
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn model() -> String {
    common::model_path().to_str().expect("utf-8 model path").to_string()
}

/// `cairn generate --temp 0 --json` of the generate prompt, and `cairn eval --top 6` over
/// its prompt and generated ids; `exact`: both on the f32 reference path.
fn generate_and_eval(m: &str, exact: bool) -> (Value, Value) {
    let g = GENERATE_TOKENS.to_string();
    let mut args = vec!["generate", "-m", m, "-p", GENERATE_PROMPT, "--temp", "0", "-n", &g, "--json", "-t", THREADS];
    if exact {
        args.push("--exact");
    }
    let gen: Value = serde_json::from_str(cairn(&args).trim()).expect("generate --json");
    let prompt_ids = common::ids(&gen["prompt_ids"]);
    let ids = common::ids(&gen["ids"]);
    assert_eq!(ids.len(), GENERATE_TOKENS, "the generate reference stopped early: {gen}");
    let all: Vec<String> = prompt_ids.iter().chain(&ids).map(u32::to_string).collect();
    let all = all.join(",");
    let mut args = vec!["eval", "-m", m, "--ids", &all, "--top", "6", "--json", "-t", THREADS];
    if exact {
        args.push("--exact");
    }
    let eval: Value = serde_json::from_str(cairn(&args).trim()).expect("eval --json");
    let generate = json!({
        "prompt": GENERATE_PROMPT,
        "max_tokens": GENERATE_TOKENS,
        "prompt_ids": prompt_ids,
        "ids": ids,
        "text": gen["text"],
    });
    (generate, eval["top"].clone())
}

/// What the CLI answers, for the main suite to compare with.
fn expectations(m: &str) -> Value {
    let n = CHAT_TOKENS.to_string();
    let chat: Vec<Value> = PROMPTS
        .iter()
        .map(|p| {
            let text = cairn(&["chat", "-m", m, "-p", p, "--temp", "0", "-n", &n, "-t", THREADS]);
            // `chat` ends its answer with a newline of its own.
            let text = text.strip_suffix('\n').unwrap_or(&text);
            json!({ "prompt": p, "max_tokens": CHAT_TOKENS, "text": text })
        })
        .collect();
    let (generate, eval_top) = generate_and_eval(m, false);
    json!({ "chat": chat, "generate": generate, "eval_top": eval_top, "slots": 8 })
}

/// Logprobs of every generated position against `cairn eval`, both on the f32 reference
/// path (`--exact`), where decode and batch agree to rounding: the main suite can hold
/// the fast path to 0.05 only at the prompt's own row.
#[test]
fn serve_logprobs_exact() {
    let Some(py) = python() else { return };
    let _one = serial();
    let t = Instant::now();
    let m = model();
    let (generate, eval_top) = generate_and_eval(&m, true);
    let expect = json!({
        "generate": generate, "eval_top": eval_top, "exact": true, "sections": ["logprobs_eval"],
    });
    let dir = TempDir::new("exact");
    let server = Server::start(Path::new(&m), &["--parallel", "2", "-c", "1024", "--exact"], Some(API_KEY), &dir);
    server.script(&py, "test_openai.py", &expect, Duration::from_secs(300), |_| {});
    println!("serve_logprobs_exact: {:.1}s", t.elapsed().as_secs_f64());
}

/// The main suite: models, greedy equality with the CLI, streaming, usage, logprobs
/// against `cairn eval`, stop strings, every error, the API key, 8 concurrent streams,
/// a client leaving mid-stream, and three rounds of load with the server's memory.
#[test]
fn serve_openai_main() {
    let Some(py) = python() else { return };
    let _one = serial();
    let t = Instant::now();
    let m = model();
    let expect = expectations(&m);
    println!("CLI references: {:.1}s", t.elapsed().as_secs_f64());
    let dir = TempDir::new("main");
    let server = Server::start(Path::new(&m), &["--parallel", "8", "-c", "1024"], Some(API_KEY), &dir);
    server.script(&py, "test_openai.py", &expect, Duration::from_secs(900), |_| {});
    println!("serve_openai_main: {:.1}s", t.elapsed().as_secs_f64());
}

/// The bounded queue: one slot busy, one request waiting, the next gets 503 with
/// Retry-After; and `--timeout`, which ends a long request with finish_reason "length".
#[test]
fn serve_queue_full() {
    let Some(py) = python() else { return };
    let _one = serial();
    let t = Instant::now();
    let dir = TempDir::new("queue");
    let server = Server::start(
        Path::new(&model()),
        &["--parallel", "1", "--queue", "1", "-c", "1024", "--timeout", "3"],
        None,
        &dir,
    );
    server.script(&py, "test_queue.py", &json!({}), Duration::from_secs(180), |_| {});
    println!("serve_queue_full: {:.1}s", t.elapsed().as_secs_f64());
}

/// `cairn serve --route`: a router over two experts (the default model twice, on two
/// devices) profiled and gated by the real commands, served to the `openai` client:
/// the same answer as `cairn generate --route`, streams, stop strings, budgets from the
/// request's `cairn` object, the fallback and the refusal, bad requests, concurrent
/// callers with no memory growth between rounds.
#[test]
fn serve_routed() {
    let Some(py) = python() else { return };
    let _one = serial();
    let t = Instant::now();
    let dir = TempDir::new("route");
    let reg = dir.0.join("pair.toml");
    let m = model();
    std::fs::write(
        &reg,
        format!(
            "[[expert]]\nname = \"near\"\nmodel = {m:?}\ndevice = \"phone\"\nthreads = 1\ncontext = 1024\n\n\
             [[expert]]\nname = \"far\"\nmodel = {m:?}\ndevice = \"box\"\nthreads = 1\ncontext = 1024\n"
        ),
    )
    .expect("write the registry");
    let r = reg.to_str().expect("utf-8 path");
    cairn(&["route", "profile", r, "--reps", "1"]);
    cairn(&["route", "train", r, "--windows", "1"]);
    let prompt = GENERATE_PROMPT;
    let tokens = 16;
    let out = cairn(&[
        "generate",
        "--route",
        r,
        "-p",
        prompt,
        "-n",
        &tokens.to_string(),
        "--temp",
        "0",
        "--latency-budget",
        "60s",
        "--energy-budget",
        "1000J",
        "--json",
    ]);
    let v: Value = serde_json::from_str(out.lines().last().unwrap_or("")).expect("generate --json");
    let text = v["text"].as_str().expect("text").to_string();
    println!("cli: {text:?} by {}", v["chosen"]);
    let server = Server::start_with(&[OsStr::new("--route"), reg.as_os_str()], &["--parallel", "2"], None, &dir);
    let expect = json!({ "prompt": prompt, "tokens": tokens, "text": text, "experts": ["near", "far"] });
    server.script(&py, "test_route.py", &expect, Duration::from_secs(400), |_| {});
    println!("serve_routed: {:.1}s", t.elapsed().as_secs_f64());
}

/// `POST /v1/cairn/memory` on a BitStack model while streams run: fewer blocks, then
/// more, a budget under the minimum refused; every stream completes. Then batched decode
/// on the stack against one stream alone: batching must not lose throughput.
#[test]
fn serve_live_memory() {
    let Some(py) = python() else { return };
    let _one = serial();
    let t = Instant::now();
    let dir = TempDir::new("memory");
    let stack = dir.0.join("s.cairn");
    let stack_s = stack.to_str().unwrap();
    cairn(&["stack", "-m", &model(), "-o", stack_s, "--levels", "3", "--rank", "4", "--iters", "3", "-t", THREADS]);
    println!("stack built: {:.1}s", t.elapsed().as_secs_f64());
    let slots = ["--parallel", "4", "-c", "512"];
    // The smallest budget, from the server's own refusal of a budget of one byte.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
    cmd.args(["serve", "-m", stack_s, "--port", &free_port().to_string(), "-t", THREADS, "--memory", "1"]).args(slots);
    let r = run_bounded(cmd, Duration::from_secs(60), |_| {});
    assert!(!r.status.success(), "serve --memory 1 must refuse the budget: {}", r.stderr);
    let min_mb: f64 = r
        .stderr
        .split("the minimum ")
        .nth(1)
        .and_then(|s| s.split(" MB").next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no minimum budget in the refusal: {}", r.stderr));
    let min = (min_mb * 1e6) as u64;
    let mid = min + 16_000_000;
    println!("minimum budget {min_mb} MB; serving at {mid} bytes");
    let mut args = slots.to_vec();
    let mid_s = mid.to_string();
    args.extend(["--memory", &mid_s]);
    let server = Server::start(&stack, &args, Some(API_KEY), &dir);
    let expect = json!({ "min": min, "mid": mid });
    server.script(&py, "test_memory.py", &expect, Duration::from_secs(300), |_| {});
    println!("serve_live_memory: {:.1}s", t.elapsed().as_secs_f64());
}

/// SIGTERM while a stream runs: it completes, new connections are refused, the process
/// exits 0 well within the drain deadline.
#[test]
fn serve_sigterm_drains() {
    let Some(py) = python() else { return };
    let _one = serial();
    let t = Instant::now();
    let dir = TempDir::new("shutdown");
    let drain = 20;
    let mut server = Server::start(
        Path::new(&model()),
        &["--parallel", "2", "-c", "1024", "--drain", &drain.to_string()],
        Some(API_KEY),
        &dir,
    );
    let mut signalled: Option<Instant> = None;
    let expect = json!({ "mode": "drain" });
    server.script(&py, "test_shutdown.py", &expect, Duration::from_secs(120), |line| {
        if line.trim() == "@@SIGTERM" && signalled.is_none() {
            server.sigterm();
            signalled = Some(Instant::now());
        }
    });
    let signalled = signalled.expect("the script never asked for SIGTERM");
    let status = server.wait_exit(Duration::from_secs(drain + 10));
    let status =
        status.unwrap_or_else(|| panic!("the server still runs {}s after SIGTERM:\n{}", drain + 10, server.log_tail()));
    let took = signalled.elapsed();
    assert!(status.success(), "the server exited with {status} after SIGTERM:\n{}", server.log_tail());
    assert!(
        took < Duration::from_secs(drain),
        "the server took {took:?} to exit after its last request (drain deadline {drain}s):\n{}",
        server.log_tail()
    );
    assert!(refused(server.port), "the port still accepts connections after the exit");
    let log = server.log_tail();
    assert!(log.contains("serve: stopped"), "no clean stop in the log:\n{log}");
    println!(
        "exited {status} {:.2}s after SIGTERM; serve_sigterm_drains: {:.1}s",
        took.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}

/// SIGTERM with a stream that outlasts `--drain`: the process exits at the deadline
/// (status 0, the log saying requests were cut), and the cut stream ends on the client.
#[test]
fn serve_sigterm_drain_deadline() {
    let Some(py) = python() else { return };
    let _one = serial();
    let t = Instant::now();
    let dir = TempDir::new("deadline");
    let drain = 2;
    let mut server = Server::start(
        Path::new(&model()),
        &["--parallel", "2", "-c", "1024", "--drain", &drain.to_string()],
        None,
        &dir,
    );
    let mut signalled: Option<Instant> = None;
    let mut exited: Option<(ExitStatus, Duration)> = None;
    let expect = json!({ "mode": "deadline" });
    server.script(&py, "test_shutdown.py", &expect, Duration::from_secs(120), |line| {
        if line.trim() == "@@SIGTERM" && signalled.is_none() {
            server.sigterm();
            signalled = Some(Instant::now());
        }
    });
    let signalled = signalled.expect("the script never asked for SIGTERM");
    if let Some(s) = server.wait_exit(Duration::from_secs(drain + 10)) {
        exited = Some((s, signalled.elapsed()));
    }
    let (status, took) =
        exited.unwrap_or_else(|| panic!("the server still runs {}s after SIGTERM:\n{}", drain + 10, server.log_tail()));
    assert!(status.success(), "exit status {status} at the drain deadline:\n{}", server.log_tail());
    assert!(
        took >= Duration::from_secs(drain) - Duration::from_millis(200) && took < Duration::from_secs(drain + 5),
        "exited {took:?} after SIGTERM with a stream still running; the drain deadline is {drain}s:\n{}",
        server.log_tail()
    );
    assert!(refused(server.port), "the port still accepts connections after the exit");
    println!(
        "exited {status} {:.2}s after SIGTERM (drain {drain}s); serve_sigterm_drain_deadline: {:.1}s",
        took.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
}
