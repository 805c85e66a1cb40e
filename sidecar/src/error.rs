//! The sidecar's one error type: a small [`ErrorKind`] to branch on, plus
//! context (what was being done, which record) and the underlying cause.

use std::fmt;

/// What went wrong, for the caller to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The ring refused an operation (bad counters, stale ring, commit
    /// beyond what was delivered). Rewind, or reopen the ring.
    Ring,
    /// A record or its payload is damaged (payload checksum mismatch, a
    /// range that overflows or lies beyond the disk). Never shipped.
    Corrupt,
    /// Reading the backing device failed (metadata-state writes).
    Io,
    /// A single record does not fit in any change set.
    TooLarge,
    /// Building or sealing the change set failed (encoding, compression,
    /// encryption).
    Protocol,
    /// The link failed: the change set may or may not have reached the
    /// target. Rewind and send again (the target detects duplicates).
    Transport,
    /// The target answered but did not make the change set durable (an ack
    /// below the set, a refusal).
    Rejected,
    /// The target does not hold the set before this one: start a new epoch
    /// and resync.
    Gap,
    /// The filter's control socket failed or refused a request.
    Filter,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Ring => "ring error",
            ErrorKind::Corrupt => "corrupt record",
            ErrorKind::Io => "I/O error",
            ErrorKind::TooLarge => "too large",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Transport => "transport error",
            ErrorKind::Rejected => "rejected by the target",
            ErrorKind::Gap => "sequence gap at the target",
            ErrorKind::Filter => "filter control error",
        })
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error with its kind, context and cause.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Source>,
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` with `context`.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// A new error of `kind` with `context`, caused by `source`.
    pub fn with_source(
        kind: ErrorKind,
        context: impl Into<String>,
        source: impl Into<Source>,
    ) -> Self {
        Error {
            kind,
            context: context.into(),
            source: Some(source.into()),
        }
    }

    /// The kind, to branch on.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// What was being done.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// A ring error during `context` (Corrupt ring errors stay Corrupt).
    pub(crate) fn ring(context: impl Into<String>, e: ferry_ring::Error) -> Self {
        let kind = match e.kind() {
            ferry_ring::ErrorKind::Corrupt => ErrorKind::Corrupt,
            _ => ErrorKind::Ring,
        };
        Error::with_source(kind, context, e)
    }

    /// A protocol error during `context`.
    pub(crate) fn protocol(context: impl Into<String>, e: ferry_protocol::Error) -> Self {
        Error::with_source(ErrorKind::Protocol, context, e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.context)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}
