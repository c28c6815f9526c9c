//! `x W^T` for weights in any storage type.
//!
//! A single row (decoding) uses the fused quantized dot products; several rows
//! (prefill) dequantize each weight row once and reuse it for every token.

use rayon::prelude::*;

use super::CpuTensor;
use crate::weights::HostTensor;

/// Weight rows per task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

/// f32 dot product with independent accumulators, so that the compiler vectorises it.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

pub fn matmul(x: &CpuTensor, w: &HostTensor) -> CpuTensor {
    let (n, k, m) = (x.rows, x.cols, w.rows());
    assert_eq!(k, w.cols(), "matmul: {} expects {} inputs, got {k}", w.name, w.cols());
    let rb = w.row_bytes();
    let bytes = w.bytes();
    let ty = w.ty;
    if n == 1 {
        let mut out = vec![0f32; m];
        out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, o)| {
            for (i, o) in o.iter_mut().enumerate() {
                let j = c * ROWS_PER_TASK + i;
                // Lengths were checked at load: the dot cannot fail here.
                *o = cairn_formats::quant::dot(ty, &bytes[j * rb..(j + 1) * rb], &x.data).unwrap_or(f32::NAN);
            }
        });
        return CpuTensor { data: out, rows: 1, cols: m };
    }
    // Transposed result: each task owns whole rows of out^T.
    let mut out_t = vec![0f32; m * n];
    out_t.par_chunks_mut(ROWS_PER_TASK * n).enumerate().for_each(|(c, o)| {
        let mut row = vec![0f32; k];
        for (i, o) in o.chunks_mut(n).enumerate() {
            let j = c * ROWS_PER_TASK + i;
            if cairn_formats::quant::dequantize(ty, &bytes[j * rb..(j + 1) * rb], &mut row).is_err() {
                o.fill(f32::NAN);
                continue;
            }
            for (t, o) in o.iter_mut().enumerate() {
                *o = dot_f32(&row, &x.data[t * k..(t + 1) * k]);
            }
        }
    });
    let mut out = vec![0f32; n * m];
    for j in 0..m {
        for t in 0..n {
            out[t * m + j] = out_t[j * n + t];
        }
    }
    CpuTensor { data: out, rows: n, cols: m }
}
