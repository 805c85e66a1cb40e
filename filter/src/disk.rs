//! One protected disk: backing device, order gate, ring, tracking state,
//! activity log and dirty bitmap.
//!
//! The write path, for a write of `range`:
//! 1. the payload lands from the socket in a ring slot reserved by
//!    [`Disk::write_buffer`] (data state), or in a heap buffer;
//! 2. [`OrderGate::begin`] waits out earlier overlapping writes;
//! 3. the activity log covers the range durably ([`MetaFile::before_write`]);
//! 4. the data goes to the backing device through io_uring (RWF_DSYNC for FUA);
//! 5. under the tracking lock the write takes its host-wide sequence number
//!    and its record is published: with payload (data state), without
//!    (metadata state), or as dirty bits (bitmap state);
//! 6. the ticket finishes (later overlapping writes may go) and only then
//!    is the write acknowledged.
//!
//! # Dirty bits become resync records
//!
//! The durable dirty bitmap holds regions the ring does not: writes of
//! bitmap state, what a crash left in the activity log, and — when a disk
//! is protected for the first time (its tracking file is created, unless
//! `initial_copy` is off) or on a `resync-all` request — every allocated
//! region of the backing device. Housekeeping turns those bits into ring
//! records the sidecar ships:
//!
//! - **Claim**: in data state, while more than half the record slots are
//!   free, bits not yet claimed become payload-less Write records of at most
//!   [`CLAIM_MAX`] bytes ([`CLAIMS_PER_PASS`] records or
//!   [`CLAIM_BYTES_PER_PASS`] bytes per pass). Each takes an order-gate
//!   ticket on its range and a sequence number like any write, so it is
//!   ordered against overlapping writes the same way; the sidecar re-reads
//!   the range when it meets the record (a resync change set). The bits
//!   stay set.
//! - **Clear**: once the consumer committed a claim (its data is durable at
//!   the target), its range's bits are cleared, except where bits were set
//!   again after the claim was published (bitmap-state writes, failed
//!   requests, `resync-all`): those may hold data the sidecar read too
//!   early, so they stay dirty and are claimed again later.
//! - A claim not committed when the filter stops or crashes keeps its bits
//!   (they were never cleared): it is claimed again after the restart.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_ring::meta::{merge_ranges, Coverage, MetaFile, MetaGeometry};
use ferry_ring::ring::{
    Geometry, NewRecord, PayloadSlot, Producer, PublishError, RecordKind, FLAG_FUA,
};

use crate::config::{DiskConfig, FilterConfig};
use crate::control::{Counters, DiskStatus};
use crate::error::{Error, Result};
use crate::order::{OrderGate, Range, Sequencer, Ticket};
use crate::tracker::{Event, Reason, State, Tracker};
use crate::uring::Uring;

/// Largest range one resync claim record covers.
pub const CLAIM_MAX: u64 = 4 << 20;
/// Most claim records published per housekeeping pass.
pub const CLAIMS_PER_PASS: usize = 64;
/// Most bytes claimed per housekeeping pass.
pub const CLAIM_BYTES_PER_PASS: u64 = 256 << 20;
/// Housekeeping passes between scans of the whole bitmap for unclaimed bits
/// when nothing hinted at new ones (a safety net; the hints are exact for
/// every path that sets bits through this module).
const RESCAN_PASSES: u32 = 50;
/// Redirtied ranges kept before they are merged (per claim).
const MAX_REDIRTIED: usize = 1024;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes (linux/fs.h).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`: logical block size of a block device (linux/fs.h).
const BLKSSZGET: libc::c_ulong = 0x1268;

/// A disk's own directory under the filter's state directory
/// (`STATE/disks/NAME`: tracking metadata, ring link, kernel NBD record).
pub fn state_dir_of(state: &Path, disk: &str) -> PathBuf {
    state.join("disks").join(disk)
}

/// Buffer a write's payload is read into.
#[derive(Debug)]
pub enum WriteData {
    /// A slot in the disk's ring (data state): zero copies after the socket.
    Ring(PayloadSlot),
    /// Plain memory; `full` says why no ring slot was used, if the ring was full.
    Heap {
        /// The bytes.
        data: Vec<u8>,
        /// (needed, free) payload bytes when a reservation failed.
        full: Option<(u64, u64)>,
    },
}

impl WriteData {
    /// The payload bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            WriteData::Ring(slot) => slot.as_slice(),
            WriteData::Heap { data, .. } => data,
        }
    }

    /// The payload bytes, writable (the protocol layer reads into them).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            WriteData::Ring(slot) => slot.as_mut_slice(),
            WriteData::Heap { data, .. } => data,
        }
    }
}

/// A published, not yet committed record: what the dirty map and the
/// activity-log release need to know about it.
#[derive(Debug, Clone, Copy)]
struct Pending {
    index: u64,
    seq: u64,
    range: Range,
    timestamp_ns: u64,
    /// A write recorded without its payload (metadata state, or a claim).
    without_payload: bool,
    /// A resync claim: its bits are cleared once it is committed.
    claim: bool,
}

/// The tracking file plus what the claims need, under one lock so that a
/// bit set while a claim is outstanding is always noticed.
#[derive(Debug)]
struct Dirty {
    file: MetaFile,
    /// Claims published and not yet settled: (ring index, range).
    claimed: Vec<(u64, Range)>,
    /// Bits set again (granule-rounded) inside an outstanding claim after
    /// it was published, with the claim's ring index: they survive its
    /// commit.
    redirtied: Vec<(u64, Range)>,
    /// Bits may have been set outside the claims since the last scan.
    rescan: bool,
    /// Housekeeping passes since the last scan.
    passes: u32,
}

impl Dirty {
    fn new(file: MetaFile) -> Self {
        Dirty {
            file,
            claimed: Vec::new(),
            redirtied: Vec::new(),
            rescan: true,
            passes: 0,
        }
    }

    /// Set bits (durably unless the activity log covers them) and note them
    /// against outstanding claims.
    fn mark(&mut self, range: Range) -> ferry_ring::Result<()> {
        self.note(range);
        self.file.set_dirty(range)
    }

    /// Set many ranges' bits with one sync and note them.
    fn mark_many(&mut self, ranges: &[Range]) -> ferry_ring::Result<()> {
        for &range in ranges {
            self.note(range);
        }
        self.file.set_dirty_ranges(ranges)
    }

    /// The activity-log step of a request; a bitmap fallback leaves bits
    /// set after the request's record is committed: look for them.
    fn before_write(&mut self, range: Range, seq: u64) -> ferry_ring::Result<Coverage> {
        let coverage = self.file.before_write(range, seq)?;
        if coverage == Coverage::Bitmap {
            self.rescan = true;
        }
        Ok(coverage)
    }

    fn note(&mut self, range: Range) {
        if range.len == 0 {
            return;
        }
        self.rescan = true;
        let gran = self.file.geometry().granularity;
        let rounded = round_out(range, gran);
        let mut added = false;
        for &(index, claim) in &self.claimed {
            if let Some(part) = intersect(rounded, claim) {
                self.redirtied.push((index, part));
                added = true;
            }
        }
        if added && self.redirtied.len() > MAX_REDIRTIED {
            // Merge per claim (never across claims: a piece must go when
            // its claim is settled).
            self.redirtied.sort_unstable();
            let mut merged: Vec<(u64, Range)> = Vec::with_capacity(self.redirtied.len());
            for &(index, r) in &self.redirtied {
                match merged.last_mut() {
                    Some((i, last)) if *i == index && r.offset <= last.end() => {
                        let end = last.end().max(r.end());
                        last.len = end - last.offset;
                    }
                    _ => merged.push((index, r)),
                }
            }
            self.redirtied = merged;
        }
    }

    /// Claims the consumer committed: clear their bits except the parts set
    /// again after the claim. Returns the bytes left dirty that way.
    fn settle(&mut self, committed: &[(u64, Range)]) -> u64 {
        let mut kept = 0;
        for &(index, range) in committed {
            self.claimed.retain(|&(i, _)| i != index);
            let keep = merge_ranges(
                self.redirtied
                    .iter()
                    .filter(|&&(i, _)| i == index)
                    .map(|&(_, r)| r)
                    .collect(),
            );
            kept += keep.iter().map(|r| r.len).sum::<u64>();
            for piece in subtract(&[range], &keep) {
                if let Err(e) = self.file.clear_dirty(piece) {
                    tracing::warn!(error = %e, offset = piece.offset, len = piece.len, "cannot clear resynced bits");
                }
            }
        }
        if kept > 0 {
            self.rescan = true;
        }
        let claimed = &self.claimed;
        self.redirtied
            .retain(|&(i, _)| claimed.iter().any(|&(c, _)| c == i));
        kept
    }

    /// Dirty ranges no claim covers, in record-sized pieces, within the
    /// per-pass limits.
    fn unclaimed(&mut self) -> Vec<Range> {
        self.rescan = false;
        self.passes = 0;
        let claimed = merge_ranges(self.claimed.iter().map(|&(_, r)| r).collect());
        let mut out = Vec::new();
        let mut bytes = 0;
        for range in subtract(&self.file.dirty_ranges(), &claimed) {
            for piece in split(range, CLAIM_MAX) {
                if out.len() >= CLAIMS_PER_PASS || bytes + piece.len > CLAIM_BYTES_PER_PASS {
                    // More next pass.
                    self.rescan = true;
                    return out;
                }
                bytes += piece.len;
                out.push(piece);
            }
        }
        out
    }

    fn claimed_bytes(&self) -> u64 {
        self.claimed.iter().map(|&(_, r)| r.len).sum()
    }
}

/// `range` rounded out to multiples of `gran`.
fn round_out(range: Range, gran: u64) -> Range {
    let start = range.offset / gran * gran;
    let end = range.end().div_ceil(gran).saturating_mul(gran);
    Range::new(start, end - start)
}

/// The common part of two ranges, if any.
fn intersect(a: Range, b: Range) -> Option<Range> {
    let start = a.offset.max(b.offset);
    let end = a.end().min(b.end());
    (start < end).then(|| Range::new(start, end - start))
}

/// `from` minus `minus` (both sorted and merged), sorted and merged.
fn subtract(from: &[Range], minus: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    let mut j = 0;
    for &r in from {
        let mut pos = r.offset;
        while j < minus.len() && minus[j].end() <= pos {
            j += 1;
        }
        let mut k = j;
        while pos < r.end() {
            match minus.get(k) {
                Some(m) if m.offset < r.end() => {
                    if m.offset > pos {
                        out.push(Range::new(pos, m.offset - pos));
                    }
                    pos = pos.max(m.end());
                    k += 1;
                }
                _ => {
                    out.push(Range::new(pos, r.end() - pos));
                    pos = r.end();
                }
            }
        }
    }
    out
}

/// `range` in pieces of at most `max` bytes, from its start.
fn split(range: Range, max: u64) -> impl Iterator<Item = Range> {
    let mut pos = range.offset;
    std::iter::from_fn(move || {
        (pos < range.end()).then(|| {
            let len = (range.end() - pos).min(max);
            let piece = Range::new(pos, len);
            pos += len;
            piece
        })
    })
}

/// State touched when records are published (always under the order gate).
#[derive(Debug)]
struct Tracking {
    producer: Producer,
    tracker: Tracker,
    pending: VecDeque<Pending>,
}

/// Why a disk request failed (mapped to NBD errors by the export).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFailure {
    /// The backing device failed.
    Io,
    /// Tracking could not record the write safely.
    Tracking,
}

/// One protected disk.
#[derive(Debug)]
pub struct Disk {
    name: String,
    path: PathBuf,
    size: u64,
    file: File,
    is_block_device: bool,
    uring: Arc<Uring>,
    gate: OrderGate,
    tracking: Mutex<Tracking>,
    meta: Mutex<Dirty>,
    /// One housekeeping pass at a time (claims are chosen and published
    /// by one thread).
    housekeeping: Mutex<()>,
    ring_path: PathBuf,
    block_size: u32,
    sequencer: Arc<Sequencer>,
    /// Provisional sequence numbers of requests between their activity-log
    /// update and their record (with counts).
    inflight: Mutex<BTreeMap<u64, usize>>,
    counters: AtomicCounters,
}

#[derive(Debug, Default)]
struct AtomicCounters {
    writes: AtomicU64,
    write_bytes: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    zeroes: AtomicU64,
    data_records: AtomicU64,
    metadata_records: AtomicU64,
    bitmap_writes: AtomicU64,
    resync_records: AtomicU64,
    io_errors: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Size of a block device or regular file.
fn device_size(file: &File, path: &Path) -> Result<(u64, bool)> {
    let meta = file
        .metadata()
        .map_err(|e| Error::io(e, "stat backing device").with_path(path))?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
        // points at a live local; the descriptor is open.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
        if rc < 0 {
            return Err(Error::io(std::io::Error::last_os_error(), "BLKGETSIZE64").with_path(path));
        }
        Ok((size, true))
    } else if meta.is_file() {
        Ok((meta.len(), false))
    } else {
        Err(Error::config(format!(
            "{} is neither a block device nor a file",
            path.display()
        )))
    }
}

/// Allocation of `[offset, offset + len)` of a backing device of `size`
/// bytes as (length, allocated) runs: holes of a file via
/// SEEK_DATA/SEEK_HOLE; a block device is all allocated.
fn allocation(
    file: &File,
    size: u64,
    is_block_device: bool,
    offset: u64,
    len: u64,
) -> Vec<(u64, bool)> {
    let end = offset.saturating_add(len).min(size);
    if is_block_device {
        return vec![(end.saturating_sub(offset), true)];
    }
    let mut runs = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = seek(file, pos, libc::SEEK_DATA).unwrap_or(end).min(end);
        if data > pos {
            runs.push((data - pos, false));
        }
        if data >= end {
            break;
        }
        let hole = seek(file, data, libc::SEEK_HOLE).unwrap_or(end).min(end);
        runs.push((hole - data, true));
        pos = hole;
    }
    runs
}

/// The allocated regions of a whole backing device, merged.
fn allocated_ranges(file: &File, size: u64, is_block_device: bool) -> Vec<Range> {
    let mut ranges = Vec::new();
    let mut pos = 0;
    for (len, allocated) in allocation(file, size, is_block_device, 0, size) {
        if allocated {
            ranges.push(Range::new(pos, len));
        }
        pos += len;
    }
    merge_ranges(ranges)
}

fn seek(file: &File, from: u64, whence: libc::c_int) -> Option<u64> {
    let from = libc::off_t::try_from(from).ok()?;
    // SAFETY: lseek on an open descriptor has no memory-safety
    // preconditions. It moves the file offset, which nothing here uses
    // (all I/O is positioned).
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    u64::try_from(at).ok()
}

fn logical_block_size(file: &File, path: &Path) -> Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // a live local; the descriptor is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size) };
    if rc < 0 {
        return Err(Error::io(std::io::Error::last_os_error(), "BLKSSZGET").with_path(path));
    }
    Ok(u32::try_from(size).unwrap_or(512).max(1))
}

impl Disk {
    /// Open a disk's backing device, its tracking metadata (reporting what a
    /// crash left possibly unshipped as dirty) and a fresh ring.
    pub fn open(
        disk: &DiskConfig,
        config: &FilterConfig,
        state_dir: &Path,
        ring_dir: &Path,
        sequencer: Arc<Sequencer>,
        uring: Arc<Uring>,
    ) -> Result<Disk> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk.path)
            .map_err(|e| Error::io(e, "open backing device").with_path(&disk.path))?;
        let (size, is_block_device) = device_size(&file, &disk.path)?;
        let block_size = match config.block_size {
            Some(b) => b,
            None if is_block_device => logical_block_size(&file, &disk.path)?,
            None => 1,
        };
        let dir = state_dir_of(state_dir, &disk.name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(e, "create disk state dir").with_path(&dir))?;
        let meta_path = dir.join("meta");
        let meta = open_meta(&meta_path, size, config, || {
            allocated_ranges(&file, size, is_block_device)
        })?;
        let ring_path = ring_dir.join(format!("{}.ring", disk.name));
        let geometry = Geometry {
            slots: config.ring_slots,
            payload_bytes: config.ring_size,
        };
        let producer = Producer::create(&ring_path, geometry, &disk.name, size)?;
        link_ring(&dir, &ring_path)?;
        Ok(Disk {
            name: disk.name.clone(),
            path: disk.path.clone(),
            size,
            file,
            is_block_device,
            uring,
            gate: OrderGate::new(),
            tracking: Mutex::new(Tracking {
                producer,
                tracker: Tracker::default(),
                pending: VecDeque::new(),
            }),
            meta: Mutex::new(Dirty::new(meta)),
            housekeeping: Mutex::new(()),
            ring_path,
            block_size,
            sequencer,
            inflight: Mutex::new(BTreeMap::new()),
            counters: AtomicCounters::default(),
        })
    }

    /// Disk name (the NBD export name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Smallest I/O unit advertised to NBD clients.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The ring file in shared memory.
    pub fn ring_path(&self) -> &Path {
        &self.ring_path
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn tracking(&self) -> MutexGuard<'_, Tracking> {
        self.tracking.lock().expect("tracking lock")
    }

    fn meta(&self) -> MutexGuard<'_, Dirty> {
        self.meta.lock().expect("meta lock")
    }

    /// The order gate (for host-wide barriers).
    pub fn gate(&self) -> &OrderGate {
        &self.gate
    }

    /// Current tracking state.
    pub fn state(&self) -> State {
        self.tracking().tracker.state()
    }

    /// Why no consistent point can be tagged on this disk now, if so: not
    /// in data state, no slot for the tag record, or records without payload
    /// not yet consumed (their data will be re-read, so the ring does not
    /// hold that prefix). Called under the tag's barrier, so the answer holds
    /// until the tag is recorded.
    pub fn unfit_for_tag(&self) -> Option<String> {
        let tracking = self.tracking();
        let state = tracking.tracker.state();
        if state != State::Data {
            return Some(format!(
                "disk {} is in {state:?} state ({}): no consistent point until it drains",
                self.name,
                tracking.tracker.reason().describe()
            ));
        }
        if tracking.producer.free_slots() == 0 {
            return Some(format!(
                "disk {}: no free record slot for the tag",
                self.name
            ));
        }
        let committed = tracking.producer.committed();
        let unconsumed = tracking
            .pending
            .iter()
            .filter(|p| p.without_payload && p.index >= committed);
        let (claims, without) =
            unconsumed.fold(
                (0, 0),
                |(c, w), p| {
                    if p.claim {
                        (c + 1, w)
                    } else {
                        (c, w + 1)
                    }
                },
            );
        if without > 0 {
            return Some(format!(
                "disk {}: {without} records without payload from metadata state are not consumed yet",
                self.name
            ));
        }
        (claims > 0).then(|| {
            format!(
                "disk {}: {claims} resync records are not consumed yet",
                self.name
            )
        })
    }

    /// A buffer for a write of `len` bytes: a ring slot in data state.
    pub fn write_buffer(&self, len: usize) -> WriteData {
        let mut tracking = self.tracking();
        if tracking.tracker.state() == State::Data && len > 0 {
            if let Some(slot) = tracking.producer.reserve(len) {
                return WriteData::Ring(slot);
            }
            let free = tracking.producer.free_payload_bytes();
            return WriteData::Heap {
                data: vec![0u8; len],
                full: Some((len as u64, free)),
            };
        }
        WriteData::Heap {
            data: vec![0u8; len],
            full: None,
        }
    }

    /// Read through io_uring.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), IoFailure> {
        bump(&self.counters.reads, 1);
        bump(&self.counters.read_bytes, buf.len() as u64);
        self.uring
            .read_exact(self.fd(), buf, offset)
            .map_err(|e| self.io_failed("read", &e))
    }

    fn io_failed(&self, what: &str, e: &std::io::Error) -> IoFailure {
        bump(&self.counters.io_errors, 1);
        tracing::warn!(disk = %self.name, op = what, error = %e, "backing device error");
        IoFailure::Io
    }

    /// The write path (see the module docs).
    pub fn write(
        &self,
        offset: u64,
        data: WriteData,
        fua: bool,
    ) -> std::result::Result<(), IoFailure> {
        let range = Range {
            offset,
            len: data.as_slice().len() as u64,
        };
        bump(&self.counters.writes, 1);
        bump(&self.counters.write_bytes, range.len);
        let ticket = self.gate.begin(Some(range));
        // Durable activity-log coverage before the data can reach the device;
        // the sequence number is provisional (the record's is at least this).
        let provisional = self.begin_inflight();
        let covered = self.meta().before_write(range, provisional);
        if let Err(e) = covered {
            tracing::error!(disk = %self.name, error = %e, "activity log update failed");
            self.abandon(ticket, range, provisional);
            return Err(IoFailure::Tracking);
        }
        let checksum = crc32c::crc32c(data.as_slice());
        let written = self
            .uring
            .write_all(self.fd(), data.as_slice(), offset, fua);
        if let Err(e) = written {
            let failure = self.io_failed("write", &e);
            self.abandon(ticket, range, provisional);
            return Err(failure);
        }
        let flags = if fua { FLAG_FUA } else { 0 };
        let recorded = self.publish(
            None,
            RecordKind::Write,
            range,
            checksum,
            flags,
            Some(data),
            0,
        );
        self.gate.finish(ticket);
        self.end_inflight(provisional);
        recorded
    }

    /// A request starts touching the device: its provisional sequence number
    /// keeps its extents in the activity log until it is recorded.
    fn begin_inflight(&self) -> u64 {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        let provisional = self.sequencer.peek();
        *inflight.entry(provisional).or_insert(0) += 1;
        provisional
    }

    fn end_inflight(&self, provisional: u64) {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        if let Some(n) = inflight.get_mut(&provisional) {
            *n -= 1;
            if *n == 0 {
                inflight.remove(&provisional);
            }
        }
    }

    /// A request that failed: its range may hold anything now, so it is
    /// tracked as dirty; no record is published.
    fn abandon(&self, ticket: Ticket, range: Range, provisional: u64) {
        let marked = self.meta().mark(range);
        if let Err(e) = marked {
            tracing::error!(disk = %self.name, error = %e, "cannot mark a failed request's range dirty");
        }
        self.gate.finish(ticket);
        self.end_inflight(provisional);
    }

    /// Publish one record according to the tracking state. `seq` None: take
    /// the next host-wide number now, under the tracking lock, so numbers
    /// increase in ring order.
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        seq: Option<u64>,
        kind: RecordKind,
        range: Range,
        checksum: u32,
        flags: u8,
        data: Option<WriteData>,
        aux: u64,
    ) -> std::result::Result<(), IoFailure> {
        let mut tracking = self.tracking();
        let seq = seq.unwrap_or_else(|| self.sequencer.next());
        let (mut slot, full, heap) = match data {
            Some(WriteData::Ring(slot)) => (Some(slot), None, None),
            Some(WriteData::Heap { data, full }) => (None, full, Some(data)),
            None => (None, None, None),
        };
        if let Some((needed, free)) = full {
            self.transition(&mut tracking, Event::PayloadFull { needed, free });
        }
        // A write that arrived in metadata state but is recorded after the
        // ring drained back to data state: it still gets its payload (one
        // copy), or the disk goes back to metadata state.
        if let (Some(bytes), State::Data) = (&heap, tracking.tracker.state()) {
            if full.is_none() && !bytes.is_empty() {
                match tracking.producer.reserve(bytes.len()) {
                    Some(mut fresh) => {
                        fresh.as_mut_slice().copy_from_slice(bytes);
                        slot = Some(fresh);
                    }
                    None => {
                        let needed = bytes.len() as u64;
                        let free = tracking.producer.free_payload_bytes();
                        self.transition(&mut tracking, Event::PayloadFull { needed, free });
                    }
                }
            }
        }
        let state = tracking.tracker.state();
        if state == State::Bitmap {
            if kind == RecordKind::Tag {
                return Err(IoFailure::Tracking);
            }
            return self.to_bitmap(range);
        }
        if range.len > 0 {
            // The extent may leave the activity log only once this record is
            // committed: note its real sequence number before the consumer
            // can see it (a hot extent: memory only).
            self.meta().before_write(range, seq).map_err(|e| {
                tracing::error!(disk = %self.name, error = %e, "activity log update failed");
                IoFailure::Tracking
            })?;
        }
        let payload = if state == State::Data { slot } else { None };
        let has_payload = payload.is_some();
        let timestamp_ns = now_ns();
        let record = NewRecord {
            seq,
            timestamp_ns,
            kind,
            flags,
            offset: range.offset,
            length: range.len,
            checksum,
            aux,
            payload,
        };
        match tracking.producer.publish(record) {
            Ok(index) => {
                let without_payload = kind == RecordKind::Write && !has_payload;
                tracking.pending.push_back(Pending {
                    index,
                    seq,
                    range,
                    timestamp_ns,
                    without_payload,
                    claim: false,
                });
                if kind == RecordKind::Write {
                    if has_payload {
                        bump(&self.counters.data_records, 1);
                    } else {
                        bump(&self.counters.metadata_records, 1);
                    }
                }
                Ok(())
            }
            Err(PublishError::Full(_)) => {
                let slots = u64::from(tracking.producer.geometry().slots);
                self.transition(&mut tracking, Event::RingFull { slots });
                drop(tracking);
                self.to_bitmap(range)?;
                // A tag that found no slot is not a consistent point.
                if kind == RecordKind::Tag {
                    return Err(IoFailure::Tracking);
                }
                Ok(())
            }
            Err(PublishError::Invalid(e)) => {
                tracing::error!(disk = %self.name, error = %e, seq, "ring refused a record");
                drop(tracking);
                self.to_bitmap(range)?;
                Err(IoFailure::Tracking)
            }
        }
    }

    fn to_bitmap(&self, range: Range) -> std::result::Result<(), IoFailure> {
        if range.len > 0 {
            bump(&self.counters.bitmap_writes, 1);
            self.meta().mark(range).map_err(|e| {
                tracing::error!(disk = %self.name, error = %e, "dirty bitmap update failed");
                IoFailure::Tracking
            })?;
        }
        Ok(())
    }

    fn transition(&self, tracking: &mut Tracking, event: Event) {
        if let Some(t) = tracking.tracker.on(event) {
            tracing::info!(disk = %self.name, from = ?t.from, to = ?t.to, reason = %t.reason.describe(), "tracking state changed");
        }
    }

    /// FLUSH: every write acknowledged before it is durable once it returns.
    /// Its record follows every write that arrived before it.
    pub fn flush(&self) -> std::result::Result<(), IoFailure> {
        bump(&self.counters.flushes, 1);
        let ticket = self.gate.begin(None);
        self.gate.wait_prior(&ticket);
        let result = match self.uring.sync(self.fd(), true) {
            Ok(()) => self.publish(
                None,
                RecordKind::Flush,
                Range { offset: 0, len: 0 },
                0,
                0,
                None,
                0,
            ),
            Err(e) => Err(self.io_failed("fdatasync", &e)),
        };
        self.gate.finish(ticket);
        result
    }

    /// TRIM (punch a hole) or WRITE_ZEROES.
    pub fn discard(
        &self,
        offset: u64,
        len: u64,
        kind: RecordKind,
        fua: bool,
        keep_allocated: bool,
    ) -> std::result::Result<(), IoFailure> {
        let counter = if kind == RecordKind::Trim {
            &self.counters.trims
        } else {
            &self.counters.zeroes
        };
        bump(counter, 1);
        let range = Range { offset, len };
        let ticket = self.gate.begin(Some(range));
        let provisional = self.begin_inflight();
        let covered = self.meta().before_write(range, provisional);
        if covered.is_err() {
            self.abandon(ticket, range, provisional);
            return Err(IoFailure::Tracking);
        }
        let result = self
            .punch(offset, len, kind, keep_allocated)
            .and_then(|()| {
                if fua {
                    self.uring.sync(self.fd(), true)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = result {
            let failure = self.io_failed("discard", &e);
            self.abandon(ticket, range, provisional);
            return Err(failure);
        }
        let flags = if fua { FLAG_FUA } else { 0 };
        let recorded = self.publish(None, kind, range, 0, flags, None, 0);
        self.gate.finish(ticket);
        self.end_inflight(provisional);
        recorded
    }

    fn punch(
        &self,
        offset: u64,
        len: u64,
        kind: RecordKind,
        keep_allocated: bool,
    ) -> std::io::Result<()> {
        let mode = match (kind, keep_allocated) {
            (RecordKind::WriteZeroes, true) => libc::FALLOC_FL_ZERO_RANGE,
            _ => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        };
        match self.uring.fallocate(self.fd(), mode, offset, len) {
            Ok(()) => Ok(()),
            // Devices without hole support: zeroes must still read back as zeroes.
            Err(e)
                if kind == RecordKind::WriteZeroes
                    && e.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                self.write_zero_bytes(offset, len)
            }
            Err(e) if kind == RecordKind::Trim && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.uring.write_all(
                self.fd(),
                &zeros[..usize::try_from(n).unwrap_or(0)],
                offset + done,
                false,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Insert a tag record (caller holds a barrier on every disk, so
    /// nothing else is in flight and `seq` is the newest number).
    pub fn tag(&self, seq: u64, tag_id: u64) -> Result<()> {
        self.publish(
            Some(seq),
            RecordKind::Tag,
            Range { offset: 0, len: 0 },
            0,
            0,
            None,
            tag_id,
        )
        .map_err(|_| Error::control(format!("disk {}: tag record not recorded", self.name)))
    }

    /// Housekeeping: learn what the consumer committed, release activity-log
    /// extents, clear the bits of committed claims, leave overflow states
    /// once the ring drained, claim dirty bits (see the module docs).
    pub fn housekeep(&self) {
        let _one = self.housekeeping.lock().expect("housekeeping lock");
        let (committed_seq, committed_claims) = {
            let mut tracking = self.tracking();
            let committed = tracking.producer.committed();
            let mut last = None;
            let mut claims = Vec::new();
            while tracking
                .pending
                .front()
                .is_some_and(|p| p.index < committed)
            {
                if let Some(p) = tracking.pending.pop_front() {
                    last = Some(p.seq);
                    if p.claim {
                        claims.push((p.index, p.range));
                    }
                }
            }
            (last, claims)
        };
        if let Some(seq) = committed_seq {
            // Not past a request still between its activity-log update and
            // its record: its extents must stay logged.
            let oldest = self
                .inflight
                .lock()
                .expect("inflight lock")
                .keys()
                .next()
                .copied();
            let seq = oldest.map_or(seq, |p| seq.min(p.saturating_sub(1)));
            self.meta().file.release(seq);
        }
        if !committed_claims.is_empty() {
            let kept = self.meta().settle(&committed_claims);
            if kept > 0 {
                tracing::debug!(disk = %self.name, bytes = kept, "bits set again after their claim stay dirty");
            }
        }
        if self.state() != State::Data {
            // The ticket comes first, so a tag's barrier sees either this
            // transition together with its record, or neither.
            let ticket = self.gate.begin(None);
            let changed = {
                let mut tracking = self.tracking();
                let event = Event::Occupancy {
                    free_slots: tracking.producer.free_slots(),
                    slots: u64::from(tracking.producer.geometry().slots),
                    free_payload: tracking.producer.free_payload_bytes(),
                    payload: tracking.producer.geometry().payload_bytes,
                };
                let before = tracking.tracker.transitions();
                self.transition(&mut tracking, event);
                tracking.tracker.transitions() != before
            };
            if changed {
                // Tell the consumer: dirty regions now need a resync.
                let aux = u64::from(Reason::Drained.code());
                let empty = Range { offset: 0, len: 0 };
                let _ = self.publish(None, RecordKind::StateChange, empty, 0, 0, None, aux);
            }
            self.gate.finish(ticket);
        }
        self.claim_dirty();
        if let Err(e) = self.meta().file.flush() {
            tracing::warn!(disk = %self.name, error = %e, "tracking metadata flush failed");
        }
    }

    /// Whether a claim may be published now: data state and more than half
    /// the record slots free.
    fn room_for_claims(tracking: &Tracking) -> bool {
        let slots = u64::from(tracking.producer.geometry().slots);
        tracking.tracker.state() == State::Data && tracking.producer.free_slots() * 2 > slots
    }

    /// Publish claims for dirty bits nothing claimed yet (bounded per pass).
    fn claim_dirty(&self) {
        if !Self::room_for_claims(&self.tracking()) {
            return;
        }
        let candidates = {
            let mut dirty = self.meta();
            dirty.passes += 1;
            if !dirty.rescan && dirty.passes < RESCAN_PASSES {
                return;
            }
            dirty.unclaimed()
        };
        for range in candidates {
            let ticket = self.gate.begin(Some(range));
            let published = self.publish_claim(range);
            self.gate.finish(ticket);
            if !published {
                self.meta().rescan = true;
                break;
            }
        }
    }

    /// One claim: a payload-less Write record of `range`, published under
    /// the caller's gate ticket on `range`. The claim is noted under the
    /// tracking file's lock together with the publish, so every bit set in
    /// `range` after the record is visible is noted as set again.
    fn publish_claim(&self, range: Range) -> bool {
        let mut tracking = self.tracking();
        if !Self::room_for_claims(&tracking) {
            return false;
        }
        let mut dirty = self.meta();
        let seq = self.sequencer.next();
        let timestamp_ns = now_ns();
        let record = NewRecord {
            seq,
            timestamp_ns,
            kind: RecordKind::Write,
            flags: 0,
            offset: range.offset,
            length: range.len,
            checksum: 0,
            aux: 0,
            payload: None,
        };
        match tracking.producer.publish(record) {
            Ok(index) => {
                tracking.pending.push_back(Pending {
                    index,
                    seq,
                    range,
                    timestamp_ns,
                    without_payload: true,
                    claim: true,
                });
                dirty.claimed.push((index, range));
                bump(&self.counters.resync_records, 1);
                true
            }
            Err(e) => {
                let e = match e {
                    PublishError::Full(_) => "ring full".to_string(),
                    PublishError::Invalid(e) => e.to_string(),
                };
                tracing::warn!(disk = %self.name, error = %e, seq, "resync claim not published");
                false
            }
        }
    }

    /// Mark the whole disk dirty (the recovery site lost its copy or part of
    /// the stream): housekeeping claims it for the sidecar, which skips
    /// what the site already holds by the checksum exchange. Regions claimed
    /// already stay dirty after their claim commits and are claimed again.
    /// Returns the bytes marked.
    pub fn resync_all(&self) -> Result<u64> {
        // The whole disk, holes included: the recovery site may hold old
        // data where the source now has a hole (a trim or zeroing whose
        // record was lost). Re-read holes travel as Zero extents.
        let ranges = [Range::new(0, self.size)];
        self.meta().mark_many(&ranges)?;
        let bytes = ranges.iter().map(|r| r.len).sum();
        tracing::info!(disk = %self.name, bytes, "whole disk marked for resync");
        Ok(bytes)
    }

    /// Allocation of `[offset, offset + len)` as (length, allocated) runs:
    /// holes of a backing file via SEEK_DATA/SEEK_HOLE; a block device is
    /// all allocated.
    pub fn allocation(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        allocation(&self.file, self.size, self.is_block_device, offset, len)
    }

    /// Regions not yet confirmed at the recovery site: unconsumed records
    /// plus dirty bits (bitmap state, crash recovery), merged.
    pub fn dirty_ranges(&self) -> Vec<Range> {
        let mut ranges: Vec<Range> = self
            .tracking()
            .pending
            .iter()
            .map(|p| p.range)
            .filter(|r| r.len > 0)
            .collect();
        ranges.extend(self.meta().file.dirty_ranges());
        merge_ranges(ranges)
    }

    /// Status for `ferry filter status`.
    pub fn status(&self) -> DiskStatus {
        // One lock at a time: the metadata first, then the tracking state.
        let (dirty_bytes, claimed_bytes, al_syncs) = {
            let meta = self.meta();
            (
                meta.file.dirty_ranges().iter().map(|r| r.len).sum(),
                meta.claimed_bytes(),
                meta.file.stats().syncs,
            )
        };
        let mut tracking = self.tracking();
        let free_payload = tracking.producer.free_payload_bytes();
        let free_slots = tracking.producer.free_slots();
        let geometry = tracking.producer.geometry();
        let slots = u64::from(geometry.slots);
        #[allow(clippy::cast_precision_loss)]
        let lag_seconds = tracking.pending.front().map_or(0.0, |p| {
            now_ns().saturating_sub(p.timestamp_ns) as f64 / 1e9
        });
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let c = &self.counters;
        DiskStatus {
            name: self.name.clone(),
            path: self.path.clone(),
            size: self.size,
            tracking: format!("{:?}", tracking.tracker.state()).to_lowercase(),
            reason: tracking.tracker.reason().describe(),
            transitions: tracking.tracker.transitions(),
            ring_slots: slots,
            ring_slots_used: slots - free_slots,
            ring_payload: geometry.payload_bytes,
            ring_payload_used: geometry.payload_bytes - free_payload,
            lag_records: u64::try_from(tracking.pending.len()).unwrap_or(u64::MAX),
            lag_bytes: tracking.pending.iter().map(|p| p.range.len).sum(),
            lag_seconds,
            dirty_bytes,
            claimed_bytes,
            counters: Counters {
                writes: load(&c.writes),
                write_bytes: load(&c.write_bytes),
                reads: load(&c.reads),
                read_bytes: load(&c.read_bytes),
                flushes: load(&c.flushes),
                trims: load(&c.trims),
                zeroes: load(&c.zeroes),
                data_records: load(&c.data_records),
                metadata_records: load(&c.metadata_records),
                bitmap_writes: load(&c.bitmap_writes),
                resync_records: load(&c.resync_records),
                al_syncs,
                io_errors: load(&c.io_errors),
            },
        }
    }

    /// Clean stop: flush the device, keep what the consumer has not
    /// committed as dirty (the ring does not survive a reboot), mark clean.
    /// Claims keep their bits (never cleared before their commit, and a
    /// committed claim housekeeping has not settled yet stays dirty too:
    /// one resync more, never one less).
    pub fn close(self) -> Result<()> {
        self.uring
            .sync(self.fd(), true)
            .map_err(|e| Error::io(e, "fdatasync").with_path(&self.path))?;
        let tracking = self.tracking.into_inner().expect("tracking lock");
        let mut meta = self.meta.into_inner().expect("meta lock").file;
        let committed = tracking.producer.committed();
        for p in tracking
            .pending
            .iter()
            .filter(|p| p.index >= committed && p.range.len > 0)
        {
            meta.set_dirty(p.range)?;
        }
        meta.close_clean()?;
        // Whatever the ring still held is dirty now: the ring itself (shared
        // memory, which outlives the process) goes, so clean stops leave
        // nothing in /dev/shm. A consumer still mapping it sees it removed.
        let ring = tracking.producer.path().to_path_buf();
        drop(tracking);
        if let Err(e) = std::fs::remove_file(&ring) {
            tracing::warn!(path = %ring.display(), error = %e, "ring not removed");
        }
        Ok(())
    }
}

/// Open a disk's tracking file, or create it. A new file (first protection
/// of the disk) gets every allocated region (`allocated`) marked dirty
/// unless `initial_copy` is off, so the existing data is copied: built as
/// `meta.new`, marked, closed cleanly and only then renamed into place, so
/// a crash midway starts over instead of leaving a file without the marks.
fn open_meta(
    path: &Path,
    size: u64,
    config: &FilterConfig,
    allocated: impl FnOnce() -> Vec<Range>,
) -> Result<MetaFile> {
    if path.exists() {
        // Opening folds what a crash left in the activity log into dirty
        // bits, so those regions stay tracked until the sidecar resyncs them.
        let (meta, recovery) = MetaFile::open(path)?;
        if !recovery.was_clean {
            tracing::warn!(path = %path.display(), regions = recovery.possibly_unshipped.len(), "unclean shutdown: possibly unshipped regions kept dirty");
        }
        if meta.geometry().disk_size != size {
            return Err(Error::config(format!(
                "{} tracks a disk of {} bytes, but the backing device has {size}; remove it to start over (full resync)",
                path.display(),
                meta.geometry().disk_size
            )));
        }
        return Ok(meta);
    }
    let geometry = MetaGeometry {
        disk_size: size,
        granularity: config
            .granularity
            .unwrap_or_else(|| ferry_ring::meta::default_granularity(size)),
        extent_size: config.al_extent,
        al_slots: config.al_slots,
    };
    if !config.initial_copy {
        tracing::info!(path = %path.display(), "new tracking file without initial copy: the target must already hold this disk's data");
        return Ok(MetaFile::create(path, geometry)?);
    }
    let mut new_name = path.as_os_str().to_owned();
    new_name.push(".new");
    let new = PathBuf::from(new_name);
    // Left by a crash during an earlier first start.
    match std::fs::remove_file(&new) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(e, "remove stale tracking file").with_path(&new)),
    }
    let mut meta = MetaFile::create(&new, geometry)?;
    let ranges = allocated();
    meta.set_dirty_ranges(&ranges)?;
    meta.close_clean()?;
    std::fs::rename(&new, path)
        .map_err(|e| Error::io(e, "rename tracking file").with_path(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(e, "fsync directory").with_path(dir))?;
    }
    let bytes: u64 = ranges.iter().map(|r| r.len).sum();
    tracing::info!(path = %path.display(), bytes, regions = ranges.len(), "first protection: allocated regions marked for the initial copy");
    let (meta, _) = MetaFile::open(path)?;
    Ok(meta)
}

/// `STATE/disks/NAME/ring` -> the ring in shared memory, for the sidecar.
fn link_ring(dir: &Path, ring: &Path) -> Result<()> {
    let link = dir.join("ring");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(ring, &link).map_err(|e| Error::io(e, "link ring").with_path(&link))
}

#[cfg(test)]
pub(crate) mod tests;
