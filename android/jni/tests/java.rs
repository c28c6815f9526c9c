//! Compiles the JNI surface (`ai.cairn.CairnNative`) and its host test with javac and
//! runs the test on the JDK against the `cairn_jni` library cargo just built. Skips
//! with a message when no JDK is installed, unless `CAIRN_REQUIRE_TOOLS=1` (CI).

use std::path::{Path, PathBuf};
use std::process::Command;

fn have(tool: &str) -> bool {
    let found = Command::new(tool).arg("-version").output().is_ok_and(|o| o.status.success());
    if !found {
        let required = std::env::var_os("CAIRN_REQUIRE_TOOLS").is_some_and(|v| v == "1");
        assert!(!required, "{tool} is required (CAIRN_REQUIRE_TOOLS=1) but not installed");
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

#[test]
fn java_test_of_the_jni_layer() {
    if !have("javac") || !have("java") {
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    // Built for this run beside the test binary (`deps/`); `cargo build` puts it one up.
    let deps = exe.parent().expect("deps directory");
    let lib_dir = if deps.join("libcairn_jni.so").exists() { deps } else { deps.parent().expect("profile directory") };
    let lib = lib_dir.join("libcairn_jni.so");
    assert!(lib.exists(), "{} is missing: cargo builds it with this package", lib.display());
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cairn/src");
    let classes = lib_dir.join("jni-test-classes");
    std::fs::create_dir_all(&classes).expect("classes directory");
    let sources: Vec<PathBuf> = ["main/java/ai/cairn/CairnNative.java", "main/java/ai/cairn/CairnException.java"]
        .iter()
        .chain(&["test/java/ai/cairn/CairnNativeTest.java"])
        .map(|p| src.join(p))
        .collect();
    run(Command::new("javac").args(["-Xlint:all", "-Werror", "-encoding", "UTF-8", "-d"]).arg(&classes).args(&sources));
    let model = cairn::pull::resolve_model(None).unwrap_or_else(|e| panic!("cannot get the default model: {e}"));
    let out = run(Command::new("java")
        .arg("-Xcheck:jni")
        .arg(format!("-Dcairn.library.path={}", lib.display()))
        .arg("-cp")
        .arg(&classes)
        .arg("ai.cairn.CairnNativeTest")
        .arg(model));
    assert!(out.contains("all JNI tests passed"), "{out}");
    // -Xcheck:jni reports misuse of JNI as warnings rather than failures.
    assert!(!out.contains("WARNING in native method"), "JNI misuse reported:\n{out}");
}
