//! The one error type of the filter crate: a small kind, context, source.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarsely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system refused an operation.
    Io,
    /// The configuration or command line is wrong.
    Config,
    /// The ring or the tracking metadata refused an operation.
    Tracking,
    /// A control-socket request or answer is malformed.
    Control,
}

/// An error with its kind, message, file and source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
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
            source: None,
        }
    }

    /// An I/O error during `operation`.
    pub fn io(source: io::Error, operation: &str) -> Self {
        Error {
            kind: ErrorKind::Io,
            message: format!("{operation}: {source}"),
            path: None,
            source: Some(Box::new(source)),
        }
    }

    /// A configuration error.
    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// A control-protocol error.
    pub fn control(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Control, message)
    }

    /// Attach the file the error is about (the innermost wins).
    pub fn with_path(mut self, path: &Path) -> Self {
        self.path.get_or_insert_with(|| path.to_path_buf());
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl From<ferry_ring::Error> for Error {
    fn from(e: ferry_ring::Error) -> Self {
        Error {
            kind: ErrorKind::Tracking,
            message: e.to_string(),
            path: None,
            source: Some(Box::new(e)),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
