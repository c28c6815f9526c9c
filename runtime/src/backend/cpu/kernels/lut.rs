//! BitStack decode through int8 sign tables held in registers (the T-MAC / bitnet.cpp
//! style), replacing the f32 tables of `bitstack::stack_matvec` on the integer path.
//!
//! A block adds `y_i = Σ_r u[i,r] · Σ_g T_{r,g}[e_{i,g}]` where `g` runs over groups of 4
//! inputs, `e` is the group's 4 sign bits and `T_{r,g}[e] = Σ_q ±v[r,4g+q]·x[4g+q]`.
//! Flipping all 4 signs negates an entry, so only the 8 entries with bit 3 clear are kept
//! and an entry with bit 3 set is `−T[!e & 7]`: the 8 entries of both groups of a sign
//! byte fill one 16-byte `vpshufb` table per rank. Entries are rounded to int8 with one
//! scale per rank and segment of [`SEG`] sign bytes (so an outlier input only coarsens its
//! own segment) and stored biased by +128, so that a single `vpmaddubsw` against the ±1
//! signs both applies the sign and adds a byte's two groups into int16; the bias leaves
//! `128 · Σ signs` per row, the same for every rank, taken out once per segment. Within
//! a segment an int16 lane sums at most `SEG · 510` (16 320), so it stays exact; the
//! segment's sums then go to f32 with the segment scale.
//!
//! NEON has no `vpmaddubsw`: its kernel looks the entries up with `tbl` (one 16-byte
//! table per rank, as above), takes the bias off and applies the sign per byte with an
//! xor and a subtract, and `sadalp` adds a byte's two groups into the row's int16 lane;
//! the integer sums per segment are the same (and stay under `SEG · 254`).
//!
//! The sign bits keep their v1 row-major layout: the AVX2 kernel loads 16 bytes from each
//! of 8 rows and transposes them in registers (no re-encoding of the file), so that one
//! register holds the 16 nibbles of two columns `c` and `c + 8` (one per 128-bit lane)
//! and its index and sign work is shared by every rank. The tables are laid out to match:
//! within each run of 16 sign bytes, the 16-byte tables of columns `c` and `c + 8` for one
//! rank are adjacent (one 32-byte load), and a row's last run is padded with zero entries.

use rayon::prelude::*;

/// Sign bytes (8 inputs each) per table scale.
pub const SEG: usize = 32;
// The AVX2 kernel sums a segment's signs per nibble position in int8.
const _: () = assert!(SEG < 128);

/// Sign bytes per run whose tables interleave (columns `c` and `c + 8` adjacent).
const RUN: usize = 16;
const _: () = assert!(SEG.is_multiple_of(RUN));

/// Where column `c`'s rank-0 table starts in [`Tables::tab`] (rank `r` at `+ 32·r`).
#[inline(always)]
pub const fn offset(c: usize, k: usize) -> usize {
    ((c / RUN * 8 + c % 8) * k * 2 + c / 8 % 2) * 16
}

/// A block's int8 tables for one input vector.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub k: usize,
    /// Sign bytes per row (`⌈n/8⌉`).
    pub bytes: usize,
    /// `tab[offset(c, k) + 32·r + h·8 + e]`: entry `e` (bit 3 clear) of group `2c + h`
    /// for rank `r`, as `round(T / scale) + 128` ([`offset`]); `⌈bytes/16⌉·16` columns,
    /// the padding ones all 128 (zero).
    pub tab: Vec<u8>,
    /// `scale[s·k + r]`: the table scale of rank `r` in segment `s`.
    pub scale: Vec<f32>,
}

/// The int8 tables of every block (`(v as f16 bytes, n, k)`, `v` being `k × n`) for
/// input `x`, all blocks' segments built in one parallel pass; `isa` picks the AVX2 or
/// NEON builder or the scalar one (all round identically: the same adds in the same
/// order, and `cvtps2dq` / `fcvtns` round ties to even as the scalar code does).
pub fn build(isa: super::Isa, blocks: &[(&[u8], usize, usize)], x: &[f32]) -> Vec<Tables> {
    let mut out: Vec<Tables> = blocks
        .iter()
        .map(|&(_, n, k)| {
            let bytes = n.div_ceil(8);
            let cols = bytes.next_multiple_of(RUN);
            Tables { k, bytes, tab: vec![0u8; cols * k * 16], scale: vec![0f32; bytes.div_ceil(SEG) * k] }
        })
        .collect();
    let mut jobs = Vec::new();
    for (&(v, n, k), t) in blocks.iter().zip(out.iter_mut()) {
        for (s, (tb, sc)) in t.tab.chunks_mut(SEG * k * 16).zip(t.scale.chunks_mut(k)).enumerate() {
            jobs.push((v, n, k, s, tb, sc));
        }
    }
    jobs.into_par_iter().for_each(|(v, n, k, s, tb, sc)| {
        #[cfg(target_arch = "x86_64")]
        if matches!(isa, super::Isa::Avx2 | super::Isa::Avx512Vnni) {
            // SAFETY: `Isa::Avx2` and above are only chosen when the CPU has AVX2, FMA and F16C.
            return unsafe { segment_avx2(v, x, n, k, s, tb, sc) };
        }
        #[cfg(target_arch = "aarch64")]
        if isa == super::Isa::NeonDot {
            // SAFETY: NEON is part of every aarch64 target.
            return unsafe { segment_neon(v, x, n, k, s, tb, sc) };
        }
        let _ = isa;
        segment_scalar(v, x, n, k, s, tb, sc)
    });
    out
}

/// The input range of segment `s` with `nb` sign bytes.
fn inputs(n: usize, s: usize, nb: usize) -> (usize, usize) {
    (s * SEG * 8, ((s * SEG + nb) * 8).min(n))
}

/// One segment's entries and scales: `tb` is its `nb · k · 16` bytes, `sc` its k scales.
fn segment_scalar(v: &[u8], x: &[f32], n: usize, k: usize, s: usize, tb: &mut [u8], sc: &mut [f32]) {
    let nb = tb.len() / (k * 16);
    let (j0, j1) = inputs(n, s, nb);
    let mut t = vec![0f32; nb * 8];
    let mut ent = vec![0f32; nb * 16];
    for r in 0..k {
        for (j, tj) in (j0..j1).zip(t.iter_mut()) {
            let at = 2 * (r * n + j);
            *tj = half::f16::from_le_bytes([v[at], v[at + 1]]).to_f32() * x[j];
        }
        let mut amax = 0f32;
        for (g, e) in t.chunks_exact(4).zip(ent.chunks_exact_mut(8)) {
            // e[b] = ((±t0 ± t1) ± t2) + t3, minus where bit q of b is set.
            for (b, eb) in e.iter_mut().enumerate() {
                let sg = |q: usize| if b >> q & 1 != 0 { -g[q] } else { g[q] };
                *eb = sg(0) + sg(1) + sg(2) + g[3];
                amax = amax.max(eb.abs());
            }
        }
        let d = amax / 127.0;
        sc[r] = d;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for c in 0..nb {
            let dst = &mut tb[offset(c, k) + 32 * r..][..16];
            for (o, &e) in dst.iter_mut().zip(&ent[c * 16..(c + 1) * 16]) {
                *o = (super::round_ties_even(e * inv) as i32 + 128) as u8;
            }
        }
    }
}

/// [`segment_scalar`] in AVX2: t from F16C, each group's 8 entries as one vector of
/// signed sums, quantized 8 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn segment_avx2(v: &[u8], x: &[f32], n: usize, k: usize, s: usize, tb: &mut [u8], sc: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = tb.len() / (k * 16);
    let (j0, j1) = inputs(n, s, nb);
    // SAFETY (every load and store below): t holds the segment's SEG·8 inputs and ent its
    // 2·SEG groups of 8; v is k × n f16 and x n long (checked); tb holds nb·k·16 bytes.
    assert!(nb <= SEG && v.len() >= 2 * k * n && x.len() >= n && sc.len() >= k, "LUT build operands");
    let mut t = [0f32; SEG * 8];
    let mut ent = [0f32; SEG * 16];
    let sign = |q: i32| {
        let f = |b: i32| if b >> q & 1 != 0 { -1.0 } else { 1.0 };
        _mm256_setr_ps(f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(7))
    };
    let (s0, s1, s2) = (sign(0), sign(1), sign(2));
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for (r, scr) in sc.iter_mut().enumerate().take(k) {
        let vp = v.as_ptr().add(2 * r * n);
        let mut j = j0;
        while j + 8 <= j1 {
            let h = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(2 * j).cast()));
            _mm256_storeu_ps(t.as_mut_ptr().add(j - j0), _mm256_mul_ps(h, _mm256_loadu_ps(x.as_ptr().add(j))));
            j += 8;
        }
        for j in j..j1 {
            t[j - j0] = half::f16::from_le_bytes([*vp.add(2 * j), *vp.add(2 * j + 1)]).to_f32() * x[j];
        }
        let mut amax = _mm256_setzero_ps();
        for g in 0..2 * nb {
            let tp = t.as_ptr().add(4 * g);
            let e = _mm256_fmadd_ps(_mm256_set1_ps(*tp.add(1)), s1, _mm256_mul_ps(_mm256_set1_ps(*tp), s0));
            let e = _mm256_add_ps(_mm256_fmadd_ps(_mm256_set1_ps(*tp.add(2)), s2, e), _mm256_set1_ps(*tp.add(3)));
            _mm256_storeu_ps(ent.as_mut_ptr().add(8 * g), e);
            amax = _mm256_max_ps(amax, _mm256_and_ps(e, abs));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let d = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2))) / 127.0;
        *scr = d;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let bias = _mm_set1_epi8(-128);
        for g in 0..2 * nb {
            let q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(ent.as_ptr().add(8 * g)), inv));
            let w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            let b = _mm_xor_si128(_mm_packs_epi16(w, w), bias);
            _mm_storel_epi64(tb.as_mut_ptr().add(offset(g / 2, k) + 32 * r + g % 2 * 8).cast(), b);
        }
    }
}

/// [`segment_scalar`] in NEON: t as the scalar code computes it, each group's 8 entries
/// as two vectors of signed sums (the same adds in the same order: `±t` products are
/// exact, so each fused add rounds as the scalar add does), quantized with `fcvtns`
/// (ties to even, as the scalar rounding).
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn segment_neon(v: &[u8], x: &[f32], n: usize, k: usize, s: usize, tb: &mut [u8], sc: &mut [f32]) {
    use std::arch::aarch64::*;
    let nb = tb.len() / (k * 16);
    let (j0, j1) = inputs(n, s, nb);
    // SAFETY (every load and store below): t holds the segment's SEG·8 inputs and ent its
    // 2·SEG groups of 8; v is k × n f16 and x n long (checked); tb holds nb·k·16 bytes.
    assert!(nb <= SEG && v.len() >= 2 * k * n && x.len() >= n && sc.len() >= k, "LUT build operands");
    let mut t = [0f32; SEG * 8];
    let mut ent = [0f32; SEG * 16];
    // Entries b = 4h..4h + 4: the sign of input q (minus where bit q of b is set).
    let sign = |q: usize, h: usize| {
        let f: [f32; 4] = std::array::from_fn(|i| if (4 * h + i) >> q & 1 != 0 { -1.0 } else { 1.0 });
        vld1q_f32(f.as_ptr())
    };
    let sg: [[float32x4_t; 3]; 2] = std::array::from_fn(|h| [sign(0, h), sign(1, h), sign(2, h)]);
    for (r, scr) in sc.iter_mut().enumerate().take(k) {
        for j in j0..j1 {
            let at = 2 * (r * n + j);
            t[j - j0] = half::f16::from_le_bytes([v[at], v[at + 1]]).to_f32() * x[j];
        }
        let mut amax = vdupq_n_f32(0.0);
        for g in 0..2 * nb {
            let tg = &t[4 * g..4 * g + 4];
            for (h, sg) in sg.iter().enumerate() {
                let e = vmulq_n_f32(sg[0], tg[0]);
                let e = vfmaq_n_f32(e, sg[1], tg[1]);
                let e = vfmaq_n_f32(e, sg[2], tg[2]);
                let e = vaddq_f32(e, vdupq_n_f32(tg[3]));
                vst1q_f32(ent.as_mut_ptr().add(8 * g + 4 * h), e);
                amax = vmaxq_f32(amax, vabsq_f32(e));
            }
        }
        let d = vmaxvq_f32(amax) / 127.0;
        *scr = d;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        for g in 0..2 * nb {
            let q = |h: usize| vcvtnq_s32_f32(vmulq_n_f32(vld1q_f32(ent.as_ptr().add(8 * g + 4 * h)), inv));
            let w = vcombine_s16(vqmovn_s32(q(0)), vqmovn_s32(q(1)));
            let b = veor_u8(vreinterpret_u8_s8(vqmovn_s16(w)), vdup_n_u8(0x80));
            vst1_u8(tb.as_mut_ptr().add(offset(g / 2, k) + 32 * r + g % 2 * 8), b);
        }
    }
}

/// The signed table value of nibble `e` of group `h` (0 low, 1 high) at byte `c`, rank `r`.
#[inline(always)]
fn entry(t: &Tables, c: usize, r: usize, h: usize, e: u8) -> i32 {
    let at = |i: u8| t.tab[offset(c, t.k) + 32 * r + h * 8 + i as usize] as i32 - 128;
    if e & 8 != 0 {
        -at(!e & 7)
    } else {
        at(e)
    }
}

/// The scalar reference: `ys[d] += Σ_r u[d·k + r] · Σ_s scale·Σ_{c∈s} entries` for rows
/// `i0..i0 + ys.len()`, with `signs` the block's sign bytes and `u` those rows of u in f32.
pub fn rows_scalar(t: &Tables, signs: &[u8], u: &[f32], i0: usize, ys: &mut [f32]) {
    let (k, rb) = (t.k, t.bytes);
    let mut acc = vec![0f32; k];
    for (d, y) in ys.iter_mut().enumerate() {
        let i = i0 + d;
        let row = &signs[i * rb..(i + 1) * rb];
        acc.fill(0.0);
        for (s, seg) in row.chunks(SEG).enumerate() {
            for (r, a) in acc.iter_mut().enumerate() {
                let mut sum = 0i32;
                for (cc, &byte) in seg.iter().enumerate() {
                    let c = s * SEG + cc;
                    sum += entry(t, c, r, 0, byte & 15) + entry(t, c, r, 1, byte >> 4);
                }
                *a += sum as f32 * t.scale[s * k + r];
            }
        }
        *y += acc.iter().zip(&u[d * k..(d + 1) * k]).map(|(a, u)| a * u).sum::<f32>();
    }
}

/// Whether [`rows8_avx2`] has an instance for rank `k`.
pub fn avx2_rank(k: usize) -> bool {
    matches!(k, 4 | 8 | 16)
}

/// Whether [`rows_neon`] has an instance for rank `k`.
pub fn neon_rank(k: usize) -> bool {
    matches!(k, 4 | 8 | 16)
}

/// Rows `i0..i0 + ys.len()` on `isa`: whole groups of 8 rows through the SIMD kernel
/// where `isa` has one for rank `t.k` ([`rows_avx2`], [`rows_neon`]), every other row
/// through [`rows_scalar`]; `u` holds those rows of u in f32.
pub fn rows(isa: super::Isa, t: &Tables, signs: &[u8], u: &[f32], i0: usize, ys: &mut [f32]) {
    let whole = match isa {
        #[cfg(target_arch = "x86_64")]
        super::Isa::Avx2 | super::Isa::Avx512Vnni if avx2_rank(t.k) => {
            let w = ys.len() / 8 * 8;
            // SAFETY: `Isa::Avx2` and above are only chosen when the CPU has AVX2 and FMA.
            unsafe { rows_avx2(t, signs, u, i0, &mut ys[..w]) };
            w
        }
        #[cfg(target_arch = "aarch64")]
        super::Isa::NeonDot if neon_rank(t.k) => {
            let w = ys.len() / 8 * 8;
            rows_neon(t, signs, u, i0, &mut ys[..w]);
            w
        }
        _ => 0,
    };
    rows_scalar(t, signs, &u[whole * t.k..], i0 + whole, &mut ys[whole..]);
}

/// Rows `i0..i0 + 8·(ys.len()/8)` through NEON `tbl` lookups (whole groups of 8 rows,
/// as [`rows_avx2`]); `k` must satisfy [`neon_rank`].
#[cfg(target_arch = "aarch64")]
pub fn rows_neon(t: &Tables, signs: &[u8], u: &[f32], i0: usize, ys: &mut [f32]) {
    for (g, y8) in ys.chunks_exact_mut(8).enumerate() {
        let i = i0 + 8 * g;
        // SAFETY: NEON is part of every aarch64 target; the bounds are checked inside.
        unsafe {
            match t.k {
                4 => rows8_neon::<4>(t, signs, &u[8 * g * 4..], i, y8),
                8 => rows8_neon::<8>(t, signs, &u[8 * g * 8..], i, y8),
                16 => rows8_neon::<16>(t, signs, &u[8 * g * 16..], i, y8),
                _ => unreachable!("rows_neon without an instance for rank {}", t.k),
            }
        }
    }
}

/// Byte j of transposed column pair a: row `j % 8`, column `2a + j / 8` of eight rows of
/// eight sign bytes laid out row after row.
#[cfg(target_arch = "aarch64")]
const fn transpose_pair(a: usize) -> [u8; 16] {
    let mut p = [0u8; 16];
    let mut j = 0;
    while j < 16 {
        p[j] = (8 * (j % 8) + 2 * a + j / 8) as u8;
        j += 1;
    }
    p
}

/// Eight rows at rank `K`, one rank at a time: a `tbl` per rank looks up the 16 nibbles
/// of a column (row t's low group in byte 2t, its high group in 2t + 1) in that rank's
/// 16 entries, the sign is applied to the unbiased entry (`(e ^ 0x80 ^ n) − n` with n =
/// −1 for a negative group), and `sadalp` adds each row's two groups into its int16 lane.
/// A segment's lane sums at most `SEG · 2 · 127` (8128) in magnitude, so it is exact and
/// equals `rows_scalar`'s integer sum; the segment then goes to f32 with its scale.
#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon")]
unsafe fn rows8_neon<const K: usize>(t: &Tables, signs: &[u8], u: &[f32], i0: usize, y8: &mut [f32]) {
    use std::arch::aarch64::*;
    let rb = t.bytes;
    // SAFETY (every load below): the rows, tables, scales and u (rows i0.. of it) are
    // checked here to cover rows i0..i0+8, every sign byte and every rank.
    assert!(
        t.k == K
            && y8.len() == 8
            && signs.len() >= (i0 + 8) * rb
            && t.tab.len() >= rb.next_multiple_of(RUN) * K * 16
            && t.scale.len() >= rb.div_ceil(SEG) * K
            && u.len() >= 8 * K,
        "LUT kernel operands too short"
    );
    const IDX: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0];
    const ODD: [u8; 16] = [0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8, 0, 8];
    const TR: [[u8; 16]; 4] = [transpose_pair(0), transpose_pair(1), transpose_pair(2), transpose_pair(3)];
    // nibble → table index (bit 3 set: entry !e & 7); high nibbles (odd bytes) index the
    // second group's 8 entries.
    let idx_lut = vld1q_u8(IDX.as_ptr());
    let odd = vld1q_u8(ODD.as_ptr());
    let tr = TR.map(|p| vld1q_u8(p.as_ptr()));
    let (m4, bit3, top) = (vdupq_n_u8(0x0f), vdupq_n_u8(8), vdupq_n_u8(0x80));
    let tab = t.tab.as_ptr();
    let rows: [*const u8; 8] = std::array::from_fn(|d| signs.as_ptr().add((i0 + d) * rb));
    let mut facc = [[vdupq_n_f32(0.0); 2]; K];
    let mut pad = [0u8; 64];
    let mut c = 0;
    while c < rb {
        let seg_end = (c + SEG).min(rb);
        let s = c / SEG;
        let mut acc = [vdupq_n_s16(0); K];
        while c < seg_end {
            let cols = (seg_end - c).min(8);
            // 8 bytes of each row; a short tail is copied into a zero-padded buffer.
            let src: [*const u8; 8] = if cols == 8 {
                rows.map(|p| p.add(c))
            } else {
                for (d, p) in rows.iter().enumerate() {
                    std::ptr::copy_nonoverlapping(p.add(c), pad.as_mut_ptr().add(8 * d), cols);
                }
                std::array::from_fn(|d| pad.as_ptr().add(8 * d))
            };
            let ld2 = |d: usize| vcombine_u8(vld1_u8(src[d]), vld1_u8(src[d + 1]));
            let m = uint8x16x4_t(ld2(0), ld2(2), ld2(4), ld2(6));
            for (a, &tra) in tr.iter().enumerate().take(cols.div_ceil(2)) {
                let q = vqtbl4q_u8(m, tra);
                let (lo, hi) = (vandq_u8(q, m4), vshrq_n_u8::<4>(q));
                let nibs = [vzip1q_u8(lo, hi), vzip2q_u8(lo, hi)];
                for (h, &nib) in nibs.iter().enumerate().take(cols - 2 * a) {
                    let idx = vorrq_u8(vqtbl1q_u8(idx_lut, nib), odd);
                    let neg = vtstq_u8(nib, bit3);
                    let flip = veorq_u8(neg, top);
                    let tp = tab.add(offset(c + 2 * a + h, K));
                    for (r, ac) in acc.iter_mut().enumerate() {
                        let v = vqtbl1q_u8(vld1q_u8(tp.add(32 * r)), idx);
                        let sv = vsubq_s8(vreinterpretq_s8_u8(veorq_u8(v, flip)), vreinterpretq_s8_u8(neg));
                        *ac = vpadalq_s8(*ac, sv);
                    }
                }
            }
            c += cols;
        }
        // Scale the segment into f32.
        let sc = t.scale.as_ptr().add(s * K);
        for (r, &ac) in acc.iter().enumerate() {
            let lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(ac)));
            let hi = vcvtq_f32_s32(vmovl_high_s16(ac));
            facc[r][0] = vfmaq_n_f32(facc[r][0], lo, *sc.add(r));
            facc[r][1] = vfmaq_n_f32(facc[r][1], hi, *sc.add(r));
        }
    }
    // y[d] += Σ_r u[i0+d, r]·facc[r][d], gathering u's column r for each 4 rows.
    for h in 0..2 {
        let mut y = vld1q_f32(y8.as_ptr().add(4 * h));
        for (r, f) in facc.iter().enumerate() {
            let ur: [f32; 4] = std::array::from_fn(|d| u[(4 * h + d) * K + r]);
            y = vfmaq_f32(y, f[h], vld1q_f32(ur.as_ptr()));
        }
        vst1q_f32(y8.as_mut_ptr().add(4 * h), y);
    }
}

/// Rows `i0..i0 + 8·(ys.len()/8)` through AVX2 (whole groups of 8 rows; the caller runs
/// any remainder through [`rows_scalar`]); `u` holds those rows of u in f32. `k` must
/// satisfy [`avx2_rank`].
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn rows_avx2(t: &Tables, signs: &[u8], u: &[f32], i0: usize, ys: &mut [f32]) {
    for (g, y8) in ys.chunks_exact_mut(8).enumerate() {
        let i = i0 + 8 * g;
        // SAFETY: this function's contract (AVX2 + FMA); bounds are checked inside.
        unsafe {
            match t.k {
                4 => rows8_avx2::<4, 4>(t, signs, &u[8 * g * 4..], i, y8),
                8 => rows8_avx2::<8, 8>(t, signs, &u[8 * g * 8..], i, y8),
                16 => rows8_avx2::<16, 8>(t, signs, &u[8 * g * 16..], i, y8),
                _ => unreachable!("rows_avx2 without an instance for rank {}", t.k),
            }
        }
    }
}

/// Eight rows at rank `K`, `R` ranks per sweep over the columns (R accumulators stay in
/// registers; rank 16 sweeps twice). Each int16 accumulator lane holds one row's sum over
/// the columns of its 128-bit half (`c` low, `c + 8` high); the halves are added once per
/// segment, after the bias is taken out.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows8_avx2<const K: usize, const R: usize>(t: &Tables, signs: &[u8], u: &[f32], i0: usize, y8: &mut [f32]) {
    use std::arch::x86_64::*;
    let rb = t.bytes;
    // SAFETY (every load below): the rows, tables, scales and u (rows i0.. of it) are
    // checked here to cover rows i0..i0+8, every (padded) sign byte and every rank.
    assert!(
        t.k == K
            && K.is_multiple_of(R)
            && y8.len() == 8
            && signs.len() >= (i0 + 8) * rb
            && t.tab.len() >= rb.next_multiple_of(RUN) * K * 16
            && t.scale.len() >= rb.div_ceil(SEG) * K
            && u.len() >= 8 * K,
        "LUT kernel operands too short"
    );
    let rows: [*const u8; 8] = std::array::from_fn(|d| signs.as_ptr().add((i0 + d) * rb));
    let mut facc = [_mm256_setzero_ps(); K];
    for r0 in (0..K).step_by(R) {
        sweep_avx2::<K, R>(t, &rows, r0, &mut facc[r0..r0 + R]);
    }
    // y[d] += Σ_r u[i0+d, r]·facc[r][d], gathering u's column r for the 8 rows.
    let rows_k = _mm256_setr_epi32(
        0,
        K as i32,
        2 * K as i32,
        3 * K as i32,
        4 * K as i32,
        5 * K as i32,
        6 * K as i32,
        7 * K as i32,
    );
    let mut y = _mm256_loadu_ps(y8.as_ptr());
    for (r, &f) in facc.iter().enumerate() {
        y = _mm256_fmadd_ps(f, _mm256_i32gather_ps::<4>(u.as_ptr().add(r), rows_k), y);
    }
    _mm256_storeu_ps(y8.as_mut_ptr(), y);
}

/// Ranks `r0..r0 + R` of eight rows over every column into `facc` (f32, one row per
/// lane). `rows` point at `t.bytes` sign bytes each; the caller checked every bound.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn sweep_avx2<const K: usize, const R: usize>(
    t: &Tables,
    rows: &[*const u8; 8],
    r0: usize,
    facc: &mut [std::arch::x86_64::__m256],
) {
    use std::arch::x86_64::*;
    let rb = t.bytes;
    // High nibbles (odd bytes) index the second group's 8 entries.
    let odd = _mm256_set1_epi16(0x0800);
    let (m4, seven, one) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(7), _mm256_set1_epi8(1));
    let tab = t.tab.as_ptr().add(32 * r0);
    let mut pad = [0u8; 8 * RUN];
    // Two columns (c in the low lane, c + 8 in the high one) of 8 rows as 16 nibbles per
    // lane (row d's low group in byte 2d, its high group in 2d + 1); `tp` points at their
    // rank-r0 tables. The signs are also summed per nibble position (in int8: a lane sees
    // SEG/2 < 128 columns per segment) for the bias below.
    let pair = |acc: &mut [__m256i; R], sacc: &mut __m256i, nib: __m256i, tp: *const u8| {
        // neg: the group's bit 3 (its entry is −T[!e & 7], and !e & 7 = e ^ 15 there).
        let neg = _mm256_cmpgt_epi8(nib, seven);
        let idx = _mm256_or_si256(_mm256_xor_si256(nib, _mm256_and_si256(neg, m4)), odd);
        let sgn = _mm256_or_si256(neg, one);
        *sacc = _mm256_add_epi8(*sacc, sgn);
        for (r, ac) in acc.iter_mut().enumerate() {
            let v = _mm256_shuffle_epi8(_mm256_loadu_si256(tp.add(32 * r).cast()), idx);
            *ac = _mm256_add_epi16(*ac, _mm256_maddubs_epi16(v, sgn));
        }
    };
    let mut c = 0;
    while c < rb {
        let seg_end = (c + SEG).min(rb);
        let s = c / SEG;
        let mut acc = [_mm256_setzero_si256(); R];
        let mut sacc = _mm256_setzero_si256();
        while c < seg_end {
            let cols = (seg_end - c).min(RUN);
            // 16 bytes of each row (bytes c..c+8 low, c+8..c+16 high). A run of 8 (a row
            // of 64·j + 8 bytes) leaves the high lane zero; any other short run is copied
            // into a zero-padded buffer. Padding columns meet zero table entries.
            let src: [*const u8; 8] = if cols == RUN || cols == 8 {
                rows.map(|p| p.add(c))
            } else {
                pad.fill(0);
                for (d, p) in rows.iter().enumerate() {
                    std::ptr::copy_nonoverlapping(p.add(c), pad.as_mut_ptr().add(RUN * d), cols);
                }
                std::array::from_fn(|d| pad.as_ptr().add(RUN * d))
            };
            let ld = |d: usize| {
                if cols == 8 {
                    _mm256_zextsi128_si256(_mm_loadl_epi64(src[d].cast()))
                } else {
                    _mm256_loadu2_m128i(src[d].add(8).cast(), src[d].cast())
                }
            };
            // Transpose 8×8 bytes in each lane: q[a] holds columns 2a and 2a+1 (rows 0..7
            // each) of that lane's 8 columns.
            let a01 = _mm256_unpacklo_epi8(ld(0), ld(1));
            let a23 = _mm256_unpacklo_epi8(ld(2), ld(3));
            let a45 = _mm256_unpacklo_epi8(ld(4), ld(5));
            let a67 = _mm256_unpacklo_epi8(ld(6), ld(7));
            let b0 = _mm256_unpacklo_epi16(a01, a23);
            let b1 = _mm256_unpackhi_epi16(a01, a23);
            let b2 = _mm256_unpacklo_epi16(a45, a67);
            let b3 = _mm256_unpackhi_epi16(a45, a67);
            let q = [
                _mm256_unpacklo_epi32(b0, b2),
                _mm256_unpackhi_epi32(b0, b2),
                _mm256_unpacklo_epi32(b1, b3),
                _mm256_unpackhi_epi32(b1, b3),
            ];
            let tp = tab.add(offset(c, K));
            for (a, &qa) in q.iter().enumerate() {
                let lo = _mm256_and_si256(qa, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(qa, 4), m4);
                pair(&mut acc, &mut sacc, _mm256_unpacklo_epi8(lo, hi), tp.add((2 * a) * K * 32));
                pair(&mut acc, &mut sacc, _mm256_unpackhi_epi8(lo, hi), tp.add((2 * a + 1) * K * 32));
            }
            c += cols;
        }
        // Remove the bias, 128 · Σ signs per row and lane (the row's two nibble positions
        // added into its int16 lane), add the halves and scale the segment into f32.
        let bias = _mm256_slli_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), sacc), 7);
        let sc = t.scale.as_ptr().add(s * K + r0);
        for (r, &ac) in acc.iter().enumerate() {
            let a = _mm256_sub_epi16(ac, bias);
            let a = _mm_add_epi16(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
            let f = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(a));
            facc[r] = _mm256_fmadd_ps(f, _mm256_set1_ps(*sc.add(r)), facc[r]);
        }
    }
}
