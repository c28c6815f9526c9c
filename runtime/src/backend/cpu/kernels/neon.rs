//! aarch64 kernels with the dot-product extension (`sdot`).
//!
//! Repacked groups of eight rows (see `repack`, the same layouts as x86) run through the
//! by-element `sdot`: a 128-bit weight vector holds four bytes of each of four rows, one
//! row per 32-bit lane, and `sdot acc.4s, w.16b, x.4b[l]` multiplies them by the same four
//! activation bytes, so every lane sums one row with no horizontal adds. A 256-bit
//! group vector of the layout is two such vectors (rows 0–3, rows 4–7). Every value the
//! kernels multiply fits i8 (4-, 5- and 6-bit codes are at most 63; Q8_0 is stored
//! offset by 128 and flipped back), so the signed `sdot` is exact.
//!
//! Matrices that were not repacked (row counts off the groups of 8, FineQuant) take the
//! per-row path: each run of 32 values unpacked by the scalar reference, then `sdot`.

use std::arch::aarch64::*;
use std::arch::asm;

use cairn_formats::GgmlType;

use super::repack::R8;
use super::{scalar, Q8Acts, Q8Row, QK};

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

/// `vdotq_laneq_s32` (`sdot` by element): lane r of `acc` += Σ_i a[4r + i] · b[4L + i],
/// the four bytes `4L..4L + 4` of `b` broadcast to every lane.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot_lane<const L: usize>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    macro_rules! at {
        ($t:literal) => {
            asm!(
                $t,
                acc = inout(vreg) acc,
                a = in(vreg) a,
                b = in(vreg) b,
                options(pure, nomem, nostack, preserves_flags),
            )
        };
    }
    // SAFETY: register-only arithmetic; the caller was compiled with dotprod enabled.
    unsafe {
        match L {
            0 => at!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[0]"),
            1 => at!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[1]"),
            2 => at!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[2]"),
            _ => at!("sdot {acc:v}.4s, {a:v}.16b, {b:v}.4b[3]"),
        }
    }
    acc
}

/// Four little-endian f16 values at `p` to f32 (`fcvtl`: base ARMv8 floating point, but
/// the f16 vector types are unstable in Rust, so the instruction is spelled out).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f16x4(p: *const u8) -> float32x4_t {
    let h = vreinterpret_u16_u8(vld1_u8(p));
    let out: float32x4_t;
    // SAFETY: register-only conversion.
    unsafe {
        asm!(
            "fcvtl {o:v}.4s, {h:v}.4h",
            o = lateout(vreg) out,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    out
}

/// The eight rows' f16 values at `p` (row order) as rows 0–3 and 4–7.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f16x8(p: *const u8) -> [float32x4_t; 2] {
    [f16x4(p), f16x4(p.add(8))]
}

/// Eight u8 values (one per row) as f32, rows 0–3 and 4–7.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn u8x8_f32(v: uint8x8_t) -> [float32x4_t; 2] {
    let w = vmovl_u8(v);
    [vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))), vcvtq_f32_u32(vmovl_high_u16(w))]
}

/// Block types, as const parameters (the same numbering as x86.rs).
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;
const Q4K: u8 = 5;
const Q6K: u8 = 6;
const Q5K: u8 = 7;

const fn type_size(t: u8) -> usize {
    match t {
        Q4_0 => 18,
        Q4_1 => 20,
        Q5_0 => 22,
        Q5_1 => 24,
        Q4K => 144,
        Q5K => 176,
        Q6K => 210,
        _ => 34,
    }
}

const fn is_k(t: u8) -> bool {
    matches!(t, Q4K | Q5K | Q6K)
}

/// One run of 32 values of eight repacked rows, ready for [`rows32`]: `w[g][h]` holds
/// values `4g..4g + 4` of rows `4h..4h + 4` (lane per row); `d` the scale of each row
/// (for Q6_K, `d` covers values 0..16 and `d2` values 16..32); `m` the offset per row
/// (times Σx or ggml's f16 `s`, see [`has_min`]).
struct Run {
    w: [[int8x16_t; 2]; 8],
    d: [float32x4_t; 2],
    d2: [float32x4_t; 2],
    m: [float32x4_t; 2],
}

/// Whether the offset multiplies ggml's f16-rounded `d·Σx` (Q4_1, Q5_1).
const fn has_min(t: u8) -> bool {
    t == Q4_1 || t == Q5_1
}

/// Where `pick` / `bit` find the fifth bit of vector group g of Q5_0/Q5_1 (as x86's
/// `fifth_bits`): byte g/2 of each lane's 32 high bits, in all four bytes, then bit
/// `4(g % 2) + i` in byte i.
const fn fifth_pick(g: usize) -> [u8; 16] {
    let mut p = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        p[i] = (i / 4 * 4 + g / 2) as u8;
        i += 1;
    }
    p
}

const fn fifth_bit(g: usize) -> [u8; 16] {
    let mut p = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        p[i] = 1 << (i % 4 + 4 * (g % 2));
        i += 1;
    }
    p
}

const PICK: [[u8; 16]; 8] = [
    fifth_pick(0),
    fifth_pick(1),
    fifth_pick(2),
    fifth_pick(3),
    fifth_pick(4),
    fifth_pick(5),
    fifth_pick(6),
    fifth_pick(7),
];
const BIT: [[u8; 16]; 8] =
    [fifth_bit(0), fifth_bit(1), fifth_bit(2), fifth_bit(3), fifth_bit(4), fifth_bit(5), fifth_bit(6), fifth_bit(7)];

/// Run `b` of the group at `p` (see `repack` for every layout).
///
/// Safety: `p` holds the group's blocks up to run `b`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn run<const T: u8>(p: *const u8, b: usize) -> Run {
    let zero = vdupq_n_f32(0.0);
    let mask = vdupq_n_u8(0x0F);
    let s8 = vreinterpretq_s8_u8;
    let mut w = [[vdupq_n_s8(0); 2]; 8];
    match T {
        Q8_0 => {
            let blk = p.add(b * R8 * 34);
            for (g, w) in w.iter_mut().enumerate() {
                for (h, w) in w.iter_mut().enumerate() {
                    // Stored as w + 128 (the top bit flipped): flip it back.
                    *w = s8(veorq_u8(vld1q_u8(blk.add(16 + 32 * g + 16 * h)), vdupq_n_u8(0x80)));
                }
            }
            Run { w, d: f16x8(blk), d2: [zero; 2], m: [zero; 2] }
        }
        Q4K | Q5K => {
            let (gb, at) = if T == Q5K { (1408, 384) } else { (1152, 128) };
            let blk = p.add((b / 8) * gb);
            let j = b % 8;
            let q = |i: usize| vld1_u8(blk.add(32 + 8 * i));
            let (sc, m) = if j < 4 {
                (vand_u8(q(j), vdup_n_u8(63)), vand_u8(q(j + 4), vdup_n_u8(63)))
            } else {
                let top = |v: uint8x8_t| vshl_n_u8::<4>(vshr_n_u8::<6>(v));
                (vorr_u8(vand_u8(q(j + 4), vdup_n_u8(15)), top(q(j - 4))), vorr_u8(vshr_n_u8::<4>(q(j + 4)), top(q(j))))
            };
            let (dv, mv) = (f16x8(blk), f16x8(blk.add(16)));
            let (sc, m) = (u8x8_f32(sc), u8x8_f32(m));
            let pair = blk.add(at + 256 * (j / 2));
            // Bit j of every qh byte to bit 4 (a negative count shifts right).
            let shift = vdupq_n_s8(4 - j as i8);
            for (g, w) in w.iter_mut().enumerate() {
                for (h, w) in w.iter_mut().enumerate() {
                    let v = vld1q_u8(pair.add(32 * g + 16 * h));
                    let mut u = if j.is_multiple_of(2) { vandq_u8(v, mask) } else { vshrq_n_u8::<4>(v) };
                    if T == Q5K {
                        let qh = vld1q_u8(blk.add(128 + 32 * g + 16 * h));
                        u = vorrq_u8(u, vandq_u8(vshlq_u8(qh, shift), vdupq_n_u8(0x10)));
                    }
                    *w = s8(u);
                }
            }
            let d = [vmulq_f32(dv[0], sc[0]), vmulq_f32(dv[1], sc[1])];
            let m = [vnegq_f32(vmulq_f32(mv[0], m[0])), vnegq_f32(vmulq_f32(mv[1], m[1]))];
            Run { w, d, d2: [zero; 2], m }
        }
        Q6K => {
            let blk = p.add((b / 8) * 1680);
            let j = b % 8;
            let dv = f16x8(blk);
            let scale = |i: usize| {
                let s = vmovl_s8(vld1_s8(blk.add(16 + 8 * i) as *const i8));
                [
                    vmulq_f32(dv[0], vcvtq_f32_s32(vmovl_s16(vget_low_s16(s)))),
                    vmulq_f32(dv[1], vcvtq_f32_s32(vmovl_high_s16(s))),
                ]
            };
            let run = blk.add(144 + 192 * j);
            let two = vdupq_n_u8(0x30);
            // Two halves of eight vectors each: indices read clearer than iterators.
            #[allow(clippy::needless_range_loop)]
            for h in 0..2 {
                let (h0, h1) = (vld1q_u8(run.add(128 + 16 * h)), vld1q_u8(run.add(160 + 16 * h)));
                // Bits 2k, 2k + 1 of every byte of `hb` moved to bits 4, 5.
                let top = |hb: uint8x16_t, k: usize| {
                    let v = match k {
                        0 => vshlq_n_u8::<4>(hb),
                        1 => vshlq_n_u8::<2>(hb),
                        2 => hb,
                        _ => vshrq_n_u8::<2>(hb),
                    };
                    vandq_u8(v, two)
                };
                for k in 0..4 {
                    let v = vld1q_u8(run.add(32 * k + 16 * h));
                    w[k][h] = s8(vorrq_u8(vandq_u8(v, mask), top(h0, k)));
                    w[4 + k][h] = s8(vorrq_u8(vshrq_n_u8::<4>(v), top(h1, k)));
                }
            }
            Run { w, d: scale(2 * j), d2: scale(2 * j + 1), m: [zero; 2] }
        }
        _ => {
            let gb = R8 * type_size(T);
            let blk = p.add(b * gb);
            let dv = f16x8(blk);
            let (m, qh_at) = match T {
                Q4_0 => ([vmulq_n_f32(dv[0], -8.0), vmulq_n_f32(dv[1], -8.0)], 0),
                Q4_1 => (f16x8(blk.add(16)), 0),
                Q5_0 => ([vmulq_n_f32(dv[0], -16.0), vmulq_n_f32(dv[1], -16.0)], 16),
                _ => (f16x8(blk.add(16)), 32),
            };
            let qs = if qh_at > 0 {
                qh_at + 32
            } else if T == Q4_1 {
                32
            } else {
                16
            };
            #[allow(clippy::needless_range_loop)]
            for h in 0..2 {
                let qh = if qh_at > 0 { vld1q_u8(blk.add(qh_at + 16 * h)) } else { vdupq_n_u8(0) };
                let fifth = |g: usize| {
                    if qh_at == 0 {
                        return vdupq_n_u8(0);
                    }
                    let set = vtstq_u8(vqtbl1q_u8(qh, vld1q_u8(PICK[g].as_ptr())), vld1q_u8(BIT[g].as_ptr()));
                    vandq_u8(set, vdupq_n_u8(0x10))
                };
                for k in 0..4 {
                    let v = vld1q_u8(blk.add(qs + 32 * k + 16 * h));
                    w[k][h] = s8(vorrq_u8(vandq_u8(v, mask), fifth(k)));
                    w[4 + k][h] = s8(vorrq_u8(vshrq_n_u8::<4>(v), fifth(4 + k)));
                }
            }
            Run { w, d: dv, d2: [zero; 2], m }
        }
    }
}

/// Row sums of one run against one token's 32 activations (`x0` = values 0..16, `x1` =
/// 16..32): per half of the rows, the sums over values 0..16 and 16..32 apart.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn rows32(w: &[[int8x16_t; 2]; 8], x0: int8x16_t, x1: int8x16_t) -> [[int32x4_t; 2]; 2] {
    let z = vdupq_n_s32(0);
    let mut out = [[z; 2]; 2];
    for (h, o) in out.iter_mut().enumerate() {
        let a = sdot_lane::<0>(z, w[0][h], x0);
        let b = sdot_lane::<0>(z, w[4][h], x1);
        let a = sdot_lane::<1>(a, w[1][h], x0);
        let b = sdot_lane::<1>(b, w[5][h], x1);
        let a = sdot_lane::<2>(a, w[2][h], x0);
        let b = sdot_lane::<2>(b, w[6][h], x1);
        let a = sdot_lane::<3>(a, w[3][h], x0);
        let b = sdot_lane::<3>(b, w[7][h], x1);
        *o = [a, b];
    }
    out
}

/// Eight repacked rows × C tokens: `out[c * ld + r] = w_r · x_c`.
///
/// Safety: `p` holds `nb` runs of 32 values of the group (whole super-blocks for the
/// k-quants); each `xs[c]` has `nb` blocks; `out` has room for `(C - 1) * ld + 8` values.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn packed_group<const T: u8, const C: usize>(
    p: *const u8,
    nb: usize,
    xs: &[Q8Row<'_>; C],
    out: *mut f32,
    ld: usize,
) {
    let mut acc = [[vdupq_n_f32(0.0); 2]; C];
    for b in 0..nb {
        let r = run::<T>(p, b);
        for (c, x) in xs.iter().enumerate() {
            let xq = x.qs.as_ptr().add(b * QK);
            let (x0, x1) = (vld1q_s8(xq), vld1q_s8(xq.add(16)));
            let dx = *x.d.get_unchecked(b);
            let sums = rows32(&r.w, x0, x1);
            for h in 0..2 {
                let [a, bb] = sums[h];
                if T == Q6K {
                    // Σ (u − 32)·x per half, exactly: the offset goes in as integers.
                    let lo = *x.sum16.get_unchecked(b);
                    let hi = *x.sum.get_unchecked(b) - lo;
                    let a = vsubq_s32(a, vdupq_n_s32(32 * lo));
                    let bb = vsubq_s32(bb, vdupq_n_s32(32 * hi));
                    acc[c][h] = vfmaq_f32(acc[c][h], vcvtq_f32_s32(a), vmulq_n_f32(r.d[h], dx));
                    acc[c][h] = vfmaq_f32(acc[c][h], vcvtq_f32_s32(bb), vmulq_n_f32(r.d2[h], dx));
                } else {
                    let s = vaddq_s32(a, bb);
                    acc[c][h] = vfmaq_f32(acc[c][h], vcvtq_f32_s32(s), vmulq_n_f32(r.d[h], dx));
                    if T != Q8_0 {
                        let sx = if has_min(T) { *x.s.get_unchecked(b) } else { dx * *x.sum.get_unchecked(b) as f32 };
                        acc[c][h] = vfmaq_n_f32(acc[c][h], r.m[h], sx);
                    }
                }
            }
        }
    }
    for (c, a) in acc.iter().enumerate() {
        vst1q_f32(out.add(c * ld), a[0]);
        vst1q_f32(out.add(c * ld + 4), a[1]);
    }
}

/// Repacked rows × tokens: `out[t * rows + r]`; one token is the decode case.
#[target_feature(enable = "neon,dotprod")]
unsafe fn packed_body<const T: u8>(packed: &[u8], rows: usize, nb: usize, x: &Q8Acts, out: &mut [f32]) {
    let blocks = if is_k(T) { nb / 8 } else { nb };
    let gbytes = blocks * R8 * type_size(T);
    let (n, o) = (x.rows, out.as_mut_ptr());
    let xr: Vec<Q8Row<'_>> = (0..n).map(|t| x.row(t)).collect();
    for g in 0..rows / R8 {
        let p = packed.as_ptr().add(g * gbytes);
        let at = |c: usize| o.add(c * rows + g * R8);
        let mut c = 0;
        while c + 4 <= n {
            packed_group::<T, 4>(p, nb, &[xr[c], xr[c + 1], xr[c + 2], xr[c + 3]], at(c), rows);
            c += 4;
        }
        if c + 2 <= n {
            packed_group::<T, 2>(p, nb, &[xr[c], xr[c + 1]], at(c), rows);
            c += 2;
        }
        if c < n {
            packed_group::<T, 1>(p, nb, &[xr[c]], at(c), rows);
        }
    }
}

/// Repacked weights (`rows` a multiple of 8, `x.cols` values each) × every row of `x`:
/// `out[t * rows + r]`.
pub fn packed(ty: GgmlType, packed: &[u8], rows: usize, x: &Q8Acts, out: &mut [f32]) {
    assert!(super::repack::repackable(ty) && rows.is_multiple_of(R8), "not a repacked {ty} matrix of {rows} rows");
    let nb = x.cols / QK;
    let row_bytes = ty.row_bytes(x.cols as u64).unwrap_or(0) as usize;
    assert_eq!(packed.len(), rows * row_bytes, "repacked {ty} weights of the wrong size");
    assert!(
        !matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) || nb.is_multiple_of(8),
        "k-quant rows are whole super-blocks"
    );
    assert!(out.len() >= rows * x.rows, "output too short");
    assert!(
        x.qs.len() >= x.rows * x.cols
            && x.d.len() >= x.rows * nb
            && x.s.len() >= x.rows * nb
            && x.sum.len() >= x.rows * nb
            && x.sum16.len() >= x.rows * nb,
        "activations too short"
    );
    // SAFETY: `Isa::NeonDot` is only chosen when neon and dotprod were detected; the
    // assertions bound every group, block, activation and output the kernel touches.
    unsafe {
        match ty {
            GgmlType::Q4_0 => packed_body::<Q4_0>(packed, rows, nb, x, out),
            GgmlType::Q4_1 => packed_body::<Q4_1>(packed, rows, nb, x, out),
            GgmlType::Q5_0 => packed_body::<Q5_0>(packed, rows, nb, x, out),
            GgmlType::Q5_1 => packed_body::<Q5_1>(packed, rows, nb, x, out),
            GgmlType::Q8_0 => packed_body::<Q8_0>(packed, rows, nb, x, out),
            GgmlType::Q4K => packed_body::<Q4K>(packed, rows, nb, x, out),
            GgmlType::Q5K => packed_body::<Q5K>(packed, rows, nb, x, out),
            GgmlType::Q6K => packed_body::<Q6K>(packed, rows, nb, x, out),
            _ => unreachable!("no repacked kernel for {ty}"),
        }
    }
}

/// One row: each run of 32 values unpacked by the scalar reference into signed bytes
/// (Q8_0's `w + 128` as `w`, the 128·Σx put back as an integer; every other code fits
/// i8), then `vdotq_s32` per 16-value half and the reference's own float expression per
/// block, so the result equals the scalar kernel's bit for bit.
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot(ty: GgmlType, w: &[u8], x: Q8Row<'_>) -> f32 {
    let mut acc = 0f32;
    let mut u = [0i8; QK];
    let shift = if ty == GgmlType::Q8_0 { 128 } else { 0 };
    for b in 0..x.qs.len() / QK {
        let (codes, d, m) = scalar::unpack32(ty, w, b);
        for (u, c) in u.iter_mut().zip(codes) {
            *u = (c - shift) as i8;
        }
        let ua = vld1q_s8(u.as_ptr());
        let ub = vld1q_s8(u.as_ptr().add(16));
        let xa = vld1q_s8(x.qs.as_ptr().add(b * QK));
        let xb = vld1q_s8(x.qs.as_ptr().add(b * QK + 16));
        let mut ha = vaddvq_s32(vdotq_s32(vdupq_n_s32(0), ua, xa));
        let mut hb = vaddvq_s32(vdotq_s32(vdupq_n_s32(0), ub, xb));
        if shift != 0 {
            let lo = x.sum16[b];
            ha += shift as i32 * lo;
            hb += shift as i32 * (x.sum[b] - lo);
        }
        let off = if super::has_min(ty) { x.s[b] } else { x.d[b] * x.sum[b] as f32 };
        acc += x.d[b] * (d[0] * ha as f32 + d[1] * hb as f32) + m * off;
    }
    acc
}

pub fn matvec(ty: GgmlType, w: &[u8], row_bytes: usize, x: Q8Row<'_>, out: &mut [f32]) {
    assert!(super::supports(super::Isa::NeonDot, ty), "no integer kernel for {ty}");
    assert!(w.len() >= out.len() * row_bytes && ty.row_bytes(x.qs.len() as u64) == Ok(row_bytes as u64));
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        // SAFETY: `Isa::NeonDot` is only chosen when neon and dotprod were detected;
        // the assertion above bounds every block read (and the vector loads read the
        // 32-byte buffers built here and the activations' whole blocks).
        *o = unsafe { dot(ty, row, x) };
    }
}
