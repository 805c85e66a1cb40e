//! The filter's control socket: a small versioned protocol of JSON lines.
//!
//! One request per line, one response per line, on `STATE/control.sock`:
//!
//! ```text
//! -> {"version":1,"op":"status"}
//! <- {"version":1,"ok":true,"status":{...HostStatus...}}
//! -> {"version":1,"op":"tag","name":"before-upgrade","app":true,"mounts":["/srv"],...}
//! <- {"version":1,"ok":true,"tag":{"name":"before-upgrade","seq":1234,...}}
//! -> {"version":1,"op":"barrier"}
//! <- {"version":1,"ok":true,"barrier":{"seq":1300}}
//! -> {"version":1,"op":"resync-all","disk":"data"}
//! <- {"version":1,"ok":true,"resync":{"bytes":4294967296,"disks":[{"name":"data","bytes":4294967296}]}}
//! <- {"version":1,"ok":false,"error":"..."}
//! ```
//!
//! - `status`: per disk the tracking state, ring fill, lag, counters,
//!   `dirty_bytes` (every dirty bit still set: awaiting a resync, or
//!   claimed and not yet committed) and `claimed_bytes` (dirty bits the
//!   ring holds resync records for, not yet committed by the consumer);
//!   `dirty_bytes == 0` in data state means nothing is left to resync and
//!   every resync record is durable at the target. Host-wide `seq` is the
//!   highest sequence number assigned so far, `next_seq` the next one.
//! - `tag`: a recovery point across all disks.
//! - `barrier`: waits until every request in flight on every disk has been
//!   recorded, then answers the highest sequence number assigned: every
//!   write whose data reached a backing device before the barrier has a
//!   sequence number at or below it. The sidecar asks after re-reading
//!   resync regions, to learn from which sequence number the replica can be
//!   consistent.
//! - `resync-all`: marks every allocated region of `disk` (all disks
//!   without `disk`) dirty, so housekeeping claims them again (the recovery
//!   site lost its copy); answers the bytes marked.
//!
//! A request with another `version` is answered with an error naming the
//! versions this side speaks; unknown fields are ignored so that newer
//! clients can add optional ones.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// File name of the control socket in the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest request line accepted.
const MAX_LINE: u64 = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Per-disk tracking state, ring fill, lag and counters.
    Status,
    /// Insert a tag across all disks.
    Tag(TagRequest),
    /// Wait for every in-flight request on every disk; answer the highest
    /// sequence number assigned.
    Barrier,
    /// Mark the whole allocated area of a disk (or all disks) dirty.
    ResyncAll(ResyncRequest),
    /// First half of a group point: hold every disk's writes, answer the
    /// quiet sequence (`held`), then wait for `commit` or `abort` on the
    /// same connection (at most `timeout_ms`; silence or a hang-up aborts).
    Hold(HoldRequest),
    /// After an app hold's `frozen` answer: hold the writes now.
    Proceed,
    /// Second half of a hold: take the tag and release.
    Commit,
    /// Second half of a hold: release without a tag.
    Abort,
}

/// What `hold` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRequest {
    /// Name of the tag a `commit` takes.
    pub name: String,
    /// Longest time writes stay held, ms (at most [`MAX_HOLD_MS`]).
    #[serde(default = "default_hold_ms")]
    pub timeout_ms: u64,
    /// App-consistent: first run the filter's own pre script and freeze its
    /// own file systems (`ferry filter --app-mount/--app-pre/--app-post`; a
    /// coordinator never names them) within [`APP_PREPARE_MS`], answer
    /// `frozen`, and hold only on `proceed` (the timeout counts from
    /// there); thaw after the release, run the post script after the
    /// answer.
    #[serde(default)]
    pub app: bool,
}

/// Time an app-consistent hold may spend on its pre script and freeze
/// before the hold's own timeout starts to count, ms.
pub const APP_PREPARE_MS: u64 = 10_000;

impl HoldRequest {
    /// How long the member may take from the request to its release:
    /// the timeout, plus the freeze allowance of an app hold.
    pub fn deadline_after(&self) -> Duration {
        let hold = Duration::from_millis(self.timeout_ms.clamp(1, MAX_HOLD_MS));
        if self.app {
            hold + Duration::from_millis(APP_PREPARE_MS)
        } else {
            hold
        }
    }
}

/// Default longest hold of a group point, ms.
pub const DEFAULT_HOLD_MS: u64 = 300;
/// Longest hold accepted, ms: writes of production hosts wait meanwhile.
pub const MAX_HOLD_MS: u64 = 10_000;

fn default_hold_ms() -> u64 {
    DEFAULT_HOLD_MS
}

/// Answer to a finished `hold`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldOutcome {
    /// The quiet sequence while held.
    pub held_seq: u64,
    /// Whether the tag was taken.
    pub committed: bool,
    /// The tag, when committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<TagOutcome>,
    /// How long writes were held, µs.
    pub held_us: u64,
}

/// What `resync-all` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncRequest {
    /// The disk; None: every disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

/// Answer to `barrier`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarrierOutcome {
    /// Highest sequence number assigned when every disk was quiet.
    pub seq: u64,
}

/// Answer to `resync-all`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncOutcome {
    /// Bytes marked dirty, all disks.
    pub bytes: u64,
    /// Per disk.
    pub disks: Vec<ResyncDisk>,
}

/// One disk's part of a `resync-all`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncDisk {
    /// Disk name.
    pub name: String,
    /// Bytes marked dirty (its allocated regions).
    pub bytes: u64,
}

/// What `ferry filter tag` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRequest {
    /// Tag name.
    pub name: String,
    /// App-consistent: freeze `mounts` and run the scripts around the tag.
    #[serde(default)]
    pub app: bool,
    /// Mount points to freeze (FIFREEZE) with `app`.
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
    /// Command run (through `sh -c`) before freezing.
    #[serde(default)]
    pub pre: Option<String>,
    /// Command run after thawing (always, even when something failed).
    #[serde(default)]
    pub post: Option<String>,
    /// Limit for each script and for the time file systems stay frozen, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// What a tag became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagOutcome {
    /// Tag name.
    pub name: String,
    /// Host-wide sequence number of the tag records.
    pub seq: u64,
    /// Whether it is app-consistent.
    pub app: bool,
    /// Disks the tag was recorded on.
    pub disks: Vec<String>,
    /// How long writes were held back for the tag, microseconds.
    pub barrier_us: u64,
    /// How long file systems were frozen, microseconds (0 without `app`).
    pub frozen_us: u64,
}

/// Status of the whole host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    /// Filter process id.
    pub pid: u32,
    /// State directory.
    pub state: PathBuf,
    /// Next host-wide sequence number.
    pub next_seq: u64,
    /// Highest host-wide sequence number assigned so far.
    #[serde(default)]
    pub seq: u64,
    /// Per disk.
    pub disks: Vec<DiskStatus>,
}

/// Status of one protected disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Disk name.
    pub name: String,
    /// Backing device or file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// `data`, `metadata` or `bitmap`.
    pub tracking: String,
    /// Why the disk is in that state.
    pub reason: String,
    /// Tracking-state changes since start.
    pub transitions: u64,
    /// Record slots in the ring and in use.
    pub ring_slots: u64,
    /// Slots holding unconsumed records.
    pub ring_slots_used: u64,
    /// Payload area and bytes in use.
    pub ring_payload: u64,
    /// Payload bytes held for the consumer.
    pub ring_payload_used: u64,
    /// Unconsumed records.
    pub lag_records: u64,
    /// Bytes written by unconsumed records.
    pub lag_bytes: u64,
    /// Age of the oldest unconsumed record, seconds.
    pub lag_seconds: f64,
    /// Bytes whose dirty bit is set (bitmap state, crash recovery, initial
    /// copy, resync-all): awaiting a resync, or claimed and not yet
    /// committed. 0 in data state: nothing left to resync.
    pub dirty_bytes: u64,
    /// Dirty bytes the ring holds resync records (claims) for that the
    /// consumer has not committed yet.
    #[serde(default)]
    pub claimed_bytes: u64,
    /// Counters since start.
    pub counters: Counters,
}

/// Per-disk counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Write requests.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read requests.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Flush requests.
    pub flushes: u64,
    /// Trim requests.
    pub trims: u64,
    /// Write-zeroes requests.
    pub zeroes: u64,
    /// Records published with payload.
    pub data_records: u64,
    /// Records published without payload.
    pub metadata_records: u64,
    /// Writes tracked only in the bitmap.
    pub bitmap_writes: u64,
    /// Resync records (claims of dirty bits) published.
    #[serde(default)]
    pub resync_records: u64,
    /// Activity-log syncs paid by writes to cold extents.
    pub al_syncs: u64,
    /// Backing-device errors.
    pub io_errors: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    #[serde(flatten)]
    body: T,
}

/// A response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub version: u32,
    /// Success.
    pub ok: bool,
    /// Error message when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Answer to `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<HostStatus>,
    /// Answer to `tag`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<TagOutcome>,
    /// Answer to `barrier`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub barrier: Option<BarrierOutcome>,
    /// Answer to `resync-all`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<ResyncOutcome>,
    /// First answer to an app `hold`: its file systems are frozen; it waits
    /// for `proceed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<bool>,
    /// Answer to `hold` (after `proceed` for an app hold): writes are held
    /// at this quiet sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<u64>,
    /// Final answer to `hold`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldOutcome>,
}

impl Response {
    fn ok() -> Self {
        Response {
            version: VERSION,
            ok: true,
            error: None,
            status: None,
            tag: None,
            barrier: None,
            resync: None,
            frozen: None,
            held: None,
            hold: None,
        }
    }

    fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(message.into()),
            ..Response::ok()
        }
    }
}

/// What the daemon does with requests.
pub trait Handler: Send + Sync {
    /// Current status.
    fn status(&self) -> HostStatus;
    /// Insert a tag.
    fn tag(&self, request: &TagRequest) -> Result<TagOutcome>;
    /// Wait for every in-flight request; the highest sequence number assigned.
    fn barrier(&self) -> Result<BarrierOutcome>;
    /// Mark a disk's (or every disk's) allocated area dirty.
    fn resync_all(&self, request: &ResyncRequest) -> Result<ResyncOutcome>;
    /// Hold every disk's writes, tell `link` the quiet sequence, and take
    /// the tag `request.name` if its verdict says so; release either way.
    /// An app hold first freezes and asks `link` to go on. Give up (an
    /// error, nothing held) if another tag keeps the disks past `deadline`,
    /// the request's last moment.
    fn hold(
        &self,
        request: &HoldRequest,
        deadline: std::time::Instant,
        link: &mut dyn HoldLink,
    ) -> Result<HoldOutcome>;
}

/// The coordinator's side of a hold, as the member sees it.
pub trait HoldLink {
    /// An app hold's file systems are frozen: say so and wait for the
    /// coordinator to go on (`proceed`). False: release without holding
    /// (an abort, silence past the freeze allowance, a hang-up).
    fn frozen(&mut self) -> bool;
    /// Writes are held at `seq`: say so and wait for the verdict. True:
    /// take the tag (`commit` before the hold's deadline).
    fn held(&mut self, seq: u64) -> bool;
}

/// Decode one request line and produce the response line.
pub fn answer(line: &str, handler: &dyn Handler) -> String {
    let response = match serde_json::from_str::<serde_json::Value>(line) {
        Err(e) => Response::error(format!("request is not JSON: {e}")),
        Ok(value) => match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(VERSION) => match serde_json::from_value::<Request>(value) {
                Err(e) => Response::error(format!("bad request: {e}")),
                Ok(Request::Status) => Response {
                    status: Some(handler.status()),
                    ..Response::ok()
                },
                Ok(Request::Tag(tag)) => match handler.tag(&tag) {
                    Ok(outcome) => Response {
                        tag: Some(outcome),
                        ..Response::ok()
                    },
                    Err(e) => Response::error(e.to_string()),
                },
                Ok(Request::Barrier) => match handler.barrier() {
                    Ok(outcome) => Response {
                        barrier: Some(outcome),
                        ..Response::ok()
                    },
                    Err(e) => Response::error(e.to_string()),
                },
                Ok(Request::ResyncAll(request)) => match handler.resync_all(&request) {
                    Ok(outcome) => Response {
                        resync: Some(outcome),
                        ..Response::ok()
                    },
                    Err(e) => Response::error(e.to_string()),
                },
                Ok(Request::Hold(_)) => {
                    Response::error("hold is answered on its connection (internal error)")
                }
                Ok(Request::Commit | Request::Abort | Request::Proceed) => {
                    Response::error("commit and abort follow a hold on the same connection")
                }
            },
            other => Response::error(format!(
                "control protocol version {other:?} not spoken here (this filter speaks {VERSION})"
            )),
        },
    };
    serde_json::to_string(&response).expect("responses serialize")
}

/// Serve the control socket until `stop` is set. Runs on its own thread and
/// returns only after every connection thread ended (they hold the handler).
pub fn serve(listener: UnixListener, handler: Arc<dyn Handler>, stop: Arc<AtomicBool>) {
    listener
        .set_nonblocking(true)
        .expect("nonblocking control socket");
    let mut connections: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        connections.retain(|c| !c.is_finished());
        match listener.accept() {
            Ok((stream, _)) => {
                let (handler, stop) = (Arc::clone(&handler), Arc::clone(&stop));
                let spawned = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || serve_connection(stream, handler.as_ref(), &stop));
                match spawned {
                    Ok(c) => connections.push(c),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start a control connection thread")
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Short: a group point's members should all start holding
                // within a few ms of the coordinator's request.
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    for c in connections {
        let _ = c.join();
    }
}

/// A connection the control protocol runs on: the unix socket, or a TLS
/// stream from a group coordinator (`grouplink`).
pub trait ControlStream: std::io::Read + Write {
    /// Sets the underlying socket's read timeout.
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
    /// Sets the underlying socket's write timeout.
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()>;
}

impl ControlStream for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_write_timeout(self, d)
    }
}

/// Which requests a connection may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// Everything (the local socket, mode 0600).
    All,
    /// Only `hold` with its verdict: a group coordinator over the network.
    HoldOnly,
}

/// One client: request lines in, response lines out, until it hangs up or
/// the filter stops (checked between reads, every 200 ms).
fn serve_connection(mut stream: UnixStream, handler: &dyn Handler, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    serve_lines(&mut stream, handler, stop, Allowed::All);
}

/// The request loop of one connection (see [`serve_connection`]).
pub fn serve_lines<S: ControlStream>(
    stream: &mut S,
    handler: &dyn Handler,
    stop: &AtomicBool,
    allowed: Allowed,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            let reply = match (hold_request(&line), allowed) {
                (Some(hold), _) => hold_round(stream, &mut pending, handler, &hold),
                (None, Allowed::All) => answer(&line, handler),
                (None, Allowed::HoldOnly) => {
                    serde_json::to_string(&Response::error("only hold is served on this port"))
                        .unwrap_or_default()
                }
            };
            if writeln!(stream, "{reply}")
                .and_then(|()| stream.flush())
                .is_err()
            {
                return;
            }
        }
        if pending.len() as u64 > MAX_LINE {
            let reply = serde_json::to_string(&Response::error("request line too long"))
                .unwrap_or_default();
            let _ = writeln!(stream, "{reply}");
            return;
        }
    }
}

/// The `hold` request a line carries, if it is one (of this version).
fn hold_request(line: &str) -> Option<HoldRequest> {
    match serde_json::from_str::<Envelope<Request>>(line) {
        Ok(Envelope {
            version: VERSION,
            body: Request::Hold(h),
        }) => Some(h),
        _ => None,
    }
}

/// Run a hold on this connection: answer `held`, wait (until the hold's
/// deadline) for the next line, commit if it says so, answer the outcome.
fn hold_round<S: ControlStream>(
    stream: &mut S,
    pending: &mut Vec<u8>,
    handler: &dyn Handler,
    hold: &HoldRequest,
) -> String {
    // The deadline runs from the request: waiting for the tag lock and
    // for writes in flight comes out of it, so writes stay held no longer
    // than the timeout after the coordinator asked (for an app hold: after
    // it said `proceed`).
    let now = std::time::Instant::now();
    let timeout = Duration::from_millis(hold.timeout_ms.clamp(1, MAX_HOLD_MS));
    let mut link = LineLink {
        stream,
        pending,
        hold_deadline: now + timeout,
        prepare_deadline: now + Duration::from_millis(APP_PREPARE_MS),
        timeout,
    };
    let outcome = handler.hold(hold, now + hold.deadline_after(), &mut link);
    let _ = link
        .stream
        .set_read_timeout(Some(Duration::from_millis(200)));
    let response = match outcome {
        Ok(o) => Response {
            hold: Some(o),
            ..Response::ok()
        },
        Err(e) => Response::error(e.to_string()),
    };
    serde_json::to_string(&response).expect("responses serialize")
}

/// [`HoldLink`] over the connection the hold came on.
struct LineLink<'a, S: ControlStream> {
    stream: &'a mut S,
    pending: &'a mut Vec<u8>,
    hold_deadline: std::time::Instant,
    prepare_deadline: std::time::Instant,
    timeout: Duration,
}

impl<S: ControlStream> LineLink<'_, S> {
    /// Sends `response` by `until`; false if it could not.
    fn send(&mut self, response: &Response, until: std::time::Instant) -> bool {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let line = serde_json::to_string(response).expect("responses serialize");
        // A coordinator that does not read cannot keep the writes held.
        let _ = self.stream.set_write_timeout(Some(left));
        let sent = writeln!(self.stream, "{line}").and_then(|()| self.stream.flush());
        let _ = self.stream.set_write_timeout(None);
        sent.is_ok()
    }

    /// The next request line by `until`, if one comes.
    fn next_request(&mut self, until: std::time::Instant) -> Option<Request> {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return match serde_json::from_slice::<Envelope<Request>>(&line) {
                    Ok(Envelope {
                        version: VERSION,
                        body,
                    }) => Some(body),
                    _ => None,
                };
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || self.pending.len() as u64 > MAX_LINE {
                return None;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            match self.stream.read(&mut chunk) {
                Ok(n) if n > 0 => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                _ => return None, // hang-up or deadline
            }
        }
    }
}

impl<S: ControlStream> HoldLink for LineLink<'_, S> {
    fn frozen(&mut self) -> bool {
        let frozen = Response {
            frozen: Some(true),
            ..Response::ok()
        };
        let until = self.prepare_deadline;
        if !self.send(&frozen, until) {
            return false;
        }
        // `proceed` starts the hold's own clock; anything else releases.
        let go = matches!(self.next_request(until), Some(Request::Proceed));
        self.hold_deadline = std::time::Instant::now() + self.timeout;
        go
    }

    fn held(&mut self, seq: u64) -> bool {
        let held = Response {
            held: Some(seq),
            ..Response::ok()
        };
        let until = self.hold_deadline;
        // The verdict: `commit` takes the tag; anything else (abort, a stray
        // request, silence past the deadline, a hang-up) releases without.
        self.send(&held, until) && matches!(self.next_request(until), Some(Request::Commit))
    }
}

/// Client side: send one request to the filter whose state directory is `state`.
pub fn call(state: &Path, request: &Request, timeout: Duration) -> Result<Response> {
    let path = state.join(SOCKET_NAME);
    let stream = UnixStream::connect(&path).map_err(|e| {
        Error::io(
            e,
            "connect to the filter's control socket (is `ferry filter` running?)",
        )
        .with_path(&path)
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| Error::io(e, "set timeout"))?;
    let mut writer = stream
        .try_clone()
        .map_err(|e| Error::io(e, "clone socket"))?;
    let line = serde_json::to_string(&Envelope {
        version: VERSION,
        body: request,
    })
    .map_err(|e| Error::control(e.to_string()))?;
    writeln!(writer, "{line}").map_err(|e| Error::io(e, "send request").with_path(&path))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| Error::io(e, "read response").with_path(&path))?;
    let response: Response = serde_json::from_str(&reply)
        .map_err(|e| Error::control(format!("malformed response {reply:?}: {e}")))?;
    if !response.ok {
        return Err(Error::control(
            response.error.unwrap_or_else(|| "request failed".into()),
        ));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;

    impl Handler for Fake {
        fn status(&self) -> HostStatus {
            HostStatus {
                pid: 7,
                state: "/s".into(),
                next_seq: 42,
                seq: 41,
                disks: Vec::new(),
            }
        }
        fn tag(&self, request: &TagRequest) -> Result<TagOutcome> {
            if request.name.is_empty() {
                return Err(Error::control("empty tag name"));
            }
            Ok(TagOutcome {
                name: request.name.clone(),
                seq: 9,
                app: request.app,
                disks: vec!["d".into()],
                barrier_us: 1,
                frozen_us: 0,
            })
        }
        fn barrier(&self) -> Result<BarrierOutcome> {
            Ok(BarrierOutcome { seq: 41 })
        }
        fn resync_all(&self, request: &ResyncRequest) -> Result<ResyncOutcome> {
            match request.disk.as_deref() {
                Some("nope") => Err(Error::control("no disk named nope")),
                d => Ok(ResyncOutcome {
                    bytes: 8,
                    disks: vec![ResyncDisk {
                        name: d.unwrap_or("d").into(),
                        bytes: 8,
                    }],
                }),
            }
        }
        fn hold(
            &self,
            request: &HoldRequest,
            _deadline: std::time::Instant,
            link: &mut dyn HoldLink,
        ) -> Result<HoldOutcome> {
            if request.app && !link.frozen() {
                return Ok(HoldOutcome {
                    held_seq: 0,
                    committed: false,
                    tag: None,
                    held_us: 0,
                });
            }
            let committed = link.held(41);
            Ok(HoldOutcome {
                held_seq: 41,
                committed,
                tag: committed.then(|| TagOutcome {
                    name: request.name.clone(),
                    seq: 42,
                    app: false,
                    disks: Vec::new(),
                    barrier_us: 0,
                    frozen_us: 0,
                }),
                held_us: 0,
            })
        }
    }

    /// The control socket served for [`Fake`] in a fresh directory.
    fn serve_fake(tag: &str) -> (PathBuf, Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!("ferry-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(SOCKET_NAME);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || serve(listener, Arc::new(Fake), stop))
        };
        (dir, stop, server)
    }

    /// A hold over a real socket: `held` first, then the outcome the
    /// second line chose; silence past the deadline and a hang-up abort.
    #[test]
    fn an_app_hold_freezes_first_and_holds_only_on_proceed() {
        use std::io::{BufRead, BufReader, Write};
        let (dir, stop, server) = serve_fake("hold-app");
        let path = dir.join(SOCKET_NAME);
        let stream = UnixStream::connect(&path).unwrap();
        let mut w = stream.try_clone().unwrap();
        let mut r = BufReader::new(stream);
        let mut read = || {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            serde_json::from_str::<Response>(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
        };
        let hold = r#"{"version":1,"op":"hold","name":"g2","timeout_ms":5000,"app":true}"#;
        // Frozen, then proceed, held, commit: the tag.
        writeln!(w, "{hold}").unwrap();
        assert_eq!(read().frozen, Some(true));
        writeln!(w, r#"{{"version":1,"op":"proceed"}}"#).unwrap();
        assert_eq!(read().held, Some(41));
        writeln!(w, r#"{{"version":1,"op":"commit"}}"#).unwrap();
        assert!(read().hold.unwrap().committed);
        // Frozen, then abort: released without ever holding.
        writeln!(w, "{hold}").unwrap();
        assert_eq!(read().frozen, Some(true));
        writeln!(w, r#"{{"version":1,"op":"abort"}}"#).unwrap();
        let done = read();
        assert!(done.held.is_none());
        assert!(!done.hold.unwrap().committed);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_hold_commits_aborts_and_times_out_on_its_connection() {
        use std::io::{BufRead, BufReader, Write};
        let (dir, stop, server) = serve_fake("hold");
        let path = dir.join(SOCKET_NAME);
        let round = |second: Option<&str>, timeout_ms: u64| {
            let stream = UnixStream::connect(&path).unwrap();
            let mut w = stream.try_clone().unwrap();
            let mut r = BufReader::new(stream);
            writeln!(
                w,
                r#"{{"version":1,"op":"hold","name":"g1","timeout_ms":{timeout_ms}}}"#
            )
            .unwrap();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let held: Response = serde_json::from_str(&line).unwrap();
            assert_eq!(held.held, Some(41), "{line}");
            if let Some(op) = second {
                writeln!(w, r#"{{"version":1,"op":"{op}"}}"#).unwrap();
            }
            line.clear();
            r.read_line(&mut line).unwrap();
            let done: Response = serde_json::from_str(&line).unwrap();
            done.hold.unwrap()
        };
        let c = round(Some("commit"), 5_000);
        assert!(c.committed);
        assert_eq!(c.tag.unwrap().name, "g1");
        assert!(!round(Some("abort"), 5_000).committed);
        assert!(
            !round(None, 50).committed,
            "silence past the deadline aborts"
        );
        // Outside a hold, commit is refused.
        let r: Response =
            serde_json::from_str(&answer(r#"{"version":1,"op":"commit"}"#, &Fake)).unwrap();
        assert!(!r.ok);
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn requests_and_versions() {
        let ok: Response =
            serde_json::from_str(&answer(r#"{"version":1,"op":"status"}"#, &Fake)).unwrap();
        assert!(ok.ok);
        assert_eq!(ok.status.unwrap().next_seq, 42);
        let bad: Response =
            serde_json::from_str(&answer(r#"{"version":2,"op":"status"}"#, &Fake)).unwrap();
        assert!(!bad.ok);
        assert!(bad.error.unwrap().contains("speaks 1"));
        let junk: Response = serde_json::from_str(&answer("{nope", &Fake)).unwrap();
        assert!(!junk.ok);
        let tag: Response = serde_json::from_str(&answer(
            r#"{"version":1,"op":"tag","name":"t1","future_field":3}"#,
            &Fake,
        ))
        .unwrap();
        assert_eq!(tag.tag.unwrap().seq, 9);
        let failed: Response =
            serde_json::from_str(&answer(r#"{"version":1,"op":"tag","name":""}"#, &Fake)).unwrap();
        assert_eq!(failed.error.as_deref(), Some("empty tag name"));
        let line = answer(r#"{"version":1,"op":"barrier"}"#, &Fake);
        assert_eq!(line, r#"{"version":1,"ok":true,"barrier":{"seq":41}}"#);
        let line = answer(r#"{"version":1,"op":"resync-all","disk":"x"}"#, &Fake);
        assert_eq!(
            line,
            r#"{"version":1,"ok":true,"resync":{"bytes":8,"disks":[{"name":"x","bytes":8}]}}"#
        );
        let all: Response =
            serde_json::from_str(&answer(r#"{"version":1,"op":"resync-all"}"#, &Fake)).unwrap();
        assert_eq!(all.resync.unwrap().disks[0].name, "d");
        let unknown: Response = serde_json::from_str(&answer(
            r#"{"version":1,"op":"resync-all","disk":"nope"}"#,
            &Fake,
        ))
        .unwrap();
        assert!(!unknown.ok);
        // What the client sends.
        let sent = serde_json::to_string(&Envelope {
            version: VERSION,
            body: &Request::Barrier,
        })
        .unwrap();
        assert_eq!(sent, r#"{"version":1,"op":"barrier"}"#);
        let sent = serde_json::to_string(&Envelope {
            version: VERSION,
            body: &Request::ResyncAll(ResyncRequest {
                disk: Some("data".into()),
            }),
        })
        .unwrap();
        assert_eq!(sent, r#"{"version":1,"op":"resync-all","disk":"data"}"#);
    }

    #[test]
    fn socket_round_trip() {
        let (dir, stop, server) = serve_fake("control");
        let r = call(&dir, &Request::Status, Duration::from_secs(5)).unwrap();
        assert_eq!(r.status.unwrap().pid, 7);
        let e = call(
            &dir,
            &Request::Tag(TagRequest::default()),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(e.to_string().contains("empty tag name"));
        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
