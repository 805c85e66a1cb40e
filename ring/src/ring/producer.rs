//! The producer side: the filter appends records (and payloads) in write order.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex};

use super::layout::*;
use super::record::{Record, RecordKind};
use super::shm::{futex_wake, lock_role, new_generation, now_ns, open_ring, Header, Mapping, Role};
use crate::error::{Error, Result};

/// Size of a new ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Record slots: a power of two, [`MIN_SLOTS`]..=[`MAX_SLOTS`].
    pub slots: u32,
    /// Payload area bytes: a multiple of [`PAYLOAD_ALIGN`],
    /// [`MIN_PAYLOAD_BYTES`]..=[`MAX_PAYLOAD_BYTES`].
    pub payload_bytes: u64,
}

impl Geometry {
    /// Check the bounds (InvalidInput otherwise).
    pub fn validate(&self) -> Result<()> {
        if !self.slots.is_power_of_two() || !(MIN_SLOTS..=MAX_SLOTS).contains(&self.slots) {
            return Err(Error::invalid(format!(
                "ring slots {}: need a power of two in {MIN_SLOTS}..={MAX_SLOTS}",
                self.slots
            )));
        }
        if !self.payload_bytes.is_multiple_of(PAYLOAD_ALIGN)
            || !(MIN_PAYLOAD_BYTES..=MAX_PAYLOAD_BYTES).contains(&self.payload_bytes)
        {
            return Err(Error::invalid(format!(
                "ring payload area {} bytes: need a multiple of {PAYLOAD_ALIGN} in \
                 {MIN_PAYLOAD_BYTES}..={MAX_PAYLOAD_BYTES}",
                self.payload_bytes
            )));
        }
        Ok(())
    }

    /// Length of the ring file with this geometry.
    pub fn file_len(&self) -> u64 {
        file_len(self.slots, self.payload_bytes)
    }
}

/// A record to publish. `flags` may hold [`FLAG_FUA`]; the payload flag is
/// set by [`Producer::publish`] from `payload`.
#[derive(Debug)]
pub struct NewRecord {
    /// Host-wide sequence number, above every seq published in this ring.
    pub seq: u64,
    /// Nanoseconds since the Unix epoch (see [`now_ns`](super::now_ns)).
    pub timestamp_ns: u64,
    /// What the record stands for.
    pub kind: RecordKind,
    /// [`FLAG_FUA`] or 0.
    pub flags: u8,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes; with a payload it must equal the payload's length.
    pub length: u64,
    /// crc32c of the data written ([`payload_checksum`](super::payload_checksum)).
    pub checksum: u32,
    /// Tag id, state-change reason code, or 0.
    pub aux: u64,
    /// The payload, reserved from this producer, or None (metadata record).
    pub payload: Option<PayloadSlot>,
}

impl NewRecord {
    /// A record of `kind` with sequence `seq`, timestamped now, everything else zero.
    pub fn new(seq: u64, kind: RecordKind) -> NewRecord {
        NewRecord {
            seq,
            timestamp_ns: now_ns(),
            kind,
            flags: 0,
            offset: 0,
            length: 0,
            checksum: 0,
            aux: 0,
            payload: None,
        }
    }
}

/// Why [`Producer::publish`] did not publish.
#[derive(Debug)]
pub enum PublishError {
    /// No free record slot (the caller goes to bitmap state). The record is
    /// handed back untouched; dropping it cancels its payload reservation.
    Full(Box<NewRecord>),
    /// The record is invalid (non-increasing seq, payload length mismatch,
    /// payload from another ring, unknown flags): InvalidInput.
    Invalid(Error),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Full(r) => write!(f, "ring full: no free record slot for seq {}", r.seq),
            PublishError::Invalid(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for PublishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PublishError::Full(_) => None,
            PublishError::Invalid(e) => Some(e),
        }
    }
}

/// What a producer shares with its outstanding payload slots.
#[derive(Debug)]
struct Shared {
    map: Mapping,
    /// Payload positions of reservations dropped without publishing; the
    /// producer frees them on its next accounting pass.
    cancelled: Mutex<Vec<u64>>,
}

/// Payload space reserved in the ring, owned by the holder until it is
/// published (moved into [`NewRecord::payload`]) or dropped (cancelled:
/// the space is freed).
///
/// It does not borrow the producer: fill it (from a socket, say) while other
/// threads reserve and publish. It keeps the mapping alive by itself.
pub struct PayloadSlot {
    shared: Arc<Shared>,
    ptr: NonNull<u8>,
    len: usize,
    /// Monotonic payload position.
    pos: u64,
    /// Whether the producer accounts for this region (false for empty
    /// slots and once published).
    tracked: bool,
}

// SAFETY: the slot's bytes are a region of the shared mapping that the
// producer hands to this reservation alone (see `Producer::reserve`); the
// mapping itself is kept alive by the `Arc<Shared>` (Send + Sync). Nothing
// in the slot is tied to the thread that reserved it, so moving it to
// another thread is sound.
unsafe impl Send for PayloadSlot {}
// SAFETY: `&PayloadSlot` only gives `&[u8]` of its region; writes need `&mut`.
unsafe impl Sync for PayloadSlot {}

impl fmt::Debug for PayloadSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadSlot")
            .field("pos", &self.pos)
            .field("len", &self.len)
            .finish()
    }
}

impl PayloadSlot {
    /// Length of the reservation in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the reservation is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Monotonic payload position (the record's `payload_pos` once published).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The reserved bytes (their content is whatever the ring held before).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr..ptr+len` lies inside the mapping (checked by
        // `reserve` against the payload area) or is a dangling pointer with
        // len 0. The region belongs to this reservation alone: the producer
        // never reserves bytes between its tail (the oldest region still
        // reserved or published-uncommitted) and its head twice, and the
        // tail cannot pass this region while it is outstanding; the consumer
        // reads payloads only of records below `published`, and no record
        // points here before this slot is published (which consumes it).
        // The mapping outlives `self` through `shared`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The reserved bytes, to fill with the payload.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only live
        // reference into the region within this process, and no other party
        // (producer or consumer) touches the region until it is published.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PayloadSlot {
    fn drop(&mut self) {
        if self.tracked {
            let mut list = self
                .shared
                .cancelled
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            list.push(self.pos);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegionState {
    /// Reserved, not yet published nor cancelled.
    Reserved,
    /// Published as record `index`: free once `committed > index`.
    Published(u64),
    /// Dropped without publishing.
    Cancelled,
}

/// One payload region, in reservation order.
#[derive(Debug, Clone, Copy)]
struct Region {
    /// Where the reservation began (before skipping to the area's start).
    start: u64,
    /// Where its bytes begin.
    data: u64,
    state: RegionState,
}

/// The producer end of one disk's ring (the filter). Single producer: wrap
/// it in a `Mutex` to share it between threads.
pub struct Producer {
    path: PathBuf,
    /// Holds the producer lock.
    _file: File,
    shared: Arc<Shared>,
    header: Header,
    slots: u64,
    area: u64,
    payload_offset: usize,
    published: u64,
    /// Last committed index seen (monotonic, clamped to `published`).
    committed: u64,
    head: u64,
    regions: VecDeque<Region>,
    last_seq: Option<u64>,
}

impl fmt::Debug for Producer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("path", &self.path)
            .field("generation", &self.header.generation)
            .field("published", &self.published)
            .field("committed", &self.committed)
            .field("payload_head", &self.head)
            .field("regions", &self.regions.len())
            .finish()
    }
}

fn to_usize(v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid("ring larger than the address space"))
}

impl Producer {
    /// Create a new, empty ring at `path` (replacing any ring there, unless a
    /// live producer holds it), with a new generation. The file is built
    /// under a temporary name and renamed into place, so a consumer never
    /// sees a half-written header, and a consumer of the replaced ring keeps
    /// a valid (stale) mapping: its `check_generation` reports Stale.
    pub fn create(
        path: &Path,
        geometry: Geometry,
        disk_name: &str,
        disk_size: u64,
    ) -> Result<Producer> {
        Self::create_inner(path, geometry, disk_name, disk_size).map_err(|e| e.at_path(path))
    }

    fn create_inner(
        path: &Path,
        geometry: Geometry,
        disk_name: &str,
        disk_size: u64,
    ) -> Result<Producer> {
        geometry.validate()?;
        if disk_name.len() > MAX_DISK_NAME || disk_name.contains('\0') {
            return Err(Error::invalid(format!(
                "disk name {disk_name:?}: at most {MAX_DISK_NAME} bytes, no NUL"
            )));
        }
        // Refuse to replace a ring that a live producer still holds.
        if let Ok(old) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            lock_role(&old, Role::Producer)?;
        }
        let header = Header {
            slots: geometry.slots,
            payload_bytes: geometry.payload_bytes,
            disk_size,
            generation: new_generation(),
            created_ns: now_ns(),
            disk_name: disk_name.to_owned(),
        };
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(
            ".tmp-{}-{:016x}",
            std::process::id(),
            header.generation
        ));
        let tmp = path.with_file_name(tmp_name);
        let build = || -> Result<(File, Mapping)> {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| Error::io(e, "create ring"))?;
            lock_role(&file, Role::Producer)?;
            file.set_len(geometry.file_len())
                .map_err(|e| Error::io(e, "size ring"))?;
            let map = Mapping::map(&file, to_usize(geometry.file_len())?)
                .map_err(|e| Error::io(e, "mmap ring"))?;
            // The file is new and private until the rename: nobody else maps it.
            if !map.write_at(0, &header.encode()) {
                return Err(Error::invalid("ring header does not fit the mapping"));
            }
            map.u32_at::<P_PID>()
                .store(std::process::id(), Ordering::Relaxed);
            std::fs::rename(&tmp, path).map_err(|e| Error::io(e, "rename ring into place"))?;
            Ok((file, map))
        };
        let (file, map) = build().inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        Self::assemble(path, file, header, map, 0, 0, 0, VecDeque::new(), None)
    }

    /// Resume the ring at `path` after the previous producer died: published
    /// records that are not committed stay (with their payloads) and new
    /// records follow them; the generation is kept, so a running consumer
    /// simply continues. Reservations the dead producer had not published
    /// are gone. All payload slots of an earlier producer of this ring in
    /// this process must be gone too (as they are when its process died).
    pub fn reopen(path: &Path) -> Result<Producer> {
        Self::reopen_inner(path).map_err(|e| e.at_path(path))
    }

    fn reopen_inner(path: &Path) -> Result<Producer> {
        let (file, header, map) = open_ring(path)?;
        lock_role(&file, Role::Producer)?;
        let slots = u64::from(header.slots);
        let area = header.payload_bytes;
        let published = map.u64_at::<P_PUBLISHED>().load(Ordering::Acquire);
        let committed = map.u64_at::<C_COMMITTED>().load(Ordering::Acquire);
        if committed > published || published - committed > slots || published > MAX_POSITION {
            return Err(Error::corrupt(format!(
                "ring counters inconsistent: published {published}, committed {committed}, {slots} slots"
            ))
            .at_offset(P_PUBLISHED as u64));
        }
        let stored_head = map.u64_at::<P_PAYLOAD_HEAD>().load(Ordering::Relaxed);
        if !stored_head.is_multiple_of(PAYLOAD_ALIGN) || stored_head > MAX_POSITION {
            return Err(Error::corrupt(format!(
                "payload head {stored_head} is not aligned or too large"
            ))
            .at_offset(P_PAYLOAD_HEAD as u64));
        }
        // Rebuild the live payload regions from the uncommitted records.
        let mut live: Vec<(u64, u64, u64)> = Vec::new(); // (data, end, index)
        let mut last_seq = None;
        let first = if published > 0 {
            committed.min(published - 1)
        } else {
            published
        };
        for index in first..published {
            let rec = read_record(&map, slots, index)?;
            if let Some(prev) = last_seq {
                if rec.seq <= prev {
                    return Err(Error::corrupt(format!(
                        "record {index}: seq {} after seq {prev}",
                        rec.seq
                    ))
                    .at_offset(slot_offset(slots, index)));
                }
            }
            last_seq = Some(rec.seq);
            if index < committed {
                continue;
            }
            if rec
                .payload_range(area)
                .map_err(|e| e.at_offset(slot_offset(slots, index)))?
                .is_some()
                && rec.length > 0
            {
                if rec.payload_pos > MAX_POSITION {
                    return Err(Error::corrupt(format!(
                        "record {index}: payload position {} too large",
                        rec.payload_pos
                    ))
                    .at_offset(slot_offset(slots, index)));
                }
                let end = rec
                    .payload_pos
                    .saturating_add(rec.length.div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN);
                live.push((rec.payload_pos, end, index));
            }
        }
        live.sort_unstable();
        // The dead producer's reservations after the last live payload are
        // gone: continue right after it.
        let mut head = stored_head;
        for w in live.windows(2) {
            if w[1].0 < w[0].1 {
                return Err(Error::corrupt(format!(
                    "payloads of records {} and {} overlap",
                    w[0].2, w[1].2
                ))
                .at_offset(slot_offset(slots, w[1].2)));
            }
        }
        if let (Some(lo), Some(hi)) = (live.first(), live.last()) {
            head = hi.1;
            if head - lo.0 > area {
                return Err(Error::corrupt(format!(
                    "live payloads span {} bytes, more than the {area}-byte area",
                    head - lo.0
                ))
                .at_offset(slot_offset(slots, lo.2)));
            }
        }
        let regions = live
            .iter()
            .map(|&(data, _, index)| Region {
                start: data,
                data,
                state: RegionState::Published(index),
            })
            .collect();
        map.u64_at::<P_PAYLOAD_HEAD>()
            .store(head, Ordering::Relaxed);
        map.u32_at::<P_PID>()
            .store(std::process::id(), Ordering::Relaxed);
        Self::assemble(
            path, file, header, map, published, committed, head, regions, last_seq,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        path: &Path,
        file: File,
        header: Header,
        map: Mapping,
        published: u64,
        committed: u64,
        head: u64,
        regions: VecDeque<Region>,
        last_seq: Option<u64>,
    ) -> Result<Producer> {
        Ok(Producer {
            path: path.to_path_buf(),
            _file: file,
            slots: u64::from(header.slots),
            area: header.payload_bytes,
            payload_offset: to_usize(header.payload_offset())?,
            header,
            shared: Arc::new(Shared {
                map,
                cancelled: Mutex::new(Vec::new()),
            }),
            published,
            committed,
            head,
            regions,
            last_seq,
        })
    }

    fn map(&self) -> &Mapping {
        &self.shared.map
    }

    /// The consumer's committed index, loaded with acquire and clamped to
    /// what is possible (a confused consumer can only stall the producer).
    fn load_committed(&self) -> u64 {
        let c = self.map().u64_at::<C_COMMITTED>().load(Ordering::Acquire);
        if c < self.committed || c > self.published {
            self.committed
        } else {
            c
        }
    }

    /// Free what is no longer needed: cancelled reservations and payloads of
    /// committed records at the tail.
    fn reclaim(&mut self) {
        self.committed = self.load_committed();
        let cancelled = std::mem::take(
            &mut *self
                .shared
                .cancelled
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for pos in cancelled {
            if let Ok(i) = self.regions.binary_search_by_key(&pos, |r| r.data) {
                if self.regions[i].state == RegionState::Reserved {
                    self.regions[i].state = RegionState::Cancelled;
                }
            }
        }
        while let Some(front) = self.regions.front() {
            let free = match front.state {
                RegionState::Reserved => false,
                RegionState::Published(index) => index < self.committed,
                RegionState::Cancelled => true,
            };
            if !free {
                break;
            }
            self.regions.pop_front();
        }
    }

    fn tail(&self) -> u64 {
        self.regions.front().map_or(self.head, |r| r.start)
    }

    /// Reserve `len` payload bytes, in order. None when they do not fit now
    /// (the caller records without payload: metadata state). A payload never
    /// wraps around the end of the area: if it does not fit before the end,
    /// the reservation skips to the start, and the skipped bytes stay used
    /// until the reservation is freed (unless nothing is live, then the skip
    /// is free). Space is taken in multiples of [`PAYLOAD_ALIGN`]; a
    /// zero-length reservation takes none. A cancelled reservation is freed
    /// when the regions reserved before it are (`payload_head` never moves
    /// back).
    pub fn reserve(&mut self, len: usize) -> Option<PayloadSlot> {
        if len == 0 {
            return Some(PayloadSlot {
                shared: Arc::clone(&self.shared),
                ptr: NonNull::dangling(),
                len: 0,
                pos: self.head,
                tracked: false,
            });
        }
        let len64 = u64::try_from(len).ok()?;
        if len64 > self.area {
            return None;
        }
        self.reclaim();
        let need = len64.div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN;
        let at = self.head % self.area;
        let skip = if at + need > self.area {
            self.area - at
        } else {
            0
        };
        let data = self.head + skip;
        let end = data + need;
        // With nothing live, the skipped bytes protect nothing: the tail
        // jumps to `data` at once.
        let empty = self.regions.is_empty();
        let tail = if empty { data } else { self.tail() };
        if end - tail > self.area {
            return None;
        }
        let place = usize::try_from(data % self.area).ok()?;
        // The payload area starts at `payload_offset` and is `area` bytes:
        // `place + len <= area` holds because `at + need <= area` after the skip.
        // SAFETY: payload_offset + place + len <= payload_offset + area =
        // file length = mapping length, so the offset stays inside the mapping.
        let ptr = unsafe { self.map().base().add(self.payload_offset + place) };
        let ptr = NonNull::new(ptr)?;
        let start = if empty { data } else { self.head };
        self.regions.push_back(Region {
            start,
            data,
            state: RegionState::Reserved,
        });
        self.head = end;
        self.map()
            .u64_at::<P_PAYLOAD_HEAD>()
            .store(end, Ordering::Relaxed);
        Some(PayloadSlot {
            shared: Arc::clone(&self.shared),
            ptr,
            len,
            pos: data,
            tracked: true,
        })
    }

    /// Publish a record: write its slot, then release-store `published`.
    /// Returns the record's index. Records appear in the order of publish
    /// calls, whatever the order of their payload reservations. Payload
    /// bytes written through the slot before it was handed here (from any
    /// thread, with the usual synchronization of that hand-over) are visible
    /// to the consumer once it sees the record.
    pub fn publish(&mut self, mut rec: NewRecord) -> Result<u64, PublishError> {
        let invalid = |m: String| PublishError::Invalid(Error::invalid(m).at_path(&self.path));
        if rec.flags & !FLAG_FUA != 0 {
            return Err(invalid(format!(
                "record flags {:#x}: only FUA may be given",
                rec.flags
            )));
        }
        if let Some(prev) = self.last_seq {
            if rec.seq <= prev {
                return Err(invalid(format!(
                    "seq {} is not above the last published seq {prev}",
                    rec.seq
                )));
            }
        }
        if let Some(slot) = &rec.payload {
            if !Arc::ptr_eq(&slot.shared, &self.shared) {
                return Err(invalid(
                    "payload slot was reserved from another ring or producer".into(),
                ));
            }
            if u64::try_from(slot.len).ok() != Some(rec.length) {
                return Err(invalid(format!(
                    "record length {} differs from its payload's {}",
                    rec.length, slot.len
                )));
            }
        }
        self.committed = self.load_committed();
        if self.published - self.committed >= self.slots {
            return Err(PublishError::Full(Box::new(rec)));
        }
        let index = self.published;
        let (payload_pos, flags) = match rec.payload.as_mut() {
            Some(slot) => {
                if slot.tracked {
                    match self.regions.binary_search_by_key(&slot.pos, |r| r.data) {
                        Ok(i) if self.regions[i].state == RegionState::Reserved => {
                            self.regions[i].state = RegionState::Published(index);
                        }
                        _ => {
                            return Err(invalid(format!(
                                "payload slot at {} is not reserved",
                                slot.pos
                            )))
                        }
                    }
                    slot.tracked = false;
                }
                (slot.pos, rec.flags | FLAG_HAS_PAYLOAD)
            }
            None => (NO_PAYLOAD, rec.flags),
        };
        let record = Record {
            seq: rec.seq,
            timestamp_ns: rec.timestamp_ns,
            offset: rec.offset,
            length: rec.length,
            payload_pos,
            aux: rec.aux,
            checksum: rec.checksum,
            kind: rec.kind,
            flags,
        };
        let off = usize::try_from(slot_offset(self.slots, index)).unwrap_or(usize::MAX);
        // Slot `index % slots` is free: `index - committed < slots`, so the
        // consumer is done with the record that used it before.
        if !self.map().write_at(off, &record.encode()) {
            return Err(invalid(format!(
                "record slot offset {off} outside the ring"
            )));
        }
        self.published = index + 1;
        self.map()
            .u64_at::<P_PUBLISHED>()
            .store(self.published, Ordering::Release);
        self.last_seq = Some(rec.seq);
        // Pairs with the fence in `Consumer::wait`: either the consumer sees
        // the new `published`, or we see its waiting flag and wake it.
        fence(Ordering::SeqCst);
        if self.map().u32_at::<C_WAITING>().load(Ordering::Relaxed) != 0 {
            let wake = self.map().u32_at::<P_WAKE>();
            wake.fetch_add(1, Ordering::Release);
            futex_wake(wake);
        }
        Ok(index)
    }

    /// Record slots free now.
    pub fn free_slots(&self) -> u64 {
        self.slots - (self.published - self.load_committed())
    }

    /// Payload bytes free now (not necessarily contiguous: a reservation of
    /// this size can still fail if it would have to skip the area's end).
    pub fn free_payload_bytes(&mut self) -> u64 {
        self.reclaim();
        self.area - (self.head - self.tail())
    }

    /// Index one past the last published record.
    pub fn published(&self) -> u64 {
        self.published
    }

    /// Index one past the last committed record (the consumer's counter,
    /// loaded with acquire).
    pub fn committed(&self) -> u64 {
        self.load_committed()
    }

    /// The ring's generation.
    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    /// The ring's geometry.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            slots: self.header.slots,
            payload_bytes: self.header.payload_bytes,
        }
    }

    /// The last seq published in this ring, if any.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// The ring file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The consumer's pid and heartbeat (Unix-epoch ns), 0 when none yet.
    pub fn consumer_heartbeat(&self) -> (u32, u64) {
        (
            self.map().u32_at::<C_PID>().load(Ordering::Relaxed),
            self.map()
                .u64_at::<C_HEARTBEAT_NS>()
                .load(Ordering::Relaxed),
        )
    }
}

/// File offset of the slot of record `index`.
pub(crate) fn slot_offset(slots: u64, index: u64) -> u64 {
    HEADER_SIZE as u64 + (index % slots) * RECORD_SIZE as u64
}

/// Read and decode the slot of record `index`.
pub(crate) fn read_record(map: &Mapping, slots: u64, index: u64) -> Result<Record> {
    let off = slot_offset(slots, index);
    let mut b = [0u8; RECORD_SIZE];
    let ok = usize::try_from(off).is_ok_and(|o| map.read_at(o, &mut b));
    if !ok {
        return Err(Error::corrupt("record slot outside the ring").at_offset(off));
    }
    Record::decode(&b).map_err(|e| e.at_offset(off))
}
