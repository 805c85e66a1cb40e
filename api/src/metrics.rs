//! Prometheus metrics for every ferry daemon (filter, sidecar, target) and
//! the control-plane server: a text-format encoder ([`Page`]) and a tiny
//! plain-HTTP endpoint ([`serve`], [`spawn`]) answering `GET /metrics`.
//!
//! # Encoder
//!
//! [`Page`] writes the Prometheus text exposition format, version 0.0.4
//! ([`CONTENT_TYPE`]). Callers add samples in whatever order their state is
//! easiest to walk; the page groups them by family (one `# HELP` and one
//! `# TYPE` line per family, families in the order first added, samples in
//! the order added) because the format requires a family's samples to be
//! contiguous. The encoder never panics and never produces a page a scraper
//! refuses because of what it was given:
//!
//! * Metric names are forced into `[a-zA-Z_:][a-zA-Z0-9_:]*` and label names
//!   into `[a-zA-Z_][a-zA-Z0-9_]*`: every other character becomes `_`, a name
//!   starting with a digit gets a `_` prefix, an empty name becomes `_`.
//!   Names that sanitize to the same string are the same family (or label).
//! * Label values are escaped (`\` as `\\`, `"` as `\"`, line feed as `\n`),
//!   HELP text too (`\` and line feed). Everything else is UTF-8 as given.
//! * A label repeated within one sample keeps its first value: a scraper
//!   refuses the whole page over a duplicate label name.
//! * Values print as the shortest string that reads back as the same `f64`:
//!   plain decimals in the usual range (`3`, `0.25`, `9007199254740992`), an
//!   exponent for very large or small magnitudes (`1e300`), and `NaN`,
//!   `+Inf`, `-Inf`.
//! * A family's HELP and TYPE are those of its first sample; a counter's
//!   name is used as given (the caller appends `_total`).
//! * An empty page renders as the empty string (a valid, empty exposition);
//!   anything else ends with a newline.
//!
//! What the encoder does not check is the caller's business: two samples of
//! one family with the same label set (a scraper reports a duplicate
//! series), or label names starting with `__` (reserved by Prometheus).
//!
//! # Endpoint
//!
//! [`serve`] answers `GET /metrics` with a fresh page from the caller's
//! render function for every scrape, `GET /` with a one-line pointer to
//! `/metrics`, 405 for another method on those two paths, 404 for any other
//! path. It speaks the strict codec of [`crate::http`]: one request per
//! connection (`Connection: close`), 10 s read and write timeouts, at most
//! [`MAX_CONNECTIONS`] connections at once (further ones are closed as soon
//! as accepted), so a misbehaving scraper costs a bounded number of threads.
//!
//! The endpoint is plain HTTP on purpose: Prometheus scrapes without TLS by
//! default, and the page holds operational figures only (queue depths, byte
//! counts, lags), no secrets and no control. It is still unauthenticated:
//! **bind it to loopback or a management network**, never to an interface
//! reachable from where it need not be.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::http::{self, HttpErrorKind, Method, Request, Response};

/// The `Content-Type` of a metrics page: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The most connections [`serve`] handles at once; more are closed as soon
/// as accepted. A scraper needs one at a time; the bound keeps a flood of
/// idle connections from costing unbounded threads.
pub const MAX_CONNECTIONS: usize = 16;

/// Read and write timeout of one connection: a scraper sends its request at
/// once and reads the page at once, so a connection silent this long is
/// stuck or hostile and gives its slot back.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the accept loop looks at the stop flag when idle.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long, at most, a connection waits for the peer to close after the
/// response (see [`linger`]).
const LINGER_TIME: Duration = Duration::from_secs(1);

/// How many bytes, at most, [`linger`] reads and discards.
const LINGER_BYTES: usize = 64 * 1024;

/// The type of a metric family, as written on its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down (queue depth, lag, bytes in use).
    Gauge,
    /// A value that only goes up, reset only by a restart (bytes shipped);
    /// by convention its name ends in `_total`.
    Counter,
}

impl Kind {
    /// The keyword of the `# TYPE` line: `"gauge"` or `"counter"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        }
    }
}

/// One metric family of a [`Page`]: its header and its sample lines so far.
#[derive(Debug)]
struct Family {
    /// The sanitized name.
    name: String,
    /// The HELP text, already escaped.
    help: String,
    /// The type of the family's first sample.
    kind: Kind,
    /// The rendered sample lines, each ending with a newline.
    samples: String,
}

/// A metrics page being written: families in the order first added.
///
/// Add samples with [`Page::sample`], then [`Page::render`] the text. A page
/// is built afresh for every scrape; it is cheap (one string per family).
#[derive(Debug, Default)]
pub struct Page {
    /// The families in the order first added.
    families: Vec<Family>,
    /// Sanitized family name to its index in `families`, so interleaved
    /// samples of one family still end up together.
    index: HashMap<String, usize>,
}

impl Page {
    /// An empty page.
    pub fn new() -> Page {
        Page::default()
    }

    /// Whether no sample has been added.
    pub fn is_empty(&self) -> bool {
        self.families.is_empty()
    }

    /// Adds one sample of family `name` (with HELP `help` and TYPE `kind`,
    /// written once per family, at its first sample). Labels are
    /// `(name, value)` pairs, written in the order given.
    ///
    /// Invalid characters of `name` and of the label names become `_`; a
    /// repeated label name keeps its first value; `help` and `kind` of later
    /// samples of a family are ignored. See the module documentation.
    pub fn sample(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: &[(&str, &str)],
        value: f64,
    ) {
        let name = sanitize_name(name, true);
        let at = match self.index.get(&name) {
            Some(&at) => at,
            None => {
                let at = self.families.len();
                self.families.push(Family {
                    name: name.clone(),
                    help: escape_help(help),
                    kind,
                    samples: String::new(),
                });
                self.index.insert(name.clone(), at);
                at
            }
        };
        // `index` only holds positions of `families`, so this always finds
        // the family; the `if let` keeps the encoder panic-free regardless.
        if let Some(family) = self.families.get_mut(at) {
            write_sample(&mut family.samples, &name, labels, value);
        }
    }

    /// The page in text format 0.0.4: for each family its `# HELP` and
    /// `# TYPE` lines, then its samples. The empty string for an empty page;
    /// otherwise the text ends with a newline.
    pub fn render(&self) -> String {
        let len = self
            .families
            .iter()
            .map(|f| 2 * f.name.len() + f.help.len() + f.samples.len() + 24)
            .sum();
        let mut out = String::with_capacity(len);
        for family in &self.families {
            out.push_str("# HELP ");
            out.push_str(&family.name);
            // Always the space, also for an empty help: the same as the
            // reference client (client_golang) writes.
            out.push(' ');
            out.push_str(&family.help);
            out.push_str("\n# TYPE ");
            out.push_str(&family.name);
            out.push(' ');
            out.push_str(family.kind.as_str());
            out.push('\n');
            out.push_str(&family.samples);
        }
        out
    }
}

/// Appends one sample line (`name{labels} value\n`) to `out`.
fn write_sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    let mut seen: Vec<String> = Vec::with_capacity(labels.len());
    for (label, label_value) in labels {
        let label = sanitize_name(label, false);
        if seen.contains(&label) {
            continue;
        }
        out.push(if seen.is_empty() { '{' } else { ',' });
        out.push_str(&label);
        out.push_str("=\"");
        escape_label_value(out, label_value);
        out.push('"');
        seen.push(label);
    }
    if !seen.is_empty() {
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_value(value));
    out.push('\n');
}

/// Forces `name` into the metric name (`colon` true) or label name syntax:
/// every character outside `[a-zA-Z0-9_]` (plus `:` for metric names)
/// becomes `_`, a leading digit gets a `_` prefix, and an empty name is `_`.
/// Replacing rather than refusing keeps a daemon's page scrapable whatever
/// names a caller composes (for instance from a disk or host name).
fn sanitize_name(name: &str, colon: bool) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.chars().next().is_none_or(|c| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':') {
            c
        } else {
            '_'
        }
    }));
    out
}

/// Appends `value` to `out` with the escapes of a label value: `\`, `"` and
/// line feed. These are the only characters that would end the value or the
/// line early; everything else is taken as UTF-8 by the scraper.
fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// HELP text with its escapes: `\` and line feed (a quote needs none in a
/// comment line).
fn escape_help(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// A sample value as Prometheus (Go's `strconv.ParseFloat`) reads it.
///
/// Rust's `Display` for `f64` is the shortest decimal that reads back as the
/// same value, but never uses an exponent, so `1e300` would be 301 digits;
/// outside `[1e-5, 1e16)` the (equally exact) exponent form is used instead.
/// Integers up to 2^53 fall in the plain range and print without `.0`.
fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_owned()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else if value == 0.0 {
        // Also -0.0, which `Display` would print as "-0": same value.
        "0".to_owned()
    } else if (1e-5..1e16).contains(&value.abs()) {
        format!("{value}")
    } else {
        format!("{value:e}")
    }
}

/// Serves `GET /metrics` (and `GET /` with a one-line pointer to
/// `/metrics`, 404 for anything else, 405 for other methods) over plain HTTP
/// on `listener` until `stop` is set, calling `render()` for every scrape.
///
/// Runs on the calling thread; one short-lived thread per connection (name
/// `"metrics-conn"`), at most [`MAX_CONNECTIONS`] at once (more connections
/// are closed at once), each with [`IO_TIMEOUT`] read/write timeouts and
/// `Connection: close` after one response. Errors of one connection never
/// end the server: a failed accept is retried, a malformed request gets its
/// 4xx answer, a panicking `render` gets a 500. The listener is made
/// nonblocking and polled every 50 ms so `stop` is seen promptly; if even
/// that fails (the socket is unusable), `serve` returns at once. Connection
/// threads still running when `serve` returns finish on their own, bounded
/// by their timeouts.
///
/// Plain HTTP, unauthenticated: bind the listener to loopback or a
/// management network (see the module documentation).
pub fn serve(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((tcp, _peer)) => {
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    // Closed unanswered: a 503 would mean reading the
                    // request first, i.e. a thread, which is what the bound
                    // is there to avoid.
                    drop(tcp);
                    continue;
                }
                // Taken on this thread before spawning, so the count never
                // lags behind the accepts; given back by Drop, also when the
                // connection thread panics or cannot be spawned (the closure
                // owning the slot is dropped then).
                let slot = Slot::take(&active);
                let render = Arc::clone(&render);
                let spawned = thread::Builder::new()
                    .name("metrics-conn".into())
                    .spawn(move || {
                        let _slot = slot;
                        handle(tcp, &*render);
                    });
                // Out of threads: this connection is closed (the stream was
                // moved into the dropped closure), the server goes on.
                drop(spawned);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // WouldBlock is the idle case; anything else (out of file
            // descriptors, a connection reset before accept) is transient
            // for a listener, and sleeping keeps it from busy-looping.
            Err(_) => thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Binds `addr` and runs [`serve`] on a new thread named `"metrics"`;
/// returns the bound address (port 0 picks one).
///
/// Errors binding, setting up the listener or starting the thread are
/// returned; afterwards the thread runs until `stop` is set (it is
/// detached: the caller's stop flag is its only handle).
pub fn spawn(
    addr: &str,
    stop: Arc<AtomicBool>,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    // Also done by `serve`, but here a failure reaches the caller.
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || serve(listener, stop, render))?;
    Ok(local)
}

/// One of the [`MAX_CONNECTIONS`] slots, given back when dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Counts one more connection in `active`.
    fn take(active: &Arc<AtomicUsize>) -> Slot {
        active.fetch_add(1, Ordering::AcqRel);
        Slot(Arc::clone(active))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one connection: one request, one response, close.
fn handle(tcp: TcpStream, render: &(dyn Fn() -> String + Send + Sync)) {
    // Accepted sockets inherit the listener's nonblocking mode on some
    // platforms (BSDs); the timeouts need blocking mode.
    let setup = tcp
        .set_nonblocking(false)
        .and_then(|()| tcp.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| tcp.set_write_timeout(Some(IO_TIMEOUT)));
    if setup.is_err() {
        return;
    }
    let response = match http::read_request(&mut BufReader::new(&tcp)) {
        Ok(Some(request)) => route(&request, render),
        // The peer went away or stalled: nobody to answer.
        Ok(None) => return,
        Err(e) if matches!(e.kind, HttpErrorKind::Io | HttpErrorKind::Closed) => return,
        Err(e) => {
            let mut response = Response::text(e.status(), &format!("{e}\n"));
            if e.kind == HttpErrorKind::MethodNotAllowed {
                response.headers.push(allow_get());
            }
            response
        }
    };
    // Buffered so the head and a small body leave in one segment instead of
    // two writes meeting Nagle and delayed ACKs; write_response flushes.
    if http::write_response(&mut BufWriter::new(&tcp), &response, true).is_ok() {
        linger(&tcp);
    }
}

/// The response to one well-formed request.
fn route(request: &Request, render: &(dyn Fn() -> String + Send + Sync)) -> Response {
    // The query is ignored: Prometheus sends none, and nothing here takes
    // parameters.
    match (request.method, request.path.as_str()) {
        (Method::Get, "/metrics") => {
            // A panic in the caller's render code costs this scrape, not the
            // server; the scraper sees a 500 instead of a reset.
            let Ok(body) = panic::catch_unwind(AssertUnwindSafe(render)) else {
                return Response::text(500, "rendering the metrics failed\n");
            };
            if body.len() > http::MAX_BODY_BYTES {
                // write_response would refuse it; say why instead.
                return Response::text(500, "metrics page exceeds the body size limit\n");
            }
            Response {
                status: 200,
                headers: vec![("content-type".to_owned(), CONTENT_TYPE.to_owned())],
                body: body.into_bytes(),
            }
        }
        (Method::Get, "/") => Response::text(200, "ferry metrics: GET /metrics\n"),
        (_, "/metrics" | "/") => {
            let mut response = Response::text(405, "only GET is supported here\n");
            response.headers.push(allow_get());
            response
        }
        _ => Response::text(404, "not found; the metrics are at /metrics\n"),
    }
}

/// The `Allow` header of a 405 (RFC 9110 15.5.6 requires one).
fn allow_get() -> (String, String) {
    ("allow".to_owned(), "GET".to_owned())
}

/// Closes the connection gracefully after the response: signals EOF, then
/// reads and discards what the peer still sends, until it closes, for at
/// most [`LINGER_TIME`] and [`LINGER_BYTES`].
///
/// Closing a socket with unread received bytes makes the kernel send a
/// reset, which can destroy the response before the peer has read it (a
/// request refused before its body was read, say). Best effort: errors only
/// end the lingering.
fn linger(tcp: &TcpStream) {
    if tcp.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER_TIME;
    let mut buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let mut reader = tcp;
    while left > 0 {
        let now = Instant::now();
        let Some(wait) = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())
        else {
            return;
        };
        if tcp.set_read_timeout(Some(wait)).is_err() {
            return;
        }
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;

    // -- encoder ------------------------------------------------------------

    #[test]
    fn families_are_grouped_with_one_header_each() {
        let mut page = Page::new();
        page.sample(
            "ferry_lag_seconds",
            "Replication lag.",
            Kind::Gauge,
            &[("disk", "a")],
            1.5,
        );
        page.sample(
            "ferry_bytes_total",
            "Bytes shipped.",
            Kind::Counter,
            &[],
            10.0,
        );
        page.sample(
            "ferry_lag_seconds",
            "ignored",
            Kind::Counter,
            &[("disk", "b")],
            2.0,
        );
        page.sample("ferry_bytes_total", "ignored", Kind::Gauge, &[], 11.0);
        assert_eq!(
            page.render(),
            "# HELP ferry_lag_seconds Replication lag.\n\
             # TYPE ferry_lag_seconds gauge\n\
             ferry_lag_seconds{disk=\"a\"} 1.5\n\
             ferry_lag_seconds{disk=\"b\"} 2\n\
             # HELP ferry_bytes_total Bytes shipped.\n\
             # TYPE ferry_bytes_total counter\n\
             ferry_bytes_total 10\n\
             ferry_bytes_total 11\n"
        );
        assert!(!page.is_empty());
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut page = Page::new();
        page.sample(
            "m",
            "a \\ b\nc \"q\"",
            Kind::Gauge,
            &[("path", "C:\\dir\n\"x\"\r"), ("empty", "")],
            1.0,
        );
        assert_eq!(
            page.render(),
            "# HELP m a \\\\ b\\nc \"q\"\n\
             # TYPE m gauge\n\
             m{path=\"C:\\\\dir\\n\\\"x\\\"\r\",empty=\"\"} 1\n"
        );
    }

    #[test]
    fn invalid_names_are_sanitized() {
        assert_eq!(
            sanitize_name("ferry:lag_seconds", true),
            "ferry:lag_seconds"
        );
        assert_eq!(sanitize_name("ferry:lag", false), "ferry_lag");
        assert_eq!(sanitize_name("9lives", true), "_9lives");
        assert_eq!(sanitize_name("", true), "_");
        assert_eq!(sanitize_name("", false), "_");
        assert_eq!(sanitize_name("a-b.c d", true), "a_b_c_d");
        assert_eq!(sanitize_name("größe", false), "gr__e");
        let mut page = Page::new();
        page.sample(
            "1 bad-name",
            "",
            Kind::Gauge,
            &[("disk-id", "x"), ("9", "y"), ("disk_id", "dup")],
            0.0,
        );
        assert_eq!(
            page.render(),
            "# HELP _1_bad_name \n# TYPE _1_bad_name gauge\n_1_bad_name{disk_id=\"x\",_9=\"y\"} 0\n"
        );
    }

    #[test]
    fn special_and_plain_values() {
        let line = |v: f64| {
            let mut page = Page::new();
            page.sample("v", "", Kind::Gauge, &[], v);
            page.render().lines().nth(2).unwrap_or_default().to_owned()
        };
        assert_eq!(line(f64::NAN), "v NaN");
        assert_eq!(line(f64::INFINITY), "v +Inf");
        assert_eq!(line(f64::NEG_INFINITY), "v -Inf");
        assert_eq!(line(-0.0), "v 0");
        assert_eq!(line(42.0), "v 42");
        assert_eq!(line(-0.25), "v -0.25");
        assert_eq!(line(9_007_199_254_740_992.0), "v 9007199254740992");
        assert_eq!(line(1e300), "v 1e300");
        assert_eq!(line(-1.5e-10), "v -1.5e-10");
        assert_eq!(line(f64::MIN_POSITIVE), "v 2.2250738585072014e-308");
    }

    #[test]
    fn empty_page_renders_empty() {
        let page = Page::new();
        assert!(page.is_empty());
        assert_eq!(page.render(), "");
    }

    /// One sample line read back: name, labels (unescaped), value.
    type Parsed = (String, Vec<(String, String)>, f64);

    /// A small independent parser of one sample line in text format 0.0.4
    /// (no timestamps); `None` if the line is not well formed.
    fn parse_sample(line: &str) -> Option<Parsed> {
        let name_end = line.find(['{', ' '])?;
        let name = &line[..name_end];
        if !valid_name(name, true) {
            return None;
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(after) = rest.strip_prefix('{') {
            rest = after;
            loop {
                let eq = rest.find('=')?;
                let label = &rest[..eq];
                if !valid_name(label, false) {
                    return None;
                }
                let mut chars = rest[eq + 1..].strip_prefix('"')?.char_indices();
                let mut value = String::new();
                let close = loop {
                    match chars.next()? {
                        (_, '\\') => match chars.next()?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            _ => return None,
                        },
                        (i, '"') => break i,
                        (_, '\n') => return None,
                        (_, c) => value.push(c),
                    }
                };
                labels.push((label.to_owned(), value));
                // `close` is relative to after `="`.
                rest = &rest[eq + 2 + close + 1..];
                if let Some(after) = rest.strip_prefix(',') {
                    rest = after;
                } else {
                    rest = rest.strip_prefix('}')?;
                    break;
                }
            }
        }
        let value = match rest.strip_prefix(' ')? {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            text => {
                // Go's ParseFloat takes this grammar; Rust's is close
                // enough, but refuse what Go would not ("inf", "infinity").
                if !text
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b"+-.e".contains(&b))
                {
                    return None;
                }
                text.parse().ok()?
            }
        };
        Some((name.to_owned(), labels, value))
    }

    /// `[a-zA-Z_:][a-zA-Z0-9_:]*` (without `:` for label names).
    fn valid_name(name: &str, colon: bool) -> bool {
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':');
        name.chars()
            .next()
            .is_some_and(|c| ok(c) && !c.is_ascii_digit())
            && name.chars().all(ok)
    }

    fn unescape_help(text: &str) -> Option<String> {
        let mut out = String::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    '\\' => out.push('\\'),
                    'n' => out.push('\n'),
                    _ => return None,
                },
                c => out.push(c),
            }
        }
        Some(out)
    }

    fn same_value(a: f64, b: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a == b
    }

    /// A name: mostly valid-ish ASCII, sometimes anything at all.
    fn arb_name() -> impl Strategy<Value = String> {
        prop_oneof![3 => "[a-zA-Z0-9_:]{0,6}", 1 => any::<String>()]
    }

    /// One sample: family name (from a few, so families interleave), help,
    /// kind, labels, value.
    type ArbSample = (String, String, bool, Vec<(String, String)>, f64);

    fn arb_sample() -> impl Strategy<Value = ArbSample> {
        (
            prop_oneof!["[abc]", arb_name()],
            any::<String>(),
            any::<bool>(),
            proptest::collection::vec((arb_name(), any::<String>()), 0..4),
            any::<f64>(),
        )
    }

    proptest! {
        #[test]
        fn every_sample_line_parses_back(samples in proptest::collection::vec(arb_sample(), 0..8)) {
            let mut page = Page::new();
            // The expected page: families in first-added order, each with
            // its first help and kind and its samples in order.
            let mut expected: Vec<(String, String, Kind, Vec<Parsed>)> = Vec::new();
            for (name, help, counter, labels, value) in &samples {
                let kind = if *counter { Kind::Counter } else { Kind::Gauge };
                let pairs: Vec<(&str, &str)> =
                    labels.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                page.sample(name, help, kind, &pairs, *value);
                let family = sanitize_name(name, true);
                let mut want_labels: Vec<(String, String)> = Vec::new();
                for (n, v) in labels {
                    let n = sanitize_name(n, false);
                    if !want_labels.iter().any(|(seen, _)| *seen == n) {
                        want_labels.push((n, v.clone()));
                    }
                }
                let sample = (family.clone(), want_labels, *value);
                match expected.iter_mut().find(|(f, ..)| *f == family) {
                    Some(entry) => entry.3.push(sample),
                    None => expected.push((family, help.clone(), kind, vec![sample])),
                }
            }
            let text = page.render();
            prop_assert!(text.is_empty() || text.ends_with('\n'));
            let mut lines = text.lines();
            for (family, help, kind, want) in &expected {
                let help_line = lines.next().unwrap_or_default();
                let got_help = help_line
                    .strip_prefix("# HELP ")
                    .and_then(|rest| rest.strip_prefix(family.as_str()))
                    .and_then(|rest| rest.strip_prefix(' '))
                    .and_then(unescape_help);
                prop_assert_eq!(got_help.as_ref(), Some(help), "{:?}", help_line);
                prop_assert_eq!(
                    lines.next().unwrap_or_default(),
                    format!("# TYPE {family} {}", kind.as_str())
                );
                for (name, labels, value) in want {
                    let line = lines.next().unwrap_or_default();
                    let Some((got_name, got_labels, got_value)) = parse_sample(line) else {
                        return Err(TestCaseError::fail(format!("unparsable: {line:?}")));
                    };
                    prop_assert_eq!(&got_name, name);
                    prop_assert_eq!(&got_labels, labels);
                    prop_assert!(same_value(got_value, *value), "{} vs {}", got_value, value);
                }
            }
            prop_assert_eq!(lines.next(), None);
        }
    }

    // -- endpoint -----------------------------------------------------------

    /// A test server: runs [`serve`] on a thread we can join.
    struct Server {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<thread::JoinHandle<()>>,
    }

    impl Server {
        fn start() -> Server {
            Server::with_render(test_render())
        }

        fn with_render(render: Arc<dyn Fn() -> String + Send + Sync>) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = listener.local_addr().expect("addr");
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let thread = thread::spawn(move || serve(listener, flag, render));
            Server {
                addr,
                stop,
                thread: Some(thread),
            }
        }

        /// Sets the stop flag and waits (polling, with a deadline) for the
        /// serve thread to end.
        fn stop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            let Some(thread) = self.thread.take() else {
                return;
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while !thread.is_finished() {
                assert!(Instant::now() < deadline, "serve did not stop");
                thread::sleep(Duration::from_millis(5));
            }
            thread.join().expect("serve panicked");
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }

    fn test_render() -> Arc<dyn Fn() -> String + Send + Sync> {
        Arc::new(|| {
            let mut page = Page::new();
            page.sample(
                "ferry_up",
                "Whether the daemon runs.",
                Kind::Gauge,
                &[("role", "test")],
                1.0,
            );
            page.render()
        })
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        tcp
    }

    /// Sends `raw` (then EOF if `half_close`), reads to the server's close.
    fn try_exchange(addr: SocketAddr, raw: &[u8], half_close: bool) -> std::io::Result<String> {
        let mut tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.write_all(raw)?;
        if half_close {
            tcp.shutdown(Shutdown::Write)?;
        }
        let mut out = Vec::new();
        tcp.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    fn exchange(addr: SocketAddr, raw: &[u8], half_close: bool) -> String {
        try_exchange(addr, raw, half_close).expect("exchange")
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let head = response.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn body(response: &str) -> &str {
        response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }

    #[test]
    fn scrape_over_a_real_socket() {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = spawn("127.0.0.1:0", Arc::clone(&stop), test_render()).expect("spawn");
        let response = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", false);
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert_eq!(header(&response, "content-type"), Some(CONTENT_TYPE));
        assert_eq!(header(&response, "connection"), Some("close"));
        assert_eq!(
            body(&response),
            "# HELP ferry_up Whether the daemon runs.\n# TYPE ferry_up gauge\nferry_up{role=\"test\"} 1\n"
        );
        let root = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false);
        assert!(root.starts_with("HTTP/1.1 200 "), "{root}");
        assert!(body(&root).contains("/metrics"), "{root}");
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn unknown_paths_methods_and_garbage() {
        let mut server = Server::start();
        let missing = exchange(
            server.addr,
            b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n",
            false,
        );
        assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
        let post = exchange(
            server.addr,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            false,
        );
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert_eq!(header(&post, "allow"), Some("GET"));
        // A method the codec does not know at all is a 405 too.
        let patch = exchange(server.addr, b"PATCH /metrics HTTP/1.1\r\n\r\n", false);
        assert!(patch.starts_with("HTTP/1.1 405 "), "{patch}");
        // read_to_end returning at all means the server closed.
        let garbage = exchange(server.addr, b"\x01\x02 garbage \xff\r\n\r\n", false);
        assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
        assert_eq!(header(&garbage, "connection"), Some("close"));
        // A peer that says nothing and closes gets nothing.
        assert_eq!(exchange(server.addr, b"", true), "");
        // The server survived all of that.
        let ok = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n", false);
        assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
        server.stop();
    }

    #[test]
    fn render_failures_are_500() {
        let too_big: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(|| "x".repeat(http::MAX_BODY_BYTES + 1));
        let panics: Arc<dyn Fn() -> String + Send + Sync> =
            Arc::new(|| panic!("render failed (expected by the test)"));
        for render in [too_big, panics] {
            let mut server = Server::with_render(render);
            let response = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n", false);
            assert!(response.starts_with("HTTP/1.1 500 "), "{response}");
            // The server goes on after either.
            let root = exchange(server.addr, b"GET / HTTP/1.1\r\n\r\n", false);
            assert!(root.starts_with("HTTP/1.1 200 "), "{root}");
            server.stop();
        }
    }

    #[test]
    fn connections_beyond_the_limit_are_closed() {
        let mut server = Server::start();
        // Idle connections, each holding a slot (its thread waits for a
        // request); accepted in connect order, so these take all slots.
        let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS).map(|_| connect(server.addr)).collect();
        let mut extra = connect(server.addr);
        extra
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .expect("write");
        let mut out = Vec::new();
        // Closed unanswered: EOF, or a reset because the request was unread.
        let _ = extra.read_to_end(&mut out);
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
        // Closing the idle ones gives the slots back (their threads see
        // EOF); then scrapes work again.
        drop(idle);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // A connection still over the limit is closed unanswered,
            // maybe with a reset: retry.
            let response = try_exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n", false);
            if response.is_ok_and(|r| r.starts_with("HTTP/1.1 200 ")) {
                break;
            }
            assert!(Instant::now() < deadline, "slots never came back");
            thread::sleep(Duration::from_millis(10));
        }
        server.stop();
    }

    #[test]
    fn stop_ends_serve() {
        let mut server = Server::start();
        let ok = exchange(server.addr, b"GET /metrics HTTP/1.1\r\n\r\n", false);
        assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
        server.stop();
    }

    #[test]
    fn spawn_reports_bind_errors() {
        let stop = Arc::new(AtomicBool::new(true));
        assert!(spawn("not an address", Arc::clone(&stop), test_render()).is_err());
    }
}
