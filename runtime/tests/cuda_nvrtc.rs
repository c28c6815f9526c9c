//! The CI gate of the CUDA kernels on machines without a GPU: NVRTC (from NVIDIA's
//! `nvidia-cuda-nvrtc-cu12` wheel) compiles every program of `shaders/cuda/` for the
//! Jetson Orin (sm_87) and Hopper (sm_90), and `ptxas` (from `nvidia-cuda-nvcc-cu12`)
//! assembles the PTX, failing on any error, on a register spill, on more registers than
//! the budget, or on more shared memory than a block may have. `.ci/run` installs the
//! wheels into `target/cuda-venv`; elsewhere set CAIRN_NVRTC and CAIRN_PTXAS, or the
//! test skips (CAIRN_REQUIRE_NVRTC=1 makes that a failure).
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn::backend::cuda::{driver, launched_kernels, source};

const ARCHS: [&str; 2] = ["sm_87", "sm_90"];
/// Registers per thread: at 128 a 256-thread block still fits twice on an SM.
const REGISTER_BUDGET: u32 = 128;
/// Static shared memory a block may use without opting in.
const SHARED_LIMIT: u32 = 48 * 1024;

fn venv_file(rel: &str) -> Option<PathBuf> {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cuda-venv/lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages").join(rel))
        .find(|p| p.exists())
}

fn tool(var: &str, rel: &str) -> Option<PathBuf> {
    std::env::var_os(var).map(PathBuf::from).filter(|p| p.exists()).or_else(|| venv_file(rel))
}

fn tools() -> Option<(PathBuf, PathBuf)> {
    let found = tool("CAIRN_NVRTC", "nvidia/cuda_nvrtc/lib/libnvrtc.so.12")
        .zip(tool("CAIRN_PTXAS", "nvidia/cuda_nvcc/bin/ptxas"));
    if found.is_none() {
        let msg = "NVRTC or ptxas not found (install nvidia-cuda-nvrtc-cu12 and nvidia-cuda-nvcc-cu12 into target/cuda-venv, or set CAIRN_NVRTC / CAIRN_PTXAS)";
        assert!(std::env::var("CAIRN_REQUIRE_NVRTC").as_deref() != Ok("1"), "{msg}");
        eprintln!("skipped: {msg}");
    }
    found
}

/// Resource use of one kernel as ptxas reports it.
#[derive(Debug, Default)]
struct Usage {
    registers: u32,
    shared: u32,
    spill_bytes: u32,
}

/// Parses `ptxas -v`: "Compiling entry function 'k'", then "N bytes spill stores, M bytes
/// spill loads" and "Used R registers, … S bytes smem" lines for it.
fn parse_ptxas(log: &str) -> Vec<(String, Usage)> {
    let mut out: Vec<(String, Usage)> = Vec::new();
    let num_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            out.push((rest.split('\'').next().unwrap_or("").to_string(), Usage::default()));
            continue;
        }
        let Some((_, u)) = out.last_mut() else { continue };
        if line.contains("spill stores") {
            u.spill_bytes += num_before(line, "bytes spill stores").unwrap_or(0);
            u.spill_bytes += num_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            u.registers = num_before(line, "registers").unwrap_or(0);
            u.shared = num_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

#[test]
fn ptxas_log_is_parsed() {
    let log = "ptxas info    : Compiling entry function 'matvec_q4_0' for 'sm_87'\n\
               ptxas info    : Function properties for matvec_q4_0\n\
               \x20   0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n\
               ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]\n";
    let u = parse_ptxas(log);
    assert_eq!(u.len(), 1);
    assert_eq!(u[0].0, "matvec_q4_0");
    assert_eq!((u[0].1.registers, u[0].1.shared, u[0].1.spill_bytes), (40, 2048, 12));
}

#[test]
fn every_kernel_compiles_for_orin_and_hopper() {
    let Some((nvrtc, ptxas)) = tools() else { return };
    std::env::set_var("CAIRN_NVRTC", &nvrtc);
    let programs: Vec<&str> = source::programs().collect();
    assert!(!programs.is_empty(), "no kernel sources under shaders/cuda");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cuda-ptx");
    std::fs::create_dir_all(&dir).unwrap();
    let mut defined = Vec::new();
    let mut failures = Vec::new();
    for p in &programs {
        for arch in ARCHS {
            let ptx = match driver::compile(p, arch) {
                Ok(ptx) => ptx,
                Err(e) => {
                    failures.push(format!("{p} for {arch}: {e}"));
                    continue;
                }
            };
            let file = dir.join(format!("{}-{arch}.ptx", p.trim_end_matches(".cu")));
            std::fs::write(&file, ptx).unwrap();
            let out = Command::new(&ptxas)
                .args([&format!("-arch={arch}"), "-v", "-o", "/dev/null"])
                .arg(&file)
                .output()
                .expect("ptxas runs");
            let log = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                failures.push(format!("ptxas {p} for {arch}:\n{log}"));
                continue;
            }
            let usage = parse_ptxas(&log);
            assert!(!usage.is_empty(), "ptxas reported no kernel for {p}:\n{log}");
            for (k, u) in usage {
                defined.push(k.clone());
                println!(
                    "{arch} {k}: {} registers, {} bytes shared, {} bytes spilled",
                    u.registers, u.shared, u.spill_bytes
                );
                if u.spill_bytes > 0 {
                    failures.push(format!("{k} ({arch}) spills {} bytes", u.spill_bytes));
                }
                if u.registers > REGISTER_BUDGET {
                    failures.push(format!("{k} ({arch}) uses {} registers (budget {REGISTER_BUDGET})", u.registers));
                }
                if u.shared > SHARED_LIMIT {
                    failures.push(format!("{k} ({arch}) uses {} bytes of shared memory", u.shared));
                }
            }
        }
    }
    for k in launched_kernels() {
        if !defined.contains(&k) {
            failures.push(format!("the backend launches {k}, which no program defines"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
