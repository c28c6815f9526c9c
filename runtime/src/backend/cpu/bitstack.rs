//! BitStack matmuls: `y = Σ_blocks (S ⊙ (u v)) x` over the blocks a budget keeps.
//!
//! Decode (one token) never rebuilds a weight: per block, `t_r = v_r ⊙ x`, then for each
//! run of 4 inputs a table of the 16 signed sums `Σ ±t_r[j]` for every rank `r`, so a row
//! costs one table lookup per 4 weights and rank, then a k-wide dot with `u_i`. The
//! integer path (`Isa::Scalar` and x86) rounds the tables to int8 and looks them up in
//! registers with `vpshufb` (kernels/lut.rs: 16 bytes per rank and sign byte, 8 rows ×
//! 128 inputs per step for every rank); the f32 tables (16 × k floats per run of 4 inputs,
//! 384 KiB for a 1536-wide block, so L2-bound) stay as the `--exact` path and on NEON.
//! Prefill rebuilds 16-row tiles of the dense weight in f32 and runs dot products against
//! every token: the rebuild is paid once for all tokens, where the table path would pay k
//! sign-sums per weight per token.

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::kernels::{self, lut, Isa, Q8Acts};
use super::{scratch, CpuTensor};
use crate::bitstack::{DenseCopy, StackWeight};
use cairn_formats::bitstack::Block;
use cairn_formats::GgmlType;

/// Rows per decode task on the f32 tables.
const DECODE_ROWS: usize = 64;
/// Rows of a rebuilt prefill tile.
const TILE: usize = 16;

fn f16s(bytes: &[u8]) -> Vec<f32> {
    let h: Vec<half::f16> = bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect();
    let mut out = vec![0f32; h.len()];
    h.convert_to_f32_slice(&mut out);
    out
}

/// `x Wᵀ` for a BitStack weight at its current number of active blocks (or from its
/// dense copy).
/// Up to this many rows run as one matvec per row rather than through rebuilt tiles.
const MATVEC_BATCH: usize = 8;

/// The row limit of the table path: [`MATVEC_BATCH`], or `CAIRN_STACK_MATVEC_ROWS` (a
/// measurement knob: a large value scores whole perplexity windows through the decode
/// tables, so that their rounding can be measured).
fn matvec_rows() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("CAIRN_STACK_MATVEC_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(MATVEC_BATCH)
    })
}

/// Whether decode on `isa` uses the int8 tables: the integer ISAs (`Isa::Scalar` is
/// their reference) unless `CAIRN_STACK_TABLES=f32` asks for the f32 tables (A/B runs).
fn int8_tables(isa: Isa) -> bool {
    static F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let f32_only = *F32.get_or_init(|| std::env::var("CAIRN_STACK_TABLES").is_ok_and(|v| v == "f32"));
    !f32_only && matches!(isa, Isa::Scalar | Isa::Avx2 | Isa::Avx512Vnni | Isa::NeonDot)
}

pub fn matmul(x: &CpuTensor, w: &StackWeight, isa: Option<Isa>) -> CpuTensor {
    if let Some(d) = w.dense() {
        return dense_matmul(x, &d, w.shape.m, isa);
    }
    let blocks: Vec<Block<'_>> = (0..w.active()).map(|l| w.block(l)).collect();
    let m = w.shape.m;
    // A decode step (of one or a few sequences): each row through the sign tables, since
    // rebuilding dense tiles of the whole matrix costs more than a few matvecs. The f32
    // path (`isa` None) runs the f32 tables with this CPU's f32 row kernel.
    if x.rows <= matvec_rows() {
        let mut y = scratch::zeroed(x.rows * m);
        for (xr, yr) in x.data.chunks_exact(x.cols).zip(y.chunks_exact_mut(m)) {
            match isa {
                Some(isa) => stack_matvec(isa, &blocks, xr, yr),
                None => stack_matvec_f32(Isa::detect(), &blocks, xr, yr),
            }
        }
        return CpuTensor { data: y, rows: x.rows, cols: m };
    }
    match isa {
        Some(isa) if x.cols.is_multiple_of(32) && isa != Isa::Scalar => rebuild_matmul_q8(x, &blocks, m, isa),
        _ => rebuild_matmul(x, &blocks, m, isa.unwrap_or(Isa::Scalar)),
    }
}

/// All of `w`'s levels summed in f32 and rounded to Q8_0 rows, 16-row tiles in
/// parallel; interleaved in groups of 8 rows where this CPU has repacked kernels.
pub fn dense_copy(w: &StackWeight) -> std::io::Result<DenseCopy> {
    let blocks: Vec<Block<'_>> = (0..w.levels()).map(|l| w.block(l)).collect();
    let (m, n) = (w.shape.m, w.shape.n);
    let us: Vec<Vec<f32>> = blocks.iter().map(|b| f16s(b.u_bytes())).collect();
    let vs: Vec<Vec<f32>> = blocks.iter().map(|b| f16s(b.v_bytes())).collect();
    let rb = n / 32 * 34;
    let mut bytes = vec![0u8; m * rb];
    bytes.par_chunks_mut(TILE * rb).enumerate().for_each(|(c, dst)| {
        let mut tile = vec![0f32; dst.len() / rb * n];
        rebuild_rows(&blocks, &us, &vs, c * TILE, &mut tile);
        kernels::quantize_q8_0(Isa::detect(), &tile, dst);
    });
    if kernels::has_packed(Isa::detect()) {
        if let Some(p) = kernels::repack::repack(GgmlType::Q8_0, &bytes, m, rb) {
            return DenseCopy::new(&p, m, rb, true);
        }
    }
    DenseCopy::new(&bytes, m, rb, false)
}

/// `x Wᵀ` from a dense copy: the Q8_0 kernels (decode: rows split across threads in
/// whole groups of 8; prefill: tokens split), or dequantized rows on the f32 path.
fn dense_matmul(x: &CpuTensor, d: &DenseCopy, m: usize, isa: Option<Isa>) -> CpuTensor {
    let (ntok, n, rb) = (x.rows, x.cols, d.row_bytes);
    let ty = GgmlType::Q8_0;
    let packed = |isa: Isa| d.packed && kernels::has_packed(isa);
    let plain: std::borrow::Cow<'_, [u8]> = match isa {
        Some(i) if packed(i) => std::borrow::Cow::Borrowed(d.bytes()),
        _ if d.packed => std::borrow::Cow::Owned(kernels::repack::unpack(ty, d.bytes(), m, rb)),
        _ => std::borrow::Cow::Borrowed(d.bytes()),
    };
    let Some(isa) = isa.filter(|&i| kernels::supports(i, ty)) else {
        let mut out = scratch::zeroed(ntok * m);
        let mut row = vec![0f32; n];
        for r in 0..m {
            // Rows are whole Q8_0 blocks by construction.
            let _ = cairn_formats::quant::dequantize(ty, &plain[r * rb..(r + 1) * rb], &mut row);
            for t in 0..ntok {
                out[t * m + r] = kernels::dot_f32(isa.unwrap_or(Isa::Scalar), &row, &x.data[t * n..(t + 1) * n]);
            }
        }
        return CpuTensor { data: out, rows: ntok, cols: m };
    };
    let rows_times = |r0: usize, len: usize, q: &Q8Acts, out: &mut [f32]| {
        if packed(isa) {
            kernels::packed(isa, ty, &plain[r0 * rb..(r0 + len) * rb], len, q, out)
        } else if q.rows == 1 {
            kernels::matvec(isa, ty, &plain[r0 * rb..(r0 + len) * rb], rb, q.row(0), out)
        } else {
            kernels::matmul(isa, ty, &plain[r0 * rb..(r0 + len) * rb], rb, q, out)
        }
    };
    let threads = rayon::current_num_threads();
    if ntok == 1 {
        let mut q = Q8Acts::default();
        q.quantize(&x.data, 1, n);
        let chunk = m.div_ceil(threads * 4).next_multiple_of(8).max(8);
        let mut out = scratch::zeroed(m);
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| rows_times(c * chunk, o.len(), &q, o));
        return CpuTensor { data: out, rows: 1, cols: m };
    }
    let per = ntok.div_ceil(threads).next_multiple_of(4);
    let mut out = scratch::zeroed(ntok * m);
    out.par_chunks_mut(per * m).zip(x.data.par_chunks(per * n)).for_each(|(o, xs)| {
        let mut q = Q8Acts::default();
        q.quantize(xs, xs.len() / n, n);
        rows_times(0, m, &q, o);
    });
    CpuTensor { data: out, rows: ntok, cols: m }
}

/// Prefill on the integer path: each rebuilt tile is rounded to Q8_0 and multiplied
/// with the 8-bit activations by the same kernels as a Q8_0 weight (about 3× the f32
/// dot products; the extra rounding is 8 bits on top of the BitStack approximation).
fn rebuild_matmul_q8(x: &CpuTensor, blocks: &[Block<'_>], m: usize, isa: Isa) -> CpuTensor {
    let (ntok, n) = (x.rows, x.cols);
    let us: Vec<Vec<f32>> = blocks.iter().map(|b| f16s(b.u_bytes())).collect();
    let vs: Vec<Vec<f32>> = blocks.iter().map(|b| f16s(b.v_bytes())).collect();
    let mut q = Q8Acts::default();
    q.quantize(&x.data, ntok, n);
    let rb = n / 32 * 34;
    let mut out_tiles = vec![0f32; m * ntok];
    // Tile c holds out[t * rows + r] for its rows: scattered into place below.
    out_tiles.par_chunks_mut(TILE * ntok).enumerate().for_each(|(c, o)| {
        let rows = o.len() / ntok;
        let mut tile = vec![0f32; rows * n];
        rebuild_rows(blocks, &us, &vs, c * TILE, &mut tile);
        let mut bytes = vec![0u8; rows * rb];
        kernels::quantize_q8_0(isa, &tile, &mut bytes);
        kernels::matmul(isa, GgmlType::Q8_0, &bytes, rb, &q, o);
    });
    let mut out = scratch::zeroed(ntok * m);
    for (c, o) in out_tiles.chunks(TILE * ntok).enumerate() {
        let rows = o.len() / ntok;
        for t in 0..ntok {
            out[t * m + c * TILE..t * m + c * TILE + rows].copy_from_slice(&o[t * rows..(t + 1) * rows]);
        }
    }
    CpuTensor { data: out, rows: ntok, cols: m }
}

/// The 16-entry signed-sum tables of one block for input `x`: `tab[(p * 16 + e) * k + r]`
/// is `Σ_{q<4} (bit q of e ? −1 : 1) · v[r, 4p + q] · x[4p + q]`.
fn tables(b: &Block<'_>, x: &[f32]) -> Vec<f32> {
    let (n, k) = (b.shape.n, b.shape.k);
    let v = f16s(b.v_bytes());
    // Two runs per sign byte (the last one padded with zeros), so rows walk bytes.
    let p_count = n.div_ceil(8) * 2;
    // t[j * k + r] = v[r, j] · x[j], zero past n.
    let mut t = vec![0f32; p_count * 4 * k];
    for r in 0..k {
        for j in 0..n {
            t[j * k + r] = v[r * n + j] * x[j];
        }
    }
    let mut tab = vec![0f32; p_count * 16 * k];
    for (p, tp) in tab.chunks_exact_mut(16 * k).enumerate() {
        let ts = &t[p * 4 * k..(p + 1) * 4 * k];
        for tq in ts.chunks_exact(k) {
            for (o, &v) in tp[..k].iter_mut().zip(tq) {
                *o += v;
            }
        }
        for e in 1..16usize {
            let low = e.trailing_zeros() as usize;
            let prev = e & (e - 1);
            let (done, cur) = tp.split_at_mut(e * k);
            let src = &done[prev * k..(prev + 1) * k];
            let tq = &ts[low * k..(low + 1) * k];
            for ((o, &s), &t) in cur[..k].iter_mut().zip(src).zip(tq) {
                *o = s - 2.0 * t;
            }
        }
    }
    tab
}

/// `y += (S ⊙ (u v)) x` for one block.
pub fn block_matvec(isa: Isa, b: &Block<'_>, x: &[f32], y: &mut [f32]) {
    stack_matvec(isa, std::slice::from_ref(b), x, y)
}

/// `y += Σ_blocks (S ⊙ (u v)) x` on `isa`: the int8 tables where [`int8_tables`], else
/// the f32 ones.
pub fn stack_matvec(isa: Isa, blocks: &[Block<'_>], x: &[f32], y: &mut [f32]) {
    if int8_tables(isa) {
        stack_matvec_int8(isa, blocks, x, y)
    } else {
        stack_matvec_f32(isa, blocks, x, y)
    }
}

/// [`stack_matvec`] through int8 tables (kernels/lut.rs); see [`stack_matvec_int8_many`].
pub fn stack_matvec_int8(isa: Isa, blocks: &[Block<'_>], x: &[f32], y: &mut [f32]) {
    stack_matvec_int8_many(isa, std::slice::from_ref(&blocks), x, &mut [y]);
}

/// `ys[w] += Σ_blocks (S ⊙ (u v)) x` for several weights on one input: every block's
/// tables first (all blocks' segments in one parallel pass), then one parallel pass over
/// runs of rows (of every weight) that visit each of their weight's blocks. Sharing the
/// passes between the weights of one input (q, k, v; gate, up) halves the fork-joins of
/// a decode step, which at this size cost as much as a small matrix. `Isa::Scalar` (or a
/// rank without an AVX2 / NEON instance) runs the scalar reference ([`lut::rows`] picks).
pub fn stack_matvec_int8_many(isa: Isa, sets: &[&[Block<'_>]], x: &[f32], ys: &mut [&mut [f32]]) {
    let vs: Vec<(&[u8], usize, usize)> =
        sets.iter().flat_map(|bs| bs.iter().map(|b| (b.v_bytes(), b.shape.n, b.shape.k))).collect();
    let tabs = lut::build(isa, &vs, x);
    // Weight w's tables start where the blocks of the weights before it end.
    let first: Vec<usize> = sets.iter().scan(0, |at, bs| Some(std::mem::replace(at, *at + bs.len()))).collect();
    let total: usize = ys.iter().map(|y| y.len()).sum();
    let chunk = total.div_ceil(rayon::current_num_threads() * 4).next_multiple_of(8).max(8);
    let mut jobs = Vec::new();
    for (w, y) in ys.iter_mut().enumerate() {
        for (c, run) in y.chunks_mut(chunk).enumerate() {
            jobs.push((w, c * chunk, run));
        }
    }
    jobs.into_par_iter().for_each(|(w, r0, ys)| {
        let mut u = Vec::new();
        for (b, t) in sets[w].iter().zip(&tabs[first[w]..]) {
            let k = b.shape.k;
            // This run's rows of u in f32.
            u.resize(ys.len() * k, 0f32);
            f16s_into(&b.u_bytes()[r0 * k * 2..(r0 + ys.len()) * k * 2], &mut u);
            let signs = &b.bytes[..b.shape.m * b.shape.sign_row_bytes()];
            lut::rows(isa, t, signs, &u, r0, ys);
        }
    });
}

/// `x Wᵀ` for several BitStack weights of one input (q, k, v; gate, up): a decode step
/// on the int8 tables with every weight on its blocks shares one table pass and one row
/// pass ([`stack_matvec_int8_many`]); anything else runs weight by weight.
pub fn matmul_many(x: &CpuTensor, ws: &[&StackWeight], isa: Option<Isa>) -> Vec<CpuTensor> {
    let shared = isa.filter(|&i| int8_tables(i) && x.rows <= matvec_rows() && ws.iter().all(|w| w.dense().is_none()));
    let Some(isa) = shared else {
        return ws.iter().map(|w| matmul(x, w, isa)).collect();
    };
    let blocks: Vec<Vec<Block<'_>>> = ws.iter().map(|w| (0..w.active()).map(|l| w.block(l)).collect()).collect();
    let sets: Vec<&[Block<'_>]> = blocks.iter().map(|b| b.as_slice()).collect();
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| scratch::zeroed(x.rows * w.shape.m)).collect();
    for (t, xr) in x.data.chunks_exact(x.cols).enumerate() {
        let mut ys: Vec<&mut [f32]> =
            outs.iter_mut().zip(ws).map(|(o, w)| &mut o[t * w.shape.m..(t + 1) * w.shape.m]).collect();
        stack_matvec_int8_many(isa, &sets, xr, &mut ys);
    }
    outs.into_iter().zip(ws).map(|(data, w)| CpuTensor { data, rows: x.rows, cols: w.shape.m }).collect()
}

/// f16 bytes to f32, 64 at a time through `half`'s SIMD conversion (F16C on x86): one
/// value at a time cost 6% of a BitStack decode step.
fn f16s_into(bytes: &[u8], out: &mut [f32]) {
    let mut h = [half::f16::ZERO; 64];
    for (o, b) in out.chunks_mut(64).zip(bytes.chunks(128)) {
        let n = o.len();
        for (hv, c) in h[..n].iter_mut().zip(b.chunks_exact(2)) {
            *hv = half::f16::from_le_bytes([c[0], c[1]]);
        }
        h[..n].convert_to_f32_slice(o);
    }
}

/// `y += Σ_blocks (S ⊙ (u v)) x` through f32 tables: every block's tables first (in
/// parallel), then one parallel pass over rows in which each run of rows visits every
/// block, so a block's tables stay in cache for the whole run.
pub fn stack_matvec_f32(isa: Isa, blocks: &[Block<'_>], x: &[f32], y: &mut [f32]) {
    let prep: Vec<(Vec<f32>, Vec<f32>)> = blocks.par_iter().map(|b| (tables(b, x), f16s(b.u_bytes()))).collect();
    y.par_chunks_mut(DECODE_ROWS).enumerate().for_each(|(c, ys)| {
        let r0 = c * DECODE_ROWS;
        for (b, (tab, u)) in blocks.iter().zip(&prep) {
            match (isa, b.shape.k) {
                #[cfg(target_arch = "x86_64")]
                (Isa::Avx2 | Isa::Avx512Vnni, 16) => {
                    // SAFETY: `Isa::Avx2` and above are only chosen when the CPU has AVX2 and FMA.
                    unsafe { rows_avx2_16(b, tab, u, r0, ys) }
                }
                (_, 16) => rows_fixed::<16>(b, tab, u, r0, ys),
                (_, 8) => rows_fixed::<8>(b, tab, u, r0, ys),
                _ => rows_any(b, tab, u, r0, ys),
            }
        }
    });
}

#[inline(always)]
fn rows_fixed<const K: usize>(b: &Block<'_>, tab: &[f32], u: &[f32], r0: usize, ys: &mut [f32]) {
    for (di, y) in ys.iter_mut().enumerate() {
        let i = r0 + di;
        let signs = b.sign_row(i);
        let mut acc = [0f32; K];
        // One sign byte selects an entry from each of its two runs' tables.
        for (&byte, t2) in signs.iter().zip(tab.chunks_exact(32 * K)) {
            let lo = (byte & 15) as usize * K;
            let hi = (16 + (byte >> 4) as usize) * K;
            let (a, c) = (&t2[lo..lo + K], &t2[hi..hi + K]);
            for r in 0..K {
                acc[r] += a[r] + c[r];
            }
        }
        let ur = &u[i * K..][..K];
        let mut s = 0f32;
        for r in 0..K {
            s += ur[r] * acc[r];
        }
        *y += s;
    }
}

/// [`rows_fixed`] at k = 16 in AVX2 registers: each table entry is two 8-lane adds.
/// Written out because the compiler splits the generic body's 16-float accumulator
/// into 2- and 4-lane pieces; two sign bytes per step keep eight add chains in flight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2_16(b: &Block<'_>, tab: &[f32], u: &[f32], r0: usize, ys: &mut [f32]) {
    use std::arch::x86_64::*;
    const K: usize = 16;
    for (di, y) in ys.iter_mut().enumerate() {
        let i = r0 + di;
        let signs = b.sign_row(i);
        // SAFETY (every load below): the tables hold two runs of 16 entries of K floats per
        // sign byte, and u a row of K per output; both are checked here.
        assert!(tab.len() >= signs.len() * 32 * K && u.len() >= (i + 1) * K, "tables or u too short");
        let base = tab.as_ptr();
        let entry = |j: usize, byte: u8| {
            let t = base.add(j * 32 * K);
            (t.add((byte & 15) as usize * K), t.add((16 + (byte >> 4) as usize) * K))
        };
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut pairs = signs.chunks_exact(2);
        let mut j = 0;
        for pair in &mut pairs {
            for (h, &byte) in pair.iter().enumerate() {
                let (lo, hi) = entry(j + h, byte);
                let a = &mut acc[4 * h..4 * h + 4];
                a[0] = _mm256_add_ps(a[0], _mm256_loadu_ps(lo));
                a[1] = _mm256_add_ps(a[1], _mm256_loadu_ps(lo.add(8)));
                a[2] = _mm256_add_ps(a[2], _mm256_loadu_ps(hi));
                a[3] = _mm256_add_ps(a[3], _mm256_loadu_ps(hi.add(8)));
            }
            j += 2;
        }
        if let [byte] = pairs.remainder() {
            let (lo, hi) = entry(j, *byte);
            acc[0] = _mm256_add_ps(acc[0], _mm256_loadu_ps(lo));
            acc[1] = _mm256_add_ps(acc[1], _mm256_loadu_ps(lo.add(8)));
            acc[2] = _mm256_add_ps(acc[2], _mm256_loadu_ps(hi));
            acc[3] = _mm256_add_ps(acc[3], _mm256_loadu_ps(hi.add(8)));
        }
        let s0 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[4], acc[6]));
        let s1 = _mm256_add_ps(_mm256_add_ps(acc[1], acc[3]), _mm256_add_ps(acc[5], acc[7]));
        let ur = u.as_ptr().add(i * K);
        let d = _mm256_fmadd_ps(s1, _mm256_loadu_ps(ur.add(8)), _mm256_mul_ps(s0, _mm256_loadu_ps(ur)));
        let q = _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        *y += _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
    }
}

fn rows_any(b: &Block<'_>, tab: &[f32], u: &[f32], r0: usize, ys: &mut [f32]) {
    let k = b.shape.k;
    let p_count = b.shape.n.div_ceil(8) * 2;
    let mut acc = vec![0f32; k];
    for (di, y) in ys.iter_mut().enumerate() {
        let i = r0 + di;
        let signs = b.sign_row(i);
        acc.fill(0.0);
        for p in 0..p_count {
            let e = ((signs[p / 2] >> (4 * (p % 2))) & 15) as usize;
            for (a, &t) in acc.iter_mut().zip(&tab[(p * 16 + e) * k..(p * 16 + e + 1) * k]) {
                *a += t;
            }
        }
        *y += acc.iter().zip(&u[i * k..(i + 1) * k]).map(|(a, u)| a * u).sum::<f32>();
    }
}

/// Rows `r0..r0 + out.len() / n` of the weight the blocks sum to, in f32.
pub fn rebuild_rows(blocks: &[Block<'_>], us: &[Vec<f32>], vs: &[Vec<f32>], r0: usize, out: &mut [f32]) {
    out.fill(0.0);
    let Some(first) = blocks.first() else { return };
    let (n, k) = (first.shape.n, first.shape.k);
    let isa = Isa::detect();
    for ((b, u), v) in blocks.iter().zip(us).zip(vs) {
        for (di, row) in out.chunks_exact_mut(n).enumerate() {
            let i = r0 + di;
            kernels::sign_rank_row(isa, &u[i * k..(i + 1) * k], v, b.sign_row(i), row);
        }
    }
}

fn rebuild_matmul(x: &CpuTensor, blocks: &[Block<'_>], m: usize, isa: Isa) -> CpuTensor {
    let (ntok, n) = (x.rows, x.cols);
    let us: Vec<Vec<f32>> = blocks.iter().map(|b| f16s(b.u_bytes())).collect();
    let vs: Vec<Vec<f32>> = blocks.iter().map(|b| f16s(b.v_bytes())).collect();
    let mut out_t = vec![0f32; m * ntok];
    out_t.par_chunks_mut(TILE * ntok).enumerate().for_each(|(c, o)| {
        let rows = o.len() / ntok;
        let mut tile = vec![0f32; rows * n];
        rebuild_rows(blocks, &us, &vs, c * TILE, &mut tile);
        for (wr, orow) in tile.chunks_exact(n).zip(o.chunks_exact_mut(ntok)) {
            for (t, o) in orow.iter_mut().enumerate() {
                *o = kernels::dot_f32(isa, wr, &x.data[t * n..(t + 1) * n]);
            }
        }
    });
    let mut out = scratch::zeroed(ntok * m);
    for r in 0..m {
        for t in 0..ntok {
            out[t * m + r] = out_t[r * ntok + t];
        }
    }
    CpuTensor { data: out, rows: ntok, cols: m }
}
