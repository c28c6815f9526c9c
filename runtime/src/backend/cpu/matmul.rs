//! `x W^T` for weights in any storage type.
//!
//! The integer path quantizes activations once and runs the kernels (decode: rows split
//! across threads; prefill: tokens split across threads). The f32 reference path
//! dequantizes each weight row once and reuses it for every token.

use rayon::prelude::*;

use super::kernels::{self, Isa, Q8Acts};
use super::{scratch, CpuTensor, CpuWeight};
use crate::weights::HostTensor;

thread_local! {
    static ACTS: std::cell::RefCell<Q8Acts> = std::cell::RefCell::new(Q8Acts::default());
}

/// Weight rows per task: large enough to amortise scheduling, small enough to balance.
const ROWS_PER_TASK: usize = 16;

/// Integer kernels with 8-bit activations where the weight type has them, else f32.
pub fn matmul(x: &CpuTensor, w: &CpuWeight, isa: Option<Isa>, threads: usize) -> CpuTensor {
    let h = &w.host;
    assert_eq!(x.cols, h.cols(), "matmul: {} expects {} inputs, got {}", h.name, h.cols(), x.cols);
    match isa {
        Some(isa) if kernels::supports(isa, h.ty) => matmul_q8(x, w, isa, threads),
        Some(isa) => matmul_f32(x, h, isa),
        None => matmul_f32(x, h, Isa::Scalar),
    }
}

/// Rows `r0..r0 + out.len() / x.rows` of `w` times every row of `x`
/// (`out[t * len + r]`), from the repacked copy where there is one.
fn rows_times(isa: Isa, w: &CpuWeight, r0: usize, x: &Q8Acts, out: &mut [f32]) {
    let h = &w.host;
    let (rb, len) = (h.row_bytes(), out.len() / x.rows);
    match &w.packed {
        // Chunks are multiples of 8 rows, so they start and end on repacked groups.
        Some(p) => kernels::packed(isa, h.ty, &p[r0 * rb..(r0 + len) * rb], len, x, out),
        None if x.rows == 1 => kernels::matvec(isa, h.ty, &h.bytes()[r0 * rb..(r0 + len) * rb], rb, x.row(0), out),
        None => kernels::matmul(isa, h.ty, &h.bytes()[r0 * rb..(r0 + len) * rb], rb, x, out),
    }
}

/// Rows per decode task: a few tasks per thread, whole groups of 8.
fn decode_chunk(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads * 4).next_multiple_of(8).max(8)
}

/// Up to this many activation rows (a decode step of several sequences), weight rows
/// are split across threads and every task runs all rows through the same weights, so
/// the weights are read once per step; past it, prefill splits tokens instead.
pub const SMALL_BATCH: usize = 16;

/// Several weights sharing one quantized input in a single parallel region, for decode
/// steps (up to [`SMALL_BATCH`] rows); anything else falls back to one matmul per weight.
pub fn matmul_many(x: &CpuTensor, ws: &[&CpuWeight], isa: Option<Isa>, threads: usize) -> Vec<CpuTensor> {
    let fused = x.rows <= SMALL_BATCH
        && isa.is_some_and(|isa| ws.iter().all(|w| kernels::supports(isa, w.host.ty) && w.host.cols() == x.cols));
    let Some(isa) = isa.filter(|_| fused) else {
        return ws.iter().map(|w| matmul(x, w, isa, threads)).collect();
    };
    let n = x.rows;
    let mut q = Q8Acts::default();
    q.quantize(&x.data, n, x.cols);
    let total: usize = ws.iter().map(|w| w.host.rows()).sum();
    let chunk = decode_chunk(total, threads);
    // Work items: (weight, first row, rows), each at most `chunk` rows.
    let mut items = Vec::new();
    for (wi, w) in ws.iter().enumerate() {
        let m = w.host.rows();
        for r0 in (0..m).step_by(chunk) {
            items.push((wi, r0, chunk.min(m - r0)));
        }
    }
    // Each task fills `[n, len]` for its weight rows, scattered after.
    let parts: Vec<Vec<f32>> = items
        .par_iter()
        .map(|&(wi, r0, len)| {
            let mut o = vec![0f32; n * len];
            rows_times(isa, ws[wi], r0, &q, &mut o);
            o
        })
        .collect();
    let mut outs: Vec<CpuTensor> = ws
        .iter()
        .map(|w| CpuTensor { data: scratch::zeroed(n * w.host.rows()), rows: n, cols: w.host.rows() })
        .collect();
    for (&(wi, r0, len), part) in items.iter().zip(&parts) {
        let out = &mut outs[wi];
        for t in 0..n {
            out.data[t * out.cols + r0..t * out.cols + r0 + len].copy_from_slice(&part[t * len..(t + 1) * len]);
        }
    }
    outs
}

fn matmul_q8(x: &CpuTensor, w: &CpuWeight, isa: Isa, threads: usize) -> CpuTensor {
    let (n, k, m) = (x.rows, x.cols, w.host.rows());
    if n <= SMALL_BATCH {
        return matmul_many(x, &[w], Some(isa), threads).pop().unwrap_or(CpuTensor {
            data: Vec::new(),
            rows: n,
            cols: m,
        });
    }
    // Prefill: each thread takes a run of tokens and streams all weight rows past them,
    // writing its own contiguous rows of the output.
    let per = n.div_ceil(threads).next_multiple_of(4);
    let mut out = scratch::zeroed(n * m);
    out.par_chunks_mut(per * m).zip(x.data.par_chunks(per * k)).for_each(|(o, xs)| {
        // Each worker keeps its quantized rows between calls (see `scratch`).
        ACTS.with_borrow_mut(|q| {
            q.quantize(xs, xs.len() / k, k);
            rows_times(isa, w, 0, q, o);
        })
    });
    CpuTensor { data: out, rows: n, cols: m }
}

fn transpose(src: &[f32], rows: usize, cols: usize) -> CpuTensor {
    let mut out = scratch::zeroed(rows * cols);
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = src[r * cols + c];
        }
    }
    CpuTensor { data: out, rows: cols, cols: rows }
}

/// Weights dequantized row by row, f32 activations: the reference path (`Isa::Scalar`),
/// and the fast path's fallback for types without integer kernels (the k-quants), where
/// a dequantized row and a SIMD dot beat the fused scalar dot.
fn matmul_f32(x: &CpuTensor, w: &HostTensor, isa: Isa) -> CpuTensor {
    let (n, k, m) = (x.rows, x.cols, w.rows());
    let rb = w.row_bytes();
    let bytes = w.bytes();
    let ty = w.ty;
    if n == 1 && isa != Isa::Scalar {
        let mut out = scratch::zeroed(m);
        out.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(c, o)| {
            let mut row = vec![0f32; k];
            for (i, o) in o.iter_mut().enumerate() {
                let j = c * ROWS_PER_TASK + i;
                // Lengths were checked at load: dequantizing cannot fail here.
                *o = match kernels::dequantize_row(isa, ty, &bytes[j * rb..(j + 1) * rb], &mut row) {
                    Ok(()) => kernels::dot_f32(isa, &row, &x.data),
                    Err(_) => f32::NAN,
                };
            }
        });
        return CpuTensor { data: out, rows: 1, cols: m };
    }
    if n == 1 {
        let mut out = scratch::zeroed(m);
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
            if kernels::dequantize_row(isa, ty, &bytes[j * rb..(j + 1) * rb], &mut row).is_err() {
                o.fill(f32::NAN);
                continue;
            }
            for (t, o) in o.iter_mut().enumerate() {
                *o = kernels::dot_f32(isa, &row, &x.data[t * k..(t + 1) * k]);
            }
        }
    });
    transpose(&out_t, m, n)
}
