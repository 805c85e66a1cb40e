//! The one error type of the recovery-site receiver.
//!
//! An [`Error`] has a small [`ErrorKind`] for the caller to branch on and
//! context for the operator: the operation, the file and the byte offset
//! where it happened, a human-readable detail, and for sequence errors the
//! expected and received sequences.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, for the caller to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The operating system refused a read, write, sync, rename or delete.
    /// After a failed write or sync an open [`crate::Journal`] refuses
    /// further appends: reopen it (recovery decides what is durable).
    Io,
    /// On-disk data is damaged where it cannot be a torn tail: a bad segment
    /// header, a bad record followed by valid data, a missing segment, a
    /// broken sequence chain. Acknowledged data may be affected; nothing was
    /// dropped.
    Corrupt,
    /// The change set starts at or before the last durable sequence (a
    /// replay after a lost ack). Nothing was written; ack again with
    /// [`Error::expected_seq`], the last durable sequence.
    Duplicate,
    /// The change set does not continue the last durable one
    /// (`prev_end_seq` differs). Nothing was written; request a resync of
    /// the affected regions. [`Error::expected_seq`] is the last durable
    /// sequence, [`Error::received_seq`] the set's `prev_end_seq`.
    Gap,
    /// The request is invalid: bad disk name, change set of another disk,
    /// stale epoch, watermark beyond the durable sequence, unencodable set.
    InvalidInput,
    /// Replication of the host is stopped (it was failed over); the sender
    /// is refused until the host is protected again.
    Stopped,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Corrupt => "corrupt journal",
            ErrorKind::Duplicate => "duplicate change set",
            ErrorKind::Gap => "sequence gap",
            ErrorKind::InvalidInput => "invalid input",
            ErrorKind::Stopped => "replication stopped",
        })
    }
}

/// An error with its kind and context (boxed: one pointer on the happy path).
#[derive(Debug)]
pub struct Error(Box<Inner>);

#[derive(Debug)]
struct Inner {
    kind: ErrorKind,
    op: &'static str,
    detail: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
    expected: Option<u64>,
    received: Option<u64>,
    source: Option<io::Error>,
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` during operation `op`.
    pub fn new(kind: ErrorKind, op: &'static str, detail: impl Into<String>) -> Self {
        Error(Box::new(Inner {
            kind,
            op,
            detail: detail.into(),
            path: None,
            offset: None,
            expected: None,
            received: None,
            source: None,
        }))
    }

    /// An I/O error during `op` on `path`.
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        let mut e = Error::new(ErrorKind::Io, op, source.to_string()).at_path(path);
        e.0.source = Some(source);
        e
    }

    /// An image-library error during `op` (its message already names the
    /// file, offset and operation).
    pub fn image(op: &'static str, e: ferry_vhd::Error) -> Self {
        let kind = match e.kind() {
            ferry_vhd::ErrorKind::Io => ErrorKind::Io,
            ferry_vhd::ErrorKind::Corrupt => ErrorKind::Corrupt,
            _ => ErrorKind::InvalidInput,
        };
        Error::new(kind, op, e.to_string())
    }

    /// Corruption found by `op` in `path` at byte `offset`.
    pub fn corrupt(op: &'static str, path: &Path, offset: u64, detail: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, op, detail)
            .at_path(path)
            .at_offset(offset)
    }

    /// Attach a path.
    pub fn at_path(mut self, path: &Path) -> Self {
        self.0.path = Some(path.to_path_buf());
        self
    }

    /// Attach a byte offset.
    pub fn at_offset(mut self, offset: u64) -> Self {
        self.0.offset = Some(offset);
        self
    }

    /// Attach expected / received sequences.
    pub fn with_seqs(mut self, expected: Option<u64>, received: Option<u64>) -> Self {
        self.0.expected = expected;
        self.0.received = received;
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// The operation that failed (`"append"`, `"open"`, `"read"`, ...).
    pub fn operation(&self) -> &'static str {
        self.0.op
    }

    /// Human-readable detail.
    pub fn detail(&self) -> &str {
        &self.0.detail
    }

    /// The file involved, if any.
    pub fn path(&self) -> Option<&Path> {
        self.0.path.as_deref()
    }

    /// The byte offset in [`Error::path`], if known.
    pub fn offset(&self) -> Option<u64> {
        self.0.offset
    }

    /// For [`ErrorKind::Duplicate`] and [`ErrorKind::Gap`]: the last durable
    /// sequence of the journal.
    pub fn expected_seq(&self) -> Option<u64> {
        self.0.expected
    }

    /// For [`ErrorKind::Gap`]: the received `prev_end_seq`; for
    /// [`ErrorKind::Duplicate`]: the received `first_seq`.
    pub fn received_seq(&self) -> Option<u64> {
        self.0.received
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.0.op, self.0.kind, self.0.detail)?;
        if let Some(p) = &self.0.path {
            write!(f, " (file {}", p.display())?;
            if let Some(o) = self.0.offset {
                write!(f, ", offset {o}")?;
            }
            f.write_str(")")?;
        }
        if self.0.expected.is_some() || self.0.received.is_some() {
            let show = |v: Option<u64>| v.map_or_else(|| "none".to_string(), |v| v.to_string());
            write!(
                f,
                " [expected {}, received {}]",
                show(self.0.expected),
                show(self.0.received)
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0
            .source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
