//! Quant block types: dequantization, dot products against f32 activations, and
//! quantization (round to nearest) for building test models and converting weights.
//!
//! These are the scalar reference kernels: simple, obviously correct, and the yardstick
//! that SIMD kernels in the runtime are tested against.
//!
//! API contract (every function):
//! - `src` holds whole blocks of `ty`; `dst`/`x` length = number of values;
//!   mismatched lengths return `Error::Invalid`, never panic.
//! - Unsupported types return `Error::UnsupportedType`.

use crate::error::{Error, Result};
use crate::types::GgmlType;

/// Dequantize `src` (whole blocks of `ty`) into `dst`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let _ = (ty, src, dst);
    Err(Error::UnsupportedType(ty.name()))
}

/// Dot product of one quantized row with f32 activations `x`.
pub fn dot(ty: GgmlType, src: &[u8], x: &[f32]) -> Result<f32> {
    let _ = (ty, src, x);
    Err(Error::UnsupportedType(ty.name()))
}

/// Quantize `src` into `dst` (round to nearest, as ggml's reference quantizers).
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    let _ = (ty, src, dst);
    Err(Error::UnsupportedType(ty.name()))
}
