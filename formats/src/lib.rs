//! Byte-level model formats for Cairn.
//!
//! Everything here works on `&[u8]` and allocates only through `alloc`: no files, no
//! threads, no devices. That keeps the parsers usable from any host (phones, WASM, a
//! fuzzer) and makes every size and offset check local and testable.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
extern crate no_std_compat as std;

pub mod bitstack;
pub mod container;
pub mod error;
pub mod fine;
pub mod gguf;
pub mod hash;
pub mod quant;
pub mod types;

pub use container::{CairnBuilder, CairnFile};
pub use error::{Error, Result};
pub use fine::FineType;
pub use gguf::{Gguf, GgufBuilder, MetaArray, MetaValue, Metadata, PackedStrings, TensorInfo};
pub use types::GgmlType;
