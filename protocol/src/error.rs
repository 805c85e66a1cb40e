//! The crate's single error type.

use std::fmt;

/// What went wrong, in a few words a caller can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The input ended before a complete item could be read.
    Truncated,
    /// A length exceeds its limit (frame size, chunk size, string length, count).
    TooLarge,
    /// The frame magic is not `FRY1`.
    BadMagic,
    /// The frame or protocol version is not one this build speaks.
    UnsupportedVersion,
    /// The bytes are complete but inconsistent (bad checksum, bad enum value,
    /// invalid UTF-8, violated invariant, trailing bytes).
    Malformed,
    /// Sealing or opening failed: wrong key, nonce or associated data, or
    /// tampered ciphertext.
    Crypto,
    /// zstd compression or decompression failed, or a chunk decompressed to
    /// a size other than the one announced.
    Compression,
    /// An I/O error from the underlying reader or writer.
    Io,
    /// TLS setup or handshake failed: unusable certificate or key, peer
    /// not trusted, protocol error.
    Tls,
    /// Credentials are missing, malformed, unsafe (group/other access) or
    /// would be overwritten; a host or target name is invalid.
    Credentials,
    /// The peer closed the connection between frames (with or without a
    /// TLS close_notify): the normal end of a conversation.
    Closed,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrorKind::Truncated => "truncated",
            ErrorKind::TooLarge => "too large",
            ErrorKind::BadMagic => "bad magic",
            ErrorKind::UnsupportedVersion => "unsupported version",
            ErrorKind::Malformed => "malformed",
            ErrorKind::Crypto => "crypto",
            ErrorKind::Compression => "compression",
            ErrorKind::Io => "i/o",
            ErrorKind::Tls => "tls",
            ErrorKind::Credentials => "credentials",
            ErrorKind::Closed => "connection closed",
        };
        f.write_str(s)
    }
}

/// A protocol error: a kind plus a human-readable context.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {context}")]
pub struct Error {
    kind: ErrorKind,
    context: String,
    #[source]
    source: Option<std::io::Error>,
}

impl Error {
    /// A new error of `kind` with `context`.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The context text.
    pub fn context(&self) -> &str {
        &self.context
    }

    /// Prefix the context with `what` (outermost first).
    #[must_use]
    pub fn within(mut self, what: &str) -> Self {
        self.context = format!("{what}: {}", self.context);
        self
    }

    pub(crate) fn truncated(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Truncated, context)
    }

    pub(crate) fn too_large(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, context)
    }

    pub(crate) fn malformed(context: impl Into<String>) -> Self {
        Self::new(ErrorKind::Malformed, context)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ErrorKind::Truncated
        } else {
            ErrorKind::Io
        };
        Error {
            kind,
            context: e.to_string(),
            source: Some(e),
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_context() {
        let e = Error::new(ErrorKind::TooLarge, "frame 70 MiB").within("read_frame");
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        assert_eq!(e.to_string(), "too large: read_frame: frame 70 MiB");
    }

    #[test]
    fn io_eof_is_truncated() {
        let e: Error = std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into();
        assert_eq!(e.kind(), ErrorKind::Truncated);
        let e: Error = std::io::Error::from(std::io::ErrorKind::BrokenPipe).into();
        assert_eq!(e.kind(), ErrorKind::Io);
    }
}
