//! aarch64 kernels with the dot-product extension (`sdot`).

use std::arch::aarch64::*;
use std::arch::asm;

use cairn_formats::GgmlType;

use super::{scalar, Q8Row, QK};

/// `vdotq_s32` (`sdot`): four 4-way i8 dot products added to `acc`. The intrinsic is
/// still unstable (`stdarch_neon_dotprod`, rust-lang/rust#117224) while the `dotprod`
/// target feature is stable, so it is spelled as the one instruction it compiles to.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn vdotq_s32(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: register-only arithmetic; the caller was compiled with dotprod enabled.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// One row: each block unpacked by the scalar reference into signed values (u − 0 or
/// the sign-folded form), then `vdotq_s32` over 16-byte halves.
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot(ty: GgmlType, w: &[u8], x: Q8Row<'_>) -> f32 {
    let bs = ty.type_size();
    let mut acc = vdupq_n_f32(0.0);
    let mut off = 0f32;
    for (b, blk) in w.chunks_exact(bs).enumerate() {
        let (u, d, m) = scalar::unpack(ty, blk);
        // u ≤ 255 does not fit i8: split off 128 when the type needs it (Q8_0).
        let (u, m) = if ty == GgmlType::Q8_0 {
            let mut s = [0u8; QK];
            for j in 0..QK {
                s[j] = (u[j] as i16 - 128) as i8 as u8;
            }
            (s, 0.0)
        } else {
            (u, m)
        };
        let ua = vreinterpretq_s8_u8(vld1q_u8(u.as_ptr()));
        let ub = vreinterpretq_s8_u8(vld1q_u8(u.as_ptr().add(16)));
        let xa = vld1q_s8(x.qs.as_ptr().add(b * QK));
        let xb = vld1q_s8(x.qs.as_ptr().add(b * QK + 16));
        let p = vdotq_s32(vdotq_s32(vdupq_n_s32(0), ua, xa), ub, xb);
        let dx = x.d[b];
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), d * dx);
        off += m * if super::has_min(ty) { x.s[b] } else { dx * x.sum[b] as f32 };
    }
    vaddvq_f32(acc) + off
}

/// One FineQuant row: each run of 32 codes unpacked by the scalar reference (codes fit
/// i8: unsigned ones are at most 15, 8-bit ones are signed), then `vdotq_s32`.
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot_fine(ty: GgmlType, w: &[u8], x: Q8Row<'_>) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    let mut off = 0f32;
    let mut u = [0i8; QK];
    for b in 0..x.qs.len() / QK {
        let (codes, d, m) = scalar::unpack32(ty, w, b);
        for (u, c) in u.iter_mut().zip(codes) {
            *u = c as i8;
        }
        let ua = vld1q_s8(u.as_ptr());
        let ub = vld1q_s8(u.as_ptr().add(16));
        let xa = vld1q_s8(x.qs.as_ptr().add(b * QK));
        let xb = vld1q_s8(x.qs.as_ptr().add(b * QK + 16));
        let p = vdotq_s32(vdotq_s32(vdupq_n_s32(0), ua, xa), ub, xb);
        let dx = x.d[b];
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(p), d[0] * dx);
        off += m * if super::has_min(ty) { x.s[b] } else { dx * x.sum[b] as f32 };
    }
    vaddvq_f32(acc) + off
}

pub fn matvec(ty: GgmlType, w: &[u8], row_bytes: usize, x: Q8Row<'_>, out: &mut [f32]) {
    assert!(w.len() >= out.len() * row_bytes && ty.row_bytes(x.qs.len() as u64) == Ok(row_bytes as u64));
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        // SAFETY: `Isa::NeonDot` is only chosen when neon and dotprod were detected;
        // the assertion above bounds every block read.
        *o = unsafe {
            match ty {
                GgmlType::Fine(_) => dot_fine(ty, row, x),
                _ => dot(ty, row, x),
            }
        };
    }
}
