//! Weights repacked at load into groups of eight rows, "a lane per row": in every
//! 256-bit weight vector, 32-bit lane r holds four bytes of row r, so that a dot
//! product instruction against four activation bytes broadcast to every lane sums
//! straight into one lane per row, with no horizontal adds; the per-block scales of
//! all eight rows arrive as one vector (an f16 load and a conversion). The layout does
//! not depend on the architecture: NEON reads each 256-bit vector as two 128-bit ones
//! (rows 0–3, rows 4–7) and broadcasts the activation bytes with the by-element `sdot`.
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
//! - Q4_K (per super-block of 256): `d[8]` · `dmin[8]` (f16) · `scales[12][8]` (byte q
//!   of row r at `8q + r`) · `qs[4][8][8][4]`: pair p, vector k, lane r = row r's bytes
//!   `32p + 4k..32p + 4k + 4` (low nibbles: run 2p, values `4k..`; high: run 2p + 1);
//! - Q5_K (per super-block of 256): as Q4_K, with the high bits between the scales
//!   and the quants: `d[8]` · `dmin[8]` · `scales[12][8]` · `qh[8][8][4]` (vector k,
//!   lane r = row r's `qh` bytes `4k..4k + 4`; bit j of a byte is the fifth bit of
//!   that value in run j) · `qs[4][8][8][4]` as Q4_K's;
//! - Q6_K (per super-block of 256, the 6-bit values decoded and stored anew):
//!   `d[8]` · `scales[16][8]` (i8) · per run of 32: `ql[4][8][4]` (vector k, lane r, byte
//!   i: value `4k + i` in the low nibble, `16 + 4k + i` in the high one), then `h0[8][4]`
//!   and `h1[8][4]` (byte i of lane r: the top two bits of values `4k + i`, resp.
//!   `16 + 4k + i`, at bits `2k`).
//!
//! Rows are in order everywhere, and every layout has the ggml type's size.

use cairn_formats::GgmlType;
use rayon::prelude::*;

/// Rows per group.
pub const R8: usize = 8;

pub fn repackable(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
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
    repack_with(ty, src, rows, row_bytes, |_| {})
}

/// Rows repacked per step of [`repack_with`].
const STEP_ROWS: usize = 1024;

/// [`repack`], calling `done(r)` each time rows `0..r` are copied (the caller releases
/// the source pages behind it).
pub fn repack_with(ty: GgmlType, src: &[u8], rows: usize, row_bytes: usize, done: impl Fn(usize)) -> Option<Vec<u8>> {
    if !repackable(ty)
        || !rows.is_multiple_of(R8)
        || src.len() != rows * row_bytes
        || !row_bytes.is_multiple_of(ty.type_size())
    {
        return None;
    }
    let mut out = vec![0u8; src.len()];
    for (step, (dst, src)) in out.chunks_mut(STEP_ROWS * row_bytes).zip(src.chunks(STEP_ROWS * row_bytes)).enumerate() {
        repack_groups(ty, dst, src, row_bytes);
        done(((step + 1) * STEP_ROWS).min(rows));
    }
    Some(out)
}

/// Whole groups of 8 rows, in parallel.
fn repack_groups(ty: GgmlType, dst: &mut [u8], src: &[u8], row_bytes: usize) {
    let bs = ty.type_size();
    let gb = group_block_bytes(ty);
    dst.par_chunks_mut(R8 * row_bytes).zip(src.par_chunks(R8 * row_bytes)).for_each(|(dst, group)| {
        for (b, d) in dst.chunks_exact_mut(gb).enumerate() {
            let blk = |r: usize| &group[r * row_bytes + b * bs..r * row_bytes + (b + 1) * bs];
            pack_block(ty, &blk, d);
        }
    });
}

/// One group-block from the eight rows' ggml blocks `blk(r)`.
fn pack_block<'a>(ty: GgmlType, blk: &dyn Fn(usize) -> &'a [u8], d: &mut [u8]) {
    match ty {
        GgmlType::Q4K => {
            for r in 0..R8 {
                for (i, &j) in k_moves::<144>(r).iter().enumerate() {
                    d[j] = blk(r)[i];
                }
            }
        }
        GgmlType::Q5K => {
            for r in 0..R8 {
                for (i, &j) in k_moves::<176>(r).iter().enumerate() {
                    d[j] = blk(r)[i];
                }
            }
        }
        GgmlType::Q6K => pack_q6k(blk, d),
        _ => {
            let (sc, at, nq) = layout(ty);
            let flip = if ty == GgmlType::Q8_0 { 0x80 } else { 0 };
            for r in 0..R8 {
                let blk = blk(r);
                // d, then m for Q4_1/Q5_1: one f16 per row each, in row order.
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
    }
}

/// Row `r`'s ggml block back from its group-block `p`.
fn unpack_block(ty: GgmlType, p: &[u8], r: usize, dst: &mut [u8]) {
    match ty {
        GgmlType::Q4K => {
            for (i, &j) in k_moves::<144>(r).iter().enumerate() {
                dst[i] = p[j];
            }
        }
        GgmlType::Q5K => {
            for (i, &j) in k_moves::<176>(r).iter().enumerate() {
                dst[i] = p[j];
            }
        }
        GgmlType::Q6K => unpack_q6k(p, r, dst),
        _ => {
            let (sc, at, nq) = layout(ty);
            let flip = if ty == GgmlType::Q8_0 { 0x80 } else { 0 };
            for s in 0..sc / 2 {
                dst[2 * s..2 * s + 2].copy_from_slice(&p[16 * s + 2 * r..16 * s + 2 * r + 2]);
            }
            for j in 0..nq / 4 {
                for k in 0..4 {
                    dst[sc + 4 * j + k] = p[at + 32 * j + 4 * r + k] ^ flip;
                }
            }
        }
    }
}

/// Q4_K (N = 144) and Q5_K (N = 176, with `qh`) are byte permutations: where each of
/// row r's N bytes goes in the group-block.
fn k_moves<const N: usize>(r: usize) -> [usize; N] {
    let mut to = [0usize; N];
    for i in 0..2 {
        to[i] = 2 * r + i; // d
        to[2 + i] = 16 + 2 * r + i; // dmin
    }
    for q in 0..12 {
        to[4 + q] = 32 + 8 * q + r;
    }
    // Q5_K's qh: 32 bytes per row, four to a lane, as one pair of nibbles is.
    let (qs, at) = if N == 176 { (48, 384) } else { (16, 128) };
    if N == 176 {
        for (k, i) in (0..8).flat_map(|k| (0..4).map(move |i| (k, i))) {
            to[16 + 4 * k + i] = 128 + 32 * k + 4 * r + i;
        }
    }
    for (p, k, i) in (0..4).flat_map(|p| (0..8).flat_map(move |k| (0..4).map(move |i| (p, k, i)))) {
        to[qs + 32 * p + 4 * k + i] = at + 256 * p + 32 * k + 4 * r + i;
    }
    to
}

/// Value `v` (0..256) of a ggml Q6_K super-block as its unsigned 6 bits.
fn q6k_get(blk: &[u8], v: usize) -> u8 {
    let (n, l) = (v / 128, v % 128);
    let (g, l32) = (l / 32, l % 32);
    let ql = blk[64 * n + l32 + 32 * (g & 1)];
    let lo = if g < 2 { ql & 0x0F } else { ql >> 4 };
    lo | (((blk[128 + 32 * n + l32] >> (2 * g)) & 3) << 4)
}

/// Write value `v` into a zeroed ggml Q6_K super-block.
fn q6k_set(blk: &mut [u8], v: usize, u: u8) {
    let (n, l) = (v / 128, v % 128);
    let (g, l32) = (l / 32, l % 32);
    let at = 64 * n + l32 + 32 * (g & 1);
    blk[at] |= if g < 2 { u & 0x0F } else { (u & 0x0F) << 4 };
    blk[128 + 32 * n + l32] |= (u >> 4) << (2 * g);
}

fn pack_q6k<'a>(blk: &dyn Fn(usize) -> &'a [u8], d: &mut [u8]) {
    for r in 0..R8 {
        let b = blk(r);
        d[2 * r..2 * r + 2].copy_from_slice(&b[208..210]);
        for q in 0..16 {
            d[16 + 8 * q + r] = b[192 + q];
        }
        for run in 0..8 {
            let at = 144 + 192 * run;
            for (k, i) in (0..4).flat_map(|k| (0..4).map(move |i| (k, i))) {
                let (lo, hi) = (q6k_get(b, 32 * run + 4 * k + i), q6k_get(b, 32 * run + 16 + 4 * k + i));
                d[at + 32 * k + 4 * r + i] = (lo & 0x0F) | ((hi & 0x0F) << 4);
                d[at + 128 + 4 * r + i] |= (lo >> 4) << (2 * k);
                d[at + 160 + 4 * r + i] |= (hi >> 4) << (2 * k);
            }
        }
    }
}

fn unpack_q6k(p: &[u8], r: usize, dst: &mut [u8]) {
    dst.fill(0);
    dst[208..210].copy_from_slice(&p[2 * r..2 * r + 2]);
    for q in 0..16 {
        dst[192 + q] = p[16 + 8 * q + r];
    }
    for run in 0..8 {
        let at = 144 + 192 * run;
        for (k, i) in (0..4).flat_map(|k| (0..4).map(move |i| (k, i))) {
            let nib = p[at + 32 * k + 4 * r + i];
            let lo = (nib & 0x0F) | (((p[at + 128 + 4 * r + i] >> (2 * k)) & 3) << 4);
            let hi = (nib >> 4) | (((p[at + 160 + 4 * r + i] >> (2 * k)) & 3) << 4);
            q6k_set(dst, 32 * run + 4 * k + i, lo);
            q6k_set(dst, 32 * run + 16 + 4 * k + i, hi);
        }
    }
}

/// Row `r` of a repacked matrix back in the ggml layout: embedding lookups of a tied
/// table read the repacked copy, so the mapping's pages are never touched again.
pub fn row(ty: GgmlType, packed: &[u8], row_bytes: usize, r: usize) -> Vec<u8> {
    let bs = ty.type_size();
    let nb = row_bytes / bs;
    let gb = group_block_bytes(ty);
    let (g, i) = (r / R8, r % R8);
    let mut out = vec![0u8; row_bytes];
    for (b, dst) in out.chunks_exact_mut(bs).enumerate() {
        unpack_block(ty, &packed[(g * nb + b) * gb..(g * nb + b + 1) * gb], i, dst);
    }
    out
}

/// The inverse of [`repack`] (tests use it to prove no byte is lost or moved wrongly).
pub fn unpack(ty: GgmlType, packed: &[u8], rows: usize, row_bytes: usize) -> Vec<u8> {
    (0..rows).flat_map(|r| row(ty, packed, row_bytes, r)).collect()
}
