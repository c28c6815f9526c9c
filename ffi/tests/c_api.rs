//! Builds the C tests (`tests/c/test_cairn.c`) and the example (`examples/chat.c`) with
//! gcc -Wall -Wextra -Werror against the shared and the static library, and runs the
//! tests: the shared build under valgrind (no leaks, no invalid accesses), the static
//! build under AddressSanitizer. A missing tool skips its part with a message, unless
//! `CAIRN_REQUIRE_TOOLS=1` (CI) makes it a failure.

use std::path::{Path, PathBuf};
use std::process::Command;

fn require_tools() -> bool {
    std::env::var_os("CAIRN_REQUIRE_TOOLS").is_some_and(|v| v == "1")
}

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(!require_tools(), "{tool} is required (CAIRN_REQUIRE_TOOLS=1) but not installed");
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// Where cargo put this package's libraries as built for this test run: beside the
/// test binary (`target/<profile>/deps`); `cargo build` puts its own copies one level up.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps directory");
    if deps.join("libcairn_ffi.so").exists() {
        deps.to_path_buf()
    } else {
        deps.parent().expect("target profile directory").to_path_buf()
    }
}

fn out_dir() -> PathBuf {
    let d = lib_dir().join("ffi-c-tests");
    std::fs::create_dir_all(&d).expect("create output directory");
    d
}

fn ffi_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

/// Native libraries a Rust staticlib needs on Linux (`--print native-static-libs`).
const STATIC_DEPS: &[&str] = &["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-lgcc_s"];

fn gcc(sources: &[&Path], output: &Path, shared: bool, extra: &[&str]) {
    let dir = lib_dir();
    let mut cmd = Command::new("gcc");
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-O1"])
        .arg("-I")
        .arg(ffi_dir().join("include"))
        .args(sources)
        .args(extra)
        .arg("-o")
        .arg(output);
    if shared {
        let so = dir.join("libcairn_ffi.so");
        assert!(so.exists(), "{} is missing: cargo builds it with this package", so.display());
        cmd.arg(format!("-L{}", dir.display())).arg("-lcairn_ffi").arg(format!("-Wl,-rpath,{}", dir.display()));
    } else {
        let a = dir.join("libcairn_ffi.a");
        assert!(a.exists(), "{} is missing: cargo builds it with this package", a.display());
        cmd.arg(a).args(STATIC_DEPS);
    }
    cmd.arg("-lpthread");
    run(&mut cmd);
}

fn model() -> PathBuf {
    cairn::pull::resolve_model(None).unwrap_or_else(|e| panic!("cannot get the default model: {e}"))
}

fn test_source() -> PathBuf {
    ffi_dir().join("tests/c/test_cairn.c")
}

/// Any file that is not a model: the C source itself.
fn not_a_model() -> PathBuf {
    test_source()
}

#[test]
fn c_tests_shared_library_under_valgrind() {
    if !have("gcc") {
        return;
    }
    let exe = out_dir().join("test_cairn_shared");
    gcc(&[&test_source()], &exe, true, &[]);
    let mut cmd = if have("valgrind") {
        let mut c = Command::new("valgrind");
        c.args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
            "--track-origins=no",
            "--quiet",
        ])
        .arg(&exe);
        c
    } else {
        Command::new(&exe)
    };
    let out = run(cmd.arg(model()).arg(not_a_model()));
    assert!(out.contains("all C API tests passed"), "{out}");
}

#[test]
fn c_tests_static_library_under_asan() {
    if !have("gcc") {
        return;
    }
    let exe = out_dir().join("test_cairn_static_asan");
    gcc(&[&test_source()], &exe, false, &["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]);
    let out = run(Command::new(&exe)
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:exitcode=98")
        .env("UBSAN_OPTIONS", "halt_on_error=1:print_stacktrace=1")
        .arg(model())
        .arg(not_a_model()));
    assert!(out.contains("all C API tests passed"), "{out}");
}

#[test]
fn chat_example_builds_against_both_libraries() {
    if !have("gcc") {
        return;
    }
    let src = ffi_dir().join("examples/chat.c");
    let shared = out_dir().join("chat_shared");
    gcc(&[&src], &shared, true, &[]);
    gcc(&[&src], &out_dir().join("chat_static"), false, &[]);
    // One scripted turn: the example reads the user's lines from stdin.
    let out = run(Command::new(&shared)
        .args(["-n", "8", "-s", "1"])
        .arg(model())
        .stdin(std::fs::File::open(ffi_dir().join("examples/chat_input.txt")).expect("chat_input.txt")));
    assert!(out.contains("assistant>"), "{out}");
}
