//! Weights repacked at load into groups of eight rows, so that one pass over a block
//! feeds eight rows' dot products and the per-block scales of all eight arrive as one
//! vector (an f16 load and a conversion instead of eight scalar ones).
//!
//! Per group of 8 rows and per block b (same bytes as the ggml layout, reordered):
//! - Q4_0: `d[8]` (f16) · `qs[4][32]`, pair k = the 16 nibble bytes of rows 2k and 2k+1;
//! - Q4_1: `d[8]` · `m[8]` (f16) · `qs[4][32]` as Q4_0;
//! - Q8_0: `d[8]` · `qs[8][32]`, row by row.
//!
//! The 4-bit kernels reduce their sums with a `vphaddd` tree that leaves the rows in the
//! lane order [`LANES`]; the scales are stored in that order so no shuffle is needed
//! until the result is written out.

use cairn_formats::GgmlType;
use rayon::prelude::*;

/// Rows per group.
pub const R8: usize = 8;
/// Row held by each lane of the 4-bit kernels' sums (and of their stored scales).
pub const LANES: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

pub fn repackable(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// Bytes of one group-block (eight rows of one block).
pub fn group_block_bytes(ty: GgmlType) -> usize {
    R8 * ty.type_size()
}

/// Repack `rows` rows (a multiple of 8) of `row_bytes` each. `None` when the type or
/// shape does not qualify. Groups are independent, so they are repacked in parallel.
pub fn repack(ty: GgmlType, src: &[u8], rows: usize, row_bytes: usize) -> Option<Vec<u8>> {
    if !repackable(ty)
        || !rows.is_multiple_of(R8)
        || src.len() != rows * row_bytes
        || !row_bytes.is_multiple_of(ty.type_size())
    {
        return None;
    }
    let bs = ty.type_size();
    let gb = group_block_bytes(ty);
    let mut out = vec![0u8; src.len()];
    out.par_chunks_mut(R8 * row_bytes).zip(src.par_chunks(R8 * row_bytes)).for_each(|(dst, group)| {
        for (b, d) in dst.chunks_exact_mut(gb).enumerate() {
            let blk = |r: usize| &group[r * row_bytes + b * bs..r * row_bytes + (b + 1) * bs];
            if ty == GgmlType::Q8_0 {
                for r in 0..R8 {
                    d[2 * r..2 * r + 2].copy_from_slice(&blk(r)[0..2]);
                    d[16 + 32 * r..16 + 32 * (r + 1)].copy_from_slice(&blk(r)[2..34]);
                }
                continue;
            }
            let (q, at) = if ty == GgmlType::Q4_1 { (4, 32) } else { (2, 16) };
            for (lane, &r) in LANES.iter().enumerate() {
                d[2 * lane..2 * lane + 2].copy_from_slice(&blk(r)[0..2]);
                if ty == GgmlType::Q4_1 {
                    d[16 + 2 * lane..16 + 2 * lane + 2].copy_from_slice(&blk(r)[2..4]);
                }
            }
            for r in 0..R8 {
                d[at + 16 * r..at + 16 * (r + 1)].copy_from_slice(&blk(r)[q..q + 16]);
            }
        }
    });
    Some(out)
}

/// Row `r` of a repacked matrix back in the ggml layout: embedding lookups of a tied
/// table read the repacked copy, so the mapping's pages are never touched again.
pub fn row(ty: GgmlType, packed: &[u8], row_bytes: usize, r: usize) -> Vec<u8> {
    let bs = ty.type_size();
    let nb = row_bytes / bs;
    let gb = group_block_bytes(ty);
    let (g, i) = (r / R8, r % R8);
    let lane = LANES.iter().position(|&x| x == i).unwrap_or(0);
    let mut out = vec![0u8; row_bytes];
    for (b, dst) in out.chunks_exact_mut(bs).enumerate() {
        let p = &packed[(g * nb + b) * gb..(g * nb + b + 1) * gb];
        match ty {
            GgmlType::Q8_0 => {
                dst[0..2].copy_from_slice(&p[2 * i..2 * i + 2]);
                dst[2..34].copy_from_slice(&p[16 + 32 * i..16 + 32 * (i + 1)]);
            }
            _ => {
                dst[0..2].copy_from_slice(&p[2 * lane..2 * lane + 2]);
                let (q, at) = if ty == GgmlType::Q4_1 {
                    dst[2..4].copy_from_slice(&p[16 + 2 * lane..16 + 2 * lane + 2]);
                    (4, 32 + 16 * i)
                } else {
                    (2, 16 + 16 * i)
                };
                dst[q..q + 16].copy_from_slice(&p[at..at + 16]);
            }
        }
    }
    out
}

/// The inverse of [`repack`] (tests use it to prove no byte is lost or moved wrongly).
pub fn unpack(ty: GgmlType, packed: &[u8], rows: usize, row_bytes: usize) -> Vec<u8> {
    (0..rows).flat_map(|r| row(ty, packed, row_bytes, r)).collect()
}
