//! Record slots: the kind enum, the decoded record, encode/decode.

use super::layout::*;
use crate::error::{Error, Result};

/// What a record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// Data written at `offset..offset + length`.
    Write = 1,
    /// Discard of `offset..offset + length`.
    Trim = 2,
    /// Zeroes written at `offset..offset + length`.
    WriteZeroes = 3,
    /// A flush: every write recorded before it is durable on the backing device.
    Flush = 4,
    /// A consistency tag (recovery point); `aux` holds the tag id.
    Tag = 5,
    /// A tracking-state change (data/metadata/bitmap); `aux` holds the reason code.
    StateChange = 6,
}

impl TryFrom<u8> for RecordKind {
    type Error = Error;

    fn try_from(v: u8) -> Result<Self> {
        Ok(match v {
            1 => RecordKind::Write,
            2 => RecordKind::Trim,
            3 => RecordKind::WriteZeroes,
            4 => RecordKind::Flush,
            5 => RecordKind::Tag,
            6 => RecordKind::StateChange,
            _ => return Err(Error::corrupt(format!("unknown record kind {v}"))),
        })
    }
}

impl From<RecordKind> for u8 {
    fn from(k: RecordKind) -> u8 {
        k as u8
    }
}

/// One decoded record: an owned copy of a 64-byte slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Host-wide sequence number (strictly increasing within a ring).
    pub seq: u64,
    /// Nanoseconds since the Unix epoch when the write was recorded.
    pub timestamp_ns: u64,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Monotonic payload position, or [`NO_PAYLOAD`].
    pub payload_pos: u64,
    /// Tag id, state-change reason code, or 0.
    pub aux: u64,
    /// crc32c of the data written (see [`payload_checksum`]).
    pub checksum: u32,
    /// What the record stands for.
    pub kind: RecordKind,
    /// [`FLAG_FUA`] | [`FLAG_HAS_PAYLOAD`].
    pub flags: u8,
}

/// The checksum a record carries for `data`: crc32c.
pub fn payload_checksum(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

pub(crate) fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

impl Record {
    /// Whether the record carries a payload in the payload area.
    pub fn has_payload(&self) -> bool {
        self.flags & FLAG_HAS_PAYLOAD != 0
    }

    /// Whether the write was FUA.
    pub fn fua(&self) -> bool {
        self.flags & FLAG_FUA != 0
    }

    /// The slot bytes of this record (record crc included).
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        put_u64(&mut b, R_SEQ, self.seq);
        put_u64(&mut b, R_TIMESTAMP_NS, self.timestamp_ns);
        put_u64(&mut b, R_OFFSET, self.offset);
        put_u64(&mut b, R_LENGTH, self.length);
        put_u64(&mut b, R_PAYLOAD_POS, self.payload_pos);
        put_u64(&mut b, R_AUX, self.aux);
        put_u32(&mut b, R_CHECKSUM, self.checksum);
        b[R_KIND] = self.kind.into();
        b[R_FLAGS] = self.flags;
        let crc = crc32c::crc32c(&b[..R_CRC]);
        put_u32(&mut b, R_CRC, crc);
        b
    }

    /// Decode and check one slot: record crc, kind, flags, reserved bytes,
    /// payload position consistent with the payload flag. Errors are
    /// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt) without location.
    pub fn decode(b: &[u8; RECORD_SIZE]) -> Result<Record> {
        let crc = get_u32(b, R_CRC);
        if crc != crc32c::crc32c(&b[..R_CRC]) {
            return Err(Error::corrupt("record checksum mismatch"));
        }
        if b[R_RESERVED..R_RESERVED + 2] != [0, 0] || b[R_RESERVED2..] != [0; 4] {
            return Err(Error::corrupt("record reserved bytes are not zero"));
        }
        let kind = RecordKind::try_from(b[R_KIND])?;
        let flags = b[R_FLAGS];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(Error::corrupt(format!("unknown record flags {flags:#x}")));
        }
        let rec = Record {
            seq: get_u64(b, R_SEQ),
            timestamp_ns: get_u64(b, R_TIMESTAMP_NS),
            offset: get_u64(b, R_OFFSET),
            length: get_u64(b, R_LENGTH),
            payload_pos: get_u64(b, R_PAYLOAD_POS),
            aux: get_u64(b, R_AUX),
            checksum: get_u32(b, R_CHECKSUM),
            kind,
            flags,
        };
        if rec.has_payload() == (rec.payload_pos == NO_PAYLOAD) {
            return Err(Error::corrupt(
                "record payload position contradicts its payload flag",
            ));
        }
        Ok(rec)
    }

    /// Where the payload lies in the payload area of `area` bytes, checked:
    /// `Some((start, len))` for a record with payload, `None` without.
    pub(crate) fn payload_range(&self, area: u64) -> Result<Option<(u64, usize)>> {
        if !self.has_payload() {
            return Ok(None);
        }
        let start = self.payload_pos % area;
        let fits = start
            .checked_add(self.length)
            .is_some_and(|end| end <= area);
        if !fits || !self.payload_pos.is_multiple_of(PAYLOAD_ALIGN) {
            return Err(Error::corrupt(format!(
                "record payload {}+{} lies outside the payload area of {area} bytes",
                self.payload_pos, self.length
            )));
        }
        let len = usize::try_from(self.length)
            .map_err(|_| Error::corrupt("record payload length exceeds the address space"))?;
        Ok(Some((start, len)))
    }

    /// Check `data` (this record's payload, or the data re-read for it)
    /// against the record checksum: Corrupt on mismatch.
    pub fn verify_payload(&self, data: &[u8]) -> Result<()> {
        let got = payload_checksum(data);
        if got != self.checksum {
            return Err(Error::corrupt(format!(
                "payload of record seq {} has crc32c {got:#010x}, the record says {:#010x}",
                self.seq, self.checksum
            )));
        }
        Ok(())
    }
}
