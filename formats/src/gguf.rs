//! GGUF v2/v3 reader over a byte slice, and a writer for building files in memory.
//!
//! The reader trusts nothing: every count is bounded by the bytes that remain before
//! anything is allocated, nesting depth is capped, and every tensor's extent is checked
//! against the data section. A malformed file yields an [`Error`], never a panic.

use std::prelude::v1::*;

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::types::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Nested arrays deeper than this are rejected: no real file needs more, and it bounds
/// recursion on hostile input.
const MAX_DEPTH: usize = 8;
const MAX_DIMS: usize = 4;

/// A metadata value. Strings are decoded lossily: GGUF says UTF-8, but a stray byte in a
/// vocabulary entry should not make a whole model unloadable.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    pub(crate) fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Any integer type that fits in a u64 (negative values do not).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            MetaValue::Bool(v) => Some(v as u64),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any numeric type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// An array of `items`, packed where they are all strings, f32 or i32.
    pub fn array(items: Vec<MetaValue>) -> MetaValue {
        MetaValue::Array(MetaArray::from(items))
    }

    /// An array of strings, packed.
    pub fn strings<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> MetaValue {
        let mut p = PackedStrings::default();
        items.into_iter().for_each(|s| p.push(s.as_ref()));
        MetaValue::Array(if p.is_empty() { MetaArray::Values(Vec::new()) } else { MetaArray::Strings(p) })
    }
}

/// The short form people read (`cairn info`): numbers and strings bare, arrays past a
/// few elements elided with their length.
impl core::fmt::Display for MetaValue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const SHOWN: usize = 6;
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::String(s) => f.write_str(s),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            MetaValue::Array(a) => {
                f.write_str("[")?;
                for i in 0..a.len().min(SHOWN) {
                    let sep = if i > 0 { ", " } else { "" };
                    match a.get(i) {
                        Some(MetaValue::String(s)) => write!(f, "{sep}{s:?}")?,
                        Some(v) => write!(f, "{sep}{v}")?,
                        None => {}
                    }
                }
                if a.len() > SHOWN {
                    write!(f, ", … ({} values)", a.len())?;
                }
                f.write_str("]")
            }
        }
    }
}

/// A metadata array. A vocabulary is 50k–260k strings with a score and a type each;
/// held as one `MetaValue` per element that costs ~34 MB for Gemma-3's, so arrays of
/// strings, f32 and i32 are packed (~5 MB). The form is canonical: an array is packed
/// exactly when it is non-empty and all its elements are of one of those types, so
/// derived equality compares contents.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaArray {
    Strings(PackedStrings),
    F32(Vec<f32>),
    I32(Vec<i32>),
    /// Any other element type, nested arrays, and the empty array.
    Values(Vec<MetaValue>),
}

/// Strings end to end in one buffer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackedStrings {
    text: String,
    ends: Vec<u32>,
}

impl PackedStrings {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        self.text.get(start..end)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or_default())
    }

    /// Text beyond 4 GiB in one array is not a real vocabulary; the parser's bound on
    /// counts (by the bytes left in a file) keeps it from being reached.
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(u32::try_from(self.text.len()).unwrap_or(u32::MAX));
    }
}

impl MetaArray {
    pub fn len(&self) -> usize {
        match self {
            MetaArray::Strings(p) => p.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::Values(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, as an owned value (a copy of the string for packed strings).
    pub fn get(&self, i: usize) -> Option<MetaValue> {
        match self {
            MetaArray::Strings(p) => p.get(i).map(|s| MetaValue::String(s.into())),
            MetaArray::F32(v) => v.get(i).map(|&x| MetaValue::F32(x)),
            MetaArray::I32(v) => v.get(i).map(|&x| MetaValue::I32(x)),
            MetaArray::Values(v) => v.get(i).cloned(),
        }
    }

    /// Element `i` where it is a string.
    pub fn str(&self, i: usize) -> Option<&str> {
        match self {
            MetaArray::Strings(p) => p.get(i),
            MetaArray::Values(v) => v.get(i)?.as_str(),
            _ => None,
        }
    }

    /// Every element as a string; `Err(i)` names the first that is not one.
    pub fn strs(&self) -> core::result::Result<Vec<&str>, usize> {
        match self {
            MetaArray::Strings(p) => Ok(p.iter().collect()),
            MetaArray::Values(v) => v.iter().enumerate().map(|(i, x)| x.as_str().ok_or(i)).collect(),
            _ => Err(0),
        }
    }

    /// Element `i` where it is a number.
    pub fn f64(&self, i: usize) -> Option<f64> {
        match self {
            MetaArray::Strings(_) => None,
            MetaArray::F32(v) => v.get(i).map(|&x| x as f64),
            MetaArray::I32(v) => v.get(i).map(|&x| x as f64),
            MetaArray::Values(v) => v.get(i)?.as_f64(),
        }
    }

    /// Element `i` where it is an integer.
    pub fn i64(&self, i: usize) -> Option<i64> {
        match self {
            MetaArray::I32(v) => v.get(i).map(|&x| x as i64),
            MetaArray::Values(v) => v.get(i)?.as_i64(),
            _ => None,
        }
    }

    /// The GGUF type of the elements (u8 for an empty array: any would do).
    fn elem_type(&self) -> u32 {
        match self {
            MetaArray::Strings(_) => 8,
            MetaArray::F32(_) => 6,
            MetaArray::I32(_) => 5,
            MetaArray::Values(v) => v.first().map_or(0, MetaValue::type_id),
        }
    }
}

impl From<Vec<MetaValue>> for MetaArray {
    fn from(items: Vec<MetaValue>) -> MetaArray {
        let all = |f: fn(&MetaValue) -> bool| !items.is_empty() && items.iter().all(f);
        if all(|v| matches!(v, MetaValue::String(_))) {
            let mut p = PackedStrings::default();
            items.iter().filter_map(MetaValue::as_str).for_each(|s| p.push(s));
            MetaArray::Strings(p)
        } else if all(|v| matches!(v, MetaValue::F32(_))) {
            MetaArray::F32(items.iter().map(|v| if let MetaValue::F32(x) = v { *x } else { 0.0 }).collect())
        } else if all(|v| matches!(v, MetaValue::I32(_))) {
            MetaArray::I32(items.iter().map(|v| if let MetaValue::I32(x) = v { *x } else { 0 }).collect())
        } else {
            MetaArray::Values(items)
        }
    }
}

/// Key-value metadata, whichever file it came from: the tokenizer, chat template and
/// model config read GGUF and `.cairn` files through this one view.
pub trait Metadata {
    fn get(&self, key: &str) -> Option<&MetaValue>;

    fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetaValue::as_u64)
    }

    fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(MetaValue::as_f64)
    }
}

impl Metadata for Vec<(String, MetaValue)> {
    fn get(&self, key: &str) -> Option<&MetaValue> {
        self.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl Metadata for Gguf<'_> {
    fn get(&self, key: &str) -> Option<&MetaValue> {
        Metadata::get(&self.metadata, key)
    }
}

/// One entry of the tensor directory. `dims[0]` is the innermost (contiguous) dimension,
/// as in ggml: a weight matrix of `dims = [k, m]` has `m` rows of `k` values each.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the file (already includes the data section's start).
    pub offset: u64,
    pub size: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file borrowing its bytes.
#[derive(Debug, Clone)]
pub struct Gguf<'a> {
    pub version: u32,
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    pub data_offset: u64,
    bytes: &'a [u8],
}

pub(crate) struct Cursor<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(crate) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::Truncated { what: what.into(), offset: self.pos }),
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn count(&mut self, what: &str) -> Result<u64> {
        self.u64(what)
    }

    /// A count of items each at least `min_size` bytes long, bounded by what remains so
    /// that a hostile count cannot make us allocate or loop beyond the input's size.
    pub(crate) fn bounded_count(&mut self, what: &str, min_size: usize) -> Result<usize> {
        let at = self.pos;
        let n = self.count(what)?;
        let max = (self.remaining() / min_size.max(1)) as u64;
        if n > max {
            return Err(Error::invalid(format!(
                "{what} at byte {at} claims {n} items, more than the {} remaining bytes can hold \
                 (the file is truncated or corrupt)",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    pub(crate) fn string(&mut self, what: &str) -> Result<String> {
        let n = self.bounded_count(what, 1)?;
        let s = self.take(n, what)?;
        Ok(String::from_utf8_lossy(s).into_owned())
    }

    /// `n` key-value pairs in GGUF's encoding (the `.cairn` metadata section uses it too).
    pub(crate) fn metadata(&mut self, n: usize) -> Result<Vec<(String, MetaValue)>> {
        let mut metadata = Vec::with_capacity(n);
        for _ in 0..n {
            let key = self.string("metadata key")?;
            let shown = label(&key);
            let ty = self.u32(&shown)?;
            let v = self.value(ty, 0, &shown)?;
            drop(shown);
            metadata.push((key, v));
        }
        Ok(metadata)
    }

    /// A tensor entry's name and dimensions (1 to 4), as both directories start.
    pub(crate) fn name_and_dims(&mut self) -> Result<(String, Vec<u64>)> {
        let name = self.string("tensor name")?;
        let shown = label(&name);
        let n_dims = self.u32(&shown)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(Error::invalid(format!("tensor {shown}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(self.u64(&shown)?);
        }
        drop(shown);
        Ok((name, dims))
    }

    /// `n` items read by `f`, in a vector allocated once.
    fn each<T>(&mut self, n: usize, mut f: impl FnMut(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(f(self)?);
        }
        Ok(v)
    }

    pub(crate) fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.u8(key)?),
            1 => MetaValue::I8(self.u8(key)? as i8),
            2 => MetaValue::U16(self.u16(key)?),
            3 => MetaValue::I16(self.u16(key)? as i16),
            4 => MetaValue::U32(self.u32(key)?),
            5 => MetaValue::I32(self.u32(key)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(key)?)),
            7 => match self.u8(key)? {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(Error::invalid(format!("metadata {key}: bad bool byte {b}"))),
            },
            8 => MetaValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(Error::invalid(format!("metadata {key}: arrays nested deeper than {MAX_DEPTH}")));
                }
                let elem_ty = self.u32(key)?;
                let min = min_value_size(elem_ty)
                    .ok_or_else(|| Error::invalid(format!("metadata {key}: unknown array element type {elem_ty}")))?;
                let n = self.bounded_count(key, min)?;
                MetaValue::Array(match elem_ty {
                    _ if n == 0 => MetaArray::Values(Vec::new()),
                    8 => {
                        let mut p = PackedStrings { text: String::new(), ends: Vec::with_capacity(n) };
                        for _ in 0..n {
                            let len = self.bounded_count(key, 1)?;
                            p.push(&String::from_utf8_lossy(self.take(len, key)?));
                        }
                        MetaArray::Strings(p)
                    }
                    6 => MetaArray::F32(self.each(n, |c| Ok(f32::from_bits(c.u32(key)?)))?),
                    5 => MetaArray::I32(self.each(n, |c| Ok(c.u32(key)? as i32))?),
                    _ => MetaArray::Values(self.each(n, |c| c.value(elem_ty, depth + 1, key))?),
                })
            }
            10 => MetaValue::U64(self.u64(key)?),
            11 => MetaValue::I64(self.u64(key)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(key)?)),
            t => return Err(Error::invalid(format!("metadata {key}: unknown value type {t}"))),
        })
    }
}

/// Smallest encoded size of a value of type `ty` (None for unknown types).
fn min_value_size(ty: u32) -> Option<usize> {
    let count = 8;
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => count,
        9 => 4 + count,
        10..=12 => 8,
        _ => return None,
    })
}

impl<'a> Gguf<'a> {
    /// Parse the header, metadata and tensor directory of `bytes`, checking that every
    /// tensor lies inside the file.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        if bytes.len() < 4 {
            return Err(Error::Truncated { what: "magic".into(), offset: 0 });
        }
        if &bytes[..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        let mut c = Cursor { buf: bytes, pos: 4 };
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::UnsupportedVersion(version));
        }
        // Each tensor info is at least 8 (name) + 4 + 8 + 4 + 8 bytes.
        let n_tensors = c.count("tensor count")?;
        let n_kv = c.count("metadata count")?;
        let n_kv = bound(n_kv, c.remaining(), 8 + 4 + 1, "metadata count")?;
        let n_tensors = bound(n_tensors, c.remaining(), 8 + 4 + 8 + 4 + 8, "tensor count")?;

        let metadata = c.metadata(n_kv)?;

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, v)) => {
                let a = v.as_u64().ok_or_else(|| Error::invalid("general.alignment is not an integer"))?;
                if a == 0 || !a.is_power_of_two() || a > 1 << 20 {
                    return Err(Error::invalid(format!("general.alignment {a} is not a power of two up to 1 MiB")));
                }
                a
            }
            None => DEFAULT_ALIGNMENT,
        };

        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let (name, dims) = c.name_and_dims()?;
            let shown = label(&name);
            let ty_id = c.u32(&shown)?;
            let ty = GgmlType::from_id(ty_id)
                .map_err(|_| Error::invalid(format!("tensor {shown}: unknown type id {ty_id}")))?;
            let offset = c.u64(&shown)?;
            drop(shown);
            raw.push((name, dims, ty, offset));
        }

        let data_offset = align_up(c.pos as u64, alignment).ok_or_else(|| Error::invalid("data offset overflows"))?;
        if data_offset > bytes.len() as u64 && n_tensors > 0 {
            return Err(Error::Truncated { what: "tensor data".into(), offset: bytes.len() });
        }
        let data_len = (bytes.len() as u64).saturating_sub(data_offset);

        let mut tensors = Vec::with_capacity(raw.len());
        let mut seen = std::collections::BTreeSet::new();
        for (name, dims, ty, rel) in raw {
            let shown = label(&name);
            let mut n: u64 = 1;
            for &d in &dims {
                n = n
                    .checked_mul(d)
                    .ok_or_else(|| Error::invalid(format!("tensor {shown}: element count overflows")))?;
            }
            // The row count on its own too: a zero-length row must not hide outer
            // dimensions whose product overflows (users of the shape multiply them).
            dims[1..]
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| Error::invalid(format!("tensor {shown}: row count overflows")))?;
            let row = ty.row_bytes(dims[0]).map_err(|e| Error::invalid(format!("tensor {shown}: {e}")))?;
            let size = row
                .checked_mul(n / dims[0].max(1))
                .ok_or_else(|| Error::invalid(format!("tensor {shown}: size overflows")))?;
            if rel % alignment != 0 {
                return Err(Error::invalid(format!("tensor {shown}: offset {rel} is not aligned to {alignment}")));
            }
            match rel.checked_add(size) {
                Some(end) if end <= data_len => {}
                _ => {
                    return Err(Error::Truncated {
                        what: format!("tensor {shown} ({size} bytes at data offset {rel})"),
                        offset: bytes.len(),
                    })
                }
            }
            if !seen.insert(name.clone()) {
                return Err(Error::invalid(format!("tensor {shown} appears twice")));
            }
            drop(shown);
            tensors.push(TensorInfo { name, dims, ty, offset: data_offset + rel, size });
        }

        Ok(Gguf { version, metadata, tensors, alignment, data_offset, bytes })
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(MetaValue::as_str)
    }

    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(MetaValue::as_u64)
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(MetaValue::as_f64)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The bytes of a tensor; in bounds by construction (checked in `parse`).
    pub fn tensor_data(&self, t: &TensorInfo) -> &'a [u8] {
        &self.bytes[t.offset as usize..(t.offset + t.size) as usize]
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

/// A key or tensor name as error messages show it: control characters escaped and at
/// most 64 characters, so that a corrupt length cannot turn one error line into
/// megabytes of the file's contents.
pub(crate) fn label(s: &str) -> Cow<'_, str> {
    const MAX: usize = 64;
    if s.len() <= MAX && !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    Cow::Owned(out)
}

fn bound(n: u64, remaining: usize, min: usize, what: &str) -> Result<usize> {
    if n > (remaining / min) as u64 {
        return Err(Error::invalid(format!(
            "{what} {n} is larger than the {remaining} remaining bytes can hold (the file is truncated or corrupt)"
        )));
    }
    Ok(n as usize)
}

pub(crate) fn align_up(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? / a * a)
}

/// Builds a GGUF v3 file in memory: synthetic models for tests, and (later) exporters.
#[derive(Debug, Default, Clone)]
pub struct GgufBuilder {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    alignment: u64,
}

impl GgufBuilder {
    pub fn new() -> Self {
        GgufBuilder { alignment: DEFAULT_ALIGNMENT, ..Default::default() }
    }

    pub fn meta(mut self, key: &str, v: MetaValue) -> Self {
        if key == "general.alignment" {
            if let Some(a) = v.as_u64() {
                self.alignment = a;
            }
        }
        self.metadata.push((key.into(), v));
        self
    }

    /// Add a tensor from its raw block bytes; the size must match `dims` and `ty`.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Result<Self> {
        if let GgmlType::Fine(ft) = ty {
            return Err(Error::invalid(format!("tensor {name}: {ft} exists only in .cairn files, not in GGUF")));
        }
        let n: u64 = dims.iter().product();
        let want = ty.row_bytes(dims[0])? * (n / dims[0].max(1));
        if want != data.len() as u64 {
            return Err(Error::invalid(format!("tensor {name}: {} bytes given, {want} expected", data.len())));
        }
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        Ok(self)
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut out, v);
        }
        let a = self.alignment.max(1);
        let mut rel = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.id().to_le_bytes());
            out.extend_from_slice(&rel.to_le_bytes());
            offsets.push(rel);
            rel = align_up(rel + data.len() as u64, a).unwrap_or(u64::MAX);
        }
        pad_to(&mut out, a);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off as usize, 0);
            out.extend_from_slice(data);
        }
        pad_to(&mut out, a);
        out
    }
}

fn pad_to(out: &mut Vec<u8>, a: u64) {
    let len = align_up(out.len() as u64, a).unwrap_or(out.len() as u64);
    out.resize(len as usize, 0);
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::Array(a) => {
            out.extend_from_slice(&a.elem_type().to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            match a {
                MetaArray::Strings(p) => p.iter().for_each(|s| put_str(out, s)),
                MetaArray::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::I32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::Values(v) => v.iter().for_each(|x| put_value(out, x)),
            }
        }
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
