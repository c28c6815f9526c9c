//! Causal grouped-query attention over the cache.
//!
//! On the fast path the roundings follow llama.cpp's CPU path (flash attention off):
//! keys and values are stored in f16, the query is rounded to f16 before q·k, and the
//! softmax weights are rounded to f16 before they multiply the values. Matching them
//! keeps Cairn's logits within llama.cpp's own batch-to-batch noise. The reference
//! path keeps everything in f32.

use half::f16;
use std::sync::Mutex;

use rayon::prelude::*;

use super::kernels::{self, attn, Isa};
use super::{scratch, CpuKv, CpuTensor, KvData};
use crate::backend::AttnParams;

fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `q` holds rows at positions `pos0..`; the cache already contains them.
/// `isa`: `None` is the f32 reference (no f16 roundings, scalar loops).
/// `mass`: where present, each key's softmax weight is added to `mass[group][key]`
/// (the cache must start at row 0).
pub fn attention(
    q: &CpuTensor,
    kv: &CpuKv,
    pos0: usize,
    p: &AttnParams,
    isa: Option<Isa>,
    mass: Option<&[Mutex<&mut Vec<f32>>]>,
) -> CpuTensor {
    let f16_rounding = isa.is_some();
    let isa = isa.unwrap_or(Isa::Scalar);
    let round = |x: f32| if f16_rounding { round_f16(x) } else { x };
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let width = kv.width;
    let n_ctx = kv.len;
    // Never before what the cache still holds (a window only drops what is invisible).
    let first_visible = p.window.map_or(0, |w| (pos0 + 1).saturating_sub(w)).max(kv.start);
    if let (1, KvData::F16(k), KvData::F16(v)) = (q.rows, &kv.k, &kv.v) {
        return decode_f16(q, kv, (k, v), first_visible..n_ctx, p, isa, mass);
    }
    if f16_rounding && hd.is_multiple_of(attn::TK) && matches!(kv.k, KvData::F16(_)) {
        return batch_tiled(q, kv, pos0, first_visible, p, isa, mass);
    }
    // The visible cache in f32, converted once per call rather than once per query.
    let span = (first_visible - kv.start) * width..(n_ctx - kv.start) * width;
    let keys = kv.k.to_f32(span.clone());
    let values = kv.v.to_f32(span);
    let base = first_visible;
    let mut out = scratch::zeroed(q.rows * p.n_heads * hd);
    // One task per (query row, head): independent, and enough of them to fill threads.
    // A short decode step is cheaper on the calling thread than split across threads.
    let work = q.rows * p.n_heads * (n_ctx - first_visible);
    let task = |(idx, o): (usize, &mut [f32])| {
        let (t, h) = (idx / p.n_heads, idx % p.n_heads);
        let pos = pos0 + t;
        let g = h / group;
        let qh: Vec<f32> = q.data[t * q.cols + h * hd..t * q.cols + (h + 1) * hd].iter().map(|&x| round(x)).collect();
        let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let at = |j: usize| (j - base) * width + g * hd;
        let mut scores: Vec<f32> =
            (first..=pos).map(|j| kernels::dot_f32(isa, &qh, &keys[at(j)..at(j) + hd]) * p.scale).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        if let Some(m) = mass {
            // A poisoned lock only means another task panicked; its sums are still valid.
            let mut m = m[g].lock().unwrap_or_else(|e| e.into_inner());
            for (j, s) in (first..=pos).zip(&scores) {
                m[j] += s * inv;
            }
        }
        for (j, s) in (first..=pos).zip(&scores) {
            kernels::axpy(isa, o, round(s * inv), &values[at(j)..at(j) + hd]);
        }
    };
    if work < 4096 {
        out.chunks_mut(hd).enumerate().for_each(task);
    } else {
        out.par_chunks_mut(hd).enumerate().for_each(task);
    }
    CpuTensor { data: out, rows: q.rows, cols: p.n_heads * hd }
}

/// One decode step over the f16 cache: each KV group's heads are scored together, so
/// every cached key and value is read and converted once per step.
fn decode_f16(
    q: &CpuTensor,
    kv: &CpuKv,
    (k, v): (&[f16], &[f16]),
    span: std::ops::Range<usize>,
    p: &AttnParams,
    isa: Isa,
    mass: Option<&[Mutex<&mut Vec<f32>>]>,
) -> CpuTensor {
    let (width, start) = (kv.width, kv.start);
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let mut out = scratch::zeroed(p.n_heads * hd);
    let n = span.len();
    let task = |(g, o): (usize, &mut [f32])| {
        let mut qs = q.data[g * group * hd..(g + 1) * group * hd].to_vec();
        kernels::round_f16_slice(isa, &mut qs);
        let at = (span.start - start) * width + g * hd;
        let mut scores = vec![0f32; group * n];
        kernels::scores_f16(isa, &qs, group, hd, &k[at..], width, n, p.scale, &mut scores);
        for s in scores.chunks_mut(n) {
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let inv = 1.0 / attn::softmax_exp(isa, s, max);
            s.iter_mut().for_each(|x| *x *= inv);
            if let Some(m) = mass {
                let mut m = m[g].lock().unwrap_or_else(|e| e.into_inner());
                for (j, x) in span.clone().zip(s.iter()) {
                    m[j] += *x;
                }
            }
            kernels::round_f16_slice(isa, s);
        }
        kernels::values_f16(isa, &scores, group, hd, &v[at..], width, n, o);
    };
    // Short contexts are cheaper on the calling thread than split across threads.
    if span.len() * p.n_heads < 4096 {
        out.chunks_mut(group * hd).enumerate().for_each(task);
    } else {
        out.par_chunks_mut(group * hd).enumerate().for_each(task);
    }
    CpuTensor { data: out, rows: 1, cols: p.n_heads * hd }
}

/// Queries per task of [`batch_tiled`]: several register tiles share each key block.
const QT: usize = 4 * attn::TQ;
/// Keys per block: a block of transposed keys (and of values) stays in L2 across tiles.
const KB: usize = 256;

/// A batch of queries over the f16 cache as small GEMMs: queries × transposed keys, a
/// vectorized softmax per row, weights × values. Same roundings as the per-query path
/// (q and the normalized weights in f16); only the order of the f32 sums differs.
fn batch_tiled(
    q: &CpuTensor,
    kv: &CpuKv,
    pos0: usize,
    first_visible: usize,
    p: &AttnParams,
    isa: Isa,
    mass: Option<&[Mutex<&mut Vec<f32>>]>,
) -> CpuTensor {
    use half::slice::HalfFloatSliceExt;
    let (hd, width, base) = (p.head_dim, kv.width, first_visible);
    let group = p.n_heads / p.n_kv_heads;
    let nk = kv.len - base;
    // One spare tile per row: rows a power of two apart would share L1 sets.
    let stride = nk.div_ceil(attn::TK) * attn::TK + attn::TK;
    let span = (base - kv.start) * width..(kv.len - kv.start) * width;
    let keys = kv.k.to_f32(span.clone());
    let values = kv.v.to_f32(span);
    // Keys transposed per KV head, `[g][d][stride]`, zero padded to whole tiles.
    let mut kt = scratch::zeroed(p.n_kv_heads * hd * stride);
    kt.par_chunks_mut(hd * stride).enumerate().for_each(|(g, kt)| {
        for (j, row) in keys.chunks_exact(width).enumerate() {
            for (d, &x) in row[g * hd..(g + 1) * hd].iter().enumerate() {
                kt[d * stride + j] = x;
            }
        }
    });
    // The visible keys of query `pos`, relative to `base`.
    let visible = |pos: usize| {
        let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w)).max(base);
        first - base..pos + 1 - base
    };
    let tiles = q.rows.div_ceil(QT);
    let mut out = scratch::zeroed(q.rows * p.n_heads * hd);
    let results: Vec<(usize, usize, Vec<f32>)> = (0..p.n_heads * tiles)
        .into_par_iter()
        .map(|task| {
            let (h, tile) = (task / tiles, task % tiles);
            let g = h / group;
            let t0 = tile * QT;
            let rows = QT.min(q.rows - t0);
            // Keys any row of the tile sees, the start aligned down to a register tile.
            let lo = visible(pos0 + t0).start / attn::TK * attn::TK;
            let hi = visible(pos0 + t0 + rows - 1).end;
            let n = hi - lo;
            let sstride = n.div_ceil(attn::TK) * attn::TK;
            let mut qt = vec![0f32; QT * hd];
            for t in 0..rows {
                let src = &q.data[(t0 + t) * q.cols + h * hd..(t0 + t) * q.cols + (h + 1) * hd];
                qt[t * hd..(t + 1) * hd].iter_mut().zip(src).for_each(|(d, &x)| *d = round_f16(x));
            }
            let kt = &kt[g * hd * stride + lo..];
            let mut s = scratch::zeroed(QT * sstride);
            for j in (0..n).step_by(KB) {
                let len = KB.min(n - j);
                for r in (0..rows).step_by(attn::TQ) {
                    let q = &qt[r * hd..(r + attn::TQ) * hd];
                    attn::scores(isa, q, &kt[j..], stride, hd, len, p.scale, &mut s[r * sstride + j..], sstride);
                }
            }
            let mut rounded = vec![f16::ZERO; n];
            for t in 0..QT {
                let row = &mut s[t * sstride..(t + 1) * sstride];
                if t >= rows {
                    row.fill(0.0);
                    continue;
                }
                let vis = visible(pos0 + t0 + t);
                let (a, b) = (vis.start - lo, vis.end - lo);
                row[..a].fill(0.0);
                row[b..].fill(0.0);
                let live = &mut row[a..b];
                let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let inv = 1.0 / attn::softmax_exp(isa, live, max);
                live.iter_mut().for_each(|x| *x *= inv);
                if let Some(m) = mass {
                    let mut m = m[g].lock().unwrap_or_else(|e| e.into_inner());
                    for (x, w) in m[base + lo + a..base + lo + b].iter_mut().zip(live.iter()) {
                        *x += w;
                    }
                }
                rounded[..b - a].convert_from_f32_slice(live);
                rounded[..b - a].convert_to_f32_slice(live);
            }
            let mut o = vec![0f32; QT * hd];
            let v = &values[lo * width + g * hd..];
            for j in (0..n).step_by(KB) {
                let len = KB.min(n - j);
                for r in (0..rows).step_by(attn::TQ) {
                    let out = &mut o[r * hd..(r + attn::TQ) * hd];
                    attn::values(isa, &s[r * sstride + j..], sstride, &v[j * width..], width, hd, len, out);
                }
            }
            scratch::recycle(s);
            (h, t0, o)
        })
        .collect();
    [kt, keys, values].into_iter().for_each(scratch::recycle);
    for (h, t0, o) in results {
        for (t, row) in o.chunks_exact(hd).enumerate().take(q.rows - t0) {
            let at = (t0 + t) * p.n_heads * hd + h * hd;
            out[at..at + hd].copy_from_slice(row);
        }
    }
    CpuTensor { data: out, rows: q.rows, cols: p.n_heads * hd }
}
