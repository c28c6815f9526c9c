//! `--memory` holds on every command that takes it: each runs as its own process on a
//! BitStack file of the default model, and its peak resident set (VmHWM, polled from
//! /proc while it runs) must stay within the budget plus 16 MB. The budget covers the
//! whole process: the plan counts what it held before the weights loaded (binary,
//! tokenizer, heap: about 28 MB), so the BitStack prefix is what is left of it.
#![cfg(all(feature = "cli", target_os = "linux"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BUDGET: &str = "130MB";
const LIMIT_KB: u64 = (130 + 16) * 1_000_000 / 1024;

fn cairn() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn"))
}

/// A BitStack file of the default model (4 levels of rank 8: 107 MB; 130 MB for the
/// whole process keeps about half its blocks), built once under target/.
fn stack_file() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("budgets");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("smollm2-l4-r8.cairn");
    if !path.exists() {
        let tmp = dir.join("building.cairn");
        let m = common::model_path();
        let o = cairn()
            .args(["stack", "-m", m.to_str().unwrap(), "-o", tmp.to_str().unwrap(), "--levels", "4", "--rank", "8"])
            .output()
            .unwrap();
        assert!(o.status.success(), "cairn stack: {}", String::from_utf8_lossy(&o.stderr));
        std::fs::rename(&tmp, &path).unwrap();
    }
    path
}

/// Run `args` to the end, returning its exit status, stderr and peak RSS in KiB.
fn peak(args: &[&str]) -> (bool, String, u64) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("budgets");
    let err_path = dir.join(format!("stderr-{}", args[0]));
    let err = std::fs::File::create(&err_path).unwrap();
    let mut child = cairn().args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(err).spawn().unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut hwm = 0;
    loop {
        // VmHWM only grows, so the last reading before exit is the peak (a zombie
        // reports none, which leaves the last one standing).
        if let Some(kb) = std::fs::read_to_string(&status_path)
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        {
            hwm = hwm.max(kb);
        }
        if let Some(st) = child.try_wait().unwrap() {
            return (st.success(), std::fs::read_to_string(&err_path).unwrap_or_default(), hwm);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn every_command_with_memory_stays_within_its_budget() {
    let stack = stack_file();
    let s = stack.to_str().unwrap();
    let text = "/usr/share/common-licenses/GPL-3";
    let m = ["-m", s, "--memory", BUDGET, "-t", "2"];
    let with = |rest: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = vec![rest[0].to_string()];
        v.extend(m.iter().map(|x| x.to_string()));
        v.extend(rest[1..].iter().map(|x| x.to_string()));
        v
    };
    let cases: Vec<Vec<String>> = vec![
        // The issue's case: one context setting, the window sizes the cache.
        with(&["perplexity", "-f", text, "--windows", "1"]),
        with(&["perplexity", "-f", text, "--windows", "1", "-c", "512"]),
        with(&["generate", "-c", "1024", "--prompt-file", text, "--head-tokens", "512", "-n", "8", "--seed", "1"]),
        with(&["chat", "-c", "512", "-p", "What is the capital of France?", "-n", "16", "--seed", "1"]),
        with(&["eval", "--ids", "1,2,3,4,5,6,7,8", "--top", "3"]),
        with(&["tokenize", "hello world"]),
        with(&["bench", "-p", "64", "-n", "8", "-r", "1"]),
        with(&[
            "needle",
            "--lengths",
            "256",
            "--depths",
            "0.5",
            "--method",
            "full,gemfilter",
            "--layer",
            "10",
            "-k",
            "64",
        ]),
        with(&["stack-eval", "-f", text, "--points", "2", "--windows", "1", "--tg", "8"]),
        with(&["info"]),
    ];
    let mut over = Vec::new();
    for args in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, err, kb) = peak(&a);
        eprintln!(
            "{:<10} peak {:6.1} MB (limit {:.1} MB)",
            a[0],
            kb as f64 * 1024.0 / 1e6,
            LIMIT_KB as f64 * 1024.0 / 1e6
        );
        assert!(ok, "{a:?} failed: {err}");
        if kb > LIMIT_KB {
            over.push(format!("{a:?}: {:.1} MB", kb as f64 * 1024.0 / 1e6));
        }
    }
    assert!(over.is_empty(), "peak RSS above {BUDGET} + 16 MB:\n{}", over.join("\n"));
}
