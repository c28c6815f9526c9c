//! MoE² across a real link: a remote expert is `cairn serve` in a network namespace
//! this test makes (a veth pair, bandwidth shaped with `tc tbf`; netem is not available
//! here, so a delay proxy in the test adds the latency and counts the connections). The
//! registry is the default model locally plus that server, profiled and gated by the
//! real commands; then:
//! - a latency budget that only the local model fits never calls the remote expert;
//! - an impossible budget gets the chosen fallback (the cheapest answers, or a refusal);
//! - under an energy budget only the remote fits, the server is killed mid-answer: the
//!   remote is dropped within its step deadline and the local expert goes on from the
//!   tokens so far.
//!
//! Energy is the CPU-time estimate on both sides (an empty CAIRN_SYSFS_ROOT hides any
//! counter), at 50 W on the "phone" and 1 W on the "edge box", so that the remote is
//! the cheap one in joules.
//! Needs root and iproute2: skips with a message where namespaces cannot be made, fails
//! instead under CAIRN_REQUIRE_NETNS=1 (`.ci/run` sets it).
#![cfg(feature = "server")]

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

const PHONE_WATTS: &str = "50";
const EDGE_WATTS: &str = "1";

/// An empty directory for CAIRN_SYSFS_ROOT: no energy counter, the estimate answers.
fn no_sysfs() -> PathBuf {
    let d = std::env::temp_dir().join(format!("cairn-route-net-sysfs-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("an empty sysfs root");
    d
}

/// Latency the proxy adds to each request, each way.
const DELAY: Duration = Duration::from_millis(20);

fn sh(args: &[&str]) -> Result<(), String> {
    let o = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

/// A namespace with one end of a veth pair; removed (with the pair) on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

impl Netns {
    fn new() -> Result<Netns, String> {
        let id = std::process::id() % 200 + 20;
        let n = Netns {
            name: format!("cairn-route-{}", std::process::id()),
            host_if: format!("crt{id}a"),
            host_ip: format!("10.213.{id}.1"),
            ns_ip: format!("10.213.{id}.2"),
        };
        let peer = format!("crt{id}b");
        sh(&["ip", "netns", "add", &n.name])?;
        sh(&["ip", "link", "add", &n.host_if, "type", "veth", "peer", "name", &peer])?;
        sh(&["ip", "link", "set", &peer, "netns", &n.name])?;
        sh(&["ip", "addr", "add", &format!("{}/24", n.host_ip), "dev", &n.host_if])?;
        sh(&["ip", "link", "set", &n.host_if, "up"])?;
        let ns = |args: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", n.name.as_str()];
            v.extend_from_slice(args);
            sh(&v)
        };
        ns(&["ip", "addr", "add", &format!("{}/24", n.ns_ip), "dev", &peer])?;
        ns(&["ip", "link", "set", &peer, "up"])?;
        ns(&["ip", "link", "set", "lo", "up"])?;
        // A 100 Mbit/s link toward the edge box.
        sh(&[
            "tc", "qdisc", "add", "dev", &n.host_if, "root", "tbf", "rate", "100mbit", "burst", "32kbit", "latency",
            "50ms",
        ])?;
        Ok(n)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &self.host_if]);
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// A TCP proxy on loopback to `upstream`, delaying every chunk by [`DELAY`] and counting
/// the connections it accepts.
struct Proxy {
    port: u16,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = l.local_addr().expect("proxy address").port();
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (connections.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                c.fetch_add(1, Ordering::SeqCst);
                let up = upstream.clone();
                std::thread::spawn(move || {
                    let Ok(server) = TcpStream::connect_timeout(&up.parse().expect("upstream"), Duration::from_secs(2))
                    else {
                        let _ = client.shutdown(Shutdown::Both);
                        return;
                    };
                    let pipe = |mut from: TcpStream, mut to: TcpStream| {
                        let mut buf = [0u8; 16384];
                        loop {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(k) => {
                                    std::thread::sleep(DELAY);
                                    if to.write_all(&buf[..k]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    };
                    let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
                    let t = std::thread::spawn(move || pipe(c2, s2));
                    pipe(server, client);
                    let _ = t.join();
                });
            }
        });
        Proxy { port, connections, stop }
    }

    fn count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cairn() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.env("RUST_BACKTRACE", "0").env("CAIRN_CPU_WATTS", PHONE_WATTS).env("CAIRN_SYSFS_ROOT", no_sysfs());
    c
}

/// (status, stdout, stderr) of a cairn run, bounded in time.
fn run(args: &[&str], limit: Duration) -> (i32, String, String) {
    let mut child = cairn().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run cairn");
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            let mut out = String::new();
            let mut err = String::new();
            child.stdout.take().expect("stdout").read_to_string(&mut out).expect("read stdout");
            child.stderr.take().expect("stderr").read_to_string(&mut err).expect("read stderr");
            return (st.code().unwrap_or(-1), out, err);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            panic!("cairn {} ran past {limit:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The report line `--route-json` prints on stderr.
fn report(stderr: &str) -> Value {
    stderr
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok().filter(|v| v.get("chosen").is_some()))
        .unwrap_or_else(|| panic!("no routing report in stderr:\n{stderr}"))
}

fn healthy(port: u16, host: &str, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(mut s) = TcpStream::connect((host, port)) {
            let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            if r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn setup() -> Option<Netns> {
    let require = std::env::var("CAIRN_REQUIRE_NETNS").is_ok_and(|v| v == "1");
    let why = match Netns::new() {
        Ok(n) => return Some(n),
        Err(e) => e,
    };
    if require {
        panic!("CAIRN_REQUIRE_NETNS=1 but no network namespace could be made: {why}");
    }
    eprintln!("skipping: cannot make a network namespace here ({why}); run as root with iproute2");
    None
}

fn start_serve(ns: &Netns, model: &Path, port: u16) -> Serve {
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_cairn"), "serve", "-m"])
        .arg(model)
        .args(["--host", &ns.ns_ip, "--port", &port.to_string(), "--parallel", "2", "-c", "2048", "-t", "1"])
        .env("CAIRN_CPU_WATTS", EDGE_WATTS)
        .env("CAIRN_SYSFS_ROOT", no_sysfs())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cairn serve in the namespace");
    Serve(child)
}

#[test]
fn routing_across_a_veth_link() {
    let Some(ns) = setup() else { return };
    let t0 = Instant::now();
    let model = common::model_path();
    let port = 8400 + (std::process::id() % 500) as u16;
    let mut serve = start_serve(&ns, &model, port);
    assert!(healthy(port, &ns.ns_ip, Duration::from_secs(60)), "cairn serve in {} did not come up", ns.name);
    let proxy = Proxy::start(format!("{}:{port}", ns.ns_ip));
    let dir = TempDir(std::env::temp_dir().join(format!("cairn-route-net-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let reg = dir.0.join("edge.toml");
    std::fs::write(
        &reg,
        format!(
            "[[expert]]\nname = \"local\"\nmodel = {:?}\ndevice = \"phone\"\nthreads = 1\n\n\
             [[expert]]\nname = \"edge\"\nurl = \"http://127.0.0.1:{}\"\ntokenizer = \"local\"\ndevice = \"edge-box\"\n",
            model.to_str().expect("utf-8 model path"),
            proxy.port
        ),
    )
    .expect("write the registry");
    let r = reg.to_str().expect("utf-8 path");

    // Profile and train for real: the remote is measured and scored across the link.
    let (st, out, err) = run(&["route", "profile", r, "--reps", "1"], Duration::from_secs(300));
    assert_eq!(st, 0, "route profile failed:\n{out}\n{err}");
    println!("{out}");
    let profile: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.0.join("edge.profile.json")).expect("profile"))
            .expect("profile json");
    let rtt = profile["experts"]["edge"]["rtt_s"].as_f64().expect("the remote's rtt");
    assert!(rtt >= 2.0 * DELAY.as_secs_f64() * 0.9, "rtt {rtt} s is below the proxy's added {DELAY:?} each way");
    let (st, out, err) = run(&["route", "train", r, "--windows", "2"], Duration::from_secs(600));
    assert_eq!(st, 0, "route train failed:\n{out}\n{err}");
    println!("{out}");

    // The curves over the held-out windows just scored (no expert runs again).
    let (json, plot) = (dir.0.join("eval.json"), dir.0.join("curves"));
    let (st, out, err) = run(
        &[
            "route",
            "eval",
            r,
            "--points",
            "4",
            "--json",
            json.to_str().expect("path"),
            "--plot",
            plot.to_str().expect("path"),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(st, 0, "route eval failed:\n{out}\n{err}");
    let ev: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("eval json")).expect("eval json");
    let curves = ev["curves"].as_array().expect("curves");
    assert_eq!(curves.len(), 2, "{ev}");
    for c in curves {
        let pts = c["points"].as_array().expect("points");
        assert_eq!(pts.len(), 4, "{c}");
        // At the loosest budget every method has a set, and MoE² is no worse than the
        // best single expert (its search includes every singleton).
        let last = &pts[3]["bits_per_byte"];
        let (moe, single) = (last[0].as_f64().expect("moe2"), last[1].as_f64().expect("single"));
        assert!(moe.is_finite() && single.is_finite() && moe <= single + 0.05, "{c}");
    }
    for what in ["latency", "energy"] {
        let svg = std::fs::read_to_string(dir.0.join(format!("curves-{what}.svg"))).expect("svg");
        assert!(svg.starts_with("<svg") && svg.matches("<polyline").count() == 4, "{what}");
    }
    println!("{out}");

    // Predicted costs of the request below, per expert, from the profile.
    let n = 8usize;
    let prompt = "The capital of France is";
    let p = |e: &str, k: &str| profile["experts"][e][k].as_f64().unwrap_or(0.0);
    let predict = |e: &str| {
        p(e, "start_s")
            + p(e, "rtt_s")
            + 6.0 / p(e, "prefill_tps")
            + n as f64 / p(e, "decode_tps")
            + if e == "edge" { (n - 1) as f64 * (p(e, "rtt_s") + p(e, "start_s")) } else { 0.0 }
    };
    let (local, edge) = (predict("local"), predict("edge"));
    println!("predicted: local {local:.3} s, edge {edge:.3} s");
    assert!(edge > local * 1.5, "the remote expert should cost more latency than the local one ({edge} vs {local})");

    // 1. A latency budget only the local expert fits: the remote is never called.
    let budget = format!("{:.4}s", (local * 1.3).min((local + edge) / 2.0));
    let before = proxy.count();
    let args =
        ["generate", "--route", r, "-p", prompt, "-n", "8", "--temp", "0", "--latency-budget", &budget, "--route-json"];
    let (st, out, err) = run(&args, Duration::from_secs(120));
    assert_eq!(st, 0, "routed generate failed:\n{out}\n{err}");
    let rep = report(&err);
    assert_eq!(rep["chosen"], serde_json::json!(["local"]), "budget {budget}: {rep}");
    assert_eq!(proxy.count(), before, "the remote expert was called under a budget only the local one fits");
    println!("1. budget {budget}: chose {} and the proxy saw no connection; answer {:?}", rep["chosen"], out.trim());

    // 3. An impossible budget: the cheapest answers and says so, or the request is refused.
    let (st, out, err) = run(
        &["generate", "--route", r, "-p", prompt, "-n", "4", "--latency-budget", "1ms", "--route-json"],
        Duration::from_secs(60),
    );
    assert_eq!(st, 0, "{out}\n{err}");
    let rep = report(&err);
    let why = rep["fallback"].as_str().unwrap_or_else(|| panic!("no fallback note: {rep}"));
    assert!(why.contains("no set of experts fits"), "{why}");
    assert_eq!(rep["chosen"], serde_json::json!(["local"]), "the cheapest expert should answer: {rep}");
    let (st, _, err) = run(
        &["generate", "--route", r, "-p", prompt, "-n", "4", "--latency-budget", "1ms", "--fallback", "refuse"],
        Duration::from_secs(60),
    );
    assert_eq!(st, 1, "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(lines.len() == 1 && lines[0].contains("refused"), "{err}");
    println!("3. impossible budget: fallback {why:?}; with --fallback refuse: {}", lines[0]);

    // 2. An energy budget only the remote fits; the server dies mid-answer.
    let n = 48usize;
    let energy = |e: &str| 6.0 * p(e, "prefill_j_per_token") + n as f64 * p(e, "decode_j_per_token");
    let (local_j, edge_j) = (energy("local"), energy("edge"));
    assert!(edge_j * 2.0 < local_j, "the edge box should cost fewer joules ({edge_j} J vs {local_j} J)");
    let budget = format!("{:.6}J", (local_j * edge_j).sqrt());
    let step_deadline = 4.0 * (p("edge", "rtt_s") + 1.0 / p("edge", "decode_tps")) + 0.25;
    let args = [
        "generate",
        "--route",
        r,
        "-p",
        "Once upon a time, in a small village by the sea, there lived",
        "-n",
        "48",
        "--temp",
        "0",
        "--energy-budget",
        &budget,
        "--latency-budget",
        "300s",
        "--route-json",
    ];
    let mut child = cairn().args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run cairn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // The answer streams: once a few tokens' text has come, kill the server.
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    while text.len() < 12 {
        let k = stdout.read(&mut buf).expect("read the answer");
        assert!(k > 0, "the answer ended before the server was killed: {:?}", String::from_utf8_lossy(&text));
        text.extend_from_slice(&buf[..k]);
    }
    let before_kill = String::from_utf8_lossy(&text).into_owned();
    serve.0.kill().expect("kill cairn serve");
    let _ = serve.0.wait();
    let killed = Instant::now();
    stdout.read_to_end(&mut text).expect("read the answer");
    let status = child.wait().expect("wait");
    let after = killed.elapsed().as_secs_f64();
    let err = err_reader.join().expect("stderr");
    assert!(status.success(), "the routed answer failed after the kill:\n{err}");
    let rep = report(&err);
    assert_eq!(rep["chosen"], serde_json::json!(["edge"]), "budget {budget}: {rep}");
    let drop = rep["dropped"].as_array().and_then(|d| d.iter().find(|d| d["expert"] == "edge"));
    let why = drop.and_then(|d| d["why"].as_str()).unwrap_or_else(|| panic!("edge was not dropped: {rep}"));
    assert_eq!(rep["answered"], serde_json::json!(["local"]), "{rep}");
    let rescue = rep["rescue"].as_str().unwrap_or_else(|| panic!("no rescue note: {rep}"));
    assert!(rescue.contains("local went on"), "{rescue}");
    let text = String::from_utf8_lossy(&text).into_owned();
    assert!(text.trim().len() > before_kill.trim().len(), "nothing came after the kill: {text:?}");
    // Dropped within its step deadline; the local expert then decodes the rest.
    let local_rest =
        3.0 * (p("local", "start_s") + 64.0 / p("local", "prefill_tps")) + n as f64 / p("local", "decode_tps");
    assert!(
        after < step_deadline + local_rest + 5.0,
        "{after:.2} s after the kill ({why}; deadline {step_deadline:.2} s)"
    );
    println!(
        "2. energy budget {budget} (local {local_j:.3} J, edge {edge_j:.3} J): chose edge; killed after {:?}; \
         dropped ({why}); {rescue}; done {after:.2} s after the kill; answer {:?}",
        before_kill,
        text.trim()
    );
    println!("routing_across_a_veth_link: {:.1} s", t0.elapsed().as_secs_f64());
}
