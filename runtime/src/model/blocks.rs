//! The building blocks every architecture is assembled from: the per-sequence cache,
//! grouped-query attention (with optional per-head q/k norms, either RoPE style, an
//! optional sliding window), gated feed-forward blocks, and the shared forward
//! scaffolding (cache checks, embedding, output head). An architecture file only says
//! how its blocks are wired.

use std::any::Any;

use super::{KvState, Logits, ModelConfig, Runner};
use crate::backend::{AttnParams, Backend, KvLayer, RopeStyle};
use crate::error::{Error, Result};
use crate::weights::ModelFile;

/// The per-sequence state: one cache per layer.
pub struct Cache<B: Backend> {
    pub layers: Vec<B::Kv>,
    pub len: usize,
    pub capacity: usize,
}

impl<B: Backend + 'static> KvState for Cache<B> {
    fn len(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    fn truncate(&mut self, len: usize) -> usize {
        let keep = self.layers.iter().map(|kv| kv.keepable(len)).min().unwrap_or(0).min(self.len);
        for kv in &mut self.layers {
            kv.truncate(keep);
        }
        self.len = keep;
        keep
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// A fresh cache for every layer of `c`, for up to `capacity` positions.
pub fn new_cache<B: Backend + 'static>(be: &B, c: &ModelConfig, capacity: usize) -> Result<Box<dyn KvState>> {
    let capacity = capacity.min(c.context);
    let layers = (0..c.n_layers).map(|_| be.kv_new(c.n_kv_heads, c.head_dim, capacity)).collect::<Result<_>>()?;
    Ok(Box::new(Cache::<B> { layers, len: 0, capacity }))
}

/// Loads tensors by name with their expected shapes (`dims[0]` innermost).
pub struct Loader<'a, B: Backend> {
    pub file: &'a ModelFile,
    pub backend: &'a B,
}

impl<B: Backend> Loader<'_, B> {
    /// A weight by name: a tensor of the file, or a BitStack matrix of its stack.
    pub fn weight(&self, name: &str, dims: &[u64]) -> Result<B::Weight> {
        if let Some(w) = self.file.stack.as_ref().and_then(|s| s.weight(name)) {
            if [w.shape.n as u64, w.shape.m as u64] != dims {
                return Err(Error::model(format!(
                    "{}: BitStack matrix {name} is {}×{}, expected shape {dims:?}",
                    self.file.path.display(),
                    w.shape.m,
                    w.shape.n
                )));
            }
            return self.backend.load_stack(w);
        }
        self.backend.load_weight(&self.file.tensor(name, dims)?)
    }

    /// The output head: `output.weight` if the file has one, else tied to the embedding.
    pub fn output(&self, c: &ModelConfig) -> Result<Option<B::Weight>> {
        match self.file.tensor_info("output.weight") {
            Some(_) => Ok(Some(self.weight("output.weight", &[c.dim as u64, c.vocab as u64])?)),
            None => Ok(None),
        }
    }
}

/// How an attention block positions and scales its queries.
#[derive(Debug, Clone, Copy)]
pub struct AttnSpec {
    pub rope_base: f32,
    pub rope_style: RopeStyle,
    /// Multiplies q·k (1/√head_dim for llama; Gemma's query_pre_attn_scalar).
    pub scale: f32,
    /// Sliding window in positions, for local layers.
    pub window: Option<usize>,
}

/// Grouped-query self-attention: projections, optional per-head RMSNorm of q and k
/// (Gemma), RoPE, attention over the cache, output projection.
pub struct Attention<B: Backend> {
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    wo: B::Weight,
    q_norm: Option<B::Weight>,
    k_norm: Option<B::Weight>,
}

impl<B: Backend> Attention<B> {
    /// `blk.{i}.attn_{q,k,v,output}.weight`, and the q/k norms when `qk_norm`.
    pub fn load(l: &Loader<'_, B>, c: &ModelConfig, i: usize, qk_norm: bool) -> Result<Self> {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        let (d, hd) = (c.dim as u64, c.head_dim as u64);
        let (qd, kvd) = (c.n_heads as u64 * hd, c.n_kv_heads as u64 * hd);
        let norm = |s: &str| if qk_norm { l.weight(&p(s), &[hd]).map(Some) } else { Ok(None) };
        Ok(Attention {
            wq: l.weight(&p("attn_q"), &[d, qd])?,
            wk: l.weight(&p("attn_k"), &[d, kvd])?,
            wv: l.weight(&p("attn_v"), &[d, kvd])?,
            wo: l.weight(&p("attn_output"), &[qd, d])?,
            q_norm: norm("attn_q_norm")?,
            k_norm: norm("attn_k_norm")?,
        })
    }

    pub fn forward(
        &self,
        be: &B,
        c: &ModelConfig,
        s: &AttnSpec,
        h: &B::Tensor,
        kv: &mut B::Kv,
        pos0: usize,
    ) -> Result<B::Tensor> {
        let [mut q, mut k, v]: [B::Tensor; 3] = be
            .matmul_many(h, &[&self.wq, &self.wk, &self.wv])
            .try_into()
            .map_err(|_| Error::model("backend returned the wrong number of q/k/v projections"))?;
        if let Some(n) = &self.q_norm {
            q = be.rms_norm(&q, n, c.norm_eps);
        }
        if let Some(n) = &self.k_norm {
            k = be.rms_norm(&k, n, c.norm_eps);
        }
        be.rope(&mut q, c.head_dim, pos0, s.rope_base, s.rope_style);
        be.rope(&mut k, c.head_dim, pos0, s.rope_base, s.rope_style);
        let p = AttnParams {
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: s.scale,
            window: s.window,
        };
        let a = be.attention(&q, &k, &v, kv, pos0, p)?;
        Ok(be.matmul(&a, &self.wo))
    }
}

/// The activation of a gated feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// silu(gate) · up (llama).
    Silu,
    /// gelu(gate) · up, tanh approximation (Gemma).
    Gelu,
}

/// `down(act(gate(x)) · up(x))`.
pub struct FeedForward<B: Backend> {
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
    act: Gate,
}

impl<B: Backend> FeedForward<B> {
    pub fn load(l: &Loader<'_, B>, c: &ModelConfig, i: usize, act: Gate) -> Result<Self> {
        let p = |s: &str| format!("blk.{i}.{s}.weight");
        let (d, f) = (c.dim as u64, c.ffn_dim as u64);
        Ok(FeedForward {
            gate: l.weight(&p("ffn_gate"), &[d, f])?,
            up: l.weight(&p("ffn_up"), &[d, f])?,
            down: l.weight(&p("ffn_down"), &[f, d])?,
            act,
        })
    }

    pub fn forward(&self, be: &B, h: &B::Tensor) -> Result<B::Tensor> {
        let [g, u]: [B::Tensor; 2] = be
            .matmul_many(h, &[&self.gate, &self.up])
            .try_into()
            .map_err(|_| Error::model("backend returned the wrong number of gate/up projections"))?;
        let a = match self.act {
            Gate::Silu => be.swiglu(&g, &u),
            Gate::Gelu => be.geglu(&g, &u),
        };
        Ok(be.matmul(&a, &self.down))
    }
}

/// The part of a forward pass every architecture shares: find this model's cache in
/// `cache`, check the request against it, run `body` (embedding and layers, from
/// position `pos0`), then the final norm and output head on the rows asked for. A
/// failed pass leaves the cache as it was.
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend + 'static>(
    be: &B,
    c: &ModelConfig,
    out_norm: &B::Weight,
    head: &B::Weight,
    cache: &mut dyn KvState,
    ids: &[u32],
    logits: Logits,
    body: impl FnOnce(&mut Cache<B>, usize) -> Result<B::Tensor> + Send,
) -> Result<Vec<f32>> {
    let cache = cache
        .as_any_mut()
        .downcast_mut::<Cache<B>>()
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
    let out = be.scope(|| -> Result<Vec<f32>> {
        let mut x = body(cache, pos0)?;
        if logits == Logits::Last {
            x = be.rows(&x, ids.len() - 1, 1);
        }
        let x = be.rms_norm(&x, out_norm, c.norm_eps);
        Ok(be.to_host(be.matmul(&x, head)))
    });
    match out {
        Ok(v) => {
            cache.len += ids.len();
            Ok(v)
        }
        Err(e) => {
            // No layer keeps a half-evaluated batch.
            cache.truncate(pos0);
            Err(e)
        }
    }
}

/// What distinguishes one architecture: its layers (loaded and run), and how it scales
/// the embedding. Everything else a model needs is [`Transformer`]'s.
pub trait Architecture<B: Backend>: Sized + Send + Sync {
    fn load(l: &Loader<'_, B>, c: &ModelConfig) -> Result<Self>;
    /// Multiplies the embedding rows (Gemma: √dim).
    fn embed_scale(&self, _c: &ModelConfig) -> f32 {
        1.0
    }
    /// Run every layer over `x` (rows at positions `pos0..`), appending to `cache`.
    fn layers(&self, be: &B, c: &ModelConfig, x: &mut B::Tensor, cache: &mut Cache<B>, pos0: usize) -> Result<()>;
}

/// A decoder-only transformer: token embedding, an architecture's layers, final norm,
/// output head (tied to the embedding unless the file has its own).
pub struct Transformer<B: Backend, A> {
    config: ModelConfig,
    backend: B,
    embed: B::Weight,
    out_norm: B::Weight,
    output: Option<B::Weight>,
    arch: A,
}

impl<B: Backend, A: Architecture<B>> Transformer<B, A> {
    pub fn load(file: &ModelFile, config: ModelConfig, backend: B) -> Result<Self> {
        let l = Loader { file, backend: &backend };
        let d = config.dim as u64;
        let embed = l.weight("token_embd.weight", &[d, config.vocab as u64])?;
        let arch = A::load(&l, &config)?;
        let out_norm = l.weight("output_norm.weight", &[d])?;
        let output = l.output(&config)?;
        Ok(Transformer { config, backend, embed, out_norm, output, arch })
    }
}

impl<B: Backend + 'static, A: Architecture<B>> Runner for Transformer<B, A> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn backend_name(&self) -> String {
        self.backend.name()
    }

    fn new_cache(&self, capacity: usize) -> Result<Box<dyn KvState>> {
        new_cache(&self.backend, &self.config, capacity)
    }

    fn forward(&self, cache: &mut dyn KvState, ids: &[u32], logits: Logits) -> Result<Vec<f32>> {
        let (be, c) = (&self.backend, &self.config);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        forward(be, c, &self.out_norm, head, cache, ids, logits, |cache, pos0| {
            let mut x = be.embed(&self.embed, ids, self.arch.embed_scale(c))?;
            self.arch.layers(be, c, &mut x, cache, pos0)?;
            Ok(x)
        })
    }
}
