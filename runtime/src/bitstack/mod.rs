//! BitStack at run time: the blocks of a `.cairn` stack table as weights whose number
//! of active blocks a memory budget sets, and can change while the model runs.
//!
//! Every block is a page-aligned tensor inside the mapping. Growing verifies (and so
//! reads) exactly the blocks that join; shrinking tells the kernel to drop the pages of
//! the blocks that leave (`madvise(DONTNEED)`), so the resident set follows the budget.
//! Kernels read `active` at every matmul, so a change needs no reload.
//!
//! Dense cache: with rank-k blocks a level costs 1.6–3 bits per weight, so past a few
//! levels a matrix's blocks take more memory than a dense Q8_0 copy (8.5 bits). Under
//! [`DenseCache::Auto`] such a matrix is rebuilt from *all* its levels into a Q8_0 copy
//! (it costs the same whatever the level count) and its blocks' pages are released; the
//! fast Q8_0 kernels run it. The budget counts the copy's bytes instead of the blocks'.
//! Building a copy reads every block of that matrix (the copy cannot be patched by a
//! block without re-rounding, and a fresh load must give the same weights).

#[cfg(feature = "cli")]
pub mod build;
pub mod linalg;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use cairn_formats::bitstack::{Block, BlockShape, StackTable};
use cairn_formats::container::PAGE;
use cairn_formats::{container, TensorInfo};

use crate::error::{Error, Result};
use crate::weights::{HostTensor, ModelFile};

/// One matrix of the stack: its blocks by level, and how many of them are in use.
pub struct StackWeight {
    pub name: String,
    pub shape: BlockShape,
    blocks: Vec<(HostTensor, TensorInfo, u64)>,
    active: AtomicUsize,
    /// The dense Q8_0 copy of all levels, when the matrix runs from one.
    dense: RwLock<Option<Arc<DenseCopy>>>,
    /// How to build that copy: set by the backend that loads the matrix.
    builder: OnceLock<DenseBuilder>,
}

/// Builds a matrix's dense copy in a backend's layout. Backends install theirs at
/// `Backend::load_stack` ([`StackWeight::set_dense_builder`]); a matrix without one
/// always runs from its blocks.
pub type DenseBuilder = fn(&StackWeight) -> std::io::Result<DenseCopy>;

/// A matrix rebuilt from all its blocks and rounded to Q8_0 rows (interleaved in groups
/// of 8 rows when `packed`, the CPU's repacked layout). The bytes live in their own
/// anonymous mapping (whole pages), so dropping a copy gives its memory back to the
/// system at once; from the heap, the allocator would keep it.
pub struct DenseCopy {
    bytes: memmap2::MmapMut,
    pub rows: usize,
    pub row_bytes: usize,
    pub packed: bool,
}

impl DenseCopy {
    pub fn new(data: &[u8], rows: usize, row_bytes: usize, packed: bool) -> std::io::Result<DenseCopy> {
        let mut bytes = memmap2::MmapMut::map_anon(data.len().next_multiple_of(PAGE as usize))?;
        bytes[..data.len()].copy_from_slice(data);
        Ok(DenseCopy { bytes, rows, row_bytes, packed })
    }

    /// The rows (`rows × row_bytes`).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.rows * self.row_bytes]
    }

    /// Memory held: whole pages.
    pub fn held_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }
}

/// Whether matrices may run from dense Q8_0 copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenseCache {
    /// Blocks only.
    Off,
    /// A copy for every matrix whose active blocks would take more bytes than the copy.
    #[default]
    Auto,
}

impl DenseCache {
    pub fn parse(s: &str) -> Result<DenseCache> {
        match s {
            "off" => Ok(DenseCache::Off),
            "auto" => Ok(DenseCache::Auto),
            _ => Err(Error::input(format!("--dense-cache {s:?}: use auto or off"))),
        }
    }
}

impl StackWeight {
    /// The dense copy in use, if any.
    pub fn dense(&self) -> Option<Arc<DenseCopy>> {
        self.dense.read().ok().and_then(|d| d.clone())
    }

    /// Bytes a Q8_0 copy holds, whole pages (none when rows are not whole Q8_0 blocks).
    pub fn dense_bytes(&self) -> Option<u64> {
        let BlockShape { m, n, .. } = self.shape;
        n.is_multiple_of(32).then_some(((m * n / 32 * 34) as u64).next_multiple_of(PAGE))
    }

    /// Let budgets run this matrix from dense copies built by `build` (the first
    /// backend to load the matrix sets it).
    pub fn set_dense_builder(&self, build: DenseBuilder) {
        let _ = self.builder.set(build);
    }

    /// The dense copy of all levels, by the loading backend's builder.
    fn build_dense(&self) -> std::io::Result<DenseCopy> {
        let build = self.builder.get().ok_or_else(|| std::io::Error::other("no backend builds dense copies"))?;
        build(self)
    }

    fn set_dense(&self, d: Option<Arc<DenseCopy>>) {
        if let Ok(mut g) = self.dense.write() {
            *g = d;
        }
    }

    /// Read and check blocks `from..to` (reading is what brings them into memory).
    fn verify(&self, from: usize, to: usize) -> Result<u64> {
        let mut read = 0;
        for (t, info, sum) in self.blocks.get(from..to).unwrap_or(&[]) {
            container::verify_tensor(info, *sum, t.bytes()).map_err(|e| Error::model(e.to_string()))?;
            read += info.size;
        }
        Ok(read)
    }

    fn release(&self, from: usize, to: usize) -> u64 {
        let mut n = 0;
        for (t, _, _) in self.blocks.get(from..to).unwrap_or(&[]) {
            t.release_whole_pages();
            n += self.shape.page_bytes();
        }
        n
    }

    /// Blocks the kernels use now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Bytes of the first `c` blocks as stored (what a pass over them reads; residency
    /// rounds each up to pages).
    pub fn block_bytes(&self, c: usize) -> u64 {
        self.blocks.iter().take(c).map(|(_, info, _)| info.size).sum()
    }

    pub fn levels(&self) -> usize {
        self.blocks.len()
    }

    /// A stand-in host tensor carrying the matrix's name and shape (no bytes).
    pub fn placeholder(&self, dims: &[u64]) -> HostTensor {
        self.blocks[0].0.placeholder(&self.name, dims)
    }

    /// Drop the mapped pages of block `level`: for a backend that copied it to a device.
    /// (Read again from the file if anything touches it later.)
    pub fn release_block(&self, level: usize) {
        if let Some((t, _, _)) = self.blocks.get(level) {
            t.release_whole_pages();
        }
    }

    /// Block `level` (the shape was checked against the tensor when the file opened).
    pub fn block(&self, level: usize) -> Block<'_> {
        Block { shape: self.shape, bytes: self.blocks[level].0.bytes() }
    }
}

/// What a budget change did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackChange {
    /// Blocks in use before and after.
    pub before: usize,
    pub after: usize,
    /// Bytes of the blocks read (verified) because they joined.
    pub bytes_read: u64,
    /// Page bytes given back because blocks left.
    pub bytes_released: u64,
    /// Bytes of the stack in use now: page bytes of active blocks plus dense copies.
    pub stack_bytes: u64,
    /// Matrices running from dense Q8_0 copies, and the copies' bytes.
    pub dense_matrices: usize,
    pub dense_bytes: u64,
}

/// The stack of a `.cairn` file.
pub struct Stack {
    pub table: StackTable,
    pub weights: Vec<Arc<StackWeight>>,
    /// Blocks in use (a prefix of the table).
    prefix: Mutex<usize>,
    /// [`DenseCache::Auto`] when set.
    auto_dense: AtomicBool,
}

impl Stack {
    /// Build from a validated table; `tensor(i)` gives directory entry `i` with its
    /// view and checksum.
    pub(crate) fn new(table: StackTable, tensor: impl Fn(usize) -> (HostTensor, TensorInfo, u64)) -> Result<Self> {
        let mut per: Vec<Vec<(HostTensor, TensorInfo, u64)>> = vec![Vec::new(); table.matrices.len()];
        for e in &table.entries {
            per[e.matrix as usize].push(tensor(e.tensor as usize));
        }
        let weights = table
            .matrices
            .iter()
            .enumerate()
            .zip(per)
            .map(|((i, m), blocks)| {
                Ok(Arc::new(StackWeight {
                    name: m.name.clone(),
                    shape: table.shape(i).map_err(|e| Error::model(e.to_string()))?,
                    blocks,
                    active: AtomicUsize::new(0),
                    dense: RwLock::new(None),
                    builder: OnceLock::new(),
                }))
            })
            .collect::<Result<_>>()?;
        Ok(Stack { table, weights, prefix: Mutex::new(0), auto_dense: AtomicBool::new(true) })
    }

    /// Choose the dense-cache policy; it applies from the next budget change.
    pub fn set_dense_cache(&self, mode: DenseCache) {
        self.auto_dense.store(mode == DenseCache::Auto, Ordering::Release);
    }

    pub fn dense_cache(&self) -> DenseCache {
        if self.auto_dense.load(Ordering::Acquire) {
            DenseCache::Auto
        } else {
            DenseCache::Off
        }
    }

    /// Bytes matrix `i` takes with `c` blocks, and whether it then runs from a copy.
    pub fn matrix_cost(&self, i: usize, c: usize) -> (u64, bool) {
        let w = &self.weights[i];
        let blocks = c.min(w.levels()) as u64 * w.shape.page_bytes();
        match w.dense_bytes() {
            Some(q) if self.dense_cache() == DenseCache::Auto && w.builder.get().is_some() && blocks > q => (q, true),
            _ => (blocks, false),
        }
    }

    /// Bytes of a state with `counts[i]` blocks of matrix `i`.
    pub fn cost(&self, counts: &[usize]) -> u64 {
        counts.iter().enumerate().map(|(i, &c)| self.matrix_cost(i, c).0).sum()
    }

    /// Bytes of the first `n` blocks of the table (copies counted instead of blocks).
    pub fn prefix_cost(&self, n: usize) -> u64 {
        self.cost(&self.table.counts(n))
    }

    /// The longest prefix whose cost fits in `bytes` (costs never fall as `n` grows).
    pub fn prefix_for(&self, bytes: u64) -> usize {
        let (mut lo, mut hi) = (0, self.table.entries.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if self.prefix_cost(mid) <= bytes {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    pub fn weight(&self, name: &str) -> Option<&Arc<StackWeight>> {
        self.weights.iter().find(|w| w.name == name)
    }

    pub fn prefix(&self) -> usize {
        self.prefix.lock().map_or(0, |p| *p)
    }

    /// Use the first `n` blocks of the table: verify and read the blocks that join,
    /// release the pages of those that leave, then switch the kernels over.
    pub fn set_prefix(&self, n: usize) -> Result<StackChange> {
        let n = n.min(self.table.entries.len());
        // Held across the change, so two budget changes never interleave.
        let mut cur = self.prefix.lock().map_err(|_| Error::model("stack state poisoned"))?;
        let mut change = self.set_counts(&self.table.counts(n))?;
        change.before = std::mem::replace(&mut *cur, n);
        change.after = n;
        Ok(change)
    }

    /// Use `counts[i]` blocks of matrix `i` (any mix, not only prefixes of the table:
    /// for measuring what one block is worth). `before`/`after` are left at 0. A matrix
    /// that the policy puts on a dense copy runs all its levels from it.
    pub fn set_counts(&self, counts: &[usize]) -> Result<StackChange> {
        if counts.len() != self.weights.len() {
            return Err(Error::input("set_counts: one count per matrix"));
        }
        let mut change = StackChange::default();
        let want: Vec<(usize, bool)> = counts
            .iter()
            .enumerate()
            .map(|(i, &c)| (c.min(self.weights[i].levels()), self.matrix_cost(i, c).1))
            .collect();
        // Blocks that join matrices running from blocks: all checked before any switch.
        for (w, &(c, dense)) in self.weights.iter().zip(&want) {
            if !dense {
                let resident = if w.dense().is_some() { 0 } else { w.active() };
                change.bytes_read += w.verify(resident, c)?;
            }
        }
        // Matrices leaving copies or losing blocks first, then the ones that grow, so
        // memory is given back before more is taken.
        for (w, &(c, dense)) in self.weights.iter().zip(&want) {
            if dense {
                continue;
            }
            let o = w.active.swap(c, Ordering::AcqRel);
            match w.dense() {
                Some(d) => {
                    w.set_dense(None);
                    change.bytes_released += d.held_bytes();
                }
                None => change.bytes_released += w.release(c, o),
            }
            change.stack_bytes += c as u64 * w.shape.page_bytes();
        }
        for (w, &(_, dense)) in self.weights.iter().zip(&want) {
            if !dense {
                continue;
            }
            if w.dense().is_none() {
                // One matrix at a time: its blocks are read, rounded into the copy and
                // released before the next, so a change never holds more than one
                // matrix's blocks beyond the budget.
                let resident = w.active();
                change.bytes_read += w.verify(resident, w.levels())?;
                let copy = w
                    .build_dense()
                    .map_err(|e| Error::model(format!("{}: no memory for a dense copy: {e}", w.name)))?;
                w.set_dense(Some(Arc::new(copy)));
                w.active.store(w.levels(), Ordering::Release);
                change.bytes_released += w.release(0, w.levels());
            }
            change.stack_bytes += w.dense_bytes().unwrap_or(0);
            change.dense_matrices += 1;
            change.dense_bytes += w.dense_bytes().unwrap_or(0);
        }
        // Faults on a block map its neighbours' pages too (the kernel's fault-around),
        // and those may be blocks not in use: drop every page no matrix uses now, so
        // the resident set is what the budget counted. Not counted as released.
        for w in &self.weights {
            let from = if w.dense().is_some() { 0 } else { w.active() };
            w.release(from, w.levels());
        }
        Ok(change)
    }

    /// Blocks per matrix now, summarised as "min..max levels".
    pub fn levels_summary(&self) -> String {
        let counts: Vec<usize> = self.weights.iter().map(|w| w.active()).collect();
        let (lo, hi) = (counts.iter().min().copied().unwrap_or(0), counts.iter().max().copied().unwrap_or(0));
        let at_hi = counts.iter().filter(|&&c| c == hi).count();
        format!("{lo}..{hi} blocks per matrix ({at_hi} of {} at {hi})", counts.len())
    }
}

/// How a memory budget is spent.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub budget: u64,
    /// The process's own resident memory before the weights loaded (binary, tokenizer,
    /// heap), when the budget covers the whole process; 0 otherwise.
    pub process: u64,
    /// Tensors no budget shrinks (embeddings, norms; all of a model without a stack).
    pub dense: u64,
    pub kv: u64,
    pub scratch: u64,
    /// Blocks in use, of how many.
    pub blocks: usize,
    pub total_blocks: usize,
    pub change: StackChange,
    /// Blocks per matrix, summarised.
    pub levels: String,
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory {}: {}dense {} + KV cache {} + scratch {} + BitStack {} ({} of {} blocks, {}; {} matrices as Q8_0 copies, {}); read {}, released {}",
            show_bytes(self.budget),
            if self.process > 0 { format!("process {} + ", show_bytes(self.process)) } else { String::new() },
            show_bytes(self.dense),
            show_bytes(self.kv),
            show_bytes(self.scratch),
            show_bytes(self.change.stack_bytes),
            self.blocks,
            self.total_blocks,
            self.levels,
            self.change.dense_matrices,
            show_bytes(self.change.dense_bytes),
            show_bytes(self.change.bytes_read),
            show_bytes(self.change.bytes_released)
        )
    }
}

/// What a budget reserves for a model besides its weights, from the model's shape.
/// The model layer implements it (`model::ModelConfig`), so budgets need no model types.
pub trait Footprint {
    /// Bytes of a KV cache (f16) for `ctx` positions.
    fn kv_bytes(&self, ctx: usize) -> usize;
    /// Bytes of scratch: activations of a prefill chunk, one row of logits, BitStack
    /// kernel tables and rebuilt tiles.
    fn scratch_bytes(&self) -> usize;
}

/// Bytes a budget must hold besides BitStack blocks: dense tensors, a KV cache for
/// the budget's context (f16), and scratch (activations of a 512-token prefill chunk,
/// one row of logits, BitStack kernel tables and rebuilt tiles).
pub fn fixed_bytes(file: &ModelFile, c: &impl Footprint, ctx: usize) -> (u64, u64, u64) {
    (file.dense_bytes(), c.kv_bytes(ctx) as u64, c.scratch_bytes() as u64)
}

/// Fit a model into `budget` bytes: the longest prefix of its BitStack that fits beside
/// [`fixed_bytes`] and `process` (the rest of the process, when the budget covers it).
/// A budget below the minimum is refused, naming the minimum.
pub fn apply_budget(file: &ModelFile, c: &impl Footprint, ctx: usize, process: u64, budget: u64) -> Result<MemoryPlan> {
    let (dense, kv, scratch) = fixed_bytes(file, c, ctx);
    let fixed = process + dense + kv + scratch;
    let process_note = if process > 0 { format!("process {} + ", show_bytes(process)) } else { String::new() };
    let Some(stack) = &file.stack else {
        if budget < fixed {
            return Err(Error::input(format!(
                "memory budget {} is below this model's minimum {} ({process_note}weights {} + KV cache {} + scratch {}); it has no BitStack to shrink",
                show_bytes(budget), show_bytes(fixed), show_bytes(dense), show_bytes(kv), show_bytes(scratch)
            )));
        }
        return Ok(MemoryPlan {
            budget,
            process,
            dense,
            kv,
            scratch,
            blocks: 0,
            total_blocks: 0,
            change: StackChange::default(),
            levels: "no BitStack".into(),
        });
    };
    let t = &stack.table;
    let min = fixed + stack.prefix_cost(t.min_prefix());
    if budget < min {
        return Err(Error::input(format!(
            "memory budget {} is below the minimum {} for this model ({process_note}dense {} + KV cache {} for {} tokens + scratch {} + one block of every matrix {}); -c N reserves a cache of N tokens",
            show_bytes(budget), show_bytes(min), show_bytes(dense), show_bytes(kv), ctx, show_bytes(scratch),
            show_bytes(stack.prefix_cost(t.min_prefix()))
        )));
    }
    let n = stack.prefix_for(budget - fixed);
    let change = stack.set_prefix(n)?;
    Ok(MemoryPlan {
        budget,
        process,
        dense,
        kv,
        scratch,
        blocks: n,
        total_blocks: t.entries.len(),
        change,
        levels: stack.levels_summary(),
    })
}

/// Parse a memory size: `90MB`, `1.5GiB`, `4096` (bytes). Decimal units (kB, MB, GB)
/// are powers of 1000, binary ones (KiB, MiB, GiB) of 1024.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(Error::input(format!(
                "memory size {s:?}: unknown unit {other:?} (use B, kB, MB, GB, KiB, MiB, GiB)"
            )))
        }
    };
    let v: f64 =
        num.parse().map_err(|_| Error::input(format!("memory size {s:?} is not a number with a unit (e.g. 90MB)")))?;
    let bytes = v * mult;
    if !bytes.is_finite() || !(1.0..=1e18).contains(&bytes) {
        return Err(Error::input(format!("memory size {s:?} is out of range")));
    }
    Ok(bytes as u64)
}

/// `123.4 MB`.
pub fn show_bytes(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}
