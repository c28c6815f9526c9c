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
//! The sign bits keep their v1 row-major layout: the kernel loads 8 bytes from each of
//! 8 rows and transposes them in registers, so no re-encoding of the file is needed and
//! the index work is shared by every rank.

use rayon::prelude::*;

/// Sign bytes (8 inputs each) per table scale.
pub const SEG: usize = 32;

/// A block's int8 tables for one input vector.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    pub k: usize,
    /// Sign bytes per row (`⌈n/8⌉`).
    pub bytes: usize,
    /// `tab[(c·k + r)·16 + h·8 + e]`: entry `e` (bit 3 clear) of group `2c + h` for rank
    /// `r`, as `round(T / scale) + 128`.
    pub tab: Vec<u8>,
    /// `scale[s·k + r]`: the table scale of rank `r` in segment `s`.
    pub scale: Vec<f32>,
}

/// The int8 tables of every block (`(v as f16 bytes, n, k)`, `v` being `k × n`) for
/// input `x`, all blocks' segments built in one parallel pass; `isa` picks the AVX2
/// builder or the scalar one (the two round identically: the same adds in the same
/// order, and `cvtps2dq` rounds ties to even as the scalar code does).
pub fn build(isa: super::Isa, blocks: &[(&[u8], usize, usize)], x: &[f32]) -> Vec<Tables> {
    let mut out: Vec<Tables> = blocks
        .iter()
        .map(|&(_, n, k)| {
            let bytes = n.div_ceil(8);
            Tables { k, bytes, tab: vec![0u8; bytes * k * 16], scale: vec![0f32; bytes.div_ceil(SEG) * k] }
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
            let dst = &mut tb[(c * k + r) * 16..][..16];
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
            _mm_storel_epi64(tb.as_mut_ptr().add((g / 2 * k + r) * 16 + g % 2 * 8).cast(), b);
        }
    }
}

/// The signed table value of nibble `e` of group `h` (0 low, 1 high) at byte `c`, rank `r`.
#[inline(always)]
fn entry(t: &Tables, c: usize, r: usize, h: usize, e: u8) -> i32 {
    let at = |i: u8| t.tab[(c * t.k + r) * 16 + h * 8 + i as usize] as i32 - 128;
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
                4 => rows8_avx2::<4, 2>(t, signs, &u[8 * g * 4..], i, y8),
                8 => rows8_avx2::<8, 4>(t, signs, &u[8 * g * 8..], i, y8),
                16 => rows8_avx2::<16, 8>(t, signs, &u[8 * g * 16..], i, y8),
                _ => unreachable!("rows_avx2 without an instance for rank {}", t.k),
            }
        }
    }
}

/// Eight rows at rank `K` (`P = K/2` rank pairs): each `__m256i` accumulator holds rank
/// `2p` in its low lane and `2p + 1` in its high lane, 8 rows of int16 per lane.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows8_avx2<const K: usize, const P: usize>(t: &Tables, signs: &[u8], u: &[f32], i0: usize, y8: &mut [f32]) {
    use std::arch::x86_64::*;
    let rb = t.bytes;
    // SAFETY (every load below): the rows, tables, scales and u (rows i0.. of it) are
    // checked here to cover rows i0..i0+8, every sign byte and every rank.
    assert!(
        t.k == K
            && 2 * P == K
            && y8.len() == 8
            && signs.len() >= (i0 + 8) * rb
            && t.tab.len() >= rb * K * 16
            && t.scale.len() >= rb.div_ceil(SEG) * K
            && u.len() >= 8 * K,
        "LUT kernel operands too short"
    );
    // nibble → table index (bit 3 set: entry !e & 7) and sign (±1).
    let idx_lut = _mm256_setr_epi8(
        0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0,
    );
    let sgn_lut = _mm256_setr_epi8(
        1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1,
    );
    // High nibbles (odd bytes) index the second group's 8 entries.
    let odd = _mm256_set1_epi16(0x0800);
    let m4 = _mm_set1_epi8(0x0f);
    let tab = t.tab.as_ptr();
    let rows: [*const u8; 8] = std::array::from_fn(|d| signs.as_ptr().add((i0 + d) * rb));
    let mut facc = [_mm256_setzero_ps(); K];
    let mut pad = [0u8; 64];
    // One column (sign byte `col` of the 8 rows, as 16 nibbles: row t low, row t high):
    // the index and sign work is shared by every rank pair.
    let column = |acc: &mut [__m256i; P], nib: __m128i, col: usize| {
        let nb = _mm256_broadcastsi128_si256(nib);
        let idx = _mm256_or_si256(_mm256_shuffle_epi8(idx_lut, nb), odd);
        let sgn = _mm256_shuffle_epi8(sgn_lut, nb);
        let tp = tab.add(col * K * 16);
        for (p, ac) in acc.iter_mut().enumerate() {
            let v = _mm256_shuffle_epi8(_mm256_loadu_si256(tp.add(p * 32).cast()), idx);
            *ac = _mm256_add_epi16(*ac, _mm256_maddubs_epi16(v, sgn));
        }
    };
    let mut c = 0;
    while c < rb {
        let seg_end = (c + SEG).min(rb);
        let s = c / SEG;
        let mut acc = [_mm256_setzero_si256(); P];
        // The bias each row collects is 128 · Σ signs = 128 · (groups − 2 · negative
        // groups); bit 3 of each nibble (0x88 of a byte) marks a negative group.
        let bias: [i16; 8] = std::array::from_fn(|d| {
            let row = std::slice::from_raw_parts(rows[d].add(c), seg_end - c);
            let neg: u32 = row.iter().map(|&b| (b & 0x88).count_ones()).sum();
            (128 * (2 * (seg_end - c) as i32 - 2 * neg as i32)) as i16
        });
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
            let ld = |d: usize| _mm_loadl_epi64(src[d].cast());
            // Transpose 8×8 bytes: q[a] holds columns 2a (low half) and 2a+1, rows 0..7.
            let a01 = _mm_unpacklo_epi8(ld(0), ld(1));
            let a23 = _mm_unpacklo_epi8(ld(2), ld(3));
            let a45 = _mm_unpacklo_epi8(ld(4), ld(5));
            let a67 = _mm_unpacklo_epi8(ld(6), ld(7));
            let b0 = _mm_unpacklo_epi16(a01, a23);
            let b1 = _mm_unpackhi_epi16(a01, a23);
            let b2 = _mm_unpacklo_epi16(a45, a67);
            let b3 = _mm_unpackhi_epi16(a45, a67);
            let q = [
                _mm_unpacklo_epi32(b0, b2),
                _mm_unpackhi_epi32(b0, b2),
                _mm_unpacklo_epi32(b1, b3),
                _mm_unpackhi_epi32(b1, b3),
            ];
            let nibs = |qa: __m128i| {
                let lo = _mm_and_si128(qa, m4);
                let hi = _mm_and_si128(_mm_srli_epi16(qa, 4), m4);
                [_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)]
            };
            if cols == 8 {
                for (a, &qa) in q.iter().enumerate() {
                    let [n0, n1] = nibs(qa);
                    column(&mut acc, n0, c + 2 * a);
                    column(&mut acc, n1, c + 2 * a + 1);
                }
            } else {
                for h in 0..cols {
                    column(&mut acc, nibs(q[h / 2])[h % 2], c + h);
                }
            }
            c += cols;
        }
        // Remove the bias and scale the segment into f32.
        let b8 = _mm_loadu_si128(bias.as_ptr().cast());
        let bias = _mm256_broadcastsi128_si256(b8);
        let sc = t.scale.as_ptr().add(s * K);
        for (p, &ac) in acc.iter().enumerate() {
            let a = _mm256_sub_epi16(ac, bias);
            let lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)));
            let hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1)));
            facc[2 * p] = _mm256_fmadd_ps(lo, _mm256_set1_ps(*sc.add(2 * p)), facc[2 * p]);
            facc[2 * p + 1] = _mm256_fmadd_ps(hi, _mm256_set1_ps(*sc.add(2 * p + 1)), facc[2 * p + 1]);
        }
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
