//! Causal grouped-query attention over the cache.

use rayon::prelude::*;

use super::{dot_f32, CpuKv, CpuTensor};
use crate::backend::AttnParams;

/// `q` holds rows at positions `pos0..`; the cache already contains them.
pub fn attention(q: &CpuTensor, kv: &CpuKv, pos0: usize, p: &AttnParams) -> CpuTensor {
    let hd = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let width = kv.width;
    let mut out = vec![0f32; q.rows * p.n_heads * hd];
    // One task per (query row, head): independent, and enough of them to fill threads.
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (t, h) = (idx / p.n_heads, idx % p.n_heads);
        let pos = pos0 + t;
        let g = h / group;
        let qh = &q.data[t * q.cols + h * hd..t * q.cols + (h + 1) * hd];
        let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let mut scores: Vec<f32> =
            (first..=pos).map(|j| dot_f32(qh, &kv.k[j * width + g * hd..j * width + (g + 1) * hd]) * p.scale).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (j, s) in (first..=pos).zip(&scores) {
            let vj = &kv.v[j * width + g * hd..j * width + (g + 1) * hd];
            let w = s * inv;
            o.iter_mut().zip(vj).for_each(|(o, v)| *o += w * v);
        }
    });
    CpuTensor { data: out, rows: q.rows, cols: p.n_heads * hd }
}
