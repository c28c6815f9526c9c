//! Weights repacked at load into groups of eight rows, "a lane per row": in every
//! 256-bit weight vector, 32-bit lane r holds four bytes of row r, so that a dot
//! product instruction against four activation bytes broadcast to every lane sums
//! straight into one lane per row, with no horizontal adds; the per-block scales of
//! all eight rows arrive as one vector (an f16 load and a conversion).
//!
//! Per group of 8 rows and per block b (same bytes as the ggml layout, reordered):
//! - Q4_0: `d[8]` (f16) · `qs[4][8][4]`: vector k, lane r = row r's ggml bytes
//!   `4k..4k + 4`, so its low nibbles are weights `4k..4k + 4` and its high nibbles
//!   weights `16 + 4k..16 + 4k + 4`;
//! - Q4_1: `d[8]` · `m[8]` (f16) · `qs` as Q4_0;
//! - Q5_0: `d[8]` · `qh[8]` (row r's 32 high bits in lane r) · `qs` as Q4_0; Q5_1 adds
//!   `m[8]` after `d`;
//! - Q8_0: `d[8]` · `qs[8][8][4]`: vector j, lane r = row r's weights `4j..4j + 4`,
//!   stored offset to unsigned (`w + 128`, the top bit flipped).
//!
//! Rows are in order everywhere.

use cairn_formats::GgmlType;
use rayon::prelude::*;

/// Rows per group.
pub const R8: usize = 8;

pub fn repackable(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0)
}

/// Bytes of one group-block (eight rows of one block).
pub fn group_block_bytes(ty: GgmlType) -> usize {
    R8 * ty.type_size()
}

/// Where the scales and the quants of one row's block sit: (bytes of scales per row
/// in the ggml block, offset of the quants in the group-block, quant bytes per row).
fn layout(ty: GgmlType) -> (usize, usize, usize) {
    match ty {
        GgmlType::Q8_0 => (2, 16, 32),
        GgmlType::Q4_1 => (4, 32, 16),
        // The high bits `qh` travel as the first vector of the quants.
        GgmlType::Q5_0 => (2, 16, 20),
        GgmlType::Q5_1 => (4, 32, 20),
        _ => (2, 16, 16),
    }
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
    let (sc, at, nq) = layout(ty);
    let flip = if ty == GgmlType::Q8_0 { 0x80 } else { 0 };
    let mut out = vec![0u8; src.len()];
    out.par_chunks_mut(R8 * row_bytes).zip(src.par_chunks(R8 * row_bytes)).for_each(|(dst, group)| {
        for (b, d) in dst.chunks_exact_mut(gb).enumerate() {
            for r in 0..R8 {
                let blk = &group[r * row_bytes + b * bs..r * row_bytes + (b + 1) * bs];
                // d, then m for Q4_1: one f16 per row each, in row order.
                for s in 0..sc / 2 {
                    d[16 * s + 2 * r..16 * s + 2 * r + 2].copy_from_slice(&blk[2 * s..2 * s + 2]);
                }
                for j in 0..nq / 4 {
                    for i in 0..4 {
                        d[at + 32 * j + 4 * r + i] = blk[sc + 4 * j + i] ^ flip;
                    }
                }
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
    let (sc, at, nq) = layout(ty);
    let flip = if ty == GgmlType::Q8_0 { 0x80 } else { 0 };
    let mut out = vec![0u8; row_bytes];
    for (b, dst) in out.chunks_exact_mut(bs).enumerate() {
        let p = &packed[(g * nb + b) * gb..(g * nb + b + 1) * gb];
        for s in 0..sc / 2 {
            dst[2 * s..2 * s + 2].copy_from_slice(&p[16 * s + 2 * i..16 * s + 2 * i + 2]);
        }
        for j in 0..nq / 4 {
            for k in 0..4 {
                dst[sc + 4 * j + k] = p[at + 32 * j + 4 * i + k] ^ flip;
            }
        }
    }
    out
}

/// The inverse of [`repack`] (tests use it to prove no byte is lost or moved wrongly).
pub fn unpack(ty: GgmlType, packed: &[u8], rows: usize, row_bytes: usize) -> Vec<u8> {
    (0..rows).flat_map(|r| row(ty, packed, row_bytes, r)).collect()
}
