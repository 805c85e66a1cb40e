//! The error of an API call (the client side; the HTTP codec's own errors
//! are [`crate::http::HttpError`], which the server maps to a status).

use std::fmt;

/// What went wrong with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The server URL is not `https://HOST[:PORT]`.
    Url,
    /// The server could not be reached, or the connection broke.
    Connect,
    /// TLS failed: a certificate not trusted, a CA that does not match its
    /// pinned fingerprint.
    Tls,
    /// The answer was not valid HTTP.
    Http,
    /// The server answered with an error (see [`Error::status`] and
    /// [`Error::api_kind`]).
    Api,
    /// A body could not be encoded or decoded.
    Decode,
}

/// An error of an API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    status: Option<u16>,
    api_kind: Option<String>,
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            status: None,
            api_kind: None,
        }
    }

    /// The server's error answer.
    pub fn api(status: u16, api_kind: String, message: String) -> Error {
        Error {
            kind: ErrorKind::Api,
            message,
            status: Some(status),
            api_kind: Some(api_kind),
        }
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The HTTP status of an [`ErrorKind::Api`] error.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The server's error kind (`forbidden`, `not-found`, ...).
    pub fn api_kind(&self) -> Option<&str> {
        self.api_kind.as_deref()
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.status, &self.api_kind) {
            (Some(status), Some(kind)) => write!(f, "server: {kind} ({status}): {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}
