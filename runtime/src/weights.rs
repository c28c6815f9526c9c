//! The weight store: a model file mapped into memory and its tensors used in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_formats::{container, CairnFile, GgmlType, Gguf, MetaValue, TensorInfo};
use memmap2::Mmap;

use crate::bitstack::Stack;
use crate::error::{Error, Result};
use cairn_formats::bitstack::StackTable;

/// Bytes backing a model: a read-only mapping of the file, or an owned buffer (models
/// built in memory by tests and converters).
pub enum Storage {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// Which container a model file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Gguf,
    Cairn,
}

/// A parsed model file, GGUF or `.cairn`: the rest of the runtime sees only metadata
/// and a tensor directory. The directory is copied out of the parser so that the bytes
/// can be shared (`Arc`) by every weight without a self-referential borrow.
pub struct ModelFile {
    pub path: PathBuf,
    pub kind: FileKind,
    storage: Arc<Storage>,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    /// `.cairn` only: each tensor's data checksum, checked when the tensor is first
    /// fetched (so a loader verifies exactly what it maps).
    checksums: Option<Vec<u64>>,
    /// `.cairn` with a stack table: the BitStack matrices (none active until a budget
    /// is set).
    pub stack: Option<Stack>,
}

impl ModelFile {
    /// Map `path` and parse its header and tensor directory.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if meta.is_dir() {
            return Err(Error::input(format!("{} is a directory, not a model file", path.display())));
        }
        let storage = if meta.len() == 0 {
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the file is opened read-only and the mapping is private to this
            // process; Cairn never writes model files while they are mapped. Another
            // process truncating the file underneath us is outside what any mmap-based
            // loader (llama.cpp included) can defend against.
            Storage::Mapped(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        Self::from_storage(path.to_path_buf(), storage)
    }

    /// A model held in memory (tests, synthetic models).
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::from_storage(PathBuf::from(name), Storage::Owned(bytes))
    }

    fn from_storage(path: PathBuf, storage: Storage) -> Result<Self> {
        let fmt = |source| Error::Format { path: path.clone(), source };
        let bytes = storage.bytes();
        let (kind, metadata, tensors, checksums, table) = if container::is_cairn(bytes) {
            let c = CairnFile::parse(bytes).map_err(fmt)?;
            let table = match c.stack_table() {
                Some(t) => {
                    let table = StackTable::decode(t).map_err(fmt)?;
                    table.validate(&c).map_err(fmt)?;
                    Some(table)
                }
                None => None,
            };
            (FileKind::Cairn, c.metadata, c.tensors, Some(c.checksums), table)
        } else {
            let g = Gguf::parse(bytes).map_err(fmt)?;
            (FileKind::Gguf, g.metadata, g.tensors, None, None)
        };
        let storage = Arc::new(storage);
        let stack = match table {
            Some(table) => Some(Stack::new(table, |i| {
                let t = &tensors[i];
                let view = HostTensor {
                    name: t.name.clone(),
                    ty: t.ty,
                    dims: t.dims.clone(),
                    storage: storage.clone(),
                    offset: t.offset as usize,
                    len: t.size as usize,
                };
                (view, t.clone(), checksums.as_ref().map_or(0, |c| c[i]))
            })?),
            None => None,
        };
        Ok(ModelFile { path, kind, storage, metadata, tensors, checksums, stack })
    }

    /// Bytes of every tensor that is not a BitStack block (the part no budget shrinks).
    pub fn dense_bytes(&self) -> u64 {
        let blocks: std::collections::HashSet<u32> =
            self.stack.iter().flat_map(|s| s.table.entries.iter().map(|e| e.tensor)).collect();
        self.tensors.iter().enumerate().filter(|(i, _)| !blocks.contains(&(*i as u32))).map(|(_, t)| t.size).sum()
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Check every tensor's data checksum (`.cairn`; a GGUF has none): `Ok(n)` with the
    /// number verified.
    ///
    /// Each tensor's pages are dropped once it is checked, so checking a whole file
    /// never makes it resident (`cairn info` on a BitStack file larger than its budget).
    pub fn verify_all(&self) -> Result<usize> {
        let Some(sums) = &self.checksums else { return Ok(0) };
        for (t, &sum) in self.tensors.iter().zip(sums) {
            container::verify_tensor(t, sum, self.tensor_bytes(t))
                .map_err(|source| Error::Format { path: self.path.clone(), source })?;
            self.release_range(t.offset as usize, t.size as usize);
        }
        Ok(sums.len())
    }

    /// Drop the resident pages wholly inside `offset..offset + len` of the mapping.
    fn release_range(&self, offset: usize, len: usize) {
        let Storage::Mapped(map) = &*self.storage else { return };
        let (start, end) = (offset.next_multiple_of(4096), (offset + len) / 4096 * 4096);
        if end > start && end <= map.len() {
            // SAFETY: the mapping is private and read-only, so dropping its pages loses
            // nothing: the kernel re-reads them from the file if they are touched again.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    /// The raw bytes of tensor `t` (unverified).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.storage.bytes()[t.offset as usize..(t.offset + t.size) as usize]
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor by name, with its shape checked against what the model expects
    /// (`dims[0]` innermost, as in GGUF).
    pub fn tensor(&self, name: &str, dims: &[u64]) -> Result<HostTensor> {
        let i = self
            .tensors
            .iter()
            .position(|t| t.name == name)
            .ok_or_else(|| Error::model(format!("{}: missing tensor {name}", self.path.display())))?;
        let t = &self.tensors[i];
        if t.dims != dims {
            return Err(Error::model(format!(
                "{}: tensor {name} has shape {:?}, expected {:?}",
                self.path.display(),
                t.dims,
                dims
            )));
        }
        if !t.ty.is_supported() {
            return Err(Error::model(format!(
                "{}: tensor {name} has type {}, which Cairn does not support",
                self.path.display(),
                t.ty
            )));
        }
        if let Some(sums) = &self.checksums {
            container::verify_tensor(t, sums[i], self.tensor_bytes(t))
                .map_err(|source| Error::Format { path: self.path.clone(), source })?;
        }
        Ok(HostTensor {
            name: t.name.clone(),
            ty: t.ty.canonical(),
            dims: t.dims.clone(),
            storage: self.storage.clone(),
            offset: t.offset as usize,
            len: t.size as usize,
        })
    }

    /// Drop the resident pages of the whole mapping (memory pressure on a phone): they
    /// are re-read from the file when next touched, so nothing is lost but time.
    /// Copies the backend made (repacked weights, caches) are not affected.
    pub fn release_pages(&self) {
        let Storage::Mapped(map) = &*self.storage else { return };
        if map.is_empty() {
            return;
        }
        // SAFETY: the mapping is private and read-only, so dropping its pages loses
        // nothing: the kernel re-reads them from the file if they are touched again.
        let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }

    pub fn file_bytes(&self) -> usize {
        self.storage.bytes().len()
    }
}

/// A tensor in host memory (usually inside the mapping), in its storage type.
#[derive(Clone)]
pub struct HostTensor {
    pub name: String,
    pub ty: GgmlType,
    pub dims: Vec<u64>,
    storage: Arc<Storage>,
    offset: usize,
    len: usize,
}

impl HostTensor {
    /// A stand-in for a weight that has no tensor of its own (a BitStack matrix): its
    /// name and shape, no bytes.
    pub fn placeholder(&self, name: &str, dims: &[u64]) -> HostTensor {
        HostTensor {
            name: name.into(),
            ty: cairn_formats::bitstack::BLOCK_TYPE,
            dims: dims.to_vec(),
            storage: self.storage.clone(),
            offset: 0,
            len: 0,
        }
    }

    pub fn bytes(&self) -> &[u8] {
        // In bounds: the GGUF parser checked every tensor's extent against the file.
        &self.storage.bytes()[self.offset..self.offset + self.len]
    }

    /// Values per row (the innermost dimension).
    pub fn cols(&self) -> usize {
        self.dims[0] as usize
    }

    /// Number of rows (product of the outer dimensions).
    pub fn rows(&self) -> usize {
        self.dims[1..].iter().product::<u64>() as usize
    }

    pub fn row_bytes(&self) -> usize {
        self.len / self.rows().max(1)
    }

    /// Tell the kernel that this process no longer needs the mapped pages wholly inside
    /// the tensor (after repacking it elsewhere), so they leave the resident set. The
    /// mapping stays valid: a later read faults the pages back in from the page cache.
    pub fn release_pages(&self) {
        self.release(false)
    }

    /// As [`release_pages`](Self::release_pages), including the tensor's last partial
    /// page: for tensors that own the padding up to the next page (BitStack blocks).
    pub fn release_whole_pages(&self) {
        self.release(true)
    }

    /// [`release_pages`](Self::release_pages) for the tensor's bytes `0..upto` only
    /// (a repack in progress frees what it has copied, so the two never sit whole side
    /// by side).
    pub fn release_prefix(&self, upto: usize) {
        let Storage::Mapped(map) = &*self.storage else { return };
        let page = 4096;
        let start = self.offset.next_multiple_of(page);
        let end = (self.offset + upto.min(self.len)) / page * page;
        if end > start {
            // SAFETY: as in `release`.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    fn release(&self, last_partial: bool) {
        let Storage::Mapped(map) = &*self.storage else { return };
        let page = 4096;
        let start = self.offset.next_multiple_of(page);
        let end = if last_partial {
            (self.offset + self.len).next_multiple_of(page).min(map.len())
        } else {
            (self.offset + self.len) / page * page
        };
        if end > start {
            // SAFETY: the mapping is private and read-only, so dropping its pages loses
            // nothing: the kernel re-reads them from the file if they are touched again.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    /// The whole tensor as f32 (for small tensors: norms, biases), row by row (the
    /// FineQuant types decode one row at a time).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let (cols, rb) = (self.cols(), self.row_bytes());
        let mut out = vec![0f32; cols * self.rows()];
        for (dst, src) in out.chunks_exact_mut(cols.max(1)).zip(self.bytes().chunks_exact(rb.max(1))) {
            cairn_formats::quant::dequantize(self.ty, src, dst)
                .map_err(|e| Error::model(format!("tensor {}: {e}", self.name)))?;
        }
        Ok(out)
    }
}

/// Cairn's cache root: `$CAIRN_HOME`, else `~/.cache/cairn`.
///
/// Falls back to the temp dir when no home directory is known, so callers
/// never have to handle "no home" (models are re-downloadable anyway).
pub fn cairn_home() -> PathBuf {
    if let Some(h) = std::env::var_os("CAIRN_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache").join("cairn"),
        None => std::env::temp_dir().join("cairn"),
    }
}
