//! The reference: each block decoded to (u, d, m), then plain integer loops.

use cairn_formats::{fine, GgmlType};
use half::f16;

use super::{Q8Row, QK};

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// One weight block as 32 unsigned values, scale and offset (see the module docs).
pub fn unpack(ty: GgmlType, b: &[u8]) -> ([u8; QK], f32, f32) {
    let mut u = [0u8; QK];
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let (d, m, qs) = match ty {
                GgmlType::Q4_0 => (f16_at(b, 0), -8.0 * f16_at(b, 0), &b[2..18]),
                _ => (f16_at(b, 0), f16_at(b, 2), &b[4..20]),
            };
            for j in 0..16 {
                u[j] = qs[j] & 0x0F;
                u[j + 16] = qs[j] >> 4;
            }
            (u, d, m)
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (d, m, at) = match ty {
                GgmlType::Q5_0 => (f16_at(b, 0), -16.0 * f16_at(b, 0), 2),
                _ => (f16_at(b, 0), f16_at(b, 2), 4),
            };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            let qs = &b[at + 4..at + 20];
            for j in 0..16 {
                u[j] = (qs[j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
                u[j + 16] = (qs[j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            }
            (u, d, m)
        }
        GgmlType::Q8_0 => {
            let d = f16_at(b, 0);
            for j in 0..QK {
                u[j] = (b[2 + j] as i8 as i16 + 128) as u8;
            }
            (u, d, -128.0 * d)
        }
        _ => unreachable!("no integer kernel for {ty}"),
    }
}

/// The k-quants' 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The `b`-th run of 32 values of a row as signed integers, the scales of its two
/// halves, and its offset: legacy blocks are one run each; a k-quant super-block of 256
/// holds eight (Q4_K, Q5_K: a scale and min per run; Q6_K: a scale per 16 values).
pub fn unpack32(ty: GgmlType, row: &[u8], b: usize) -> ([i16; QK], [f32; 2], f32) {
    let mut w = [0i16; QK];
    match ty {
        GgmlType::Q4K => {
            let sb = &row[(b / 8) * 144..(b / 8 + 1) * 144];
            let j = b % 8;
            let (sc, m) = scale_min_k4(j, &sb[4..16]);
            let qs = &sb[16 + 32 * (j / 2)..16 + 32 * (j / 2) + 32];
            for i in 0..QK {
                w[i] = if j.is_multiple_of(2) { qs[i] & 0x0F } else { qs[i] >> 4 } as i16;
            }
            let d = f16_at(sb, 0) * sc as f32;
            (w, [d, d], -f16_at(sb, 2) * m as f32)
        }
        GgmlType::Q5K => {
            // Q4_K's layout plus `qh[32]` before the nibbles: bit j of qh[i] is the
            // fifth bit of value i of run j.
            let sb = &row[(b / 8) * 176..(b / 8 + 1) * 176];
            let j = b % 8;
            let (sc, m) = scale_min_k4(j, &sb[4..16]);
            let qs = &sb[48 + 32 * (j / 2)..48 + 32 * (j / 2) + 32];
            let qh = &sb[16..48];
            for i in 0..QK {
                let lo = if j.is_multiple_of(2) { qs[i] & 0x0F } else { qs[i] >> 4 };
                w[i] = (lo | (((qh[i] >> j) & 1) << 4)) as i16;
            }
            let d = f16_at(sb, 0) * sc as f32;
            (w, [d, d], -f16_at(sb, 2) * m as f32)
        }
        GgmlType::Q6K => {
            let sb = &row[(b / 8) * 210..(b / 8 + 1) * 210];
            let (h, part) = ((b % 8) / 4, b % 4);
            let ql = &sb[64 * h + 32 * (part & 1)..64 * h + 32 * (part & 1) + 32];
            let qh = &sb[128 + 32 * h..128 + 32 * h + 32];
            for i in 0..QK {
                let lo = if part < 2 { ql[i] & 0x0F } else { ql[i] >> 4 };
                let hi = (qh[i] >> (2 * part)) & 3;
                w[i] = (lo | (hi << 4)) as i16 - 32;
            }
            let (d, sc) = (f16_at(sb, 208), &sb[192..208]);
            let s = |k: usize| d * (sc[8 * h + 2 * part + k] as i8) as f32;
            (w, [s(0), s(1)], 0.0)
        }
        GgmlType::Fine(ft) => {
            let (c, h) = ft.run_offsets(b);
            fine::unpack_run(ft, &row[c..c + ft.run_bytes()], &mut w);
            let (d, m) = fine::header(ft, &row[h..]);
            (w, [d, d], ft.offset(d, m))
        }
        _ => {
            let bs = ty.type_size();
            let (u, d, m) = unpack(ty, &row[b * bs..(b + 1) * bs]);
            for i in 0..QK {
                w[i] = u[i] as i16;
            }
            (w, [d, d], m)
        }
    }
}

pub fn dot(ty: GgmlType, w: &[u8], x: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    for b in 0..x.qs.len() / QK {
        let (w, d, m) = unpack32(ty, w, b);
        let xq = &x.qs[b * QK..(b + 1) * QK];
        let half = |r: std::ops::Range<usize>| -> i32 { r.map(|i| w[i] as i32 * xq[i] as i32).sum() };
        let off = if super::has_min(ty) { x.s[b] } else { x.d[b] * x.sum[b] as f32 };
        acc += x.d[b] * (d[0] * half(0..16) as f32 + d[1] * half(16..32) as f32) + m * off;
    }
    acc
}

pub fn matvec(ty: GgmlType, w: &[u8], row_bytes: usize, x: Q8Row<'_>, out: &mut [f32]) {
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        *o = dot(ty, row, x);
    }
}

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

pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// The reference of [`super::sign_rank_row`].
pub fn sign_rank_row(u: &[f32], v: &[f32], signs: &[u8], out: &mut [f32]) {
    let n = out.len();
    for (j, o) in out.iter_mut().enumerate() {
        let t: f32 = u.iter().enumerate().map(|(r, &a)| a * v[r * n + j]).sum();
        let neg = (signs[j / 8] >> (j % 8)) & 1 != 0;
        *o += if neg { -t } else { t };
    }
}
