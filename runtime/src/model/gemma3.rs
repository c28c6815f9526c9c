//! The gemma3 architecture (Gemma-3-270M, ...), as llama.cpp defines it: the embedding
//! scaled by √dim; per-head RMSNorm of q and k before RoPE over the two halves of each
//! head; five sliding-window (local) layers with RoPE base 10 000 for every global one
//! with the model's base; norms after attention and after the feed-forward block as well
//! as before; a GELU-gated feed-forward; tied embeddings.

use super::blocks::{self, Attention, AttnSpec, FeedForward, Gate, Loader};
use super::{KvState, Logits, ModelConfig, Runner};
use crate::backend::{Backend, RopeStyle};
use crate::error::Result;
use crate::weights::ModelFile;

/// Every sixth layer attends globally; the others see a sliding window.
const GLOBAL_EVERY: usize = 6;
/// RoPE base of the local layers (llama.cpp: `rope_freq_base_train_swa`).
const LOCAL_ROPE_BASE: f32 = 10_000.0;

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    attn: Attention<B>,
    post_attn_norm: B::Weight,
    ffn_norm: B::Weight,
    ffn: FeedForward<B>,
    post_ffn_norm: B::Weight,
}

pub struct Gemma3<B: Backend> {
    config: ModelConfig,
    backend: B,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    out_norm: B::Weight,
    output: Option<B::Weight>,
    /// Positions a local layer sees (`gemma3.attention.sliding_window`).
    window: usize,
}

impl<B: Backend> Gemma3<B> {
    pub fn load(file: &ModelFile, config: ModelConfig, backend: B) -> Result<Self> {
        let c = &config;
        let l = Loader { file, backend: &backend };
        let d = c.dim as u64;
        let window = file.meta("gemma3.attention.sliding_window").and_then(|v| v.as_u64()).unwrap_or(512) as usize;
        let embed = l.weight("token_embd.weight", &[d, c.vocab as u64])?;
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let norm = |s: &str| l.weight(&format!("blk.{i}.{s}.weight"), &[d]);
            layers.push(Layer {
                attn_norm: norm("attn_norm")?,
                attn: Attention::load(&l, c, i, true)?,
                post_attn_norm: norm("post_attention_norm")?,
                ffn_norm: norm("ffn_norm")?,
                ffn: FeedForward::load(&l, c, i, Gate::Gelu)?,
                post_ffn_norm: norm("post_ffw_norm")?,
            });
        }
        let out_norm = l.weight("output_norm.weight", &[d])?;
        let output = l.output(c)?;
        Ok(Gemma3 { config, backend, embed, layers, out_norm, output, window: window.max(1) })
    }

    fn spec(&self, layer: usize) -> AttnSpec {
        let global = (layer + 1).is_multiple_of(GLOBAL_EVERY);
        AttnSpec {
            rope_base: if global { self.config.rope_base } else { LOCAL_ROPE_BASE },
            rope_style: RopeStyle::Halves,
            scale: 1.0 / (self.config.head_dim as f32).sqrt(),
            window: (!global).then_some(self.window),
        }
    }
}

impl<B: Backend + 'static> Runner for Gemma3<B> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn backend_name(&self) -> String {
        self.backend.name()
    }

    fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvState>> {
        blocks::new_cache(&self.backend, &self.config, capacity)
    }

    fn forward(&self, cache: &mut dyn KvState, ids: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let (be, c) = (&self.backend, &self.config);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        blocks::forward(be, c, &self.out_norm, head, cache, ids, logits, |cache, pos0| {
            let mut x = be.embed(&self.embed, ids, (c.dim as f32).sqrt())?;
            for (i, (layer, kv)) in self.layers.iter().zip(&mut cache.layers).enumerate() {
                let h = be.rms_norm(&x, &layer.attn_norm, c.norm_eps);
                let a = layer.attn.forward(be, c, &self.spec(i), &h, kv, pos0)?;
                be.add_assign(&mut x, &be.rms_norm(&a, &layer.post_attn_norm, c.norm_eps));
                let h = be.rms_norm(&x, &layer.ffn_norm, c.norm_eps);
                let f = layer.ffn.forward(be, &h)?;
                be.add_assign(&mut x, &be.rms_norm(&f, &layer.post_ffn_norm, c.norm_eps));
            }
            Ok(x)
        })
    }
}
