//! Register-tiled pieces of batched attention: queries × keys and weights × values as
//! small GEMMs, and a vectorizable `exp`. Long prompts spend most of their time here
//! (a per-key dot product and axpy leave the FMA units idle on call overhead).
//!
//! The bodies are plain Rust over fixed-size tiles, written for the auto-vectorizer, and
//! compiled once per instruction set: with AVX2+FMA on x86, with NEON on aarch64 (its
//! baseline), and without fused multiply-adds for the scalar reference.

use super::Isa;

/// Queries per register tile.
pub const TQ: usize = 4;
/// Keys (or value columns) per register tile.
pub const TK: usize = 16;

/// How a tile multiplies and adds: fused where the CPU has it. Without hardware FMA
/// `f32::mul_add` is a libm call, so the scalar build multiplies and adds.
pub(super) trait Madd {
    fn madd(a: f32, b: f32, c: f32) -> f32;
}
pub(super) struct Fused;
pub(super) struct Plain;
impl Madd for Fused {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
impl Madd for Plain {
    #[inline(always)]
    fn madd(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `acc[t][l] += a(t) · b[l]`: the register tile both products are made of.
#[inline(always)]
fn rank1<M: Madd>(acc: &mut [[f32; TK]; TQ], a: impl Fn(usize) -> f32, b: &[f32; TK]) {
    for (t, row) in acc.iter_mut().enumerate() {
        let x = a(t);
        for l in 0..TK {
            row[l] = M::madd(x, b[l], row[l]);
        }
    }
}

/// `s[t][j] = scale · q[t] · kt[·][j]` for `TQ` query rows `q` (`hd` each, contiguous)
/// and keys `j` in `0..nk` of the transposed keys `kt` (`hd` rows `kstride` apart, each
/// valid up to `nk` rounded up to `TK`). `s` rows are `sstride` apart.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scores_body<M: Madd>(
    q: &[f32],
    kt: &[f32],
    kstride: usize,
    hd: usize,
    nk: usize,
    scale: f32,
    s: &mut [f32],
    sstride: usize,
) {
    let q = &q[..TQ * hd];
    let mut j = 0;
    while j < nk {
        let mut acc = [[0f32; TK]; TQ];
        for d in 0..hd {
            let k: &[f32; TK] = kt[d * kstride + j..d * kstride + j + TK].try_into().expect("padded keys");
            rank1::<M>(&mut acc, |t| q[t * hd + d], k);
        }
        for (t, a) in acc.iter().enumerate() {
            let out: &mut [f32; TK] =
                (&mut s[t * sstride + j..t * sstride + j + TK]).try_into().expect("padded scores");
            for l in 0..TK {
                out[l] = a[l] * scale;
            }
        }
        j += TK;
    }
}

/// `o[t] += Σ_j p[t][j] · v[j]` over `j` in `0..nk` for `TQ` rows of weights `p` (rows of
/// `stride`), values `v` (`hd`-wide rows of `vstride` floats) and outputs `o` (`hd` each).
/// `hd` must be a multiple of `TK`.
#[inline(always)]
fn values_body<M: Madd>(p: &[f32], stride: usize, v: &[f32], vstride: usize, hd: usize, nk: usize, o: &mut [f32]) {
    for d0 in (0..hd).step_by(TK) {
        // Accumulating onto `o` itself keeps the decode path's order of sums (one axpy
        // per key), across blocks of keys too.
        let mut acc = [[0f32; TK]; TQ];
        for (t, a) in acc.iter_mut().enumerate() {
            a.copy_from_slice(&o[t * hd + d0..t * hd + d0 + TK]);
        }
        for j in 0..nk {
            let vj: &[f32; TK] = v[j * vstride + d0..j * vstride + d0 + TK].try_into().expect("value row");
            rank1::<M>(&mut acc, |t| p[t * stride + j], vj);
        }
        for (t, a) in acc.iter().enumerate() {
            o[t * hd + d0..t * hd + d0 + TK].copy_from_slice(a);
        }
    }
}

/// `e^x` for `x ≤ 0` to about 1 ulp (Cody–Waite reduction, degree-6 polynomial), branch
/// free so that a loop over it vectorizes; arguments below −87.3 give 0 (e^−87.3 is f32's smallest normal).
#[inline(always)]
pub(super) fn exp_neg<M: Madd>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let under = x < -87.3;
    let x = x.max(-87.3);
    // Round to nearest by the 1.5·2²³ trick (|x·log2e| < 126 here).
    let t = x * LOG2E + 12_582_912.0;
    let n = t - 12_582_912.0;
    // n as an integer from the bits of t (where the trick left it), not by `as i32`,
    // whose saturating conversion keeps the loop from vectorizing.
    let ni = (t.to_bits() as i32).wrapping_sub(12_582_912f32.to_bits() as i32);
    let r = M::madd(n, -LN2_LO, M::madd(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4f32;
    p = M::madd(p, r, 1.398_199_9e-3);
    p = M::madd(p, r, 8.333_452e-3);
    p = M::madd(p, r, 4.166_579_6e-2);
    p = M::madd(p, r, 1.666_666_5e-1);
    p = M::madd(p, r, 0.5);
    let e = M::madd(p, r * r, r) + 1.0;
    let scaled = e * f32::from_bits(((ni + 127) as u32) << 23);
    if under {
        0.0
    } else {
        scaled
    }
}

/// `x ← e^(x − max)`, returning the sum.
#[inline(always)]
fn softmax_body<M: Madd>(x: &mut [f32], max: f32) -> f32 {
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = exp_neg::<M>(*v - max);
    }
    // Summed in 8 lanes so that the adds vectorize as well.
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] += c[l];
        }
    }
    for v in chunks.remainder() {
        sum += v;
    }
    sum + lanes.iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores(q: &[f32], kt: &[f32], ks: usize, hd: usize, nk: usize, scale: f32, s: &mut [f32], ss: usize) {
        scores_body::<Fused>(q, kt, ks, hd, nk, scale, s, ss)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn values(p: &[f32], stride: usize, v: &[f32], vstride: usize, hd: usize, nk: usize, o: &mut [f32]) {
        values_body::<Fused>(p, stride, v, vstride, hd, nk, o)
    }
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softmax(x: &mut [f32], max: f32) -> f32 {
        softmax_body::<Fused>(x, max)
    }
}

pub(super) fn fused(isa: Isa) -> bool {
    match isa {
        Isa::Avx2 | Isa::Avx512Vnni => cfg!(target_arch = "x86_64"),
        Isa::NeonDot => cfg!(target_arch = "aarch64"),
        Isa::Scalar => false,
    }
}

/// Scores of `TQ` queries against `nk` keys; see [`scores_body`] for the layout.
#[allow(clippy::too_many_arguments)]
pub fn scores(
    isa: Isa,
    q: &[f32],
    kt: &[f32],
    kstride: usize,
    hd: usize,
    nk: usize,
    scale: f32,
    s: &mut [f32],
    sstride: usize,
) {
    let padded = nk.div_ceil(TK) * TK;
    assert!(q.len() >= TQ * hd && hd > 0 && nk > 0, "empty or short query tile");
    assert!(kstride >= padded && kt.len() >= (hd - 1) * kstride + padded, "keys too short");
    assert!(sstride >= padded && s.len() >= (TQ - 1) * sstride + padded, "scores too short");
    if fused(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `fused` is true on x86 only for instruction sets that include AVX2 and
        // FMA (detected); the body is safe code.
        return unsafe { avx2::scores(q, kt, kstride, hd, nk, scale, s, sstride) };
        #[cfg(not(target_arch = "x86_64"))]
        return scores_body::<Fused>(q, kt, kstride, hd, nk, scale, s, sstride);
    }
    scores_body::<Plain>(q, kt, kstride, hd, nk, scale, s, sstride)
}

/// Weighted sum of `nk` value rows into `TQ` outputs; see [`values_body`].
#[allow(clippy::too_many_arguments)]
pub fn values(isa: Isa, p: &[f32], stride: usize, v: &[f32], vstride: usize, hd: usize, nk: usize, o: &mut [f32]) {
    assert!(hd.is_multiple_of(TK) && p.len() >= (TQ - 1) * stride + nk, "head size or weights");
    assert!(nk == 0 || v.len() >= (nk - 1) * vstride + hd, "values too short");
    assert!(o.len() >= TQ * hd, "outputs too short");
    if fused(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `scores`.
        return unsafe { avx2::values(p, stride, v, vstride, hd, nk, o) };
        #[cfg(not(target_arch = "x86_64"))]
        return values_body::<Fused>(p, stride, v, vstride, hd, nk, o);
    }
    values_body::<Plain>(p, stride, v, vstride, hd, nk, o)
}

/// `x ← e^(x − max)` in place, returning the sum.
pub fn softmax_exp(isa: Isa, x: &mut [f32], max: f32) -> f32 {
    if fused(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `scores`.
        return unsafe { avx2::softmax(x, max) };
        #[cfg(not(target_arch = "x86_64"))]
        return softmax_body::<Fused>(x, max);
    }
    softmax_body::<Plain>(x, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn exp_matches_libm() {
        for isa in Isa::available() {
            let mut xs: Vec<f32> = (0..20000).map(|i| -(i as f32) * 0.0045).collect();
            xs.extend([0.0, -1e-30, -86.9, -87.5, -1000.0, f32::NEG_INFINITY]);
            let mut got = xs.clone();
            let sum = softmax_exp(isa, &mut got, 0.0);
            let mut want_sum = 0f64;
            for (&x, &g) in xs.iter().zip(&got) {
                let want = x.exp();
                want_sum += want as f64;
                let tol = want.abs() * 2.5e-7 + 1.3e-38;
                assert!((g - want).abs() <= tol, "{isa:?}: exp({x}) = {g}, libm {want}");
            }
            assert!(((sum as f64) - want_sum).abs() <= want_sum * 1e-5, "{isa:?}: sum {sum} vs {want_sum}");
        }
    }

    #[test]
    fn tiles_match_plain_loops() {
        let (hd, nk): (usize, usize) = (64, 37);
        let stride = nk.div_ceil(TK) * TK + TK;
        let mut seed = 7;
        let q: Vec<f32> = (0..TQ * hd).map(|_| lcg(&mut seed)).collect();
        let keys: Vec<f32> = (0..nk * hd).map(|_| lcg(&mut seed)).collect();
        let mut kt = vec![0f32; hd * stride];
        for j in 0..nk {
            for d in 0..hd {
                kt[d * stride + j] = keys[j * hd + d];
            }
        }
        let vstride = hd + 8;
        let v: Vec<f32> = (0..nk * vstride).map(|_| lcg(&mut seed)).collect();
        let p: Vec<f32> = (0..TQ * stride).map(|_| lcg(&mut seed)).collect();
        for isa in Isa::available() {
            let sstride = stride + 3;
            let mut s = vec![0f32; TQ * sstride];
            scores(isa, &q, &kt, stride, hd, nk, 0.5, &mut s, sstride);
            let mut o = vec![1f32; TQ * hd];
            values(isa, &p, stride, &v, vstride, hd, nk, &mut o);
            for t in 0..TQ {
                for j in 0..nk {
                    let want: f32 = (0..hd).map(|d| q[t * hd + d] * keys[j * hd + d]).sum::<f32>() * 0.5;
                    assert!((s[t * sstride + j] - want).abs() < 1e-4, "{isa:?} score {t},{j}");
                }
                for d in 0..hd {
                    let want: f32 = 1.0 + (0..nk).map(|j| p[t * stride + j] * v[j * vstride + d]).sum::<f32>();
                    assert!((o[t * hd + d] - want).abs() < 1e-4, "{isa:?} output {t},{d}");
                }
            }
        }
    }
}
