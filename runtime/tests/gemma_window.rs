//! The sliding window of gemma3's local layers at work: on a prompt longer than the
//! window, the CPU backend equals a plain f32 reference that masks keys older than the
//! window, and differs from the same reference without the mask.

mod common;

use common::f32ref::{attend, matvec, rms_norm};
use common::max_rel_diff;

use cairn::backend::cpu::CpuBackend;
use cairn::model::{self, Logits};
use cairn::synthetic::{gemma3_gguf, SyntheticConfig};
use cairn::weights::ModelFile;
use cairn_formats::quant;

const WINDOW: usize = 512;

struct Reference {
    c: cairn::model::ModelConfig,
    t: std::collections::HashMap<String, Vec<f32>>,
}

impl Reference {
    fn new(file: &ModelFile) -> Self {
        let t = file
            .tensors
            .iter()
            .map(|ti| {
                let mut v = vec![0f32; ti.n_elements() as usize];
                quant::dequantize(ti.ty, file.tensor_bytes(ti), &mut v).unwrap();
                (ti.name.clone(), v)
            })
            .collect();
        Reference { c: cairn::model::ModelConfig::from_file(file).unwrap(), t }
    }

    fn w(&self, name: &str) -> &[f32] {
        &self.t[name]
    }

    /// NEOX-style RoPE: the two halves of each head rotate together.
    fn rope(x: &mut [f32], hd: usize, pos: usize, base: f32) {
        for head in x.chunks_mut(hd) {
            for i in 0..hd / 2 {
                let theta = pos as f64 / (base as f64).powf(2.0 * i as f64 / hd as f64);
                let (a, b) = (head[i] as f64, head[i + hd / 2] as f64);
                head[i] = (a * theta.cos() - b * theta.sin()) as f32;
                head[i + hd / 2] = (a * theta.sin() + b * theta.cos()) as f32;
            }
        }
    }

    fn gelu(x: f32) -> f32 {
        let x = x as f64;
        (0.5 * x * (1.0 + (0.797_884_560_8 * (x + 0.044_715 * x * x * x)).tanh())) as f32
    }

    /// Logits of the last position; `window` masks keys older than it on local layers.
    fn last_logits(&self, ids: &[u32], window: Option<usize>) -> Vec<f32> {
        let c = &self.c;
        let (d, hd, eps) = (c.dim, c.head_dim, c.norm_eps);
        let emb = self.w("token_embd.weight");
        let scale = (d as f32).sqrt();
        let mut xs: Vec<Vec<f32>> = ids
            .iter()
            .map(|&t| emb[t as usize * d..(t as usize + 1) * d].iter().map(|v| v * scale).collect())
            .collect();
        for l in 0..c.n_layers {
            let w = |n: &str| self.w(&format!("blk.{l}.{n}.weight"));
            let global = (l + 1) % 6 == 0;
            let base = if global { c.rope_base } else { 10_000.0 };
            let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
            for (pos, x) in xs.iter().enumerate() {
                let h = rms_norm(x, w("attn_norm"), eps);
                let mut q = rms_norm(&matvec(w("attn_q"), &h), w("attn_q_norm"), eps);
                let mut k = rms_norm(&matvec(w("attn_k"), &h), w("attn_k_norm"), eps);
                Self::rope(&mut q, hd, pos, base);
                Self::rope(&mut k, hd, pos, base);
                qs.push(q);
                ks.push(k);
                vs.push(matvec(w("attn_v"), &h));
            }
            for (pos, x) in xs.iter_mut().enumerate() {
                let first = match (global, window) {
                    (false, Some(win)) => (pos + 1).saturating_sub(win),
                    _ => 0,
                };
                let att = attend(&qs[pos], &ks, &vs, first..=pos, c.n_heads, c.n_kv_heads, hd);
                let o = rms_norm(&matvec(w("attn_output"), &att), w("post_attention_norm"), eps);
                x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
                let h = rms_norm(x, w("ffn_norm"), eps);
                let g = matvec(w("ffn_gate"), &h);
                let u = matvec(w("ffn_up"), &h);
                let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| Self::gelu(*g) * u).collect();
                let f = rms_norm(&matvec(w("ffn_down"), &a), w("post_ffw_norm"), eps);
                x.iter_mut().zip(&f).for_each(|(a, b)| *a += b);
            }
        }
        let x = rms_norm(xs.last().unwrap(), self.w("output_norm.weight"), eps);
        matvec(emb, &x)
    }
}

/// Six layers (the sixth global), as in the real model's pattern, at a tiny width.
fn small_gemma(context: usize) -> SyntheticConfig {
    SyntheticConfig {
        n_layers: 6,
        dim: 64,
        n_heads: 2,
        n_kv_heads: 1,
        ffn_dim: 128,
        vocab: 64,
        context,
        rope_base: 1_000_000.0,
        ..Default::default()
    }
}

#[test]
fn sliding_window_masks_old_keys() {
    let c = small_gemma(1024);
    let file = ModelFile::from_bytes("gemma.gguf", gemma3_gguf(&c, WINDOW, 11).unwrap()).unwrap();
    let ids: Vec<u32> = (0..600u32).map(|i| (i * 13 + 5) % 64).collect();
    let reference = Reference::new(&file);
    let masked = reference.last_logits(&ids, Some(WINDOW));
    let unmasked = reference.last_logits(&ids, None);
    for exact in [true, false] {
        let be = if exact { CpuBackend::reference(2) } else { CpuBackend::new(2) }.unwrap();
        let runner = model::load(&file, be).unwrap();
        let mut cache = runner.new_cache(ids.len()).unwrap();
        let got = runner.forward(cache.as_mut(), &ids, Logits::Last).unwrap();
        let (dm, du) = (max_rel_diff(&got, &masked), max_rel_diff(&got, &unmasked));
        eprintln!("{}: vs windowed reference {dm:.2e}, vs full-attention reference {du:.2e}", runner.backend_name());
        // The 8-bit activation path is close to, not equal to, the f32 evaluation.
        assert!(dm < if exact { 1e-3 } else { 3e-2 }, "differs from the windowed reference by {dm}");
        assert!(du > 5.0 * dm.max(1e-3), "no closer to the windowed reference ({dm}) than to full attention ({du})");
    }
}

/// Local layers drop keys no later query can see; decoding far past the window token by
/// token must still equal the windowed reference, and rewinding into dropped positions
/// must start over rather than reuse a cache with holes.
#[test]
fn windowed_cache_drops_old_positions_without_changing_results() {
    let window = 16;
    let c = small_gemma(256);
    let file = ModelFile::from_bytes("gemma.gguf", gemma3_gguf(&c, window, 12).unwrap()).unwrap();
    let ids: Vec<u32> = (0..90u32).map(|i| (i * 29 + 7) % 64).collect();
    let reference = Reference::new(&file);
    let runner = model::load(&file, CpuBackend::reference(2).unwrap()).unwrap();
    let mut cache = runner.new_cache(ids.len()).unwrap();
    let mut last = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        last = runner.forward(cache.as_mut(), &[id], Logits::Last).unwrap();
        if i == 40 {
            let d = max_rel_diff(&last, &reference.last_logits(&ids[..41], Some(window)));
            assert!(d < 1e-3, "token by token at 41 positions: {d}");
        }
    }
    let d = max_rel_diff(&last, &reference.last_logits(&ids, Some(window)));
    assert!(d < 1e-3, "token by token at {} positions: {d}", ids.len());
    // Positions 0..10 left the local layers' caches long ago.
    assert_eq!(cache.truncate(10), 0, "a rewind into dropped positions must empty the cache");
    let again = runner.forward(cache.as_mut(), &ids, Logits::Last).unwrap();
    assert!(max_rel_diff(&again, &last) < 1e-5, "re-evaluation after the rewind differs");
}

/// Truncating a sliding-window cache back past a slide must not keep positions whose
/// next query would miss dropped keys: either it keeps them and recomputes exactly what
/// the first pass did, or it keeps nothing (the caller starts over).
#[test]
fn truncation_never_hides_dropped_keys() {
    use cairn::backend::{AttnParams, Backend, KvLayer};
    use cairn::synthetic::SplitMix;
    let be = CpuBackend::new(1).unwrap();
    let p = AttnParams { n_heads: 2, n_kv_heads: 1, head_dim: 8, scale: 0.3, window: Some(5) };
    let n = 20;
    let mut rng = SplitMix(11);
    let mut random = |len: usize| (0..len).map(|_| rng.next_f32()).collect::<Vec<f32>>();
    let (q, k, v) = (random(n * 16), random(n * 8), random(n * 8));
    let step = |kv: &mut _, t: usize| {
        let row = |x: &[f32], w: usize| be.upload(&x[t * w..(t + 1) * w], 1, w);
        be.to_host(be.attention(&row(&q, 16), &row(&k, 8), &row(&v, 8), kv, t, p).unwrap())
    };
    let mut kv = be.kv_new(1, 8, 64).unwrap();
    let first: Vec<Vec<f32>> = (0..n).map(|t| step(&mut kv, t)).collect();
    let mut started_over = 0;
    for len in 0..n {
        let mut kv = be.kv_new(1, 8, 64).unwrap();
        (0..n).for_each(|t| drop(step(&mut kv, t)));
        let kept = kv.keepable(len);
        assert!(kept == len || kept == 0, "keepable({len}) = {kept}");
        assert_eq!(kv.truncate(len.min(kept)), kept);
        started_over += usize::from(kept == 0 && len > 0);
        for (t, want) in first.iter().enumerate().skip(kept) {
            assert_eq!(&step(&mut kv, t), want, "position {t} after truncating to {len} (kept {kept})");
        }
    }
    // The slides dropped early positions, so some truncations had to start over.
    assert!(started_over > 0);
}
