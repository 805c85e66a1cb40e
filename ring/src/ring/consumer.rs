//! The consumer side: the sidecar drains records in order and commits them.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use super::layout::*;
use super::producer::{read_record, slot_offset};
use super::record::Record;
use super::shm::{futex_wait, lock_role, now_ns, open_ring, Header, Mapping, Role};
use crate::error::{Error, ErrorKind, Result};

/// One delivered record, with its payload borrowed from the ring.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// The record's index in the ring (commit `index + 1` to release it).
    pub index: u64,
    /// The record.
    pub record: Record,
    /// The payload bytes when the record has them.
    pub payload: Option<&'a [u8]>,
}

impl RecordView<'_> {
    /// Check the payload against the record checksum (Ok without payload).
    pub fn verify_payload(&self) -> Result<()> {
        match self.payload {
            Some(p) => self.record.verify_payload(p),
            None => Ok(()),
        }
    }
}

/// How far the consumer is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lag {
    /// Published records not yet committed.
    pub records: u64,
    /// Payload bytes those records hold.
    pub payload_bytes: u64,
    /// Age of the oldest uncommitted record (from its timestamp), if any.
    pub oldest_age: Option<Duration>,
}

/// The consumer end of one disk's ring (the sidecar). Single consumer per
/// ring (enforced by a lock on the file).
pub struct Consumer {
    path: PathBuf,
    /// Holds the consumer lock.
    _file: File,
    map: Mapping,
    header: Header,
    slots: u64,
    area: u64,
    payload_offset: usize,
    cursor: u64,
    committed: u64,
    /// Highest cursor reached since open: what may be committed.
    delivered: u64,
    /// Seq of the record before the cursor, when known.
    last_seq: Option<u64>,
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("path", &self.path)
            .field("generation", &self.header.generation)
            .field("cursor", &self.cursor)
            .field("committed", &self.committed)
            .finish()
    }
}

impl Consumer {
    /// Open the ring at `path`: check the header completely (Corrupt with
    /// path and offset otherwise), map it, and resume at `committed`.
    pub fn open(path: &Path) -> Result<Consumer> {
        Self::open_inner(path).map_err(|e| e.at_path(path))
    }

    fn open_inner(path: &Path) -> Result<Consumer> {
        let (file, header, map) = open_ring(path)?;
        lock_role(&file, Role::Consumer)?;
        let mut c = Consumer {
            path: path.to_path_buf(),
            _file: file,
            slots: u64::from(header.slots),
            area: header.payload_bytes,
            payload_offset: usize::try_from(header.payload_offset())
                .map_err(|_| Error::corrupt("ring larger than the address space"))?,
            header,
            map,
            cursor: 0,
            committed: 0,
            delivered: 0,
            last_seq: None,
        };
        let committed = c.map.u64_at::<C_COMMITTED>().load(Ordering::Acquire);
        c.check_counters(committed)?;
        c.cursor = committed;
        c.committed = committed;
        c.delivered = committed;
        c.map.u32_at::<C_WAITING>().store(0, Ordering::Relaxed);
        c.map
            .u32_at::<C_PID>()
            .store(std::process::id(), Ordering::Relaxed);
        c.heartbeat();
        Ok(c)
    }

    /// `published`, loaded with acquire and checked against `committed`.
    fn check_counters(&self, committed: u64) -> Result<u64> {
        let published = self.map.u64_at::<P_PUBLISHED>().load(Ordering::Acquire);
        if committed > published
            || published - committed > self.slots
            || published < self.cursor
            || published > MAX_POSITION
        {
            return Err(Error::corrupt(format!(
                "ring counters inconsistent: published {published}, committed {committed}, \
                 cursor {}, {} slots",
                self.cursor, self.slots
            ))
            .at_offset(P_PUBLISHED as u64)
            .at_path(&self.path));
        }
        Ok(published)
    }

    fn heartbeat(&self) {
        self.map
            .u64_at::<C_HEARTBEAT_NS>()
            .store(now_ns(), Ordering::Relaxed);
    }

    /// The next uncommitted record after the cursor, or None when the
    /// consumer has caught up with `published`. The payload is checked to
    /// lie inside the payload area, not against its checksum (see
    /// [`RecordView::verify_payload`]).
    // Not an Iterator: the view borrows the consumer (a lending iterator).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<RecordView<'_>>> {
        let published = self.check_counters(self.committed)?;
        if self.cursor == published {
            return Ok(None);
        }
        let index = self.cursor;
        let at = slot_offset(self.slots, index);
        let record =
            read_record(&self.map, self.slots, index).map_err(|e| e.at_path(&self.path))?;
        if let Some(prev) = self.last_seq {
            if record.seq <= prev {
                return Err(Error::corrupt(format!(
                    "record {index}: seq {} after seq {prev}",
                    record.seq
                ))
                .at_offset(at)
                .at_path(&self.path));
            }
        }
        let range = record
            .payload_range(self.area)
            .map_err(|e| e.at_offset(at).at_path(&self.path))?;
        let payload = range.map(|(start, len)| {
            let off = self.payload_offset + usize::try_from(start).unwrap_or(0);
            // SAFETY: `payload_range` checked start + len <= area, and the
            // payload area [payload_offset, payload_offset + area) is the end
            // of the mapping (the file length was checked at open), so the
            // slice is inside the mapping, which lives as long as `&self`.
            // The producer does not write these bytes until `committed`
            // passes this record; only `commit` (which needs `&mut self`,
            // so no view is alive then) moves `committed`.
            unsafe { std::slice::from_raw_parts(self.map.base().add(off).cast_const(), len) }
        });
        self.cursor = index + 1;
        self.delivered = self.delivered.max(self.cursor);
        self.last_seq = Some(record.seq);
        Ok(Some(RecordView {
            index,
            record,
            payload,
        }))
    }

    /// Move the cursor back to `committed`: the records after it will be
    /// delivered again (retry after a failed ship).
    pub fn rewind(&mut self) {
        self.cursor = self.committed;
        self.last_seq = None;
    }

    /// Commit every record with index below `end` (pass a view's
    /// `index + 1`): release-stores `committed`, which frees their slots and
    /// payloads for the producer. `end` at or below `committed` is a no-op;
    /// `end` beyond what was delivered since open is InvalidInput.
    pub fn commit(&mut self, end: u64) -> Result<()> {
        if end <= self.committed {
            return Ok(());
        }
        if end > self.delivered {
            return Err(Error::invalid(format!(
                "commit up to {end}: only records below {} were delivered",
                self.delivered
            ))
            .at_path(&self.path));
        }
        self.map
            .u64_at::<C_COMMITTED>()
            .store(end, Ordering::Release);
        self.committed = end;
        if self.cursor < end {
            self.cursor = end;
            self.last_seq = None;
        }
        self.heartbeat();
        Ok(())
    }

    /// Index one past the last committed record.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// Index one past the last published record (acquire load).
    pub fn published(&self) -> u64 {
        self.map.u64_at::<P_PUBLISHED>().load(Ordering::Acquire)
    }

    /// Index of the next record `next` delivers.
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// The backlog: records, payload bytes and the oldest record's age.
    /// Scans the uncommitted records (cost proportional to the backlog).
    pub fn lag(&self) -> Result<Lag> {
        let published = self.check_counters(self.committed)?;
        let mut lag = Lag {
            records: published - self.committed,
            ..Lag::default()
        };
        for index in self.committed..published {
            let rec =
                read_record(&self.map, self.slots, index).map_err(|e| e.at_path(&self.path))?;
            if index == self.committed {
                lag.oldest_age = Some(Duration::from_nanos(
                    now_ns().saturating_sub(rec.timestamp_ns),
                ));
            }
            if rec.has_payload() {
                lag.payload_bytes = lag.payload_bytes.saturating_add(rec.length);
            }
        }
        Ok(lag)
    }

    /// Sleep until records beyond the cursor are published, at most
    /// `timeout` (futex on the producer's wake word; spurious wake-ups are
    /// possible). Returns whether records are available.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool> {
        if self.check_counters(self.committed)? > self.cursor {
            return Ok(true);
        }
        let waiting = self.map.u32_at::<C_WAITING>();
        let wake = self.map.u32_at::<P_WAKE>();
        waiting.store(1, Ordering::Relaxed);
        // Pairs with the fence in `Producer::publish`.
        fence(Ordering::SeqCst);
        let seen = wake.load(Ordering::Acquire);
        if self.published() <= self.cursor {
            futex_wait(wake, seen, timeout);
        }
        waiting.store(0, Ordering::Relaxed);
        self.heartbeat();
        Ok(self.check_counters(self.committed)? > self.cursor)
    }

    /// The generation of the ring this consumer maps.
    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    /// Ok while the file at the ring's path is still this ring; Stale when a
    /// producer created a new ring there (or removed it): reopen.
    pub fn check_generation(&self) -> Result<()> {
        let stale = |m: String| Err(Error::new(ErrorKind::Stale, m).at_path(&self.path));
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return stale("ring file was removed".into());
            }
            Err(e) => return Err(Error::io(e, "open ring").at_path(&self.path)),
        };
        let mut b = [0u8; 8];
        if file.read_exact_at(&mut b, H_GENERATION as u64).is_err() {
            return stale("ring file was replaced by a short file".into());
        }
        let now = u64::from_le_bytes(b);
        if now != self.header.generation {
            return stale(format!(
                "ring was recreated: generation {now:016x}, this consumer has {:016x}",
                self.header.generation
            ));
        }
        Ok(())
    }

    /// The ring's disk name.
    pub fn disk_name(&self) -> &str {
        &self.header.disk_name
    }

    /// The protected disk's size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.header.disk_size
    }

    /// The ring's geometry.
    pub fn geometry(&self) -> super::Geometry {
        super::Geometry {
            slots: self.header.slots,
            payload_bytes: self.header.payload_bytes,
        }
    }

    /// Creation time of the ring (Unix-epoch ns).
    pub fn created_ns(&self) -> u64 {
        self.header.created_ns
    }

    /// The ring file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
