//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod batch;
#[cfg(feature = "cli")]
pub mod stack;
pub mod weights;

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

/// Gemma-3-270M, fetched through the pull code like the default model.
pub fn gemma_path() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| match cairn::pull::resolve_model(Some("gemma3-270m")) {
        Ok(p) => p,
        Err(e) => panic!("cannot get gemma3-270m: {e}"),
    })
    .clone()
}

/// llama.cpp's reference outputs for Gemma-3-270M.
pub fn gemma_reference() -> serde_json::Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/gemma-3-270m-q4_k_m.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference file")).expect("reference json")
}

/// llama.cpp's reference outputs for the default model (a copy of
/// `../shared/reference/`, see `tests/reference/README.md`).
pub fn reference() -> serde_json::Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/reference/smollm2-135m-instruct-q4_1.json");
    let s = std::fs::read_to_string(p).expect("reference file");
    serde_json::from_str(&s).expect("reference json")
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// llama.cpp's top-5 at one position: (id, logit) pairs, largest first.
pub fn top5(v: &serde_json::Value) -> Vec<(u32, f64)> {
    v.as_array()
        .expect("top5")
        .iter()
        .map(|p| (p[0].as_u64().expect("id") as u32, p[1].as_f64().expect("logit")))
        .collect()
}

/// Largest |a - b| relative to the largest |b| of the row.
pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

/// Plain f32/f64 loops for the reference forward passes of the tests: no SIMD, no
/// threads, nothing shared with the runtime's kernels.
pub mod f32ref {
    /// `w x` for a row-major matrix of `x.len()` columns, summed in f64.
    pub fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
        let k = x.len();
        (0..w.len() / k).map(|j| (0..k).map(|i| w[j * k + i] as f64 * x[i] as f64).sum::<f64>() as f32).collect()
    }

    /// RMSNorm of each `w.len()`-wide slice of `x` (the whole row, or each head).
    pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
        x.chunks(w.len())
            .flat_map(|x| {
                let ms = x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / x.len() as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                x.iter().zip(w).map(move |(v, w)| (*v as f64 * inv) as f32 * w).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Grouped-query attention of one query row over the keys and values at positions
    /// `keys`, scores scaled by 1/√head_dim.
    pub fn attend(
        q: &[f32],
        ks: &[Vec<f32>],
        vs: &[Vec<f32>],
        keys: std::ops::RangeInclusive<usize>,
        n_heads: usize,
        n_kv_heads: usize,
        hd: usize,
    ) -> Vec<f32> {
        let group = n_heads / n_kv_heads;
        let mut att = vec![0f32; n_heads * hd];
        for h in 0..n_heads {
            let g = h / group;
            let q = &q[h * hd..(h + 1) * hd];
            let s: Vec<f64> = keys
                .clone()
                .map(|j| (0..hd).map(|i| q[i] as f64 * ks[j][g * hd + i] as f64).sum::<f64>() / (hd as f64).sqrt())
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
            for i in 0..hd {
                att[h * hd + i] =
                    keys.clone().zip(&s).map(|(j, sj)| (sj - m).exp() / z * vs[j][g * hd + i] as f64).sum::<f64>()
                        as f32;
            }
        }
        att
    }
}
