//! The weight store: a model file mapped into memory and its tensors used in place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_formats::{GgmlType, Gguf, TensorInfo};
use memmap2::Mmap;

use crate::error::{Error, Result};

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

/// A parsed model file. The directory is copied out of the GGUF so that the bytes can
/// be shared (`Arc`) by every weight without a self-referential borrow.
pub struct ModelFile {
    pub path: PathBuf,
    storage: Arc<Storage>,
    pub metadata: Vec<(String, cairn_formats::MetaValue)>,
    pub tensors: Vec<TensorInfo>,
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
        let g = Gguf::parse(storage.bytes()).map_err(|source| Error::Format { path: path.clone(), source })?;
        let (metadata, tensors) = (g.metadata, g.tensors);
        Ok(ModelFile { path, storage: Arc::new(storage), metadata, tensors })
    }

    /// The file parsed as GGUF again, for readers that want the format's own view
    /// (the tokenizer and chat template read their metadata through it).
    pub fn gguf(&self) -> Result<Gguf<'_>> {
        Gguf::parse(self.storage.bytes()).map_err(|source| Error::Format { path: self.path.clone(), source })
    }

    pub fn meta(&self, key: &str) -> Option<&cairn_formats::MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor by name, with its shape checked against what the model expects
    /// (`dims[0]` innermost, as in GGUF).
    pub fn tensor(&self, name: &str, dims: &[u64]) -> Result<HostTensor> {
        let t = self
            .tensor_info(name)
            .ok_or_else(|| Error::model(format!("{}: missing tensor {name}", self.path.display())))?;
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
        Ok(HostTensor {
            name: t.name.clone(),
            ty: t.ty,
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
        let Storage::Mapped(map) = &*self.storage else { return };
        let page = 4096;
        let start = self.offset.next_multiple_of(page);
        let end = (self.offset + self.len) / page * page;
        if end > start {
            // SAFETY: the mapping is private and read-only, so dropping its pages loses
            // nothing: the kernel re-reads them from the file if they are touched again.
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    /// The whole tensor as f32 (for small tensors: norms, biases).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.cols() * self.rows()];
        cairn_formats::quant::dequantize(self.ty, self.bytes(), &mut out)
            .map_err(|e| Error::model(format!("tensor {}: {e}", self.name)))?;
        Ok(out)
    }
}
