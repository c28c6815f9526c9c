//! The llama architecture (SmolLM2, Llama 2/3, TinyLlama, ...): pre-norm blocks of
//! grouped-query attention with adjacent-pair RoPE and a SwiGLU feed-forward.

use super::blocks::{self, Attention, AttnSpec, FeedForward, Gate, Loader};
use super::{KvState, Logits, ModelConfig, Runner};
use crate::backend::{Backend, RopeStyle};
use crate::error::Result;
use crate::weights::ModelFile;

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    attn: Attention<B>,
    ffn_norm: B::Weight,
    ffn: FeedForward<B>,
}

pub struct Llama<B: Backend> {
    config: ModelConfig,
    backend: B,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    out_norm: B::Weight,
    /// `None` when the output head is tied to the embedding.
    output: Option<B::Weight>,
}

impl<B: Backend> Llama<B> {
    pub fn load(file: &ModelFile, config: ModelConfig, backend: B) -> Result<Self> {
        let c = &config;
        let l = Loader { file, backend: &backend };
        let d = c.dim as u64;
        let embed = l.weight("token_embd.weight", &[d, c.vocab as u64])?;
        // Not `with_capacity(n_layers)`: the count comes from the file, and a corrupt one
        // must fail on its first missing tensor, not on a huge allocation.
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            layers.push(Layer {
                attn_norm: l.weight(&format!("blk.{i}.attn_norm.weight"), &[d])?,
                attn: Attention::load(&l, c, i, false)?,
                ffn_norm: l.weight(&format!("blk.{i}.ffn_norm.weight"), &[d])?,
                ffn: FeedForward::load(&l, c, i, Gate::Silu)?,
            });
        }
        let out_norm = l.weight("output_norm.weight", &[d])?;
        let output = l.output(c)?;
        Ok(Llama { config, backend, embed, layers, out_norm, output })
    }
}

impl<B: Backend + 'static> Runner for Llama<B> {
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
        let spec = AttnSpec {
            rope_base: c.rope_base,
            rope_style: RopeStyle::Adjacent,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
        };
        let head = self.output.as_ref().unwrap_or(&self.embed);
        blocks::forward(be, c, &self.out_norm, head, cache, ids, logits, |cache, pos0| {
            let mut x = be.embed(&self.embed, ids, 1.0)?;
            for (layer, kv) in self.layers.iter().zip(&mut cache.layers) {
                let h = be.rms_norm(&x, &layer.attn_norm, c.norm_eps);
                be.add_assign(&mut x, &layer.attn.forward(be, c, &spec, &h, kv, pos0)?);
                let h = be.rms_norm(&x, &layer.ffn_norm, c.norm_eps);
                be.add_assign(&mut x, &layer.ffn.forward(be, &h)?);
            }
            Ok(x)
        })
    }
}
