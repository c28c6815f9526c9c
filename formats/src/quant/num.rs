//! Scalar helpers that `core` lacks (no libm in `no_std`), plus little-endian field access.
//!
//! The rounding helpers reproduce the exact rounding of ggml's C code (`roundf`,
//! `nearest_int`) so that our quantizers make the same choices as llama.cpp's.

use half::f16;

/// `|v|` by clearing the sign bit (`f32::abs` is not in `core` on our MSRV).
#[inline]
pub(crate) fn abs(v: f32) -> f32 {
    f32::from_bits(v.to_bits() & 0x7fff_ffff)
}

/// Round half to even, as ggml's `nearest_int` (the 1.5·2^23 trick). That trick is only
/// valid for |v| < 2^22; outside it (and for NaN) we saturate instead of returning garbage.
#[inline]
pub(crate) fn nearest_int(v: f32) -> i32 {
    if abs(v) <= 4_194_303.0 {
        ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
    } else {
        v as i32
    }
}

/// Round half away from zero, as C's `roundf` (used by ggml's Q8_0 quantizer).
#[inline]
pub(crate) fn round_half_away(v: f32) -> f32 {
    // From 2^23 up every float is an integer; this also passes inf and NaN through.
    if v.is_nan() || abs(v) >= 8_388_608.0 {
        return v;
    }
    let t = v as i32 as f32;
    // Exact: the fraction of a float is always representable.
    let frac = v - t;
    if frac >= 0.5 {
        t + 1.0
    } else if frac <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// Square root for the quantizers' weighting (there is no `sqrtf` in `core`). Newton's
/// method in f64 from an exponent-halving guess; converged to f64 precision, so the f32
/// result is the correctly rounded root except for rare double-rounding ties.
pub(crate) fn sqrt(v: f32) -> f32 {
    if v.is_nan() || v < 0.0 {
        return f32::NAN;
    }
    if v == 0.0 || v.is_infinite() {
        return v;
    }
    let x = v as f64;
    // Halving the biased exponent gives a guess within a factor of ~1.5 of the root.
    let mut y = f64::from_bits((x.to_bits() >> 1) + (1023u64 << 51));
    for _ in 0..6 {
        y = 0.5 * (y + x / y);
    }
    y as f32
}

/// The f16 stored little-endian at `b[at..at + 2]`.
#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Store `v` (rounded to nearest even f16) little-endian at `b[at..at + 2]`.
#[inline]
pub(crate) fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// Round `v` to f16 precision, i.e. the scale a decoder will actually see.
#[inline]
pub(crate) fn as_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}
