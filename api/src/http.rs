//! A minimal, strict HTTP/1.1 codec for the control-plane API.
//!
//! The control plane is JSON over HTTP/1.1 over TLS at low request rates,
//! and ferry owns both ends (the server, the CLI and the daemons), so this
//! module implements only the subset of HTTP/1.1 those ends speak, and
//! refuses the rest loudly instead of half-supporting it:
//!
//! * **Framing by `Content-Length` only.** Every request and every response
//!   ferry writes carries `Content-Length` (also `0`). `Transfer-Encoding`
//!   (chunked or anything else) is refused with
//!   [`HttpErrorKind::NotImplemented`] (501): chunked decoding is where most
//!   request-smuggling bugs live, and we never need streaming bodies.
//!   `POST`/`PUT` without a length are refused with
//!   [`HttpErrorKind::LengthRequired`] (411); `GET`/`DELETE` without one
//!   have an empty body. A response without a length is read to EOF (HTTP/1.0
//!   style), bounded by [`MAX_BODY_BYTES`].
//! * **Keep-alive.** A connection carries any number of requests in turn
//!   (pipelining works too): [`read_request`] never consumes a byte past the
//!   end of the request it returns, and returns `Ok(None)` when the peer
//!   closes an idle connection. `Connection: close` is honoured through
//!   [`Request::wants_close`] and the `close` flag of [`write_response`].
//!   An HTTP/1.0 message that does not ask for keep-alive is normalised to
//!   carry `connection: close`, so callers need not know about versions.
//! * **Four methods:** `GET`, `POST`, `PUT`, `DELETE`; anything else is
//!   [`HttpErrorKind::MethodNotAllowed`] (405).
//! * **Origin-form targets only** (`/path?query`): absolute-form,
//!   authority-form and `*` are refused, as are fragments. The path is
//!   percent-decoded into UTF-8 and may not contain `..` segments or control
//!   characters; the query is decoded into ordered `(name, value)` pairs
//!   (`+` means space).
//! * **Hard limits, checked before allocating:** [`MAX_HEAD_BYTES`],
//!   [`MAX_HEADERS`] and [`MAX_BODY_BYTES`].
//! * **Versions:** `HTTP/1.1` and `HTTP/1.0` only; no `Expect: 100-continue`,
//!   no upgrades, no trailers, no obsolete header line folding.
//!
//! Head parsing is delegated to `httparse` (no allocation, no I/O); this
//! module owns reading, framing, limits and decoding. It works over any
//! [`BufRead`]/[`Write`]: the caller wraps its TLS stream. Routing and
//! authentication live elsewhere.
//!
//! After any [`HttpError`] the connection's framing is lost: the caller
//! answers with [`HttpError::status`] where that makes sense and closes the
//! connection. The writers refuse (with [`io::ErrorKind::InvalidInput`]) to
//! send anything the readers would refuse, so a ferry peer never sees a
//! message it cannot parse, and `read_request(write_request(x))` gives `x`
//! back (plus the `host` and `content-length` headers the writer adds).

use std::fmt;
use std::io::{self, BufRead, Read, Write};

/// Maximum size in bytes of a message head: the request or status line plus
/// all header lines and the blank line ending them (leading empty lines
/// count too). Our heads are a few hundred bytes; 16 KiB leaves room for
/// long tokens while bounding what an unauthenticated peer can make us
/// buffer. Exceeding it is [`HttpErrorKind::HeadTooLarge`] (431).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Maximum number of header fields in one message (each repeated field
/// counts). More is [`HttpErrorKind::HeadTooLarge`] (431). This is also the
/// size of the on-stack array handed to `httparse`.
pub const MAX_HEADERS: usize = 64;

/// Maximum size in bytes of a message body. Control-plane bodies are small
/// JSON documents; bulk data never travels here. A larger `Content-Length`
/// is [`HttpErrorKind::BodyTooLarge`] (413), refused before any allocation.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How much body buffer is reserved up front: a peer announcing a large
/// `Content-Length` and sending nothing costs at most this much; beyond it
/// the buffer grows only as bytes actually arrive.
const BODY_RESERVE: usize = 64 * 1024;

/// The request methods the control-plane API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`: read a resource; no body expected.
    Get,
    /// `POST`: create or act; body required (may be empty with length 0).
    Post,
    /// `PUT`: replace a resource; body required.
    Put,
    /// `DELETE`: remove a resource.
    Delete,
}

impl Method {
    /// The method's token as it appears on the wire, e.g. `"GET"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }

    /// Parses a wire token; methods are case-sensitive (RFC 9110 9.1).
    fn from_token(token: &str) -> Option<Method> {
        match token {
            "GET" => Some(Method::Get),
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }

    /// Whether a request with this method must announce its body length.
    fn requires_length(self) -> bool {
        matches!(self, Method::Post | Method::Put)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One HTTP request, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request method.
    pub method: Method,
    /// The percent-decoded path without the query; starts with `/`, has no
    /// `..` segments and no control characters (when read from the wire).
    pub path: String,
    /// The decoded query pairs in wire order (`+` decoded as space); a
    /// piece without `=` has an empty value, empty pieces are skipped.
    pub query: Vec<(String, String)>,
    /// The header fields in wire order: names lower-cased, values trimmed
    /// of surrounding spaces and tabs.
    pub headers: Vec<(String, String)>,
    /// The body bytes (exactly `Content-Length` of them).
    pub body: Vec<u8>,
}

impl Request {
    /// A request with no headers and an empty body, for the client side.
    ///
    /// `path_and_query` is split at the first `?` and decoded the way
    /// [`read_request`] would decode it, so `Request::new(m, t)` equals what
    /// the server reads for the target `t`. A piece with invalid
    /// percent-encoding is kept verbatim instead (this constructor cannot
    /// fail); [`write_request`] then encodes it so it arrives as given. The
    /// path is not validated here: [`write_request`] refuses invalid ones.
    pub fn new(method: Method, path_and_query: &str) -> Request {
        let (raw_path, raw_query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, query),
            None => (path_and_query, ""),
        };
        let path = percent_decode(raw_path, false).unwrap_or_else(|_| raw_path.to_owned());
        let query = query_pieces(raw_query)
            .map(|(name, value)| (decode_lossy(name), decode_lossy(value)))
            .collect();
        Request {
            method,
            path,
            query,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// The value of the first query parameter named exactly `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The non-empty path segments: `"/v1/hosts/web01"` gives
    /// `["v1", "hosts", "web01"]` (and `"//a/"` gives `["a"]`).
    pub fn segments(&self) -> Vec<&str> {
        self.path.split('/').filter(|s| !s.is_empty()).collect()
    }

    /// The token of an `Authorization: Bearer <token>` header (scheme
    /// matched case-insensitively); `None` without the header, for another
    /// scheme, or for an empty or malformed token.
    pub fn bearer_token(&self) -> Option<&str> {
        let value = self.header("authorization")?;
        let (scheme, rest) = value.split_once([' ', '\t'])?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = rest.trim_matches([' ', '\t']);
        // A token is one word (RFC 6750 b64token); anything with inner
        // whitespace is not a bearer credential we issued.
        if token.is_empty() || token.contains([' ', '\t']) {
            return None;
        }
        Some(token)
    }

    /// Whether the client asked to close the connection after this request
    /// (a `close` token in any `Connection` header, case-insensitive; an
    /// HTTP/1.0 request without keep-alive reads as such too).
    pub fn wants_close(&self) -> bool {
        has_connection_token(&self.headers, "close")
    }
}

/// One HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code (100..=599).
    pub status: u16,
    /// The header fields: names lower-cased when read from the wire.
    pub headers: Vec<(String, String)>,
    /// The body bytes.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON response: `content-type: application/json` and the compact
    /// serialisation of `value` followed by a newline (friendly to curl).
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        // Serialising a `Value` into a Vec cannot fail: its map keys are
        // always strings and writing to memory does no I/O. The fallback
        // only keeps this function total.
        let mut body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
        body.push(b'\n');
        Response {
            status,
            headers: vec![("content-type".to_owned(), "application/json".to_owned())],
            body,
        }
    }

    /// A plain-text response: `content-type: text/plain; charset=utf-8`.
    pub fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: vec![(
                "content-type".to_owned(),
                "text/plain; charset=utf-8".to_owned(),
            )],
            body: body.as_bytes().to_vec(),
        }
    }

    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Whether the server announced it closes the connection after this
    /// response (a `close` token in `Connection`; also an HTTP/1.0 response
    /// without keep-alive). The client must not reuse the connection then.
    pub fn wants_close(&self) -> bool {
        has_connection_token(&self.headers, "close")
    }
}

/// The standard reason phrase for the status codes the API uses; `"Unknown"`
/// for any other code (the phrase is informational only, RFC 9112 4).
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// What went wrong reading a message; each kind maps to a status code
/// through [`HttpError::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpErrorKind {
    /// Malformed message: syntax, version, target, encoding, framing
    /// headers (also used for malformed responses on the client side).
    BadRequest,
    /// A request method other than GET, POST, PUT, DELETE.
    MethodNotAllowed,
    /// The head exceeds [`MAX_HEAD_BYTES`] or [`MAX_HEADERS`].
    HeadTooLarge,
    /// The body exceeds [`MAX_BODY_BYTES`].
    BodyTooLarge,
    /// A POST or PUT without `Content-Length`.
    LengthRequired,
    /// A feature this codec deliberately lacks (`Transfer-Encoding`).
    NotImplemented,
    /// The transport failed (including read timeouts).
    Io,
    /// The peer closed the connection in the middle of a message.
    Closed,
}

impl fmt::Display for HttpErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpErrorKind::BadRequest => "malformed HTTP message",
            HttpErrorKind::MethodNotAllowed => "method not allowed",
            HttpErrorKind::HeadTooLarge => "HTTP head too large",
            HttpErrorKind::BodyTooLarge => "HTTP body too large",
            HttpErrorKind::LengthRequired => "Content-Length required",
            HttpErrorKind::NotImplemented => "not implemented",
            HttpErrorKind::Io => "I/O error",
            HttpErrorKind::Closed => "connection closed mid-message",
        })
    }
}

/// A failure to read an HTTP message: what kind, a human context, and the
/// underlying I/O error for [`HttpErrorKind::Io`] (and for
/// [`HttpErrorKind::Closed`] when the transport reported the EOF as an error).
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {context}")]
pub struct HttpError {
    /// The category, deciding the status code.
    pub kind: HttpErrorKind,
    /// What was being read or which rule was broken.
    pub context: String,
    /// The transport error, if one caused this.
    #[source]
    pub source: Option<io::Error>,
}

impl HttpError {
    /// The status code to answer with: 400, 405, 431, 413, 411 or 501.
    /// `Io` and `Closed` give 400, but the caller normally just drops the
    /// connection for those since the peer is gone or stuck.
    pub fn status(&self) -> u16 {
        match self.kind {
            HttpErrorKind::BadRequest => 400,
            HttpErrorKind::MethodNotAllowed => 405,
            HttpErrorKind::HeadTooLarge => 431,
            HttpErrorKind::BodyTooLarge => 413,
            HttpErrorKind::LengthRequired => 411,
            HttpErrorKind::NotImplemented => 501,
            HttpErrorKind::Io | HttpErrorKind::Closed => 400,
        }
    }

    /// An error without a transport cause.
    fn new(kind: HttpErrorKind, context: impl Into<String>) -> HttpError {
        HttpError {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// Shorthand for the commonest kind.
    fn bad(context: impl Into<String>) -> HttpError {
        HttpError::new(HttpErrorKind::BadRequest, context)
    }

    /// A transport error while reading `what`. An `UnexpectedEof` error (as
    /// rustls reports a peer vanishing without close_notify) is the peer
    /// going away, i.e. `Closed`, like a plain EOF.
    fn transport(what: &str, err: io::Error) -> HttpError {
        let kind = if err.kind() == io::ErrorKind::UnexpectedEof {
            HttpErrorKind::Closed
        } else {
            HttpErrorKind::Io
        };
        HttpError {
            kind,
            context: format!("reading {what}"),
            source: Some(err),
        }
    }
}

/// Reads one request from `r`.
///
/// Returns `Ok(None)` on EOF before the first byte of a request (the peer
/// closed an idle keep-alive connection; leading empty lines do not count as
/// a request). EOF anywhere inside a request is [`HttpErrorKind::Closed`]; a
/// transport error, including a read timeout before the first byte, is
/// [`HttpErrorKind::Io`] so the caller decides. On success exactly the
/// request's bytes have been consumed: the next pipelined request stays in
/// `r`.
pub fn read_request<R: BufRead>(r: &mut R) -> Result<Option<Request>, HttpError> {
    let Some(head) = read_head(r, "the request head")? else {
        return Ok(None);
    };
    let head = parse_request_head(&head)?;
    let body = match content_length(&head.headers)? {
        Some(len) => read_body(r, len)?,
        None if head.method.requires_length() => {
            return Err(HttpError::new(
                HttpErrorKind::LengthRequired,
                format!("{} without Content-Length", head.method),
            ))
        }
        None => Vec::new(),
    };
    Ok(Some(Request {
        method: head.method,
        path: head.path,
        query: head.query,
        headers: head.headers,
        body,
    }))
}

/// Writes `req` as an HTTP/1.1 request for `host`, then flushes.
///
/// Writes the request line (path and query percent-encoded as needed so the
/// reader decodes them back exactly), `Host: host`, `Content-Length` (always,
/// also 0), the request's own headers, and the body. Request headers named
/// `host` or `content-length` are skipped (the writer owns framing), and
/// the writer refuses with [`io::ErrorKind::InvalidInput`] anything
/// [`read_request`] would refuse: an invalid path, a `transfer-encoding`
/// header, a header name that is not a token, a value with control
/// characters (header injection), or a message over the limits.
pub fn write_request<W: Write>(w: &mut W, req: &Request, host: &str) -> io::Result<()> {
    check_path(&req.path).map_err(invalid_input)?;
    check_field_value(host)?;
    if req.body.len() > MAX_BODY_BYTES {
        return Err(invalid_input("request body exceeds MAX_BODY_BYTES"));
    }
    let mut head = String::with_capacity(256);
    head.push_str(req.method.as_str());
    head.push(' ');
    encode_target(&req.path, &req.query, &mut head);
    head.push_str(" HTTP/1.1\r\n");
    push_field(&mut head, "Host", host);
    push_field(&mut head, "Content-Length", &req.body.len().to_string());
    let count = push_own_fields(&mut head, &req.headers, &["host", "content-length"])?;
    finish_head(&mut head, count + 2)?;
    w.write_all(head.as_bytes())?;
    w.write_all(&req.body)?;
    w.flush()
}

/// Reads one response from `r`.
///
/// Accepts `HTTP/1.1` and `HTTP/1.0` status lines with a code in 100..=599.
/// 1xx, 204 and 304 responses have no body; otherwise the body is
/// `Content-Length` bytes, or, without a length, everything up to EOF
/// (bounded by [`MAX_BODY_BYTES`]). `Transfer-Encoding` is
/// [`HttpErrorKind::NotImplemented`]. EOF before or inside the response is
/// [`HttpErrorKind::Closed`].
pub fn read_response<R: BufRead>(r: &mut R) -> Result<Response, HttpError> {
    let Some(head) = read_head(r, "the response head")? else {
        return Err(HttpError::new(
            HttpErrorKind::Closed,
            "connection closed before the response",
        ));
    };
    let (status, headers) = parse_response_head(&head)?;
    let body = if status_has_no_body(status) {
        Vec::new()
    } else {
        match content_length(&headers)? {
            Some(len) => read_body(r, len)?,
            None => read_to_eof(r)?,
        }
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Writes `resp` as an HTTP/1.1 response, then flushes.
///
/// Writes the status line (with [`reason`]), `Content-Length` (except for
/// 1xx, 204 and 304, which have no body), `Connection: close` when `close`,
/// the response's own headers, and the body. Response headers named
/// `content-length` or `connection` are skipped (framing and the `close`
/// flag decide those). Refuses with [`io::ErrorKind::InvalidInput`] what
/// [`read_response`] would refuse: a status outside 100..=599, a body on a
/// bodiless status, a `transfer-encoding` header, an invalid header name or
/// value, or a message over the limits.
pub fn write_response<W: Write>(w: &mut W, resp: &Response, close: bool) -> io::Result<()> {
    if !(100..=599).contains(&resp.status) {
        return Err(invalid_input("status code outside 100..=599"));
    }
    let bodiless = status_has_no_body(resp.status);
    if bodiless && !resp.body.is_empty() {
        return Err(invalid_input("status does not allow a body"));
    }
    if resp.body.len() > MAX_BODY_BYTES {
        return Err(invalid_input("response body exceeds MAX_BODY_BYTES"));
    }
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    let mut count = 0;
    if !bodiless {
        push_field(&mut head, "Content-Length", &resp.body.len().to_string());
        count += 1;
    }
    if close {
        push_field(&mut head, "Connection", "close");
        count += 1;
    }
    count += push_own_fields(&mut head, &resp.headers, &["content-length", "connection"])?;
    finish_head(&mut head, count)?;
    w.write_all(head.as_bytes())?;
    w.write_all(&resp.body)?;
    w.flush()
}

// ---------------------------------------------------------------------------
// Reading the head
// ---------------------------------------------------------------------------

/// Finds the end of a head in a byte stream fed in arbitrary pieces.
///
/// Leading CR/LF bytes are skipped (RFC 9112 2.2 asks servers to ignore
/// empty lines before a request; some clients send a CRLF after a body) but
/// count towards [`MAX_HEAD_BYTES`]. The head ends at the first empty line:
/// `\n\n` or `\n\r\n`, which covers CRLF and bare-LF line endings, both of
/// which `httparse` accepts.
#[derive(Debug, Default)]
struct HeadScanner {
    /// The head bytes so far, from the first non-empty line on.
    head: Vec<u8>,
    /// Leading CR/LF bytes skipped.
    skipped: usize,
    /// Where we are relative to line ends.
    state: LineState,
}

/// The tail of the head seen so far, as far as finding its end goes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum LineState {
    /// Inside a line.
    #[default]
    InLine,
    /// Right after a LF: at the start of a line.
    LineStart,
    /// After LF then CR: an empty line if a LF follows.
    LineStartCr,
}

impl HeadScanner {
    /// Feeds `buf`; returns how many bytes of it belong to the head and
    /// whether the head is now complete. Never takes a byte past the end.
    fn feed(&mut self, buf: &[u8]) -> Result<(usize, bool), HttpError> {
        for (i, &b) in buf.iter().enumerate() {
            if self.skipped + self.head.len() >= MAX_HEAD_BYTES {
                return Err(HttpError::new(
                    HttpErrorKind::HeadTooLarge,
                    format!("head exceeds {MAX_HEAD_BYTES} bytes"),
                ));
            }
            if self.head.is_empty() && (b == b'\r' || b == b'\n') {
                self.skipped += 1;
                continue;
            }
            self.head.push(b);
            if self.step(b) {
                return Ok((i + 1, true));
            }
        }
        Ok((buf.len(), false))
    }

    /// Advances the line state by one byte; true at the end of the head.
    fn step(&mut self, b: u8) -> bool {
        self.state = match (self.state, b) {
            (LineState::LineStart | LineState::LineStartCr, b'\n') => return true,
            (_, b'\n') => LineState::LineStart,
            (LineState::LineStart, b'\r') => LineState::LineStartCr,
            _ => LineState::InLine,
        };
        false
    }

    /// Whether any byte of a message has been seen.
    fn started(&self) -> bool {
        !self.head.is_empty()
    }
}

/// Reads one head (up to and including its empty line) without consuming
/// anything after it. `Ok(None)` on EOF before the first byte of a message.
fn read_head<R: BufRead>(r: &mut R, what: &str) -> Result<Option<Vec<u8>>, HttpError> {
    let mut scanner = HeadScanner::default();
    loop {
        let buf = match r.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && !scanner.started() => {
                // The peer vanished between messages: nothing was lost.
                return Ok(None);
            }
            Err(e) => return Err(HttpError::transport(what, e)),
        };
        if buf.is_empty() {
            if scanner.started() {
                return Err(HttpError::new(
                    HttpErrorKind::Closed,
                    format!("EOF inside {what}"),
                ));
            }
            return Ok(None);
        }
        let (used, done) = scanner.feed(buf)?;
        r.consume(used);
        if done {
            return Ok(Some(scanner.head));
        }
    }
}

/// The parts of a request head, decoded and checked.
#[derive(Debug)]
struct RequestHead {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: Vec<(String, String)>,
}

/// Parses and checks a complete request head.
fn parse_request_head(head: &[u8]) -> Result<RequestHead, HttpError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    check_parsed(req.parse(head), head.len())?;
    let token = req.method.unwrap_or_default();
    let method = Method::from_token(token).ok_or_else(|| {
        HttpError::new(
            HttpErrorKind::MethodNotAllowed,
            format!("method {token:?} is not supported"),
        )
    })?;
    let (path, query) = parse_target(req.path.unwrap_or_default())?;
    let mut headers = collect_headers(req.headers)?;
    normalise_version(req.version, &mut headers)?;
    refuse_transfer_encoding(&headers)?;
    Ok(RequestHead {
        method,
        path,
        query,
        headers,
    })
}

/// Parses and checks a complete response head: the status and the headers.
fn parse_response_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>), HttpError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    check_parsed(resp.parse(head), head.len())?;
    let status = resp.code.unwrap_or_default();
    if !(100..=599).contains(&status) {
        return Err(HttpError::bad(format!("status code {status} out of range")));
    }
    let mut headers = collect_headers(resp.headers)?;
    normalise_version(resp.version, &mut headers)?;
    refuse_transfer_encoding(&headers)?;
    Ok((status, headers))
}

/// Maps `httparse`'s verdict on a head we know is complete. Partial, or a
/// head ending before our scanner's end, means an odd line structure (for
/// example a bare CR) and is malformed.
fn check_parsed(parsed: httparse::Result<usize>, len: usize) -> Result<(), HttpError> {
    match parsed {
        Ok(httparse::Status::Complete(n)) if n == len => Ok(()),
        Ok(_) => Err(HttpError::bad("malformed head")),
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::new(
            HttpErrorKind::HeadTooLarge,
            format!("more than {MAX_HEADERS} header fields"),
        )),
        Err(e) => Err(HttpError::bad(e.to_string())),
    }
}

/// Converts parsed header fields: names lower-cased (httparse has checked
/// they are tokens), values UTF-8 and trimmed.
fn collect_headers(fields: &[httparse::Header<'_>]) -> Result<Vec<(String, String)>, HttpError> {
    fields
        .iter()
        .map(|field| {
            let value = std::str::from_utf8(field.value).map_err(|_| {
                HttpError::bad(format!("value of header {:?} is not UTF-8", field.name))
            })?;
            Ok((
                field.name.to_ascii_lowercase(),
                value.trim_matches([' ', '\t']).to_owned(),
            ))
        })
        .collect()
}

/// Applies HTTP/1.0 semantics so callers need not track versions: without
/// a `keep-alive` token the connection closes after the message, which we
/// record as a `connection: close` header.
fn normalise_version(
    version: Option<u8>,
    headers: &mut Vec<(String, String)>,
) -> Result<(), HttpError> {
    match version {
        Some(1) => Ok(()),
        Some(0) => {
            if !has_connection_token(headers, "keep-alive")
                && !has_connection_token(headers, "close")
            {
                headers.push(("connection".to_owned(), "close".to_owned()));
            }
            Ok(())
        }
        // httparse only accepts 1.0 and 1.1; this keeps the match total.
        _ => Err(HttpError::bad("unsupported HTTP version")),
    }
}

/// Refuses any `Transfer-Encoding`: we frame by length only, and a message
/// with both would be a request-smuggling vector.
fn refuse_transfer_encoding(headers: &[(String, String)]) -> Result<(), HttpError> {
    match find_header(headers, "transfer-encoding") {
        Some(value) => Err(HttpError::new(
            HttpErrorKind::NotImplemented,
            format!("Transfer-Encoding {value:?} is not supported; send Content-Length"),
        )),
        None => Ok(()),
    }
}

/// The body length from `Content-Length`, checked against
/// [`MAX_BODY_BYTES`]. Every occurrence must be a plain decimal and all must
/// agree (RFC 9112 6.3); a value beyond `u64` is simply too large.
fn content_length(headers: &[(String, String)]) -> Result<Option<usize>, HttpError> {
    let mut length: Option<u64> = None;
    for (_, value) in headers.iter().filter(|(n, _)| n == "content-length") {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::bad(format!("invalid Content-Length {value:?}")));
        }
        let this = value.parse::<u64>().unwrap_or(u64::MAX);
        match length {
            Some(previous) if previous != this => {
                return Err(HttpError::bad("conflicting Content-Length headers"));
            }
            _ => length = Some(this),
        }
    }
    let Some(length) = length else {
        return Ok(None);
    };
    match usize::try_from(length) {
        Ok(len) if len <= MAX_BODY_BYTES => Ok(Some(len)),
        _ => Err(HttpError::new(
            HttpErrorKind::BodyTooLarge,
            format!("Content-Length {length} exceeds {MAX_BODY_BYTES} bytes"),
        )),
    }
}

/// Reads exactly `len` body bytes (already checked against the limit),
/// reserving memory only as bytes arrive beyond [`BODY_RESERVE`].
fn read_body<R: BufRead>(r: &mut R, len: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::with_capacity(len.min(BODY_RESERVE));
    let limit = u64::try_from(len).unwrap_or(u64::MAX);
    // `take` stops at `len`, so nothing of the next message is consumed.
    r.take(limit)
        .read_to_end(&mut body)
        .map_err(|e| HttpError::transport("the body", e))?;
    if body.len() < len {
        return Err(HttpError::new(
            HttpErrorKind::Closed,
            format!("EOF after {} of {len} body bytes", body.len()),
        ));
    }
    Ok(body)
}

/// Reads a length-less response body up to EOF, at most [`MAX_BODY_BYTES`].
fn read_to_eof<R: BufRead>(r: &mut R) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    // One byte more than allowed tells "exactly at the limit" from "over".
    let limit = u64::try_from(MAX_BODY_BYTES)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    r.take(limit)
        .read_to_end(&mut body)
        .map_err(|e| HttpError::transport("the body", e))?;
    if body.len() > MAX_BODY_BYTES {
        return Err(HttpError::new(
            HttpErrorKind::BodyTooLarge,
            format!("body exceeds {MAX_BODY_BYTES} bytes"),
        ));
    }
    Ok(body)
}

/// Whether responses with this status never carry a body (RFC 9112 6.3).
fn status_has_no_body(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

// ---------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------

/// The first value of header `name`, compared case-insensitively.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Whether any `Connection` header lists `token` (case-insensitive).
fn has_connection_token(headers: &[(String, String)], token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(token))
}

// ---------------------------------------------------------------------------
// The request-target
// ---------------------------------------------------------------------------

/// Splits and decodes an origin-form target into path and query pairs.
fn parse_target(target: &str) -> Result<(String, Vec<(String, String)>), HttpError> {
    if !target.starts_with('/') {
        return Err(HttpError::bad(
            "request-target must be origin-form (start with '/')",
        ));
    }
    if target.contains('#') {
        return Err(HttpError::bad("request-target must not carry a fragment"));
    }
    let (raw_path, raw_query) = target.split_once('?').unwrap_or((target, ""));
    let path = percent_decode(raw_path, false).map_err(|e| HttpError::bad(format!("path: {e}")))?;
    check_path(&path).map_err(HttpError::bad)?;
    let query = query_pieces(raw_query)
        .map(|(name, value)| {
            let name = percent_decode(name, true);
            let value = percent_decode(value, true);
            match (name, value) {
                (Ok(name), Ok(value)) => Ok((name, value)),
                (Err(e), _) | (_, Err(e)) => Err(HttpError::bad(format!("query: {e}"))),
            }
        })
        .collect::<Result<_, _>>()?;
    Ok((path, query))
}

/// The raw `(name, value)` pieces of a query string: split at `&`, empty
/// pieces skipped, each split at its first `=` (no `=`: empty value).
fn query_pieces(raw: &str) -> impl Iterator<Item = (&str, &str)> {
    raw.split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| piece.split_once('=').unwrap_or((piece, "")))
}

/// The rules a decoded path must follow, on both reading and writing.
fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("path must start with '/'");
    }
    // Routing never needs to climb; refusing `..` here means no handler can
    // be tricked into resolving one against a file system or a prefix.
    if path.split('/').any(|segment| segment == "..") {
        return Err("path must not contain '..' segments");
    }
    // Control characters (decoded from %00..%1F, %7F, C1) have no business
    // in a resource name and would corrupt log lines.
    if path.chars().any(char::is_control) {
        return Err("path must not contain control characters");
    }
    Ok(())
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`); the
/// result must be UTF-8.
fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, &'static str> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err("invalid percent-encoding");
                };
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoded bytes are not UTF-8")
}

/// Decodes a query piece for [`Request::new`], keeping it verbatim if it
/// is not valid percent-encoding.
fn decode_lossy(s: &str) -> String {
    percent_decode(s, true).unwrap_or_else(|_| s.to_owned())
}

/// The value of one hex digit.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends the encoded origin-form target for `path` and `query`.
fn encode_target(path: &str, query: &[(String, String)], out: &mut String) {
    percent_encode(path, is_path_char, out);
    for (i, (name, value)) in query.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        percent_encode(name, is_query_char, out);
        out.push('=');
        percent_encode(value, is_query_char, out);
    }
}

/// Appends `s` with every byte for which `keep` is false written as `%XX`.
fn percent_encode(s: &str, keep: fn(u8) -> bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in s.bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Unreserved characters (RFC 3986 2.3): never need encoding.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters kept verbatim in a path: `pchar` and `/`, except that `+`
/// is encoded too so no reader can mistake it for a space.
fn is_path_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'/' | b':' | b'@' | b'!' | b'$' | b'\'' | b'(' | b')' | b'*' | b',' | b';'
        )
}

/// Characters kept verbatim in a query name or value: only unreserved, so
/// `&`, `=`, `+`, `%` and `?` inside them are always escaped.
fn is_query_char(b: u8) -> bool {
    is_unreserved(b)
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// Appends one `name: value` line.
fn push_field(head: &mut String, name: &str, value: &str) {
    head.push_str(name);
    head.push_str(": ");
    head.push_str(value);
    head.push_str("\r\n");
}

/// Appends the caller's own header fields, skipping those in `owned` (the
/// writer sets them) and refusing anything the reader would refuse.
/// Returns how many were written.
fn push_own_fields(
    head: &mut String,
    fields: &[(String, String)],
    owned: &[&str],
) -> io::Result<usize> {
    let mut count = 0;
    for (name, value) in fields {
        if owned.iter().any(|o| name.eq_ignore_ascii_case(o)) {
            continue;
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid_input("transfer-encoding is not supported"));
        }
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(invalid_input("header name is not a token"));
        }
        check_field_value(value)?;
        push_field(head, name, value);
        count += 1;
    }
    Ok(count)
}

/// Ends the head and checks it against the reader's limits.
fn finish_head(head: &mut String, fields: usize) -> io::Result<()> {
    head.push_str("\r\n");
    if fields > MAX_HEADERS {
        return Err(invalid_input("more than MAX_HEADERS header fields"));
    }
    if head.len() > MAX_HEAD_BYTES {
        return Err(invalid_input("head exceeds MAX_HEAD_BYTES"));
    }
    Ok(())
}

/// A header value may hold tab, visible ASCII, space and non-ASCII UTF-8,
/// but no other control character: a CR or LF would inject header lines.
fn check_field_value(value: &str) -> io::Result<()> {
    if value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
    {
        Ok(())
    } else {
        Err(invalid_input("header value contains control characters"))
    }
}

/// `tchar` from RFC 9110 5.6.2: the characters of a header name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// An `InvalidInput` error for something the writer refuses to send.
fn invalid_input(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{BufReader, Cursor};

    const HOST: &str = "ferry.example:8443";

    // -- helpers ------------------------------------------------------------

    fn parse(bytes: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut Cursor::new(bytes))
    }

    fn parse_ok(bytes: &[u8]) -> Request {
        match parse(bytes) {
            Ok(Some(req)) => req,
            other => panic!(
                "expected a request from {:?}, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    fn kind_of(bytes: &[u8]) -> HttpErrorKind {
        match parse(bytes) {
            Err(e) => e.kind,
            Ok(r) => panic!(
                "expected an error from {:?}, got {r:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    fn response_kind_of(bytes: &[u8]) -> HttpErrorKind {
        match read_response(&mut Cursor::new(bytes)) {
            Err(e) => e.kind,
            Ok(r) => panic!(
                "expected an error from {:?}, got {r:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
    }

    fn wire(req: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        write_request(&mut out, req, HOST).expect("write_request");
        out
    }

    fn wire_response(resp: &Response, close: bool) -> Vec<u8> {
        let mut out = Vec::new();
        write_response(&mut out, resp, close).expect("write_response");
        out
    }

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_owned(), b.to_owned())
    }

    /// What the reader gives back for `req` written by `write_request`:
    /// the same request plus the framing headers the writer adds.
    fn after_wire(req: &Request) -> Request {
        let mut headers = vec![
            pair("host", HOST),
            pair("content-length", &req.body.len().to_string()),
        ];
        headers.extend(req.headers.iter().cloned());
        Request {
            headers,
            ..req.clone()
        }
    }

    /// What `read_response` gives back for `resp` written by `write_response`.
    fn response_after_wire(resp: &Response, close: bool) -> Response {
        let mut headers = Vec::new();
        if !status_has_no_body(resp.status) {
            headers.push(pair("content-length", &resp.body.len().to_string()));
        }
        if close {
            headers.push(pair("connection", "close"));
        }
        headers.extend(resp.headers.iter().cloned());
        Response {
            headers,
            ..resp.clone()
        }
    }

    fn invalid_input_kind(result: io::Result<()>) -> io::ErrorKind {
        match result {
            Err(e) => e.kind(),
            Ok(()) => panic!("writer accepted invalid input"),
        }
    }

    /// A reader that fails with `kind` on every call.
    struct Failing(io::ErrorKind);

    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::new(self.0, "test failure"))
        }
    }

    /// A reader that is interrupted before each successful read.
    struct Stuttering<R> {
        inner: R,
        interrupt: bool,
    }

    impl<R: Read> Read for Stuttering<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            self.inner.read(buf)
        }
    }

    fn sample_request() -> Request {
        let mut req = Request::new(Method::Post, "/");
        req.path = "/v1/hosts/web 01/a+b%c/ünïcødé/x;y:z@w".to_owned();
        req.query = vec![
            pair("q", "a b&c=d%e+f"),
            pair("ü", "€ 100%"),
            pair("", ""),
            pair("flag", ""),
            pair("a=b", "?#/"),
        ];
        req.headers = vec![
            pair("x-trace", "abc 123"),
            pair("authorization", "Bearer t0k"),
        ];
        req.body = b"{\"a\":1}\n".to_vec();
        req
    }

    // -- round trips ----------------------------------------------------------

    #[test]
    fn request_round_trip() {
        let req = sample_request();
        let bytes = wire(&req);
        let line_end = bytes
            .iter()
            .position(|&b| b == b'\r')
            .unwrap_or(bytes.len());
        let line = &bytes[..line_end];
        assert!(
            line.is_ascii(),
            "request line is plain ASCII: {}",
            String::from_utf8_lossy(line)
        );
        assert!(line.starts_with(b"POST /v1/hosts/web%2001/a%2Bb%25c/"));
        let got = parse_ok(&bytes);
        assert_eq!(got, after_wire(&req));
        // What was read writes back to exactly itself.
        assert_eq!(parse_ok(&wire(&got)), got);
    }

    #[test]
    fn request_round_trip_every_method_and_empty_body() {
        for method in [Method::Get, Method::Post, Method::Put, Method::Delete] {
            let req = Request::new(method, "/v1/x");
            let bytes = wire(&req);
            assert!(String::from_utf8_lossy(&bytes).contains("Content-Length: 0\r\n"));
            assert_eq!(parse_ok(&bytes), after_wire(&req));
        }
    }

    #[test]
    fn writer_owns_framing_headers() {
        let mut req = Request::new(Method::Put, "/a");
        req.headers = vec![
            pair("Content-Length", "999"),
            pair("HOST", "evil"),
            pair("x-a", "1"),
        ];
        req.body = b"hello".to_vec();
        let got = parse_ok(&wire(&req));
        assert_eq!(
            got.headers,
            vec![
                pair("host", HOST),
                pair("content-length", "5"),
                pair("x-a", "1")
            ]
        );
        assert_eq!(got.body, b"hello");
    }

    #[test]
    fn request_new_decodes_like_the_server() {
        for target in [
            "/v1/hosts?state=running&q=a+b%20c",
            "/a%20b/c?x",
            "/?=&&k=v&",
            "/",
        ] {
            let client = Request::new(Method::Get, target);
            let server = parse_ok(format!("GET {target} HTTP/1.1\r\n\r\n").as_bytes());
            assert_eq!(
                (client.path, client.query),
                (server.path, server.query),
                "{target}"
            );
        }
        let req = Request::new(Method::Get, "/v1/hosts?state=running&q=a+b%20c");
        assert_eq!(req.path, "/v1/hosts");
        assert_eq!(
            req.query,
            vec![pair("state", "running"), pair("q", "a b c")]
        );
        assert_eq!(req.query_param("q"), Some("a b c"));
        assert_eq!(req.query_param("missing"), None);
        // Invalid escapes are kept verbatim and arrive as given.
        let odd = Request::new(Method::Get, "/a%zz?k=%G1");
        assert_eq!(odd.path, "/a%zz");
        assert_eq!(odd.query, vec![pair("k", "%G1")]);
        assert_eq!(parse_ok(&wire(&odd)), after_wire(&odd));
    }

    #[test]
    fn segments_drop_empty_ones() {
        let segs = |p: &str| Request::new(Method::Get, p).segments().join(",");
        assert_eq!(segs("/v1/hosts/web01"), "v1,hosts,web01");
        assert_eq!(segs("//v1///hosts/"), "v1,hosts");
        assert_eq!(segs("/"), "");
        assert_eq!(segs("/a%20b/c"), "a b,c");
    }

    #[test]
    fn response_round_trip() {
        let json = Response::json(201, &serde_json::json!({"id": "web01", "n": [1, 2]}));
        assert_eq!(json.header("Content-Type"), Some("application/json"));
        assert_eq!(json.body, b"{\"id\":\"web01\",\"n\":[1,2]}\n");
        let text = Response::text(404, "no such host: ü");
        assert_eq!(
            text.header("content-type"),
            Some("text/plain; charset=utf-8")
        );
        for resp in [json, text, Response::text(200, "")] {
            for close in [false, true] {
                let bytes = wire_response(&resp, close);
                let got = read_response(&mut Cursor::new(&bytes)).expect("read_response");
                assert_eq!(got, response_after_wire(&resp, close));
                assert_eq!(got.wants_close(), close);
            }
        }
    }

    #[test]
    fn response_status_line_and_bodiless_statuses() {
        let bytes = wire_response(&Response::text(409, "taken"), false);
        assert!(bytes.starts_with(b"HTTP/1.1 409 Conflict\r\nContent-Length: 5\r\n"));
        let empty = Response {
            status: 204,
            headers: vec![pair("x-a", "b")],
            body: Vec::new(),
        };
        let bytes = wire_response(&empty, true);
        assert!(!String::from_utf8_lossy(&bytes).contains("Content-Length"));
        let got = read_response(&mut Cursor::new(&bytes)).expect("204");
        assert_eq!(got, response_after_wire(&empty, true));
        let with_body = Response::text(204, "x");
        assert_eq!(
            invalid_input_kind(write_response(&mut Vec::new(), &with_body, false)),
            io::ErrorKind::InvalidInput
        );
        // A 304 with a length still has no body on the wire.
        let mut r = Cursor::new(
            &b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\nHTTP/1.1 200 OK\r\n"[..],
        );
        assert!(read_response(&mut r).expect("304").body.is_empty());
        assert_eq!(
            read_response(&mut r).map(|x| x.status).ok(),
            None,
            "next response is truncated"
        );
        // 1xx is returned as is.
        let got =
            read_response(&mut Cursor::new(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])).expect("100");
        assert_eq!((got.status, got.body.len()), (100, 0));
    }

    #[test]
    fn response_without_length_reads_to_eof() {
        let got = read_response(&mut Cursor::new(
            &b"HTTP/1.0 200 OK\r\nX: y\r\n\r\nall of it"[..],
        ))
        .expect("read to EOF");
        assert_eq!(got.body, b"all of it");
        assert!(got.wants_close(), "HTTP/1.0 without keep-alive closes");
        let mut big = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        big.resize(big.len() + MAX_BODY_BYTES, b'a');
        let got = read_response(&mut Cursor::new(&big)).expect("exactly the limit");
        assert_eq!(got.body.len(), MAX_BODY_BYTES);
        big.push(b'a');
        assert_eq!(response_kind_of(&big), HttpErrorKind::BodyTooLarge);
    }

    #[test]
    fn response_errors() {
        assert_eq!(response_kind_of(b""), HttpErrorKind::Closed);
        assert_eq!(
            response_kind_of(b"HTTP/1.1 200 OK\r\nContent-Le"),
            HttpErrorKind::Closed
        );
        assert_eq!(
            response_kind_of(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"),
            HttpErrorKind::Closed
        );
        assert_eq!(
            response_kind_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            HttpErrorKind::NotImplemented
        );
        assert_eq!(
            response_kind_of(b"HTTP/2 200 OK\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            response_kind_of(b"HTTP/1.1 099 Low\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            response_kind_of(b"HTTP/1.1 600 High\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            response_kind_of(b"HTTP/1.1 2000 OK\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            response_kind_of(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
            ),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            response_kind_of(b"HTTP/1.1 200 OK\r\nContent-Length: 4194305\r\n\r\n"),
            HttpErrorKind::BodyTooLarge
        );
    }

    #[test]
    fn pipelined_requests_read_back_in_order() {
        let first = sample_request();
        let mut second = Request::new(Method::Delete, "/v1/hosts/web02?force=1");
        second.body = b"bye".to_vec();
        let third = Request::new(Method::Get, "/v1/health");
        let mut bytes = wire(&first);
        bytes.extend(wire(&second));
        bytes.extend(wire(&third));
        // Every buffer size, so the head and body ends fall at every offset
        // of a fill_buf chunk: nothing past a request may be consumed.
        for capacity in (1..=17).chain([64, 8192]) {
            let mut r = BufReader::with_capacity(capacity, Cursor::new(&bytes));
            for expected in [&first, &second, &third] {
                let got = read_request(&mut r).expect("read").expect("a request");
                assert_eq!(got, after_wire(expected), "capacity {capacity}");
            }
            assert!(read_request(&mut r).expect("clean EOF").is_none());
        }
    }

    #[test]
    fn bare_lf_heads_are_accepted() {
        let bytes = b"GET /a HTTP/1.1\nHost: x\n\nPOST /b HTTP/1.1\nContent-Length: 2\n\nhi";
        let mut r = Cursor::new(&bytes[..]);
        let a = read_request(&mut r).expect("a").expect("a");
        assert_eq!((a.method, a.path.as_str()), (Method::Get, "/a"));
        let b = read_request(&mut r).expect("b").expect("b");
        assert_eq!(
            (b.method, b.path.as_str(), b.body.as_slice()),
            (Method::Post, "/b", &b"hi"[..])
        );
        assert!(read_request(&mut r).expect("eof").is_none());
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let got = parse_ok(b"\r\n\r\n\nGET /x HTTP/1.1\r\n\r\n");
        assert_eq!(got.path, "/x");
        assert!(parse(b"\r\n\r\n").expect("only blank lines").is_none());
        let flood = b"\r\n".repeat(MAX_HEAD_BYTES);
        assert_eq!(kind_of(&flood), HttpErrorKind::HeadTooLarge);
    }

    #[test]
    fn headers_are_lowercased_and_trimmed() {
        let got = parse_ok(b"GET / HTTP/1.1\r\nX-Foo:   bar baz \t\r\nX-FOO: 2\r\nEmpty:\r\n\r\n");
        assert_eq!(
            got.headers,
            vec![
                pair("x-foo", "bar baz"),
                pair("x-foo", "2"),
                pair("empty", "")
            ]
        );
        assert_eq!(got.header("X-Foo"), Some("bar baz"));
        assert_eq!(got.header("missing"), None);
        let utf8 = parse_ok("GET / HTTP/1.1\r\nX-Name: Zoë\r\n\r\n".as_bytes());
        assert_eq!(utf8.header("x-name"), Some("Zoë"));
    }

    // -- EOF and transport errors ---------------------------------------------

    #[test]
    fn eof_before_first_byte_is_none() {
        assert!(parse(b"").expect("clean EOF").is_none());
        let mut r = BufReader::new(Failing(io::ErrorKind::UnexpectedEof));
        assert!(read_request(&mut r)
            .expect("peer vanished while idle")
            .is_none());
    }

    #[test]
    fn eof_mid_head_is_closed() {
        for bytes in [
            &b"G"[..],
            b"GET / HTTP/1.1",
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
        ] {
            assert_eq!(kind_of(bytes), HttpErrorKind::Closed);
        }
        let mut r = BufReader::new(
            Cursor::new(&b"GET / HT"[..]).chain(Failing(io::ErrorKind::UnexpectedEof)),
        );
        let err = read_request(&mut r).expect_err("truncated");
        assert_eq!(err.kind, HttpErrorKind::Closed);
        assert!(std::error::Error::source(&err).is_some());
    }

    #[test]
    fn eof_mid_body_is_closed() {
        assert_eq!(
            kind_of(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"),
            HttpErrorKind::Closed
        );
        assert_eq!(
            kind_of(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcd"),
            HttpErrorKind::Closed
        );
    }

    #[test]
    fn transport_errors_are_io() {
        for kind in [
            io::ErrorKind::WouldBlock,
            io::ErrorKind::TimedOut,
            io::ErrorKind::ConnectionReset,
        ] {
            let mut r = BufReader::new(Failing(kind));
            let err = read_request(&mut r).expect_err("transport failure");
            assert_eq!(err.kind, HttpErrorKind::Io);
            assert_eq!(err.source.as_ref().map(io::Error::kind), Some(kind));
            // Mid-body too.
            let head = Cursor::new(&b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\na"[..]);
            let mut r = BufReader::new(head.chain(Failing(kind)));
            assert_eq!(
                read_request(&mut r).expect_err("mid-body").kind,
                HttpErrorKind::Io
            );
        }
    }

    #[test]
    fn interrupted_reads_are_retried() {
        let req = sample_request();
        let bytes = wire(&req);
        let stutter = Stuttering {
            inner: Cursor::new(&bytes),
            interrupt: false,
        };
        let mut r = BufReader::with_capacity(5, stutter);
        assert_eq!(
            read_request(&mut r).expect("read").expect("request"),
            after_wire(&req)
        );
    }

    // -- limits -------------------------------------------------------------

    /// A GET head of exactly `len` bytes, padded with one header.
    fn head_of_len(len: usize) -> Vec<u8> {
        let fixed = "GET / HTTP/1.1\r\nx-pad: \r\n\r\n".len();
        let pad = "p".repeat(len - fixed);
        format!("GET / HTTP/1.1\r\nx-pad: {pad}\r\n\r\n").into_bytes()
    }

    #[test]
    fn head_size_limit() {
        let at_limit = head_of_len(MAX_HEAD_BYTES);
        assert_eq!(at_limit.len(), MAX_HEAD_BYTES);
        assert_eq!(
            parse_ok(&at_limit).header("x-pad").map(str::len),
            Some(MAX_HEAD_BYTES - 27)
        );
        assert_eq!(
            kind_of(&head_of_len(MAX_HEAD_BYTES + 1)),
            HttpErrorKind::HeadTooLarge
        );
        // An endless line fails at the limit, not at EOF.
        let endless = vec![b'a'; 10 * MAX_HEAD_BYTES];
        let mut r = Cursor::new(&endless);
        assert_eq!(
            read_request(&mut r).expect_err("endless").kind,
            HttpErrorKind::HeadTooLarge
        );
        assert!(r.position() <= u64::try_from(MAX_HEAD_BYTES).unwrap_or(u64::MAX));
        assert_eq!(
            HttpError::new(HttpErrorKind::HeadTooLarge, "").status(),
            431
        );
    }

    fn head_with_headers(n: usize) -> Vec<u8> {
        let mut head = String::from("GET / HTTP/1.1\r\n");
        for i in 0..n {
            head.push_str(&format!("x-h{i}: {i}\r\n"));
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    #[test]
    fn header_count_limit() {
        assert_eq!(
            parse_ok(&head_with_headers(MAX_HEADERS)).headers.len(),
            MAX_HEADERS
        );
        assert_eq!(
            kind_of(&head_with_headers(MAX_HEADERS + 1)),
            HttpErrorKind::HeadTooLarge
        );
    }

    #[test]
    fn body_size_limit_is_checked_before_reading() {
        let over = MAX_BODY_BYTES + 1;
        for value in [
            over.to_string(),
            u64::MAX.to_string(),
            "99999999999999999999999999".to_owned(),
        ] {
            let head = format!("POST / HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            let mut bytes = head.clone().into_bytes();
            bytes.extend_from_slice(b"body bytes that must not be touched");
            let mut r = Cursor::new(&bytes);
            let err = read_request(&mut r).expect_err("too large");
            assert_eq!(err.kind, HttpErrorKind::BodyTooLarge, "{value}");
            assert_eq!(err.status(), 413);
            // Refused from the head alone: not one body byte was read.
            assert_eq!(r.position(), u64::try_from(head.len()).unwrap_or(u64::MAX));
        }
        // Exactly at the limit is fine.
        let mut bytes =
            format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n").into_bytes();
        bytes.resize(bytes.len() + MAX_BODY_BYTES, b'z');
        assert_eq!(parse_ok(&bytes).body.len(), MAX_BODY_BYTES);
    }

    #[test]
    fn length_required_for_post_and_put_only() {
        for method in ["POST", "PUT"] {
            let bytes = format!("{method} / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(kind_of(bytes.as_bytes()), HttpErrorKind::LengthRequired);
        }
        for method in ["GET", "DELETE"] {
            let bytes = format!("{method} / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert!(parse_ok(bytes.as_bytes()).body.is_empty());
        }
        // GET may still carry a body with a length.
        assert_eq!(
            parse_ok(b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi").body,
            b"hi"
        );
    }

    #[test]
    fn transfer_encoding_is_refused() {
        for te in ["chunked", "gzip, chunked", "identity"] {
            let bytes = format!("POST / HTTP/1.1\r\nTransfer-Encoding: {te}\r\n\r\n0\r\n\r\n");
            assert_eq!(
                kind_of(bytes.as_bytes()),
                HttpErrorKind::NotImplemented,
                "{te}"
            );
            let both = format!(
                "POST / HTTP/1.1\r\nContent-Length: 5\r\ntransfer-encoding: {te}\r\n\r\n0\r\n\r\n"
            );
            assert_eq!(
                kind_of(both.as_bytes()),
                HttpErrorKind::NotImplemented,
                "{te}"
            );
        }
    }

    #[test]
    fn content_length_must_be_one_plain_decimal() {
        assert_eq!(
            kind_of(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef"),
            HttpErrorKind::BadRequest
        );
        let same =
            parse_ok(b"POST / HTTP/1.1\r\nContent-Length: 3\r\ncontent-length: 003\r\n\r\nabc");
        assert_eq!(same.body, b"abc");
        for bad in ["+5", "-1", "5 5", "5, 5", "0x10", "five", "1e3", "\u{0665}"] {
            let bytes = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\nabcde");
            assert_eq!(
                kind_of(bytes.as_bytes()),
                HttpErrorKind::BadRequest,
                "{bad}"
            );
        }
        assert_eq!(
            kind_of(b"POST / HTTP/1.1\r\nContent-Length:\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
    }

    // -- syntax -------------------------------------------------------------

    #[test]
    fn only_http_1_0_and_1_1() {
        for version in [
            "HTTP/2.0",
            "HTTP/1.2",
            "HTTP/0.9",
            "HTTPS/1.1",
            "http/1.1",
            "HTTP/1",
        ] {
            let bytes = format!("GET / {version}\r\n\r\n");
            assert_eq!(
                kind_of(bytes.as_bytes()),
                HttpErrorKind::BadRequest,
                "{version}"
            );
        }
        assert_eq!(kind_of(b"GET /\r\n\r\n"), HttpErrorKind::BadRequest);
        assert_eq!(
            kind_of(b"GET  / HTTP/1.1\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        let old = parse_ok(b"GET / HTTP/1.0\r\n\r\n");
        assert!(old.wants_close(), "HTTP/1.0 closes by default");
        let kept = parse_ok(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(!kept.wants_close());
    }

    #[test]
    fn unsupported_methods_are_405() {
        for method in [
            "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "get", "Post", "FOO",
        ] {
            let bytes = format!("{method} / HTTP/1.1\r\n\r\n");
            let err = parse(bytes.as_bytes()).expect_err(method);
            assert_eq!(err.kind, HttpErrorKind::MethodNotAllowed, "{method}");
            assert_eq!(err.status(), 405);
        }
    }

    #[test]
    fn target_must_be_origin_form() {
        for target in ["http://h/x", "*", "h:443", "x", "%2F"] {
            let bytes = format!("GET {target} HTTP/1.1\r\n\r\n");
            assert_eq!(
                kind_of(bytes.as_bytes()),
                HttpErrorKind::BadRequest,
                "{target}"
            );
        }
        assert_eq!(
            kind_of(b"GET /a#frag HTTP/1.1\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
    }

    #[test]
    fn dot_dot_segments_are_refused() {
        for target in [
            "/..",
            "/a/../b",
            "/a/..",
            "/a/%2e%2E/b",
            "/a/..%2fb",
            "/%2E%2E",
        ] {
            let bytes = format!("GET {target} HTTP/1.1\r\n\r\n");
            assert_eq!(
                kind_of(bytes.as_bytes()),
                HttpErrorKind::BadRequest,
                "{target}"
            );
        }
        for fine in ["/a/..b", "/a/.../c", "/a/./b", "/b..", "/?x=.."] {
            parse_ok(format!("GET {fine} HTTP/1.1\r\n\r\n").as_bytes());
        }
    }

    #[test]
    fn bad_percent_encoding_is_refused() {
        for target in [
            "/a%", "/a%4", "/a%zz", "/a%4g", "/a%C3%28", "/a%FF", "/?q=%G0", "/?q=%FF", "/?%=1",
            "/%00", "/a%0Ab", "/%7F",
        ] {
            let bytes = format!("GET {target} HTTP/1.1\r\n\r\n");
            assert_eq!(
                kind_of(bytes.as_bytes()),
                HttpErrorKind::BadRequest,
                "{target}"
            );
        }
        let ok = parse_ok("GET /%C3%BC/ü?a=%e2%82%ac&b=x+y%2By HTTP/1.1\r\n\r\n".as_bytes());
        assert_eq!(ok.path, "/ü/ü");
        assert_eq!(ok.query, vec![pair("a", "€"), pair("b", "x y+y")]);
        // '+' is literal in the path, and control characters are fine in
        // query values (they are data, not resource names).
        let plus = parse_ok(b"GET /a+b?c=%0A HTTP/1.1\r\n\r\n");
        assert_eq!(
            (plus.path.as_str(), plus.query_param("c")),
            ("/a+b", Some("\n"))
        );
    }

    #[test]
    fn malformed_header_lines_are_refused() {
        assert_eq!(
            kind_of(b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            kind_of(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            kind_of(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            kind_of(b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            kind_of(b"GET / HTTP/1.1\r\nX: a\rY: b\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            kind_of(b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
        assert_eq!(
            kind_of(b"GET / HTTP/1.1\n\r\r\n\r\n"),
            HttpErrorKind::BadRequest
        );
    }

    // -- writers refuse what readers refuse -------------------------------------

    /// One way of spoiling a request.
    type Edit = Box<dyn Fn(&mut Request)>;

    #[test]
    fn write_request_refuses_invalid_input() {
        let with = |f: &dyn Fn(&mut Request)| {
            let mut req = Request::new(Method::Post, "/ok");
            f(&mut req);
            invalid_input_kind(write_request(&mut Vec::new(), &req, HOST))
        };
        let cases: Vec<(&str, Edit)> = vec![
            (
                "injection",
                Box::new(|r| r.headers.push(pair("x-a", "1\r\nX-Evil: 2"))),
            ),
            ("lf", Box::new(|r| r.headers.push(pair("x-a", "1\n")))),
            ("nul", Box::new(|r| r.headers.push(pair("x-a", "\0")))),
            ("name", Box::new(|r| r.headers.push(pair("bad name", "1")))),
            ("empty name", Box::new(|r| r.headers.push(pair("", "1")))),
            ("colon", Box::new(|r| r.headers.push(pair("a:b", "1")))),
            (
                "te",
                Box::new(|r| r.headers.push(pair("Transfer-Encoding", "chunked"))),
            ),
            ("relative", Box::new(|r| r.path = "ok".to_owned())),
            ("empty path", Box::new(|r| r.path = String::new())),
            ("dotdot", Box::new(|r| r.path = "/a/../b".to_owned())),
            ("control", Box::new(|r| r.path = "/a\nb".to_owned())),
            ("body", Box::new(|r| r.body = vec![0; MAX_BODY_BYTES + 1])),
            (
                "count",
                Box::new(|r| {
                    r.headers = (0..MAX_HEADERS - 1)
                        .map(|i| pair(&format!("x-{i}"), "v"))
                        .collect()
                }),
            ),
            (
                "size",
                Box::new(|r| r.headers.push(pair("x-big", &"v".repeat(MAX_HEAD_BYTES)))),
            ),
        ];
        for (name, case) in cases {
            assert_eq!(with(&*case), io::ErrorKind::InvalidInput, "{name}");
        }
        let mut req = Request::new(Method::Get, "/");
        assert_eq!(
            invalid_input_kind(write_request(&mut Vec::new(), &req, "h\r\nx: y")),
            io::ErrorKind::InvalidInput
        );
        // The most headers that fit: MAX_HEADERS minus Host and Content-Length.
        req.headers = (0..MAX_HEADERS - 2)
            .map(|i| pair(&format!("x-{i}"), "v"))
            .collect();
        assert_eq!(parse_ok(&wire(&req)).headers.len(), MAX_HEADERS);
    }

    #[test]
    fn write_response_refuses_invalid_input() {
        let refuse =
            |resp: Response| invalid_input_kind(write_response(&mut Vec::new(), &resp, false));
        assert_eq!(refuse(Response::text(99, "")), io::ErrorKind::InvalidInput);
        assert_eq!(refuse(Response::text(600, "")), io::ErrorKind::InvalidInput);
        assert_eq!(
            refuse(Response::text(304, "x")),
            io::ErrorKind::InvalidInput
        );
        let mut injected = Response::text(200, "");
        injected.headers.push(pair("x", "a\r\n\r\nHTTP/1.1 200 OK"));
        assert_eq!(refuse(injected), io::ErrorKind::InvalidInput);
        let mut chunked = Response::text(200, "");
        chunked.headers.push(pair("transfer-encoding", "chunked"));
        assert_eq!(refuse(chunked), io::ErrorKind::InvalidInput);
        // Framing headers of the caller's are replaced by the writer's own.
        let mut own = Response::text(200, "abc");
        own.headers.push(pair("Content-Length", "7"));
        own.headers.push(pair("Connection", "keep-alive"));
        let got = read_response(&mut Cursor::new(wire_response(&own, true))).expect("read");
        assert_eq!(
            got.headers,
            vec![
                pair("content-length", "3"),
                pair("connection", "close"),
                pair("content-type", "text/plain; charset=utf-8")
            ]
        );
    }

    // -- accessors and status mapping ----------------------------------------------

    fn with_headers(headers: &[(&str, &str)]) -> Request {
        let mut req = Request::new(Method::Get, "/");
        req.headers = headers.iter().map(|(n, v)| pair(n, v)).collect();
        req
    }

    #[test]
    fn bearer_token_parsing() {
        let token = |value: &str| {
            with_headers(&[("authorization", value)])
                .bearer_token()
                .map(str::to_owned)
        };
        assert_eq!(
            token("Bearer abc.DEF-123_~+/="),
            Some("abc.DEF-123_~+/=".to_owned())
        );
        assert_eq!(token("bearer abc"), Some("abc".to_owned()));
        assert_eq!(token("BEARER \t abc  "), Some("abc".to_owned()));
        assert_eq!(token("Basic dXNlcjpwYXNz"), None);
        assert_eq!(token("Bearer"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearer a b"), None);
        assert_eq!(token("Bearerabc"), None);
        assert_eq!(token(""), None);
        assert_eq!(with_headers(&[]).bearer_token(), None);
        // Through the wire, with the header name in any case.
        let got = parse_ok(b"GET / HTTP/1.1\r\nAUTHORIZATION: Bearer s3cret\r\n\r\n");
        assert_eq!(got.bearer_token(), Some("s3cret"));
    }

    #[test]
    fn connection_close_detection() {
        assert!(with_headers(&[("connection", "close")]).wants_close());
        assert!(with_headers(&[("Connection", "Keep-Alive, CLOSE")]).wants_close());
        assert!(
            with_headers(&[("connection", "upgrade"), ("connection", " close ")]).wants_close()
        );
        assert!(!with_headers(&[("connection", "keep-alive")]).wants_close());
        assert!(!with_headers(&[("connection", "closed")]).wants_close());
        assert!(!with_headers(&[("x-connection", "close")]).wants_close());
        assert!(!with_headers(&[]).wants_close());
        assert!(parse_ok(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").wants_close());
    }

    #[test]
    fn status_mapping() {
        let status = |kind| HttpError::new(kind, "x").status();
        assert_eq!(status(HttpErrorKind::BadRequest), 400);
        assert_eq!(status(HttpErrorKind::MethodNotAllowed), 405);
        assert_eq!(status(HttpErrorKind::HeadTooLarge), 431);
        assert_eq!(status(HttpErrorKind::BodyTooLarge), 413);
        assert_eq!(status(HttpErrorKind::LengthRequired), 411);
        assert_eq!(status(HttpErrorKind::NotImplemented), 501);
        assert_eq!(status(HttpErrorKind::Io), 400);
        assert_eq!(status(HttpErrorKind::Closed), 400);
        for code in [
            200, 201, 202, 204, 400, 401, 403, 404, 405, 409, 410, 411, 413, 422, 429, 431, 500,
            501, 503,
        ] {
            assert_ne!(reason(code), "Unknown", "{code}");
        }
        assert_eq!(reason(200), "OK");
        assert_eq!(reason(431), "Request Header Fields Too Large");
        assert_eq!(reason(418), "Unknown");
        assert_eq!(reason(0), "Unknown");
        let err = parse(b"PATCH / HTTP/1.1\r\n\r\n").expect_err("405");
        assert_eq!(
            err.to_string(),
            "method not allowed: method \"PATCH\" is not supported"
        );
        assert_eq!(Method::Delete.to_string(), "DELETE");
    }

    // -- properties -----------------------------------------------------------

    fn arb_method() -> impl Strategy<Value = Method> {
        prop_oneof![
            Just(Method::Get),
            Just(Method::Post),
            Just(Method::Put),
            Just(Method::Delete)
        ]
    }

    fn arb_path() -> impl Strategy<Value = String> {
        let segment = "[^/\\p{Cc}]{0,8}".prop_filter("no '..' segments", |s| s != "..");
        (proptest::collection::vec(segment, 0..5), any::<bool>()).prop_map(
            |(segments, trailing)| {
                let mut path = format!("/{}", segments.join("/"));
                if trailing && !segments.is_empty() {
                    path.push('/');
                }
                path
            },
        )
    }

    fn arb_headers() -> impl Strategy<Value = Vec<(String, String)>> {
        // Names outside the ones the writer owns; values already trimmed.
        let name = "x-[a-z0-9-]{1,10}";
        let value = "([^\\p{Cc} ]([^\\p{Cc}]{0,20}[^\\p{Cc} ])?)?";
        proptest::collection::vec((name, value), 0..4)
    }

    fn arb_request() -> impl Strategy<Value = Request> {
        (
            arb_method(),
            arb_path(),
            proptest::collection::vec((any::<String>(), any::<String>()), 0..4),
            arb_headers(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(method, path, query, headers, body)| Request {
                method,
                path,
                query,
                headers,
                body,
            })
    }

    fn arb_response() -> impl Strategy<Value = Response> {
        (
            (100u16..=599).prop_filter("a status with a body", |s| !status_has_no_body(*s)),
            arb_headers(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(status, headers, body)| Response {
                status,
                headers,
                body,
            })
    }

    /// Reads requests until None or an error (must terminate and not
    /// panic), checking that whatever decodes survives a rewrite; then the
    /// same bytes as a response. The fuzz target `http_parse` does the same.
    fn drain(bytes: &[u8], capacity: usize) {
        let mut r = BufReader::with_capacity(capacity, Cursor::new(bytes));
        while let Ok(Some(req)) = read_request(&mut r) {
            let mut again = Vec::new();
            // The writer may refuse (a rewrite can outgrow the limits), but
            // what it writes must read back to the same request.
            if write_request(&mut again, &req, HOST).is_ok() {
                let back = parse_ok(&again);
                assert_eq!(
                    (back.method, &back.path, &back.query, &back.body),
                    (req.method, &req.path, &req.query, &req.body)
                );
            }
        }
        let _ = read_response(&mut BufReader::with_capacity(capacity, Cursor::new(bytes)));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), capacity in 1usize..32) {
            drain(&bytes, capacity);
        }

        #[test]
        fn mutated_requests_never_panic(
            req in arb_request(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), any::<bool>()), 1..6),
            capacity in 1usize..32,
        ) {
            let mut bytes = wire(&req);
            for (at, byte, insert) in edits {
                let i = at.index(bytes.len());
                if insert { bytes.insert(i, byte) } else { bytes[i] = byte }
            }
            drain(&bytes, capacity);
        }

        #[test]
        fn every_truncation_is_closed(req in arb_request()) {
            let bytes = wire(&req);
            for cut in 0..bytes.len() {
                match parse(&bytes[..cut]) {
                    Ok(None) => prop_assert_eq!(cut, 0),
                    Err(e) => prop_assert_eq!(e.kind, HttpErrorKind::Closed, "cut {}", cut),
                    Ok(Some(other)) => prop_assert!(false, "cut {} gave {:?}", cut, other),
                }
            }
            prop_assert_eq!(parse_ok(&bytes), after_wire(&req));
        }

        #[test]
        fn request_round_trip_any(a in arb_request(), b in arb_request(), capacity in 1usize..64) {
            let mut bytes = wire(&a);
            bytes.extend(wire(&b));
            let mut r = BufReader::with_capacity(capacity, Cursor::new(&bytes));
            let got_a = read_request(&mut r).expect("a").expect("a");
            let got_b = read_request(&mut r).expect("b").expect("b");
            prop_assert!(read_request(&mut r).expect("eof").is_none());
            prop_assert_eq!(&got_a, &after_wire(&a));
            prop_assert_eq!(&got_b, &after_wire(&b));
            prop_assert_eq!(parse_ok(&wire(&got_a)), got_a);
        }

        #[test]
        fn request_new_agrees_with_the_wire(req in arb_request()) {
            // The target as written, given to Request::new, decodes the same.
            let bytes = wire(&req);
            let line = bytes.split(|&b| b == b' ').nth(1).unwrap_or_default();
            let target = String::from_utf8_lossy(line);
            let client = Request::new(req.method, &target);
            prop_assert_eq!((client.path, client.query), (req.path, req.query));
        }

        #[test]
        fn response_round_trip_any(resp in arb_response(), close in any::<bool>(), capacity in 1usize..64) {
            let bytes = wire_response(&resp, close);
            let mut r = BufReader::with_capacity(capacity, Cursor::new(&bytes));
            let got = read_response(&mut r).expect("read_response");
            prop_assert_eq!(got, response_after_wire(&resp, close));
        }
    }
}
