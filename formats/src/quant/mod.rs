//! Quant block types: dequantization, dot products against f32 activations, and
//! quantization (round to nearest) for building test models and converting weights.
//!
//! These are the scalar reference kernels: simple, obviously correct, and the yardstick
//! that SIMD kernels in the runtime are tested against. Byte layouts are exactly ggml's
//! (see the submodules), so GGUF tensor data decodes as llama.cpp decodes it.
//!
//! API contract (every function):
//! - `src` holds whole blocks of `ty`; `dst`/`x` length = number of values;
//!   mismatched lengths return `Error::Invalid`, never panic.
//! - Unsupported types return `Error::UnsupportedType`.
//! - FineQuant types ([`GgmlType::Fine`]) take exactly one row: their last group may be
//!   shorter than the others, so where it ends depends on the row length.
//! - Any bytes are accepted: NaN or infinite scales give NaN or infinite values.

use std::prelude::v1::*;

use crate::error::{Error, Result};
use crate::fine;
use crate::types::{GgmlType, QK_K};

mod float;
mod kquants;
mod legacy;
pub(crate) mod num;

/// Dequantize `src` (whole blocks of `ty`) into `dst`.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    if let GgmlType::Fine(ft) = ty {
        return fine::dequantize_row(ft, src, dst);
    }
    check(ty, src.len(), dst.len())?;
    let (bs, ts) = ty.block_geometry();
    match ty {
        GgmlType::F32 => decode_each(src, dst, ts, float::f32_get),
        GgmlType::F16 => decode_each(src, dst, ts, float::f16_get),
        GgmlType::BF16 => decode_each(src, dst, ts, float::bf16_get),
        _ => {
            let (decode, _) = block_codec(ty)?;
            for (y, b) in dst.chunks_exact_mut(bs).zip(src.chunks_exact(ts)) {
                decode(b, y);
            }
        }
    }
    Ok(())
}

/// Dot product of one quantized row with f32 activations `x`.
///
/// Equals the dot product of the dequantized row with `x` up to summation order: each
/// block is decoded into a stack buffer by the same code as [`dequantize`], so the two
/// cannot drift apart, and nothing is allocated.
pub fn dot(ty: GgmlType, src: &[u8], x: &[f32]) -> Result<f32> {
    if let GgmlType::Fine(ft) = ty {
        return fine::dot_row(ft, src, x);
    }
    check(ty, src.len(), x.len())?;
    let (bs, ts) = ty.block_geometry();
    Ok(match ty {
        GgmlType::F32 => dot_each(src, x, ts, float::f32_get),
        GgmlType::F16 => dot_each(src, x, ts, float::f16_get),
        GgmlType::BF16 => dot_each(src, x, ts, float::bf16_get),
        _ => {
            let (decode, _) = block_codec(ty)?;
            let mut buf = [0.0f32; QK_K];
            let y = &mut buf[..bs];
            let mut acc = 0.0f32;
            for (x, b) in x.chunks_exact(bs).zip(src.chunks_exact(ts)) {
                decode(b, y);
                acc += y.iter().zip(x).map(|(y, x)| y * x).sum::<f32>();
            }
            acc
        }
    })
}

/// Quantize `src` into `dst` (round to nearest, as ggml's reference quantizers).
///
/// F16, BF16 and the legacy types reproduce ggml's `quantize_row_*_ref` bytes. The
/// k-quants follow the same algorithm (weighted scale/min search, then re-rounding
/// against the stored scales) but have no byte-exact reference to be checked against.
pub fn quantize(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<()> {
    if let GgmlType::Fine(ft) = ty {
        return fine::quantize_row(ft, fine::Rounding::Search, src, dst);
    }
    check(ty, dst.len(), src.len())?;
    let (bs, ts) = ty.block_geometry();
    match ty {
        GgmlType::F32 => encode_each(src, dst, ts, float::f32_put),
        GgmlType::F16 => encode_each(src, dst, ts, float::f16_put),
        GgmlType::BF16 => encode_each(src, dst, ts, float::bf16_put),
        _ => {
            let (_, encode) = block_codec(ty)?;
            for (x, b) in src.chunks_exact(bs).zip(dst.chunks_exact_mut(ts)) {
                encode(x, b);
            }
        }
    }
    Ok(())
}

// One value per element: generic so that the conversion inlines into the loop.

fn decode_each(src: &[u8], dst: &mut [f32], ts: usize, get: impl Fn(&[u8]) -> f32) {
    for (y, b) in dst.iter_mut().zip(src.chunks_exact(ts)) {
        *y = get(b);
    }
}

fn dot_each(src: &[u8], x: &[f32], ts: usize, get: impl Fn(&[u8]) -> f32) -> f32 {
    x.iter().zip(src.chunks_exact(ts)).map(|(x, b)| get(b) * x).sum()
}

fn encode_each(src: &[f32], dst: &mut [u8], ts: usize, put: impl Fn(f32, &mut [u8])) {
    for (&v, b) in src.iter().zip(dst.chunks_exact_mut(ts)) {
        put(v, b);
    }
}

/// Decoder and encoder of one block. Both get exactly one block: `type_size` bytes and
/// `block_size` values.
type BlockCodec = (fn(&[u8], &mut [f32]), fn(&[f32], &mut [u8]));

fn block_codec(ty: GgmlType) -> Result<BlockCodec> {
    use GgmlType::*;
    Ok(match ty {
        Q4_0 => (legacy::dequant_q4_0, legacy::quant_q4_0),
        Q4_1 => (legacy::dequant_q4_1, legacy::quant_q4_1),
        Q5_0 => (legacy::dequant_q5_0, legacy::quant_q5_0),
        Q5_1 => (legacy::dequant_q5_1, legacy::quant_q5_1),
        Q8_0 => (legacy::dequant_q8_0, legacy::quant_q8_0),
        Q4K => (kquants::dequant_q4_k, kquants::quant_q4_k),
        Q5K => (kquants::dequant_q5_k, kquants::quant_q5_k),
        Q6K => (kquants::dequant_q6_k, kquants::quant_q6_k),
        _ => return Err(Error::UnsupportedType(ty.name())),
    })
}

/// Checks that `ty` has kernels, that `bytes` is a whole number of its blocks, and that
/// those blocks hold exactly `values` values. Every length the kernels index by follows
/// from this, which is why they can index without further checks.
fn check(ty: GgmlType, bytes: usize, values: usize) -> Result<()> {
    if !ty.is_supported() {
        return Err(Error::UnsupportedType(ty.name()));
    }
    let (bs, ts) = ty.block_geometry();
    let blocks = bytes / ts;
    if blocks * ts != bytes {
        return Err(Error::invalid(format!("{ty} data of {bytes} bytes is not a whole number of {ts}-byte blocks")));
    }
    if blocks.checked_mul(bs) != Some(values) {
        return Err(Error::invalid(format!(
            "{ty} data holds {blocks} blocks of {bs} values, but {values} values were given"
        )));
    }
    Ok(())
}
