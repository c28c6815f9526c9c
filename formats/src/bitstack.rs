//! BitStack storage: the byte layout of one residual block and the versioned stack
//! table that orders every block of every matrix (layout in `formats/FORMAT.md`).
//!
//! A matrix `W` (`m` rows of `n` inputs) is approximated after `L` blocks by
//! `Σ_{i<L} S_i ⊙ (u_i v_i)`: `S_i` the signs of the residual (one bit per weight), `u_i`
//! (`m × k`) and `v_i` (`k × n`) the rank-`k` factors of its absolute value, in f16.
//! Blocks are stored as their own tensors (1-D `I8`, page-aligned), so each can be mapped
//! and released alone; the table lists them in the global order with cumulative bytes,
//! so a memory budget maps to a prefix by binary search.

use std::prelude::v1::*;

use half::f16;

use crate::container::{CairnFile, PAGE};
use crate::error::{Error, Result};
use crate::gguf::{label, put_str, Cursor};
use crate::types::GgmlType;

/// First bytes of a stack table.
pub const TABLE_MAGIC: [u8; 4] = *b"BSTK";
/// The table encoding this code reads and writes.
pub const TABLE_VERSION: u32 = 1;
/// Sections inside a block start on this many bytes (aligned SIMD loads of the factors).
const SECTION_ALIGN: usize = 64;
/// The directory type of block tensors: raw bytes.
pub const BLOCK_TYPE: GgmlType = GgmlType::I8;

/// The geometry of a block: `m` rows (outputs), `n` columns (inputs), rank `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

impl BlockShape {
    pub fn new(m: usize, n: usize, k: usize) -> Result<Self> {
        let ok = m > 0 && n > 0 && k > 0 && k <= m.min(n);
        let s = BlockShape { m, n, k };
        // Every size a reader computes must fit (a hostile table could claim anything).
        if !ok || m.checked_mul(n).and_then(|x| x.checked_mul(2)).is_none() || s.checked_bytes().is_none() {
            return Err(Error::invalid(format!("BitStack block {m}×{n} of rank {k} is not a valid shape")));
        }
        Ok(s)
    }

    /// Bytes of one row of sign bits (LSB first; a set bit means negative).
    pub fn sign_row_bytes(&self) -> usize {
        self.n.div_ceil(8)
    }

    fn checked_bytes(&self) -> Option<usize> {
        let signs = self.m.checked_mul(self.sign_row_bytes())?;
        let u = align(signs, SECTION_ALIGN).checked_add(self.m.checked_mul(self.k)?.checked_mul(2)?)?;
        align(u, SECTION_ALIGN).checked_add(self.k.checked_mul(self.n)?.checked_mul(2)?)
    }

    /// Offset of `u` (`m × k` f16, row-major) inside the block.
    pub fn u_offset(&self) -> usize {
        align(self.m * self.sign_row_bytes(), SECTION_ALIGN)
    }

    /// Offset of `v` (`k × n` f16, row-major) inside the block.
    pub fn v_offset(&self) -> usize {
        align(self.u_offset() + self.m * self.k * 2, SECTION_ALIGN)
    }

    /// Bytes of one block.
    pub fn bytes(&self) -> usize {
        self.v_offset() + self.k * self.n * 2
    }

    /// Bytes the block occupies in a mapping: whole pages.
    pub fn page_bytes(&self) -> u64 {
        (self.bytes() as u64).div_ceil(PAGE) * PAGE
    }

    /// Encode a block: `negative(i, j)` gives the sign of weight `(i, j)`; `u` is `m × k`
    /// and `v` is `k × n`, row-major f32 (rounded to f16 here).
    pub fn encode(&self, negative: impl Fn(usize, usize) -> bool, u: &[f32], v: &[f32]) -> Result<Vec<u8>> {
        if u.len() != self.m * self.k || v.len() != self.k * self.n {
            return Err(Error::invalid("BitStack factors do not match the block shape"));
        }
        let mut out = vec![0u8; self.bytes()];
        let rb = self.sign_row_bytes();
        for i in 0..self.m {
            let row = &mut out[i * rb..(i + 1) * rb];
            for j in 0..self.n {
                if negative(i, j) {
                    row[j / 8] |= 1 << (j % 8);
                }
            }
        }
        for (dst, &x) in out[self.u_offset()..].chunks_exact_mut(2).zip(u) {
            dst.copy_from_slice(&f16::from_f32(x).to_le_bytes());
        }
        for (dst, &x) in out[self.v_offset()..].chunks_exact_mut(2).zip(v) {
            dst.copy_from_slice(&f16::from_f32(x).to_le_bytes());
        }
        Ok(out)
    }
}

/// A block's bytes read through its shape.
#[derive(Debug, Clone, Copy)]
pub struct Block<'a> {
    pub shape: BlockShape,
    pub bytes: &'a [u8],
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

impl<'a> Block<'a> {
    pub fn new(shape: BlockShape, bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() != shape.bytes() {
            return Err(Error::invalid(format!(
                "BitStack block of {} bytes, its shape {}×{} rank {} needs {}",
                bytes.len(),
                shape.m,
                shape.n,
                shape.k,
                shape.bytes()
            )));
        }
        Ok(Block { shape, bytes })
    }

    /// The sign bits of row `i`.
    pub fn sign_row(&self, i: usize) -> &'a [u8] {
        let rb = self.shape.sign_row_bytes();
        &self.bytes[i * rb..(i + 1) * rb]
    }

    /// `u` as raw f16 bytes (`m × k`).
    pub fn u_bytes(&self) -> &'a [u8] {
        &self.bytes[self.shape.u_offset()..self.shape.u_offset() + self.shape.m * self.shape.k * 2]
    }

    /// `v` as raw f16 bytes (`k × n`).
    pub fn v_bytes(&self) -> &'a [u8] {
        &self.bytes[self.shape.v_offset()..]
    }

    pub fn u(&self, i: usize, r: usize) -> f32 {
        f16_at(self.u_bytes(), i * self.shape.k + r)
    }

    pub fn v(&self, r: usize, j: usize) -> f32 {
        f16_at(self.v_bytes(), r * self.shape.n + j)
    }

    pub fn negative(&self, i: usize, j: usize) -> bool {
        self.sign_row(i)[j / 8] >> (j % 8) & 1 != 0
    }

    /// Add this block's rows `r0..r0 + out.len() / n` to `out` (row-major): the scalar
    /// reference of every BitStack kernel.
    pub fn add_rows(&self, r0: usize, out: &mut [f32]) {
        let BlockShape { n, k, .. } = self.shape;
        for (di, row) in out.chunks_exact_mut(n).enumerate() {
            let i = r0 + di;
            for (j, o) in row.iter_mut().enumerate() {
                let mut w = 0f32;
                for r in 0..k {
                    w += self.u(i, r) * self.v(r, j);
                }
                *o += if self.negative(i, j) { -w } else { w };
            }
        }
    }
}

/// One logical matrix of the stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackMatrix {
    /// The weight's name as the model asks for it (`blk.0.attn_q.weight`).
    pub name: String,
    pub rows: u64,
    pub cols: u64,
}

/// One block in the global order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StackEntry {
    /// Index into [`StackTable::matrices`].
    pub matrix: u32,
    pub level: u32,
    /// Index of the block's tensor in the container's directory.
    pub tensor: u32,
    /// Page-rounded bytes of this block and every block before it.
    pub cumulative: u64,
}

/// The stack table: matrices, then blocks in the order a budget takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackTable {
    pub rank: u32,
    pub matrices: Vec<StackMatrix>,
    pub entries: Vec<StackEntry>,
}

/// Bytes of an encoded entry.
const ENTRY_BYTES: usize = 24;

/// The tensor name of block `level` of matrix `name`.
pub fn block_name(name: &str, level: usize) -> String {
    format!("{name}.stack.{level}")
}

/// The matrix and level a block's tensor name stands for ([`block_name`] inverted).
pub fn block_of(tensor: &str) -> Option<(&str, usize)> {
    let (name, level) = tensor.rsplit_once(".stack.")?;
    Some((name, level.parse().ok()?))
}

impl StackTable {
    pub fn shape(&self, matrix: usize) -> Result<BlockShape> {
        let mm = &self.matrices[matrix];
        let too_big = |_| Error::invalid(format!("stack matrix {}: shape does not fit in memory", label(&mm.name)));
        BlockShape::new(
            usize::try_from(mm.rows).map_err(too_big)?,
            usize::try_from(mm.cols).map_err(too_big)?,
            self.rank as usize,
        )
        .map_err(|e| Error::invalid(format!("stack matrix {}: {e}", label(&mm.name))))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&TABLE_MAGIC);
        for w in [TABLE_VERSION, self.rank, self.matrices.len() as u32, self.entries.len() as u32, 0] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        for m in &self.matrices {
            put_str(&mut out, &m.name);
            out.extend_from_slice(&m.rows.to_le_bytes());
            out.extend_from_slice(&m.cols.to_le_bytes());
        }
        for e in &self.entries {
            for w in [e.matrix, e.level, e.tensor, 0] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&e.cumulative.to_le_bytes());
        }
        out
    }

    /// Parse and check a table on its own: counts, shapes, the order of blocks (each
    /// matrix's levels consecutive from 0; no matrix gets level i + 2 before every matrix
    /// has level i), cumulative bytes, every matrix present.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 24 || bytes[..4] != TABLE_MAGIC {
            return Err(Error::invalid("stack table: bad magic (expected BSTK)"));
        }
        let mut c = Cursor { buf: bytes, pos: 4 };
        let version = c.u32("stack table version")?;
        if version != TABLE_VERSION {
            return Err(Error::invalid(format!(
                "stack table version {version} is not supported (this build reads {TABLE_VERSION})"
            )));
        }
        let rank = c.u32("stack rank")?;
        let n_mat = c.u32("stack matrix count")? as usize;
        let n_ent = c.u32("stack block count")? as usize;
        if c.u32("stack reserved")? != 0 {
            return Err(Error::invalid("stack table: reserved field is not zero"));
        }
        if n_mat.saturating_mul(8 + 16) > c.remaining() {
            return Err(Error::invalid(format!("stack table: {n_mat} matrices cannot fit in its bytes")));
        }
        let mut matrices = Vec::with_capacity(n_mat);
        for _ in 0..n_mat {
            let name = c.string("stack matrix name")?;
            let (rows, cols) = (c.u64("stack matrix rows")?, c.u64("stack matrix cols")?);
            if matrices.iter().any(|m: &StackMatrix| m.name == name) {
                return Err(Error::invalid(format!("stack table: matrix {} listed twice", label(&name))));
            }
            matrices.push(StackMatrix { name, rows, cols });
        }
        if n_ent.checked_mul(ENTRY_BYTES) != Some(c.remaining()) {
            return Err(Error::invalid(format!(
                "stack table: {n_ent} blocks need {} bytes, {} remain",
                n_ent.saturating_mul(ENTRY_BYTES),
                c.remaining()
            )));
        }
        let t = StackTable { rank, matrices, entries: Vec::new() };
        let shapes = (0..n_mat).map(|i| t.shape(i)).collect::<Result<Vec<_>>>()?;
        let mut entries = Vec::with_capacity(n_ent);
        let mut counts = vec![0u32; n_mat];
        let mut total = 0u64;
        for idx in 0..n_ent {
            let (matrix, level, tensor) = (c.u32("block matrix")?, c.u32("block level")?, c.u32("block tensor")?);
            let _pad = c.u32("block padding")?;
            let cumulative = c.u64("block cumulative bytes")?;
            let m = matrix as usize;
            if m >= n_mat {
                return Err(Error::invalid(format!("stack block {idx}: matrix {matrix} of {n_mat}")));
            }
            let name = label(&t.matrices[m].name);
            if level != counts[m] {
                return Err(Error::invalid(format!(
                    "stack block {idx} is out of order: {name} level {level}, expected level {}",
                    counts[m]
                )));
            }
            let min = counts.iter().copied().min().unwrap_or(0);
            if level > min + 1 {
                return Err(Error::invalid(format!(
                    "stack block {idx} is out of order: {name} gets level {level} while some matrix lacks level {min}"
                )));
            }
            total = total
                .checked_add(shapes[m].page_bytes())
                .ok_or_else(|| Error::invalid("stack table: cumulative bytes overflow"))?;
            if cumulative != total {
                return Err(Error::invalid(format!(
                    "stack block {idx} ({name} level {level}): cumulative bytes {cumulative}, expected {total}"
                )));
            }
            counts[m] += 1;
            entries.push(StackEntry { matrix, level, tensor, cumulative });
        }
        if let Some(m) = counts.iter().position(|&c| c == 0) {
            return Err(Error::invalid(format!("stack table: matrix {} has no blocks", label(&t.matrices[m].name))));
        }
        Ok(StackTable { entries, ..t })
    }

    /// Check the table against its container: every block names a tensor of the file,
    /// once, with the block's name, type, size and page alignment. Tensor extents were
    /// already checked against the file by [`CairnFile::parse`].
    pub fn validate(&self, file: &CairnFile<'_>) -> Result<()> {
        let mut used = vec![false; file.tensors.len()];
        for (idx, e) in self.entries.iter().enumerate() {
            let name = &self.matrices[e.matrix as usize].name;
            let ti = e.tensor as usize;
            let Some(t) = file.tensors.get(ti) else {
                return Err(Error::invalid(format!(
                    "stack block {idx} ({} level {}) points to tensor {ti}, outside the file's {} tensors",
                    label(name),
                    e.level,
                    file.tensors.len()
                )));
            };
            let shape = self.shape(e.matrix as usize)?;
            let want = block_name(name, e.level as usize);
            if t.name != want || t.ty != BLOCK_TYPE || t.size != shape.bytes() as u64 {
                return Err(Error::invalid(format!(
                    "stack block {idx}: tensor {} is not block {} ({} bytes of {BLOCK_TYPE})",
                    label(&t.name),
                    label(&want),
                    shape.bytes()
                )));
            }
            if !t.offset.is_multiple_of(PAGE) {
                return Err(Error::invalid(format!("stack block {}: not aligned to a page", label(&t.name))));
            }
            if std::mem::replace(&mut used[ti], true) {
                return Err(Error::invalid(format!("stack table lists tensor {} twice", label(&t.name))));
            }
        }
        Ok(())
    }

    /// Blocks of the smallest usable prefix: the first at which every matrix has a block.
    pub fn min_prefix(&self) -> usize {
        let mut seen = vec![false; self.matrices.len()];
        let mut left = self.matrices.len();
        for (i, e) in self.entries.iter().enumerate() {
            if !std::mem::replace(&mut seen[e.matrix as usize], true) {
                left -= 1;
                if left == 0 {
                    return i + 1;
                }
            }
        }
        self.entries.len()
    }

    /// Bytes of the first `n` blocks.
    pub fn prefix_bytes(&self, n: usize) -> u64 {
        if n == 0 {
            0
        } else {
            self.entries[n.min(self.entries.len()) - 1].cumulative
        }
    }

    /// The longest prefix whose blocks fit in `bytes`.
    pub fn prefix_for(&self, bytes: u64) -> usize {
        self.entries.partition_point(|e| e.cumulative <= bytes)
    }

    /// Blocks per matrix in the first `n` blocks.
    pub fn counts(&self, n: usize) -> Vec<usize> {
        let mut c = vec![0; self.matrices.len()];
        for e in &self.entries[..n.min(self.entries.len())] {
            c[e.matrix as usize] += 1;
        }
        c
    }
}
