//! Unquantized element types: F32, F16 and BF16, one little-endian value per element.

use half::bf16;

pub(super) fn f32_get(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(super) fn f32_put(v: f32, b: &mut [u8]) {
    b.copy_from_slice(&v.to_le_bytes());
}

pub(super) fn f16_get(b: &[u8]) -> f32 {
    super::num::f16_at(b, 0)
}

/// Round to nearest even, as ggml's `GGML_FP32_TO_FP16`.
pub(super) fn f16_put(v: f32, b: &mut [u8]) {
    super::num::put_f16(b, 0, v);
}

/// BF16 is the top half of an f32, so widening is exact.
pub(super) fn bf16_get(b: &[u8]) -> f32 {
    bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
}

/// Round to nearest even, NaNs kept quiet: the same bits as ggml's `GGML_FP32_TO_BF16`.
pub(super) fn bf16_put(v: f32, b: &mut [u8]) {
    b.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
}
