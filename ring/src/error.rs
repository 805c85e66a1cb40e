//! The one error type of the ring crate: a small kind, the context (file,
//! offset, operation) and the source.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarsely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system refused an operation.
    Io,
    /// A ring or metadata file contradicts its format (magic, version, bounds).
    Corrupt,
    /// The caller asked for something impossible (bad geometry, range past the end).
    InvalidInput,
    /// The ring was recreated by a new producer: the consumer must reopen.
    Stale,
}

/// An error with its kind and context.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
    source: Option<io::Error>,
}

/// Result alias for the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            path: None,
            offset: None,
            source: None,
        }
    }

    /// An I/O error during `operation`.
    pub fn io(source: io::Error, operation: &str) -> Self {
        Error {
            kind: ErrorKind::Io,
            message: format!("{operation}: {source}"),
            path: None,
            offset: None,
            source: Some(source),
        }
    }

    /// A format violation.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// An impossible request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// Attach the file (the innermost wins).
    pub fn at_path(mut self, path: &Path) -> Self {
        self.path.get_or_insert_with(|| path.to_path_buf());
        self
    }

    /// Attach the byte offset (the innermost wins).
    pub fn at_offset(mut self, offset: u64) -> Self {
        self.offset.get_or_insert(offset);
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        if let Some(offset) = self.offset {
            write!(f, "at offset {offset}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
