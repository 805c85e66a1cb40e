//! The recovery site's data directory: one journal, replica and status per
//! protected disk, and the background applier that keeps each replica up
//! to date.
//!
//! # Layout
//!
//! ```text
//! DATA/
//!   target.lock                 flock held by the running `ferry target`
//!   hosts/HOST/DISK/
//!     journal/ applied          the durable journal (see crate::journal)
//!     replica.vhd|.img          the replica image (VHD dynamic by default)
//!     image.json                or: an image elsewhere that is the replica
//!                               (`ferry reprotect --image`: the original
//!                               disk of a failed-over machine, written in
//!                               place), see AdoptedImage
//!     status.json               what `ferry target status` shows, replaced
//!                               atomically by the daemon (see DiskStatus)
//!     points.jsonl              recovery points (crate::points)
//! ```
//!
//! # Ownership
//!
//! A [`DiskHandle`] owns a disk's journal (behind one mutex: appends from
//! the connection, reads and watermark updates from the applier) and its
//! status. Its applier thread (`apply-HOST-DISK`) is the only user of the
//! replica: it takes the next unapplied change set from the journal under
//! the lock, applies it without the lock (so acks are not held up by image
//! writes), then records the watermark under the lock.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_protocol::message::{BlockHashes, ChangeKind, ChangeSet, ChangeSetHeader, Progress};
use ferry_protocol::payload::{block_hash, Key};
use ferry_vhd::Format;
use serde::{Deserialize, Serialize};

use crate::applier::{ApplyStats, Replica};
use crate::error::{Error, ErrorKind, Result};
use crate::journal::{Appended, Journal};
use crate::points::Point;

/// Directory of a disk's undo log.
pub const UNDO_DIR: &str = "undo";
/// File naming an adopted image ([`AdoptedImage`]).
pub const IMAGE_FILE: &str = "image.json";
/// File name of the per-disk status.
pub const STATUS_FILE: &str = "status.json";
/// Directory holding the hosts.
pub const HOSTS_DIR: &str = "hosts";
/// Most disks one host may have at this target (each has an applier
/// thread and a replica).
pub const MAX_DISKS_PER_HOST: usize = 256;
/// How often an idle applier rewrites its status (for lag seconds and
/// liveness).
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How often an applier applies the retention window.
const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

/// Now as UNIX nanoseconds.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Whether the replica equals a prefix of the source's write order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Consistency {
    /// The replica equals the source at every sequence from `since` up to
    /// the applied sequence.
    Consistent {
        /// First consistent sequence.
        since: u64,
    },
    /// Not a consistent prefix; `reason` says why.
    Inconsistent {
        /// Why.
        reason: String,
    },
}

impl Consistency {
    /// The consistency after applying a set with header `h`.
    pub fn after(h: &ChangeSetHeader) -> Consistency {
        if h.consistent_from != 0 {
            return Consistency::Consistent {
                since: h.consistent_from,
            };
        }
        let reason = match h.kind {
            ChangeKind::Resync => format!(
                "resync in progress (epoch {}, seq {}..={}): regions re-read from the source",
                h.epoch, h.first_seq, h.last_seq
            ),
            ChangeKind::WriteOrder => format!(
                "epoch {}: waiting for the resync of missed regions to complete",
                h.epoch
            ),
        };
        Consistency::Inconsistent { reason }
    }

    /// `consistent_from` as the wire carries it (0: inconsistent).
    pub fn wire(&self) -> u64 {
        match self {
            Consistency::Consistent { since } => *since,
            Consistency::Inconsistent { .. } => 0,
        }
    }
}

/// Source-side lag as the sidecar last reported it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceLag {
    /// Records not yet acknowledged.
    pub records: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Age of the oldest, seconds.
    pub seconds: f64,
    /// When the report arrived (UNIX ns).
    pub reported_ns: u64,
}

/// What `ferry target status` shows for one disk (`status.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Host name.
    pub host: String,
    /// Disk name.
    pub disk: String,
    /// Disk size in bytes.
    pub size: u64,
    /// Last durable (received) sequence.
    pub received_seq: Option<u64>,
    /// Applied sequence (the replica holds everything up to it).
    pub applied_seq: Option<u64>,
    /// Epoch of the last durable change set.
    pub epoch: Option<u64>,
    /// Change sets received and not yet applied.
    pub apply_backlog_sets: u64,
    /// Their stored bytes.
    pub apply_backlog_bytes: u64,
    /// Source-side lag (ring and spool), as last reported.
    pub source_lag: Option<SourceLag>,
    /// Bytes in journal segment files (received, kept until applied).
    pub journal_bytes: u64,
    /// Bytes of the undo log (the history behind the recovery points).
    #[serde(default)]
    pub undo_bytes: u64,
    /// Replica image.
    pub replica_path: PathBuf,
    /// Replica format (`vhd-dynamic`, `vhd-fixed`, `raw`).
    pub replica_format: String,
    /// Consistency of the applied replica.
    pub consistency: Consistency,
    /// The last sequence error reported to the sender, if any.
    pub last_gap: Option<String>,
    /// The last apply error, if the applier is stuck.
    pub apply_error: Option<String>,
    /// Change sets and raw bytes received since the daemon started.
    pub received_sets: u64,
    /// Sealed bytes received since the daemon started.
    pub received_bytes: u64,
    /// Of those, bytes of Resync sets.
    pub resync_bytes: u64,
    /// This disk's recovery points.
    #[serde(default)]
    pub points: PointSummary,
    /// Whether a sidecar is connected for this disk.
    pub connected: bool,
    /// Replication is stopped: the host was failed over.
    #[serde(default)]
    pub replication_stopped: bool,
    /// When this status was written (UNIX ns).
    pub updated_ns: u64,
}

/// A disk's recovery points at a glance (`ferry target status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointSummary {
    /// Points recorded.
    pub count: u64,
    /// The oldest.
    pub oldest: Option<Point>,
    /// The newest.
    pub newest: Option<Point>,
    /// Source time of the newest crash-consistent (any) point, UNIX ns.
    pub last_crash_ns: Option<u64>,
    /// Source time of the newest app-consistent point, UNIX ns.
    pub last_app_ns: Option<u64>,
}

impl PointSummary {
    /// Fold `points` (in sequence order) into the summary.
    pub fn add(&mut self, points: &[Point]) {
        for p in points {
            if self.newest.as_ref().is_some_and(|n| n.seq >= p.seq) {
                continue; // a replay
            }
            self.count += 1;
            if self.oldest.is_none() {
                self.oldest = Some(p.clone());
            }
            self.last_crash_ns = Some(p.time_ns);
            if p.app {
                self.last_app_ns = Some(p.time_ns);
            }
            self.newest = Some(p.clone());
        }
    }
}

/// How a disk's replica is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteOptions {
    /// Replica format for new disks.
    pub replica_format: Format,
    /// Retention window of hosts whose policy names none.
    pub retention: Duration,
    /// Size of the undo log's segment files (retention frees whole ones).
    pub history_segment_size: u64,
}

impl Default for SiteOptions {
    fn default() -> Self {
        SiteOptions {
            replica_format: Format::VhdDynamic,
            retention: DEFAULT_RETENTION,
            history_segment_size: crate::undo::DEFAULT_SEGMENT_SIZE,
        }
    }
}

/// Retention window of hosts whose policy names none: 24 hours.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// Where the site finds a disk's data key: (host, disk) -> key.
pub type KeySource = Box<dyn Fn(&str, &str) -> std::result::Result<Key, String> + Send + Sync>;

fn replica_file(format: Format) -> &'static str {
    match format {
        Format::Raw => "replica.img",
        _ => "replica.vhd",
    }
}

/// One protected disk at the site.
#[derive(Debug)]
pub struct DiskHandle {
    host: String,
    disk: String,
    dir: PathBuf,
    key: Key,
    journal: Mutex<Journal>,
    status: Mutex<DiskStatus>,
    status_file: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
    /// Held by the applier while it changes the replica, and by whoever
    /// needs the replica to hold still (a failover copying it).
    gate: Mutex<()>,
    /// Replication of the host is stopped (failed over): appends are refused.
    stopped: AtomicBool,
    /// The undo log: written by the applier, cleared by a commit.
    undo: Mutex<crate::undo::UndoLog>,
    /// Segment size of the undo log (for reopening it).
    history_segment_size: u64,
    /// Test failovers choosing or materializing a point: no pruning.
    pins: std::sync::atomic::AtomicUsize,
    /// The replica holds data (an adopted image, a copy kept by a
    /// reprotect, or anything applied): the sender compares checksums
    /// before sending resync data.
    seeded: AtomicBool,
}

impl DiskHandle {
    /// Host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Disk name.
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// The key the disk's payloads are sealed with.
    pub fn key(&self) -> &Key {
        &self.key
    }

    fn status(&self) -> MutexGuard<'_, DiskStatus> {
        self.status.lock().expect("status lock")
    }

    fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().expect("journal lock")
    }

    /// Whether the replica holds data the sender may find equal (the
    /// Welcome's `seeded`).
    pub fn seeded(&self) -> bool {
        self.seeded.load(Ordering::Relaxed)
    }

    /// Where the stream resumes: (next seq, epoch, consistent_from of the
    /// last durable set).
    pub fn resume_point(&self) -> (u64, u64, u64) {
        let j = self.journal();
        let next = j.last_seq().map_or(0, |s| s.saturating_add(1));
        let epoch = j.epoch().unwrap_or(0);
        let consistent = match j.last_change_set() {
            Some(Ok(cs)) => cs.header.consistent_from,
            _ => 0,
        };
        (next, epoch, consistent)
    }

    /// Append `cs` durably (fsync) and wake the applier. The caller acks
    /// only on `Ok`.
    pub fn append(&self, cs: &ChangeSet) -> Result<Appended> {
        let appended = {
            let mut j = self.journal();
            if self.stopped.load(Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::Stopped,
                    "append",
                    format!("host {} is failed over: replication is stopped", self.host),
                ));
            }
            let a = j.append(cs);
            if let Err(e) = &a {
                if e.kind() == ErrorKind::Gap {
                    self.status().last_gap = Some(e.to_string());
                }
            }
            let a = a?;
            let mut st = self.status();
            st.received_seq = Some(a.last_seq);
            st.epoch = Some(cs.header.epoch);
            st.received_sets += 1;
            let n = u64::try_from(cs.payload.len()).unwrap_or(u64::MAX);
            st.received_bytes += n;
            if cs.header.kind == ChangeKind::Resync {
                st.resync_bytes += n;
            }
            st.journal_bytes = j.bytes();
            a
        };
        self.write_status();
        self.wake.notify_all();
        Ok(appended)
    }

    /// The last durable sequence (for duplicate acks).
    pub fn last_seq(&self) -> Option<u64> {
        self.journal().last_seq()
    }

    /// Record the sidecar's lag report.
    pub fn report_progress(&self, p: &Progress) {
        let mut st = self.status();
        st.source_lag = Some(SourceLag {
            records: p.lag_records,
            bytes: p.lag_bytes,
            seconds: Duration::from_nanos(p.lag_ns).as_secs_f64(),
            reported_ns: now_ns(),
        });
    }

    /// Mark the disk connected or not.
    pub fn set_connected(&self, connected: bool) {
        self.status().connected = connected;
        self.wake.notify_all();
    }

    /// A copy of the current status.
    pub fn snapshot(&self) -> DiskStatus {
        self.status().clone()
    }

    /// Write `status.json` atomically (not synced: it is advisory, and
    /// rewritten after every append and apply).
    fn write_status(&self) {
        let _one_writer = self.status_file.lock().expect("status file lock");
        let mut st = self.snapshot();
        st.updated_ns = now_ns();
        let path = self.dir.join(STATUS_FILE);
        if let Err(e) = write_json_atomically(&path, &st, false) {
            tracing::warn!(host = %self.host, disk = %self.disk, error = %e, "cannot write status.json");
        }
    }

    /// Stop replication: every later append is refused. Returns once an
    /// append in progress (holding the journal lock) and a retention pass
    /// (holding the gate) finished.
    pub fn stop_replication(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        drop(self.journal());
        drop(self.pause_apply());
        self.status().replication_stopped = true;
        self.write_status();
    }

    /// Undo [`DiskHandle::stop_replication`] (a failover that could not
    /// start).
    pub fn resume_replication(&self) {
        self.stopped.store(false, Ordering::SeqCst);
        self.status().replication_stopped = false;
        self.write_status();
    }

    /// Keep retention from pruning until the guard is dropped (a test
    /// failover choosing and materializing its point). Returns once a
    /// retention pass in progress finished.
    pub fn pin_history(self: &Arc<Self>) -> HistoryPin {
        self.pins.fetch_add(1, Ordering::SeqCst);
        drop(self.pause_apply());
        HistoryPin(Arc::clone(self))
    }

    /// Whether the applier stopped (the daemon is shutting down).
    pub fn is_shutting_down(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Whether replication is stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Hold the applier still (it finishes the change set it is applying
    /// first) until the guard is dropped. Appends go on.
    pub fn pause_apply(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().expect("apply gate")
    }

    /// The disk's undo log directory (see [`crate::undo`]).
    pub fn undo_dir(&self) -> PathBuf {
        self.dir.join(UNDO_DIR)
    }

    /// A read-only copy of the undo log as it is now (reads go on while
    /// the applier appends and prunes).
    pub fn undo_reader(&self) -> Result<crate::undo::UndoLog> {
        self.undo.lock().expect("undo lock").read_only_clone()
    }

    /// The disk's recovery points file.
    pub fn points_path(&self) -> PathBuf {
        self.dir.join(crate::points::POINTS_FILE)
    }

    /// What choosing a recovery point needs to know of this disk.
    pub fn view(&self) -> Result<crate::failover::DiskView> {
        let st = self.snapshot();
        let reachable = self.undo.lock().expect("undo lock").boundaries();
        Ok(crate::failover::DiskView {
            disk: self.disk.clone(),
            applied: st.applied_seq,
            consistency: st.consistency,
            points: crate::points::read(&self.points_path())?,
            reachable,
        })
    }

    /// Forget every recovery point but the one at `seq` (a committed
    /// failover): the undo log is emptied and the point list rewritten.
    pub fn drop_points_except(&self, seq: u64) -> Result<()> {
        let _paused = self.pause_apply();
        self.undo.lock().expect("undo lock").clear()?;
        let path = self.points_path();
        // Without history only the replica's own state can be reached.
        let applied = self.snapshot().applied_seq;
        let kept: Vec<Point> = crate::points::read(&path)?
            .into_iter()
            .filter(|p| p.seq == seq && Some(seq) == applied)
            .collect();
        crate::points::rewrite(&path, &kept)?;
        let mut st = self.status();
        st.points = PointSummary::default();
        st.points.add(&kept);
        Ok(())
    }

    /// The checksum exchange: which blocks of `b` differ from the replica,
    /// compared once everything received so far is applied (otherwise, after
    /// `timeout`, all of them: sending too much is safe, too little is not).
    pub fn hash_diff(&self, b: &BlockHashes, timeout: Duration) -> Result<Vec<bool>> {
        let (size, received, path) = {
            let st = self.status();
            (st.size, st.received_seq, st.replica_path.clone())
        };
        let bs = u64::from(b.block_size);
        for &(offset, length) in &b.ranges {
            if offset.checked_add(length).is_none_or(|end| end > size) {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "hash blocks",
                    format!("range {offset}+{length} lies beyond the disk ({size} bytes)"),
                ));
            }
        }
        if let Some(seq) = received {
            if !self.wait_applied(seq, timeout) {
                return Ok(vec![true; b.hashes.len()]);
            }
        }
        // A fresh read-only view: the applier's own handle stays its own.
        let mut img = ferry_vhd::open(&path, ferry_vhd::OpenOptions::read_only())
            .map_err(|e| Error::new(ErrorKind::Io, "hash blocks", e.to_string()).at_path(&path))?;
        let mut buf = vec![0u8; usize::try_from(bs).unwrap_or(0)];
        let mut out = Vec::with_capacity(b.hashes.len());
        let mut hashes = b.hashes.iter();
        // Runs the replica does not store read as zeros: a block there is
        // equal exactly when the sender's block is all zeros (a zero block
        // inside a partly written region travels as data). No reading; one
        // hash of zeros per block length.
        let zeros = vec![0u8; buf.len()];
        let mut zero_hashes: HashMap<u64, [u8; ferry_protocol::message::HASH_LEN]> = HashMap::new();
        for &(offset, length) in &b.ranges {
            let held = img.map(offset, length).map_err(|e| {
                Error::new(ErrorKind::Io, "hash blocks", e.to_string()).at_path(&path)
            })?;
            let stored = |at: u64, len: u64| {
                held.iter()
                    .any(|r| r.allocated && r.offset < at + len && at < r.offset + r.length)
            };
            let mut done = 0u64;
            while done < length {
                let len = bs.min(length - done);
                if !stored(offset + done, len) {
                    let zero = *zero_hashes
                        .entry(len)
                        .or_insert_with(|| block_hash(&zeros[..usize::try_from(len).unwrap_or(0)]));
                    out.push(hashes.next().copied().unwrap_or_default() != zero);
                    done += len;
                    continue;
                }
                let piece = &mut buf[..usize::try_from(len).unwrap_or(0)];
                img.read_at(piece, offset + done).map_err(|e| {
                    Error::new(ErrorKind::Io, "hash blocks", e.to_string()).at_path(&path)
                })?;
                let theirs = hashes.next().copied().unwrap_or_default();
                out.push(block_hash(piece) != theirs);
                done += len;
            }
        }
        Ok(out)
    }

    /// Block until the applier has applied `seq` or `timeout` passes.
    pub fn wait_applied(&self, seq: u64, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut st = self.status();
        loop {
            if st.applied_seq.is_some_and(|a| a >= seq) {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .wake
                .wait_timeout(st, deadline - now)
                .expect("status lock")
                .0;
        }
    }

    /// The applier loop: apply every durable change set beyond the
    /// watermark, in order, each one's undo captured first; prune the
    /// history to the retention window now and then. See the module docs.
    fn run_applier(
        self: Arc<Self>,
        mut replica: Replica,
        retention: Box<dyn Fn() -> Duration + Send>,
    ) {
        let mut stats = ApplyStats::default();
        let mut last_prune = std::time::Instant::now();
        self.refresh_backlog();
        self.write_status();
        while !self.stop.load(Ordering::Relaxed) {
            if last_prune.elapsed() >= PRUNE_INTERVAL {
                last_prune = std::time::Instant::now();
                self.prune_history(retention());
            }
            let next = {
                let j = self.journal();
                let from = j.applied().map_or(0, |a| a.saturating_add(1));
                match j.last_seq() {
                    Some(last) if j.applied().is_none_or(|a| a < last) => {
                        j.iter_from(from).next().map(|cs| (cs, j.applied()))
                    }
                    _ => None,
                }
            };
            let Some((next, prev_applied)) = next else {
                self.idle_wait();
                continue;
            };
            let applied = next.map_err(|e| e.to_string()).and_then(|cs| {
                // Everything a set changes (replica, undo, points, watermark,
                // status) changes under the gate: whoever holds it sees one
                // applied state.
                let _gate = self.gate.lock().expect("apply gate");
                let mut undo = self.undo.lock().expect("undo lock");
                crate::history::capture(&mut replica, &mut undo, &cs.header, prev_applied)
                    .map_err(|e| e.to_string())?;
                let undo_bytes = undo.bytes();
                drop(undo);
                replica
                    .apply_change_set(&cs, &self.key, &mut stats)
                    .map_err(|e| e.to_string())?;
                // Points before the watermark: a crash in between replays
                // the set and records them again (readers keep the first).
                let points = crate::points::points_of(&cs.header);
                crate::points::append(&self.points_path(), &points)
                    .map_err(|e| format!("recovery points not recorded: {e}"))?;
                let mut j = self.journal();
                j.set_applied(cs.header.last_seq)
                    .map_err(|e| e.to_string())?;
                // The journal is the redo side: applied sets live on as
                // undo. Keep the segment of the last applied set (its
                // header tells the consistency after a restart).
                if let Err(e) = j.truncate_before(cs.header.last_seq.saturating_sub(1)) {
                    tracing::warn!(host = %self.host, disk = %self.disk, error = %e, "journal pruning failed");
                }
                drop(j);
                self.seeded.store(true, Ordering::Relaxed);
                let mut st = self.status();
                st.points.add(&points);
                st.applied_seq = Some(cs.header.last_seq);
                st.consistency = Consistency::after(&cs.header);
                st.apply_error = None;
                st.undo_bytes = undo_bytes;
                Ok(())
            });
            match applied {
                Ok(()) => {
                    self.refresh_backlog();
                    self.write_status();
                    self.wake.notify_all();
                }
                Err(e) => {
                    tracing::error!(host = %self.host, disk = %self.disk, error = %e, "applying the journal failed; retrying in 5 s");
                    self.status().apply_error = Some(e);
                    self.write_status();
                    // A failed undo write leaves the log refusing appends
                    // until it is opened again (recovery decides what is
                    // durable).
                    self.reopen_undo();
                    self.sleep(Duration::from_secs(5));
                }
            }
        }
        self.write_status();
    }

    fn reopen_undo(&self) {
        let _gate = self.gate.lock().expect("apply gate");
        let mut undo = self.undo.lock().expect("undo lock");
        let options = crate::undo::UndoOptions {
            segment_size: self.history_segment_size,
        };
        match crate::undo::UndoLog::open(&self.undo_dir(), options) {
            Ok((log, _)) => *undo = log,
            Err(e) => {
                tracing::error!(host = %self.host, disk = %self.disk, error = %e, "undo log cannot be reopened")
            }
        }
    }

    /// Drop history older than the retention window (not while the host is
    /// failed over: its points are the user's to choose from).
    fn prune_history(&self, retention: Duration) {
        let _gate = self.gate.lock().expect("apply gate");
        // Checked under the gate: a failover or drill stops or pins the
        // disk, then passes the gate once, before it chooses its point.
        if self.is_stopped() || self.pins.load(Ordering::SeqCst) > 0 {
            return;
        }
        let applied = self.snapshot().applied_seq;
        let mut undo = self.undo.lock().expect("undo lock");
        match crate::history::prune(&mut undo, &self.points_path(), applied, retention, now_ns()) {
            Ok(p) => {
                if p.sets > 0 || p.points > 0 {
                    tracing::info!(host = %self.host, disk = %self.disk, sets = p.sets, bytes = p.bytes, points = p.points, "retention: history pruned");
                    match crate::points::read(&self.points_path()) {
                        Ok(points) => {
                            let mut st = self.status();
                            st.points = PointSummary::default();
                            st.points.add(&points);
                        }
                        Err(e) => tracing::warn!(error = %e, "recovery points unreadable"),
                    }
                }
                self.status().undo_bytes = undo.bytes();
            }
            Err(e) => {
                tracing::warn!(host = %self.host, disk = %self.disk, error = %e, "retention pruning failed")
            }
        }
    }

    fn refresh_backlog(&self) {
        let (sets, bytes, journal_bytes) = {
            let j = self.journal();
            let (s, b) = j.unapplied();
            (s, b, j.bytes())
        };
        let mut st = self.status();
        st.apply_backlog_sets = sets;
        st.apply_backlog_bytes = bytes;
        st.journal_bytes = journal_bytes;
    }

    fn idle_wait(&self) {
        self.write_status();
        let st = self.status();
        let _ = self.wake.wait_timeout(st, STATUS_INTERVAL);
    }

    fn sleep(&self, d: Duration) {
        let st = self.status();
        let _ = self
            .wake
            .wait_timeout_while(st, d, |_| !self.stop.load(Ordering::Relaxed));
    }
}

/// An operator verb running on a host ([`Site::host_operation`]).
#[derive(Debug)]
pub struct HostOperation<'a> {
    site: &'a Site,
    host: String,
}

impl Drop for HostOperation<'_> {
    fn drop(&mut self) {
        self.site
            .operations
            .lock()
            .expect("operations lock")
            .remove(&self.host);
    }
}

/// Retention is held off while this lives ([`DiskHandle::pin_history`]).
#[derive(Debug)]
pub struct HistoryPin(Arc<DiskHandle>);

impl Drop for HistoryPin {
    fn drop(&mut self) {
        self.0.pins.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Write `value` as pretty JSON to `path` atomically (temp + rename; the
/// temp file synced first when `durable`).
pub fn write_json_atomically(
    path: &Path,
    value: &impl Serialize,
    durable: bool,
) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        if durable {
            f.sync_data()?;
        }
    }
    fs::rename(&tmp, path)
}

/// (host, disk).
type DiskKey = (String, String);

/// Every disk the site holds, opened at start ([`Site::open_all`]) or when
/// a sidecar announces it.
pub struct Site {
    dir: PathBuf,
    options: SiteOptions,
    keys: KeySource,
    /// Hosts an operator verb (failover, commit, drill) is running on.
    operations: Mutex<std::collections::HashSet<String>>,
    disks: Mutex<HashMap<DiskKey, Arc<DiskHandle>>>,
    /// Applier threads by (host, disk).
    appliers: Mutex<Vec<(DiskKey, JoinHandle<()>)>>,
}

impl Site {
    /// A site rooted at `dir` (created if missing) that opens disks no
    /// sidecar announced (a failover after a restart) with `keys`.
    pub fn new(dir: &Path, options: SiteOptions, keys: KeySource) -> Result<Site> {
        fs::create_dir_all(dir.join(HOSTS_DIR))
            .map_err(|e| Error::io("create data directory", dir, e))?;
        Ok(Site {
            dir: dir.to_path_buf(),
            options,
            keys,
            operations: Mutex::new(std::collections::HashSet::new()),
            disks: Mutex::new(HashMap::new()),
            appliers: Mutex::new(Vec::new()),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Open (or create) the journal and replica of `host`/`disk`, start its
    /// applier, and return the handle. An existing replica must have the
    /// announced size.
    pub fn disk(&self, host: &str, disk: &str, size: u64, key: Key) -> Result<Arc<DiskHandle>> {
        crate::journal::validate_disk_name(host)?;
        crate::journal::validate_disk_name(disk)?;
        if crate::failover::is_failed_over(&self.dir, host) {
            return Err(Error::new(
                ErrorKind::Stopped,
                "open disk",
                format!("host {host} is failed over: replication is stopped"),
            ));
        }
        self.open_disk(host, disk, size, key)
    }

    fn open_disk(&self, host: &str, disk: &str, size: u64, key: Key) -> Result<Arc<DiskHandle>> {
        let mut disks = self.disks.lock().expect("site lock");
        if let Some(d) = disks.get(&(host.to_owned(), disk.to_owned())) {
            let have = d.snapshot().size;
            if have != size {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "open disk",
                    format!("disk {host}/{disk} is {have} bytes at the target, the sidecar announced {size}"),
                ));
            }
            return Ok(Arc::clone(d));
        }
        let of_host = disks.keys().filter(|(h, _)| h == host).count();
        if of_host >= MAX_DISKS_PER_HOST {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "open disk",
                format!("host {host} has {of_host} disks, the most this target keeps"),
            ));
        }
        let host_dir = self.dir.join(HOSTS_DIR).join(host);
        let disk_dir = host_dir.join(disk);
        fs::create_dir_all(&disk_dir)
            .map_err(|e| Error::io("create disk directory", &disk_dir, e))?;
        let (journal, recovery) = Journal::open(&host_dir, disk)?;
        if let Some((path, at)) = &recovery.torn_tail {
            tracing::warn!(host, disk, path = %path.display(), offset = at, bytes = recovery.truncated_bytes, "journal: torn tail cut (an unacknowledged append)");
        }
        let (undo, undo_recovery) = crate::undo::UndoLog::open(
            &disk_dir.join(UNDO_DIR),
            crate::undo::UndoOptions {
                segment_size: self.options.history_segment_size,
            },
        )?;
        if undo_recovery.cut_bytes() > 0 {
            tracing::warn!(
                host,
                disk,
                bytes = undo_recovery.cut_bytes(),
                "undo log: an unfinished set was cut (its change set is applied again)"
            );
        }
        // Whether the replica may hold data the sender finds equal: an
        // adopted image, or a replica that existed before this open (a
        // fixed-size image made just now is "allocated" but holds nothing).
        let mut preexisting = true;
        let (replica_path, format, replica) = match AdoptedImage::read(&disk_dir)? {
            Some(adopted) => {
                let format = adopted.format()?;
                let replica = Replica::open_adopted(&adopted.path, format, size).map_err(|e| {
                    Error::new(ErrorKind::InvalidInput, "open adopted image", e.to_string())
                        .at_path(&adopted.path)
                })?;
                (adopted.path, format, replica)
            }
            None => {
                let format =
                    existing_replica_format(&disk_dir).unwrap_or(self.options.replica_format);
                let path = disk_dir.join(replica_file(format));
                preexisting = path.exists();
                let replica = Replica::open_or_create(&path, format, size).map_err(|e| {
                    Error::new(ErrorKind::InvalidInput, "open replica", e.to_string())
                        .at_path(&path)
                })?;
                (path, format, replica)
            }
        };
        let mut replica = replica;
        let seeded = preexisting
            && replica
                .allocated_bytes()
                .map_err(|e| Error::new(ErrorKind::InvalidInput, "map replica", e.to_string()))?
                > 0;
        let consistency = match journal.applied().and_then(|a| journal.iter_from(a).next()) {
            Some(Ok(cs)) => Consistency::after(&cs.header),
            _ => Consistency::Inconsistent {
                reason: "no change set applied yet (initial copy pending)".into(),
            },
        };
        // A failed-over host's disks stay stopped across restarts.
        let stopped = crate::failover::is_failed_over(&self.dir, host);
        let status = DiskStatus {
            replication_stopped: stopped,
            host: host.to_owned(),
            disk: disk.to_owned(),
            size,
            received_seq: journal.last_seq(),
            applied_seq: journal.applied(),
            epoch: journal.epoch(),
            apply_backlog_sets: 0,
            apply_backlog_bytes: 0,
            source_lag: None,
            journal_bytes: journal.bytes(),
            undo_bytes: undo.bytes(),
            replica_path: replica_path.clone(),
            replica_format: format.to_string(),
            consistency,
            last_gap: None,
            apply_error: None,
            received_sets: 0,
            received_bytes: 0,
            resync_bytes: 0,
            points: {
                let mut summary = PointSummary::default();
                match crate::points::read(&disk_dir.join(crate::points::POINTS_FILE)) {
                    Ok(points) => summary.add(&points),
                    Err(e) => tracing::warn!(host, disk, error = %e, "recovery points unreadable"),
                }
                summary
            },
            connected: false,
            updated_ns: now_ns(),
        };
        let handle = Arc::new(DiskHandle {
            host: host.to_owned(),
            disk: disk.to_owned(),
            dir: disk_dir,
            key,
            journal: Mutex::new(journal),
            status: Mutex::new(status),
            status_file: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            gate: Mutex::new(()),
            stopped: AtomicBool::new(stopped),
            undo: Mutex::new(undo),
            history_segment_size: self.options.history_segment_size,
            pins: std::sync::atomic::AtomicUsize::new(0),
            seeded: AtomicBool::new(seeded),
        });
        let h = Arc::clone(&handle);
        let (data, host_name, default) =
            (self.dir.clone(), host.to_owned(), self.options.retention);
        let retention: Box<dyn Fn() -> Duration + Send> =
            Box::new(move || crate::hostpolicy::retention(&data, &host_name, default));
        let thread = std::thread::Builder::new()
            .name(format!("apply-{host}-{disk}"))
            .spawn(move || h.run_applier(replica, retention))
            .map_err(|e| Error::io("spawn applier", Path::new(disk), e))?;
        self.appliers
            .lock()
            .expect("appliers")
            .push(((host.to_owned(), disk.to_owned()), thread));
        disks.insert((host.to_owned(), disk.to_owned()), Arc::clone(&handle));
        Ok(handle)
    }

    /// Every disk of `host` held here (opened if no sidecar opened it since
    /// the daemon started: sizes from the replicas, keys from the key
    /// source), sorted by name.
    pub fn host_disks(&self, host: &str) -> Result<Vec<Arc<DiskHandle>>> {
        crate::journal::validate_disk_name(host)?;
        let host_dir = self.dir.join(HOSTS_DIR).join(host);
        let entries = fs::read_dir(&host_dir).map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                "list disks",
                format!("no host {host} at this target ({e})"),
            )
            .at_path(&host_dir)
        })?;
        let mut names: Vec<String> = entries
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut out = Vec::new();
        for disk in names {
            if let Some(d) = self
                .disks
                .lock()
                .expect("site lock")
                .get(&(host.to_owned(), disk.clone()))
            {
                out.push(Arc::clone(d));
                continue;
            }
            let dir = host_dir.join(&disk);
            let Some((path, format)) = replica_location(&dir)? else {
                continue; // never received anything
            };
            let size = ferry_vhd::open_as(&path, format, ferry_vhd::OpenOptions::read_only())
                .map_err(|e| Error::image("open replica", e))?
                .size();
            let key = (self.keys)(host, &disk).map_err(|e| {
                Error::new(
                    ErrorKind::InvalidInput,
                    "open disk",
                    format!("no key for {host}/{disk}: {e}"),
                )
            })?;
            out.push(self.open_disk(host, &disk, size, key)?);
        }
        if out.is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "list disks",
                format!("host {host} has no disks at this target"),
            ));
        }
        Ok(out)
    }

    /// Open every disk the data directory holds, so that each applier
    /// applies what its journal holds beyond the watermark: a restarted
    /// target brings its replicas up to everything it acknowledged without
    /// waiting for the hosts' sidecars. A host whose disks cannot be opened
    /// yet (no data key: the control plane hands it over later) is logged
    /// and left to its sidecar's connection. Returns the disks opened.
    pub fn open_all(&self) -> usize {
        let Ok(hosts) = fs::read_dir(self.dir.join(HOSTS_DIR)) else {
            return 0;
        };
        let mut opened = 0;
        for host in hosts.flatten().filter(|e| e.path().is_dir()) {
            let host = host.file_name().to_string_lossy().into_owned();
            match self.host_disks(&host) {
                Ok(disks) => opened += disks.len(),
                Err(e) => {
                    tracing::warn!(host, error = %e, "disks not opened at start: they open when the host's sidecar connects")
                }
            }
        }
        opened
    }

    /// Claim `host` for one operator verb: a second one (an operator who
    /// pressed Ctrl-C and ran it again while the first goes on) is refused
    /// until the guard is dropped.
    pub fn host_operation(&self, host: &str) -> Result<HostOperation<'_>> {
        let mut ops = self.operations.lock().expect("operations lock");
        if !ops.insert(host.to_owned()) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "operation",
                format!(
                    "another failover, commit or test failover of {host} is running at this target"
                ),
            ));
        }
        Ok(HostOperation {
            site: self,
            host: host.to_owned(),
        })
    }

    /// The retention window of `host`: its policy's, else the site default.
    pub fn retention_of(&self, host: &str) -> Duration {
        crate::hostpolicy::retention(&self.dir, host, self.options.retention)
    }

    /// Stop every applier (after its current change set) and wait for them.
    pub fn shutdown(&self) {
        for d in self.disks.lock().expect("site lock").values() {
            d.stop.store(true, Ordering::Relaxed);
            d.wake.notify_all();
        }
        let threads: Vec<_> = self.appliers.lock().expect("appliers").drain(..).collect();
        for (_, t) in threads {
            let _ = t.join();
        }
    }

    /// Close every open disk of `host`: its applier stops after its current
    /// change set and releases the replica, and the next use opens the disk
    /// anew. (A reprotect resets the disks; a failback rewinds the
    /// replicas itself.) Handles still held elsewhere refuse appends.
    pub fn close_host(&self, host: &str) {
        let closed: Vec<Arc<DiskHandle>> = {
            let mut disks = self.disks.lock().expect("site lock");
            let keys: Vec<_> = disks.keys().filter(|(h, _)| h == host).cloned().collect();
            keys.iter().filter_map(|k| disks.remove(k)).collect()
        };
        for d in &closed {
            d.stopped.store(true, Ordering::SeqCst);
            d.stop.store(true, Ordering::Relaxed);
            d.wake.notify_all();
        }
        let threads: Vec<_> = {
            let mut appliers = self.appliers.lock().expect("appliers");
            let (mine, others) = appliers.drain(..).partition(|((h, _), _)| h == host);
            *appliers = others;
            mine
        };
        for (_, t) in threads {
            let _ = t.join();
        }
    }
}

/// An image outside the data directory that is a disk's replica: the
/// original disk of a machine that was failed over, into which the reverse
/// stream is written in place (`DATA/hosts/HOST/DISK/image.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptedImage {
    /// The image file (a VMDK descriptor for `vmdk-flat`).
    pub path: PathBuf,
    /// Its format (`ferry_vhd::Format::name`).
    pub format: String,
}

impl AdoptedImage {
    /// The formats an image may have to be written in place.
    pub const FORMATS: [Format; 5] = [
        Format::VmdkSparse,
        Format::VmdkFlat,
        Format::VhdDynamic,
        Format::VhdFixed,
        Format::Raw,
    ];

    /// The adopted image of the disk whose directory is `disk_dir`, if any.
    pub fn read(disk_dir: &Path) -> Result<Option<AdoptedImage>> {
        let path = disk_dir.join(IMAGE_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::new(ErrorKind::Corrupt, "read adopted image", e.to_string()).at_path(&path)
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read adopted image", &path, e)),
        }
    }

    /// Record it for the disk whose directory is `disk_dir` (atomically).
    pub fn write(&self, disk_dir: &Path) -> Result<()> {
        let path = disk_dir.join(IMAGE_FILE);
        write_json_atomically(&path, self, true)
            .map_err(|e| Error::io("record adopted image", &path, e))
    }

    /// The format, if it is one an image may be written in place in.
    pub fn format(&self) -> Result<Format> {
        Format::from_name(&self.format)
            .filter(|f| Self::FORMATS.contains(f))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidInput,
                    "adopted image",
                    format!(
                        "format {} cannot be written in place (vmdk-sparse, vmdk-flat, vhd-dynamic, vhd-fixed, raw)",
                        self.format
                    ),
                )
                .at_path(&self.path)
            })
    }
}

/// A disk's replica: its adopted image, else the replica file in its
/// directory; None if it has none yet.
pub fn replica_location(disk_dir: &Path) -> Result<Option<(PathBuf, Format)>> {
    if let Some(adopted) = AdoptedImage::read(disk_dir)? {
        let format = adopted.format()?;
        return Ok(Some((adopted.path, format)));
    }
    Ok(existing_replica_format(disk_dir).map(|f| (disk_dir.join(replica_file(f)), f)))
}

fn existing_replica_format(disk_dir: &Path) -> Option<Format> {
    if disk_dir.join("replica.img").exists() {
        return Some(Format::Raw);
    }
    let vhd = disk_dir.join("replica.vhd");
    if vhd.exists() {
        return ferry_vhd::open(&vhd, ferry_vhd::OpenOptions::read_only())
            .ok()
            .map(|i| i.format());
    }
    None
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site")
            .field("dir", &self.dir)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Every `status.json` under `DATA/hosts`, sorted by host and disk.
pub fn read_statuses(data: &Path) -> Result<Vec<DiskStatus>> {
    let hosts = data.join(HOSTS_DIR);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&hosts) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("list hosts", &hosts, e)),
    };
    for host in entries.flatten() {
        let Ok(disks) = fs::read_dir(host.path()) else {
            continue;
        };
        for disk in disks.flatten() {
            let path = disk.path().join(STATUS_FILE);
            let Ok(text) = fs::read(&path) else { continue };
            match serde_json::from_slice::<DiskStatus>(&text) {
                Ok(st) => out.push(st),
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "unreadable status"),
            }
        }
    }
    out.sort_by(|a, b| (&a.host, &a.disk).cmp(&(&b.host, &b.disk)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_summary_counts_once_and_tracks_kinds() {
        let p = |seq, app| Point {
            seq,
            name: format!("p{seq}"),
            app,
            time_ns: seq * 100,
        };
        let mut s = PointSummary::default();
        s.add(&[p(1, false), p(4, true)]);
        s.add(&[p(4, true)]); // a replay of the same set
        s.add(&[p(7, false)]);
        assert_eq!(s.count, 3);
        assert_eq!(s.oldest.as_ref().map(|p| p.seq), Some(1));
        assert_eq!(s.newest.as_ref().map(|p| p.seq), Some(7));
        assert_eq!((s.last_crash_ns, s.last_app_ns), (Some(700), Some(400)));
    }
}
