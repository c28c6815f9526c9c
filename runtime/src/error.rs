//! The runtime's error type: one enum, each variant a message a user can act on.

use std::fmt;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// Reading or mapping a file failed.
    Io { path: PathBuf, source: std::io::Error },
    /// The bytes of a model file are malformed.
    Format { path: PathBuf, source: cairn_formats::Error },
    /// The file is well formed but describes a model Cairn cannot run.
    Model(String),
    /// A request that cannot be served: bad ids, prompt longer than the context, ...
    Input(String),
    /// Anything the tokenizer or template layer reports.
    Text(String),
    /// Fetching a model failed.
    Fetch(String),
    /// An energy counter is absent, unreadable, or reads nonsense.
    Energy(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A copy to hand on (to each request of a failed batch): the message survives, an
    /// I/O source does not (it cannot be cloned).
    pub fn clone_msg(&self) -> Error {
        match self {
            Error::Input(m) => Error::Input(m.clone()),
            Error::Text(m) => Error::Text(m.clone()),
            other => Error::Model(other.to_string()),
        }
    }

    pub fn model(msg: impl Into<String>) -> Self {
        Error::Model(msg.into())
    }
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Format { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Model(m) | Error::Input(m) | Error::Text(m) | Error::Fetch(m) | Error::Energy(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            Error::Format { source, .. } => Some(source),
            _ => None,
        }
    }
}
