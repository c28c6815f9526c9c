//! The llama architecture (SmolLM2, Llama 2/3, TinyLlama, ...): pre-norm blocks of
//! grouped-query attention with adjacent-pair RoPE and a SwiGLU feed-forward.

use std::any::Any;

use super::{KvState, Logits, ModelConfig, Runner};
use crate::backend::{AttnParams, Backend, KvLayer, RopeStyle};
use crate::error::{Error, Result};
use crate::weights::ModelFile;

struct Layer<B: Backend> {
    attn_norm: B::Weight,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    wo: B::Weight,
    ffn_norm: B::Weight,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
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

/// The per-sequence state: one cache per layer.
pub struct LlamaCache<B: Backend> {
    layers: Vec<B::Kv>,
    len: usize,
    capacity: usize,
}

impl<B: Backend + 'static> KvState for LlamaCache<B> {
    fn len(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn truncate(&mut self, len: usize) {
        for kv in &mut self.layers {
            kv.truncate(len);
        }
        self.len = self.len.min(len);
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl<B: Backend> Llama<B> {
    pub fn load(file: &ModelFile, config: ModelConfig, backend: B) -> Result<Self> {
        let c = &config;
        let (d, kvd, f) = (c.dim as u64, (c.n_kv_heads * c.head_dim) as u64, c.ffn_dim as u64);
        let qd = (c.n_heads * c.head_dim) as u64;
        let w = |name: &str, dims: &[u64]| -> Result<B::Weight> { backend.load_weight(&file.tensor(name, dims)?) };
        let embed = w("token_embd.weight", &[d, c.vocab as u64])?;
        // Not `with_capacity(n_layers)`: the count comes from the file, and a corrupt one
        // must fail on its first missing tensor, not on a huge allocation.
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                attn_norm: w(&p("attn_norm"), &[d])?,
                wq: w(&p("attn_q"), &[d, qd])?,
                wk: w(&p("attn_k"), &[d, kvd])?,
                wv: w(&p("attn_v"), &[d, kvd])?,
                wo: w(&p("attn_output"), &[qd, d])?,
                ffn_norm: w(&p("ffn_norm"), &[d])?,
                gate: w(&p("ffn_gate"), &[d, f])?,
                up: w(&p("ffn_up"), &[d, f])?,
                down: w(&p("ffn_down"), &[f, d])?,
            });
        }
        let out_norm = w("output_norm.weight", &[d])?;
        let output = match file.tensor_info("output.weight") {
            Some(_) => Some(w("output.weight", &[d, c.vocab as u64])?),
            None => None,
        };
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
        let c = &self.config;
        let capacity = capacity.min(c.context);
        let layers =
            (0..c.n_layers).map(|_| self.backend.kv_new(c.n_kv_heads, c.head_dim, capacity)).collect::<Result<_>>()?;
        Ok(Box::new(LlamaCache::<B> { layers, len: 0, capacity }))
    }

    fn forward(&self, cache: &mut dyn KvState, ids: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let cache = cache
            .as_any_mut()
            .downcast_mut::<LlamaCache<B>>()
            .ok_or_else(|| Error::input("this cache belongs to another model"))?;
        if ids.is_empty() {
            return Err(Error::input("no tokens to evaluate"));
        }
        if cache.len + ids.len() > cache.capacity {
            return Err(Error::input(format!(
                "{} tokens after {} cached exceed the context length {}",
                ids.len(),
                cache.len,
                cache.capacity
            )));
        }
        let pos0 = cache.len;
        let out = self.backend.scope(|| self.run(cache, ids, logits));
        if out.is_err() {
            // Leave the cache as it was: no layer keeps a half-evaluated batch.
            cache.truncate(pos0);
        }
        out
    }
}

impl<B: Backend + 'static> Llama<B> {
    fn run(&self, cache: &mut LlamaCache<B>, ids: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let (be, c) = (&self.backend, &self.config);
        let pos0 = cache.len;
        let attn = AttnParams {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window: None,
        };
        let mut x = be.embed(&self.embed, ids, 1.0)?;
        for (layer, kv) in self.layers.iter().zip(&mut cache.layers) {
            let h = be.rms_norm(&x, &layer.attn_norm, c.norm_eps);
            let [mut q, mut k, v]: [B::Tensor; 3] =
                be.matmul_many(&h, &[&layer.wq, &layer.wk, &layer.wv])
                    .try_into()
                    .map_err(|_| Error::model("backend returned the wrong number of q/k/v projections"))?;
            be.rope(&mut q, c.head_dim, pos0, c.rope_base, RopeStyle::Adjacent);
            be.rope(&mut k, c.head_dim, pos0, c.rope_base, RopeStyle::Adjacent);
            let a = be.attention(&q, &k, &v, kv, pos0, attn)?;
            be.add_assign(&mut x, &be.matmul(&a, &layer.wo));

            let h = be.rms_norm(&x, &layer.ffn_norm, c.norm_eps);
            let [g, u]: [B::Tensor; 2] = be
                .matmul_many(&h, &[&layer.gate, &layer.up])
                .try_into()
                .map_err(|_| Error::model("backend returned the wrong number of gate/up projections"))?;
            let g = be.swiglu(&g, &u);
            be.add_assign(&mut x, &be.matmul(&g, &layer.down));
        }
        cache.len += ids.len();
        if logits == Logits::Last {
            x = be.rows(&x, ids.len() - 1, 1);
        }
        let x = be.rms_norm(&x, &self.out_norm, c.norm_eps);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        Ok(be.to_host(be.matmul(&x, head)))
    }
}
