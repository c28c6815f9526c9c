//! Small llama-architecture models with random weights, built in memory. Tests and
//! benchmarks use them so that most of the suite needs no download.

use cairn_formats::{quant, GgmlType, GgufBuilder, MetaValue};

use crate::error::{Error, Result};

/// The shape of a synthetic model, and the storage type of its matrices.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    pub n_layers: usize,
    pub dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub ffn_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
    /// Type of the attention and feed-forward matrices.
    pub matrix_type: GgmlType,
    /// Type of the token embedding (also the output head: they are tied).
    pub embed_type: GgmlType,
    /// Whether to store a separate `output.weight` instead of tying it.
    pub untied_output: bool,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            n_layers: 2,
            dim: 64,
            n_heads: 4,
            n_kv_heads: 2,
            ffn_dim: 128,
            vocab: 96,
            context: 128,
            rope_base: 10000.0,
            matrix_type: GgmlType::F32,
            embed_type: GgmlType::F32,
            untied_output: false,
        }
    }
}

/// splitmix64: a tiny, well-mixed generator; tests need reproducible weights, not
/// cryptographic ones.
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn tensor(b: GgufBuilder, name: &str, dims: &[u64], ty: GgmlType, values: &[f32]) -> Result<GgufBuilder> {
    let row_bytes = ty.row_bytes(dims[0]).map_err(|e| Error::model(e.to_string()))? as usize;
    let rows = values.len() / dims[0] as usize;
    let mut data = vec![0u8; row_bytes * rows];
    quant::quantize(ty, values, &mut data).map_err(|e| Error::model(format!("{name}: {e}")))?;
    b.tensor(name, dims, ty, data).map_err(|e| Error::model(e.to_string()))
}

/// A GGUF file of a llama model with random weights scaled like a trained model's
/// (so that activations stay in a realistic range through every layer).
pub fn llama_gguf(c: &SyntheticConfig, seed: u64) -> Result<Vec<u8>> {
    build(c, seed, None)
}

/// The same for the gemma3 architecture: q/k norms, post-norms, a sliding window of
/// `window` positions on all layers but every sixth.
pub fn gemma3_gguf(c: &SyntheticConfig, window: usize, seed: u64) -> Result<Vec<u8>> {
    build(c, seed, Some(window))
}

fn build(c: &SyntheticConfig, seed: u64, gemma_window: Option<usize>) -> Result<Vec<u8>> {
    let mut rng = SplitMix(seed);
    let mut rand = |n: usize, scale: f32| -> Vec<f32> { (0..n).map(|_| rng.next_f32() * scale).collect() };
    let arch = if gemma_window.is_some() { "gemma3" } else { "llama" };
    let hd = c.dim / c.n_heads;
    let (d, f, v) = (c.dim as u64, c.ffn_dim as u64, c.vocab as u64);
    let (qd, kvd) = ((c.n_heads * hd) as u64, (c.n_kv_heads * hd) as u64);
    let s = |fan_in: u64| 1.7 / (fan_in as f32).sqrt();
    let key = |k: &str| format!("{arch}.{k}");
    let mut b = GgufBuilder::new()
        .meta("general.architecture", MetaValue::String(arch.into()))
        .meta("general.name", MetaValue::String("synthetic".into()))
        .meta(&key("block_count"), MetaValue::U32(c.n_layers as u32))
        .meta(&key("context_length"), MetaValue::U32(c.context as u32))
        .meta(&key("embedding_length"), MetaValue::U32(c.dim as u32))
        .meta(&key("feed_forward_length"), MetaValue::U32(c.ffn_dim as u32))
        .meta(&key("attention.head_count"), MetaValue::U32(c.n_heads as u32))
        .meta(&key("attention.head_count_kv"), MetaValue::U32(c.n_kv_heads as u32))
        .meta(&key("rope.freq_base"), MetaValue::F32(c.rope_base))
        .meta(&key("attention.layer_norm_rms_epsilon"), MetaValue::F32(1e-5));
    if let Some(w) = gemma_window {
        b = b.meta(&key("attention.sliding_window"), MetaValue::U32(w as u32));
        b = b.meta(&key("attention.key_length"), MetaValue::U32(hd as u32));
    }
    let norm = |rand: &mut dyn FnMut(usize, f32) -> Vec<f32>, n: usize| -> Vec<f32> {
        rand(n, 0.2).iter().map(|x| 1.0 + x).collect()
    };
    b = tensor(b, "token_embd.weight", &[d, v], c.embed_type, &rand(c.dim * c.vocab, 1.0))?;
    for i in 0..c.n_layers {
        let p = |n: &str| format!("blk.{i}.{n}.weight");
        b = tensor(b, &p("attn_norm"), &[d], GgmlType::F32, &norm(&mut rand, c.dim))?;
        b = tensor(b, &p("attn_q"), &[d, qd], c.matrix_type, &rand((d * qd) as usize, s(d)))?;
        b = tensor(b, &p("attn_k"), &[d, kvd], c.matrix_type, &rand((d * kvd) as usize, s(d)))?;
        b = tensor(b, &p("attn_v"), &[d, kvd], c.matrix_type, &rand((d * kvd) as usize, s(d)))?;
        b = tensor(b, &p("attn_output"), &[qd, d], c.matrix_type, &rand((qd * d) as usize, s(qd) * 0.5))?;
        b = tensor(b, &p("ffn_norm"), &[d], GgmlType::F32, &norm(&mut rand, c.dim))?;
        b = tensor(b, &p("ffn_gate"), &[d, f], c.matrix_type, &rand((d * f) as usize, s(d)))?;
        b = tensor(b, &p("ffn_up"), &[d, f], c.matrix_type, &rand((d * f) as usize, s(d)))?;
        b = tensor(b, &p("ffn_down"), &[f, d], c.matrix_type, &rand((f * d) as usize, s(f) * 0.5))?;
        if gemma_window.is_some() {
            b = tensor(b, &p("attn_q_norm"), &[hd as u64], GgmlType::F32, &norm(&mut rand, hd))?;
            b = tensor(b, &p("attn_k_norm"), &[hd as u64], GgmlType::F32, &norm(&mut rand, hd))?;
            b = tensor(b, &p("post_attention_norm"), &[d], GgmlType::F32, &norm(&mut rand, c.dim))?;
            b = tensor(b, &p("post_ffw_norm"), &[d], GgmlType::F32, &norm(&mut rand, c.dim))?;
        }
    }
    b = tensor(b, "output_norm.weight", &[d], GgmlType::F32, &vec![1.0; c.dim])?;
    if c.untied_output {
        b = tensor(b, "output.weight", &[d, v], c.embed_type, &rand(c.dim * c.vocab, s(d)))?;
    }
    Ok(b.build())
}
