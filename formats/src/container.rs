//! The `.cairn` container: one mmappable file with checksummed header, metadata, tensor
//! directory, an optional BitStack stack table, and aligned tensor data. The byte
//! layout is specified in `formats/FORMAT.md`; this module is its only implementation.
//!
//! Parsing checks everything that can be checked without reading tensor data (magic,
//! version, sizes, every section's bounds and checksum, every tensor's extent, type,
//! shape and alignment); [`CairnFile::verify`] then checks one tensor's data checksum,
//! so a loader can verify exactly the tensors it maps.

use std::prelude::v1::*;

use crate::error::{Error, Result};
use crate::fine::FineType;
use crate::gguf::{align_up, label, put_str, put_value, Cursor, MetaValue, Metadata, TensorInfo};
use crate::hash::xxh64;
use crate::types::GgmlType;

/// First 8 bytes of every `.cairn` file. The high byte and CR LF catch files that went
/// through a text-mode transfer, as PNG's signature does.
pub const MAGIC: [u8; 8] = *b"\x89CAIRN\r\n";
/// The container version this code reads and writes.
pub const VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 128;
/// Every tensor starts on a multiple of this (cache lines and SIMD loads).
pub const TENSOR_ALIGN: u64 = 64;
/// The data section starts on a page, so page-aligned tensors are page-aligned in the
/// file and can be mapped and released page by page.
pub const PAGE: u64 = 4096;
const MAX_DIMS: usize = 4;
/// Type code of FineQuant tensors in the directory (ggml types use their GGUF id).
const FINE_KIND: u32 = 0x1000;

/// A parsed `.cairn` file borrowing its bytes.
#[derive(Debug, Clone)]
pub struct CairnFile<'a> {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    /// Offsets are absolute (from the start of the file).
    pub tensors: Vec<TensorInfo>,
    /// XXH64 of each tensor's data, parallel to `tensors`.
    pub checksums: Vec<u64>,
    /// Absolute byte range of the stack table, if the file has one.
    pub stack: Option<(u64, u64)>,
    pub data_offset: u64,
    bytes: &'a [u8],
}

struct Header {
    file_len: u64,
    sections: [(u64, u64, u64); 3],
    data: (u64, u64),
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Whether `bytes` starts like a `.cairn` file.
pub fn is_cairn(bytes: &[u8]) -> bool {
    bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] == MAGIC
}

fn corrupt(what: &str, stored: u64, computed: u64) -> Error {
    Error::invalid(format!(
        "{what}: checksum mismatch (stored {stored:016x}, computed {computed:016x}); the file is corrupt"
    ))
}

const SECTION_NAMES: [&str; 3] = ["metadata section", "tensor directory", "stack table"];

fn read_header(bytes: &[u8]) -> Result<Header> {
    if bytes.len() < MAGIC.len() || !is_cairn(bytes) {
        return Err(Error::invalid("not a .cairn file (bad magic bytes)"));
    }
    if bytes.len() < HEADER_BYTES {
        return Err(Error::Truncated { what: "header".into(), offset: bytes.len() });
    }
    let h = &bytes[..HEADER_BYTES];
    let stored = le64(h, 120);
    let computed = xxh64(&h[..120], 0);
    if stored != computed {
        return Err(corrupt("header", stored, computed));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version != VERSION {
        return Err(Error::invalid(format!(".cairn version {version} is not supported (this build reads {VERSION})")));
    }
    let header_len = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if header_len as usize != HEADER_BYTES {
        return Err(Error::invalid(format!("header size {header_len} (expected {HEADER_BYTES})")));
    }
    let file_len = le64(h, 16);
    if file_len != bytes.len() as u64 {
        return Err(if file_len > bytes.len() as u64 {
            Error::Truncated { what: format!("file of {file_len} bytes"), offset: bytes.len() }
        } else {
            Error::invalid(format!("file has {} bytes, its header says {file_len}", bytes.len()))
        });
    }
    let sections = [
        (le64(h, 24), le64(h, 32), le64(h, 88)),
        (le64(h, 40), le64(h, 48), le64(h, 96)),
        (le64(h, 56), le64(h, 64), le64(h, 104)),
    ];
    let data = (le64(h, 72), le64(h, 80));
    let within = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_len) && off >= HEADER_BYTES as u64;
    for (name, &(off, len, _)) in SECTION_NAMES.iter().zip(&sections) {
        // An absent stack table is (0, 0) exactly; every other section lies in the file.
        let absent = *name == "stack table" && len == 0 && off == 0;
        if !absent && !within(off, len) {
            return Err(Error::invalid(format!("{name} ({len} bytes at {off}) lies outside the file")));
        }
    }
    if !data.0.is_multiple_of(PAGE) || !within(data.0, data.1) {
        return Err(Error::invalid(format!("data section ({} bytes at {}) is misplaced", data.1, data.0)));
    }
    Ok(Header { file_len, sections, data })
}

fn decode_type(kind: u32, param: u32, name: &str) -> Result<GgmlType> {
    if kind & FINE_KIND != 0 {
        let bits = (kind & 0xFF) as u8;
        let sym = kind & 0x100 != 0;
        return FineType::new(bits, sym, param as usize)
            .map(GgmlType::Fine)
            .map_err(|e| Error::invalid(format!("tensor {name}: {e}")));
    }
    if param != 0 {
        return Err(Error::invalid(format!("tensor {name}: type parameter {param} on a ggml type")));
    }
    GgmlType::from_id(kind).map_err(|_| Error::invalid(format!("tensor {name}: unknown type id {kind}")))
}

fn encode_type(ty: GgmlType) -> (u32, u32) {
    match ty {
        GgmlType::Fine(ft) => (FINE_KIND | ft.bits() as u32 | if ft.sym() { 0x100 } else { 0 }, ft.group() as u32),
        t => (t.id(), 0),
    }
}

impl<'a> CairnFile<'a> {
    /// Parse and check everything but the tensor data's checksums.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let h = read_header(bytes)?;
        for (name, &(off, len, stored)) in SECTION_NAMES.iter().zip(&h.sections) {
            // In bounds: `read_header` checked every section (an absent one is 0..0).
            let computed = xxh64(&bytes[off as usize..(off + len) as usize], 0);
            if computed != stored {
                return Err(corrupt(name, stored, computed));
            }
        }
        let (moff, mlen, _) = h.sections[0];
        let mut c = Cursor { buf: &bytes[..(moff + mlen) as usize], pos: moff as usize };
        let n_kv = c.bounded_count("metadata count", 8 + 4 + 1)?;
        let metadata = c.metadata(n_kv)?;
        if c.remaining() != 0 {
            return Err(Error::invalid(format!("metadata section has {} bytes left over", c.remaining())));
        }

        let (doff, dlen, _) = h.sections[1];
        let mut c = Cursor { buf: &bytes[..(doff + dlen) as usize], pos: doff as usize };
        let n = c.bounded_count("tensor count", 8 + 4 + 8 + 4 + 4 + 8 + 8 + 8)?;
        let (data_off, data_len) = h.data;
        let mut tensors = Vec::with_capacity(n);
        let mut checksums = Vec::with_capacity(n);
        let mut seen = std::collections::BTreeSet::new();
        let mut extents = Vec::with_capacity(n);
        for _ in 0..n {
            let (name, dims) = c.name_and_dims()?;
            let shown = label(&name).into_owned();
            let (kind, param) = (c.u32(&shown)?, c.u32(&shown)?);
            let ty = decode_type(kind, param, &shown)?;
            let (rel, size, sum) = (c.u64(&shown)?, c.u64(&shown)?, c.u64(&shown)?);
            let rows = dims[1..]
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::invalid(format!("tensor {shown}: row count overflows")))?;
            let want = ty
                .row_bytes(dims[0])
                .ok()
                .and_then(|r| r.checked_mul(rows))
                .ok_or_else(|| Error::invalid(format!("tensor {shown}: shape {dims:?} does not fit type {ty}")))?;
            if want != size {
                return Err(Error::invalid(format!(
                    "tensor {shown}: {size} bytes in the directory, but shape {dims:?} of {ty} needs {want}"
                )));
            }
            if !rel.is_multiple_of(TENSOR_ALIGN) {
                return Err(Error::invalid(format!("tensor {shown}: offset {rel} is not aligned to {TENSOR_ALIGN}")));
            }
            if rel.checked_add(size).is_none_or(|e| e > data_len) {
                return Err(Error::invalid(format!(
                    "tensor {shown}: {size} bytes at data offset {rel} run past the data section ({data_len} bytes)"
                )));
            }
            if !seen.insert(name.clone()) {
                return Err(Error::invalid(format!("tensor {shown} appears twice")));
            }
            extents.push((rel, size, tensors.len()));
            tensors.push(TensorInfo { name, dims, ty, offset: data_off + rel, size });
            checksums.push(sum);
        }
        if c.remaining() != 0 {
            return Err(Error::invalid(format!("tensor directory has {} bytes left over", c.remaining())));
        }
        extents.sort_unstable();
        for w in extents.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                let (a, b) = (&tensors[w[0].2].name, &tensors[w[1].2].name);
                return Err(Error::invalid(format!("tensors {} and {} overlap", label(a), label(b))));
            }
        }
        let (soff, slen, _) = h.sections[2];
        let stack = (slen > 0).then_some((soff, slen));
        debug_assert_eq!(h.file_len, bytes.len() as u64);
        Ok(CairnFile { version: VERSION, metadata, tensors, checksums, stack, data_offset: data_off, bytes })
    }

    pub fn tensor_data(&self, t: &TensorInfo) -> &'a [u8] {
        &self.bytes[t.offset as usize..(t.offset + t.size) as usize]
    }

    /// The stack table's bytes (their layout belongs to BitStack).
    pub fn stack_table(&self) -> Option<&'a [u8]> {
        self.stack.map(|(o, l)| &self.bytes[o as usize..(o + l) as usize])
    }

    /// Check tensor `i`'s data against its stored checksum.
    pub fn verify(&self, i: usize) -> Result<()> {
        verify_tensor(&self.tensors[i], self.checksums[i], self.tensor_data(&self.tensors[i]))
    }
}

impl Metadata for CairnFile<'_> {
    fn get(&self, key: &str) -> Option<&MetaValue> {
        Metadata::get(&self.metadata, key)
    }
}

/// Check one tensor's bytes against its directory checksum; the error names the tensor.
pub fn verify_tensor(t: &TensorInfo, stored: u64, data: &[u8]) -> Result<()> {
    let computed = xxh64(data, 0);
    if computed != stored {
        return Err(corrupt(&format!("tensor {} data", label(&t.name)), stored, computed));
    }
    Ok(())
}

/// Recompute the section and header checksums of an edited file in place (sections
/// whose range lies outside the file keep their old checksum). For tools that patch
/// files, and for tests and fuzzing that must get hostile contents past the checksums.
pub fn reseal(f: &mut [u8]) {
    if f.len() < HEADER_BYTES {
        return;
    }
    for (field, sum) in [(24, 88), (40, 96), (56, 104)] {
        let (off, len) = (le64(f, field) as usize, le64(f, field + 8) as usize);
        if let Some(h) = off.checked_add(len).and_then(|end| f.get(off..end)).map(|s| xxh64(s, 0)) {
            f[sum..sum + 8].copy_from_slice(&h.to_le_bytes());
        }
    }
    let h = xxh64(&f[..120], 0);
    f[120..128].copy_from_slice(&h.to_le_bytes());
}

/// A tensor waiting to be written: name, dims, type, bytes, alignment.
type PendingTensor = (String, Vec<u64>, GgmlType, Vec<u8>, u64);

/// Builds a `.cairn` file in memory.
#[derive(Debug, Default, Clone)]
pub struct CairnBuilder {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<PendingTensor>,
    stack: Option<Vec<u8>>,
}

impl CairnBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn meta(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.into(), v));
        self
    }

    /// Add a tensor from its encoded bytes, aligned to 64 bytes.
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Result<&mut Self> {
        self.tensor_aligned(name, dims, ty, data, TENSOR_ALIGN)
    }

    /// Add a tensor that starts on a multiple of `align` (a power of two from 64 to
    /// 4096; BitStack blocks use 4096 so that each can be mapped and released alone).
    pub fn tensor_aligned(
        &mut self,
        name: &str,
        dims: &[u64],
        ty: GgmlType,
        data: Vec<u8>,
        align: u64,
    ) -> Result<&mut Self> {
        if !(TENSOR_ALIGN..=PAGE).contains(&align) || !align.is_power_of_two() {
            return Err(Error::invalid(format!("tensor {name}: alignment {align} is not a power of two in 64..=4096")));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(Error::invalid(format!("tensor {name}: {} dimensions", dims.len())));
        }
        let rows: u64 = dims[1..].iter().product();
        let want = ty.row_bytes(dims[0])? * rows;
        if want != data.len() as u64 {
            return Err(Error::invalid(format!("tensor {name}: {} bytes given, {want} expected", data.len())));
        }
        if self.tensors.iter().any(|t| t.0 == name) {
            return Err(Error::invalid(format!("tensor {name} added twice")));
        }
        self.tensors.push((name.into(), dims.to_vec(), ty, data, align));
        Ok(self)
    }

    /// The opaque stack table (written and read by BitStack).
    pub fn stack_table(&mut self, bytes: Vec<u8>) -> &mut Self {
        self.stack = Some(bytes);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut meta = Vec::new();
        meta.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut meta, k);
            meta.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut meta, v);
        }
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut rel = 0u64;
        for t in &self.tensors {
            rel = align_up(rel, t.4).unwrap_or(u64::MAX);
            offsets.push(rel);
            rel += t.3.len() as u64;
        }
        let data_len = rel;
        let mut dir = Vec::new();
        dir.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        for ((name, dims, ty, data, _), off) in self.tensors.iter().zip(&offsets) {
            put_str(&mut dir, name);
            dir.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                dir.extend_from_slice(&d.to_le_bytes());
            }
            let (kind, param) = encode_type(*ty);
            dir.extend_from_slice(&kind.to_le_bytes());
            dir.extend_from_slice(&param.to_le_bytes());
            dir.extend_from_slice(&off.to_le_bytes());
            dir.extend_from_slice(&(data.len() as u64).to_le_bytes());
            dir.extend_from_slice(&xxh64(data, 0).to_le_bytes());
        }
        let stack = self.stack.as_deref().unwrap_or(&[]);

        let meta_off = HEADER_BYTES as u64;
        let dir_off = meta_off + meta.len() as u64;
        let stack_off = dir_off + dir.len() as u64;
        let data_off = align_up(stack_off + stack.len() as u64, PAGE).unwrap_or(u64::MAX);
        let file_len = data_off + data_len;

        let mut out = Vec::with_capacity(file_len as usize);
        let mut h = [0u8; HEADER_BYTES];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        let words = [
            (16, file_len),
            (24, meta_off),
            (32, meta.len() as u64),
            (40, dir_off),
            (48, dir.len() as u64),
            (56, if stack.is_empty() { 0 } else { stack_off }),
            (64, stack.len() as u64),
            (72, data_off),
            (80, data_len),
            (88, xxh64(&meta, 0)),
            (96, xxh64(&dir, 0)),
            (104, xxh64(stack, 0)),
        ];
        for (at, v) in words {
            h[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        let hsum = xxh64(&h[..120], 0);
        h[120..].copy_from_slice(&hsum.to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(&meta);
        out.extend_from_slice(&dir);
        out.extend_from_slice(stack);
        out.resize(data_off as usize, 0);
        for (t, off) in self.tensors.iter().zip(&offsets) {
            out.resize((data_off + off) as usize, 0);
            out.extend_from_slice(&t.3);
        }
        out
    }
}
