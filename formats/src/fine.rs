//! FineQuant: weight-only integer storage with fine-grained groups, and the plain
//! round-to-nearest (RTN) baseline that shares its layout.
//!
//! A row of `n` values (`n` a multiple of 32) is cut into groups of `G` values along the
//! input dimension; the last group of a row may be shorter (576 = 4·128 + 64), so any
//! multiple of 32 is a valid group size for any row. Each group is stored as its header
//! (f16 scale `d`, plus an f16 minimum `m` when asymmetric) followed by its codes, 32
//! values at a time:
//!
//! | bits | bytes per 32 | value | packing of the 32 codes `u` |
//! | --- | --- | --- | --- |
//! | 8 | 32 | `d·q`, q ∈ [−127, 127] | one i8 each |
//! | 4 | 16 | `d·u + m` (asym) or `d·(u − 8)` (sym) | byte j: u[j] low nibble, u[j+16] high |
//! | 3 | 12 | `d·u + m` | bytes 0–7 as for 2 bits (low bits), then a u32 whose bit j is bit 2 of u[j] |
//! | 2 | 8 | `d·u + m` | byte j, bits 2k..2k+2: u[j + 8k] |
//!
//! A 4-bit asymmetric group of 32 is byte for byte a ggml Q4_1 block, and an 8-bit one
//! a Q8_0 block. Because headers sit before their own codes, run `b` of 32 values starts
//! at a position computed from `b` alone, which is what the kernels need.

use std::prelude::v1::*;

use crate::error::{Error, Result};
use crate::quant::num::{abs, round_half_away};

/// Values per code run (and the granularity of groups).
pub const RUN: usize = 32;

/// A FineQuant / RTN storage type: bits per code, symmetric or not, and group size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FineType {
    bits: u8,
    sym: bool,
    group: u16,
}

/// How quantization picks each group's scale and minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// The group's range mapped onto the code range: plain round to nearest.
    MinMax,
    /// Min-max, then a few rounds of least-squares refitting of `d` (and `m`) to the
    /// chosen codes, and shrunken ranges that clip outliers; the lowest squared error
    /// wins (min-max is always a candidate, so it is never worse).
    Search,
}

impl FineType {
    /// `bits` ∈ {2, 3, 4, 8}; 8-bit codes are always symmetric, 2- and 3-bit ones always
    /// asymmetric; `group` a multiple of 32 up to 4096.
    pub fn new(bits: u8, sym: bool, group: usize) -> Result<FineType> {
        let ok_bits = match bits {
            8 => sym,
            4 => true,
            2 | 3 => !sym,
            _ => false,
        };
        if !ok_bits {
            let kind = if sym { "symmetric" } else { "asymmetric" };
            return Err(Error::invalid(format!(
                "no {kind} {bits}-bit FineQuant type (int2/int3 asym, int4, int8 sym)"
            )));
        }
        if group == 0 || !group.is_multiple_of(RUN) || group > 4096 {
            return Err(Error::invalid(format!("group size {group} is not a multiple of 32 between 32 and 4096")));
        }
        Ok(FineType { bits, sym, group: group as u16 })
    }

    pub fn bits(self) -> u8 {
        self.bits
    }

    pub fn sym(self) -> bool {
        self.sym
    }

    pub fn group(self) -> usize {
        self.group as usize
    }

    /// The same codes with another group size.
    pub fn with_group(self, group: usize) -> Result<FineType> {
        FineType::new(self.bits, self.sym, group)
    }

    /// Bytes of a group's header: f16 scale, and f16 minimum when asymmetric.
    pub fn header_bytes(self) -> usize {
        if self.sym {
            2
        } else {
            4
        }
    }

    /// Bytes of the codes of one run of 32 values.
    pub fn run_bytes(self) -> usize {
        4 * self.bits as usize
    }

    /// Bytes of one whole group of `group` values.
    pub fn group_bytes(self) -> usize {
        self.header_bytes() + self.group() / RUN * self.run_bytes()
    }

    /// Bytes of a row of `n` values (a multiple of 32).
    pub fn row_bytes(self, n: u64) -> Result<u64> {
        if !n.is_multiple_of(RUN as u64) {
            return Err(Error::invalid(format!("row of {n} values is not a multiple of 32 ({self})")));
        }
        let groups = n.div_ceil(self.group as u64);
        (n / RUN as u64)
            .checked_mul(self.run_bytes() as u64)
            .and_then(|c| c.checked_add(groups * self.header_bytes() as u64))
            .ok_or_else(|| Error::invalid("tensor size overflows"))
    }

    /// Byte offset of run `b`'s codes and of its group's header inside a row.
    #[inline]
    pub fn run_offsets(self, b: usize) -> (usize, usize) {
        let per = self.group() / RUN;
        let (g, j) = (b / per, b % per);
        let header = g * self.group_bytes();
        (header + self.header_bytes() + j * self.run_bytes(), header)
    }

    /// The offset added to `d·u`: `m` when asymmetric, −2^(bits−1)·d for symmetric 4-bit
    /// codes, 0 for the signed 8-bit ones.
    #[inline]
    pub fn offset(self, d: f32, m: f32) -> f32 {
        match (self.sym, self.bits) {
            (false, _) => m,
            (true, 8) => 0.0,
            (true, b) => -((1u32 << (b - 1)) as f32) * d,
        }
    }

    /// Short name as `cairn convert` and error messages print it, e.g. `fq4/g64`.
    pub fn label(self) -> String {
        let s = if self.sym && self.bits == 4 { "s" } else { "" };
        format!("int{}{s}/g{}", self.bits, self.group)
    }
}

impl core::fmt::Display for FineType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.label())
    }
}

/// The 32 codes of one run (as unsigned values; 8-bit codes as their signed value).
pub fn unpack_run(ft: FineType, codes: &[u8], out: &mut [i16; RUN]) {
    match ft.bits {
        8 => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = c as i8 as i16;
            }
        }
        4 => {
            for j in 0..16 {
                out[j] = (codes[j] & 15) as i16;
                out[j + 16] = (codes[j] >> 4) as i16;
            }
        }
        _ => {
            for j in 0..8 {
                for k in 0..4 {
                    out[j + 8 * k] = ((codes[j] >> (2 * k)) & 3) as i16;
                }
            }
            if ft.bits == 3 {
                let hi = u32::from_le_bytes([codes[8], codes[9], codes[10], codes[11]]);
                for (j, o) in out.iter_mut().enumerate() {
                    *o |= (((hi >> j) & 1) << 2) as i16;
                }
            }
        }
    }
}

fn pack_run(ft: FineType, u: &[i16; RUN], codes: &mut [u8]) {
    match ft.bits {
        8 => {
            for (c, &v) in codes.iter_mut().zip(u) {
                *c = v as i8 as u8;
            }
        }
        4 => {
            for j in 0..16 {
                codes[j] = (u[j] as u8 & 15) | ((u[j + 16] as u8 & 15) << 4);
            }
        }
        _ => {
            for j in 0..8 {
                codes[j] = (0..4).fold(0u8, |acc, k| acc | ((u[j + 8 * k] as u8 & 3) << (2 * k)));
            }
            if ft.bits == 3 {
                let hi = u.iter().enumerate().fold(0u32, |acc, (j, &v)| acc | ((((v >> 2) & 1) as u32) << j));
                codes[8..12].copy_from_slice(&hi.to_le_bytes());
            }
        }
    }
}

fn f16_get(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// The group header `(d, m)` at `h` (m = 0 when symmetric).
#[inline]
pub fn header(ft: FineType, h: &[u8]) -> (f32, f32) {
    let d = f16_get(h);
    (d, if ft.sym { 0.0 } else { f16_get(&h[2..]) })
}

fn check_row(ft: FineType, bytes: usize, n: usize) -> Result<()> {
    let want = ft.row_bytes(n as u64)?;
    if want != bytes as u64 {
        return Err(Error::invalid(format!("{ft} row of {n} values needs {want} bytes, {bytes} given")));
    }
    Ok(())
}

/// Decode one row of `dst.len()` values.
pub fn dequantize_row(ft: FineType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    check_row(ft, src.len(), dst.len())?;
    let mut u = [0i16; RUN];
    for (b, y) in dst.chunks_exact_mut(RUN).enumerate() {
        let (c, h) = ft.run_offsets(b);
        let (d, m) = header(ft, &src[h..]);
        let off = ft.offset(d, m);
        unpack_run(ft, &src[c..c + ft.run_bytes()], &mut u);
        for (y, &u) in y.iter_mut().zip(&u) {
            *y = d * u as f32 + off;
        }
    }
    Ok(())
}

/// Dot product of one encoded row with `x` (the dequantized row's dot, up to order).
pub fn dot_row(ft: FineType, src: &[u8], x: &[f32]) -> Result<f32> {
    check_row(ft, src.len(), x.len())?;
    let mut u = [0i16; RUN];
    let mut acc = 0.0f32;
    for (b, x) in x.chunks_exact(RUN).enumerate() {
        let (c, h) = ft.run_offsets(b);
        let (d, m) = header(ft, &src[h..]);
        let off = ft.offset(d, m);
        unpack_run(ft, &src[c..c + ft.run_bytes()], &mut u);
        acc += x.iter().zip(&u).map(|(x, &u)| (d * u as f32 + off) * x).sum::<f32>();
    }
    Ok(acc)
}

/// Encode one row of `src.len()` values into `dst`.
pub fn quantize_row(ft: FineType, rounding: Rounding, src: &[f32], dst: &mut [u8]) -> Result<()> {
    check_row(ft, dst.len(), src.len())?;
    let mut codes = vec![0i16; ft.group()];
    let mut at = 0;
    for x in src.chunks(ft.group()) {
        let codes = &mut codes[..x.len()];
        let (d, m) = fit_group(ft, rounding, x, codes);
        let hdr = &mut dst[at..at + ft.header_bytes()];
        hdr[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        if !ft.sym {
            hdr[2..4].copy_from_slice(&half::f16::from_f32(m).to_le_bytes());
        }
        at += ft.header_bytes();
        for run in codes.chunks_exact(RUN) {
            let mut u = [0i16; RUN];
            u.copy_from_slice(run);
            pack_run(ft, &u, &mut dst[at..at + ft.run_bytes()]);
            at += ft.run_bytes();
        }
    }
    Ok(())
}

/// Squared error of a row quantized with `ft` (no bytes written: the converter's group
/// search calls this for every candidate).
pub fn row_error(ft: FineType, rounding: Rounding, src: &[f32]) -> f64 {
    let mut codes = vec![0i16; ft.group()];
    let mut err = 0.0f64;
    for x in src.chunks(ft.group()) {
        let codes = &mut codes[..x.len()];
        let (d, m) = fit_group(ft, rounding, x, codes);
        err += group_error(ft, x, codes, d, m);
    }
    err
}

/// Code range `(lo, hi)` of the type.
fn code_range(ft: FineType) -> (i32, i32) {
    match (ft.sym, ft.bits) {
        (true, 8) => (-127, 127),
        (_, b) => (0, (1 << b) - 1),
    }
}

/// Codes of `x` for the stored (f16-rounded) `d` and `m`.
fn assign(ft: FineType, x: &[f32], d: f32, m: f32, codes: &mut [i16]) {
    let (lo, hi) = code_range(ft);
    let off = ft.offset(d, m);
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (c, &x) in codes.iter_mut().zip(x) {
        let q = round_half_away((x - off) * inv);
        *c = if q.is_nan() { lo.max(0) as i16 } else { (q as i32).clamp(lo, hi) as i16 };
    }
}

fn group_error(ft: FineType, x: &[f32], codes: &[i16], d: f32, m: f32) -> f64 {
    let off = ft.offset(d, m);
    x.iter()
        .zip(codes)
        .map(|(&x, &u)| {
            let e = (d * u as f32 + off - x) as f64;
            e * e
        })
        .sum()
}

/// Scale and minimum (f16-rounded, as stored) and the codes of one group.
fn fit_group(ft: FineType, rounding: Rounding, x: &[f32], codes: &mut [i16]) -> (f32, f32) {
    let (lo, hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (clo, chi) = code_range(ft);
    // The candidates differ only in how much of the range they clip.
    let start = |shrink: f32| -> (f32, f32) {
        if ft.sym {
            // Scale from the value of largest magnitude, keeping its sign so that it
            // lands on the end of the code range that has one more step (as ggml's Q4_0).
            let mx = if abs(hi) >= abs(lo) { hi } else { lo };
            let d = match ft.bits {
                8 => abs(mx) / 127.0,
                b => mx / -((1u32 << (b - 1)) as f32),
            };
            (f16_round(d * shrink), 0.0)
        } else {
            let mid = 0.5 * (lo + hi);
            let (l, h) = (mid + (lo - mid) * shrink, mid + (hi - mid) * shrink);
            (f16_round((h - l) / (chi - clo) as f32), f16_round(l))
        }
    };
    let (d, m) = start(1.0);
    assign(ft, x, d, m, codes);
    if rounding == Rounding::MinMax {
        return (d, m);
    }
    let mut best = (group_error(ft, x, codes, d, m), d, m);
    let mut trial = vec![0i16; x.len()];
    for shrink in [1.0f32, 0.95, 0.9, 0.85, 0.8] {
        let (mut d, mut m) = start(shrink);
        for _ in 0..3 {
            assign(ft, x, d, m, &mut trial);
            let e = group_error(ft, x, &trial, d, m);
            if e < best.0 {
                best = (e, d, m);
                codes.copy_from_slice(&trial);
            }
            match refit(ft, x, &trial) {
                Some((nd, nm)) if (nd, nm) != (d, m) => (d, m) = (nd, nm),
                _ => break,
            }
        }
    }
    (best.1, best.2)
}

/// Least-squares `d` (and `m`) for fixed codes, rounded to f16.
fn refit(ft: FineType, x: &[f32], u: &[i16]) -> Option<(f32, f32)> {
    let n = x.len() as f64;
    if ft.sym {
        let shift = ft.offset(1.0, 0.0) as f64;
        let (su, sx) = u.iter().zip(x).fold((0.0, 0.0), |(a, b), (&u, &x)| {
            let t = u as f64 + shift;
            (a + t * t, b + t * x as f64)
        });
        (su > 0.0).then(|| (f16_round((sx / su) as f32), 0.0))
    } else {
        let (mut su, mut suu, mut sx, mut sux) = (0.0, 0.0, 0.0, 0.0);
        for (&u, &x) in u.iter().zip(x) {
            let (u, x) = (u as f64, x as f64);
            su += u;
            suu += u * u;
            sx += x;
            sux += u * x;
        }
        let det = n * suu - su * su;
        if det <= 1e-12 * n * suu {
            return None;
        }
        let d = (n * sux - su * sx) / det;
        let m = (sx - d * su) / n;
        Some((f16_round(d as f32), f16_round(m as f32)))
    }
}

/// The outcome of the adaptive group rule for one matrix.
#[derive(Debug, Clone)]
pub struct GroupChoice {
    pub group: usize,
    /// `(group, squared error of the whole matrix)` for every candidate tried, largest
    /// group first.
    pub errors: Vec<(usize, f64)>,
}

/// Group sizes the adaptive rule starts from and halves through.
pub const AUTO_GROUPS: [usize; 4] = [256, 128, 64, 32];

/// The adaptive rule's threshold: a group size is accepted when the matrix's squared
/// error with it is at most this many times its error with groups of 32.
pub const AUTO_THRESHOLD: f64 = 1.5;

/// FineQuant's weights-only rule, per matrix: try groups from the largest down and take
/// the first (largest) whose squared rounding error is at most `threshold` × the error
/// with the smallest group (32).
///
/// A group holding an outlier gets a step sized to the outlier, which inflates the
/// rounding error of all its other values; smaller groups confine that damage. Where
/// outliers are rare or absent, large groups cost little extra error and save header
/// bytes (an asymmetric int4 group of 256 costs 4.13 bits per weight, one of 32 costs
/// 5), so the rule keeps them; where they are common the error of large groups grows
/// past the threshold and the rule shrinks the groups. `error(ft)` is the matrix's
/// squared error when encoded as `ft` (see [`matrix_error`]; callers may compute it in
/// parallel).
pub fn choose_group(base: FineType, threshold: f64, mut error: impl FnMut(FineType) -> f64) -> GroupChoice {
    let mut err = |g: usize| base.with_group(g).map_or(f64::INFINITY, &mut error);
    let finest = AUTO_GROUPS[AUTO_GROUPS.len() - 1];
    let floor = err(finest);
    let mut errors = Vec::new();
    for &g in &AUTO_GROUPS[..AUTO_GROUPS.len() - 1] {
        let e = err(g);
        errors.push((g, e));
        if e <= threshold * floor {
            errors.push((finest, floor));
            return GroupChoice { group: g, errors };
        }
    }
    errors.push((finest, floor));
    GroupChoice { group: finest, errors }
}

/// Squared error of whole rows of `n` values encoded as `ft`.
pub fn matrix_error(ft: FineType, rounding: Rounding, rows: &[f32], n: usize) -> f64 {
    rows.chunks_exact(n).map(|r| row_error(ft, rounding, r)).sum()
}
