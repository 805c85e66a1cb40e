//! Batching: ring records, in ring order, become change sets for one disk.
//!
//! # Rules
//!
//! * **Write with payload** (data state): the payload is checked against the
//!   record checksum (a mismatch is a [`ErrorKind::Corrupt`] error; the data
//!   is never shipped) and appended to the change set's data; a Write
//!   extent. The set is [`ChangeKind::WriteOrder`].
//! * **Write without payload** (metadata state): the range is read from the
//!   backing device now (content, not write order; no checksum check, the
//!   device may hold newer data) and the set is [`ChangeKind::Resync`]. A
//!   set never mixes the two: a Write of the other kind ends the set and
//!   starts the next one.
//! * **Trim / WriteZeroes**: a Trim / Zero extent (no data).
//! * **Flush**: no extent; counted in [`Pending::flushes`] (every change set
//!   is durable at the target as a whole before it is acknowledged, so a
//!   flush needs no boundary).
//! * **Tag**: ends the set and adds `Tag { seq, name, app, time_ns }` (the
//!   record's timestamp), the name and
//!   app flag looked up by the record's `aux` (the tag id) in the tag names
//!   ([`load_tag_names`](crate::load_tag_names); reloaded once from the
//!   state directory when an id is missing, since the filter writes the
//!   name after the record); default `tag-{aux}`, crash consistent. A tag in
//!   a Resync set is not a consistent point: it is dropped and counted in
//!   [`Pending::dropped_tags`].
//! * **StateChange**: ends the set (the tracking state changed; what follows
//!   may be of another kind).
//! * Every record counts for `first_seq`/`last_seq`. `prev_end_seq` is the
//!   previous set's `last_seq` (initially the target's resume point).
//! * Limits: a set ends once it holds `max_records` records or `max_bytes`
//!   data bytes; a Write that would push the data past `max_bytes` is held
//!   back for the next set (a set always takes at least one record, so a
//!   single Write larger than `max_bytes` travels alone). The protocol's
//!   bounds ([`MAX_RAW`], [`MAX_EXTENTS`]) cap the limits; a single record
//!   above [`MAX_RAW`] is [`ErrorKind::TooLarge`].
//! * Records whose seq is at or below the target's durable sequence (a
//!   resume after an ack that reached the target but not the ring) are not
//!   sent again: they are committed right away.
//!
//! # Cursor, commit and failure
//!
//! [`Batcher::next_change_set`] moves the consumer's cursor over the records
//! it takes; it never commits (except the already-durable records above).
//! The caller ships the set and, once the target acknowledged it durably,
//! commits the ring to [`Pending::commit_to`] and calls
//! [`Batcher::acked`]. On any failure (building, sealing, sending, a short
//! ack) the caller calls [`Batcher::rewind`], which rewinds the consumer to
//! its committed index and forgets the held record: the next call builds
//! again from the first unacknowledged record (boundaries may differ; every
//! seal takes a fresh nonce, and the target answers a set it partly holds
//! with its durable sequence).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use ferry_protocol::message::{
    ChangeKind, ChangeSetHeader, Extent, ExtentOp, Tag, MAX_EXTENTS, MAX_STR,
};
use ferry_protocol::payload::MAX_RAW;
use ferry_ring::ring::{Consumer, Record, RecordKind};

use crate::error::{Error, ErrorKind, Result};
use crate::tags::load_tag_names;

/// Positional reads from the protected disk's backing device.
pub trait ReadAt {
    /// Fill `buf` from `offset` (all of it, or an error).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_at(buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|s| Some(s..s.checked_add(buf.len())?))
            .and_then(|r| self.get(r))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// When a change set ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Data bytes (Write extents) per set; capped at [`MAX_RAW`].
    pub max_bytes: usize,
    /// Records per set; capped at [`MAX_EXTENTS`].
    pub max_records: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_bytes: 64 << 20,
            max_records: 16 << 10,
        }
    }
}

/// A change set built from the ring, not yet sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// The header, without chunks (sealing fills them in).
    pub header: ChangeSetHeader,
    /// The raw data: the Write extents' bytes in extent order.
    pub data: Vec<u8>,
    /// Ring index to commit once the target acknowledged the set durably.
    pub commit_to: u64,
    /// Records in the set.
    pub records: u64,
    /// Flush records in the set.
    pub flushes: u64,
    /// Tags dropped because the set is Resync.
    pub dropped_tags: u64,
    /// State-change records in the set (the filter left the data state
    /// before them: what follows is not write order until a resync ends).
    pub state_changes: u64,
    /// Bytes re-read from the backing device that were all zeros and travel
    /// as Zero extents instead of data.
    pub zero_bytes: u64,
}

/// A record taken from the ring but left for the next set.
#[derive(Debug)]
struct Held {
    index: u64,
    record: Record,
    /// The (checked) payload of a data-state Write.
    payload: Option<Vec<u8>>,
}

/// The set being built.
#[derive(Debug, Default)]
struct Building {
    kind: Option<ChangeKind>,
    first_seq: Option<u64>,
    last_seq: u64,
    tags: Vec<Tag>,
    extents: Vec<Extent>,
    data: Vec<u8>,
    commit_to: u64,
    records: u64,
    flushes: u64,
    dropped_tags: u64,
    state_changes: u64,
    zero_bytes: u64,
    ended: bool,
}

/// Where a Write's data comes from.
enum Src<'a> {
    /// The ring payload (copied into the set's data).
    Ring(&'a [u8]),
    /// Already at the end of the set's data (a held payload).
    InPlace,
    /// Read from the backing device (metadata state).
    Backing,
}

/// How a Write record relates to the set being built.
enum Fit {
    Take,
    HoldBack,
}

/// Turns one disk's ring records into change sets. See the module docs.
#[derive(Debug)]
pub struct Batcher {
    host: String,
    disk: String,
    epoch: u64,
    /// Last sequence durable at the target.
    acked_end: u64,
    /// `last_seq` of the last set built (the next set's `prev_end_seq`).
    built_end: u64,
    /// (first_seq, last_seq) of the sets built and not yet acknowledged,
    /// oldest first. After a rewind they are built again with exactly these
    /// boundaries: the target may hold some of them without our having its
    /// answer, and a set it holds whole is acknowledged as a duplicate,
    /// where a differently cut one would overlap it (which a spooled,
    /// sealed set could not recover from).
    unacked: std::collections::VecDeque<(u64, u64)>,
    /// Sets still to be built again with their old boundaries (a prefix of
    /// `unacked`, set by a rewind).
    rebuild: usize,
    held: Option<Held>,
    tag_names: HashMap<u64, (String, bool)>,
    state_dir: Option<PathBuf>,
}

impl Batcher {
    /// A batcher for `disk` of `host` in `epoch`, resuming after `resume_after`,
    /// the last sequence durable at the target (0 when it holds nothing;
    /// the target's resume `next_seq - 1`).
    pub fn new(host: &str, disk: &str, epoch: u64, resume_after: u64) -> Batcher {
        Batcher {
            host: host.to_string(),
            disk: disk.to_string(),
            epoch,
            acked_end: resume_after,
            built_end: resume_after,
            unacked: std::collections::VecDeque::new(),
            rebuild: 0,
            held: None,
            tag_names: HashMap::new(),
            state_dir: None,
        }
    }

    /// Look tag names up in `state_dir/tags.jsonl` (loaded now, reloaded
    /// when a tag id is missing).
    pub fn with_state_dir(mut self, state_dir: impl Into<PathBuf>) -> Batcher {
        let dir = state_dir.into();
        self.tag_names = load_tag_names(&dir);
        self.state_dir = Some(dir);
        self
    }

    /// Use these tag names (id -> (name, app consistent)).
    pub fn with_tag_names(mut self, names: HashMap<u64, (String, bool)>) -> Batcher {
        self.tag_names = names;
        self
    }

    /// The last sequence known durable at the target.
    pub fn acked_end(&self) -> u64 {
        self.acked_end
    }

    /// The `prev_end_seq` the next set will carry.
    pub fn prev_end_seq(&self) -> u64 {
        self.built_end
    }

    /// The target made everything up to `last_seq` durable.
    pub fn acked(&mut self, last_seq: u64) {
        if last_seq > self.acked_end {
            self.acked_end = last_seq;
        }
        if self.built_end < self.acked_end {
            self.built_end = self.acked_end;
        }
        while self
            .unacked
            .front()
            .is_some_and(|&(_, l)| l <= self.acked_end)
        {
            self.unacked.pop_front();
            self.rebuild = self.rebuild.saturating_sub(1);
        }
    }

    /// Start a new epoch (after a gap: a recreated ring, a target that lost
    /// the chain). The next set opens it; its `prev_end_seq` need not match.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// The epoch sets are built in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// After a failure: rewind the consumer to its committed index, forget
    /// the held record and continue from the last acknowledged set.
    pub fn rewind(&mut self, consumer: &mut Consumer) {
        consumer.rewind();
        self.held = None;
        self.built_end = self.acked_end;
        self.rebuild = self.unacked.len();
    }

    /// Build the next change set from the records after the consumer's
    /// cursor (and the record held back from the previous set), or None
    /// when there is nothing to ship. See the module docs for the rules.
    pub fn next_change_set(
        &mut self,
        consumer: &mut Consumer,
        backing: &dyn ReadAt,
        limits: BatchLimits,
    ) -> Result<Option<Pending>> {
        let res = self.build(consumer, backing, limits);
        if res.is_err() {
            // The set is lost; the caller rewinds before anything else.
            self.held = None;
        }
        res
    }

    fn build(
        &mut self,
        consumer: &mut Consumer,
        backing: &dyn ReadAt,
        limits: BatchLimits,
    ) -> Result<Option<Pending>> {
        let max_bytes = limits.max_bytes.min(MAX_RAW);
        let max_records = u64::try_from(limits.max_records.clamp(1, MAX_EXTENTS)).unwrap_or(1);
        let disk_size = consumer.disk_size();
        // After a rewind, sets sent before are built again with their
        // boundaries (see `unacked`).
        let pinned = (self.rebuild > 0)
            .then(|| self.unacked.get(self.unacked.len() - self.rebuild))
            .flatten()
            .map(|&(_, last)| last);
        let mut b = Building::default();
        if let Some(h) = self.held.take() {
            self.add_held(&mut b, h, backing, disk_size)?;
        }
        while !b.ended {
            match pinned {
                Some(last) if b.first_seq.is_some() && b.last_seq >= last => break,
                Some(_) => {}
                None if b.records >= max_records || b.data.len() >= max_bytes => break,
                None => {}
            }
            let Some(view) = consumer
                .next()
                .map_err(|e| Error::ring("read the next ring record", e))?
            else {
                break;
            };
            let (index, rec) = (view.index, view.record);
            if rec.seq <= self.acked_end && b.first_seq.is_none() {
                // Already durable at the target: nothing to send.
                consumer
                    .commit(index + 1)
                    .map_err(|e| Error::ring("commit records the target holds", e))?;
                continue;
            }
            let src = match rec.kind {
                RecordKind::Write => {
                    if let Some(p) = view.payload {
                        rec.verify_payload(p).map_err(|e| {
                            Error::ring(format!("record {index} (seq {})", rec.seq), e)
                        })?;
                    }
                    let fit = if pinned.is_some() {
                        Fit::Take
                    } else {
                        self.fit(&b, &rec, max_bytes)?
                    };
                    if let Fit::HoldBack = fit {
                        self.held = Some(Held {
                            index,
                            record: rec,
                            payload: view.payload.map(<[u8]>::to_vec),
                        });
                        break;
                    }
                    view.payload.map_or(Src::Backing, Src::Ring)
                }
                _ => Src::Backing,
            };
            // One copy: ring payload -> change-set data.
            Self::add_with(&mut b, index, rec, src, backing, disk_size, &mut |id| {
                self.tag_name(id)
            })?;
        }
        let Some(first_seq) = b.first_seq else {
            return Ok(None);
        };
        let kind = b.kind.unwrap_or(ChangeKind::WriteOrder);
        let header = ChangeSetHeader {
            host: self.host.clone(),
            disk: self.disk.clone(),
            epoch: self.epoch,
            kind,
            first_seq,
            last_seq: b.last_seq,
            prev_end_seq: self.built_end,
            // Stamped by the shipper just before sealing.
            nonce_stream: 0,
            nonce_counter: 0,
            key_salt: [0; 16],
            consistent_from: 0,
            tags: b.tags,
            extents: b.extents,
            chunks: Vec::new(),
        };
        self.built_end = b.last_seq;
        if pinned.is_some() {
            self.rebuild -= 1;
        } else {
            self.unacked.push_back((first_seq, b.last_seq));
        }
        Ok(Some(Pending {
            header,
            data: b.data,
            commit_to: b.commit_to,
            records: b.records,
            flushes: b.flushes,
            dropped_tags: b.dropped_tags,
            state_changes: b.state_changes,
            zero_bytes: b.zero_bytes,
        }))
    }

    /// Whether a Write goes into the set or waits for the next one.
    fn fit(&self, b: &Building, rec: &Record, max_bytes: usize) -> Result<Fit> {
        let len = usize::try_from(rec.length)
            .ok()
            .filter(|&l| l <= MAX_RAW)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "write seq {} of {} bytes exceeds a change set ({MAX_RAW} bytes)",
                        rec.seq, rec.length
                    ),
                )
            })?;
        if b.first_seq.is_none() {
            return Ok(Fit::Take);
        }
        let kind = write_kind(rec);
        if b.kind.is_some_and(|k| k != kind) || b.data.len().saturating_add(len) > max_bytes {
            return Ok(Fit::HoldBack);
        }
        Ok(Fit::Take)
    }

    fn tag_name(&mut self, id: u64) -> (String, bool) {
        if !self.tag_names.contains_key(&id) {
            if let Some(dir) = &self.state_dir {
                self.tag_names = load_tag_names(dir);
            }
        }
        match self.tag_names.get(&id) {
            Some((name, app)) => (truncate_name(name), *app),
            None => (format!("tag-{id}"), false),
        }
    }

    /// Add the record held back from the previous set (the first of this
    /// one): its checked payload becomes the start of this set's data.
    fn add_held(
        &mut self,
        b: &mut Building,
        h: Held,
        backing: &dyn ReadAt,
        disk_size: u64,
    ) -> Result<()> {
        let src = match h.payload {
            Some(p) => {
                b.data = p;
                Src::InPlace
            }
            None => Src::Backing,
        };
        Self::add_with(b, h.index, h.record, src, backing, disk_size, &mut |id| {
            self.tag_name(id)
        })
    }

    fn add_with(
        b: &mut Building,
        index: u64,
        rec: Record,
        src: Src<'_>,
        backing: &dyn ReadAt,
        disk_size: u64,
        tag_name: &mut dyn FnMut(u64) -> (String, bool),
    ) -> Result<()> {
        let range_ok = rec
            .offset
            .checked_add(rec.length)
            .is_some_and(|end| end <= disk_size);
        let extent = |op| Extent {
            seq: rec.seq,
            offset: rec.offset,
            length: rec.length,
            op,
        };
        match rec.kind {
            RecordKind::Write | RecordKind::Trim | RecordKind::WriteZeroes if !range_ok => {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "record {index} (seq {}): range {}+{} beyond the disk ({disk_size} bytes)",
                        rec.seq, rec.offset, rec.length
                    ),
                ));
            }
            RecordKind::Write => {
                let len = usize::try_from(rec.length).map_err(|_| {
                    Error::new(ErrorKind::TooLarge, format!("write seq {}", rec.seq))
                })?;
                match src {
                    Src::Ring(p) => {
                        b.data.extend_from_slice(p);
                        b.kind = Some(ChangeKind::WriteOrder);
                    }
                    Src::InPlace => b.kind = Some(ChangeKind::WriteOrder),
                    Src::Backing => {
                        let start = b.data.len();
                        b.data.resize(start + len, 0);
                        backing
                            .read_at(&mut b.data[start..], rec.offset)
                            .map_err(|e| {
                                Error::with_source(
                                    ErrorKind::Io,
                                    format!(
                                        "read {len} bytes at {} from the backing device (seq {})",
                                        rec.offset, rec.seq
                                    ),
                                    e,
                                )
                            })?;
                        b.kind = Some(ChangeKind::Resync);
                        if is_zero(&b.data[start..]) {
                            // Unwritten or zeroed region: no data travels.
                            b.data.truncate(start);
                            b.zero_bytes += rec.length;
                            b.extents.push(extent(ExtentOp::Zero));
                            b.first_seq.get_or_insert(rec.seq);
                            b.last_seq = rec.seq;
                            b.commit_to = index + 1;
                            b.records += 1;
                            return Ok(());
                        }
                    }
                }
                b.extents.push(extent(ExtentOp::Write));
            }
            RecordKind::Trim => b.extents.push(extent(ExtentOp::Trim)),
            RecordKind::WriteZeroes => b.extents.push(extent(ExtentOp::Zero)),
            RecordKind::Flush => b.flushes += 1,
            RecordKind::Tag => {
                if b.kind == Some(ChangeKind::Resync) {
                    b.dropped_tags += 1;
                } else {
                    let (name, app) = tag_name(rec.aux);
                    b.tags.push(Tag {
                        seq: rec.seq,
                        name,
                        app,
                        time_ns: rec.timestamp_ns,
                    });
                }
                b.ended = true;
            }
            RecordKind::StateChange => {
                b.state_changes += 1;
                b.ended = true;
            }
        }
        b.first_seq.get_or_insert(rec.seq);
        b.last_seq = rec.seq;
        b.commit_to = index + 1;
        b.records += 1;
        Ok(())
    }
}

/// Whether every byte of `data` is zero (eight bytes at a time).
pub fn is_zero(data: &[u8]) -> bool {
    let words = data.chunks_exact(8);
    let tail = words.remainder();
    words
        .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])))
        .fold(0u64, |acc, w| acc | w)
        == 0
        && tail.iter().all(|&b| b == 0)
}

fn write_kind(rec: &Record) -> ChangeKind {
    if rec.has_payload() {
        ChangeKind::WriteOrder
    } else {
        ChangeKind::Resync
    }
}

/// A tag name the protocol can carry (at most [`MAX_STR`] bytes, cut at a
/// character boundary).
fn truncate_name(name: &str) -> String {
    let mut end = name.len().min(MAX_STR);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}
