//! The backend interface: the few operations a transformer needs, over tensors the
//! backend owns. Model definitions are written once against this trait; a backend
//! (CPU, wgpu, CUDA) or a weight storage type never needs its own copy of a model.

pub mod cpu;
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;

use crate::error::{Error, Result};
use crate::weights::HostTensor;

/// Which backend runs a model (`--backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU backend (always available).
    #[default]
    Cpu,
    /// The wgpu backend on the first GPU adapter (an error if there is none).
    Wgpu,
    /// The CUDA backend on the first NVIDIA device (an error without driver or device).
    Cuda,
    /// CUDA if a device is present, else wgpu on a real GPU, else the CPU; any fallback
    /// is announced.
    Auto,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "wgpu" | "gpu" => Ok(BackendKind::Wgpu),
            "cuda" => Ok(BackendKind::Cuda),
            "auto" => Ok(BackendKind::Auto),
            _ => Err(format!("unknown backend {s:?} (cpu, cuda, wgpu or auto)")),
        }
    }
}

/// How RoPE pairs up the values of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent values (x[2i], x[2i+1]): llama.cpp's "normal" mode, used by the llama
    /// architecture in GGUF (its q/k weights are permuted at conversion time).
    Adjacent,
    /// The two halves of the head (x[i], x[i + d/2]): "neox" mode (Gemma, Qwen, ...).
    Halves,
}

/// Parameters of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k before the softmax (usually 1/√head_dim).
    pub scale: f32,
    /// Only keys within this many positions are visible (sliding-window layers).
    pub window: Option<usize>,
}

/// One segment's share of [`Backend::attention_batch`]: its rows of q, k, v (after
/// RoPE) and the cache they append to at `pos0`.
pub struct AttnJob<'a, B: Backend + ?Sized> {
    pub q: B::Tensor,
    pub k: B::Tensor,
    pub v: B::Tensor,
    pub kv: &'a mut B::Kv,
    pub pos0: usize,
}

/// The checks every backend's attention makes before appending `rows` positions at
/// `pos0` to a cache holding `len` of `capacity`.
pub(crate) fn check_append(pos0: usize, rows: usize, len: usize, capacity: usize) -> Result<()> {
    if pos0 != len {
        return Err(Error::input(format!("attention at position {pos0} but the cache holds {len}")));
    }
    if len + rows > capacity {
        return Err(Error::input(format!(
            "context is full: {len} cached + {rows} new positions exceed the context length {capacity}"
        )));
    }
    Ok(())
}

/// How many of the first `len` positions a cache holding `held` positions in `slots`
/// slots (a ring when `slots` is short of the context) can keep: the next query, at
/// `len`, must still find the keys its window reaches back to. Shared by the GPU caches.
pub(crate) fn ring_keepable(len: usize, held: usize, slots: usize, window: Option<usize>) -> usize {
    let len = len.min(held);
    let oldest = held.saturating_sub(slots);
    let needed = window.map_or(0, |w| (len + 1).saturating_sub(w));
    if needed < oldest {
        0
    } else {
        len
    }
}

/// RoPE's (cos, sin) pairs for `n` rows from `pos0`, `[row][head_dim / 2]`, angles in f64
/// as the CPU computes them: the GPU backends upload this table.
pub(crate) fn rope_table(pos0: usize, n: usize, hd: usize, base: f32) -> Vec<f32> {
    let half = hd / 2;
    let mut t = Vec::with_capacity(n * half * 2);
    for r in 0..n {
        for i in 0..half {
            let theta = (pos0 + r) as f64 * (base as f64).powf(-2.0 * i as f64 / hd as f64);
            let (sin, cos) = theta.sin_cos();
            t.extend([cos as f32, sin as f32]);
        }
    }
    t
}

/// One layer's cache, as the model sees it.
pub trait KvLayer: Send {
    /// How many of the first `len` positions this layer can still keep (a sliding-window
    /// layer may have dropped early ones; then 0: it must start over).
    fn keepable(&self, len: usize) -> usize;
    /// Forget every position from `len` on; returns the positions kept.
    fn truncate(&mut self, len: usize) -> usize;
}

/// A compute backend. Activations are 2-D, `[rows, cols]` row-major, one row per token.
pub trait Backend: Send + Sync {
    /// Activations living on the backend's device.
    type Tensor;
    /// A weight in its storage type, resident wherever the backend computes.
    type Weight: Send + Sync;
    /// One layer's key/value cache.
    type Kv: KvLayer;

    fn name(&self) -> String;

    /// Run a whole forward pass in the backend's execution context (the CPU backend's
    /// thread pool), so that the ops inside it dispatch without a thread hop each.
    fn scope<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// Prepare a weight for use (the CPU borrows the mapped bytes; a GPU uploads them).
    fn load_weight(&self, t: &HostTensor) -> Result<Self::Weight>;

    /// Prepare a BitStack matrix (its blocks stay in the mapping; the number in use can
    /// change between calls). Backends without BitStack kernels refuse it.
    fn load_stack(&self, w: &std::sync::Arc<crate::bitstack::StackWeight>) -> Result<Self::Weight> {
        Err(crate::error::Error::model(format!("{}: the {} backend cannot run BitStack weights", w.name, self.name())))
    }

    /// Host f32 values → a tensor of `rows` rows.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Self::Tensor;
    /// A tensor → host f32 values, row-major (consumed: the CPU hands its buffer over).
    fn to_host(&self, x: Self::Tensor) -> Vec<f32>;
    /// Rows `start..start + n` of `x`.
    fn rows(&self, x: &Self::Tensor, start: usize, n: usize) -> Self::Tensor;
    /// The rows of `parts`, one after another (every part has the same columns): a
    /// batch of sequences splits for attention and joins again for the next matmul.
    fn concat(&self, parts: &[Self::Tensor]) -> Self::Tensor;

    /// Rows of an embedding table (`[vocab, dim]`) for `ids`, times `scale`.
    fn embed(&self, table: &Self::Weight, ids: &[u32], scale: f32) -> Result<Self::Tensor>;
    /// `x W^T`: `[n, k] × [m, k]^T → [n, m]`, for a weight of any storage type.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Weight) -> Self::Tensor;
    /// Several matmuls of the same input (q/k/v, gate/up): one pass over `x`, one
    /// dispatch, so small decode steps do not pay the fixed cost of each.
    fn matmul_many(&self, x: &Self::Tensor, ws: &[&Self::Weight]) -> Vec<Self::Tensor> {
        ws.iter().map(|w| self.matmul(x, w)).collect()
    }
    /// Root-mean-square norm of each row of `x` (or of each `w.len()`-wide slice of it,
    /// for per-head norms), times the weight.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Weight, eps: f32) -> Self::Tensor;
    /// Rotate the heads of `x` in place; row `i` is at position `pos0 + i`.
    fn rope(&self, x: &mut Self::Tensor, head_dim: usize, pos0: usize, base: f32, style: RopeStyle);
    /// [`Backend::rope`] with row `i` at `pos[i]` (a batched step, whose segments each
    /// continue their own sequence): by default one call per run of consecutive positions.
    fn rope_at(&self, x: &mut Self::Tensor, head_dim: usize, pos: &[usize], base: f32, style: RopeStyle) {
        let mut runs = Vec::new();
        let mut start = 0;
        for i in 1..=pos.len() {
            if i == pos.len() || pos[i] != pos[i - 1] + 1 {
                let mut part = self.rows(x, start, i - start);
                self.rope(&mut part, head_dim, pos[start], base, style);
                runs.push(part);
                start = i;
            }
        }
        if runs.len() == 1 {
            *x = runs.remove(0);
        } else if !runs.is_empty() {
            *x = self.concat(&runs);
        }
    }
    /// `silu(gate) * up`.
    fn swiglu(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Self::Tensor;
    /// `gelu(gate) * up` (tanh approximation, as ggml).
    fn geglu(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Self::Tensor;
    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor);

    /// Errors the device reported since the last call. GPU work runs asynchronously, so
    /// a failed op (out of memory, a lost device) is noticed here, after the pass;
    /// backends that fail synchronously have nothing to report.
    fn status(&self) -> Result<()> {
        Ok(())
    }

    /// An empty cache for up to `capacity` positions.
    fn kv_new(&self, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<Self::Kv>;
    /// Append `k`, `v` (rows at positions `pos0..`) to the cache, then causal attention of
    /// `q` over everything cached so far. `pos0` must equal the cache's length.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        kv: &mut Self::Kv,
        pos0: usize,
        p: AttnParams,
    ) -> Result<Self::Tensor>;

    /// Append `k`, `v` to the cache without attending: a pass that stops at this layer
    /// (GemFilter's first) needs its keys, not its output. The default attends and
    /// drops the result; `q` is the layer's query rows.
    #[allow(clippy::too_many_arguments)]
    fn kv_append(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        kv: &mut Self::Kv,
        pos0: usize,
        p: AttnParams,
    ) -> Result<()> {
        self.attention(q, k, v, kv, pos0, p).map(|_| ())
    }

    /// [`Backend::attention`] of every segment of a batched step, each over its own
    /// cache, with the parameters of one layer. A backend may run them at once: decode
    /// steps of short contexts are too small to split one segment across threads.
    fn attention_batch(&self, jobs: &mut [AttnJob<'_, Self>], p: AttnParams) -> Result<Vec<Self::Tensor>> {
        jobs.iter_mut().map(|j| self.attention(&j.q, &j.k, &j.v, j.kv, j.pos0, p)).collect()
    }

    /// [`Backend::attention`], also adding to `mass[g][j]` the softmax weight key `j` of
    /// KV group `g` received, summed over the query rows and the group's heads (H2O's
    /// accumulated attention). The model grows each `mass[g]` to the cache's length.
    #[allow(clippy::too_many_arguments)]
    fn attention_mass(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        kv: &mut Self::Kv,
        pos0: usize,
        p: AttnParams,
        mass: &mut [Vec<f32>],
    ) -> Result<Self::Tensor> {
        let _ = (q, k, v, kv, pos0, p, mass);
        Err(Error::model(format!("the {} backend does not report attention weights", self.name())))
    }
    /// The cached (post-RoPE) keys, `[row][n_kv_heads · head_dim]`, on the host.
    fn kv_keys(&self, kv: &Self::Kv) -> Result<Vec<f32>> {
        let _ = kv;
        Err(Error::model(format!("the {} backend cannot read its cache back", self.name())))
    }
    /// A cache holding, for each KV head `g`, the rows `keep[g]` of `kv` (every head keeps
    /// as many rows; the caller checked the indices).
    fn kv_gather(&self, kv: &Self::Kv, keep: &[Vec<usize>]) -> Result<Self::Kv> {
        let _ = (kv, keep);
        Err(Error::model(format!("the {} backend cannot compact its cache", self.name())))
    }
}
