//! The CPU backend against a plain f32 reference forward pass (simple loops, every
//! weight dequantized up front), on synthetic models of every storage type and on the
//! real default model.

mod common;

use common::f32ref::{attend, matvec, rms_norm};
use common::max_rel_diff;

use cairn::backend::cpu::CpuBackend;
use cairn::model::{self, Logits};
use cairn::synthetic::{llama_gguf, SyntheticConfig};
use cairn::weights::ModelFile;
use cairn_formats::GgmlType;

/// The llama architecture, written as plainly as possible.
struct Reference {
    c: cairn::model::ModelConfig,
    embed: Vec<f32>,
    layers: Vec<[Vec<f32>; 9]>,
    out_norm: Vec<f32>,
    output: Vec<f32>,
}

fn deq(file: &ModelFile, name: &str) -> Vec<f32> {
    let t = file.tensor_info(name).unwrap_or_else(|| panic!("missing {name}"));
    file.tensor(name, &t.dims.clone()).unwrap().to_f32().unwrap()
}

impl Reference {
    fn new(file: &ModelFile) -> Self {
        let c = cairn::model::ModelConfig::from_file(file).unwrap();
        let layers = (0..c.n_layers)
            .map(|i| {
                let names = [
                    "attn_norm",
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_output",
                    "ffn_norm",
                    "ffn_gate",
                    "ffn_up",
                    "ffn_down",
                ];
                names.map(|n| deq(file, &format!("blk.{i}.{n}.weight")))
            })
            .collect();
        let embed = deq(file, "token_embd.weight");
        let output =
            if file.tensor_info("output.weight").is_some() { deq(file, "output.weight") } else { embed.clone() };
        Reference { out_norm: deq(file, "output_norm.weight"), c, embed, layers, output }
    }

    fn rope(x: &mut [f32], hd: usize, pos: usize, base: f32) {
        for head in x.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let theta = pos as f64 / (base as f64).powf(2.0 * i as f64 / hd as f64);
                let (a, b) = (head[2 * i] as f64, head[2 * i + 1] as f64);
                head[2 * i] = (a * theta.cos() - b * theta.sin()) as f32;
                head[2 * i + 1] = (a * theta.sin() + b * theta.cos()) as f32;
            }
        }
    }

    /// Logits at every position of `ids`.
    fn logits(&self, ids: &[u32]) -> Vec<Vec<f32>> {
        let c = &self.c;
        let (d, hd) = (c.dim, c.head_dim);
        let mut xs: Vec<Vec<f32>> =
            ids.iter().map(|&t| self.embed[t as usize * d..(t as usize + 1) * d].to_vec()).collect();
        for l in &self.layers {
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            let mut qs = Vec::new();
            for (pos, x) in xs.iter().enumerate() {
                let h = rms_norm(x, &l[0], c.norm_eps);
                let mut q = matvec(&l[1], &h);
                let mut k = matvec(&l[2], &h);
                Self::rope(&mut q, hd, pos, c.rope_base);
                Self::rope(&mut k, hd, pos, c.rope_base);
                qs.push(q);
                ks.push(k);
                vs.push(matvec(&l[3], &h));
            }
            for (pos, x) in xs.iter_mut().enumerate() {
                let att = attend(&qs[pos], &ks, &vs, 0..=pos, c.n_heads, c.n_kv_heads, hd);
                let o = matvec(&l[4], &att);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let h = rms_norm(x, &l[5], c.norm_eps);
                let g = matvec(&l[6], &h);
                let u = matvec(&l[7], &h);
                let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
                let dn = matvec(&l[8], &a);
                x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
            }
        }
        xs.iter().map(|x| matvec(&self.output, &rms_norm(x, &self.out_norm, c.norm_eps))).collect()
    }
}

fn check(file: &ModelFile, ids: &[u32], tol: f32) {
    let reference = Reference::new(file).logits(ids);
    let runner = model::load(file, CpuBackend::reference(2).unwrap()).unwrap();
    let vocab = runner.config().vocab;
    // All positions in one batch.
    let mut cache = runner.new_cache(ids.len()).unwrap();
    let all = runner.forward(cache.as_mut(), ids, Logits::All).unwrap();
    for (pos, r) in reference.iter().enumerate() {
        let d = max_rel_diff(&all[pos * vocab..(pos + 1) * vocab], r);
        assert!(d < tol, "batched logits at position {pos} differ by {d} (relative)");
    }
    // One token at a time through the cache must agree too.
    let mut cache = runner.new_cache(ids.len()).unwrap();
    for (pos, &id) in ids.iter().enumerate() {
        let last = runner.forward(cache.as_mut(), &[id], Logits::Last).unwrap();
        let d = max_rel_diff(&last, &reference[pos]);
        assert!(d < tol, "incremental logits at position {pos} differ by {d} (relative)");
    }
}

fn synthetic(matrix_type: GgmlType, embed_type: GgmlType, untied: bool) -> ModelFile {
    let c = SyntheticConfig {
        matrix_type,
        embed_type,
        untied_output: untied,
        dim: 256,
        ffn_dim: 512,
        n_heads: 4,
        n_kv_heads: 2,
        ..Default::default()
    };
    ModelFile::from_bytes("synthetic.gguf", llama_gguf(&c, 7).unwrap()).unwrap()
}

#[test]
fn synthetic_models_match_f32_reference() {
    let ids = [1u32, 5, 9, 33, 2, 80, 17, 17, 64, 3];
    for (mt, et, untied) in [
        (GgmlType::F32, GgmlType::F32, false),
        (GgmlType::F16, GgmlType::Q8_0, true),
        (GgmlType::BF16, GgmlType::F16, false),
        (GgmlType::Q4_0, GgmlType::Q8_0, false),
        (GgmlType::Q4_1, GgmlType::Q8_0, false),
        (GgmlType::Q5_0, GgmlType::Q4_0, true),
        (GgmlType::Q5_1, GgmlType::Q5_1, false),
        (GgmlType::Q8_0, GgmlType::Q8_0, false),
        (GgmlType::Q4K, GgmlType::Q6K, false),
        (GgmlType::Q5K, GgmlType::Q8_0, false),
        (GgmlType::Q6K, GgmlType::Q4K, true),
    ] {
        eprintln!("{mt} matrices, {et} embedding");
        check(&synthetic(mt, et, untied), &ids, 1e-3);
    }
}

#[test]
fn real_model_matches_f32_reference() {
    let file = ModelFile::open(&common::model_path()).unwrap();
    // "The capital of France is" and a few more tokens.
    check(&file, &[504, 3575, 282, 4649, 314, 7042, 30], 1e-3);
}

/// On the fast path too, evaluating a sequence in one batch and one token at a time
/// must agree: the decode kernels (repacked matvec, single-query attention over the f16
/// cache) against the prefill ones (tiled attention).
#[test]
fn fast_path_decode_equals_prefill() {
    for (mt, et) in
        [(GgmlType::Q4_1, GgmlType::Q8_0), (GgmlType::Q4_0, GgmlType::Q8_0), (GgmlType::Q5_1, GgmlType::Q6K)]
    {
        let file = synthetic(mt, et, false);
        let runner = model::load(&file, CpuBackend::new(2).unwrap()).unwrap();
        let vocab = runner.config().vocab;
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % vocab as u32).collect();
        let mut cache = runner.new_cache(ids.len()).unwrap();
        let all = runner.forward(cache.as_mut(), &ids, Logits::All).unwrap();
        let mut cache = runner.new_cache(ids.len()).unwrap();
        for (pos, &id) in ids.iter().enumerate() {
            let last = runner.forward(cache.as_mut(), &[id], Logits::Last).unwrap();
            let d = max_rel_diff(&last, &all[pos * vocab..(pos + 1) * vocab]);
            // Prefill sums q·k in tiles, decode one key at a time: the orders differ, and
            // now and then a softmax weight rounds to the neighbouring f16.
            assert!(d < 2e-3, "{mt}: position {pos} differs by {d} between decode and prefill");
        }
    }
}
