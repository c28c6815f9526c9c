//! The building blocks every architecture is assembled from: the per-sequence cache,
//! grouped-query attention (with optional per-head q/k norms, either RoPE style, an
//! optional sliding window), gated feed-forward blocks, and the shared forward
//! scaffolding (cache checks, embedding, output head). An architecture file only says
//! how its blocks are wired.

use std::any::Any;

use super::{KvState, Logits, ModelConfig, Runner, Segment};
use crate::backend::{AttnJob, AttnParams, Backend, KvLayer, RopeStyle};
use crate::error::{Error, Result};
use crate::weights::ModelFile;

/// The per-sequence state: one cache per layer.
pub struct Cache<B: Backend> {
    pub layers: Vec<B::Kv>,
    pub len: usize,
    pub capacity: usize,
    /// Position of cache row 0's successor minus its index: after an eviction (SnapKV,
    /// H2O) the rows left keep their RoPE, and new tokens continue at their true
    /// positions, `len + shift`.
    pub shift: usize,
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
    fn position(&self) -> usize {
        self.len + self.shift
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A fresh cache for the first `n_layers` layers of `c` (all of them for a normal
/// pass; GemFilter's first pass needs only those up to its filter layer).
pub fn new_cache<B: Backend + 'static>(
    be: &B,
    c: &ModelConfig,
    capacity: usize,
    n_layers: usize,
) -> Result<Box<dyn KvState>> {
    let capacity = capacity.min(c.context);
    let layers =
        (0..n_layers.min(c.n_layers)).map(|_| be.kv_new(c.n_kv_heads, c.head_dim, capacity)).collect::<Result<_>>()?;
    Ok(Box::new(Cache::<B> { layers, len: 0, capacity, shift: 0 }))
}

fn cache_of<B: Backend + 'static>(cache: &mut dyn KvState) -> Result<&mut Cache<B>> {
    cache.as_any_mut().downcast_mut::<Cache<B>>().ok_or_else(|| Error::input("this cache belongs to another model"))
}

/// What a pass records or changes besides computing: the hooks the long-context
/// methods need (GemFilter stops early and reads one layer's query; SnapKV reads the
/// last queries of every layer; H2O accumulates attention weights per key).
#[derive(Debug, Default)]
pub struct Probe {
    /// Run layers `0..=stop_after` only and return no logits.
    pub stop_after: Option<usize>,
    /// Record the post-RoPE queries of the rows at cache index ≥ this.
    pub queries_from: Option<usize>,
    /// Record them only at this layer (default: every layer).
    pub queries_layer: Option<usize>,
    /// Per layer: recorded query rows, `n_heads · head_dim` values each, appended
    /// across passes.
    pub queries: Vec<Vec<f32>>,
    /// The attention scale of each recorded layer (to redo its softmax on the host).
    pub scales: Vec<f32>,
    /// When set, per layer and KV head: the softmax weight each cached key has received,
    /// summed over query rows and the heads of the group (H2O's "heavy hitter" score).
    /// Grown to the cache's length by the pass.
    pub mass: Option<Vec<Vec<Vec<f32>>>>,
    /// When set, the pass adds every row's final hidden state (after the final RMSNorm,
    /// where the output head would read it) to this sum, `dim` values (grown on first
    /// use), and skips the output head: a prompt embedding ([`crate::engine::Engine::embed`])
    /// costs the layers only, and needs no second copy of any model's code.
    pub hidden_sum: Option<Vec<f64>>,
    /// With `hidden_sum`: compute the logits as well (scoring and embedding a text in
    /// one pass, as `route train` does).
    pub keep_head: bool,
    /// Tokens in the current pass (set by the pass).
    pub rows: usize,
}

impl Probe {
    /// Whether layer `i` is past the stop.
    pub fn stops_before(&self, i: usize) -> bool {
        self.stop_after.is_some_and(|s| i > s)
    }

    /// Whether layer `i` of `n_layers` is an early stop: it only caches its keys and
    /// values (and records its queries); its attention output and feed-forward would
    /// feed no later layer and no logits.
    pub fn keys_only(&self, i: usize, n_layers: usize) -> bool {
        self.stop_after == Some(i) && i + 1 < n_layers && self.mass.is_none()
    }
}

/// One sequence's share of a batched pass: its cache and where its rows start.
pub struct Seg<'c, B: Backend> {
    pub cache: &'c mut Cache<B>,
    /// Cache row of the segment's first token (the cache's length before the pass).
    pub pos0: usize,
    /// Rows (tokens) of this segment; segments follow one another in the batch.
    pub rows: usize,
}

impl<B: Backend> Seg<'_, B> {
    /// The RoPE position of the segment's first token.
    pub fn rope0(&self) -> usize {
        self.pos0 + self.cache.shift
    }
}

/// Where an attention block runs: its layer and spec.
#[derive(Clone, Copy)]
pub struct At<'s> {
    pub layer: usize,
    pub spec: &'s AttnSpec,
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

fn params(c: &ModelConfig, s: &AttnSpec) -> AttnParams {
    AttnParams { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim, scale: s.scale, window: s.window }
}

/// A segment's cache of one layer.
fn layer_cache<'a, B: Backend>(seg: &'a mut Seg<'_, B>, layer: usize) -> Result<&'a mut B::Kv> {
    seg.cache.layers.get_mut(layer).ok_or_else(|| Error::input(format!("this cache holds no layer {layer}")))
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

    /// Projections over every row of the batch at once (the weights stream past once),
    /// then RoPE and attention per segment over its own cache.
    pub fn forward(
        &self,
        be: &B,
        c: &ModelConfig,
        at: At<'_>,
        h: &B::Tensor,
        segs: &mut [Seg<'_, B>],
        probe: &mut Probe,
    ) -> Result<Option<B::Tensor>> {
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
        let a = match segs {
            // One sequence: its tensors as they are, with the probe's hooks.
            [seg] => match self.attend(be, c, at, seg, q, k, &v, probe)? {
                Some(a) => a,
                None => return Ok(None),
            },
            _ => {
                if probe.queries_from.is_some() || probe.mass.is_some() {
                    return Err(Error::input("attention probes watch one sequence, not a batch"));
                }
                // Every row at its own sequence's position, all rows in one call.
                let pos: Vec<usize> = segs.iter().flat_map(|s| s.rope0()..s.rope0() + s.rows).collect();
                be.rope_at(&mut q, c.head_dim, &pos, at.spec.rope_base, at.spec.rope_style);
                be.rope_at(&mut k, c.head_dim, &pos, at.spec.rope_base, at.spec.rope_style);
                let mut jobs = Vec::with_capacity(segs.len());
                let mut off = 0;
                for seg in segs.iter_mut() {
                    let (qs, ks, vs) =
                        (be.rows(&q, off, seg.rows), be.rows(&k, off, seg.rows), be.rows(&v, off, seg.rows));
                    let (pos0, rows) = (seg.pos0, seg.rows);
                    let kv = layer_cache(seg, at.layer)?;
                    jobs.push(AttnJob { q: qs, k: ks, v: vs, kv, pos0 });
                    off += rows;
                }
                let parts = be.attention_batch(&mut jobs, params(c, at.spec))?;
                be.concat(&parts)
            }
        };
        Ok(Some(be.matmul(&a, &self.wo)))
    }

    /// RoPE and attention of one segment's rows over its cache; `None` where the probe
    /// stops at this layer ([`Probe::keys_only`]: the cache takes the keys, nothing is
    /// attended).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        be: &B,
        c: &ModelConfig,
        at: At<'_>,
        seg: &mut Seg<'_, B>,
        mut q: B::Tensor,
        mut k: B::Tensor,
        v: &B::Tensor,
        probe: &mut Probe,
    ) -> Result<Option<B::Tensor>> {
        let (s, pos0, rope0, rows) = (at.spec, seg.pos0, seg.rope0(), seg.rows);
        be.rope(&mut q, c.head_dim, rope0, s.rope_base, s.rope_style);
        be.rope(&mut k, c.head_dim, rope0, s.rope_base, s.rope_style);
        if let Some(from) = probe.queries_from {
            let first = from.max(pos0);
            if first < pos0 + rows && probe.queries_layer.is_none_or(|l| l == at.layer) {
                if probe.queries.len() <= at.layer {
                    probe.queries.resize(at.layer + 1, Vec::new());
                    probe.scales.resize(at.layer + 1, 0.0);
                }
                let tail = be.to_host(be.rows(&q, first - pos0, pos0 + rows - first));
                probe.queries[at.layer].extend_from_slice(&tail);
                probe.scales[at.layer] = s.scale;
            }
        }
        let p = params(c, s);
        let kv = layer_cache(seg, at.layer)?;
        if probe.keys_only(at.layer, c.n_layers) {
            be.kv_append(&q, &k, v, kv, pos0, p)?;
            return Ok(None);
        }
        match probe.mass.as_mut() {
            Some(mass) => {
                if mass.len() <= at.layer {
                    mass.resize(at.layer + 1, vec![Vec::new(); c.n_kv_heads]);
                }
                let m = &mut mass[at.layer];
                m.resize(c.n_kv_heads, Vec::new());
                be.attention_mass(&q, &k, v, kv, pos0, p, m).map(Some)
            }
            None => be.attention(&q, &k, v, kv, pos0, p).map(Some),
        }
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

/// What distinguishes one architecture: its layers (loaded and run), and how it scales
/// the embedding. Everything else a model needs is [`Transformer`]'s.
pub trait Architecture<B: Backend>: Sized + Send + Sync {
    fn load(l: &Loader<'_, B>, c: &ModelConfig) -> Result<Self>;
    /// Multiplies the embedding rows (Gemma: √dim).
    fn embed_scale(&self, _c: &ModelConfig) -> f32 {
        1.0
    }
    /// Run the layers over `x`, the rows of every segment one after another (each at its
    /// cache's rows `pos0..`), appending to each segment's cache, stopping and recording
    /// as `probe` says (probes watch a batch of one).
    fn layers(
        &self,
        be: &B,
        c: &ModelConfig,
        x: &mut B::Tensor,
        segs: &mut [Seg<'_, B>],
        probe: &mut Probe,
    ) -> Result<()>;
    /// Whether every layer attends to the whole cache (no sliding window): only then
    /// can a cache be compacted by evicting rows.
    fn global_attention(&self) -> bool {
        true
    }
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

impl<B: Backend + 'static, A: Architecture<B>> Transformer<B, A> {
    /// The pass every call shares: check each segment against its cache, embed the rows
    /// of all of them, run the layers once over the whole batch, then the final norm and
    /// output head over only the rows whose logits are wanted (none when the probe stops
    /// early). A failed pass leaves every cache as it was.
    fn run(&self, batch: &mut [Segment<'_>], probe: &mut Probe) -> Result<Vec<Vec<f32>>> {
        let (be, c) = (&self.backend, &self.config);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let early = probe.stop_after.is_some_and(|s| s + 1 < c.n_layers);
        let n = batch.len();
        if n == 0 {
            return Err(Error::input("an empty batch"));
        }
        let mut segs = Vec::with_capacity(n);
        let mut ids = Vec::new();
        let mut wanted = Vec::with_capacity(n);
        for (i, s) in batch.iter_mut().enumerate() {
            let which = if n > 1 { format!("sequence {i}: ") } else { String::new() };
            let cache = cache_of::<B>(&mut *s.cache)?;
            if s.ids.is_empty() {
                return Err(Error::input(format!("{which}no tokens to evaluate")));
            }
            if cache.len + s.ids.len() > cache.capacity {
                return Err(Error::input(format!(
                    "{which}{} tokens after {} cached exceed the context length {}",
                    s.ids.len(),
                    cache.len,
                    cache.capacity
                )));
            }
            ids.extend_from_slice(s.ids);
            wanted.push(s.logits);
            segs.push(Seg { pos0: cache.len, rows: s.ids.len(), cache });
        }
        let out = be.scope(|| -> Result<Vec<Vec<f32>>> {
            let mut x = be.embed(&self.embed, &ids, self.arch.embed_scale(c))?;
            self.arch.layers(be, c, &mut x, &mut segs, probe)?;
            if early {
                return Ok(vec![Vec::new(); n]);
            }
            if let Some(sum) = probe.hidden_sum.as_mut() {
                if n > 1 {
                    return Err(Error::input("a hidden-state probe watches one sequence, not a batch"));
                }
                let rows = be.to_host(be.rms_norm(&x, &self.out_norm, c.norm_eps));
                be.status()?;
                sum.resize(c.dim, 0.0);
                for row in rows.chunks_exact(c.dim) {
                    for (s, &v) in sum.iter_mut().zip(row) {
                        *s += v as f64;
                    }
                }
                if !probe.keep_head {
                    return Ok(vec![Vec::new(); n]);
                }
            }
            // (first row, rows) of each segment's logits, in batch order.
            let mut picks = Vec::with_capacity(n);
            let mut off = 0;
            for (seg, want) in segs.iter().zip(&wanted) {
                picks.push(match want {
                    None => (off, 0),
                    Some(Logits::Last) => (off + seg.rows - 1, 1),
                    Some(Logits::All) => (off, seg.rows),
                });
                off += seg.rows;
            }
            let total: usize = picks.iter().map(|p| p.1).sum();
            if total == 0 {
                be.status()?;
                return Ok(vec![Vec::new(); n]);
            }
            let x = if total == ids.len() {
                x
            } else if let [(start, rows)] = picks.iter().filter(|p| p.1 > 0).copied().collect::<Vec<_>>()[..] {
                be.rows(&x, start, rows)
            } else {
                let parts: Vec<_> =
                    picks.iter().filter(|p| p.1 > 0).map(|&(start, rows)| be.rows(&x, start, rows)).collect();
                be.concat(&parts)
            };
            let x = be.rms_norm(&x, &self.out_norm, c.norm_eps);
            let mut logits = be.to_host(be.matmul(&x, head));
            be.status()?;
            let vocab = logits.len() / total;
            let mut out = Vec::with_capacity(n);
            for &(_, rows) in picks.iter().rev() {
                out.push(logits.split_off(logits.len() - rows * vocab));
            }
            out.reverse();
            Ok(out)
        });
        match out {
            Ok(v) => {
                for seg in &mut segs {
                    seg.cache.len += seg.rows;
                }
                Ok(v)
            }
            Err(e) => {
                // No layer keeps a half-evaluated batch.
                for seg in &mut segs {
                    seg.cache.truncate(seg.pos0);
                }
                Err(e)
            }
        }
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
        new_cache(&self.backend, &self.config, capacity, self.config.n_layers)
    }

    fn new_partial_cache(&self, capacity: usize, n_layers: usize) -> Result<Box<dyn KvState>> {
        new_cache(&self.backend, &self.config, capacity, n_layers)
    }

    fn forward_probe(
        &self,
        cache: &mut dyn KvState,
        ids: &[u32],
        logits: Logits,
        probe: &mut Probe,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        if let Some(s) = probe.stop_after {
            if s >= c.n_layers {
                return Err(Error::input(format!("layer {s} does not exist: the model has {} layers", c.n_layers)));
            }
        }
        let n_cached = cache_of::<B>(cache)?.layers.len();
        if n_cached < probe.stop_after.map_or(c.n_layers, |s| s + 1) {
            return Err(Error::input(format!("this cache holds only {n_cached} layers")));
        }
        probe.rows = ids.len();
        let mut batch = [Segment { cache, ids, logits: Some(logits) }];
        Ok(self.run(&mut batch, probe)?.pop().unwrap_or_default())
    }

    fn forward_batch(&self, batch: &mut [Segment<'_>]) -> Result<Vec<Vec<f32>>> {
        self.run(batch, &mut Probe::default())
    }

    fn layer_keys(&self, cache: &mut dyn KvState, layer: usize) -> Result<Vec<f32>> {
        let cache = cache_of::<B>(cache)?;
        let kv = cache.layers.get(layer).ok_or_else(|| Error::input(format!("no cached layer {layer}")))?;
        self.backend.kv_keys(kv)
    }

    fn compact(&self, cache: &mut dyn KvState, keep: &[Vec<Vec<usize>>]) -> Result<Box<dyn KvState>> {
        if !self.arch.global_attention() {
            return Err(Error::input("this model has sliding-window layers: its cache cannot be compacted"));
        }
        let cache = cache_of::<B>(cache)?;
        if keep.len() != cache.layers.len() {
            return Err(Error::input("one selection per cached layer is needed"));
        }
        let mut rows = None;
        for heads in keep {
            if heads.len() != self.config.n_kv_heads {
                return Err(Error::input("one selection per KV head is needed"));
            }
            for h in heads {
                if *rows.get_or_insert(h.len()) != h.len() || h.iter().any(|&j| j >= cache.len) {
                    return Err(Error::input("every KV head must keep as many rows, each within the cache"));
                }
            }
        }
        let kept = rows.unwrap_or(0);
        let layers =
            cache.layers.iter().zip(keep).map(|(kv, k)| self.backend.kv_gather(kv, k)).collect::<Result<Vec<_>>>()?;
        let shift = cache.len + cache.shift - kept;
        Ok(Box::new(Cache::<B> { layers, len: kept, capacity: cache.capacity, shift }))
    }
}
