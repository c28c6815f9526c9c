//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The default model, fetched through the project's own pull code (cached under
/// `$CAIRN_HOME`, so reruns find it).
/// Resolved once per test binary, so that parallel tests never race one download.
pub fn model_path() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| match cairn::pull::resolve_model(None) {
        Ok(p) => p,
        Err(e) => panic!("cannot get the default model: {e}"),
    })
    .clone()
}

/// llama.cpp's reference outputs for the default model (a copy of
/// `../shared/reference/`, see `tests/reference/README.md`).
pub fn reference() -> serde_json::Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/smollm2-135m-instruct-q4_1.json");
    let s = std::fs::read_to_string(p).expect("reference file");
    serde_json::from_str(&s).expect("reference json")
}
