//! `cairn route solve` end to end: bad instances fail with one `error:` line and a
//! non-zero exit (never a panic); a good one prints the optimum that brute force over
//! every subset finds, here in the test, independently of the library's search.
#![cfg(feature = "cli")]

use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("cairn-route-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("write test file");
        p.to_str().expect("utf-8 temp path").to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (exit code, stdout, stderr) of `cairn route solve PATH`.
fn solve(path: &str) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["route", "solve", path])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run cairn");
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Four experts on three devices ("a" and "b" share the phone), a non-monotone loss
/// table (loss[m] depends on m in a scrambled way).
fn good() -> Value {
    let loss: Vec<f64> = (0..16u32).map(|m| ((m * 7 + 3) % 11) as f64 / 10.0).collect();
    json!({
        "experts": [
            {"name": "a", "device": "phone", "latency_s": 0.4, "energy_j": 2.0},
            {"name": "b", "device": "phone", "latency_s": 0.5, "energy_j": 1.0},
            {"name": "c", "device": "jetson", "latency_s": 0.7, "energy_j": 3.0},
            {"name": "d", "device": "edge", "latency_s": 0.3, "energy_j": 4.5},
        ],
        "loss": loss,
        "latency_budget_s": 0.8,
        "energy_budget_j": 6.0,
    })
}

/// The least loss over feasible non-empty masks, with latency the slowest device's sum.
fn brute(inst: &Value) -> Option<(f64, Vec<u32>)> {
    let ex = inst["experts"].as_array().unwrap();
    let loss: Vec<f64> = inst["loss"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let (lb, eb) = (inst["latency_budget_s"].as_f64().unwrap(), inst["energy_budget_j"].as_f64().unwrap());
    let mut best: Option<(f64, Vec<u32>)> = None;
    for m in 1u32..1 << ex.len() {
        let mut per_device = std::collections::BTreeMap::<&str, f64>::new();
        let mut energy = 0.0;
        for (i, e) in ex.iter().enumerate().filter(|(i, _)| m >> i & 1 == 1) {
            *per_device.entry(e["device"].as_str().unwrap()).or_default() += e["latency_s"].as_f64().unwrap();
            energy += e["energy_j"].as_f64().unwrap();
            let _ = i;
        }
        let latency = per_device.values().copied().fold(0.0, f64::max);
        if latency <= lb && energy <= eb {
            let l = loss[m as usize];
            match &mut best {
                Some((b, masks)) if l == *b => masks.push(m),
                Some((b, _)) if l > *b => {}
                _ => best = Some((l, vec![m])),
            }
        }
    }
    best
}

#[test]
fn solves_a_good_instance_like_brute_force() {
    let dir = TempDir::new("good");
    let inst = good();
    let (code, out, err) = solve(&dir.file("good.json", &inst.to_string()));
    assert_eq!(code, Some(0), "stderr: {err}");
    let got: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    let (best, masks) = brute(&inst).expect("the good instance has feasible sets");
    assert_eq!(got["feasible"], json!(true), "{got}");
    assert_eq!(got["loss"].as_f64(), Some(best), "{got}");
    let mask = got["mask"].as_u64().unwrap() as u32;
    assert!(masks.contains(&mask), "mask {mask:#b} is not among the optima {masks:?}: {got}");
    let names: Vec<&str> =
        ["a", "b", "c", "d"].into_iter().enumerate().filter(|(i, _)| mask >> i & 1 == 1).map(|(_, n)| n).collect();
    assert_eq!(got["chosen"], json!(names));
    println!("good instance: {got} (brute force: loss {best}, optimal masks {masks:?})");

    // Budgets below every expert: infeasible, the fallback is the least overrun ("b":
    // max(0.5/0.1, 1/0.1) = 10, under a's 20, c's 30, d's 45).
    let mut tight = inst.clone();
    tight["latency_budget_s"] = json!(0.1);
    tight["energy_budget_j"] = json!(0.1);
    let (code, out, err) = solve(&dir.file("tight.json", &tight.to_string()));
    assert_eq!(code, Some(0), "stderr: {err}");
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["feasible"], json!(false), "{got}");
    assert_eq!(got["chosen"], json!(["b"]), "{got}");
    assert_eq!(got["mask"], json!(2));
}

#[test]
fn bad_instances_are_one_clear_error() {
    let dir = TempDir::new("bad");
    let mut cases: Vec<(&str, String, &str)> = Vec::new();
    let edit = |f: &dyn Fn(&mut Value)| {
        let mut v = good();
        f(&mut v);
        v.to_string()
    };
    cases.push(("short_loss", edit(&|v| v["loss"] = json!([0.1, 0.2, 0.3])), "loss has 3 values"));
    cases.push(("zero_budget", edit(&|v| v["latency_budget_s"] = json!(0)), "latency_budget_s must be a positive"));
    cases.push((
        "negative_budget",
        edit(&|v| v["energy_budget_j"] = json!(-2.5)),
        "energy_budget_j must be a positive",
    ));
    cases.push((
        "nan_budget",
        good().to_string().replace("\"energy_budget_j\":6.0", "\"energy_budget_j\":NaN"),
        "not a routing instance",
    ));
    cases.push(("string_cost", edit(&|v| v["experts"][1]["latency_s"] = json!("fast")), "invalid type"));
    cases.push(("negative_cost", edit(&|v| v["experts"][2]["energy_j"] = json!(-1)), "experts[2] (c): energy_j"));
    cases.push(("unknown_field", edit(&|v| v["budget"] = json!(1)), "unknown field `budget`"));
    cases.push((
        "missing_field",
        edit(&|v| v.as_object_mut().unwrap().remove("loss").map(|_| ()).unwrap()),
        "missing field `loss`",
    ));
    cases.push((
        "no_experts",
        edit(&|v| {
            v["experts"] = json!([]);
            v["loss"] = json!([0.0])
        }),
        "at least one expert",
    ));
    let many: Vec<Value> =
        (0..21).map(|i| json!({"name": format!("e{i}"), "device": "x", "latency_s": 1, "energy_j": 1})).collect();
    cases.push(("too_many", edit(&|v| v["experts"] = json!(many)), "21 experts: at most 20"));
    cases.push(("not_json", "{experts:".into(), "not a routing instance"));
    for (name, text, expect) in &cases {
        let path = dir.file(&format!("{name}.json"), text);
        let (code, out, err) = solve(&path);
        let all = format!("{name}: exit {code:?}\n--- stdout\n{out}--- stderr\n{err}");
        assert!(code.is_some_and(|c| c != 0), "should fail: {all}");
        assert!(!err.contains("panicked"), "panicked: {all}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {all}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(expect), "should mention {expect:?}: {all}");
        assert!(out.is_empty(), "nothing on stdout: {all}");
        println!("{name}: {}", lines[0]);
    }
    // A missing file.
    let (code, _, err) = solve("/nonexistent/route.json");
    assert!(
        code.is_some_and(|c| c != 0) && err.starts_with("error: ") && err.contains("/nonexistent/route.json"),
        "{err}"
    );
}

/// (exit code, stdout, stderr) of `cairn ARGS` with an empty home and no index.
fn cairn(args: &[&str], home: &std::path::Path) -> (Option<i32>, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env("CAIRN_HOME", home)
        .env("CAIRN_INDEX_URL", "http://127.0.0.1:1")
        .output()
        .expect("run cairn");
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Malformed registries, budgets of 0 or below, an unreachable remote expert and a
/// registry without its profile or gate: one `error:` line each, exit non-zero, no panic.
#[test]
fn bad_registries_and_budgets_are_one_clear_error() {
    let dir = TempDir::new("registry");
    let model = env!("CARGO_MANIFEST_DIR").to_string() + "/../no-such-model.gguf";
    let local = format!("[[expert]]\nname = \"tiny\"\nmodel = {model:?}\ndevice = \"phone\"\n");
    let unreachable = format!(
        "[[expert]]\nname = \"edge\"\nurl = \"http://127.0.0.1:1\"\ntokenizer = \"tiny\"\ndevice = \"box\"\n\n{local}"
    );
    let files = [
        ("garbage.toml", "[[expert]\nname = 3".to_string()),
        ("empty.toml", String::new()),
        ("both.toml", format!("{local}url = \"http://x\"\n")),
        ("remote_only.toml", "[[expert]]\nname = \"e\"\nurl = \"http://127.0.0.1:1\"\ndevice = \"b\"\n".into()),
        ("local.toml", local.clone()),
        ("unreachable.toml", unreachable),
    ];
    let p: Vec<String> = files.iter().map(|(n, t)| dir.file(n, t)).collect();
    let prompt = ["generate", "-p", "hi", "-n", "2", "--route"];
    let with = |reg: &str, extra: &[&str]| -> Vec<String> {
        prompt
            .iter()
            .map(|s| s.to_string())
            .chain([reg.to_string()])
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with(&p[0], &[]), "not a registry"),
        (with(&p[1], &[]), "no [[expert]]"),
        (with(&p[2], &[]), "not both"),
        (with(&p[3], &[]), "every expert is remote"),
        (with(&p[4], &["--latency-budget", "0s"]), "latency budget must be more than 0"),
        (with(&p[4], &["--latency-budget=-2s"]), "latency budget must be more than 0"),
        (with(&p[4], &["--energy-budget=-3J"]), "energy budget must be more than 0"),
        (with(&p[4], &["--energy-budget", "lots"]), "not a number with a unit"),
        (with(&p[4], &[]), "has no gate: run `cairn route train"),
        (vec!["route".into(), "profile".into(), p[5].clone(), "--reps".into(), "1".into()], "127.0.0.1:1"),
        (vec!["route".into(), "eval".into(), p[4].clone()], "local.gate.json"),
        (vec!["route".into(), "train".into(), p[4].clone(), "--windows".into(), "0".into()], "at least 1"),
    ];
    for (args, expect) in &cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = cairn(&refs, &dir.0);
        let all = format!("cairn {}: exit {code:?}\n--- stdout\n{out}--- stderr\n{err}", args.join(" "));
        assert!(code.is_some_and(|c| c != 0), "should fail: {all}");
        assert!(!err.contains("panicked"), "panicked: {all}");
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(lines.len(), 1, "one error line: {all}");
        assert!(lines[0].contains(expect), "should mention {expect:?}: {all}");
        println!("{}: {}", args.join(" "), lines[0]);
    }
}
