//! ggml's original 32-value blocks: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.
//!
//! Byte layouts (little-endian, f16 scales), as `block_q*` in ggml-common.h:
//! - Q4_0 (18 B): d, qs[16]; value j is the low nibble of qs[j], value j+16 the high one.
//! - Q4_1 (20 B): d, m, qs[16].
//! - Q5_0 (22 B): d, qh (u32: bit j is the 5th bit of value j), qs[16].
//! - Q5_1 (24 B): d, m, qh, qs[16].
//! - Q8_0 (34 B): d, qs[32] as i8.
//!
//! Every function gets exactly one block: `b.len()` is the type size and `y`/`x` hold 32
//! values (the caller checked). Quantizers follow ggml's `quantize_row_*_ref` step by step
//! (same scale choice, same rounding) so that the bytes match llama.cpp's.

use super::num::{abs, f16_at, put_f16, round_half_away};

const QK: usize = 32;

/// The value of largest magnitude (first one on ties) and that magnitude: symmetric types
/// map it to the most negative level so that the full range of levels is used.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < abs(v) {
            amax = abs(v);
            max = v;
        }
    }
    (max, amax)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// `1/d`, or 0 for an all-zero block so that every value maps to the zero level.
fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The level for `v` with `bias` already added (0.5 plus the zero point): truncation, as
/// ggml's `(int8_t)(v + bias)`, then clamped to the valid levels.
fn level(v: f32, bias: f32, max: i32) -> u8 {
    ((v + bias) as i32).clamp(0, max) as u8
}

/// The 32 5-bit levels `l` split into low nibbles (`qs`) and the u32 of high bits.
fn pack5(l: &[u8; QK], qs: &mut [u8]) -> u32 {
    let mut qh = 0u32;
    for j in 0..QK / 2 {
        qs[j] = (l[j] & 0xF) | ((l[j + 16] & 0xF) << 4);
        qh |= u32::from(l[j] >> 4) << j;
        qh |= u32::from(l[j + 16] >> 4) << (j + 16);
    }
    qh
}

/// The 5-bit level of value `j` (0..32) of a Q5 block.
fn level5(qs: &[u8], qh: u32, j: usize) -> u8 {
    let lo = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
    lo | ((((qh >> j) & 1) as u8) << 4)
}

fn qh_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(super) fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = (i32::from(q & 0xF) - 8) as f32 * d;
        y[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
    }
}

pub(super) fn quant_q4_0(x: &[f32], b: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    for j in 0..QK / 2 {
        let lo = level(x[j] * id, 8.5, 15);
        let hi = level(x[j + 16] * id, 8.5, 15);
        b[2 + j] = lo | (hi << 4);
    }
}

pub(super) fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = f32::from(q & 0xF) * d + m;
        y[j + 16] = f32::from(q >> 4) * d + m;
    }
}

pub(super) fn quant_q4_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    for j in 0..QK / 2 {
        let lo = level((x[j] - min) * id, 0.5, 15);
        let hi = level((x[j + 16] - min) * id, 0.5, 15);
        b[4 + j] = lo | (hi << 4);
    }
}

pub(super) fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = qh_at(b, 2);
    let qs = &b[6..22];
    for (j, y) in y.iter_mut().enumerate() {
        *y = (i32::from(level5(qs, qh, j)) - 16) as f32 * d;
    }
}

pub(super) fn quant_q5_0(x: &[f32], b: &mut [u8]) {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    let mut l = [0u8; QK];
    for (l, &v) in l.iter_mut().zip(x) {
        *l = level(v * id, 16.5, 31);
    }
    let qh = pack5(&l, &mut b[6..22]);
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

pub(super) fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = qh_at(b, 4);
    let qs = &b[8..24];
    for (j, y) in y.iter_mut().enumerate() {
        *y = f32::from(level5(qs, qh, j)) * d + m;
    }
}

pub(super) fn quant_q5_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    put_f16(b, 2, min);
    let mut l = [0u8; QK];
    for (l, &v) in l.iter_mut().zip(x) {
        *l = level((v - min) * id, 0.5, 31);
    }
    let qh = pack5(&l, &mut b[8..24]);
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

pub(super) fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = f32::from(q as i8) * d;
    }
}

pub(super) fn quant_q8_0(x: &[f32], b: &mut [u8]) {
    let (_, amax) = signed_absmax(x);
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(b, 0, d);
    for (q, &v) in b[2..34].iter_mut().zip(x) {
        // `as i8` saturates (and maps NaN to 0); in range it is exact.
        *q = round_half_away(v * id) as i8 as u8;
    }
}
