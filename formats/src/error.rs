//! The one error type of the format parsers.

use std::prelude::v1::*;

use core::fmt;

/// What went wrong while reading or writing bytes. Messages name the offending field so
/// that a user looking at a corrupt file knows where to look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The input ended before `what` could be read (at byte `offset`).
    Truncated { what: String, offset: usize },
    /// The file does not start with the expected magic bytes.
    BadMagic,
    /// A format version this reader does not know.
    UnsupportedVersion(u32),
    /// A tensor type id that is not a ggml type at all.
    UnknownType(u32),
    /// A known ggml type that Cairn has no kernels for.
    UnsupportedType(GgmlTypeName),
    /// Structurally invalid content: bad counts, offsets, shapes, strings.
    Invalid(String),
}

/// Name of a ggml type, kept as a string so the error stays `Eq` and printable.
pub type GgmlTypeName = &'static str;

pub type Result<T> = core::result::Result<T, Error>;

impl Error {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Truncated { what, offset } => {
                write!(f, "file is truncated: {what} at byte {offset} runs past the end")
            }
            Error::BadMagic => write!(f, "not a GGUF file (bad magic bytes)"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported GGUF version {v} (expected 2 or 3)"),
            Error::UnknownType(t) => write!(f, "unknown tensor type id {t}"),
            Error::UnsupportedType(t) => write!(f, "tensor type {t} is not supported"),
            Error::Invalid(m) => write!(f, "{m}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}
