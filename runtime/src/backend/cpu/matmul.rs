//! `x W^T` for weights in any storage type.
//!
//! A single row (decoding) uses the fused quantized dot products; several rows
//! (prefill) dequantize each weight row once and reuse it for every token.

use rayon::prelude::*;

use super::kernels::{self, Isa, Q8Acts};
use super::CpuTensor;
use crate::weights::HostTensor;

/// Weight rows per task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

pub use kernels::scalar_dot_f32 as dot_f32;

/// Integer kernels with 8-bit activations where the weight type has them, else f32.
pub fn matmul(x: &CpuTensor, w: &HostTensor, isa: Option<Isa>, threads: usize) -> CpuTensor {
    assert_eq!(x.cols, w.cols(), "matmul: {} expects {} inputs, got {}", w.name, w.cols(), x.cols);
    match isa {
        Some(isa) if kernels::supports(w.ty) => matmul_q8(x, w, isa, threads),
        _ => matmul_f32(x, w),
    }
}

/// Decode steps (one row) of several weights sharing one quantized input in a single
/// parallel region; anything else falls back to one matmul per weight.
pub fn matmul_many(x: &CpuTensor, ws: &[&HostTensor], isa: Option<Isa>, threads: usize) -> Vec<CpuTensor> {
    let fused = x.rows == 1 && isa.is_some() && ws.iter().all(|w| kernels::supports(w.ty) && w.cols() == x.cols);
    let Some(isa) = isa.filter(|_| fused) else {
        return ws.iter().map(|w| matmul(x, w, isa, threads)).collect();
    };
    let mut q = Q8Acts::default();
    q.quantize(&x.data, 1, x.cols);
    let total: usize = ws.iter().map(|w| w.rows()).sum();
    let chunk = total.div_ceil(threads * 4).next_multiple_of(4).max(4);
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; w.rows()]).collect();
    // Work items: (weight, first row, output slice), each at most `chunk` rows.
    let mut items = Vec::new();
    for (w, out) in ws.iter().zip(outs.iter_mut()) {
        for (c, o) in out.chunks_mut(chunk).enumerate() {
            items.push((*w, c * chunk, o));
        }
    }
    items.into_par_iter().for_each(|(w, r0, o)| {
        let rb = w.row_bytes();
        kernels::matvec(isa, w.ty, &w.bytes()[r0 * rb..(r0 + o.len()) * rb], rb, q.row(0), o);
    });
    outs.into_iter().map(|data| CpuTensor { cols: data.len(), data, rows: 1 }).collect()
}

fn matmul_q8(x: &CpuTensor, w: &HostTensor, isa: Isa, threads: usize) -> CpuTensor {
    let (n, k, m) = (x.rows, x.cols, w.rows());
    let (rb, bytes, ty) = (w.row_bytes(), w.bytes(), w.ty);
    if n == 1 {
        let mut q = Q8Acts::default();
        q.quantize(&x.data, n, k);
        // A few chunks per thread, each a multiple of the 4-row tile.
        let chunk = m.div_ceil(threads * 4).next_multiple_of(4).max(4);
        let mut out = vec![0f32; m];
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            let r0 = c * chunk;
            kernels::matvec(isa, ty, &bytes[r0 * rb..(r0 + o.len()) * rb], rb, q.row(0), o);
        });
        return CpuTensor { data: out, rows: 1, cols: m };
    }
    // Prefill: each thread takes a run of tokens and streams all weight rows past them,
    // writing its own contiguous rows of the output.
    let per = n.div_ceil(threads).next_multiple_of(4);
    let mut out = vec![0f32; n * m];
    out.par_chunks_mut(per * m).zip(x.data.par_chunks(per * k)).for_each(|(o, xs)| {
        let mut q = Q8Acts::default();
        q.quantize(xs, xs.len() / k, k);
        kernels::matmul(isa, ty, bytes, rb, &q, o);
    });
    CpuTensor { data: out, rows: n, cols: m }
}

fn transpose(src: &[f32], rows: usize, cols: usize) -> CpuTensor {
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = src[r * cols + c];
        }
    }
    CpuTensor { data: out, rows: cols, cols: rows }
}

fn matmul_f32(x: &CpuTensor, w: &HostTensor) -> CpuTensor {
    let (n, k, m) = (x.rows, x.cols, w.rows());
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
    transpose(&out_t, m, n)
}
