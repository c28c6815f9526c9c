//! Gated activations over whole rows, vectorized through the branch-free exponential
//! of the attention kernels (libm's `tanhf` per value was a tenth of Gemma's prefill,
//! `expf` for SiLU a few percent of batched decode).

use super::attn::{exp_neg, fused, Fused, Madd, Plain};
use super::Isa;

/// GELU, tanh approximation, with `tanh(y) = sign(y)·(1 − e)/(1 + e)`, `e = e^(−2|y|)`.
#[inline(always)]
fn gelu<M: Madd>(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let y = SQRT_2_OVER_PI * x * M::madd(0.044_715 * x, x, 1.0);
    let e = exp_neg::<M>(-2.0 * y.abs());
    let t = ((1.0 - e) / (1.0 + e)).copysign(y);
    0.5 * x * (1.0 + t)
}

#[inline(always)]
fn gelu_mul_body<M: Madd>(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu::<M>(*g) * u;
    }
}

/// SiLU, `x / (1 + e^(−x))`, from `e = e^(−|x|)` only (the exponential of a
/// non-positive argument): `x / (1 + e)` for x ≥ 0, `x·e / (1 + e)` below.
#[inline(always)]
fn silu<M: Madd>(x: f32) -> f32 {
    let e = exp_neg::<M>(-x.abs());
    let num = if x >= 0.0 { x } else { x * e };
    num / (1.0 + e)
}

#[inline(always)]
fn silu_mul_body<M: Madd>(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu::<M>(*g) * u;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_mul(gate: &mut [f32], up: &[f32]) {
        super::gelu_mul_body::<super::Fused>(gate, up)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        super::silu_mul_body::<super::Fused>(gate, up)
    }
}

/// `gate ← silu(gate) · up`, element by element.
pub fn silu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    if fused(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `gelu_mul`.
        return unsafe { avx2::silu_mul(gate, up) };
        #[cfg(not(target_arch = "x86_64"))]
        return silu_mul_body::<Fused>(gate, up);
    }
    silu_mul_body::<Plain>(gate, up)
}

/// `gate ← gelu(gate) · up`, element by element.
pub fn gelu_mul(isa: Isa, gate: &mut [f32], up: &[f32]) {
    if fused(isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `fused` is true on x86 only for instruction sets that include AVX2 and
        // FMA (detected); the body is safe code.
        return unsafe { avx2::gelu_mul(gate, up) };
        #[cfg(not(target_arch = "x86_64"))]
        return gelu_mul_body::<Fused>(gate, up);
    }
    gelu_mul_body::<Plain>(gate, up)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against `x / (1 + e^−x)` in f64, both signs, into saturation.
    #[test]
    fn silu_matches_f64() {
        for isa in Isa::available() {
            let mut g: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.005).chain([-100.0, -30.0, 25.0, 90.0]).collect();
            let want: Vec<f64> = g.iter().map(|&x| x as f64 / (1.0 + (-(x as f64)).exp())).collect();
            let up = vec![1.0; g.len()];
            silu_mul(isa, &mut g, &up);
            for (i, (&got, &w)) in g.iter().zip(&want).enumerate() {
                let err = (got as f64 - w).abs();
                assert!(err <= 4e-7 * w.abs().max(1e-3), "{} silu at {i}: {got} vs {w}", isa.name());
            }
        }
    }

    /// Against the tanh formula in f64, over the range where activations live and far
    /// past it (where tanh saturates).
    #[test]
    fn gelu_matches_f64_tanh() {
        for isa in Isa::available() {
            let mut g: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.005).chain([-60.0, -12.0, 15.0, 80.0]).collect();
            let want: Vec<f64> = g
                .iter()
                .map(|&x| {
                    let x = x as f64;
                    0.5 * x * (1.0 + (0.797_884_560_802_865_4 * x * (1.0 + 0.044_715 * x * x)).tanh())
                })
                .collect();
            let up = vec![1.0; g.len()];
            gelu_mul(isa, &mut g, &up);
            for (i, (&got, &w)) in g.iter().zip(&want).enumerate() {
                let err = (got as f64 - w).abs();
                assert!(err <= 4e-7 * w.abs().max(1.0), "{} gelu at {i}: {got} vs {w}", isa.name());
            }
        }
    }
}
