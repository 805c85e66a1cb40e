//! The per-disk undo log: the old contents of every range each applied
//! change set overwrote, so that the replica (always at the latest applied
//! change set) can be rewound to older recovery points.
//!
//! Before the applier writes change set `S` into the replica it records,
//! here, the *old* contents of every range `S` will overwrite: one "undo
//! set" per applied change set, carrying `S`'s header fields and
//! `prev_applied`, the replica's applied sequence before `S` (`None`: nothing
//! had been applied yet, the empty disk).
//!
//! # Rewinding
//!
//! To rewind the replica from its applied state back to the state right
//! after the change set with `last_seq == P` (or to the empty disk,
//! `P = None`): read every part of every set from the first set with
//! `prev_applied == P` to the end of the log ([`UndoLog::parts_from`]), in
//! log order, and for every byte take the old value from the *first* part
//! (and, within a part, the first extent) that covers it: first writer
//! wins. Bytes no part covers are unchanged since `P`. [`UndoLog::floor`]
//! is the oldest state so reachable, [`UndoLog::reaches`] tells whether a
//! given state is.
//!
//! # Layout
//!
//! ```text
//! DIR/                           (the caller's, e.g. DATA/hosts/H/D/undo)
//!   00000000000000000000.undo    segment 0
//!   00000000000000000001.undo    segment 1 ... (numbers contiguous; a pruned
//!                                prefix is simply absent)
//!
//! segment file:
//! +------------------------- SEG_HEADER_LEN = 64 bytes -------------------------+
//! | 0   magic     [8]  SEG_MAGIC "FRYUNDO1"                                      |
//! | 8   version   u32  SEG_VERSION (1)                                           |
//! | 12  hdr_len   u32  SEG_HEADER_LEN (64)                                       |
//! | 16  segno     u64  this segment's number (= the file name)                   |
//! | 24  reserved  zeros (checked)                                                |
//! | 60  crc32c    u32  of bytes 0..60                                            |
//! +-----------------------------------------------------------------------------+
//! | record ... (the records of whole sets: a set never spans segments)          |
//! +-----------------------------------------------------------------------------+
//!
//! record header (REC_HEADER_LEN = 64 bytes), then the body:
//!   0  magic         u32  REC_MAGIC ("FRUN" little endian)
//!   4  version       u16  REC_VERSION (1)
//!   6  flags         u16  REC_FLAG_LAST (bit 0): the last record of its set
//!                         REC_FLAG_COMPRESSED (bit 1): data is one zstd frame
//!                         REC_FLAG_HAS_PREV (bit 2): prev_applied is meaningful
//!                         (without it the field must be 0); other bits zero
//!   8  body_len      u32  bytes of the body
//!   12 crc32c        u32  see "Checksum" below
//!   16 epoch         u64  \
//!   24 first_seq     u64   | the set's header: identical in every record
//!   32 last_seq      u64   | of the set
//!   40 prev_applied  u64   |
//!   48 consistent_from u64 /
//!   56 part          u32  0, 1, 2, ... within the set
//!   60 extent_count  u32  at most MAX_PART_EXTENTS
//!
//! body:
//!   extent_count x EXTENT_LEN (24) bytes:
//!     0 offset u64 | 8 length u64 (> 0, offset + length <= u64::MAX) |
//!     16 kind u32 (EXTENT_KIND_ZEROS 0, EXTENT_KIND_DATA 1) | 20 reserved u32 (0)
//!   raw_data_len u64  (<= MAX_PART_DATA; = the sum of the data extents' lengths)
//!   (so body_len <= MAX_RECORD_BODY)
//!   data              one zstd frame decompressing to exactly raw_data_len
//!                     bytes if COMPRESSED, else raw_data_len raw bytes
//! ```
//!
//! All integers are little endian. The data of a record is the
//! concatenation, in extent order, of the old bytes of its data extents;
//! zero extents (old contents all zero) carry no bytes.
//!
//! ## Checksum
//!
//! The record crc32c covers, in this order: the record's position (the
//! segment number u64 and the record's byte offset in the segment u64),
//! record-header bytes `0..12` (magic, version, flags, body length), bytes
//! `16..64`, then the body. Covering the flags makes a flipped `LAST` or
//! `COMPRESSED` bit detectable; covering the position makes a record that
//! is not where it was written (for instance a copy of an undo record inside
//! the old contents of a disk, stored raw in another record) invalid, so
//! the torn-tail scan below cannot be fooled by data.
//!
//! # Sets and writing
//!
//! A set is written as one or more records (parts `0..n`), all carrying the
//! set's header fields; the final record has `LAST` (it may have zero
//! extents). [`UndoLog::begin_set`] checks the chain rules (`first_seq <=
//! last_seq`; `prev_applied < first_seq`; if the log holds a set,
//! `prev_applied == Some(last set's last_seq)` and `first_seq > last set's
//! last_seq`) and returns an [`UndoSetWriter`];
//! [`UndoSetWriter::add_part`] compresses a part (zstd level
//! [`ZSTD_LEVEL`], stored raw where that does not shrink it) and writes the
//! previous one without syncing; [`UndoSetWriter::finish`] writes the last
//! part with `LAST` and `fdatasync`s the segment: one sync per set. Only
//! after `finish` returns `Ok` may the caller modify the replica.
//!
//! A new segment is started only at a set boundary, when the active segment
//! holds at least one set and is larger than [`UndoOptions::segment_size`].
//! It is written as `N.undo.tmp`, synced, renamed to `N.undo` and the
//! directory synced.
//!
//! # Crash safety
//!
//! * Sets are appended one at a time and each is synced before the next
//!   begins, so at a crash only the last set of the last segment can be
//!   incomplete: any subset of its (unsynced) records may have reached the
//!   disk, in any order.
//! * Recovery ([`UndoLog::open`]) validates every segment header and record
//!   (magic, version, flags, lengths bounded by the file size before
//!   anything is allocated, crc32c, extent kinds and bounds, data length
//!   sums, the stored data length: equal to `raw_data_len` for raw data,
//!   positive and smaller than it for a zstd frame, which the writer stores
//!   only where it is smaller; consecutive part numbers with identical
//!   header fields, the chain rules between sets, contiguous segment
//!   numbers). It does not decompress: a frame that does not decompress to
//!   exactly `raw_data_len` bytes (checked, with an allocation bound of
//!   [`MAX_PART_DATA`], when the part is read by [`UndoLog::parts_from`])
//!   is [`ErrorKind::Corrupt`] at read time (the crc32c covers the frame,
//!   so only a frame written damaged gets that far).
//!   In the last segment, a bad record is a torn tail when no valid record
//!   of a later set follows it: after it only the set being written at
//!   that point (the set the bad record is part of) may have valid
//!   records, since sets are synced one at a time (valid records of older
//!   sets cannot be there and are ignored; the position in the checksum
//!   rules out copies); a set without its `LAST` record at the end
//!   of the last segment is incomplete. Both are cut (`ftruncate` +
//!   `fsync`) back to the start of that set, and reported in
//!   [`UndoRecovery`]: the caller never modified the replica for it and
//!   redoes it. Every other defect is [`ErrorKind::Corrupt`] with path and
//!   offset. Limitation: damage to the last set after it was synced is
//!   indistinguishable from a torn write; it is cut and reported, never
//!   silently.
//! * A crash after `finish` but before the replica was (fully) updated
//!   leaves the set in the log: the applier replays the change set and must
//!   then *not* record it again (the replica may already hold new data):
//!   when [`UndoLog::last_set`] is that change set's set, skip recording.
//! * An [`UndoSetWriter`] dropped without `finish` cuts and syncs the
//!   segment back to the start of its set.
//! * Pruning deletes whole non-active segments oldest first, so a crash
//!   mid-prune leaves a contiguous suffix; [`UndoLog::clear`] does the same
//!   for all of them, then starts a fresh segment 0 (a crash mid-clear
//!   leaves a suffix: clear again).
//! * After a failed write, sync or truncation the log refuses further sets;
//!   reopen it (recovery decides what is durable).
//!
//! Opening reads and checksums the whole log (one record at a time; that is
//! how a torn tail is found) but decompresses nothing: its cost grows with
//! the bytes of history held, not with their decompression. Decompression
//! happens when parts are read.
//!
//! [`UndoLog::read_only_clone`] gives another thread a read-only copy of an
//! open log without rescanning: the index as of the clone, with its own
//! descriptor for every segment file (a segment the original prunes later
//! stays readable through the clone).
//!
//! [`UndoLog::open_read_only`] applies the same validation but never
//! modifies anything: a torn or incomplete tail is ignored (another process
//! may be appending), leftover temporary files are left alone.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, ErrorKind, Result};
use crate::segfile::{
    create_segment_file, le_u16, le_u32, le_u64, open_segment_file, parse_segment_file_name,
    put_bytes, read_vec_at, scan_for_magic, segment_file_name, segment_gap, sync_dir,
    truncate_synced, u64_len, usize_len, SegmentOps,
};

/// Segment header magic.
pub const SEG_MAGIC: [u8; 8] = *b"FRYUNDO1";
/// Segment format version.
pub const SEG_VERSION: u32 = 1;
/// Segment header size in bytes.
pub const SEG_HEADER_LEN: u64 = 64;
/// Offsets of the segment header fields.
pub const SEG_OFF_MAGIC: usize = 0;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_VERSION: usize = 8;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_HEADER_LEN: usize = 12;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_SEGNO: usize = 16;
/// See [`SEG_OFF_MAGIC`]: reserved, zero up to [`SEG_OFF_CRC`].
pub const SEG_OFF_RESERVED: usize = 24;
/// See [`SEG_OFF_MAGIC`]: crc32c of bytes `0..SEG_OFF_CRC`.
pub const SEG_OFF_CRC: usize = 60;

/// Record magic (`"FRUN"` little endian).
pub const REC_MAGIC: u32 = u32::from_le_bytes(*b"FRUN");
/// Record format version.
pub const REC_VERSION: u16 = 1;
/// Record header size in bytes.
pub const REC_HEADER_LEN: u64 = 64;
/// Offsets of the record header fields.
pub const REC_OFF_MAGIC: usize = 0;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_VERSION: usize = 4;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_FLAGS: usize = 6;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_BODY_LEN: usize = 8;
/// See [`REC_OFF_MAGIC`]: the record checksum (module docs, "Checksum").
pub const REC_OFF_CRC: usize = 12;
/// See [`REC_OFF_MAGIC`]: first byte after the checksum.
pub const REC_OFF_EPOCH: usize = 16;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_FIRST_SEQ: usize = 24;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_LAST_SEQ: usize = 32;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_PREV_APPLIED: usize = 40;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_CONSISTENT_FROM: usize = 48;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_PART: usize = 56;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_EXTENT_COUNT: usize = 60;

/// Record flag: the last record of its set.
pub const REC_FLAG_LAST: u16 = 1;
/// Record flag: the data is one zstd frame.
pub const REC_FLAG_COMPRESSED: u16 = 2;
/// Record flag: `prev_applied` is meaningful (else the field is 0 and the
/// set starts from the empty disk).
pub const REC_FLAG_HAS_PREV: u16 = 4;
const REC_FLAGS_KNOWN: u16 = REC_FLAG_LAST | REC_FLAG_COMPRESSED | REC_FLAG_HAS_PREV;

/// Size of one extent entry in a record body.
pub const EXTENT_LEN: u64 = 24;
/// Offsets in an extent entry.
pub const EXT_OFF_OFFSET: usize = 0;
/// See [`EXT_OFF_OFFSET`].
pub const EXT_OFF_LENGTH: usize = 8;
/// See [`EXT_OFF_OFFSET`].
pub const EXT_OFF_KIND: usize = 16;
/// See [`EXT_OFF_OFFSET`]: reserved, zero.
pub const EXT_OFF_RESERVED: usize = 20;
/// Extent kind: the old contents were zeros (no bytes stored).
pub const EXTENT_KIND_ZEROS: u32 = 0;
/// Extent kind: the old contents are stored in the record's data.
pub const EXTENT_KIND_DATA: u32 = 1;
/// Size of the `raw_data_len` field after the extents.
pub const RAW_LEN_FIELD_LEN: u64 = 8;

/// Most raw data bytes one part may carry (also the decompression bound).
pub const MAX_PART_DATA: usize = 8 << 20;
/// Most extents one part may carry.
pub const MAX_PART_EXTENTS: usize = 65536;
/// Largest record body: the most extents, the length field and the most
/// data (data is stored compressed only where that is smaller).
pub const MAX_RECORD_BODY: u64 = 65536 * EXTENT_LEN + RAW_LEN_FIELD_LEN + (8 << 20);
/// zstd level of the record data.
pub const ZSTD_LEVEL: i32 = 1;
/// Default segment size: 64 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

const SEG_EXT: &str = ".undo";
const TMP_EXT: &str = ".tmp";
const SEGNO_DIGITS: usize = 20;

/// Undo log tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoOptions {
    /// Start a new segment at a set boundary once the active segment holds
    /// at least one set and is larger than this many bytes (a set never
    /// spans segments, so a segment may end up larger).
    pub segment_size: u64,
}

impl Default for UndoOptions {
    fn default() -> Self {
        UndoOptions {
            segment_size: DEFAULT_SEGMENT_SIZE,
        }
    }
}

/// The header of an undo set: the applied change set's fields and the
/// replica's applied sequence before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SetInfo {
    /// The change set's epoch.
    pub epoch: u64,
    /// The change set's first sequence.
    pub first_seq: u64,
    /// The change set's last sequence: the replica's applied sequence after
    /// it.
    pub last_seq: u64,
    /// The replica's applied sequence before the change set (`None`:
    /// nothing had been applied, the empty disk). Rewinding through this
    /// set reaches that state.
    pub prev_applied: Option<u64>,
    /// The change set's `consistent_from`.
    pub consistent_from: u64,
}

/// What [`UndoLog::begin_set`] takes: the same fields as [`SetInfo`].
pub type UndoSetHeader = SetInfo;

/// What an undo extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UndoKind {
    /// The old contents were all zeros; no bytes are stored.
    Zeros,
    /// The old contents are stored in the part's data.
    Data,
}

/// A range of the disk and what it held before the set was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UndoExtent {
    /// Byte offset on the disk.
    pub offset: u64,
    /// Length in bytes (positive).
    pub length: u64,
    /// Zeros, or data stored in the part.
    pub kind: UndoKind,
}

impl UndoExtent {
    /// An extent whose old contents were zeros.
    pub fn zeros(offset: u64, length: u64) -> Self {
        UndoExtent {
            offset,
            length,
            kind: UndoKind::Zeros,
        }
    }

    /// An extent whose old contents are stored as data.
    pub fn data(offset: u64, length: u64) -> Self {
        UndoExtent {
            offset,
            length,
            kind: UndoKind::Data,
        }
    }
}

/// One part of an undo set, read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoPart {
    /// The set's header.
    pub set: SetInfo,
    /// The part's number within its set (0, 1, ...).
    pub part: u32,
    /// The last part of its set.
    pub last: bool,
    /// The extents, in stored order.
    pub extents: Vec<UndoExtent>,
    /// The concatenated bytes of the data extents, in extent order.
    pub data: Vec<u8>,
}

impl UndoPart {
    /// Every extent with its old bytes: `None` for a zero extent, the
    /// extent's slice of [`UndoPart::data`] for a data extent. For a part
    /// read from the log the slice is exactly `length` bytes; for a
    /// hand-built part whose data is too short it is cut short.
    pub fn extent_data(&self) -> impl Iterator<Item = (&UndoExtent, Option<&[u8]>)> + '_ {
        let mut at = 0usize;
        self.extents.iter().map(move |e| match e.kind {
            UndoKind::Zeros => (e, None),
            UndoKind::Data => {
                let start = at.min(self.data.len());
                let end = start
                    .saturating_add(usize_len(e.length))
                    .min(self.data.len());
                at = at.saturating_add(usize_len(e.length));
                (e, Some(&self.data[start..end]))
            }
        })
    }
}

/// What [`UndoLog::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UndoRecovery {
    /// Complete sets held.
    pub sets: usize,
    /// Segment files held.
    pub segments: usize,
    /// Where the last segment was cut (path, offset), if it was: a torn
    /// record or an incomplete set at its end.
    pub torn_tail: Option<(PathBuf, u64)>,
    /// Bytes cut (0 if none).
    pub truncated_bytes: u64,
    /// The header of the incomplete set that was cut, if its first record
    /// was intact.
    pub incomplete_set: Option<SetInfo>,
    /// Valid records of that set that were cut with it.
    pub dropped_parts: u32,
    /// Leftover temporary files removed (an interrupted segment creation).
    pub removed_temp_files: Vec<PathBuf>,
}

impl UndoRecovery {
    /// Bytes cut from the tail of the last segment (a torn record or an
    /// unfinished set); 0 when nothing was cut.
    pub fn cut_bytes(&self) -> u64 {
        self.truncated_bytes
    }
}

/// A set made durable by [`UndoSetWriter::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedSet {
    /// The set's header.
    pub set: SetInfo,
    /// Segment that holds it.
    pub segment: u64,
    /// Byte offset of its first record.
    pub offset: u64,
    /// Bytes of its records.
    pub bytes: u64,
    /// Records (parts) written.
    pub parts: u32,
    /// A new segment was started for it.
    pub rolled: bool,
}

/// What [`UndoLog::prune_before`] or [`UndoLog::clear`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrunedUndo {
    /// Segment files deleted.
    pub segments: u64,
    /// Sets deleted.
    pub sets: u64,
    /// Bytes deleted.
    pub bytes: u64,
}

/// Where a complete set lies.
#[derive(Debug, Clone, Copy)]
struct SetIdx {
    info: SetInfo,
    segno: u64,
    start: u64,
    end: u64,
    parts: u32,
}

#[derive(Debug)]
struct Segment {
    segno: u64,
    path: PathBuf,
    /// Validated length: the end of its last complete set.
    len: u64,
    /// Complete sets in it.
    sets: usize,
    /// A descriptor held open for reading (a [`UndoLog::read_only_clone`]'s
    /// segments, readable even after the file is deleted); `None`: readers
    /// open the file by path.
    reader: Option<File>,
}

/// Lazily made zstd contexts (they are not `Debug`).
#[derive(Default)]
struct Zstd {
    c: Option<zstd::bulk::Compressor<'static>>,
    d: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Zstd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zstd")
            .field("compressor", &self.c.is_some())
            .field("decompressor", &self.d.is_some())
            .finish()
    }
}

impl Zstd {
    fn compressor(&mut self) -> Result<&mut zstd::bulk::Compressor<'static>> {
        if self.c.is_none() {
            let c = zstd::bulk::Compressor::new(ZSTD_LEVEL).map_err(|e| {
                Error::new(ErrorKind::Io, "compress", format!("zstd compressor: {e}"))
            })?;
            self.c = Some(c);
        }
        self.c
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Io, "compress", "zstd compressor missing"))
    }

    fn decompressor(&mut self) -> Result<&mut zstd::bulk::Decompressor<'static>> {
        if self.d.is_none() {
            let d = zstd::bulk::Decompressor::new().map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    "decompress",
                    format!("zstd decompressor: {e}"),
                )
            })?;
            self.d = Some(d);
        }
        self.d
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Io, "decompress", "zstd decompressor missing"))
    }
}

/// The undo log of one disk. See the module docs.
#[derive(Debug)]
pub struct UndoLog {
    dir: PathBuf,
    opts: UndoOptions,
    read_only: bool,
    segments: Vec<Segment>,
    /// Complete sets, in log order.
    sets: Vec<SetIdx>,
    /// The active (last) segment, open for writing; `None` when read-only.
    active: Option<File>,
    poisoned: bool,
    zstd: Zstd,
}

fn inval(op: &'static str, m: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput, op, m)
}

/// The file name of segment `segno`.
fn seg_name(segno: u64) -> String {
    segment_file_name(segno, SEG_EXT, SEGNO_DIGITS)
}

/// The segment number `name` names, if it is a segment file name.
fn parse_seg_name(name: &str) -> Option<u64> {
    parse_segment_file_name(name, SEG_EXT, SEGNO_DIGITS)
}

/// The chain rules (module docs) for `next` after the last complete set
/// `prev`.
fn check_chain(prev: Option<&SetInfo>, next: &SetInfo) -> std::result::Result<(), String> {
    if next.first_seq > next.last_seq {
        return Err(format!(
            "set [{}, {}] has first_seq > last_seq",
            next.first_seq, next.last_seq
        ));
    }
    if let Some(p) = next.prev_applied {
        if p >= next.first_seq {
            return Err(format!(
                "set [{}, {}] starts at or before its prev_applied {p}",
                next.first_seq, next.last_seq
            ));
        }
    }
    if let Some(prev) = prev {
        if next.prev_applied != Some(prev.last_seq) {
            return Err(format!(
                "set [{}, {}] has prev_applied {:?}, the log's last set ends at {}",
                next.first_seq, next.last_seq, next.prev_applied, prev.last_seq
            ));
        }
        if next.first_seq <= prev.last_seq {
            return Err(format!(
                "set [{}, {}] does not start after the log's last set (ends at {})",
                next.first_seq, next.last_seq, prev.last_seq
            ));
        }
    }
    Ok(())
}

fn encode_seg_header(segno: u64) -> Vec<u8> {
    let mut b = vec![0u8; usize_len(SEG_HEADER_LEN)];
    put_bytes(&mut b, SEG_OFF_MAGIC, &SEG_MAGIC);
    put_bytes(&mut b, SEG_OFF_VERSION, &SEG_VERSION.to_le_bytes());
    let hl = u32::try_from(SEG_HEADER_LEN).unwrap_or(u32::MAX);
    put_bytes(&mut b, SEG_OFF_HEADER_LEN, &hl.to_le_bytes());
    put_bytes(&mut b, SEG_OFF_SEGNO, &segno.to_le_bytes());
    let crc = crc32c::crc32c(&b[..SEG_OFF_CRC]);
    put_bytes(&mut b, SEG_OFF_CRC, &crc.to_le_bytes());
    b
}

/// Check a segment header; returns the segment number it names.
fn decode_seg_header(b: &[u8], path: &Path) -> Result<u64> {
    let bad = |off: usize, m: String| Error::corrupt("open", path, u64_len(off), m);
    if b.len() < usize_len(SEG_HEADER_LEN) {
        return Err(bad(
            0,
            format!("segment header truncated ({} bytes)", b.len()),
        ));
    }
    if b[SEG_OFF_MAGIC..SEG_OFF_MAGIC + 8] != SEG_MAGIC {
        return Err(bad(SEG_OFF_MAGIC, "bad undo segment magic".into()));
    }
    if le_u32(b, SEG_OFF_CRC) != crc32c::crc32c(&b[..SEG_OFF_CRC]) {
        return Err(bad(SEG_OFF_CRC, "segment header checksum mismatch".into()));
    }
    let v = le_u32(b, SEG_OFF_VERSION);
    if v != SEG_VERSION {
        return Err(bad(
            SEG_OFF_VERSION,
            format!("unsupported segment version {v}"),
        ));
    }
    if u64::from(le_u32(b, SEG_OFF_HEADER_LEN)) != SEG_HEADER_LEN {
        return Err(bad(SEG_OFF_HEADER_LEN, "unexpected header length".into()));
    }
    if b[SEG_OFF_RESERVED..SEG_OFF_CRC].iter().any(|&x| x != 0) {
        return Err(bad(SEG_OFF_RESERVED, "reserved bytes not zero".into()));
    }
    Ok(le_u64(b, SEG_OFF_SEGNO))
}

/// A record's checksum (module docs): `rec` is the header followed by the
/// body, with any value in the checksum field.
fn record_crc(segno: u64, off: u64, rec: &[u8]) -> u32 {
    let mut pos = [0u8; 16];
    pos[..8].copy_from_slice(&segno.to_le_bytes());
    pos[8..].copy_from_slice(&off.to_le_bytes());
    let c = crc32c::crc32c(&pos);
    let c = crc32c::crc32c_append(c, &rec[..REC_OFF_CRC]);
    crc32c::crc32c_append(c, &rec[REC_OFF_EPOCH..])
}

/// A record's header fields.
#[derive(Debug, Clone, Copy)]
struct RecHead {
    flags: u16,
    body_len: u32,
    info: SetInfo,
    part: u32,
    extent_count: u32,
}

fn decode_rec_head(h: &[u8]) -> std::result::Result<RecHead, String> {
    if le_u32(h, REC_OFF_MAGIC) != REC_MAGIC {
        return Err("bad record magic".into());
    }
    let v = le_u16(h, REC_OFF_VERSION);
    if v != REC_VERSION {
        return Err(format!("unsupported record version {v}"));
    }
    let flags = le_u16(h, REC_OFF_FLAGS);
    if flags & !REC_FLAGS_KNOWN != 0 {
        return Err(format!("unknown record flags {flags:#x}"));
    }
    let prev = le_u64(h, REC_OFF_PREV_APPLIED);
    let prev_applied = if flags & REC_FLAG_HAS_PREV != 0 {
        Some(prev)
    } else if prev != 0 {
        return Err("prev_applied set without HAS_PREV".into());
    } else {
        None
    };
    Ok(RecHead {
        flags,
        body_len: le_u32(h, REC_OFF_BODY_LEN),
        info: SetInfo {
            epoch: le_u64(h, REC_OFF_EPOCH),
            first_seq: le_u64(h, REC_OFF_FIRST_SEQ),
            last_seq: le_u64(h, REC_OFF_LAST_SEQ),
            prev_applied,
            consistent_from: le_u64(h, REC_OFF_CONSISTENT_FROM),
        },
        part: le_u32(h, REC_OFF_PART),
        extent_count: le_u32(h, REC_OFF_EXTENT_COUNT),
    })
}

/// A record whose every structural field is validated (checksum, extents,
/// lengths); its data is still as stored: one zstd frame, not yet
/// decompressed, if [`REC_FLAG_COMPRESSED`] (see [`Record::into_part`]).
#[derive(Debug)]
struct Record {
    head: RecHead,
    extents: Vec<UndoExtent>,
    /// The whole body; the stored data starts at `data_at`.
    body: Vec<u8>,
    data_at: usize,
    /// The data's raw length (at most [`MAX_PART_DATA`]).
    raw_len: u64,
}

impl Record {
    fn len(&self) -> u64 {
        REC_HEADER_LEN + u64::from(self.head.body_len)
    }

    fn last(&self) -> bool {
        self.head.flags & REC_FLAG_LAST != 0
    }

    fn compressed(&self) -> bool {
        self.head.flags & REC_FLAG_COMPRESSED != 0
    }

    /// The part the record holds, its data decompressed (the allocation
    /// bounded by `raw_len`, at most [`MAX_PART_DATA`]). I/O-like failures
    /// (no zstd context) are errors; a frame that does not decompress to
    /// exactly `raw_len` bytes is `Ok(Err(why))`.
    fn into_part(self, zstd: &mut Zstd) -> Result<std::result::Result<UndoPart, String>> {
        let last = self.last();
        let data = if self.compressed() {
            if self.raw_len > u64_len(MAX_PART_DATA) {
                return Ok(Err(format!(
                    "raw data length {}, at most {MAX_PART_DATA}",
                    self.raw_len
                )));
            }
            let mut out = vec![0u8; usize_len(self.raw_len)];
            let stored = &self.body[self.data_at..];
            match zstd
                .decompressor()?
                .decompress_to_buffer(stored, &mut out[..])
            {
                Ok(n) if u64_len(n) == self.raw_len => out,
                Ok(n) => {
                    return Ok(Err(format!(
                        "data decompressed to {n} bytes, expected {}",
                        self.raw_len
                    )))
                }
                Err(e) => return Ok(Err(format!("data does not decompress: {e}"))),
            }
        } else {
            let mut body = self.body;
            body.drain(..self.data_at);
            body
        };
        Ok(Ok(UndoPart {
            set: self.head.info,
            part: self.head.part,
            last,
            extents: self.extents,
            data,
        }))
    }
}

/// Outcome of parsing one record.
enum RecParse {
    Ok(Box<Record>),
    Bad(String),
}

/// Parse and validate the record at `off` of segment `segno`, which must
/// end by `limit` (at most the file length): everything but the
/// decompression of its data (see [`Record::into_part`]). I/O errors are
/// errors; every format defect is `RecParse::Bad`.
fn parse_record(
    file: &File,
    path: &Path,
    segno: u64,
    off: u64,
    limit: u64,
    op: &'static str,
) -> Result<RecParse> {
    let avail = limit.saturating_sub(off);
    if avail < REC_HEADER_LEN {
        return Ok(RecParse::Bad(format!(
            "record header cut short ({avail} bytes)"
        )));
    }
    let h = read_vec_at(file, path, off, usize_len(REC_HEADER_LEN), op)?;
    let head = match decode_rec_head(&h) {
        Ok(head) => head,
        Err(why) => return Ok(RecParse::Bad(why)),
    };
    let body_len = u64::from(head.body_len);
    if body_len > MAX_RECORD_BODY {
        return Ok(RecParse::Bad(format!(
            "record body of {body_len} bytes, at most {MAX_RECORD_BODY}"
        )));
    }
    if body_len > avail - REC_HEADER_LEN {
        return Ok(RecParse::Bad(format!(
            "record body of {body_len} bytes beyond the end ({} bytes left)",
            avail - REC_HEADER_LEN
        )));
    }
    if usize_len(u64::from(head.extent_count)) > MAX_PART_EXTENTS {
        return Ok(RecParse::Bad(format!(
            "{} extents, at most {MAX_PART_EXTENTS}",
            head.extent_count
        )));
    }
    let ext_bytes = u64::from(head.extent_count) * EXTENT_LEN;
    let data_at = ext_bytes + RAW_LEN_FIELD_LEN;
    if body_len < data_at {
        return Ok(RecParse::Bad(format!(
            "record body of {body_len} bytes too short for {} extents",
            head.extent_count
        )));
    }
    // Allocation bounded by the file's actual length (checked above).
    let mut rec = h;
    rec.resize(usize_len(REC_HEADER_LEN + body_len), 0);
    file.read_exact_at(&mut rec[usize_len(REC_HEADER_LEN)..], off + REC_HEADER_LEN)
        .map_err(|e| Error::io(op, path, e).at_offset(off))?;
    if record_crc(segno, off, &rec) != le_u32(&rec, REC_OFF_CRC) {
        return Ok(RecParse::Bad("record checksum mismatch".into()));
    }
    let body = rec.split_off(usize_len(REC_HEADER_LEN));
    let mut extents = Vec::with_capacity(usize_len(u64::from(head.extent_count)));
    let mut data_sum = 0u64;
    for (i, e) in body[..usize_len(ext_bytes)]
        .chunks_exact(usize_len(EXTENT_LEN))
        .enumerate()
    {
        let offset = le_u64(e, EXT_OFF_OFFSET);
        let length = le_u64(e, EXT_OFF_LENGTH);
        let kind = match le_u32(e, EXT_OFF_KIND) {
            EXTENT_KIND_ZEROS => UndoKind::Zeros,
            EXTENT_KIND_DATA => UndoKind::Data,
            k => return Ok(RecParse::Bad(format!("extent {i}: unknown kind {k}"))),
        };
        if le_u32(e, EXT_OFF_RESERVED) != 0 {
            return Ok(RecParse::Bad(format!(
                "extent {i}: reserved field not zero"
            )));
        }
        if length == 0 || offset.checked_add(length).is_none() {
            return Ok(RecParse::Bad(format!(
                "extent {i}: bad range offset {offset} length {length}"
            )));
        }
        if kind == UndoKind::Data {
            data_sum = data_sum.saturating_add(length);
        }
        extents.push(UndoExtent {
            offset,
            length,
            kind,
        });
    }
    let raw_len = le_u64(&body, usize_len(ext_bytes));
    if raw_len > u64_len(MAX_PART_DATA) {
        return Ok(RecParse::Bad(format!(
            "raw data length {raw_len}, at most {MAX_PART_DATA}"
        )));
    }
    if raw_len != data_sum {
        return Ok(RecParse::Bad(format!(
            "raw data length {raw_len}, the data extents add up to {data_sum}"
        )));
    }
    let stored_len = body_len - data_at;
    if head.flags & REC_FLAG_COMPRESSED != 0 {
        // Checked without decompressing: the writer stores a frame only
        // where it is smaller than the raw data (and never an empty one).
        if stored_len == 0 || stored_len >= raw_len {
            return Ok(RecParse::Bad(format!(
                "{stored_len} compressed data bytes stored for {raw_len} raw bytes \
                 (a frame is stored only where it is smaller)"
            )));
        }
    } else if stored_len != raw_len {
        return Ok(RecParse::Bad(format!(
            "{stored_len} raw data bytes stored, expected {raw_len}"
        )));
    }
    Ok(RecParse::Ok(Box::new(Record {
        head,
        extents,
        body,
        data_at: usize_len(data_at),
        raw_len,
    })))
}

/// Check one part's bounds and its data length against its extents.
fn check_part(extents: &[UndoExtent], data: &[u8]) -> Result<()> {
    const OP: &str = "add undo part";
    if extents.len() > MAX_PART_EXTENTS {
        return Err(inval(
            OP,
            format!("{} extents, at most {MAX_PART_EXTENTS}", extents.len()),
        ));
    }
    if data.len() > MAX_PART_DATA {
        return Err(inval(
            OP,
            format!("{} data bytes, at most {MAX_PART_DATA}", data.len()),
        ));
    }
    let mut sum = 0u64;
    for (i, e) in extents.iter().enumerate() {
        if e.length == 0 || e.offset.checked_add(e.length).is_none() {
            return Err(inval(
                OP,
                format!(
                    "extent {i}: bad range offset {} length {}",
                    e.offset, e.length
                ),
            ));
        }
        if e.kind == UndoKind::Data {
            sum = sum.saturating_add(e.length);
        }
    }
    if sum != u64_len(data.len()) {
        return Err(inval(
            OP,
            format!(
                "{} data bytes, the data extents add up to {sum}",
                data.len()
            ),
        ));
    }
    Ok(())
}

/// An encoded part waiting to be written: header space, then the body.
struct Pending {
    buf: Vec<u8>,
    compressed: bool,
    extent_count: u32,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("bytes", &self.buf.len())
            .field("compressed", &self.compressed)
            .field("extent_count", &self.extent_count)
            .finish()
    }
}

/// Encode a (checked) part's body behind `REC_HEADER_LEN` bytes of space.
fn encode_part(zstd: &mut Zstd, extents: &[UndoExtent], data: &[u8]) -> Result<Pending> {
    let extent_count =
        u32::try_from(extents.len()).map_err(|_| inval("add undo part", "too many extents"))?;
    let frame = if data.is_empty() {
        None
    } else {
        let f = zstd
            .compressor()?
            .compress(data)
            .map_err(|e| Error::new(ErrorKind::Io, "compress", format!("zstd compress: {e}")))?;
        (f.len() < data.len()).then_some(f)
    };
    let stored: &[u8] = frame.as_deref().unwrap_or(data);
    let len = usize_len(REC_HEADER_LEN)
        + extents.len() * usize_len(EXTENT_LEN)
        + usize_len(RAW_LEN_FIELD_LEN)
        + stored.len();
    let mut buf = Vec::with_capacity(len);
    buf.resize(usize_len(REC_HEADER_LEN), 0);
    for e in extents {
        let mut x = [0u8; 24];
        put_bytes(&mut x, EXT_OFF_OFFSET, &e.offset.to_le_bytes());
        put_bytes(&mut x, EXT_OFF_LENGTH, &e.length.to_le_bytes());
        let kind = match e.kind {
            UndoKind::Zeros => EXTENT_KIND_ZEROS,
            UndoKind::Data => EXTENT_KIND_DATA,
        };
        put_bytes(&mut x, EXT_OFF_KIND, &kind.to_le_bytes());
        buf.extend_from_slice(&x);
    }
    buf.extend_from_slice(&u64_len(data.len()).to_le_bytes());
    buf.extend_from_slice(stored);
    Ok(Pending {
        buf,
        compressed: frame.is_some(),
        extent_count,
    })
}

/// The operation names of the segment files' errors.
const SEGMENT_OPS: SegmentOps = SegmentOps {
    create: "create undo segment",
    write_header: "write undo segment header",
    rename: "rename undo segment",
    open: "open undo segment",
    stat: "stat undo segment",
};

fn create_segment(dir: &Path, segno: u64) -> Result<(Segment, File)> {
    let (path, file) = create_segment_file(
        dir,
        &seg_name(segno),
        TMP_EXT,
        &encode_seg_header(segno),
        &SEGMENT_OPS,
    )?;
    Ok((
        Segment {
            segno,
            path,
            len: SEG_HEADER_LEN,
            sets: 0,
            reader: None,
        },
        file,
    ))
}

/// Segment numbers and temporary files in `dir` (sorted segment numbers).
fn list_dir(dir: &Path) -> Result<(Vec<u64>, Vec<PathBuf>)> {
    let mut segnos = Vec::new();
    let mut tmps = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io("list directory", dir, e))?;
    for ent in entries {
        let ent = ent.map_err(|e| Error::io("list directory", dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(TMP_EXT) && parse_seg_name(&name[..name.len() - TMP_EXT.len()]).is_some()
        {
            tmps.push(ent.path());
        } else if let Some(n) = parse_seg_name(name) {
            segnos.push(n);
        }
    }
    segnos.sort_unstable();
    tmps.sort();
    Ok((segnos, tmps))
}

/// What scanning one segment found.
struct SegScan {
    /// End of the last complete set.
    valid_len: u64,
    /// Complete sets found (pushed to the log's list).
    sets: usize,
    /// A torn or incomplete tail (last segment only): cut at `valid_len`.
    cut: Option<TornTail>,
}

struct TornTail {
    incomplete: Option<SetInfo>,
    dropped_parts: u32,
}

/// The set being written when a crash happened at a bad record.
struct InProgress {
    info: SetInfo,
    start: u64,
    parts: u32,
}

impl UndoLog {
    /// Open (creating `dir` if needed) the undo log in `dir`, recovering
    /// from any crash: see the module docs and [`UndoRecovery`].
    pub fn open(dir: &Path, opts: UndoOptions) -> Result<(UndoLog, UndoRecovery)> {
        Self::open_mode(dir, opts, false)
    }

    /// Open the undo log in `dir` for reading only. The same validation as
    /// [`UndoLog::open`], but nothing is modified: a torn or incomplete
    /// tail is ignored (another process may be appending) and a missing
    /// directory is an empty log. Writing through it is
    /// [`ErrorKind::InvalidInput`].
    pub fn open_read_only(dir: &Path) -> Result<UndoLog> {
        Ok(Self::open_mode(dir, UndoOptions::default(), true)?.0)
    }

    fn open_mode(
        dir: &Path,
        opts: UndoOptions,
        read_only: bool,
    ) -> Result<(UndoLog, UndoRecovery)> {
        let mut rec = UndoRecovery::default();
        let mut log = UndoLog {
            dir: dir.to_path_buf(),
            opts,
            read_only,
            segments: Vec::new(),
            sets: Vec::new(),
            active: None,
            poisoned: false,
            zstd: Zstd::default(),
        };
        if read_only {
            match fs::metadata(dir) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((log, rec)),
                Err(e) => return Err(Error::io("open", dir, e)),
            }
        } else {
            let existed = dir.is_dir();
            fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
            if !existed {
                sync_dir(dir)?;
                if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent)?;
                }
            }
        }

        let (segnos, tmps) = list_dir(dir)?;
        if !read_only && !tmps.is_empty() {
            for p in tmps {
                fs::remove_file(&p).map_err(|e| Error::io("remove temp file", &p, e))?;
                rec.removed_temp_files.push(p);
            }
            sync_dir(dir)?;
        }
        if let Some((a, b)) = segment_gap(&segnos) {
            return Err(Error::corrupt(
                "open",
                &dir.join(seg_name(a + 1)),
                0,
                format!("undo segment {} missing between {a} and {b}", a + 1),
            ));
        }

        let nseg = segnos.len();
        for (i, &segno) in segnos.iter().enumerate() {
            let path = dir.join(seg_name(segno));
            let is_last = i + 1 == nseg;
            let writable = is_last && !read_only;
            let (file, file_len, hb) =
                open_segment_file(&path, writable, SEG_HEADER_LEN, &SEGMENT_OPS)?;
            let named = decode_seg_header(&hb, &path)?;
            if named != segno {
                return Err(Error::corrupt(
                    "open",
                    &path,
                    u64_len(SEG_OFF_SEGNO),
                    format!("header says segment {named}, file name {segno}"),
                ));
            }
            let scan = log.scan_segment(&file, &path, segno, file_len, is_last)?;
            if let Some(t) = scan.cut {
                if !read_only {
                    truncate_synced(&file, &path, scan.valid_len, "truncate torn undo tail")?;
                    rec.torn_tail = Some((path.clone(), scan.valid_len));
                    rec.truncated_bytes = file_len - scan.valid_len;
                    rec.incomplete_set = t.incomplete;
                    rec.dropped_parts = t.dropped_parts;
                }
            }
            log.segments.push(Segment {
                segno,
                path,
                len: scan.valid_len,
                sets: scan.sets,
                reader: None,
            });
            if writable {
                log.active = Some(file);
            }
        }

        if !read_only && log.segments.is_empty() {
            let (seg, file) = create_segment(dir, 0)?;
            log.segments.push(seg);
            log.active = Some(file);
        }
        rec.sets = log.sets.len();
        rec.segments = log.segments.len();
        Ok((log, rec))
    }

    /// Validate the records of one segment, pushing its complete sets.
    fn scan_segment(
        &mut self,
        file: &File,
        path: &Path,
        segno: u64,
        file_len: u64,
        is_last: bool,
    ) -> Result<SegScan> {
        let mut off = SEG_HEADER_LEN;
        let mut sets = 0usize;
        let mut pending: Option<InProgress> = None;
        while off < file_len {
            match parse_record(file, path, segno, off, file_len, "open")? {
                RecParse::Ok(r) => {
                    let corrupt = |m: String| Error::corrupt("open", path, off, m);
                    match &mut pending {
                        Some(p) => {
                            if r.head.info != p.info {
                                return Err(corrupt(format!(
                                    "record of set {:?} inside set {:?}",
                                    r.head.info, p.info
                                )));
                            }
                            if r.head.part != p.parts {
                                return Err(corrupt(format!(
                                    "part {} where part {} was due",
                                    r.head.part, p.parts
                                )));
                            }
                            p.parts += 1;
                        }
                        None => {
                            if r.head.part != 0 {
                                return Err(corrupt(format!(
                                    "set starts with part {}",
                                    r.head.part
                                )));
                            }
                            if let Err(m) =
                                check_chain(self.sets.last().map(|s| &s.info), &r.head.info)
                            {
                                return Err(corrupt(format!("undo chain broken: {m}")));
                            }
                            pending = Some(InProgress {
                                info: r.head.info,
                                start: off,
                                parts: 1,
                            });
                        }
                    }
                    off += r.len();
                    if r.last() {
                        if let Some(p) = pending.take() {
                            self.sets.push(SetIdx {
                                info: p.info,
                                segno,
                                start: p.start,
                                end: off,
                                parts: p.parts,
                            });
                            sets += 1;
                        }
                    }
                }
                RecParse::Bad(why) => {
                    if !is_last {
                        return Err(Error::corrupt("open", path, off, why));
                    }
                    let cur = pending.as_ref().map(|p| p.info);
                    if let Some((at, m)) =
                        self.later_record(file, path, segno, off, file_len, cur)?
                    {
                        return Err(Error::corrupt(
                            "open",
                            path,
                            off,
                            format!("{why}; a valid record follows at offset {at}: {m}"),
                        ));
                    }
                    // A torn tail: the set being written ends here.
                    let (start, incomplete, dropped) = match pending.take() {
                        Some(p) => (p.start, Some(p.info), p.parts),
                        None => (off, None, 0),
                    };
                    return Ok(SegScan {
                        valid_len: start,
                        sets,
                        cut: Some(TornTail {
                            incomplete,
                            dropped_parts: dropped,
                        }),
                    });
                }
            }
        }
        match pending {
            None => Ok(SegScan {
                valid_len: off,
                sets,
                cut: None,
            }),
            Some(p) if is_last => Ok(SegScan {
                valid_len: p.start,
                sets,
                cut: Some(TornTail {
                    incomplete: Some(p.info),
                    dropped_parts: p.parts,
                }),
            }),
            Some(p) => Err(Error::corrupt(
                "open",
                path,
                p.start,
                format!(
                    "set {:?} without its last record at the end of a non-last segment",
                    p.info
                ),
            )),
        }
    }

    /// After a bad record at `from` in the last segment: is there a valid
    /// record after it that cannot belong to the set being written at the
    /// crash (`cur`, or when `from` is at a set boundary, the one set that
    /// the valid records after it belong to, which must continue the
    /// chain)? Returns its offset and why. Only records of sets after the
    /// last complete one (`first_seq` beyond it) are considered: a valid
    /// record of an older set cannot have been written there, and skipping
    /// them on their header alone keeps the scan cheap.
    fn later_record(
        &self,
        file: &File,
        path: &Path,
        segno: u64,
        from: u64,
        file_len: u64,
        mut cur: Option<SetInfo>,
    ) -> Result<Option<(u64, String)>> {
        let evidence = |cand: u64, rest: &[u8]| -> Result<Option<(u64, String)>> {
            // Cheap filter first (old disk contents stored raw may hold
            // anything): only a record of a set after the last complete
            // one, and not of the set being written, can be evidence.
            let hb = match rest.get(..usize_len(REC_HEADER_LEN)) {
                Some(b) => b.to_vec(),
                None => read_vec_at(file, path, cand, usize_len(REC_HEADER_LEN), "open")?,
            };
            let Ok(head) = decode_rec_head(&hb) else {
                return Ok(None);
            };
            let after = match cur {
                Some(c) if c == head.info => return Ok(None),
                Some(c) => Some(c.last_seq),
                None => self.sets.last().map(|s| s.info.last_seq),
            };
            if after.is_some_and(|a| head.info.first_seq <= a) {
                return Ok(None);
            }
            let RecParse::Ok(r) = parse_record(file, path, segno, cand, file_len, "open")? else {
                return Ok(None);
            };
            match cur {
                Some(c) if c == r.head.info => Ok(None),
                Some(c) => Ok(Some((
                    cand,
                    format!("it belongs to set {:?}, not to {c:?}", r.head.info),
                ))),
                None => {
                    if let Err(m) = check_chain(self.sets.last().map(|s| &s.info), &r.head.info) {
                        return Ok(Some((cand, m)));
                    }
                    cur = Some(r.head.info);
                    Ok(None)
                }
            }
        };
        scan_for_magic(
            file,
            path,
            from,
            file_len,
            REC_MAGIC,
            REC_HEADER_LEN,
            evidence,
        )
    }

    /// The directory of the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opened with [`UndoLog::open_read_only`], or made by
    /// [`UndoLog::read_only_clone`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The newest set: its `last_seq` is the replica state the log
    /// continues from (`None`: the log holds no set).
    pub fn last_set(&self) -> Option<SetInfo> {
        self.sets.last().map(|s| s.info)
    }

    /// The oldest set held (after pruning).
    pub fn first_set(&self) -> Option<SetInfo> {
        self.sets.first().map(|s| s.info)
    }

    /// The oldest state reachable by rewinding: `None` when the log holds no
    /// set (only the current state is reachable); `Some(None)` the empty
    /// disk before any set; `Some(Some(seq))` the state right after the
    /// change set ending at `seq`. It is the first set's `prev_applied`, and
    /// the argument to pass to [`UndoLog::parts_from`] to rewind that far.
    pub fn floor(&self) -> Option<Option<u64>> {
        self.sets.first().map(|s| s.info.prev_applied)
    }

    /// Can the replica be rewound to the state right after the change set
    /// ending at `point`? True when some set starts there
    /// (`prev_applied == Some(point)`). The current state (the last set's
    /// `last_seq`) needs no rewind and is not included.
    pub fn reaches(&self, point: u64) -> bool {
        self.find(Some(point)).is_some()
    }

    /// Every applied sequence the replica can be rewound to: the
    /// `prev_applied` of every set held (the set boundaries, oldest first;
    /// the empty-disk start, `prev_applied == None`, is not a sequence and
    /// is not included: see [`UndoLog::floor`]). Each `seq` in it satisfies
    /// [`UndoLog::reaches`]. The current state (the last set's `last_seq`)
    /// needs no rewind and is not included.
    pub fn boundaries(&self) -> BTreeSet<u64> {
        self.sets
            .iter()
            .filter_map(|s| s.info.prev_applied)
            .collect()
    }

    /// Complete sets held.
    pub fn sets(&self) -> usize {
        self.sets.len()
    }

    /// Headers of the sets held, oldest first.
    pub fn set_infos(&self) -> impl Iterator<Item = SetInfo> + '_ {
        self.sets.iter().map(|s| s.info)
    }

    /// Bytes of the segment files (their validated lengths).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Segment files held.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Numbers of the segment files held, oldest first.
    pub fn segment_numbers(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.segno).collect()
    }

    /// The segment numbered `segno`, if held.
    fn segment(&self, segno: u64) -> Option<&Segment> {
        self.segments
            .binary_search_by_key(&segno, |g| g.segno)
            .ok()
            .map(|i| &self.segments[i])
    }

    /// A read-only copy of this log, for readers elsewhere (another thread,
    /// while this one goes on appending and pruning). It shares nothing
    /// mutable with `self`: it copies the index of complete sets and
    /// segments (no rescanning) and opens its own descriptor for every
    /// segment file now, so a segment `self` deletes later (pruning,
    /// [`UndoLog::clear`]) stays readable through it (on Linux: an open
    /// file outlives its name). A clone of a clone duplicates the
    /// descriptors it holds (only positional reads are used, so the shared
    /// file offset never matters). Its [`UndoLog::parts_from`],
    /// [`UndoLog::reaches`], [`UndoLog::boundaries`], [`UndoLog::floor`],
    /// [`UndoLog::last_set`] etc. answer from the index as of the clone;
    /// its reads still verify every record. Like
    /// [`UndoLog::open_read_only`], [`UndoLog::is_read_only`] is true and
    /// writing through it is [`ErrorKind::InvalidInput`]. A segment file
    /// that cannot be opened is an [`ErrorKind::Io`] error.
    pub fn read_only_clone(&self) -> Result<UndoLog> {
        const OP: &str = "clone undo log";
        let mut segments = Vec::with_capacity(self.segments.len());
        for g in &self.segments {
            let reader = match &g.reader {
                Some(f) => f.try_clone(),
                None => File::open(&g.path),
            }
            .map_err(|e| Error::io(OP, &g.path, e))?;
            segments.push(Segment {
                segno: g.segno,
                path: g.path.clone(),
                len: g.len,
                sets: g.sets,
                reader: Some(reader),
            });
        }
        Ok(UndoLog {
            dir: self.dir.clone(),
            opts: self.opts,
            read_only: true,
            segments,
            sets: self.sets.clone(),
            active: None,
            poisoned: false,
            zstd: Zstd::default(),
        })
    }

    /// Index of the set whose `prev_applied` is `point` (they strictly
    /// increase along the log, `None` first).
    fn find(&self, point: Option<u64>) -> Option<usize> {
        self.sets
            .binary_search_by_key(&point, |s| s.info.prev_applied)
            .ok()
    }

    /// Every part of every set, in log order, from the set whose
    /// `prev_applied == point` (`None`: the set that starts from the empty
    /// disk) to the end of the log: what rewinding the replica to `point`
    /// reads (first writer wins, see the module docs). Each record is
    /// re-read with positional reads, re-verified and its data
    /// decompressed here (opening does not decompress); a defect, such as a
    /// zstd frame that does not decompress to exactly its recorded length,
    /// ends the iteration with an [`ErrorKind::Corrupt`] error naming the
    /// segment path and record offset. [`ErrorKind::InvalidInput`] when no
    /// set starts at `point`.
    pub fn parts_from(&self, point: Option<u64>) -> Result<UndoParts<'_>> {
        let Some(i) = self.find(point) else {
            let show =
                |p: Option<u64>| p.map_or_else(|| "the empty disk".into(), |p| format!("seq {p}"));
            return Err(inval(
                "read undo",
                format!(
                    "no undo set starts at {} (the log reaches back to {})",
                    show(point),
                    self.floor()
                        .map_or_else(|| "nothing: it holds no set".into(), show)
                ),
            )
            .at_path(&self.dir));
        };
        Ok(UndoParts {
            log: self,
            set: i,
            off: self.sets[i].start,
            part: 0,
            file: None,
            zstd: Zstd::default(),
            done: false,
        })
    }

    fn writable(&self, op: &'static str) -> Result<()> {
        if self.read_only {
            return Err(inval(op, "the undo log is open read-only").at_path(&self.dir));
        }
        Ok(())
    }

    /// Start writing the undo of one change set. Checks the chain rules
    /// (module docs; [`ErrorKind::InvalidInput`], nothing written) and
    /// starts a new segment if the active one is full.
    pub fn begin_set(&mut self, header: UndoSetHeader) -> Result<UndoSetWriter<'_>> {
        const OP: &str = "begin undo set";
        self.writable(OP)?;
        if self.poisoned {
            return Err(Error::new(
                ErrorKind::Io,
                OP,
                "an earlier write or sync failed; reopen the undo log",
            )
            .at_path(&self.dir));
        }
        check_chain(self.last_set().as_ref(), &header).map_err(|m| inval(OP, m))?;
        let mut rolled = false;
        let Some(cur) = self.segments.last() else {
            return Err(Error::new(ErrorKind::Io, OP, "no active segment").at_path(&self.dir));
        };
        if cur.sets > 0 && cur.len > self.opts.segment_size {
            match create_segment(&self.dir, cur.segno + 1) {
                Ok((seg, file)) => {
                    self.segments.push(seg);
                    self.active = Some(file);
                    rolled = true;
                }
                Err(e) => {
                    self.poisoned = true;
                    return Err(e);
                }
            }
        }
        let start = self.segments.last().map_or(SEG_HEADER_LEN, |s| s.len);
        Ok(UndoSetWriter {
            log: self,
            info: header,
            start,
            off: start,
            parts: 0,
            pending: None,
            rolled,
            finished: false,
        })
    }

    /// Delete whole non-active segments, oldest first, whose every set has
    /// `last_seq <= point`: they are only needed to rewind to states older
    /// than `point`. The active (last) segment is never deleted. Afterwards
    /// [`UndoLog::floor`] is the first remaining set's `prev_applied`.
    pub fn prune_before(&mut self, point: u64) -> Result<PrunedUndo> {
        self.writable("prune undo")?;
        let mut pruned = PrunedUndo::default();
        while self.segments.len() > 1 {
            let s = &self.segments[0];
            let droppable = self.sets[..s.sets].iter().all(|x| x.info.last_seq <= point);
            if !droppable {
                break;
            }
            fs::remove_file(&s.path).map_err(|e| Error::io("remove undo segment", &s.path, e))?;
            pruned.segments += 1;
            pruned.sets += u64_len(s.sets);
            pruned.bytes += s.len;
            self.sets.drain(..s.sets);
            self.segments.remove(0);
        }
        if pruned.segments > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(pruned)
    }

    /// Delete every set and segment (oldest first) and start a fresh, empty
    /// log at segment 0. Also clears an earlier write failure.
    pub fn clear(&mut self) -> Result<PrunedUndo> {
        self.writable("clear undo")?;
        let pruned = PrunedUndo {
            segments: u64_len(self.segments.len()),
            sets: u64_len(self.sets.len()),
            bytes: self.bytes(),
        };
        // Delete what is on disk, not only what is known: a failed segment
        // creation may have left a file the log did not take up.
        let (segnos, tmps) = list_dir(&self.dir)?;
        // Until the fresh segment exists the log takes no set.
        self.poisoned = true;
        self.active = None;
        self.segments.clear();
        self.sets.clear();
        for p in tmps {
            fs::remove_file(&p).map_err(|e| Error::io("remove temp file", &p, e))?;
        }
        for n in segnos {
            let p = self.dir.join(seg_name(n));
            fs::remove_file(&p).map_err(|e| Error::io("remove undo segment", &p, e))?;
        }
        sync_dir(&self.dir)?;
        let (seg, file) = create_segment(&self.dir, 0)?;
        self.segments.push(seg);
        self.active = Some(file);
        self.poisoned = false;
        Ok(pruned)
    }
}

/// Writes one undo set; see [`UndoLog::begin_set`]. Dropping it without
/// [`UndoSetWriter::finish`] cuts what it wrote.
#[derive(Debug)]
#[must_use = "the set is durable only once finish() returns Ok"]
pub struct UndoSetWriter<'a> {
    log: &'a mut UndoLog,
    info: SetInfo,
    start: u64,
    off: u64,
    parts: u32,
    pending: Option<Pending>,
    rolled: bool,
    finished: bool,
}

impl UndoSetWriter<'_> {
    /// The set's header.
    pub fn info(&self) -> SetInfo {
        self.info
    }

    /// Add a part: `extents` (at most [`MAX_PART_EXTENTS`], each of positive
    /// length) and `data`, the concatenated old bytes of the data extents
    /// in order (at most [`MAX_PART_DATA`] bytes). Written without syncing
    /// (the part before it is written now, this one at the next call or at
    /// `finish`). A part that breaks these rules is
    /// [`ErrorKind::InvalidInput`] and leaves the writer usable.
    pub fn add_part(&mut self, extents: &[UndoExtent], data: &[u8]) -> Result<()> {
        check_part(extents, data)?;
        let p = encode_part(&mut self.log.zstd, extents, data)?;
        if let Some(prev) = self.pending.take() {
            self.write(prev, false)?;
        }
        self.pending = Some(p);
        Ok(())
    }

    /// Write the last part (an empty one if none was added) with `LAST`
    /// and `fdatasync` the segment. `Ok`: the set is durable and the
    /// replica may be modified.
    pub fn finish(mut self) -> Result<FinishedSet> {
        let p = match self.pending.take() {
            Some(p) => p,
            None => encode_part(&mut self.log.zstd, &[], &[])?,
        };
        self.write(p, true)?;
        let Some(seg) = self.log.segments.last_mut() else {
            return Err(Error::new(
                ErrorKind::Io,
                "finish undo set",
                "no active segment",
            ));
        };
        let synced = match &self.log.active {
            Some(f) => f.sync_data(),
            None => Err(io::Error::other("no active segment file")),
        };
        if let Err(e) = synced {
            self.log.poisoned = true;
            return Err(Error::io("sync undo segment", &seg.path, e).at_offset(self.start));
        }
        seg.len = self.off;
        seg.sets += 1;
        let segno = seg.segno;
        self.log.sets.push(SetIdx {
            info: self.info,
            segno,
            start: self.start,
            end: self.off,
            parts: self.parts,
        });
        self.finished = true;
        Ok(FinishedSet {
            set: self.info,
            segment: segno,
            offset: self.start,
            bytes: self.off - self.start,
            parts: self.parts,
            rolled: self.rolled,
        })
    }

    /// Write one encoded part at the end of the set so far.
    fn write(&mut self, mut p: Pending, last: bool) -> Result<()> {
        const OP: &str = "write undo part";
        if self.log.poisoned {
            return Err(Error::new(
                ErrorKind::Io,
                OP,
                "an earlier write or sync failed; reopen the undo log",
            )
            .at_path(&self.log.dir));
        }
        let part = self.parts;
        let next = part
            .checked_add(1)
            .ok_or_else(|| inval(OP, "too many parts in one set"))?;
        let body_len = u32::try_from(p.buf.len() - usize_len(REC_HEADER_LEN))
            .map_err(|_| inval(OP, "record body exceeds u32"))?;
        let mut flags = 0u16;
        if last {
            flags |= REC_FLAG_LAST;
        }
        if p.compressed {
            flags |= REC_FLAG_COMPRESSED;
        }
        if self.info.prev_applied.is_some() {
            flags |= REC_FLAG_HAS_PREV;
        }
        let h = &mut p.buf;
        put_bytes(h, REC_OFF_MAGIC, &REC_MAGIC.to_le_bytes());
        put_bytes(h, REC_OFF_VERSION, &REC_VERSION.to_le_bytes());
        put_bytes(h, REC_OFF_FLAGS, &flags.to_le_bytes());
        put_bytes(h, REC_OFF_BODY_LEN, &body_len.to_le_bytes());
        put_bytes(h, REC_OFF_EPOCH, &self.info.epoch.to_le_bytes());
        put_bytes(h, REC_OFF_FIRST_SEQ, &self.info.first_seq.to_le_bytes());
        put_bytes(h, REC_OFF_LAST_SEQ, &self.info.last_seq.to_le_bytes());
        let prev = self.info.prev_applied.unwrap_or(0);
        put_bytes(h, REC_OFF_PREV_APPLIED, &prev.to_le_bytes());
        put_bytes(
            h,
            REC_OFF_CONSISTENT_FROM,
            &self.info.consistent_from.to_le_bytes(),
        );
        put_bytes(h, REC_OFF_PART, &part.to_le_bytes());
        put_bytes(h, REC_OFF_EXTENT_COUNT, &p.extent_count.to_le_bytes());
        let Some(seg) = self.log.segments.last() else {
            return Err(Error::new(ErrorKind::Io, OP, "no active segment"));
        };
        let crc = record_crc(seg.segno, self.off, h);
        put_bytes(h, REC_OFF_CRC, &crc.to_le_bytes());
        let res = match &self.log.active {
            Some(f) => f.write_all_at(h, self.off),
            None => Err(io::Error::other("no active segment file")),
        };
        if let Err(e) = res {
            self.log.poisoned = true;
            return Err(Error::io(OP, &seg.path, e).at_offset(self.off));
        }
        self.off += u64_len(h.len());
        self.parts = next;
        Ok(())
    }
}

impl Drop for UndoSetWriter<'_> {
    fn drop(&mut self) {
        if self.finished || self.off == self.start {
            return;
        }
        // An abandoned set: cut it, durably, so that no stale record of it
        // can mix with the next set's after a crash.
        let ok = self
            .log
            .active
            .as_ref()
            .is_some_and(|f| f.set_len(self.start).and_then(|()| f.sync_data()).is_ok());
        if !ok {
            self.log.poisoned = true;
        }
    }
}

/// Iterator over undo parts; see [`UndoLog::parts_from`].
#[derive(Debug)]
pub struct UndoParts<'a> {
    log: &'a UndoLog,
    /// Index of the current set.
    set: usize,
    /// Offset of the next record in the current set.
    off: u64,
    /// Its expected part number.
    part: u32,
    file: Option<(u64, File)>,
    zstd: Zstd,
    done: bool,
}

impl UndoParts<'_> {
    fn read_next(&mut self) -> Option<Result<UndoPart>> {
        loop {
            let s = *self.log.sets.get(self.set)?;
            if self.off >= s.end {
                self.set += 1;
                self.part = 0;
                if let Some(n) = self.log.sets.get(self.set) {
                    self.off = n.start;
                }
                continue;
            }
            let path = self.log.dir.join(seg_name(s.segno));
            let held = self.log.segment(s.segno).and_then(|g| g.reader.as_ref());
            let file = match held {
                Some(f) => f,
                None => {
                    if self.file.as_ref().is_none_or(|(n, _)| *n != s.segno) {
                        match File::open(&path) {
                            Ok(f) => self.file = Some((s.segno, f)),
                            Err(e) => return Some(Err(Error::io("read undo", &path, e))),
                        }
                    }
                    &self.file.as_ref()?.1
                }
            };
            let off = self.off;
            let corrupt = |m: String| Error::corrupt("read undo", &path, off, m);
            let r = match parse_record(file, &path, s.segno, off, s.end, "read undo") {
                Ok(RecParse::Ok(r)) => r,
                Ok(RecParse::Bad(why)) => return Some(Err(corrupt(why))),
                Err(e) => return Some(Err(e)),
            };
            let last_due = self.part + 1 == s.parts;
            if r.head.info != s.info || r.head.part != self.part || r.last() != last_due {
                return Some(Err(corrupt(format!(
                    "record changed since open: set {:?} part {} (last {}), \
                     expected set {:?} part {} (last {last_due})",
                    r.head.info,
                    r.head.part,
                    r.last(),
                    s.info,
                    self.part
                ))));
            }
            let len = r.len();
            // Decompression happens here, not at open.
            let part = match r.into_part(&mut self.zstd) {
                Ok(Ok(p)) => p,
                Ok(Err(why)) => return Some(Err(corrupt(why))),
                Err(e) => return Some(Err(e.at_path(&path).at_offset(off))),
            };
            self.off += len;
            self.part += 1;
            return Some(Ok(part));
        }
    }
}

impl Iterator for UndoParts<'_> {
    type Item = Result<UndoPart>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.read_next();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    use crate::testutil::{copy_dir, TempDir};

    /// Set `i` of a chain: seqs `10i+1..=10i+10`, after set `i-1`.
    fn info(i: u64) -> SetInfo {
        SetInfo {
            epoch: 1 + i / 3,
            first_seq: 10 * i + 1,
            last_seq: 10 * i + 10,
            prev_applied: (i > 0).then_some(10 * i),
            consistent_from: 10 * i + 1,
        }
    }

    fn bytes(seed: u64, len: usize, compressible: bool) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|i| {
                if compressible {
                    u8::try_from((i / 64) % 7).unwrap() + 1
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                }
            })
            .collect()
    }

    type Part = (Vec<UndoExtent>, Vec<u8>);

    fn write_set(log: &mut UndoLog, info: SetInfo, parts: &[Part]) -> FinishedSet {
        let mut w = log.begin_set(info).unwrap();
        for (e, d) in parts {
            w.add_part(e, d).unwrap();
        }
        w.finish().unwrap()
    }

    /// The parts a set is read back as.
    fn expected(info: SetInfo, parts: &[Part]) -> Vec<UndoPart> {
        if parts.is_empty() {
            return vec![UndoPart {
                set: info,
                part: 0,
                last: true,
                extents: vec![],
                data: vec![],
            }];
        }
        parts
            .iter()
            .enumerate()
            .map(|(i, (e, d))| UndoPart {
                set: info,
                part: u32::try_from(i).unwrap(),
                last: i + 1 == parts.len(),
                extents: e.clone(),
                data: d.clone(),
            })
            .collect()
    }

    fn read_all(log: &UndoLog, point: Option<u64>) -> Vec<UndoPart> {
        log.parts_from(point)
            .unwrap()
            .collect::<Result<Vec<_>>>()
            .unwrap()
    }

    fn seg_path(dir: &Path, n: u64) -> PathBuf {
        dir.join(seg_name(n))
    }

    fn file_len(p: &Path) -> u64 {
        fs::metadata(p).unwrap().len()
    }

    /// Four sets: data and zero extents, several parts, an empty set.
    fn sample_sets() -> Vec<(SetInfo, Vec<Part>)> {
        let r1 = bytes(1, 1000, false);
        let c1 = bytes(2, 4096, true);
        let r2 = bytes(3, 333, false);
        let mut d0 = c1.clone();
        d0.extend_from_slice(&r1);
        vec![
            (
                info(0),
                vec![
                    (
                        vec![
                            UndoExtent::data(0, 4096),
                            UndoExtent::zeros(8192, 100),
                            UndoExtent::data(20_000, 1000),
                        ],
                        d0,
                    ),
                    (vec![UndoExtent::data(10_000, 333)], r2.clone()),
                ],
            ),
            (info(1), vec![(vec![UndoExtent::zeros(0, 1 << 30)], vec![])]),
            (info(2), vec![]),
            (
                info(3),
                vec![
                    (vec![UndoExtent::data(5, 333)], r2.clone()),
                    (vec![], vec![]),
                    (
                        vec![UndoExtent::zeros(1, 2), UndoExtent::data(7, 4096)],
                        c1.clone(),
                    ),
                ],
            ),
        ]
    }

    fn write_sample(dir: &Path, opts: UndoOptions) -> (UndoLog, Vec<(SetInfo, Vec<Part>)>) {
        let (mut log, _) = UndoLog::open(dir, opts).unwrap();
        let sets = sample_sets();
        for (i, p) in &sets {
            write_set(&mut log, *i, p);
        }
        (log, sets)
    }

    fn check_reads(log: &UndoLog, sets: &[(SetInfo, Vec<Part>)]) {
        assert_eq!(log.sets(), sets.len());
        for k in 0..sets.len() {
            let want: Vec<UndoPart> = sets[k..]
                .iter()
                .flat_map(|(i, p)| expected(*i, p))
                .collect();
            assert_eq!(read_all(log, sets[k].0.prev_applied), want, "from set {k}");
        }
    }

    #[test]
    fn round_trip_parts_and_reopen() {
        let td = TempDir::new("undo-rt");
        let dir = td.path().join("undo");
        let (log, sets) = write_sample(&dir, UndoOptions::default());
        check_reads(&log, &sets);
        assert_eq!(log.first_set(), Some(info(0)));
        assert_eq!(log.last_set(), Some(info(3)));
        assert_eq!(log.floor(), Some(None));
        assert!(log.reaches(10) && log.reaches(20) && log.reaches(30));
        assert!(!log.reaches(40) && !log.reaches(15) && !log.reaches(0));
        let e = log.parts_from(Some(15)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert_eq!(log.bytes(), file_len(&seg_path(&dir, 0)));
        drop(log);

        let (log, rec) = UndoLog::open(&dir, UndoOptions::default()).unwrap();
        assert_eq!(rec.torn_tail, None);
        assert_eq!(rec.sets, 4);
        assert_eq!(rec.segments, 1);
        check_reads(&log, &sets);
        let ro = UndoLog::open_read_only(&dir).unwrap();
        check_reads(&ro, &sets);
        assert_eq!(ro.bytes(), log.bytes());

        // Extent data helper.
        let p = &read_all(&log, None)[0];
        let got: Vec<(UndoExtent, Option<Vec<u8>>)> = p
            .extent_data()
            .map(|(e, d)| (*e, d.map(<[u8]>::to_vec)))
            .collect();
        let d0 = &sets[0].1[0].1;
        assert_eq!(
            got[0],
            (UndoExtent::data(0, 4096), Some(d0[..4096].to_vec()))
        );
        assert_eq!(got[1], (UndoExtent::zeros(8192, 100), None));
        assert_eq!(got[2].1.as_deref(), Some(&d0[4096..]));
    }

    #[test]
    fn compressible_data_is_compressed_random_is_not() {
        let td = TempDir::new("undo-z");
        let (mut log, _) = UndoLog::open(td.path(), UndoOptions::default()).unwrap();
        let c = bytes(5, 1 << 20, true);
        let f = write_set(
            &mut log,
            info(0),
            &[(vec![UndoExtent::data(0, 1 << 20)], c.clone())],
        );
        assert!(f.bytes < 64 << 10, "compressed set is {} bytes", f.bytes);
        let r = bytes(6, 1 << 16, false);
        let f = write_set(
            &mut log,
            info(1),
            &[(vec![UndoExtent::data(0, 1 << 16)], r.clone())],
        );
        assert_eq!(f.bytes, REC_HEADER_LEN + EXTENT_LEN + 8 + (1 << 16));
        let parts = read_all(&log, None);
        assert_eq!(parts[0].data, c);
        assert_eq!(parts[1].data, r);
    }

    #[test]
    fn begin_set_rules() {
        let td = TempDir::new("undo-rules");
        let (mut log, _) = UndoLog::open(td.path(), UndoOptions::default()).unwrap();
        let bad = |log: &mut UndoLog, i: SetInfo| {
            let before = log.bytes();
            let e = log.begin_set(i).map(|_| ()).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{i:?}");
            assert_eq!(log.bytes(), before);
        };
        let mut i = info(0);
        i.first_seq = 11;
        i.last_seq = 10;
        bad(&mut log, i);
        // prev_applied must precede the set.
        bad(
            &mut log,
            SetInfo {
                prev_applied: Some(5),
                first_seq: 5,
                last_seq: 6,
                ..info(0)
            },
        );
        // An empty log takes any (valid) set.
        let first = SetInfo {
            prev_applied: Some(100),
            first_seq: 101,
            last_seq: 110,
            ..info(0)
        };
        write_set(&mut log, first, &[]);
        for (prev, f, l) in [
            (None, 111, 120),
            (Some(109), 111, 120),
            (Some(111), 112, 120),
            (Some(110), 110, 120),
            (Some(110), 105, 120),
        ] {
            bad(
                &mut log,
                SetInfo {
                    prev_applied: prev,
                    first_seq: f,
                    last_seq: l,
                    ..info(0)
                },
            );
        }
        let ok = SetInfo {
            prev_applied: Some(110),
            first_seq: 111,
            last_seq: 111,
            ..info(0)
        };
        write_set(&mut log, ok, &[]);
        assert_eq!(log.floor(), Some(Some(100)));
        assert_eq!(log.last_set(), Some(ok));
        assert!(log.reaches(100) && log.reaches(110));
        assert_eq!(
            log.parts_from(None).map(|_| ()).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn part_bounds() {
        let td = TempDir::new("undo-bounds");
        let (mut log, _) = UndoLog::open(td.path(), UndoOptions::default()).unwrap();
        let mut w = log.begin_set(info(0)).unwrap();
        assert_eq!(
            MAX_RECORD_BODY,
            u64_len(MAX_PART_EXTENTS) * EXTENT_LEN + RAW_LEN_FIELD_LEN + u64_len(MAX_PART_DATA)
        );
        let inv = |r: Result<()>| assert_eq!(r.unwrap_err().kind(), ErrorKind::InvalidInput);
        let big = vec![7u8; MAX_PART_DATA + 1];
        inv(w.add_part(&[UndoExtent::data(0, u64_len(big.len()))], &big));
        let many = vec![UndoExtent::zeros(0, 1); MAX_PART_EXTENTS + 1];
        inv(w.add_part(&many, &[]));
        inv(w.add_part(&[UndoExtent::data(0, 10)], &[1; 9]));
        inv(w.add_part(&[UndoExtent::zeros(0, 10)], &[1; 10]));
        inv(w.add_part(&[UndoExtent::zeros(0, 0)], &[]));
        inv(w.add_part(&[UndoExtent::zeros(u64::MAX, 1)], &[]));
        inv(w.add_part(&[UndoExtent::data(u64::MAX - 1, 2)], &[1, 2]));
        // The limits themselves are fine, and the writer is still usable.
        let max = vec![7u8; MAX_PART_DATA];
        w.add_part(&[UndoExtent::data(0, u64_len(max.len()))], &max)
            .unwrap();
        let many = vec![UndoExtent::zeros(0, 1); MAX_PART_EXTENTS];
        w.add_part(&many, &[]).unwrap();
        w.add_part(&[UndoExtent::data(u64::MAX - 2, 2)], &[1, 2])
            .unwrap();
        let f = w.finish().unwrap();
        assert_eq!(f.parts, 3);
        drop(log);
        let (log, rec) = UndoLog::open(td.path(), UndoOptions::default()).unwrap();
        assert_eq!(rec.torn_tail, None);
        let parts = read_all(&log, None);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].data, max);
        assert_eq!(parts[1].extents.len(), MAX_PART_EXTENTS);
        assert_eq!(parts[2].data, vec![1, 2]);
    }

    #[test]
    fn abandoned_set_is_cut() {
        let td = TempDir::new("undo-abandon");
        let (mut log, _) = UndoLog::open(td.path(), UndoOptions::default()).unwrap();
        write_set(&mut log, info(0), &[]);
        let len = file_len(&seg_path(td.path(), 0));
        {
            let mut w = log.begin_set(info(1)).unwrap();
            for k in 0..3 {
                w.add_part(&[UndoExtent::data(k, 100)], &bytes(k, 100, false))
                    .unwrap();
            }
        }
        assert_eq!(file_len(&seg_path(td.path(), 0)), len);
        assert_eq!(log.sets(), 1);
        let parts = vec![(vec![UndoExtent::zeros(0, 5)], vec![])];
        write_set(&mut log, info(1), &parts);
        drop(log);
        let (log, rec) = UndoLog::open(td.path(), UndoOptions::default()).unwrap();
        assert_eq!(rec.torn_tail, None);
        assert_eq!(read_all(&log, Some(10)), expected(info(1), &parts));
    }

    #[test]
    fn read_only_never_writes() {
        let td = TempDir::new("undo-ro");
        let missing = td.path().join("nope");
        let ro = UndoLog::open_read_only(&missing).unwrap();
        assert!(!missing.exists());
        assert_eq!((ro.sets(), ro.segment_count(), ro.floor()), (0, 0, None));
        assert_eq!(
            ro.parts_from(None).map(|_| ()).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );

        let (log, sets) = write_sample(td.path(), UndoOptions::default());
        drop(log);
        let tmp = td.path().join(format!("{}{TMP_EXT}", seg_name(1)));
        fs::write(&tmp, b"half a segment").unwrap();
        let mut ro = UndoLog::open_read_only(td.path()).unwrap();
        assert!(ro.is_read_only());
        check_reads(&ro, &sets);
        let inv = |e: Error| assert_eq!(e.kind(), ErrorKind::InvalidInput);
        inv(ro.begin_set(info(4)).map(|_| ()).unwrap_err());
        inv(ro.prune_before(100).unwrap_err());
        inv(ro.clear().unwrap_err());
        assert!(tmp.exists());
        let (_, rec) = UndoLog::open(td.path(), UndoOptions::default()).unwrap();
        assert_eq!(rec.removed_temp_files, vec![tmp.clone()]);
        assert!(!tmp.exists());
    }

    #[test]
    fn torn_tail_every_cut() {
        let td = TempDir::new("undo-torn");
        let src = td.path().join("src");
        let small = UndoOptions { segment_size: 1500 };
        let (log, sets) = write_sample(&src, small);
        let nseg = log.segment_count();
        assert!(nseg >= 2, "want a multi-segment log");
        let last = *log.sets.last().unwrap();
        let lastno = last.segno;
        assert_eq!(lastno, u64_len(nseg) - 1);
        drop(log);
        let full = fs::read(seg_path(&src, lastno)).unwrap();
        let (start, end) = (usize_len(last.start), usize_len(last.end));
        assert_eq!(end, full.len());

        let work = td.path().join("work");
        copy_dir(&src, &work);
        let wpath = seg_path(&work, lastno);
        for cut in start..=end {
            fs::write(&wpath, &full[..cut]).unwrap();
            let whole = cut == end;
            let want = if whole { &sets[..] } else { &sets[..3] };
            // Read-only: ignores the tail, changes nothing.
            let ro = UndoLog::open_read_only(&work).unwrap();
            check_reads(&ro, want);
            assert_eq!(file_len(&wpath), u64_len(cut));
            drop(ro);
            // Read-write: cuts it and says so.
            let (log, rec) = UndoLog::open(&work, small).unwrap();
            check_reads(&log, want);
            if whole || cut == start {
                assert_eq!(rec.torn_tail, None, "cut {cut}");
            } else {
                assert_eq!(
                    rec.torn_tail,
                    Some((wpath.clone(), last.start)),
                    "cut {cut}"
                );
                assert_eq!(rec.truncated_bytes, u64_len(cut - start));
            }
            assert_eq!(file_len(&wpath), u64_len(if whole { end } else { start }));
            drop(log);
            let (_, rec) = UndoLog::open(&work, small).unwrap();
            assert_eq!(rec.torn_tail, None);
            assert_eq!(rec.sets, want.len());
        }
    }

    /// Offsets of the records of the set at `idx` in the log.
    fn record_offsets(log: &UndoLog, idx: usize) -> Vec<u64> {
        let s = log.sets[idx];
        let f = File::open(seg_path(log.dir(), s.segno)).unwrap();
        let mut out = Vec::new();
        let mut off = s.start;
        while off < s.end {
            out.push(off);
            let h = read_vec_at(&f, Path::new("x"), off, 64, "t").unwrap();
            off += REC_HEADER_LEN + u64::from(le_u32(&h, REC_OFF_BODY_LEN));
        }
        out
    }

    fn flip(path: &Path, at: u64) {
        let mut b = fs::read(path).unwrap();
        b[usize_len(at)] ^= 0x40;
        fs::write(path, b).unwrap();
    }

    #[test]
    fn unsynced_parts_in_any_order_are_a_torn_tail() {
        let td = TempDir::new("undo-order");
        let src = td.path().join("src");
        let (log, sets) = write_sample(&src, UndoOptions::default());
        let offs = record_offsets(&log, 3);
        assert_eq!(offs.len(), 3);
        let start = log.sets[3].start;
        drop(log);
        let path = seg_path(&src, 0);
        let full = fs::read(&path).unwrap();
        // Any one record of the last set never reached the disk (zeros).
        for (k, &o) in offs.iter().enumerate() {
            let work = td.path().join(format!("w{k}"));
            copy_dir(&src, &work);
            let mut b = full.clone();
            let end = offs.get(k + 1).map_or(b.len(), |&e| usize_len(e));
            b[usize_len(o)..end].fill(0);
            fs::write(seg_path(&work, 0), &b).unwrap();
            let ro = UndoLog::open_read_only(&work).unwrap();
            check_reads(&ro, &sets[..3]);
            let (log, rec) = UndoLog::open(&work, UndoOptions::default()).unwrap();
            assert_eq!(rec.torn_tail, Some((seg_path(&work, 0), start)));
            assert_eq!(rec.incomplete_set, (k > 0).then_some(info(3)));
            check_reads(&log, &sets[..3]);
        }
    }

    #[test]
    fn copied_records_inside_a_torn_set_are_not_evidence() {
        // Old disk contents may hold anything, even an undo record (say of
        // another log) stored raw. Its checksum binds it to where it was
        // written, so in a torn set it is not taken for a later set.
        let td = TempDir::new("undo-embed");
        let opts = UndoOptions::default();
        let a = td.path().join("a");
        let (mut la, _) = UndoLog::open(&a, opts).unwrap();
        let part = (vec![UndoExtent::data(0, 500)], bytes(9, 500, false));
        write_set(&mut la, info(5), &[part]);
        let s = la.sets[0];
        drop(la);
        let inner =
            fs::read(seg_path(&a, 0)).unwrap()[usize_len(s.start)..usize_len(s.end)].to_vec();

        let b = td.path().join("b");
        let (mut lb, _) = UndoLog::open(&b, opts).unwrap();
        write_set(&mut lb, info(0), &[]);
        let part = (vec![UndoExtent::data(0, 4000)], bytes(10, 4000, false));
        write_set(&mut lb, info(1), &[part]);
        let s1 = lb.sets[1];
        drop(lb);
        let p = seg_path(&b, 0);
        let mut f = fs::read(&p).unwrap();
        let at = usize_len(s1.start) + 200;
        f[at..at + inner.len()].copy_from_slice(&inner);
        fs::write(&p, &f).unwrap();
        let (lb, rec) = UndoLog::open(&b, opts).unwrap();
        assert_eq!(rec.torn_tail, Some((p.clone(), s1.start)));
        assert_eq!(lb.last_set(), Some(info(0)));
    }

    #[test]
    fn corruption_in_the_middle_is_corrupt() {
        let td = TempDir::new("undo-mid");
        let src = td.path().join("src");
        let small = UndoOptions { segment_size: 1500 };
        let (log, _) = write_sample(&src, small);
        assert!(log.segment_count() >= 2);
        let s0 = log.sets[0];
        assert_eq!(s0.segno, 0);
        let offs0 = record_offsets(&log, 0);
        let s2 = log.sets[2];
        let last = *log.sets.last().unwrap();
        assert_eq!(s2.segno, last.segno, "sets 2 and 3 share the last segment");
        drop(log);

        let case = |name: &str, seg: u64, at: u64, want_off: u64| {
            let work = td.path().join(name);
            copy_dir(&src, &work);
            flip(&seg_path(&work, seg), at);
            for ro in [true, false] {
                let e = if ro {
                    UndoLog::open_read_only(&work).unwrap_err()
                } else {
                    UndoLog::open(&work, small).map(|_| ()).unwrap_err()
                };
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
                assert_eq!(e.path(), Some(seg_path(&work, seg).as_path()), "{name}");
                assert_eq!(e.offset(), Some(want_off), "{name}: {e}");
            }
            // Nothing was cut.
            assert_eq!(
                fs::read(seg_path(&work, seg)).unwrap().len(),
                fs::read(seg_path(&src, seg)).unwrap().len()
            );
        };
        // Body, header field, flags (covered by the checksum) of records
        // in the first segment.
        case("body", 0, offs0[0] + REC_HEADER_LEN + 3, offs0[0]);
        case("part2", 0, offs0[1] + REC_HEADER_LEN + 30, offs0[1]);
        case("flags", 0, offs0[0] + u64_len(REC_OFF_FLAGS), offs0[0]);
        case("seq", 0, offs0[1] + u64_len(REC_OFF_LAST_SEQ), offs0[1]);
        // A set of the last segment followed by a valid later set.
        case("last-seg", s2.segno, s2.start + 70, s2.start);
        // Segment header.
        case("header", 0, 17, u64_len(SEG_OFF_CRC));
        case("magic", 0, 0, 0);

        // A set cut short at the end of a non-last segment.
        let work = td.path().join("short");
        copy_dir(&src, &work);
        let p0 = seg_path(&work, 0);
        let b = fs::read(&p0).unwrap();
        fs::write(&p0, &b[..b.len() - 5]).unwrap();
        let e = UndoLog::open(&work, small).map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert_eq!(e.path(), Some(p0.as_path()));

        // A missing middle segment.
        let work = td.path().join("gap");
        let (mut log, _) = UndoLog::open(&work, UndoOptions { segment_size: 0 }).unwrap();
        for i in 0..4 {
            write_set(&mut log, info(i), &[]);
        }
        assert_eq!(log.segment_count(), 4);
        drop(log);
        fs::remove_file(seg_path(&work, 1)).unwrap();
        let e = UndoLog::open(&work, small).map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert_eq!(e.path(), Some(seg_path(&work, 1).as_path()));
        // A swapped segment file (wrong number in its header).
        fs::rename(seg_path(&work, 0), seg_path(&work, 1)).unwrap();
        let e = UndoLog::open(&work, small).map(|_| ()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert_eq!(e.offset(), Some(u64_len(SEG_OFF_SEGNO)));
        // A record moved to another offset fails its (position-bound)
        // checksum.
        let work = td.path().join("moved");
        let (mut log, _) = UndoLog::open(&work, UndoOptions::default()).unwrap();
        write_set(&mut log, info(0), &[]);
        drop(log);
        let p = seg_path(&work, 0);
        let mut b = fs::read(&p).unwrap();
        let rec = b[64..].to_vec();
        b.extend_from_slice(&rec);
        fs::write(&p, &b).unwrap();
        let (log, r) = UndoLog::open(&work, UndoOptions::default()).unwrap();
        assert_eq!(log.sets(), 1);
        assert_eq!(r.torn_tail, Some((p.clone(), u64_len(rec.len()) + 64)));
        // A record changed behind an open log fails the read.
        drop(log);
        let log = UndoLog::open_read_only(&work).unwrap();
        flip(&p, 64 + u64_len(REC_OFF_EPOCH));
        let e = log.parts_from(None).unwrap().next().unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.offset(), Some(64));
    }

    #[test]
    fn rollover_and_prune() {
        let td = TempDir::new("undo-prune");
        let opts = UndoOptions { segment_size: 700 };
        let (mut log, _) = UndoLog::open(td.path(), opts).unwrap();
        let mut parts = Vec::new();
        for i in 0..12u64 {
            let n = usize_len(100 + 37 * (i % 4));
            let p: Vec<Part> = (0..(i % 3) + 1)
                .map(|k| {
                    (
                        vec![UndoExtent::data(k * 1000, u64_len(n))],
                        bytes(i * 10 + k, n, false),
                    )
                })
                .collect();
            let f = write_set(&mut log, info(i), &p);
            parts.push(p);
            let seg = &log.segments[log.segments.len() - 1];
            assert_eq!(f.segment, seg.segno);
            if f.rolled {
                assert_eq!(f.offset, SEG_HEADER_LEN);
            }
        }
        assert!(log.segment_count() >= 4, "{}", log.segment_count());
        for (k, s) in log.segments.iter().enumerate() {
            assert_eq!(s.len, file_len(&s.path));
            assert!(s.sets > 0);
            if k + 1 < log.segments.len() {
                // Rolled only past the size limit.
                assert!(s.len > opts.segment_size || s.sets == 1);
            }
        }
        let all: Vec<(SetInfo, Vec<Part>)> = (0..12)
            .map(|i| (info(i), parts[usize_len(i)].clone()))
            .collect();
        check_reads(&log, &all);

        let mut bytes_before = log.bytes();
        let mut segs_before = log.segment_count();
        for point in [0u64, 15, 40, 75, 100, 1000] {
            let p = log.prune_before(point).unwrap();
            assert_eq!(log.segment_count(), segs_before - usize_len(p.segments));
            assert_eq!(log.bytes(), bytes_before - p.bytes);
            assert!(log.segment_count() >= 1);
            // Everything needed for points >= `point` is kept.
            let first = usize_len((log.first_set().unwrap().first_seq - 1) / 10);
            for k in 0..12usize {
                let pa = info(u64_len(k)).prev_applied;
                if pa.is_some_and(|pa| pa >= point) {
                    assert!(k >= first, "point {point}: set {k} pruned");
                }
            }
            assert_eq!(log.floor(), Some(info(u64_len(first)).prev_applied));
            check_reads(&log, &all[first..]);
            // The first segment left holds a set ending after `point`,
            // unless only the active segment is left.
            if log.segment_count() > 1 {
                let s0 = log.segments[0].sets;
                assert!(log.sets[..s0].iter().any(|s| s.info.last_seq > point));
            }
            bytes_before = log.bytes();
            segs_before = log.segment_count();
        }
        assert_eq!(log.segment_count(), 1);
        assert_eq!(log.segment_numbers(), vec![log.sets[0].segno]);
        let kept = log.sets();
        drop(log);
        let (mut log, rec) = UndoLog::open(td.path(), opts).unwrap();
        assert_eq!((rec.sets, rec.segments, rec.torn_tail), (kept, 1, None));
        let first = usize_len((log.first_set().unwrap().first_seq - 1) / 10);
        check_reads(&log, &all[first..]);

        // Clear: a fresh empty log at segment 0 that takes any set.
        let c = log.clear().unwrap();
        assert_eq!((c.sets, c.segments), (u64_len(kept), 1));
        assert_eq!(
            (log.sets(), log.segment_numbers(), log.floor()),
            (0, vec![0], None)
        );
        let fresh = SetInfo {
            prev_applied: Some(5000),
            first_seq: 5001,
            last_seq: 5002,
            ..info(0)
        };
        write_set(&mut log, fresh, &[]);
        drop(log);
        let (log, rec) = UndoLog::open(td.path(), opts).unwrap();
        assert_eq!((rec.sets, rec.segments), (1, 1));
        assert_eq!(log.floor(), Some(Some(5000)));
    }

    /// Change the record at `off` of segment `segno` in `path` with `f`
    /// (given the whole record) and give it a valid checksum again.
    fn patch_record(path: &Path, segno: u64, off: u64, f: impl FnOnce(&mut [u8])) {
        let mut b = fs::read(path).unwrap();
        let o = usize_len(off);
        let len =
            usize_len(REC_HEADER_LEN) + usize_len(u64::from(le_u32(&b, o + REC_OFF_BODY_LEN)));
        let rec = &mut b[o..o + len];
        f(rec);
        let crc = record_crc(segno, off, rec);
        put_bytes(rec, REC_OFF_CRC, &crc.to_le_bytes());
        fs::write(path, b).unwrap();
    }

    #[test]
    fn damaged_zstd_frame_opens_and_fails_at_read() {
        let td = TempDir::new("undo-frame");
        let src = td.path().join("src");
        let (mut log, _) = UndoLog::open(&src, UndoOptions::default()).unwrap();
        let sets: Vec<(SetInfo, Vec<Part>)> = vec![
            (
                info(0),
                vec![(vec![UndoExtent::data(0, 4096)], bytes(1, 4096, true))],
            ),
            (
                info(1),
                vec![(vec![UndoExtent::data(0, 500)], bytes(2, 500, false))],
            ),
            (info(2), vec![]),
        ];
        for (i, p) in &sets {
            write_set(&mut log, *i, p);
        }
        let o0 = record_offsets(&log, 0);
        let o1 = record_offsets(&log, 1);
        assert_eq!((o0.len(), o1.len()), (1, 1));
        let (o0, o1) = (o0[0], o1[0]);
        drop(log);
        let b = fs::read(seg_path(&src, 0)).unwrap();
        let flags = |o: u64| le_u16(&b, usize_len(o) + REC_OFF_FLAGS);
        assert_ne!(flags(o0) & REC_FLAG_COMPRESSED, 0, "set 0 is compressed");
        assert_eq!(flags(o1) & REC_FLAG_COMPRESSED, 0, "set 1 is raw");
        // The record's raw_data_len field and its stored data.
        let raw_at = usize_len(REC_HEADER_LEN + EXTENT_LEN);
        let data_at = raw_at + usize_len(RAW_LEN_FIELD_LEN);

        // A damaged frame (bad zstd magic), or one that decompresses to
        // fewer bytes than recorded: both pass the checksum, so the log
        // opens, and both fail when the part is read.
        let bad_magic = |r: &mut [u8]| r[data_at] ^= 0xff;
        let longer = |r: &mut [u8]| {
            let ext = usize_len(REC_HEADER_LEN);
            let l = le_u64(r, ext + EXT_OFF_LENGTH) + 1;
            put_bytes(r, ext + EXT_OFF_LENGTH, &l.to_le_bytes());
            let n = le_u64(r, raw_at) + 1;
            put_bytes(r, raw_at, &n.to_le_bytes());
        };
        type Patch<'a> = &'a dyn Fn(&mut [u8]);
        let cases: [(&str, Patch<'_>); 2] = [("magic", &bad_magic), ("length", &longer)];
        for (name, patch) in cases {
            let work = td.path().join(name);
            copy_dir(&src, &work);
            let p = seg_path(&work, 0);
            patch_record(&p, 0, o0, patch);
            let (rw, rec) = UndoLog::open(&work, UndoOptions::default()).unwrap();
            assert_eq!((rec.torn_tail, rec.sets), (None, 3), "{name}");
            let ro = UndoLog::open_read_only(&work).unwrap();
            for log in [&rw, &ro] {
                assert_eq!(log.sets(), 3);
                // Sets after the damaged one read fine.
                let want: Vec<UndoPart> = sets[1..]
                    .iter()
                    .flat_map(|(i, p)| expected(*i, p))
                    .collect();
                assert_eq!(read_all(log, Some(10)), want, "{name}");
                let mut it = log.parts_from(None).unwrap();
                let e = it.next().unwrap().unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e}");
                assert_eq!(e.path(), Some(p.as_path()), "{name}");
                assert_eq!(e.offset(), Some(o0), "{name}: {e}");
                assert!(it.next().is_none(), "{name}");
            }
        }

        // A raw record marked compressed (stored length == raw length) is
        // caught at open without decompressing: a middle set followed by
        // a valid one is corrupt.
        let work = td.path().join("flag");
        copy_dir(&src, &work);
        let p = seg_path(&work, 0);
        patch_record(&p, 0, o1, |r| {
            let f = le_u16(r, REC_OFF_FLAGS) | REC_FLAG_COMPRESSED;
            put_bytes(r, REC_OFF_FLAGS, &f.to_le_bytes());
        });
        for ro in [true, false] {
            let e = if ro {
                UndoLog::open_read_only(&work).unwrap_err()
            } else {
                UndoLog::open(&work, UndoOptions::default())
                    .map(|_| ())
                    .unwrap_err()
            };
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
            assert_eq!(e.path(), Some(p.as_path()));
            assert_eq!(e.offset(), Some(o1), "{e}");
        }
    }

    #[test]
    fn read_only_clone_survives_append_and_prune() {
        let td = TempDir::new("undo-clone");
        let opts = UndoOptions { segment_size: 700 };
        let (mut log, _) = UndoLog::open(td.path(), opts).unwrap();
        let all: Vec<(SetInfo, Vec<Part>)> = (0..12u64)
            .map(|i| {
                let n = usize_len(100 + 97 * (i % 4));
                let p: Vec<Part> = (0..(i % 3) + 1)
                    .map(|k| {
                        (
                            vec![
                                UndoExtent::data(k * 1000, u64_len(n)),
                                UndoExtent::zeros(k * 1000 + 900, 50),
                            ],
                            bytes(i * 10 + k, n, (i + k) % 2 == 0),
                        )
                    })
                    .collect();
                (info(i), p)
            })
            .collect();
        for (i, p) in &all[..6] {
            write_set(&mut log, *i, p);
        }
        let old_segs = log.segment_numbers();
        assert!(old_segs.len() >= 3, "{old_segs:?}");
        let clone = log.read_only_clone().unwrap();
        assert!(clone.is_read_only() && !log.is_read_only());

        // The original goes on: more sets, then everything old pruned.
        for (i, p) in &all[6..] {
            write_set(&mut log, *i, p);
        }
        log.prune_before(1000).unwrap();
        assert_eq!(log.segment_count(), 1);
        for n in &old_segs {
            assert!(!seg_path(td.path(), *n).exists(), "segment {n} pruned");
        }
        let first = usize_len((log.first_set().unwrap().first_seq - 1) / 10);
        check_reads(&log, &all[first..]);

        // The clone answers as of the clone, from its own descriptors.
        assert_eq!(clone.sets(), 6);
        assert_eq!(clone.segment_numbers(), old_segs);
        assert_eq!(clone.floor(), Some(None));
        assert_eq!(clone.first_set(), Some(info(0)));
        assert_eq!(clone.last_set(), Some(info(5)));
        assert!(clone.reaches(10) && clone.reaches(50) && !clone.reaches(60));
        assert_eq!(clone.boundaries(), (1..6).map(|i| 10 * i).collect());
        check_reads(&clone, &all[..6]);
        // A clone of the clone still reads the deleted files.
        let clone2 = clone.read_only_clone().unwrap();
        assert!(clone2.is_read_only());
        check_reads(&clone2, &all[..6]);
        // Writing through it is refused.
        let mut c = clone2;
        let inv = |e: Error| assert_eq!(e.kind(), ErrorKind::InvalidInput);
        inv(c.begin_set(info(12)).map(|_| ()).unwrap_err());
        inv(c.prune_before(1000).unwrap_err());
        inv(c.clear().unwrap_err());
        // And it reads from another thread.
        let want: Vec<UndoPart> = all[..6].iter().flat_map(|(i, p)| expected(*i, p)).collect();
        let got = std::thread::spawn(move || read_all(&clone, clone.floor().unwrap()))
            .join()
            .unwrap();
        assert_eq!(got, want);
    }

    // ---- model-based property test ----

    const DISK: usize = 64 << 10;

    #[derive(Debug, Clone)]
    enum Op {
        /// Write `len` bytes at `off`: random, or compressible.
        Write {
            off: usize,
            len: usize,
            seed: u64,
            compressible: bool,
        },
        /// Zero `len` bytes at `off`.
        Zero { off: usize, len: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        let write = (0..DISK, 1usize..6000, any::<u64>(), any::<bool>()).prop_map(
            |(off, len, seed, compressible)| Op::Write {
                off,
                len: len.min(DISK - off),
                seed,
                compressible,
            },
        );
        let zero = (0..DISK, 1usize..9000).prop_map(|(off, len)| Op::Zero {
            off,
            len: len.min(DISK - off),
        });
        prop_oneof![3 => write, 1 => zero]
    }

    #[derive(Debug, Clone)]
    struct ChangeSetCase {
        ops: Vec<Op>,
        /// Split the undo extents into parts after these (mod the count).
        splits: Vec<usize>,
        /// Store an all-zero old range as data anyway.
        zeros_as_data: bool,
        reopen_after: bool,
    }

    fn change_set() -> impl Strategy<Value = ChangeSetCase> {
        (
            proptest::collection::vec(op(), 1..6),
            proptest::collection::vec(0usize..16, 0..4),
            any::<bool>(),
            proptest::bool::weighted(0.3),
        )
            .prop_map(|(ops, splits, zeros_as_data, reopen_after)| ChangeSetCase {
                ops,
                splits,
                zeros_as_data,
                reopen_after,
            })
    }

    /// Rewind `disk` with the parts from `point` on: first writer wins.
    fn rewind(log: &UndoLog, point: Option<u64>, disk: &mut [u8]) {
        let mut done = vec![false; disk.len()];
        for part in log.parts_from(point).unwrap() {
            let part = part.unwrap();
            for (e, d) in part.extent_data() {
                let off = usize_len(e.offset);
                for k in 0..usize_len(e.length) {
                    if !done[off + k] {
                        done[off + k] = true;
                        disk[off + k] = d.map_or(0, |d| d[k]);
                    }
                }
            }
        }
    }

    fn run_model(sets: &[ChangeSetCase], seg_size: u64, prune_at: usize) {
        let td = TempDir::new("undo-model");
        let dir = td.path().join("undo");
        let opts = UndoOptions {
            segment_size: seg_size,
        };
        let (mut log, _) = UndoLog::open(&dir, opts).unwrap();
        let mut model = vec![0u8; DISK];
        let mut states = Vec::new();
        for (i, cs) in sets.iter().enumerate() {
            let i = u64_len(i);
            // The undo of this set: the old contents of every range it
            // writes, from the state before it.
            let mut extents = Vec::new();
            let mut data_of = Vec::new();
            for op in &cs.ops {
                let (off, len) = match *op {
                    Op::Write { off, len, .. } | Op::Zero { off, len } => (off, len),
                };
                let old = &model[off..off + len];
                if !cs.zeros_as_data && old.iter().all(|&b| b == 0) {
                    extents.push(UndoExtent::zeros(u64_len(off), u64_len(len)));
                    data_of.push(Vec::new());
                } else {
                    extents.push(UndoExtent::data(u64_len(off), u64_len(len)));
                    data_of.push(old.to_vec());
                }
            }
            let mut cuts: Vec<usize> = cs.splits.iter().map(|s| s % (extents.len() + 1)).collect();
            cuts.push(0);
            cuts.push(extents.len());
            cuts.sort_unstable();
            cuts.dedup();
            let mut w = log.begin_set(info(i)).unwrap();
            for c in cuts.windows(2) {
                let data: Vec<u8> = data_of[c[0]..c[1]].concat();
                w.add_part(&extents[c[0]..c[1]], &data).unwrap();
            }
            w.finish().unwrap();
            states.push(model.clone());
            for op in &cs.ops {
                match *op {
                    Op::Write {
                        off,
                        len,
                        seed,
                        compressible,
                    } => {
                        model[off..off + len].copy_from_slice(&bytes(seed, len, compressible));
                    }
                    Op::Zero { off, len } => model[off..off + len].fill(0),
                }
            }
            if cs.reopen_after {
                drop(log);
                let (l, rec) = UndoLog::open(&dir, opts).unwrap();
                assert_eq!(rec.torn_tail, None);
                log = l;
            }
        }
        let check = |log: &UndoLog, from: usize| {
            assert_eq!(log.sets(), sets.len() - from);
            for (k, state) in states.iter().enumerate().skip(from) {
                let mut disk = model.clone();
                rewind(log, info(u64_len(k)).prev_applied, &mut disk);
                assert!(disk == *state, "rewind to before set {k} differs");
            }
        };
        check(&log, 0);
        let ro = UndoLog::open_read_only(&dir).unwrap();
        check(&ro, 0);
        // Prune what only older points need; later points still rewind.
        let point = info(u64_len(prune_at % sets.len())).last_seq;
        log.prune_before(point).unwrap();
        let first = usize_len((log.first_set().unwrap().first_seq - 1) / 10);
        assert!(first <= prune_at % sets.len() + 1);
        check(&log, first);
    }

    proptest! {
        // 64 cases by default; PROPTEST_CASES overrides.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64),
            ..ProptestConfig::default()
        })]

        #[test]
        fn rewind_matches_model(
            sets in proptest::collection::vec(change_set(), 1..10),
            seg_size in prop_oneof![Just(0u64), 1000u64..20_000, Just(DEFAULT_SEGMENT_SIZE)],
            prune_at in any::<usize>(),
        ) {
            run_model(&sets, seg_size, prune_at);
        }
    }
}
