//! The one error type of the control-plane server.
//!
//! An [`Error`] has a small [`ErrorKind`] that decides the HTTP status
//! ([`ErrorKind::http_status`], the one place that mapping lives), the
//! operation that failed and a detail for the operator, and the source.

use std::fmt;

/// What went wrong, for the caller (and the HTTP status) to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No credentials, or credentials the server does not know.
    Unauthenticated,
    /// Known credentials that may not do this (host A touching host B).
    Forbidden,
    /// The named entity does not exist.
    NotFound,
    /// The request contradicts the current state (a name taken, a
    /// transition the lifecycle does not allow, a token already used).
    Conflict,
    /// The request is malformed or a value is out of range.
    Invalid,
    /// The database failed or holds something this version cannot read.
    Db,
    /// The file system refused (credentials, data directory).
    Io,
    /// Issuing or reading certificates and keys failed.
    Credentials,
}

impl ErrorKind {
    /// The HTTP status an API answer with this error carries.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Invalid => 422,
            ErrorKind::Db | ErrorKind::Io | ErrorKind::Credentials => 500,
        }
    }

    /// Stable lower-case name, sent as `error.kind` in API answers.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Db => "database",
            ErrorKind::Io => "io",
            ErrorKind::Credentials => "credentials",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with its kind, operation, detail and source.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    op: &'static str,
    detail: String,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind` during `op`.
    pub fn new(kind: ErrorKind, op: &'static str, detail: impl Into<String>) -> Self {
        Error {
            kind,
            op,
            detail: detail.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The operation that failed.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// The detail, without the operation or the source.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// A database error during `op`.
    pub(crate) fn db(op: &'static str) -> impl Fn(rusqlite::Error) -> Error {
        move |e| Error::new(ErrorKind::Db, op, e.to_string()).with_source(e)
    }

    /// An I/O error during `op` on `what`.
    pub(crate) fn io(op: &'static str, what: String) -> impl Fn(std::io::Error) -> Error {
        move |e| Error::new(ErrorKind::Io, op, format!("{what}: {e}")).with_source(e)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.detail)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<ferry_protocol::Error> for Error {
    fn from(e: ferry_protocol::Error) -> Self {
        Error::new(ErrorKind::Credentials, "credentials", e.to_string()).with_source(e)
    }
}
