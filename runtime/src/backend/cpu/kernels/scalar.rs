//! The reference: each block decoded to (u, d, m), then plain integer loops.

use cairn_formats::GgmlType;
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

pub fn dot(ty: GgmlType, w: &[u8], x: Q8Row<'_>) -> f32 {
    let bs = ty.type_size();
    let mut acc = 0f32;
    for (b, blk) in w.chunks_exact(bs).enumerate() {
        let (u, d, m) = unpack(ty, blk);
        let xq = &x.qs[b * QK..(b + 1) * QK];
        let s: i32 = u.iter().zip(xq).map(|(&u, &q)| u as i32 * q as i32).sum();
        let off = if super::has_min(ty) { x.s[b] } else { x.d[b] * x.sum[b] as f32 };
        acc += d * x.d[b] * s as f32 + m * off;
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
