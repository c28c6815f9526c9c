//! x86-64 kernels: AVX2 (`vpmaddubsw` pairs) and AVX-512 VNNI (`vpdpbusd` on 256-bit
//! vectors). One generic body per loop, instantiated under each instruction set's
//! `target_feature` so the compiler inlines the right dot-product instruction.

use std::arch::x86_64::*;

use cairn_formats::{FineType, GgmlType};

use super::repack::R8;
use super::{Isa, Q8Acts, Q8Row, QK};

/// Sum of groups of four u8 × i8 products into eight i32 lanes.
trait Dot {
    unsafe fn dot(u: __m256i, x: __m256i) -> __m256i;
}

struct Avx2;
struct Vnni;

impl Dot for Avx2 {
    #[inline(always)]
    unsafe fn dot(u: __m256i, x: __m256i) -> __m256i {
        // u ≤ 128 and |x| ≤ 127, so the i16 pair sums of vpmaddubsw cannot saturate.
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1))
    }
}

impl Dot for Vnni {
    #[inline(always)]
    unsafe fn dot(u: __m256i, x: __m256i) -> __m256i {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x)
    }
}

/// Block types, as const parameters so each instantiation is straight-line code.
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;
const Q4K: u8 = 5;
const Q6K: u8 = 6;
const Q5K: u8 = 7;

#[inline(always)]
unsafe fn f16x2(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
}

#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let qs = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(0x0F);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), m), _mm_and_si128(qs, m))
}

/// Bit j of `qh` as 0x10 in byte j.
#[inline(always)]
unsafe fn high_bits(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    let idx = _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
    let bytes = _mm256_shuffle_epi8(v, idx);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// The `b`-th run of 32 values of a row: the bytes to multiply (unsigned; signed for
/// Q8_0 and Q6_K, whose signs then move onto x), the scale of each i32 lane (Q6_K has a
/// scale per 16 values: lanes 0–3 hold the first 16, lanes 4–7 the rest), the offset.
#[inline(always)]
unsafe fn block<const T: u8>(row: *const u8, b: usize) -> (__m256i, __m256, f32) {
    let mask = _mm256_set1_epi8(0x0F);
    match T {
        Q4K => {
            let sb = row.add((b / 8) * 144);
            let j = b % 8;
            let (d, dmin) = f16x2(sb);
            let scales = std::slice::from_raw_parts(sb.add(4), 12);
            let (sc, m) = super::scalar::scale_min_k4(j, scales);
            let qs = _mm256_loadu_si256(sb.add(16 + 32 * (j / 2)) as *const __m256i);
            let u = if j.is_multiple_of(2) {
                _mm256_and_si256(qs, mask)
            } else {
                _mm256_and_si256(_mm256_srli_epi16(qs, 4), mask)
            };
            (u, _mm256_set1_ps(d * sc as f32), -dmin * m as f32)
        }
        Q5K => {
            let sb = row.add((b / 8) * 176);
            let j = b % 8;
            let (d, dmin) = f16x2(sb);
            let scales = std::slice::from_raw_parts(sb.add(4), 12);
            let (sc, m) = super::scalar::scale_min_k4(j, scales);
            let qs = _mm256_loadu_si256(sb.add(48 + 32 * (j / 2)) as *const __m256i);
            let lo = if j.is_multiple_of(2) {
                _mm256_and_si256(qs, mask)
            } else {
                _mm256_and_si256(_mm256_srli_epi16(qs, 4), mask)
            };
            // Bit j of qh[i] to bit 4 of byte i (16-bit shifts: bit 4 of each byte only
            // ever takes a bit of the same byte).
            let qh = _mm256_loadu_si256(sb.add(16) as *const __m256i);
            let hi = if j <= 4 {
                _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - j as i32))
            } else {
                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32 - 4))
            };
            let u = _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi8(0x10)));
            (u, _mm256_set1_ps(d * sc as f32), -dmin * m as f32)
        }
        Q6K => {
            let sb = row.add((b / 8) * 210);
            let (h, part) = ((b % 8) / 4, b % 4);
            let ql = _mm256_loadu_si256(sb.add(64 * h + 32 * (part & 1)) as *const __m256i);
            let qh = _mm256_loadu_si256(sb.add(128 + 32 * h) as *const __m256i);
            let lo =
                if part < 2 { _mm256_and_si256(ql, mask) } else { _mm256_and_si256(_mm256_srli_epi16(ql, 4), mask) };
            let hi = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * part as i32)), _mm256_set1_epi8(3));
            let w = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
            let d = f16x2(sb.add(206)).1;
            let sc = sb.add(192 + 8 * h + 2 * part) as *const i8;
            let (s0, s1) = (d * *sc as f32, d * *sc.add(1) as f32);
            (w, _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1), 0.0)
        }
        _ => {
            let p = row.add(b * type_size(T));
            let (u, d, m) = match T {
                Q4_0 => {
                    let (d, _) = f16x2(p);
                    (nibbles(p.add(2)), d, -8.0 * d)
                }
                Q4_1 => {
                    let (d, m) = f16x2(p);
                    (nibbles(p.add(4)), d, m)
                }
                Q5_0 => {
                    let (d, _) = f16x2(p);
                    let qh = (p.add(2) as *const u32).read_unaligned();
                    (_mm256_or_si256(nibbles(p.add(6)), high_bits(qh)), d, -16.0 * d)
                }
                Q5_1 => {
                    let (d, m) = f16x2(p);
                    let qh = (p.add(4) as *const u32).read_unaligned();
                    (_mm256_or_si256(nibbles(p.add(8)), high_bits(qh)), d, m)
                }
                _ => {
                    let (d, _) = f16x2(p);
                    (_mm256_loadu_si256(p.add(2) as *const __m256i), d, 0.0)
                }
            };
            (u, _mm256_set1_ps(d), m)
        }
    }
}

/// The u·x products of one block pair: for Q8_0, `w` holds signed values and the sign
/// trick (|w| · sign(x, w)) keeps `vpmaddubsw` in range.
#[inline(always)]
unsafe fn block_dot<D: Dot, const T: u8>(w: __m256i, x: __m256i) -> __m256i {
    if T == Q8_0 || T == Q6K {
        D::dot(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w))
    } else {
        D::dot(w, x)
    }
}

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

/// Runs of 32 values in a row of `row_bytes`.
const fn runs(t: u8, row_bytes: usize) -> usize {
    match t {
        Q4K | Q5K | Q6K => row_bytes / type_size(t) * 8,
        _ => row_bytes / type_size(t),
    }
}

/// Bytes ahead of the current block to prefetch (a few cache lines).
const PREFETCH: usize = 2048;

/// Run `j`'s 6-bit scale and min of eight repacked Q4_K/Q5_K rows (one row per lane),
/// from `q(i)`, byte `i` of their packed scales, and `six` = 63 in every lane. A macro, so
/// that it expands inside each kernel's target features.
macro_rules! k_scales {
    ($q:ident, $j:expr, $six:expr) => {{
        let j = $j;
        if j < 4 {
            (_mm256_and_si256($q(j), $six), _mm256_and_si256($q(j + 4), $six))
        } else {
            let top = |v: __m256i| _mm256_slli_epi32(_mm256_srli_epi32(v, 6), 4);
            (
                _mm256_or_si256(_mm256_and_si256($q(j + 4), _mm256_set1_epi32(15)), top($q(j - 4))),
                _mm256_or_si256(_mm256_srli_epi32($q(j + 4), 4), top($q(j))),
            )
        }
    }};
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// An R-rows × C-tokens tile: `out[c * ld + r] = w_r · x_c`.
///
/// Safety: `w` holds R rows of `nb` blocks of type T at stride `row_bytes`; each `xs[c]`
/// has `nb` blocks; `out` has room for `(C - 1) * ld + R` values.
#[inline(always)]
unsafe fn tile<D: Dot, const T: u8, const R: usize, const C: usize>(
    w: *const u8,
    row_bytes: usize,
    nb: usize,
    xs: [Q8Row<'_>; C],
    out: *mut f32,
    ld: usize,
) {
    // Bytes per run of 32 values (fractional for the k-quants; only for prefetching).
    let bs = row_bytes / nb.max(1);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut off = [[0f32; C]; R];
    for b in 0..nb {
        // Each row is its own stream; ask for its data well before it is needed.
        for r in 0..R {
            _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(r * row_bytes + b * bs + PREFETCH) as *const i8);
        }
        // Unpack each row's block once for all C tokens.
        let mut u = [_mm256_setzero_si256(); R];
        let mut d = [_mm256_setzero_ps(); R];
        let mut m = [0f32; R];
        for r in 0..R {
            (u[r], d[r], m[r]) = block::<T>(w.add(r * row_bytes), b);
        }
        for c in 0..C {
            let xv = _mm256_loadu_si256(xs[c].qs.as_ptr().add(b * QK) as *const __m256i);
            let dx = *xs[c].d.get_unchecked(b);
            // The min term of Q4_1/Q5_1 uses ggml's f16-rounded d·sum; the fixed
            // offsets of the other types are exact integers times d.
            let sx = if T == Q4_1 || T == Q5_1 {
                *xs[c].s.get_unchecked(b)
            } else {
                dx * *xs[c].sum.get_unchecked(b) as f32
            };
            for r in 0..R {
                let p = _mm256_cvtepi32_ps(block_dot::<D, T>(u[r], xv));
                acc[r][c] = _mm256_fmadd_ps(p, _mm256_mul_ps(d[r], _mm256_set1_ps(dx)), acc[r][c]);
                off[r][c] += m[r] * sx;
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            *out.add(c * ld + r) = hsum(acc[r][c]) + off[r][c];
        }
    }
}

/// Rows × one activation row, four rows at a time.
#[inline(always)]
unsafe fn matvec_body<D: Dot, const T: u8>(w: &[u8], row_bytes: usize, x: Q8Row<'_>, out: &mut [f32]) {
    let nb = runs(T, row_bytes);
    let rows = out.len();
    let mut r = 0;
    while r + 4 <= rows {
        tile::<D, T, 4, 1>(w.as_ptr().add(r * row_bytes), row_bytes, nb, [x], out.as_mut_ptr().add(r), 1);
        r += 4;
    }
    while r < rows {
        tile::<D, T, 1, 1>(w.as_ptr().add(r * row_bytes), row_bytes, nb, [x], out.as_mut_ptr().add(r), 1);
        r += 1;
    }
}

/// Rows × activation rows in 4 × 4 tiles (edges in smaller ones); `out` is
/// `[tokens][rows]`.
#[inline(always)]
unsafe fn matmul_body<D: Dot, const T: u8>(w: &[u8], row_bytes: usize, x: &Q8Acts, out: &mut [f32]) {
    let nb = runs(T, row_bytes);
    let (rows, n) = (w.len() / row_bytes, x.rows);
    let o = out.as_mut_ptr();
    let mut r = 0;
    while r < rows {
        let wr = w.as_ptr().add(r * row_bytes);
        let mut c = 0;
        if r + 4 <= rows {
            while c + 4 <= n {
                let xs = [x.row(c), x.row(c + 1), x.row(c + 2), x.row(c + 3)];
                tile::<D, T, 4, 4>(wr, row_bytes, nb, xs, o.add(c * rows + r), rows);
                c += 4;
            }
            while c < n {
                tile::<D, T, 4, 1>(wr, row_bytes, nb, [x.row(c)], o.add(c * rows + r), rows);
                c += 1;
            }
            r += 4;
        } else {
            while c < n {
                tile::<D, T, 1, 1>(wr, row_bytes, nb, [x.row(c)], o.add(c * rows + r), rows);
                c += 1;
            }
            r += 1;
        }
    }
}

/// Four activation bytes `x[4j..4j + 4]` in every lane (with AVX-512 VL the compiler
/// folds this into the dot product's embedded-broadcast memory operand).
#[inline(always)]
unsafe fn bcast4(x: *const u8, j: usize) -> __m256i {
    _mm256_set1_epi32((x.add(4 * j) as *const i32).read_unaligned())
}

/// The lane-per-row dot products of repacked groups (see `repack`): lane r of every
/// weight vector holds four bytes of row r, so the sums land one lane per row.
trait Lanes {
    /// Tokens per repacked tile (as many as the registers hold with the weights).
    const TILE: usize;
    /// Row sums of one 4-bit block: lane r of `lo[k]` / `hi[k]` holds row r's weights
    /// `4k..4k + 4` / `16 + 4k..16 + 4k + 4` (u ≤ 15); `x` the block's 32 activations.
    unsafe fn rows4(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> __m256i;
    /// [`Lanes::rows4`] for 5-bit values (u ≤ 31).
    unsafe fn rows5(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> __m256i;
    /// The two 16-value halves of one 6-bit block (u ≤ 63), summed apart: `lo[k]`
    /// against `x[4k..]`, `hi[k]` against `x[16 + 4k..]`.
    unsafe fn rows6(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> (__m256i, __m256i);
    /// One repacked Q8_0 vector (`w + 128`) made ready for [`Lanes::rows8`].
    unsafe fn prep8(u: __m256i) -> __m256i;
    /// Row sums of one Q8_0 block: lane r of `w[j]` holds row r's weights `4j..4j + 4`
    /// as `prep8` left them; `sum` is Σ x over the block.
    unsafe fn rows8(w: &[__m256i; 8], x: *const u8, sum: i32) -> __m256i;
}

impl Lanes for Avx2 {
    const TILE: usize = 4;

    #[inline(always)]
    unsafe fn rows4(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> __m256i {
        // Each vpmaddubsw pair sum is at most 2·15·127 = 3810 in magnitude, so all
        // eight fit an i16 (30480) before the one widening vpmaddwd.
        let mut s = _mm256_setzero_si256();
        for k in 0..4 {
            let a = _mm256_maddubs_epi16(lo[k], bcast4(x, k));
            let b = _mm256_maddubs_epi16(hi[k], bcast4(x, 4 + k));
            s = _mm256_add_epi16(s, _mm256_add_epi16(a, b));
        }
        _mm256_madd_epi16(s, _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn rows6(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> (__m256i, __m256i) {
        // Pair sums reach 2·63·127 = 16002: two of them still fit an i16.
        let ones = _mm256_set1_epi16(1);
        let half = |w: &[__m256i; 4], at: usize| {
            let a = _mm256_add_epi16(
                _mm256_maddubs_epi16(w[0], bcast4(x, at)),
                _mm256_maddubs_epi16(w[1], bcast4(x, at + 1)),
            );
            let b = _mm256_add_epi16(
                _mm256_maddubs_epi16(w[2], bcast4(x, at + 2)),
                _mm256_maddubs_epi16(w[3], bcast4(x, at + 3)),
            );
            _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones))
        };
        (half(lo, 0), half(hi, 4))
    }

    #[inline(always)]
    unsafe fn rows5(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> __m256i {
        // Pair sums reach 2·31·127 = 7874: two of them fit an i16, so widen per k.
        let ones = _mm256_set1_epi16(1);
        let mut s = _mm256_setzero_si256();
        for k in 0..4 {
            let a = _mm256_maddubs_epi16(lo[k], bcast4(x, k));
            let b = _mm256_maddubs_epi16(hi[k], bcast4(x, 4 + k));
            s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_add_epi16(a, b), ones));
        }
        s
    }

    #[inline(always)]
    unsafe fn prep8(u: __m256i) -> __m256i {
        // Back to the signed weights: vpmaddubsw needs the sign trick (u + 128 would
        // saturate its pair sums).
        _mm256_xor_si256(u, _mm256_set1_epi8(-128))
    }

    #[inline(always)]
    unsafe fn rows8(w: &[__m256i; 8], x: *const u8, _sum: i32) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let mut s = [_mm256_setzero_si256(); 2];
        for (j, w) in w.iter().enumerate() {
            let p = _mm256_maddubs_epi16(_mm256_abs_epi8(*w), _mm256_sign_epi8(bcast4(x, j), *w));
            s[j & 1] = _mm256_add_epi32(s[j & 1], _mm256_madd_epi16(p, ones));
        }
        _mm256_add_epi32(s[0], s[1])
    }
}

impl Lanes for Vnni {
    const TILE: usize = 8;

    #[inline(always)]
    unsafe fn rows4(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> __m256i {
        // Two chains of four, to halve the dependent latency.
        let mut a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo[0], bcast4(x, 0));
        let mut b = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi[0], bcast4(x, 4));
        for k in 1..4 {
            a = _mm256_dpbusd_epi32(a, lo[k], bcast4(x, k));
            b = _mm256_dpbusd_epi32(b, hi[k], bcast4(x, 4 + k));
        }
        _mm256_add_epi32(a, b)
    }

    #[inline(always)]
    unsafe fn rows5(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> __m256i {
        // vpdpbusd sums straight into i32: any u ≤ 255 is exact.
        Self::rows4(lo, hi, x)
    }

    #[inline(always)]
    unsafe fn rows6(lo: &[__m256i; 4], hi: &[__m256i; 4], x: *const u8) -> (__m256i, __m256i) {
        let mut a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo[0], bcast4(x, 0));
        let mut b = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi[0], bcast4(x, 4));
        for k in 1..4 {
            a = _mm256_dpbusd_epi32(a, lo[k], bcast4(x, k));
            b = _mm256_dpbusd_epi32(b, hi[k], bcast4(x, 4 + k));
        }
        (a, b)
    }

    #[inline(always)]
    unsafe fn prep8(u: __m256i) -> __m256i {
        u
    }

    #[inline(always)]
    unsafe fn rows8(w: &[__m256i; 8], x: *const u8, sum: i32) -> __m256i {
        // Σ (w + 128)·x = Σ w·x + 128·Σ x: start one chain at −128·Σ x (|Σ| ≤ 32·127).
        let mut a = _mm256_set1_epi32(-128 * sum);
        let mut b = _mm256_setzero_si256();
        for j in 0..4 {
            a = _mm256_dpbusd_epi32(a, w[2 * j], bcast4(x, 2 * j));
            b = _mm256_dpbusd_epi32(b, w[2 * j + 1], bcast4(x, 2 * j + 1));
        }
        _mm256_add_epi32(a, b)
    }
}

/// Eight repacked rows (see `repack`) × C tokens of 4-bit blocks:
/// `out[c * ld + r] = w_r · x_c`.
///
/// Safety: `p` holds `nb` group-blocks of type T; each `xs[c]` has `nb` blocks; `out`
/// has room for `(C - 1) * ld + 8` values.
#[inline(always)]
unsafe fn packed_q4<D: Lanes, const T: u8, const C: usize>(
    p: *const u8,
    nb: usize,
    xs: [Q8Row<'_>; C],
    out: *mut f32,
    ld: usize,
) {
    let (gb, qoff) = if T == Q4_1 { (160, 32) } else { (144, 16) };
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        let blk = p.add(b * gb);
        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + 64) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + 128) as *const i8);
        let dv = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let mv = if T == Q4_1 {
            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i))
        } else {
            _mm256_mul_ps(dv, _mm256_set1_ps(-8.0))
        };
        let mut lo = [_mm256_setzero_si256(); 4];
        let mut hi = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            let v = _mm256_loadu_si256(blk.add(qoff + 32 * k) as *const __m256i);
            lo[k] = _mm256_and_si256(v, mask);
            hi[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        }
        for c in 0..C {
            let sums = D::rows4(&lo, &hi, xs[c].qs.as_ptr().add(b * QK) as *const u8);
            let dx = *xs[c].d.get_unchecked(b);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dv, _mm256_set1_ps(dx)), acc[c]);
            let sx = if T == Q4_1 { *xs[c].s.get_unchecked(b) } else { dx * *xs[c].sum.get_unchecked(b) as f32 };
            acc[c] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx), acc[c]);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(c * ld), *a);
    }
}

/// 0x10 in byte i of lane r where bit `4g + i` of lane r's `qh` is set: the fifth bit
/// of the four weights of vector group g (g < 4: low nibbles, g ≥ 4: high nibbles).
#[inline(always)]
unsafe fn fifth_bits<const G: i32>(qh: __m256i) -> __m256i {
    // Byte G/2 of each lane, in all four bytes; then one bit per byte.
    let b = (G / 2) as i8;
    let pick = _mm256_setr_epi8(
        b,
        b,
        b,
        b,
        4 + b,
        4 + b,
        4 + b,
        4 + b,
        8 + b,
        8 + b,
        8 + b,
        8 + b,
        12 + b,
        12 + b,
        12 + b,
        12 + b,
        b,
        b,
        b,
        b,
        4 + b,
        4 + b,
        4 + b,
        4 + b,
        8 + b,
        8 + b,
        8 + b,
        8 + b,
        12 + b,
        12 + b,
        12 + b,
        12 + b,
    );
    let bit = _mm256_set1_epi32(0x0804_0201 << (4 * (G % 2)));
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(qh, pick), bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Eight repacked rows × C tokens of 5-bit blocks (Q5_0, Q5_1), as `packed_q4`.
///
/// Safety: as `packed_q4`.
#[inline(always)]
unsafe fn packed_q5<D: Lanes, const T: u8, const C: usize>(
    p: *const u8,
    nb: usize,
    xs: [Q8Row<'_>; C],
    out: *mut f32,
    ld: usize,
) {
    let (gb, hoff) = if T == Q5_1 { (192, 32) } else { (176, 16) };
    let mask = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        let blk = p.add(b * gb);
        for l in 0..3 {
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + 64 * l) as *const i8);
        }
        let dv = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let mv = if T == Q5_1 {
            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i))
        } else {
            _mm256_mul_ps(dv, _mm256_set1_ps(-16.0))
        };
        let qh = _mm256_loadu_si256(blk.add(hoff) as *const __m256i);
        let v: [__m256i; 4] =
            std::array::from_fn(|k| _mm256_loadu_si256(blk.add(hoff + 32 + 32 * k) as *const __m256i));
        let lo = [
            _mm256_or_si256(_mm256_and_si256(v[0], mask), fifth_bits::<0>(qh)),
            _mm256_or_si256(_mm256_and_si256(v[1], mask), fifth_bits::<1>(qh)),
            _mm256_or_si256(_mm256_and_si256(v[2], mask), fifth_bits::<2>(qh)),
            _mm256_or_si256(_mm256_and_si256(v[3], mask), fifth_bits::<3>(qh)),
        ];
        let high = |v: __m256i| _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
        let hi = [
            _mm256_or_si256(high(v[0]), fifth_bits::<4>(qh)),
            _mm256_or_si256(high(v[1]), fifth_bits::<5>(qh)),
            _mm256_or_si256(high(v[2]), fifth_bits::<6>(qh)),
            _mm256_or_si256(high(v[3]), fifth_bits::<7>(qh)),
        ];
        for c in 0..C {
            let sums = D::rows5(&lo, &hi, xs[c].qs.as_ptr().add(b * QK) as *const u8);
            let dx = *xs[c].d.get_unchecked(b);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dv, _mm256_set1_ps(dx)), acc[c]);
            let sx = if T == Q5_1 { *xs[c].s.get_unchecked(b) } else { dx * *xs[c].sum.get_unchecked(b) as f32 };
            acc[c] = _mm256_fmadd_ps(mv, _mm256_set1_ps(sx), acc[c]);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(c * ld), *a);
    }
}

/// Eight repacked Q4_K rows × C tokens, `nsb` super-blocks (see `repack`).
///
/// Safety: as `packed_q4`, with `8 · nsb` blocks per activation row.
#[inline(always)]
unsafe fn packed_q4k<D: Lanes, const C: usize>(p: *const u8, nsb: usize, xs: [Q8Row<'_>; C], out: *mut f32, ld: usize) {
    const GB: usize = 1152;
    let (mask, six) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi32(63));
    let mut acc = [_mm256_setzero_ps(); C];
    for s in 0..nsb {
        let blk = p.add(s * GB);
        let dv = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let mv = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
        // Byte q of the eight rows' packed 6-bit scales, one row per lane.
        let q = |i: usize| _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(32 + 8 * i) as *const __m128i));
        for j in 0..8 {
            let (sc, m) = k_scales!(q, j, six);
            let ds = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(sc));
            let dm = _mm256_mul_ps(mv, _mm256_cvtepi32_ps(m));
            let pair = blk.add(128 + 256 * (j / 2));
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(pair.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
            let w: [__m256i; 8] = std::array::from_fn(|k| {
                let v = _mm256_loadu_si256(pair.add(32 * k) as *const __m256i);
                _mm256_and_si256(if j % 2 == 0 { v } else { _mm256_srli_epi16(v, 4) }, mask)
            });
            let (lo, hi) = ([w[0], w[1], w[2], w[3]], [w[4], w[5], w[6], w[7]]);
            let b = 8 * s + j;
            for c in 0..C {
                let sums = D::rows4(&lo, &hi, xs[c].qs.as_ptr().add(b * QK) as *const u8);
                let dx = *xs[c].d.get_unchecked(b);
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(ds, _mm256_set1_ps(dx)), acc[c]);
                let sx = dx * *xs[c].sum.get_unchecked(b) as f32;
                acc[c] = _mm256_fnmadd_ps(dm, _mm256_set1_ps(sx), acc[c]);
            }
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(c * ld), *a);
    }
}

/// Eight repacked Q5_K rows × C tokens, `nsb` super-blocks (see `repack`): Q4_K's
/// loop with each run's fifth bits taken from the shared `qh` vectors.
///
/// Safety: as `packed_q4k`.
#[inline(always)]
unsafe fn packed_q5k<D: Lanes, const C: usize>(p: *const u8, nsb: usize, xs: [Q8Row<'_>; C], out: *mut f32, ld: usize) {
    const GB: usize = 1408;
    let (mask, six, bit4) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi32(63), _mm256_set1_epi8(0x10));
    let mut acc = [_mm256_setzero_ps(); C];
    for s in 0..nsb {
        let blk = p.add(s * GB);
        let dv = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let mv = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
        let q = |i: usize| _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(32 + 8 * i) as *const __m128i));
        let qh: [__m256i; 8] = std::array::from_fn(|k| _mm256_loadu_si256(blk.add(128 + 32 * k) as *const __m256i));
        for j in 0..8 {
            let (sc, m) = k_scales!(q, j, six);
            let ds = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(sc));
            let dm = _mm256_mul_ps(mv, _mm256_cvtepi32_ps(m));
            let pair = blk.add(384 + 256 * (j / 2));
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(pair.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
            // Bit j of every qh byte to bit 4 (16-bit shifts: as in `block`).
            let fifth = |h: __m256i| {
                let v = if j <= 4 {
                    _mm256_sll_epi16(h, _mm_cvtsi32_si128(4 - j as i32))
                } else {
                    _mm256_srl_epi16(h, _mm_cvtsi32_si128(j as i32 - 4))
                };
                _mm256_and_si256(v, bit4)
            };
            let w: [__m256i; 8] = std::array::from_fn(|k| {
                let v = _mm256_loadu_si256(pair.add(32 * k) as *const __m256i);
                let lo = _mm256_and_si256(if j % 2 == 0 { v } else { _mm256_srli_epi16(v, 4) }, mask);
                _mm256_or_si256(lo, fifth(qh[k]))
            });
            let (lo, hi) = ([w[0], w[1], w[2], w[3]], [w[4], w[5], w[6], w[7]]);
            let b = 8 * s + j;
            for c in 0..C {
                let sums = D::rows5(&lo, &hi, xs[c].qs.as_ptr().add(b * QK) as *const u8);
                let dx = *xs[c].d.get_unchecked(b);
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(ds, _mm256_set1_ps(dx)), acc[c]);
                let sx = dx * *xs[c].sum.get_unchecked(b) as f32;
                acc[c] = _mm256_fnmadd_ps(dm, _mm256_set1_ps(sx), acc[c]);
            }
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(c * ld), *a);
    }
}

/// Eight repacked Q6_K rows × C tokens, `nsb` super-blocks (see `repack`).
///
/// Safety: as `packed_q4k`.
#[inline(always)]
unsafe fn packed_q6k<D: Lanes, const C: usize>(p: *const u8, nsb: usize, xs: [Q8Row<'_>; C], out: *mut f32, ld: usize) {
    const GB: usize = 1680;
    let (mask, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    // Bits 2k, 2k + 1 of every byte of `h` moved to bits 4, 5.
    let top = |h: __m256i, k: usize| {
        let v = match k {
            0 => _mm256_slli_epi16(h, 4),
            1 => _mm256_slli_epi16(h, 2),
            2 => h,
            _ => _mm256_srli_epi16(h, 2),
        };
        _mm256_and_si256(v, two)
    };
    let mut acc = [_mm256_setzero_ps(); C];
    for s in 0..nsb {
        let blk = p.add(s * GB);
        let dv = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let scale = |i: usize| {
            let sc = _mm256_cvtepi8_epi32(_mm_loadl_epi64(blk.add(16 + 8 * i) as *const __m128i));
            _mm256_mul_ps(dv, _mm256_cvtepi32_ps(sc))
        };
        for j in 0..8 {
            let run = blk.add(144 + 192 * j);
            for l in 0..3 {
                _mm_prefetch::<_MM_HINT_T0>(run.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
            let (h0, h1) = (
                _mm256_loadu_si256(run.add(128) as *const __m256i),
                _mm256_loadu_si256(run.add(160) as *const __m256i),
            );
            let v: [__m256i; 4] = std::array::from_fn(|k| _mm256_loadu_si256(run.add(32 * k) as *const __m256i));
            let lo: [__m256i; 4] = std::array::from_fn(|k| _mm256_or_si256(_mm256_and_si256(v[k], mask), top(h0, k)));
            let hi: [__m256i; 4] = std::array::from_fn(|k| {
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v[k], 4), mask), top(h1, k))
            });
            let (sa, sb) = (scale(2 * j), scale(2 * j + 1));
            let b = 8 * s + j;
            for c in 0..C {
                let (ia, ib) = D::rows6(&lo, &hi, xs[c].qs.as_ptr().add(b * QK) as *const u8);
                // Σ (u − 32)·x per half, exactly: the offset goes in as integers.
                let h = *xs[c].sum16.get_unchecked(b);
                let rest = *xs[c].sum.get_unchecked(b) - h;
                let ia = _mm256_sub_epi32(ia, _mm256_set1_epi32(32 * h));
                let ib = _mm256_sub_epi32(ib, _mm256_set1_epi32(32 * rest));
                let dx = _mm256_set1_ps(*xs[c].d.get_unchecked(b));
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_mul_ps(sa, dx), acc[c]);
                acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_mul_ps(sb, dx), acc[c]);
            }
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(c * ld), *a);
    }
}

/// Eight repacked Q8_0 rows × C tokens.
///
/// Safety: as `packed_q4`.
#[inline(always)]
unsafe fn packed_q8<D: Lanes, const C: usize>(p: *const u8, nb: usize, xs: [Q8Row<'_>; C], out: *mut f32, ld: usize) {
    const GB: usize = 272;
    let mut acc = [_mm256_setzero_ps(); C];
    for b in 0..nb {
        let blk = p.add(b * GB);
        for l in 0..5 {
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH + 64 * l) as *const i8);
        }
        let dv = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let mut w = [_mm256_setzero_si256(); 8];
        for (j, w) in w.iter_mut().enumerate() {
            *w = D::prep8(_mm256_loadu_si256(blk.add(16 + 32 * j) as *const __m256i));
        }
        for c in 0..C {
            let xq = xs[c].qs.as_ptr().add(b * QK) as *const u8;
            let sums = D::rows8(&w, xq, *xs[c].sum.get_unchecked(b));
            let dx = *xs[c].d.get_unchecked(b);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(dv, _mm256_set1_ps(dx)), acc[c]);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(c * ld), *a);
    }
}

#[inline(always)]
unsafe fn packed_group<D: Lanes, const T: u8, const C: usize>(
    p: *const u8,
    nb: usize,
    xs: [Q8Row<'_>; C],
    out: *mut f32,
    ld: usize,
) {
    if T == Q8_0 {
        packed_q8::<D, C>(p, nb, xs, out, ld)
    } else if T == Q4K {
        packed_q4k::<D, C>(p, nb / 8, xs, out, ld)
    } else if T == Q5K {
        packed_q5k::<D, C>(p, nb / 8, xs, out, ld)
    } else if T == Q6K {
        packed_q6k::<D, C>(p, nb / 8, xs, out, ld)
    } else if T == Q5_0 || T == Q5_1 {
        packed_q5::<D, T, C>(p, nb, xs, out, ld)
    } else {
        packed_q4::<D, T, C>(p, nb, xs, out, ld)
    }
}

/// Repacked rows × tokens: `out[t * rows + r]`; one token is the decode case.
#[inline(always)]
unsafe fn packed_body<D: Lanes, const T: u8>(packed: &[u8], rows: usize, nb: usize, x: &Q8Acts, out: &mut [f32]) {
    // Blocks per row: runs of 32, or super-blocks of 256 for the k-quants.
    let blocks = if T == Q4K || T == Q5K || T == Q6K { nb / 8 } else { nb };
    let gbytes = blocks * R8 * type_size(T);
    let (n, o) = (x.rows, out.as_mut_ptr());
    // The tokens' rows once, not for every group of 8 weight rows.
    let xr: Vec<Q8Row<'_>> = (0..n).map(|t| x.row(t)).collect();
    for g in 0..rows / R8 {
        let p = packed.as_ptr().add(g * gbytes);
        let at = |c: usize| o.add(c * rows + g * R8);
        let mut c = 0;
        while D::TILE >= 8 && c + 8 <= n {
            let xs = std::array::from_fn::<_, 8, _>(|i| xr[c + i]);
            packed_group::<D, T, 8>(p, nb, xs, at(c), rows);
            c += 8;
        }
        while c + 4 <= n {
            let xs = [xr[c], xr[c + 1], xr[c + 2], xr[c + 3]];
            packed_group::<D, T, 4>(p, nb, xs, at(c), rows);
            c += 4;
        }
        if c + 2 <= n {
            packed_group::<D, T, 2>(p, nb, [xr[c], xr[c + 1]], at(c), rows);
            c += 2;
        }
        if c < n {
            packed_group::<D, T, 1>(p, nb, [xr[c]], at(c), rows);
        }
    }
}

macro_rules! entry {
    ($name:ident, $body:ident, $dot:ty, $features:literal, ($($arg:ident: $t:ty),*)) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(ty: GgmlType, $($arg: $t),*) {
            match ty {
                GgmlType::Q4_0 => $body::<$dot, Q4_0>($($arg),*),
                GgmlType::Q4_1 => $body::<$dot, Q4_1>($($arg),*),
                GgmlType::Q5_0 => $body::<$dot, Q5_0>($($arg),*),
                GgmlType::Q5_1 => $body::<$dot, Q5_1>($($arg),*),
                GgmlType::Q8_0 => $body::<$dot, Q8_0>($($arg),*),
                GgmlType::Q4K => $body::<$dot, Q4K>($($arg),*),
                GgmlType::Q5K => $body::<$dot, Q5K>($($arg),*),
                GgmlType::Q6K => $body::<$dot, Q6K>($($arg),*),
                _ => unreachable!("no integer kernel for {ty}"),
            }
        }
    };
}

entry!(matvec_avx2, matvec_body, Avx2, "avx2,fma,f16c", (w: &[u8], row_bytes: usize, x: Q8Row<'_>, out: &mut [f32]));
entry!(matvec_vnni, matvec_body, Vnni, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", (w: &[u8], row_bytes: usize, x: Q8Row<'_>, out: &mut [f32]));
entry!(matmul_avx2, matmul_body, Avx2, "avx2,fma,f16c", (w: &[u8], row_bytes: usize, x: &Q8Acts, out: &mut [f32]));
entry!(packed_avx2, packed_body, Avx2, "avx2,fma,f16c", (packed: &[u8], rows: usize, nb: usize, x: &Q8Acts, out: &mut [f32]));
entry!(packed_vnni, packed_body, Vnni, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", (packed: &[u8], rows: usize, nb: usize, x: &Q8Acts, out: &mut [f32]));
entry!(matmul_vnni, matmul_body, Vnni, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni", (w: &[u8], row_bytes: usize, x: &Q8Acts, out: &mut [f32]));

fn check(ty: GgmlType, w: &[u8], row_bytes: usize, cols: usize, rows_out: usize) {
    assert!(super::supports(Isa::Avx2, ty), "no integer kernel for {ty}");
    assert_eq!(Ok(row_bytes as u64), ty.row_bytes(cols as u64), "row bytes do not match {cols} columns of {ty}");
    assert!(w.len() >= rows_out * row_bytes, "weight slice too short");
}

pub fn matvec(isa: Isa, ty: GgmlType, w: &[u8], row_bytes: usize, x: Q8Row<'_>, out: &mut [f32]) {
    if let GgmlType::Fine(ft) = ty {
        return fine(isa, ft, &w[..out.len() * row_bytes], row_bytes, &[x], out);
    }
    check(ty, w, row_bytes, x.qs.len(), out.len());
    // SAFETY: `check` ensured the weight rows and activation blocks the kernel reads
    // exist, and `isa` only names instruction sets `Isa::available` detected.
    unsafe {
        match isa {
            Isa::Avx512Vnni => matvec_vnni(ty, w, row_bytes, x, out),
            _ => matvec_avx2(ty, w, row_bytes, x, out),
        }
    }
}

pub fn matmul(isa: Isa, ty: GgmlType, w: &[u8], row_bytes: usize, x: &Q8Acts, out: &mut [f32]) {
    if let GgmlType::Fine(ft) = ty {
        let xs: Vec<Q8Row<'_>> = (0..x.rows).map(|t| x.row(t)).collect();
        return fine(isa, ft, w, row_bytes, &xs, out);
    }
    let rows = w.len() / row_bytes;
    check(ty, w, row_bytes, x.cols, rows);
    assert!(out.len() >= rows * x.rows, "output too short");
    assert!(x.qs.len() >= x.rows * x.cols && x.d.len() >= x.rows * x.cols / QK, "activations too short");
    // SAFETY: as in `matvec`, plus the output holds rows × tokens values.
    unsafe {
        match isa {
            Isa::Avx512Vnni => matmul_vnni(ty, w, row_bytes, x, out),
            _ => matmul_avx2(ty, w, row_bytes, x, out),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_f32_inline(a.as_ptr(), b.as_ptr(), a.len().min(b.len()))
}

/// The body of [`dot_f32`], inlined into the attention kernels so that they sum in the
/// same order.
#[inline(always)]
unsafe fn dot_f32_inline(pa: *const f32, pb: *const f32, n: usize) -> f32 {
    let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
        i += 16;
    }
    if i + 8 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(s0, s1));
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
    axpy_inline(y.as_mut_ptr(), a, x.as_ptr(), y.len().min(x.len()))
}

#[inline(always)]
unsafe fn axpy_inline(py: *mut f32, a: f32, px: *const f32, n: usize) {
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))));
        i += 8;
    }
    while i < n {
        *py.add(i) += a * *px.add(i);
        i += 1;
    }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_to_f32_f16c(ps: *const u16, n: usize, pd: *mut f32) {
    f16_to_f32_inline(ps, n, pd)
}

#[inline(always)]
unsafe fn f16_to_f32_inline(ps: *const u16, n: usize, pd: *mut f32) {
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(pd.add(i), _mm256_cvtph_ps(_mm_loadu_si128(ps.add(i) as *const __m128i)));
        i += 8;
    }
    while i < n {
        *pd.add(i) = half::f16::from_bits(ps.add(i).read_unaligned()).to_f32();
        i += 1;
    }
}

/// Little-endian f16 values to f32 (`dst.len()` values, `src` twice as many bytes).
pub fn f16_to_f32(src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    // SAFETY: only reached for instruction sets that include AVX2 and F16C (detected);
    // every access is below `n`, which both slices hold (unaligned reads).
    unsafe { f16_to_f32_f16c(src.as_ptr() as *const u16, n, dst.as_mut_ptr()) }
}

/// [`f16_to_f32`] from `f16` values (the KV cache).
pub fn halfs_to_f32(src: &[half::f16], dst: &mut [f32]) {
    let n = dst.len().min(src.len());
    // SAFETY: as in `f16_to_f32`; `f16` is a `u16` in memory.
    unsafe { f16_to_f32_f16c(src.as_ptr() as *const u16, n, dst.as_mut_ptr()) }
}

#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(src: *const f32, q: *mut i8) -> (f32, i32, i32) {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(8 * i)));
    let mut m = _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs));
    m = _mm256_max_ps(m, _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)));
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
    let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
    // vcvtps2dq rounds half to even under the default MXCSR, as the scalar path does.
    let i: [__m256i; 4] = std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv)));
    let hsum_i = |s: __m256i| {
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01)))
    };
    let (first, second) = (_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let (sum16, sum) = (hsum_i(first), hsum_i(_mm256_add_epi32(first, second)));
    // The packs work per 128-bit half; the permute puts the four quarters back in order.
    let packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q as *mut __m256i, ordered);
    (amax, sum, sum16)
}

/// One block of 32 activations to 8 bits: the values, their absolute maximum, sum and
/// sum of the first 16 (equal to the scalar reference's, value for value).
pub fn quantize_block(src: &[f32], q: &mut [i8]) -> (f32, i32, i32) {
    assert!(src.len() >= QK && q.len() >= QK, "a block is 32 values");
    // SAFETY: only reached for instruction sets that include AVX2 (detected); both
    // slices hold the 32 values read and written.
    unsafe { quantize_block_avx2(src.as_ptr(), q.as_mut_ptr()) }
}

/// Longest head the f16 attention kernels convert on the stack.
pub const MAX_HEAD: usize = 256;

/// The eight lanes of each of `a[0..8]` summed: lane p of the result is `Σ a[p]`.
#[inline(always)]
unsafe fn hsum8(a: &[__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    // Per 128-bit half: [Σ0, Σ1, Σ2, Σ3] of that half's lanes, then of a[4..8].
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31))
}

/// Positions the f16 attention kernels convert at once (then reuse for every head).
const ATT_TILE: usize = 8;

/// Keys or values `j..j + 8` converted to f32, `hd` apart in `tile`.
#[inline(always)]
unsafe fn convert_tile(src: *const u16, stride: usize, j: usize, hd: usize, tile: *mut f32) {
    for p in 0..ATT_TILE {
        f16_to_f32_inline(src.add((j + p) * stride), hd, tile.add(p * hd));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores_f16_avx2(
    q: *const f32,
    heads: usize,
    hd: usize,
    k: *const u16,
    stride: usize,
    n: usize,
    scale: f32,
    out: *mut f32,
) {
    let mut tile = [0f32; ATT_TILE * MAX_HEAD];
    let tp = tile.as_mut_ptr();
    let whole = hd / 8 * 8;
    let mut j = 0;
    // Eight keys at a time: each converted once for all heads, eight dot products per
    // head reduced together.
    while j + ATT_TILE <= n {
        convert_tile(k, stride, j, hd, tp);
        for h in 0..heads {
            let qh = q.add(h * hd);
            let mut acc = [_mm256_setzero_ps(); ATT_TILE];
            let mut c = 0;
            while c < whole {
                let qv = _mm256_loadu_ps(qh.add(c));
                for (p, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(tp.add(p * hd + c)), *a);
                }
                c += 8;
            }
            let mut s = [0f32; ATT_TILE];
            _mm256_storeu_ps(s.as_mut_ptr(), hsum8(&acc));
            for (p, s) in s.iter_mut().enumerate() {
                for c in whole..hd {
                    *s += *qh.add(c) * *tp.add(p * hd + c);
                }
                *out.add(h * n + j + p) = *s * scale;
            }
        }
        j += ATT_TILE;
    }
    for j in j..n {
        f16_to_f32_inline(k.add(j * stride), hd, tp);
        for h in 0..heads {
            *out.add(h * n + j) = dot_f32_inline(q.add(h * hd), tp, hd) * scale;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values_f16_avx2(p: *const f32, heads: usize, hd: usize, v: *const u16, stride: usize, n: usize, o: *mut f32) {
    let mut tile = [0f32; ATT_TILE * MAX_HEAD];
    let tp = tile.as_mut_ptr();
    let whole = hd / 8 * 8;
    let mut j = 0;
    // Eight values at a time, each converted once for all heads; every output vector
    // takes the eight products in order of position, as one axpy per position would.
    while j + ATT_TILE <= n {
        convert_tile(v, stride, j, hd, tp);
        for h in 0..heads {
            let ws: [f32; ATT_TILE] = std::array::from_fn(|q| *p.add(h * n + j + q));
            let wv: [__m256; ATT_TILE] = std::array::from_fn(|q| _mm256_set1_ps(ws[q]));
            let oh = o.add(h * hd);
            let mut c = 0;
            while c < whole {
                let mut a = _mm256_loadu_ps(oh.add(c));
                for (q, w) in wv.iter().enumerate() {
                    a = _mm256_fmadd_ps(*w, _mm256_loadu_ps(tp.add(q * hd + c)), a);
                }
                _mm256_storeu_ps(oh.add(c), a);
                c += 8;
            }
            for c in whole..hd {
                for (q, w) in ws.iter().enumerate() {
                    *oh.add(c) += w * *tp.add(q * hd + c);
                }
            }
        }
        j += ATT_TILE;
    }
    for j in j..n {
        f16_to_f32_inline(v.add(j * stride), hd, tp);
        for h in 0..heads {
            axpy_inline(o.add(h * hd), *p.add(h * n + j), tp, hd);
        }
    }
}

/// See `kernels::scores_f16`; the caller checked every length.
#[allow(clippy::too_many_arguments)]
pub fn scores_f16(
    q: &[f32],
    heads: usize,
    hd: usize,
    k: &[half::f16],
    stride: usize,
    n: usize,
    scale: f32,
    out: &mut [f32],
) {
    assert!(hd <= MAX_HEAD && q.len() >= heads * hd && out.len() >= heads * n);
    assert!(n == 0 || k.len() >= (n - 1) * stride + hd, "keys too short");
    // SAFETY: AVX2, FMA and F16C were detected; the assertions bound every read and
    // write (row j of the keys ends at (n - 1)·stride + hd).
    unsafe { scores_f16_avx2(q.as_ptr(), heads, hd, k.as_ptr() as *const u16, stride, n, scale, out.as_mut_ptr()) }
}

/// See `kernels::values_f16`; the caller checked every length.
pub fn values_f16(p: &[f32], heads: usize, hd: usize, v: &[half::f16], stride: usize, n: usize, o: &mut [f32]) {
    assert!(hd <= MAX_HEAD && p.len() >= heads * n && o.len() >= heads * hd);
    assert!(n == 0 || v.len() >= (n - 1) * stride + hd, "values too short");
    // SAFETY: as in `scores_f16`.
    unsafe { values_f16_avx2(p.as_ptr(), heads, hd, v.as_ptr() as *const u16, stride, n, o.as_mut_ptr()) }
}

#[target_feature(enable = "avx2,f16c")]
unsafe fn round_f16_f16c(x: &mut [f32]) {
    let (n, p) = (x.len(), x.as_mut_ptr());
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(p.add(i)));
        _mm256_storeu_ps(p.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    while i < n {
        *p.add(i) = half::f16::from_f32(*p.add(i)).to_f32();
        i += 1;
    }
}

/// f32 → f16 → f32, eight at a time.
pub fn round_f16_slice(x: &mut [f32]) {
    // SAFETY: AVX2 and F16C were detected; every access is below `x.len()`.
    unsafe { round_f16_f16c(x) }
}

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: only reached for instruction sets that include AVX2 and FMA (detected);
    // every access is below the shorter length.
    unsafe { dot_f32_avx2(a, b) }
}

pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    // SAFETY: as in `dot_f32`.
    unsafe { axpy_avx2(y, a, x) }
}

/// Repacked weights (`rows` a multiple of 8, `cols` values each) × every row of `x`:
/// `out[t * rows + r]`.
pub fn packed(isa: Isa, ty: GgmlType, packed: &[u8], rows: usize, x: &Q8Acts, out: &mut [f32]) {
    assert!(super::repack::repackable(ty) && rows.is_multiple_of(R8), "not a repacked {ty} matrix of {rows} rows");
    let nb = x.cols / QK;
    let row_bytes = ty.row_bytes(x.cols as u64).unwrap_or(0) as usize;
    assert_eq!(packed.len(), rows * row_bytes, "repacked {ty} weights of the wrong size");
    assert!(
        !matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) || nb.is_multiple_of(8),
        "k-quant rows are whole super-blocks"
    );
    assert!(out.len() >= rows * x.rows, "output too short");
    assert!(x.qs.len() >= x.rows * x.cols && x.d.len() >= x.rows * nb, "activations too short");
    // SAFETY: the assertions bound every group, block and output the kernel touches;
    // `isa` only names instruction sets `Isa::available` detected.
    unsafe {
        match isa {
            Isa::Avx512Vnni => packed_vnni(ty, packed, rows, nb, x, out),
            _ => packed_avx2(ty, packed, rows, nb, x, out),
        }
    }
}

// ---- FineQuant types: groups of runs sharing one header, the last group maybe short.

/// Code widths, as const parameters (symmetry is a per-group branch that predicts).
const F2: u8 = 2;
const F3: u8 = 3;
const F4: u8 = 4;
const F8: u8 = 8;

/// 0xFF in byte j where bit j of `bits` is set.
#[inline(always)]
unsafe fn bit_mask(bits: u32) -> __m256i {
    let v = _mm256_set1_epi32(bits as i32);
    let idx = _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
    let bytes = _mm256_shuffle_epi8(v, idx);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit)
}

/// The 32 codes of one run (signed for 8 bits, unsigned otherwise); see `fine.rs`.
#[inline(always)]
unsafe fn fine_run<const K: u8>(p: *const u8) -> __m256i {
    match K {
        F2 | F3 => {
            let v = _mm256_set1_epi64x((p as *const i64).read_unaligned());
            let lo = _mm256_and_si256(_mm256_srlv_epi64(v, _mm256_setr_epi64x(0, 2, 4, 6)), _mm256_set1_epi8(3));
            if K == F3 {
                let hi = bit_mask((p.add(8) as *const u32).read_unaligned());
                _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi8(4)))
            } else {
                lo
            }
        }
        F4 => nibbles(p),
        _ => _mm256_loadu_si256(p as *const __m256i),
    }
}

/// An R-rows × C-tokens tile of a FineQuant matrix: `out[c * ld + r] = w_r · x_c`.
///
/// Safety: `w` holds R rows of `ft.row_bytes(32 · nb)` bytes at stride `row_bytes`;
/// each `xs[c]` has `nb` runs; `out` has room for `(C - 1) * ld + R` values.
#[inline(always)]
unsafe fn fine_tile<D: Dot, const K: u8, const R: usize, const C: usize>(
    w: *const u8,
    row_bytes: usize,
    ft: FineType,
    nb: usize,
    xs: [Q8Row<'_>; C],
    out: *mut f32,
    ld: usize,
) {
    let (hdr, rb, per) = (ft.header_bytes(), ft.run_bytes(), ft.group() / QK);
    let mut acc = [[_mm256_setzero_ps(); C]; R];
    let mut off = [[0f32; C]; R];
    let (mut b, mut at) = (0, 0);
    while b < nb {
        let runs = per.min(nb - b);
        let mut d = [_mm256_setzero_ps(); R];
        let mut m = [0f32; R];
        for r in 0..R {
            let h = w.add(r * row_bytes + at);
            let (dr, mr) = if ft.sym() { (f16x2(h).0, 0.0) } else { f16x2(h) };
            d[r] = _mm256_set1_ps(dr);
            m[r] = ft.offset(dr, mr);
        }
        at += hdr;
        for j in 0..runs {
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T0>(w.wrapping_add(r * row_bytes + at + PREFETCH) as *const i8);
            }
            let mut u = [_mm256_setzero_si256(); R];
            for (r, u) in u.iter_mut().enumerate() {
                *u = fine_run::<K>(w.add(r * row_bytes + at));
            }
            let bj = b + j;
            for c in 0..C {
                let xv = _mm256_loadu_si256(xs[c].qs.as_ptr().add(bj * QK) as *const __m256i);
                let dx = *xs[c].d.get_unchecked(bj);
                // Asymmetric groups use ggml's f16-rounded d·sum, as Q4_1 does, so that a
                // 4-bit group of 32 gives exactly Q4_1's result.
                let sx = if ft.sym() { dx * *xs[c].sum.get_unchecked(bj) as f32 } else { *xs[c].s.get_unchecked(bj) };
                for r in 0..R {
                    let p = if K == F8 {
                        D::dot(_mm256_sign_epi8(u[r], u[r]), _mm256_sign_epi8(xv, u[r]))
                    } else {
                        D::dot(u[r], xv)
                    };
                    acc[r][c] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(d[r], _mm256_set1_ps(dx)), acc[r][c]);
                    off[r][c] += m[r] * sx;
                }
            }
            at += rb;
        }
        b += runs;
    }
    for r in 0..R {
        for c in 0..C {
            *out.add(c * ld + r) = hsum(acc[r][c]) + off[r][c];
        }
    }
}

/// FineQuant rows × activation rows (`x.rows` = 1 is the decode case) in 4 × 4 tiles.
#[inline(always)]
unsafe fn fine_body<D: Dot, const K: u8>(ft: FineType, w: &[u8], row_bytes: usize, x: &[Q8Row<'_>], out: &mut [f32]) {
    let nb = x.first().map_or(0, |x| x.qs.len() / QK);
    let (rows, n) = (w.len() / row_bytes, x.len());
    let o = out.as_mut_ptr();
    let mut r = 0;
    while r < rows {
        let wr = w.as_ptr().add(r * row_bytes);
        let mut c = 0;
        if r + 4 <= rows {
            while c + 4 <= n {
                let xs = [x[c], x[c + 1], x[c + 2], x[c + 3]];
                fine_tile::<D, K, 4, 4>(wr, row_bytes, ft, nb, xs, o.add(c * rows + r), rows);
                c += 4;
            }
            while c < n {
                fine_tile::<D, K, 4, 1>(wr, row_bytes, ft, nb, [x[c]], o.add(c * rows + r), rows);
                c += 1;
            }
            r += 4;
        } else {
            while c < n {
                fine_tile::<D, K, 1, 1>(wr, row_bytes, ft, nb, [x[c]], o.add(c * rows + r), rows);
                c += 1;
            }
            r += 1;
        }
    }
}

macro_rules! fine_entry {
    ($name:ident, $dot:ty, $features:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(ft: FineType, w: &[u8], row_bytes: usize, x: &[Q8Row<'_>], out: &mut [f32]) {
            match ft.bits() {
                2 => fine_body::<$dot, F2>(ft, w, row_bytes, x, out),
                3 => fine_body::<$dot, F3>(ft, w, row_bytes, x, out),
                4 => fine_body::<$dot, F4>(ft, w, row_bytes, x, out),
                _ => fine_body::<$dot, F8>(ft, w, row_bytes, x, out),
            }
        }
    };
}

fine_entry!(fine_avx2, Avx2, "avx2,fma,f16c");
fine_entry!(fine_vnni, Vnni, "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni");

/// FineQuant weights × activation rows `x` (of equal length): `out[t * rows + r]`.
pub fn fine(isa: Isa, ft: FineType, w: &[u8], row_bytes: usize, x: &[Q8Row<'_>], out: &mut [f32]) {
    let rows = w.len() / row_bytes.max(1);
    let cols = x.first().map_or(0, |x| x.qs.len());
    check(GgmlType::Fine(ft), w, row_bytes, cols, rows);
    assert!(out.len() >= rows * x.len(), "output too short");
    assert!(
        x.iter().all(|x| x.qs.len() == cols
            && x.d.len() * QK >= cols
            && x.s.len() * QK >= cols
            && x.sum.len() * QK >= cols),
        "activations too short"
    );
    // SAFETY: `check` tied `row_bytes` to `x.cols` columns of `ft` (so every group
    // header and run the tile walks is inside its row) and bounded the rows; the output
    // and activations were bounded above; `isa` was detected.
    unsafe {
        match isa {
            Isa::Avx512Vnni => fine_vnni(ft, w, row_bytes, x, out),
            _ => fine_avx2(ft, w, row_bytes, x, out),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn sign_rank_row_avx2(u: *const f32, k: usize, v: *const f32, n: usize, signs: *const u8, out: *mut f32) {
    let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    let sign_bit = _mm256_set1_epi32(i32::MIN);
    let whole = n / 8;
    for c in 0..whole {
        let mut t = _mm256_setzero_ps();
        for r in 0..k {
            t = _mm256_fmadd_ps(_mm256_set1_ps(*u.add(r)), _mm256_loadu_ps(v.add(r * n + 8 * c)), t);
        }
        // Lane l is negative where bit l of the sign byte is set: flip its sign bit.
        let b = _mm256_set1_epi32(*signs.add(c) as i32);
        let neg = _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(b, bits), bits), sign_bit);
        t = _mm256_xor_ps(t, _mm256_castsi256_ps(neg));
        let o = out.add(8 * c);
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), t));
    }
    for j in 8 * whole..n {
        let mut t = 0f32;
        for r in 0..k {
            t += *u.add(r) * *v.add(r * n + j);
        }
        let neg = (*signs.add(j / 8) >> (j % 8)) & 1 != 0;
        *out.add(j) += if neg { -t } else { t };
    }
}

/// `out[j] += ±Σ_r u[r]·v[r·n + j]`, minus where bit `j` of `signs` is set: one row of
/// a BitStack block (`S ⊙ (u vᵀ)`) added to a rebuilt row. Needs AVX2 and FMA.
pub fn sign_rank_row(u: &[f32], v: &[f32], signs: &[u8], out: &mut [f32]) {
    let (k, n) = (u.len(), out.len());
    assert!(v.len() >= k * n && signs.len() >= n.div_ceil(8), "block row shapes");
    // SAFETY: callers reach this only where AVX2 and FMA were detected; the reads stay
    // within `u` (k), `v` (k·n), `signs` (⌈n/8⌉) and the writes within `out` (n), checked
    // above.
    unsafe { sign_rank_row_avx2(u.as_ptr(), k, v.as_ptr(), n, signs.as_ptr(), out.as_mut_ptr()) }
}

/// Rows of 32-value blocks to ggml Q8_0 (f16 scale, then 32 values), scale 127/amax with
/// ties to even as the activations are rounded (ggml's reference rounds half away from
/// zero: the two differ only at exact halves).
pub fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(QK + 2)) {
        let mut q = [0i8; QK];
        let (amax, _, _) = quantize_block(s, &mut q);
        d[..2].copy_from_slice(&half::f16::from_f32(amax / 127.0).to_le_bytes());
        for (o, &v) in d[2..].iter_mut().zip(&q) {
            *o = v as u8;
        }
    }
}
