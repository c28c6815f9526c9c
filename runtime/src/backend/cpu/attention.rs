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

use super::kernels::{self, Isa};
use super::{CpuKv, CpuTensor, KvData};
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
    // The visible cache in f32, converted once per call rather than once per query.
    let span = (first_visible - kv.start) * width..(n_ctx - kv.start) * width;
    let keys = kv.k.to_f32(span.clone());
    let values = kv.v.to_f32(span);
    let base = first_visible;
    let mut out = vec![0f32; q.rows * p.n_heads * hd];
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
    use half::slice::HalfFloatSliceExt;
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let mut out = vec![0f32; p.n_heads * hd];
    let task = |(g, o): (usize, &mut [f32])| {
        let qs: Vec<f32> = q.data[g * group * hd..(g + 1) * group * hd].iter().map(|&x| round_f16(x)).collect();
        let mut row = vec![0f32; hd];
        let mut scores = vec![0f32; group * span.len()];
        for (i, j) in span.clone().enumerate() {
            let at = (j - start) * width + g * hd;
            k[at..at + hd].convert_to_f32_slice(&mut row);
            for h in 0..group {
                scores[h * span.len() + i] = kernels::dot_f32(isa, &qs[h * hd..(h + 1) * hd], &row) * p.scale;
            }
        }
        for s in scores.chunks_mut(span.len()) {
            let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for x in s.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            let inv = 1.0 / sum;
            s.iter_mut().for_each(|x| *x *= inv);
            if let Some(m) = mass {
                let mut m = m[g].lock().unwrap_or_else(|e| e.into_inner());
                for (j, x) in span.clone().zip(s.iter()) {
                    m[j] += *x;
                }
            }
            s.iter_mut().for_each(|x| *x = round_f16(*x));
        }
        for (i, j) in span.clone().enumerate() {
            let at = (j - start) * width + g * hd;
            v[at..at + hd].convert_to_f32_slice(&mut row);
            for h in 0..group {
                kernels::axpy(isa, &mut o[h * hd..(h + 1) * hd], scores[h * span.len() + i], &row);
            }
        }
    };
    // Short contexts are cheaper on the calling thread than split across threads.
    if span.len() * p.n_heads < 4096 {
        out.chunks_mut(group * hd).enumerate().for_each(task);
    } else {
        out.par_chunks_mut(group * hd).enumerate().for_each(task);
    }
    CpuTensor { data: out, rows: 1, cols: p.n_heads * hd }
}
