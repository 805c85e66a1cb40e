//! The one error type of the image library.
//!
//! Every error carries a small [`ErrorKind`], the operation that failed, and
//! where it happened (file, byte offset) when that is known, so a message
//! such as `corrupt image: /x/a.vhd at offset 1536: BAT entry 3 points past
//! the end of the file (read BAT)` can be acted on without a debugger.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarsely: callers branch on this, humans read the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operating system refused an I/O operation.
    Io,
    /// The image's own bytes contradict the format (checksums, tables, bounds).
    Corrupt,
    /// A valid image or request that this library does not handle.
    Unsupported,
    /// The caller asked for something impossible (bad size, range past the end).
    InvalidInput,
    /// A differencing image's parent cannot be found or does not match.
    Parent,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidInput => "invalid request",
            ErrorKind::Parent => "parent image problem",
        }
    }
}

/// An error with its kind, context and (for I/O) the source error.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
    operation: Option<&'static str>,
    source: Option<io::Error>,
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a human-readable message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            path: None,
            offset: None,
            operation: None,
            source: None,
        }
    }

    /// The image contradicts its format.
    pub fn corrupt(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, message)
    }

    /// The request is not supported by this format or this library.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// The caller's request is invalid.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, message)
    }

    /// An I/O error during `operation`.
    pub fn io(source: io::Error, operation: &'static str) -> Self {
        Error {
            kind: ErrorKind::Io,
            message: source.to_string(),
            path: None,
            offset: None,
            operation: Some(operation),
            source: Some(source),
        }
    }

    /// Attach the file the error is about (kept if already set: the innermost file wins).
    pub fn at_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    /// Attach the byte offset the error is about (the innermost offset wins).
    pub fn at_offset(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// Attach the operation that was being performed.
    pub fn during(mut self, operation: &'static str) -> Self {
        if self.operation.is_none() {
            self.operation = Some(operation);
        }
        self
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The file the error is about, if known.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The byte offset the error is about, if known.
    pub fn offset(&self) -> Option<u64> {
        self.offset
    }

    /// The bare message, without context.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.kind.describe())?;
        if let Some(path) = &self.path {
            write!(f, ": {}", path.display())?;
        }
        if let Some(offset) = self.offset {
            write!(f, " at offset {offset}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(op) = self.operation {
            write!(f, " ({op})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// Extension to attach context to results in one call.
pub(crate) trait Context<T> {
    /// Attach a path to the error, if any.
    fn path_ctx(self, path: &Path) -> Result<T>;
}

impl<T> Context<T> for Result<T> {
    fn path_ctx(self, path: &Path) -> Result<T> {
        self.map_err(|e| e.at_path(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_offset_and_operation() {
        let e = Error::corrupt("BAT entry 3 points past the end")
            .at_offset(1536)
            .during("read BAT")
            .at_path(Path::new("/x/a.vhd"));
        assert_eq!(
            e.to_string(),
            "corrupt image: /x/a.vhd at offset 1536: BAT entry 3 points past the end (read BAT)"
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn innermost_context_wins() {
        let e = Error::corrupt("x")
            .at_path(Path::new("/child"))
            .at_path(Path::new("/parent"));
        assert_eq!(e.path(), Some(Path::new("/child")));
    }
}
