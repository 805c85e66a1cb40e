//! The target's side of a sidecar connection.
//!
//! ```text
//! sidecar                              target
//!   Hello{host, disks,        ->         checks: version, host = the client
//!         retention_secs}                certificate's, data key known,
//!                                        disk sizes match the replicas;
//!                                        a non-zero retention is recorded
//!                                        (crate::hostpolicy)
//!                             <-       Welcome{resume: next_seq, epoch,
//!                                        consistent_from per disk}
//!   ChangeSet                 ->         checks: host and disk are this
//!                                        connection's, payload authenticates
//!                                        under the disk key; journal append
//!                                        (fsync)
//!                             <-       Ack{last durable seq}   (also for a
//!                                        duplicate: the set is already held)
//!   BlockHashes               ->         once everything received is applied,
//!                             <-       HashDiff (which blocks differ)
//!   Progress / Heartbeat      ->       (Heartbeat answered)
//! ```
//!
//! Any refusal is a [`Reject`] with a code from
//! [`ferry_protocol::message::reject`] (mapped in one place,
//! [`refusal_of`]), after which the connection is closed; nothing was
//! written. Refusals are logged at most once per code every
//! [`LOG_INTERVAL`] per process, with the count of those not logged.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::message::{
    reject, Ack, BlockHashes, ChangeSet, DiskResume, HashDiff, Heartbeat, Message, Reject, Welcome,
    PROTOCOL_VERSION,
};
use ferry_protocol::payload::{verify_change_set, Key};

use crate::error::ErrorKind;
use crate::site::{DiskHandle, Site};

/// Least time between two log lines for the same refusal code.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A refusal sent to the peer: wire code and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Code from [`reject`].
    pub code: u16,
    /// Reason (at most 255 bytes on the wire).
    pub message: String,
}

impl Refusal {
    fn new(code: u16, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "refused (code {}): {}", self.code, self.message)
    }
}

/// Map a journal error on append to a refusal, or `None` for a duplicate
/// (which is acknowledged instead).
pub fn refusal_of(e: &crate::Error) -> Option<Refusal> {
    let code = match e.kind() {
        ErrorKind::Duplicate => return None,
        ErrorKind::Gap => reject::GAP,
        ErrorKind::InvalidInput if e.detail().contains("stale epoch") => reject::STALE_EPOCH,
        ErrorKind::InvalidInput => reject::MALFORMED,
        ErrorKind::Io | ErrorKind::Corrupt => reject::INTERNAL,
        ErrorKind::Stopped => reject::FAILED_OVER,
    };
    Some(Refusal::new(code, e.to_string()))
}

/// Logs refusals at most once per code per [`LOG_INTERVAL`].
#[derive(Debug, Default)]
pub struct RefusalLog {
    seen: Mutex<HashMap<u16, (Instant, u64)>>,
}

impl RefusalLog {
    /// Log `r` from `peer` unless the same code was logged recently.
    pub fn log(&self, peer: &str, r: &Refusal) {
        let mut seen = self.seen.lock().expect("refusal log");
        let now = Instant::now();
        let entry = seen.entry(r.code).or_insert((now - LOG_INTERVAL * 2, 0));
        if now.duration_since(entry.0) >= LOG_INTERVAL {
            let suppressed = entry.1;
            *entry = (now, 0);
            tracing::warn!(peer, code = r.code, suppressed, reason = %r.message, "refused a sidecar");
        } else {
            entry.1 += 1;
        }
    }
}

/// Where a host's disk keys come from.
pub type KeySource = dyn Fn(&str, &str) -> Result<Key, String> + Send + Sync;

/// What every connection shares.
pub struct ServerContext {
    /// The data directory.
    pub site: Arc<Site>,
    /// This target's name (in Welcome).
    pub target_name: String,
    /// The data key of (host, disk); an error means the host is unknown.
    pub keys: Box<KeySource>,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Rate-limited refusal log.
    pub refusals: RefusalLog,
}

impl std::fmt::Debug for ServerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerContext")
            .field("target_name", &self.target_name)
            .field("max_frame", &self.max_frame)
            .finish_non_exhaustive()
    }
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The peer closed it.
    Closed,
    /// We refused something and closed it.
    Refused(Refusal),
    /// Transport error (reset, timeout).
    Transport(String),
}

fn send(stream: &mut impl Write, m: &Message) -> Result<(), String> {
    m.write_to(stream).map_err(|e| e.to_string())?;
    stream.flush().map_err(|e| e.to_string())
}

fn refuse(ctx: &ServerContext, stream: &mut impl Write, peer: &str, r: Refusal) -> Ended {
    ctx.refusals.log(peer, &r);
    let mut message = r.message.clone();
    if message.len() > 255 {
        let mut cut = 255;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let _ = send(
        stream,
        &Message::Reject(Reject {
            code: r.code,
            message,
        }),
    );
    Ended::Refused(r)
}

fn read_message(ctx: &ServerContext, stream: &mut impl Read) -> Result<Option<Message>, Refusal> {
    match Message::read_from(stream, ctx.max_frame) {
        Ok(m) => Ok(Some(m)),
        Err(e)
            if matches!(
                e.kind(),
                ferry_protocol::ErrorKind::Io | ferry_protocol::ErrorKind::Closed
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(Refusal::new(reject::MALFORMED, e.to_string())),
    }
}

/// Serve one sidecar connection until it closes or is refused.
/// `peer_is(stream, host)` says whether the authenticated peer is `host`
/// (the TLS client certificate check).
pub fn serve_connection<S: Read + Write>(
    ctx: &ServerContext,
    stream: &mut S,
    peer: &str,
    peer_is: impl Fn(&S, &str) -> bool,
) -> Ended {
    let hello = match read_message(ctx, stream) {
        Ok(Some(Message::Hello(h))) => h,
        Ok(Some(other)) => {
            let r = Refusal::new(
                reject::UNEXPECTED,
                format!("expected Hello, got message kind {}", other.kind()),
            );
            return refuse(ctx, stream, peer, r);
        }
        Ok(None) => return Ended::Closed,
        Err(r) => return refuse(ctx, stream, peer, r),
    };
    if hello.protocol != PROTOCOL_VERSION {
        let r = Refusal::new(
            reject::BAD_VERSION,
            format!(
                "protocol {} not spoken here (this target speaks {PROTOCOL_VERSION})",
                hello.protocol
            ),
        );
        return refuse(ctx, stream, peer, r);
    }
    if !peer_is(stream, &hello.host) {
        let r = Refusal::new(
            reject::NOT_YOUR_HOST,
            format!(
                "host {:?} is not the host of the client certificate",
                hello.host
            ),
        );
        return refuse(ctx, stream, peer, r);
    }
    // Every disk's data key first: the host is known once they exist.
    let mut keys = Vec::with_capacity(hello.disks.len());
    for d in &hello.disks {
        match (ctx.keys)(&hello.host, &d.name) {
            Ok(k) => keys.push(k),
            Err(e) => {
                let r = Refusal::new(reject::UNKNOWN_HOST, format!("host {}: {e}", hello.host));
                return refuse(ctx, stream, peer, r);
            }
        }
    }
    // The host's retention, recorded before its disks open (their appliers
    // read it when they start). Failing to record it is no reason to
    // refuse the stream.
    if hello.retention_secs != 0 && !hello.disks.is_empty() {
        let retention = Duration::from_secs(hello.retention_secs);
        if let Err(e) = crate::hostpolicy::record(ctx.site.dir(), &hello.host, retention) {
            tracing::warn!(peer, host = %hello.host, retention_secs = hello.retention_secs, error = %e, "could not record the host's retention");
        }
    }
    let mut disks: HashMap<String, Arc<DiskHandle>> = HashMap::new();
    let mut resume = Vec::new();
    for (d, key) in hello.disks.iter().zip(keys) {
        let handle = match ctx.site.disk(&hello.host, &d.name, d.size, key) {
            Ok(h) => h,
            Err(e) => {
                let code = match e.kind() {
                    ErrorKind::InvalidInput => reject::MISMATCH,
                    ErrorKind::Stopped => reject::FAILED_OVER,
                    _ => reject::INTERNAL,
                };
                return refuse(ctx, stream, peer, Refusal::new(code, e.to_string()));
            }
        };
        let (next_seq, epoch, consistent_from) = handle.resume_point();
        resume.push(DiskResume {
            name: d.name.clone(),
            next_seq,
            epoch,
            consistent_from,
            seeded: handle.seeded(),
        });
        disks.insert(d.name.clone(), handle);
    }
    let welcome = Message::Welcome(Welcome {
        target: ctx.target_name.clone(),
        resume,
    });
    if let Err(e) = send(stream, &welcome) {
        return Ended::Transport(e);
    }
    tracing::info!(peer, host = %hello.host, disks = disks.len(), "sidecar connected");
    for d in disks.values() {
        d.set_connected(true);
    }
    let ended = serve_stream(ctx, stream, peer, &hello.host, &disks);
    for d in disks.values() {
        d.set_connected(false);
    }
    tracing::info!(peer, host = %hello.host, ended = ?ended, "sidecar disconnected");
    ended
}

fn serve_stream<S: Read + Write>(
    ctx: &ServerContext,
    stream: &mut S,
    peer: &str,
    host: &str,
    disks: &HashMap<String, Arc<DiskHandle>>,
) -> Ended {
    loop {
        let m = match read_message(ctx, stream) {
            Ok(Some(m)) => m,
            Ok(None) => return Ended::Closed,
            Err(r) => return refuse(ctx, stream, peer, r),
        };
        let reply = match m {
            Message::ChangeSet(cs) => match receive(host, disks, &cs) {
                Ok(ack) => Message::Ack(ack),
                Err(r) => return refuse(ctx, stream, peer, r),
            },
            Message::Progress(p) => {
                if let Some(d) = disks.get(&p.disk) {
                    d.report_progress(&p);
                }
                continue;
            }
            Message::BlockHashes(b) => match hash_diff(host, disks, &b) {
                Ok(differs) => Message::HashDiff(HashDiff {
                    disk: b.disk.clone(),
                    differs,
                }),
                Err(r) => return refuse(ctx, stream, peer, r),
            },
            Message::Heartbeat(_) => Message::Heartbeat(Heartbeat {
                time_ns: crate::site::now_ns(),
            }),
            other => {
                let r = Refusal::new(
                    reject::UNEXPECTED,
                    format!("unexpected message kind {} after Hello", other.kind()),
                );
                return refuse(ctx, stream, peer, r);
            }
        };
        if let Err(e) = send(stream, &reply) {
            return Ended::Transport(e);
        }
    }
}

/// Longest wait for the applier before answering a hash exchange with
/// "everything differs" (the sidecar's read timeout is longer).
pub const HASH_WAIT: Duration = Duration::from_secs(30);

/// The checksum exchange for one of this connection's disks.
fn hash_diff(
    host: &str,
    disks: &HashMap<String, Arc<DiskHandle>>,
    b: &BlockHashes,
) -> Result<Vec<bool>, Refusal> {
    let disk = disks.get(&b.disk).ok_or_else(|| {
        Refusal::new(
            reject::NOT_YOUR_DISK,
            format!(
                "block hashes for {host}/{} on a connection not announcing it",
                b.disk
            ),
        )
    })?;
    disk.hash_diff(b, HASH_WAIT).map_err(|e| {
        let code = if e.kind() == ErrorKind::InvalidInput {
            reject::MALFORMED
        } else {
            reject::INTERNAL
        };
        Refusal::new(code, e.to_string())
    })
}

/// Check and journal one change set; the ack to send.
fn receive(
    host: &str,
    disks: &HashMap<String, Arc<DiskHandle>>,
    cs: &ChangeSet,
) -> Result<Ack, Refusal> {
    let h = &cs.header;
    let disk = match disks.get(&h.disk) {
        Some(d) if h.host == host => d,
        _ => {
            return Err(Refusal::new(
                reject::NOT_YOUR_DISK,
                format!(
                    "change set for {}/{} on a connection of host {host}",
                    h.host, h.disk
                ),
            ))
        }
    };
    let size = disk.snapshot().size;
    if let Some(x) = h
        .extents
        .iter()
        .find(|x| x.offset.checked_add(x.length).is_none_or(|end| end > size))
    {
        return Err(Refusal::new(
            reject::MALFORMED,
            format!(
                "change set {}/{} [{}, {}]: extent {}+{} lies beyond the disk ({size} bytes)",
                h.host, h.disk, h.first_seq, h.last_seq, x.offset, x.length
            ),
        ));
    }
    verify_change_set(cs, disk.key()).map_err(|e| {
        Refusal::new(
            reject::BAD_SEAL,
            format!(
                "change set {}/{} [{}, {}]: {e}",
                h.host, h.disk, h.first_seq, h.last_seq
            ),
        )
    })?;
    let ack = |last_seq| Ack {
        disk: h.disk.clone(),
        epoch: h.epoch,
        last_seq,
    };
    match disk.append(cs) {
        Ok(a) => Ok(ack(a.last_seq)),
        Err(e) => match refusal_of(&e) {
            None => Ok(ack(disk.last_seq().unwrap_or(0))),
            Some(r) => Err(r),
        },
    }
}
