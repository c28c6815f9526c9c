//! Load generator for OpenAI-compatible chat servers, in the same shape as
//! `serve_load.py` (same prompts, requests, measurements and JSON line), but light: one
//! blocking thread per client and a hand-rolled HTTP/1.1 + SSE reader, so that on a
//! two-core box the load generator does not take the CPU the server under test needs
//! (the Python `openai` client took about 0.3 of a core at 500 tok/s, and a co-runner
//! that size costs a barrier-synchronized decode step far more than its share).
//!
//! ```text
//! serve-load --base-url http://127.0.0.1:8080/v1 --model NAME --concurrency 4 \
//!            --requests 16 --max-tokens 128 [--api-key K] [--json-out FILE]
//! ```
//! A benchmark tool: never run by CI.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const PROMPTS: [&str; 16] = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "What is the capital of France?",
    "List five tips for staying productive when working from home.",
    "Describe the water cycle to a ten-year-old.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "Compare cats and dogs as pets, giving pros and cons for each.",
    "How do I make a simple tomato pasta sauce?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "What are the main differences between a virus and a bacterium?",
    "Give me three ideas for a birthday party for a seven-year-old.",
    "Explain what a black hole is.",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "What is photosynthesis and why does it matter?",
    "Tell me a fun fact about octopuses.",
];

struct Args {
    host: String,
    prefix: String,
    model: String,
    concurrency: usize,
    requests: usize,
    max_tokens: usize,
    warmup: usize,
    api_key: String,
    timeout: Duration,
    json_out: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        host: String::new(),
        prefix: String::new(),
        model: String::new(),
        concurrency: 1,
        requests: 4,
        max_tokens: 128,
        warmup: 1,
        api_key: "none".into(),
        timeout: Duration::from_secs(300),
        json_out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        let num = |s: String| s.parse::<usize>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--base-url" => {
                let url = v()?;
                let rest = url.strip_prefix("http://").ok_or("--base-url must start with http://")?;
                let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
                a.host = host.to_string();
                a.prefix = format!("/{}", path.trim_end_matches('/')).replace("//", "/");
            }
            "--model" => a.model = v()?,
            "--concurrency" => a.concurrency = num(v()?)?.max(1),
            "--requests" => a.requests = num(v()?)?,
            "--max-tokens" => a.max_tokens = num(v()?)?,
            "--warmup" => a.warmup = num(v()?)?,
            "--api-key" => a.api_key = v()?,
            "--timeout" => a.timeout = Duration::from_secs_f64(v()?.parse().map_err(|e| format!("{k}: {e}"))?),
            "--json-out" => a.json_out = Some(v()?),
            "-h" | "--help" => return Err("usage: serve-load --base-url URL --model NAME [--concurrency C] [--requests R] [--max-tokens N] [--warmup W] [--api-key K] [--timeout S] [--json-out F]".into()),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.host.is_empty() || a.model.is_empty() {
        return Err("--base-url and --model are required".into());
    }
    Ok(a)
}

#[derive(Default, Clone)]
struct Outcome {
    prompt: usize,
    ttft: Option<f64>,
    tokens: usize,
    chunks: usize,
    usage: bool,
    total: f64,
    error: Option<String>,
}

/// The body of a `Transfer-Encoding: chunked` response as a plain byte stream.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            self.inner.read_line(&mut line)?;
            if line.trim().is_empty() {
                // The CRLF that ends the previous chunk.
                line.clear();
                self.inner.read_line(&mut line)?;
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("bad chunk size {line:?}"))
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= got;
        Ok(got)
    }
}

fn one_request(a: &Args, i: usize, prompt: &str, max_tokens: usize) -> Outcome {
    let t0 = Instant::now();
    let mut r = Outcome { prompt: i % PROMPTS.len(), ..Outcome::default() };
    if let Err(e) = stream(a, prompt, max_tokens, t0, &mut r) {
        r.error = Some(e.chars().take(300).collect());
    }
    if !r.usage {
        r.tokens = r.chunks;
    }
    r.total = t0.elapsed().as_secs_f64();
    r
}

fn stream(a: &Args, prompt: &str, max_tokens: usize, t0: Instant, r: &mut Outcome) -> Result<(), String> {
    let body = json!({
        "model": a.model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": true, "stream_options": {"include_usage": true},
        "temperature": 0, "max_tokens": max_tokens,
    })
    .to_string();
    let mut s = TcpStream::connect(&a.host).map_err(|e| format!("connect {}: {e}", a.host))?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(a.timeout)).ok();
    let head = format!(
        "POST {}/chat/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nAuthorization: Bearer {}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        a.prefix,
        a.host,
        a.api_key,
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|_| s.write_all(body.as_bytes())).map_err(|e| format!("send: {e}"))?;
    let mut rd = BufReader::new(s);
    let mut line = String::new();
    rd.read_line(&mut line).map_err(|e| format!("status: {e}"))?;
    let status = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut chunked = false;
    loop {
        line.clear();
        rd.read_line(&mut line).map_err(|e| format!("headers: {e}"))?;
        let h = line.trim();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let body: Box<dyn Read> =
        if chunked { Box::new(Chunked { inner: rd, left: 0, done: false }) } else { Box::new(rd) };
    let mut events = BufReader::new(body);
    if status != "200" {
        let mut rest = String::new();
        let _ = events.read_to_string(&mut rest);
        return Err(format!("HTTP {status}: {}", rest.trim()));
    }
    loop {
        line.clear();
        if events.read_line(&mut line).map_err(|e| format!("stream: {e}"))? == 0 {
            return Ok(());
        }
        let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
        let data = data.trim_start();
        if data == "[DONE]" {
            return Ok(());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("bad event {data:?}: {e}"))?;
        let content = &v["choices"][0]["delta"]["content"];
        if content.as_str().is_some_and(|c| !c.is_empty()) {
            r.ttft.get_or_insert(t0.elapsed().as_secs_f64());
            r.chunks += 1;
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            r.tokens = n as usize;
            r.usage = true;
        }
    }
}

/// Nearest-rank percentile of a non-empty list.
fn pct(xs: &[f64], p: f64) -> f64 {
    let mut xs = xs.to_vec();
    xs.sort_by(f64::total_cmp);
    let k = ((p / 100.0 * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[k]
}

/// This process's CPU seconds (user + system), from /proc (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name, which ends with the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn round(x: f64, d: i32) -> f64 {
    let m = 10f64.powi(d);
    (x * m).round() / m
}

fn main() {
    let a = match parse_args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    for _ in 0..a.warmup {
        let w = one_request(&a, 0, "Say hello.", 8);
        if let Some(e) = w.error {
            eprintln!("warm-up failed: {e}");
        }
    }
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..a.concurrency)
        .map(|_| {
            let (a, next, results) = (a.clone(), next.clone(), results.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= a.requests {
                    return;
                }
                let r = one_request(&a, i, PROMPTS[i % PROMPTS.len()], a.max_tokens);
                results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let wall = t0.elapsed().as_secs_f64();
    let results = results.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let ok: Vec<&Outcome> = results.iter().filter(|r| r.error.is_none()).collect();
    let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft).collect();
    // Per-stream decode rate: tokens after the first over the time after the first token.
    let rates: Vec<f64> = ok
        .iter()
        .filter_map(|r| r.ttft.filter(|&t| r.tokens > 1 && r.total > t).map(|t| (r.tokens - 1) as f64 / (r.total - t)))
        .collect();
    let mut errors: Vec<String> = results.iter().filter_map(|r| r.error.clone()).collect();
    let n_errors = errors.len();
    errors.sort();
    errors.dedup();
    errors.truncate(5);
    let tokens: usize = ok.iter().map(|r| r.tokens).sum();
    let ms = |v: Option<f64>| v.map_or(Value::Null, |x| json!(round(x * 1e3, 1)));
    let s = json!({
        "base_url": format!("http://{}{}", a.host, a.prefix), "model": a.model, "concurrency": a.concurrency,
        "requests": results.len(), "max_tokens": a.max_tokens, "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "agg_tok_s": if wall > 0.0 { round(tokens as f64 / wall, 2) } else { 0.0 },
        "ttft_p50_ms": ms((!ttfts.is_empty()).then(|| pct(&ttfts, 50.0))),
        "ttft_p95_ms": ms((!ttfts.is_empty()).then(|| pct(&ttfts, 95.0))),
        "decode_tok_s_mean": if rates.is_empty() { Value::Null } else { json!(round(rates.iter().sum::<f64>() / rates.len() as f64, 2)) },
        "usage_reported": !ok.is_empty() && ok.iter().all(|r| r.usage),
        "client_cpu_s": round(cpu_seconds(), 3),
        "errors": n_errors, "error_messages": errors,
    });
    println!("{s}");
    eprintln!(
        "C={} requests={} agg={} tok/s ttft p50={} ms p95={} ms decode/stream={} tok/s errors={} client cpu={} s",
        a.concurrency,
        s["requests"],
        s["agg_tok_s"],
        s["ttft_p50_ms"],
        s["ttft_p95_ms"],
        s["decode_tok_s_mean"],
        n_errors,
        s["client_cpu_s"]
    );
    for m in &errors {
        eprintln!("  error: {m}");
    }
    if let Some(path) = &a.json_out {
        let per: Vec<Value> = results
            .iter()
            .map(|r| json!({"prompt": r.prompt, "ttft": r.ttft, "tokens": r.tokens, "chunks": r.chunks, "usage": r.usage, "total": r.total, "error": r.error}))
            .collect();
        let mut full = s.clone();
        full["per_request"] = json!(per);
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&full).unwrap_or_default()) {
            eprintln!("--json-out {path}: {e}");
        }
    }
    if !results.is_empty() && n_errors == results.len() {
        std::process::exit(1);
    }
}
