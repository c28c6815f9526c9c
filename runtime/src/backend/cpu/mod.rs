//! The CPU backend: the always-available reference, multi-threaded on a persistent pool.
//!
//! Weights stay in the mapped file in their storage type (or, for the types with
//! repacked kernels, in an 8-row interleaved copy made at load); the integer kernels
//! take 8-bit activations, the reference path dequantizes to f32.

mod attention;
pub mod bitstack;
pub mod kernels;
mod matmul;
mod ops;
pub mod scratch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::{AttnJob, AttnParams, Backend, KvLayer, RopeStyle};
use crate::bitstack::StackWeight;
use crate::error::{Error, Result};
use crate::weights::HostTensor;

/// Row-major f32 activations; their buffers go back to [`scratch`] when dropped.
#[derive(Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Clone for CpuTensor {
    fn clone(&self) -> Self {
        CpuTensor { data: scratch::copy_of(&self.data), rows: self.rows, cols: self.cols }
    }
}

impl Drop for CpuTensor {
    fn drop(&mut self) {
        scratch::recycle(std::mem::take(&mut self.data));
    }
}

/// A weight borrowed from the mapping; small 1-D tensors (norms) are kept as f32, and
/// matrices with repacked kernels are copied once into the 8-row layout.
pub struct CpuWeight {
    pub host: HostTensor,
    vector: Option<Vec<f32>>,
    packed: Option<Vec<u8>>,
    /// A BitStack matrix (then `host` is only its name and shape).
    stack: Option<Arc<StackWeight>>,
}

impl CpuWeight {
    fn vector(&self) -> &[f32] {
        self.vector.as_deref().unwrap_or(&[])
    }
}

/// Cached keys or values: f16 on the fast path (half the memory of f32, and what
/// llama.cpp stores), f32 on the reference path.
enum KvData {
    F16(Vec<half::f16>),
    F32(Vec<f32>),
}

impl KvData {
    fn push(&mut self, x: &[f32]) {
        match self {
            KvData::F16(v) => v.extend(x.iter().map(|&x| half::f16::from_f32(x))),
            KvData::F32(v) => v.extend_from_slice(x),
        }
    }

    fn truncate(&mut self, n: usize) {
        match self {
            KvData::F16(v) => v.truncate(n),
            KvData::F32(v) => v.truncate(n),
        }
    }

    /// Drop the first `n` values.
    fn drop_front(&mut self, n: usize) {
        match self {
            KvData::F16(v) => drop(v.drain(..n)),
            KvData::F32(v) => drop(v.drain(..n)),
        }
    }

    /// Values `range` as f32.
    fn to_f32(&self, range: std::ops::Range<usize>) -> Vec<f32> {
        match self {
            KvData::F16(v) => {
                use half::slice::HalfFloatSliceExt;
                let mut out = scratch::zeroed(range.len());
                // Long prompts convert megabytes per layer: on every thread of the pool.
                const CHUNK: usize = 1 << 16;
                out.par_chunks_mut(CHUNK).zip(v[range].par_chunks(CHUNK)).for_each(|(o, h)| h.convert_to_f32_slice(o));
                out
            }
            KvData::F32(v) => scratch::copy_of(&v[range]),
        }
    }
}

/// A layer's cache as `[position][kv_heads * head_dim]` for positions `start..len`,
/// grown as positions arrive so that a short chat does not pay for the whole context. A
/// sliding-window layer drops the positions no later query can see, so its memory stays
/// bounded by about twice the window however long the sequence grows.
pub struct CpuKv {
    k: KvData,
    v: KvData,
    /// First position still held (0 unless a sliding window dropped older ones).
    start: usize,
    len: usize,
    capacity: usize,
    width: usize,
    /// The window of the slides so far (a layer that never slid holds everything).
    window: Option<usize>,
}

impl CpuKv {
    /// Whether a query at position `len` would find every key its window shows: a
    /// truncation back past a slide would silently attend without the dropped keys.
    fn holds_window_of(&self, len: usize) -> bool {
        self.start == 0 || self.window.is_some_and(|w| (len + 1).saturating_sub(w) >= self.start)
    }

    /// Cache `k`, `v` (rows at positions `pos0..`) after what it holds.
    fn append(&mut self, k: &CpuTensor, v: &CpuTensor, pos0: usize) -> Result<()> {
        super::check_append(pos0, k.rows, self.len, self.capacity)?;
        self.k.push(&k.data);
        self.v.push(&v.data);
        self.len += k.rows;
        Ok(())
    }

    /// After positions up to `len` are cached, forget those a window of `w` hides from
    /// every later query; in batches of at least a window, so the shift is amortised.
    fn slide(&mut self, w: usize) {
        self.window = Some(w);
        let invisible = (self.len + 1).saturating_sub(w);
        if invisible >= self.start + w {
            let n = (invisible - self.start) * self.width;
            self.k.drop_front(n);
            self.v.drop_front(n);
            self.start = invisible;
        }
    }
}

impl KvLayer for CpuKv {
    fn truncate(&mut self, len: usize) -> usize {
        if !self.holds_window_of(len) {
            // Keys the next query needs are gone: nothing earlier can be kept.
            self.k.truncate(0);
            self.v.truncate(0);
            (self.start, self.len) = (0, 0);
            return 0;
        }
        self.len = self.len.min(len);
        self.k.truncate((self.len - self.start) * self.width);
        self.v.truncate((self.len - self.start) * self.width);
        self.len
    }

    fn keepable(&self, len: usize) -> usize {
        if !self.holds_window_of(len) {
            0
        } else {
            len.min(self.len)
        }
    }
}

pub struct CpuBackend {
    pool: rayon::ThreadPool,
    threads: usize,
    /// `None`: the f32 reference path (weights dequantized, activations exact).
    isa: Option<kernels::Isa>,
    /// Calibration: per weight, the sum over calls of each input channel's L2 norm over
    /// the call's tokens, and the number of calls.
    recorder: Option<Arc<Recorder>>,
    /// The angles of the last RoPE calls, newest first: every layer rotates the same
    /// positions (q and k, two bases on Gemma), so a step computes them once.
    rope_cache: Mutex<Vec<RopeAngles>>,
}

/// (cos, sin) of every pair of `head_dim` for each of `pos`, under `base`.
struct RopeAngles {
    head_dim: usize,
    base: u32,
    pos: Vec<usize>,
    cs: Vec<(f32, f32)>,
}

/// Below this many values an element-wise op (RoPE, gated activations) runs on the
/// calling thread: a decode step's few rows take less time than waking the pool.
const PARALLEL_ELEMS: usize = 1 << 15;

/// Bases a step may alternate between (Gemma's local and global layers).
const ROPE_CACHED: usize = 2;

/// Input-channel statistics of every matmul and norm, by weight name (BitStack calibration).
pub type Recorder = Mutex<HashMap<String, (Vec<f64>, usize)>>;

impl CpuBackend {
    /// A backend that records, for each weight, the L2 norm over tokens of every input
    /// channel at each call (activation-aware scaling in `cairn stack`).
    pub fn recording(threads: usize) -> Result<(Self, Arc<Recorder>)> {
        let mut b = Self::new(threads)?;
        let rec = Arc::new(Mutex::new(HashMap::new()));
        b.recorder = Some(rec.clone());
        Ok((b, rec))
    }

    fn record(&self, x: &CpuTensor, w: &CpuWeight) {
        let Some(rec) = &self.recorder else { return };
        let mut norms = vec![0f64; x.cols];
        for row in x.data.chunks_exact(x.cols) {
            for (n, &v) in norms.iter_mut().zip(row) {
                *n += (v as f64) * (v as f64);
            }
        }
        if let Ok(mut map) = rec.lock() {
            let e = map.entry(w.host.name.clone()).or_insert_with(|| (vec![0f64; x.cols], 0));
            e.0.iter_mut().zip(&norms).for_each(|(s, n)| *s += n.sqrt());
            e.1 += 1;
        }
    }

    /// A backend with `threads` workers (0: one per available core), using the best
    /// integer kernels of this CPU.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_isa(threads, Some(kernels::Isa::detect()))
    }

    /// The f32 reference: every weight dequantized, activations never quantized. Slow,
    /// but equal to a plain f32 evaluation up to summation order.
    pub fn reference(threads: usize) -> Result<Self> {
        Self::with_isa(threads, None)
    }

    pub fn with_isa(threads: usize, isa: Option<kernels::Isa>) -> Result<Self> {
        let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cairn-cpu-{i}"))
            .build()
            .map_err(|e| Error::model(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend { pool, threads, isa, recorder: None, rope_cache: Mutex::new(Vec::new()) })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }
}

/// `CAIRN_NO_REPACK=1` keeps every weight in its file layout (for comparisons).
fn no_repack() -> bool {
    std::env::var_os("CAIRN_NO_REPACK").is_some_and(|v| v != "0")
}

impl CpuBackend {
    /// `act(gate) · up`, split across threads when there are several rows (a batched
    /// decode step's feed-forward is thousands of exponentials).
    fn gated(&self, gate: &CpuTensor, up: &CpuTensor, act_mul: impl Fn(&mut [f32], &[f32]) + Sync) -> CpuTensor {
        let mut out = gate.clone();
        if gate.data.len() < PARALLEL_ELEMS {
            act_mul(&mut out.data, &up.data);
        } else {
            let cols = gate.cols;
            self.pool.install(|| {
                out.data.par_chunks_mut(cols).zip(up.data.par_chunks(cols)).for_each(|(o, u)| act_mul(o, u))
            });
        }
        out
    }
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Weight = CpuWeight;
    type Kv = CpuKv;

    fn name(&self) -> String {
        let isa = self.isa.map_or("f32 reference", |i| i.name());
        format!("cpu {isa} ({} threads)", self.threads)
    }

    fn scope<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let r = self.pool.install(f);
        // A pass's buffers serve its later layers; between passes they are not held.
        scratch::trim();
        r
    }

    fn load_weight(&self, t: &HostTensor) -> Result<CpuWeight> {
        let vector = if t.dims.len() == 1 { Some(t.to_f32()?) } else { None };
        let packed = match self.isa {
            Some(isa) if kernels::has_packed(isa) && t.dims.len() == 2 && !no_repack() => {
                // The source pages leave as their rows are copied: a large table (a tied
                // embedding) is never resident twice.
                let rb = t.row_bytes();
                self.pool.install(|| {
                    kernels::repack::repack_with(t.ty, t.bytes(), t.rows(), rb, |r| t.release_prefix(r * rb))
                })
            }
            _ => None,
        };
        if packed.is_some() {
            // The repacked copy replaces the mapped bytes for matmuls; only embedding
            // lookups still read the mapping, a row at a time.
            t.release_pages();
        }
        Ok(CpuWeight { host: t.clone(), vector, packed, stack: None })
    }

    fn load_stack(&self, w: &Arc<StackWeight>) -> Result<CpuWeight> {
        w.set_dense_builder(bitstack::dense_copy);
        let dims = [w.shape.n as u64, w.shape.m as u64];
        let host = w.placeholder(&dims);
        Ok(CpuWeight { host, vector: None, packed: None, stack: Some(w.clone()) })
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> CpuTensor {
        assert_eq!(data.len(), rows * cols, "upload: shape does not match data");
        CpuTensor { data: scratch::copy_of(data), rows, cols }
    }

    fn to_host(&self, mut x: CpuTensor) -> Vec<f32> {
        std::mem::take(&mut x.data)
    }

    fn rows(&self, x: &CpuTensor, start: usize, n: usize) -> CpuTensor {
        let data = scratch::copy_of(&x.data[start * x.cols..(start + n) * x.cols]);
        CpuTensor { data, rows: n, cols: x.cols }
    }

    fn concat(&self, parts: &[CpuTensor]) -> CpuTensor {
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(parts.iter().all(|p| p.cols == cols), "concat: parts of different widths");
        let mut data = scratch::zeroed(parts.iter().map(|p| p.data.len()).sum());
        let mut at = 0;
        for p in parts {
            data[at..at + p.data.len()].copy_from_slice(&p.data);
            at += p.data.len();
        }
        CpuTensor { data, rows: parts.iter().map(|p| p.rows).sum(), cols }
    }

    fn embed(&self, table: &CpuWeight, ids: &[u32], scale: f32) -> Result<CpuTensor> {
        let (vocab, dim) = (table.host.rows(), table.host.cols());
        let rb = table.host.row_bytes();
        let mut out = scratch::zeroed(ids.len() * dim);
        for (row, &id) in out.chunks_mut(dim).zip(ids) {
            if id as usize >= vocab {
                return Err(Error::input(format!("token id {id} is outside the vocabulary of {vocab}")));
            }
            let id = id as usize;
            let ty = table.host.ty;
            let done = match &table.packed {
                Some(p) => cairn_formats::quant::dequantize(ty, &kernels::repack::row(ty, p, rb, id), row),
                None => cairn_formats::quant::dequantize(ty, &table.host.bytes()[id * rb..(id + 1) * rb], row),
            };
            done.map_err(|e| Error::model(format!("{}: {e}", table.host.name)))?;
            if scale != 1.0 {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(CpuTensor { data: out, rows: ids.len(), cols: dim })
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuWeight) -> CpuTensor {
        self.record(x, w);
        if let Some(s) = &w.stack {
            return self.pool.install(|| bitstack::matmul(x, s, self.isa));
        }
        self.pool.install(|| matmul::matmul(x, w, self.isa, self.threads))
    }

    fn matmul_many(&self, x: &CpuTensor, ws: &[&CpuWeight]) -> Vec<CpuTensor> {
        let stacks: Option<Vec<&StackWeight>> = ws.iter().map(|w| w.stack.as_deref()).collect();
        if let (None, Some(stacks)) = (&self.recorder, stacks) {
            return self.pool.install(|| bitstack::matmul_many(x, &stacks, self.isa));
        }
        if self.recorder.is_some() || ws.iter().any(|w| w.stack.is_some()) {
            return ws.iter().map(|w| self.matmul(x, w)).collect();
        }
        self.pool.install(|| matmul::matmul_many(x, ws, self.isa, self.threads))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuWeight, eps: f32) -> CpuTensor {
        // Calibration: a norm's input is the residual stream, whose energy scales how
        // much an error written into it matters (BitStack's ordering proxy).
        self.record(x, w);
        let w = w.vector();
        let mut out = x.clone();
        // A decode step's single row is too little work to hand to another thread.
        if x.rows == 1 {
            out.data.chunks_mut(w.len()).for_each(|row| ops::rms_norm(row, w, eps));
            return out;
        }
        self.pool.install(|| {
            out.data.par_chunks_mut(w.len()).for_each(|row| ops::rms_norm(row, w, eps));
        });
        out
    }

    fn rope(&self, x: &mut CpuTensor, head_dim: usize, pos0: usize, base: f32, style: RopeStyle) {
        let pos: Vec<usize> = (pos0..pos0 + x.rows).collect();
        self.rope_at(x, head_dim, &pos, base, style)
    }

    fn rope_at(&self, x: &mut CpuTensor, head_dim: usize, pos: &[usize], base: f32, style: RopeStyle) {
        assert_eq!(pos.len(), x.rows, "rope_at: one position per row");
        let half = head_dim / 2;
        // The lock is not held while the rows are rotated: a pool worker waiting inside
        // `install` may run another caller's pass, whose RoPE would then wait for a lock
        // that its own thread holds (two threads sharing one engine deadlocked so).
        let hit = {
            let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
            let i = cache.iter().position(|a| a.head_dim == head_dim && a.base == base.to_bits() && a.pos == pos);
            i.map(|i| cache.remove(i))
        };
        let entry = match hit {
            Some(entry) => entry,
            None => {
                let mut cs = vec![(0f32, 0f32); pos.len() * half];
                for (&p, c) in pos.iter().zip(cs.chunks_exact_mut(half.max(1))) {
                    ops::rope_angles(head_dim, p, base, c);
                }
                RopeAngles { head_dim, base: base.to_bits(), pos: pos.to_vec(), cs }
            }
        };
        let (cols, cs) = (x.cols, &entry.cs);
        if x.data.len() < PARALLEL_ELEMS {
            for (row, c) in x.data.chunks_exact_mut(cols).zip(cs.chunks(half.max(1))) {
                ops::rope_apply(row, head_dim, c, style);
            }
        } else {
            self.pool.install(|| {
                x.data
                    .par_chunks_mut(cols)
                    .zip(cs.par_chunks(half.max(1)))
                    .for_each(|(row, c)| ops::rope_apply(row, head_dim, c, style));
            });
        }
        let mut cache = self.rope_cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(0, entry);
        cache.truncate(ROPE_CACHED);
    }

    fn swiglu(&self, gate: &CpuTensor, up: &CpuTensor) -> CpuTensor {
        match self.isa {
            Some(isa) => self.gated(gate, up, |o, u| kernels::act::silu_mul(isa, o, u)),
            // The reference path keeps libm's exp.
            None => self.gated(gate, up, |o, u| o.iter_mut().zip(u).for_each(|(g, u)| *g = ops::silu(*g) * u)),
        }
    }

    fn geglu(&self, gate: &CpuTensor, up: &CpuTensor) -> CpuTensor {
        match self.isa {
            Some(isa) => self.gated(gate, up, |o, u| kernels::act::gelu_mul(isa, o, u)),
            // The reference path keeps libm's tanh.
            None => self.gated(gate, up, |o, u| o.iter_mut().zip(u).for_each(|(g, u)| *g = ops::gelu(*g) * u)),
        }
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) {
        x.data.iter_mut().zip(&y.data).for_each(|(a, b)| *a += b);
    }

    fn kv_new(&self, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Result<CpuKv> {
        let data = || if self.isa.is_some() { KvData::F16(Vec::new()) } else { KvData::F32(Vec::new()) };
        Ok(CpuKv { k: data(), v: data(), start: 0, len: 0, capacity, width: n_kv_heads * head_dim, window: None })
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        kv: &mut CpuKv,
        pos0: usize,
        p: AttnParams,
    ) -> Result<CpuTensor> {
        kv.append(k, v, pos0)?;
        let out = self.pool.install(|| attention::attention(q, kv, pos0, &p, self.isa, None));
        if let Some(w) = p.window {
            kv.slide(w);
        }
        Ok(out)
    }

    fn kv_append(
        &self,
        _q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        kv: &mut CpuKv,
        pos0: usize,
        p: AttnParams,
    ) -> Result<()> {
        kv.append(k, v, pos0)?;
        if let Some(w) = p.window {
            kv.slide(w);
        }
        Ok(())
    }

    fn attention_batch(&self, jobs: &mut [AttnJob<'_, Self>], p: AttnParams) -> Result<Vec<CpuTensor>> {
        // Segments own their caches, so they run side by side.
        self.pool.install(|| jobs.par_iter_mut().map(|j| self.attention(&j.q, &j.k, &j.v, j.kv, j.pos0, p)).collect())
    }

    fn attention_mass(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        kv: &mut CpuKv,
        pos0: usize,
        p: AttnParams,
        mass: &mut [Vec<f32>],
    ) -> Result<CpuTensor> {
        if p.window.is_some() || kv.start != 0 || mass.len() != p.n_kv_heads {
            return Err(Error::input("attention weights are only reported for global attention, per KV head"));
        }
        if pos0 != kv.len || kv.len + q.rows > kv.capacity {
            return self.attention(q, k, v, kv, pos0, p);
        }
        kv.append(k, v, pos0)?;
        for m in mass.iter_mut() {
            m.resize(kv.len, 0.0);
        }
        let cells: Vec<std::sync::Mutex<&mut Vec<f32>>> = mass.iter_mut().map(std::sync::Mutex::new).collect();
        Ok(self.pool.install(|| attention::attention(q, kv, pos0, &p, self.isa, Some(&cells))))
    }

    fn kv_keys(&self, kv: &CpuKv) -> Result<Vec<f32>> {
        if kv.start != 0 {
            return Err(Error::input("this layer's cache has dropped positions (sliding window)"));
        }
        Ok(kv.k.to_f32(0..kv.len * kv.width))
    }

    fn kv_gather(&self, kv: &CpuKv, keep: &[Vec<usize>]) -> Result<CpuKv> {
        if kv.start != 0 || keep.is_empty() || !kv.width.is_multiple_of(keep.len()) {
            return Err(Error::input("cannot compact this cache"));
        }
        let hd = kv.width / keep.len();
        let rows = keep[0].len();
        let gather = |src: &KvData| -> KvData {
            macro_rules! go {
                ($v:expr, $variant:ident) => {{
                    let mut out = Vec::with_capacity(rows * kv.width);
                    for i in 0..rows {
                        for (g, idx) in keep.iter().enumerate() {
                            let at = idx[i] * kv.width + g * hd;
                            out.extend_from_slice(&$v[at..at + hd]);
                        }
                    }
                    KvData::$variant(out)
                }};
            }
            match src {
                KvData::F16(v) => go!(v, F16),
                KvData::F32(v) => go!(v, F32),
            }
        };
        Ok(CpuKv {
            k: gather(&kv.k),
            v: gather(&kv.v),
            start: 0,
            len: rows,
            capacity: kv.capacity,
            width: kv.width,
            window: kv.window,
        })
    }
}
