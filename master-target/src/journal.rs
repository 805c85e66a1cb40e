//! The per-disk durable change-set journal.
//!
//! # Layout
//!
//! ```text
//! DIR/DISK/
//!   applied                     applied watermark (APPLIED_LEN bytes, replaced atomically)
//!   journal/
//!     00000000000000000000.seg  segment 0
//!     00000000000000000001.seg  segment 1 ... (numbers contiguous; a pruned
//!                               prefix is simply absent)
//!
//! segment file:
//! +-------------------------------- SEG_HEADER_LEN = 512 bytes ------------------------+
//! | 0   magic     [8]  "FRYJSEG1"                                                       |
//! | 8   version   u32  SEG_VERSION (1)                                                  |
//! | 12  hdr_len   u32  SEG_HEADER_LEN                                                   |
//! | 16  segno     u64  this segment's number (= the file name)                          |
//! | 24  flags     u32  bit 0 SEG_FLAG_HAS_PREV: the journal held change sets before    |
//! | 28  disk_len  u32  bytes of the disk name (1..=MAX_DISK_NAME)                       |
//! | 32  prev_last u64  last durable seq before this segment = the first record's        |
//! |                    expected prev_end_seq ("first expected seq" - 1); 0 if no prev   |
//! | 40  prev_epoch u64 epoch of that change set; 0 if no prev                           |
//! | 48  disk      [256] disk name, zero padded                                          |
//! | 304 reserved  zeros                                                                 |
//! | 508 crc32c    u32  of bytes 0..508                                                  |
//! +-------------------------------------------------------------------------------------+
//! | record: 0 magic u32 REC_MAGIC | 4 length u32 | 8 crc32c(body) u32 | 12 body        |
//! |   body = the protocol encoding of the ChangeSet message (frame kind CHANGE_SET),   |
//! |   i.e. encode_header_aad(header) ++ payload_len u32 ++ sealed payload, stored as is |
//! | record ...                                                                          |
//! +-------------------------------------------------------------------------------------+
//!
//! applied file (APPLIED_LEN = 32 bytes):
//!   0 magic [8] "FRYJAPL1" | 8 version u32 | 12 flags u32 (0) | 16 seq u64 |
//!   24 reserved u32 (0) | 28 crc32c u32 of bytes 0..28
//! ```
//!
//! All integers are little endian.
//!
//! # Sequence rules (checked by [`Journal::append`], re-checked on recovery)
//!
//! Let `last`/`epoch` be the last durable change set's `last_seq`/`epoch`.
//! * Empty journal (never held a change set): any valid change set starts it.
//! * `cs.epoch < epoch`: [`ErrorKind::InvalidInput`] (stale sender).
//! * `cs.epoch > epoch`: a new chain (a gap the sender knows of, to be
//!   filled by a resync). It must declare the replica inconsistent (kind
//!   `Resync`, or `consistent_from == 0`) and must
//!   keep the (per-host, monotonic) sequence space increasing:
//!   `cs.first_seq > last`; its `prev_end_seq` need not match. Otherwise
//!   [`ErrorKind::InvalidInput`].
//! * same epoch: `cs.first_seq <= last` is a [`ErrorKind::Duplicate`]
//!   (nothing written; ack again with `last`); otherwise
//!   `cs.prev_end_seq != last` is a [`ErrorKind::Gap`] carrying
//!   expected = `last`, received = `cs.prev_end_seq` (nothing written; the
//!   caller requests a resync); otherwise the set is appended.
//!
//! So sequences in the journal strictly increase, which makes duplicate
//! detection, [`Journal::iter_from`] and [`Journal::truncate_before`]
//! well defined across epochs.
//!
//! # Crash safety
//!
//! * `append` writes one record at the end of the active segment with one
//!   positional write and `fdatasync`s it before returning `Ok`; only then may
//!   the caller ack. Records are appended strictly one at a time, so at any
//!   crash only the last record of the last segment can be incomplete.
//! * A new segment is written as `SEGNO.seg.tmp`, synced, renamed to
//!   `SEGNO.seg` and the directory synced, so a segment file always has a
//!   complete header; a new segment is created only after the previous one's
//!   last record is durable, and only when the active segment holds at least
//!   one record (non-active segments are never empty).
//! * Recovery (`open`) validates every header and record (magic, length,
//!   crc32c, decoding, disk name, sequence rules, header/segment chaining,
//!   contiguous segment numbers). An invalid record in the last segment with
//!   no valid record anywhere after it is a torn tail: the file is cut there
//!   (`ftruncate` + `fsync`) and the cut is reported in [`Recovery`]. Every
//!   other defect is [`ErrorKind::Corrupt`] with path and offset; nothing is
//!   dropped silently. Limitation: damage to the very last record of the
//!   last segment after it was acknowledged is indistinguishable from a torn
//!   write; it is cut and reported (`torn_tail`), never silently.
//! * The applied watermark is replaced atomically (temp + fsync + rename +
//!   fsync dir); it is never above the durable sequence, and recovery checks
//!   that. A crash between applying and recording the watermark makes the
//!   applier replay change sets it already applied; appliers are idempotent.
//! * Pruning deletes whole non-active segments oldest first, so a crash
//!   mid-prune leaves a contiguous suffix whose first header carries the
//!   chain state.
//! * After a failed write or sync (`fsync` error semantics are unreliable)
//!   the journal refuses further appends; reopen it to recover.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_protocol::message::{self, encode_header_aad, ChangeKind, ChangeSet, ChangeSetHeader};
use ferry_protocol::message::{Message, TAG_LEN};

use crate::error::{Error, ErrorKind, Result};
use crate::segfile::{
    create_segment_file, le_u32, le_u64, open_segment_file, parse_segment_file_name, read_vec_at,
    scan_for_magic, segment_file_name, segment_gap, sync_dir, truncate_synced, u64_len, usize_len,
    SegmentOps,
};

/// Segment header magic.
pub const SEG_MAGIC: [u8; 8] = *b"FRYJSEG1";
/// Segment format version.
pub const SEG_VERSION: u32 = 1;
/// Segment header size in bytes.
pub const SEG_HEADER_LEN: u64 = 512;
/// Segment flag: the journal held change sets before this segment.
pub const SEG_FLAG_HAS_PREV: u32 = 1;
/// Longest disk name in bytes (also a path component).
pub const MAX_DISK_NAME: usize = 255;
/// Offsets of the segment header fields.
pub const SEG_OFF_MAGIC: usize = 0;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_VERSION: usize = 8;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_HEADER_LEN: usize = 12;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_SEGNO: usize = 16;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_FLAGS: usize = 24;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_DISK_LEN: usize = 28;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_PREV_LAST: usize = 32;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_PREV_EPOCH: usize = 40;
/// See [`SEG_OFF_MAGIC`].
pub const SEG_OFF_DISK: usize = 48;
/// Size of the disk-name field.
pub const SEG_DISK_FIELD: usize = 256;
/// See [`SEG_OFF_MAGIC`]: crc32c of bytes `0..SEG_OFF_CRC`.
pub const SEG_OFF_CRC: usize = 508;

/// Record magic (`"FJRC"` little endian).
pub const REC_MAGIC: u32 = u32::from_le_bytes(*b"FJRC");
/// Record header size: magic, length, crc32c.
pub const REC_HEADER_LEN: u64 = 12;
/// Offsets in a record header.
pub const REC_OFF_MAGIC: usize = 0;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_LEN: usize = 4;
/// See [`REC_OFF_MAGIC`].
pub const REC_OFF_CRC: usize = 8;

/// Applied-watermark file magic.
pub const APPLIED_MAGIC: [u8; 8] = *b"FRYJAPL1";
/// Applied-watermark file version.
pub const APPLIED_VERSION: u32 = 1;
/// Applied-watermark file size.
pub const APPLIED_LEN: usize = 32;
/// Offsets in the applied file.
pub const APPLIED_OFF_VERSION: usize = 8;
/// See [`APPLIED_OFF_VERSION`].
pub const APPLIED_OFF_FLAGS: usize = 12;
/// See [`APPLIED_OFF_VERSION`].
pub const APPLIED_OFF_SEQ: usize = 16;
/// See [`APPLIED_OFF_VERSION`]: crc32c of bytes `0..APPLIED_OFF_CRC`.
pub const APPLIED_OFF_CRC: usize = 28;

/// Default segment size limit: 256 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 256 << 20;

/// A disk's journal directory (under the disk directory).
pub const JOURNAL_DIR: &str = "journal";
const APPLIED_FILE: &str = "applied";
const APPLIED_TMP: &str = "applied.tmp";
const SEG_EXT: &str = ".seg";
const TMP_EXT: &str = ".tmp";
const SEGNO_DIGITS: usize = 20;

/// Journal tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalOptions {
    /// Roll to a new segment when a record would push the active segment
    /// past this many bytes (a single record larger than this still goes in
    /// a segment of its own).
    pub segment_size: u64,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_size: DEFAULT_SEGMENT_SIZE,
        }
    }
}

/// What [`Journal::open`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Last durable sequence (`None`: the journal never held a change set).
    pub last_seq: Option<u64>,
    /// Epoch of the last durable change set.
    pub epoch: Option<u64>,
    /// Change sets present in the journal (after pruning).
    pub change_sets: u64,
    /// Segment files present.
    pub segments: u64,
    /// Where a torn tail was cut (path, offset), if any.
    pub torn_tail: Option<(PathBuf, u64)>,
    /// Bytes cut from the torn tail (0 if none).
    pub truncated_bytes: u64,
    /// Leftover temporary files removed (an interrupted segment creation or
    /// watermark update).
    pub removed_temp_files: Vec<PathBuf>,
    /// The applied watermark.
    pub applied: Option<u64>,
}

/// A successful append: the change set is durable and may be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Segment that holds the record.
    pub segment: u64,
    /// Byte offset of the record in the segment.
    pub offset: u64,
    /// Record size in bytes (header + body).
    pub bytes: u64,
    /// The change set's last sequence: the new last durable sequence.
    pub last_seq: u64,
    /// The change set's epoch.
    pub epoch: u64,
    /// A new segment was started for this record.
    pub rolled: bool,
}

/// What [`Journal::truncate_before`] removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    /// Segment files deleted.
    pub segments: u64,
    /// Change sets deleted.
    pub change_sets: u64,
    /// Bytes deleted.
    pub bytes: u64,
}

/// Last durable change set: (`last_seq`, `epoch`).
type ChainState = Option<(u64, u64)>;

#[derive(Debug, Clone, Copy)]
struct RecIdx {
    offset: u64,
    body_len: u32,
    last_seq: u64,
}

#[derive(Debug)]
struct Segment {
    segno: u64,
    path: PathBuf,
    len: u64,
    records: Vec<RecIdx>,
}

/// The durable journal of one disk. See the module docs.
#[derive(Debug)]
pub struct Journal {
    disk: String,
    disk_dir: PathBuf,
    dir: PathBuf,
    opts: JournalOptions,
    segments: Vec<Segment>,
    active: File,
    state: ChainState,
    applied: Option<u64>,
    change_sets: u64,
    poisoned: bool,
}

/// Check that `disk` can name a disk (and a directory).
pub fn validate_disk_name(disk: &str) -> Result<()> {
    let bad = disk.is_empty()
        || disk.len() > MAX_DISK_NAME
        || disk == "."
        || disk == ".."
        || disk.bytes().any(|b| b == b'/' || b == 0);
    if bad {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "open",
            format!(
                "invalid disk name {disk:?} (1..={MAX_DISK_NAME} bytes, no '/', NUL, '.', '..')"
            ),
        ));
    }
    Ok(())
}

/// Apply the sequence rules (module docs) to `h` after `state`.
fn check_next(state: ChainState, h: &ChangeSetHeader, op: &'static str) -> Result<()> {
    let Some((last, epoch)) = state else {
        return Ok(());
    };
    if h.epoch < epoch {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            op,
            format!("stale epoch {} (journal is at epoch {epoch})", h.epoch),
        ));
    }
    if h.epoch > epoch {
        if h.kind != ChangeKind::Resync && h.consistent_from != 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                format!(
                    "epoch {} > {epoch} must start with a change set that declares the \
                     replica inconsistent (a Resync set or consistent_from 0)",
                    h.epoch
                ),
            ));
        }
        if h.first_seq <= last {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                op,
                format!(
                    "new epoch {} starts at seq {}, not after the last durable seq {last}",
                    h.epoch, h.first_seq
                ),
            )
            .with_seqs(Some(last), Some(h.first_seq)));
        }
        return Ok(());
    }
    if h.first_seq <= last {
        return Err(Error::new(
            ErrorKind::Duplicate,
            op,
            format!(
                "change set [{}, {}] starts at or before the last durable seq {last}",
                h.first_seq, h.last_seq
            ),
        )
        .with_seqs(Some(last), Some(h.first_seq)));
    }
    if h.prev_end_seq != last {
        return Err(Error::new(
            ErrorKind::Gap,
            op,
            format!(
                "change set [{}, {}] follows seq {}, the last durable seq is {last}",
                h.first_seq, h.last_seq, h.prev_end_seq
            ),
        )
        .with_seqs(Some(last), Some(h.prev_end_seq)));
    }
    Ok(())
}

/// The protocol encoding of `cs` as a `CHANGE_SET` message body, without
/// copying it into a [`Message`]. Identical to
/// `Message::ChangeSet(cs.clone()).encode()`.
pub fn encode_change_set(cs: &ChangeSet) -> Result<Vec<u8>> {
    let mut out = encode_change_set_head(cs)?;
    out.reserve_exact(cs.payload.len());
    out.extend_from_slice(&cs.payload);
    Ok(out)
}

/// [`encode_change_set`] without the payload bytes (header, payload length).
fn encode_change_set_head(cs: &ChangeSet) -> Result<Vec<u8>> {
    let inval = |m: String| Error::new(ErrorKind::InvalidInput, "encode", m);
    let head = encode_header_aad(&cs.header).map_err(|e| inval(e.to_string()))?;
    let want = cs.header.stored_len().checked_add(u64_len(TAG_LEN));
    if want != Some(u64_len(cs.payload.len())) {
        return Err(inval(format!(
            "payload {} bytes, header says {want:?} (chunks + tag)",
            cs.payload.len()
        )));
    }
    let n = u32::try_from(cs.payload.len()).map_err(|_| inval("payload exceeds u32".into()))?;
    let mut out = Vec::with_capacity(head.len() + 4);
    out.extend_from_slice(&head);
    out.extend_from_slice(&n.to_le_bytes());
    Ok(out)
}

fn decode_change_set(body: &[u8]) -> std::result::Result<ChangeSet, String> {
    match Message::decode(message::kind::CHANGE_SET, body) {
        Ok(Message::ChangeSet(cs)) => Ok(cs),
        Ok(_) => Err("not a change set".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A record's bytes before the sealed payload: magic, body length, crc32c
/// of the whole body (computed over the encoded head and the payload in
/// place), then the body's head (the change set's encoding up to its
/// payload). Returns it with the body length.
fn record_head(cs: &ChangeSet) -> Result<(Vec<u8>, u32)> {
    let body = encode_change_set_head(cs)?;
    let len = body
        .len()
        .checked_add(cs.payload.len())
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidInput,
                "append",
                format!(
                    "record body exceeds u32 ({} payload bytes)",
                    cs.payload.len()
                ),
            )
        })?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&body), &cs.payload);
    let mut rec = Vec::with_capacity(body.len() + 12);
    rec.extend_from_slice(&REC_MAGIC.to_le_bytes());
    rec.extend_from_slice(&len.to_le_bytes());
    rec.extend_from_slice(&crc.to_le_bytes());
    rec.extend_from_slice(&body);
    Ok((rec, len))
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SegHeader {
    segno: u64,
    prev: ChainState,
    disk: String,
}

fn encode_seg_header(h: &SegHeader) -> Result<Vec<u8>> {
    let mut b = vec![0u8; usize_len(SEG_HEADER_LEN)];
    b[SEG_OFF_MAGIC..SEG_OFF_MAGIC + 8].copy_from_slice(&SEG_MAGIC);
    b[SEG_OFF_VERSION..SEG_OFF_VERSION + 4].copy_from_slice(&SEG_VERSION.to_le_bytes());
    let hl = u32::try_from(SEG_HEADER_LEN).unwrap_or(u32::MAX);
    b[SEG_OFF_HEADER_LEN..SEG_OFF_HEADER_LEN + 4].copy_from_slice(&hl.to_le_bytes());
    b[SEG_OFF_SEGNO..SEG_OFF_SEGNO + 8].copy_from_slice(&h.segno.to_le_bytes());
    let (flags, last, epoch) = match h.prev {
        Some((l, e)) => (SEG_FLAG_HAS_PREV, l, e),
        None => (0, 0, 0),
    };
    b[SEG_OFF_FLAGS..SEG_OFF_FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
    validate_disk_name(&h.disk)?;
    let dl = u32::try_from(h.disk.len()).unwrap_or(u32::MAX);
    b[SEG_OFF_DISK_LEN..SEG_OFF_DISK_LEN + 4].copy_from_slice(&dl.to_le_bytes());
    b[SEG_OFF_PREV_LAST..SEG_OFF_PREV_LAST + 8].copy_from_slice(&last.to_le_bytes());
    b[SEG_OFF_PREV_EPOCH..SEG_OFF_PREV_EPOCH + 8].copy_from_slice(&epoch.to_le_bytes());
    b[SEG_OFF_DISK..SEG_OFF_DISK + h.disk.len()].copy_from_slice(h.disk.as_bytes());
    let crc = crc32c::crc32c(&b[..SEG_OFF_CRC]);
    b[SEG_OFF_CRC..SEG_OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

fn decode_seg_header(b: &[u8], path: &Path) -> Result<SegHeader> {
    let bad = |off: usize, m: String| Error::corrupt("open", path, u64_len(off), m);
    if b.len() < usize_len(SEG_HEADER_LEN) {
        return Err(bad(
            0,
            format!("segment header truncated ({} bytes)", b.len()),
        ));
    }
    if b[SEG_OFF_MAGIC..SEG_OFF_MAGIC + 8] != SEG_MAGIC {
        return Err(bad(SEG_OFF_MAGIC, "bad segment magic".into()));
    }
    let crc = le_u32(b, SEG_OFF_CRC);
    if crc != crc32c::crc32c(&b[..SEG_OFF_CRC]) {
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
    let flags = le_u32(b, SEG_OFF_FLAGS);
    if flags & !SEG_FLAG_HAS_PREV != 0 {
        return Err(bad(SEG_OFF_FLAGS, format!("unknown flags {flags:#x}")));
    }
    let dl = usize_len(u64::from(le_u32(b, SEG_OFF_DISK_LEN)));
    if dl == 0 || dl > MAX_DISK_NAME {
        return Err(bad(SEG_OFF_DISK_LEN, format!("disk name length {dl}")));
    }
    let disk = std::str::from_utf8(&b[SEG_OFF_DISK..SEG_OFF_DISK + dl])
        .map_err(|_| bad(SEG_OFF_DISK, "disk name not UTF-8".into()))?
        .to_string();
    let prev = (flags & SEG_FLAG_HAS_PREV != 0)
        .then(|| (le_u64(b, SEG_OFF_PREV_LAST), le_u64(b, SEG_OFF_PREV_EPOCH)));
    Ok(SegHeader {
        segno: le_u64(b, SEG_OFF_SEGNO),
        prev,
        disk,
    })
}

/// The file name of segment `segno`.
fn seg_name(segno: u64) -> String {
    segment_file_name(segno, SEG_EXT, SEGNO_DIGITS)
}

/// Outcome of parsing one record.
enum RecParse {
    Ok(RecIdx, Box<ChangeSet>),
    Bad(String),
}

/// Parse the record at `off` of a file of `file_len` bytes. I/O errors are
/// errors; every format defect is `RecParse::Bad`.
fn parse_record(
    file: &File,
    path: &Path,
    off: u64,
    file_len: u64,
    op: &'static str,
) -> Result<RecParse> {
    let avail = file_len.saturating_sub(off);
    if avail < REC_HEADER_LEN {
        return Ok(RecParse::Bad(format!(
            "record header cut short ({avail} bytes)"
        )));
    }
    let h = read_vec_at(file, path, off, usize_len(REC_HEADER_LEN), op)?;
    if le_u32(&h, REC_OFF_MAGIC) != REC_MAGIC {
        return Ok(RecParse::Bad("bad record magic".into()));
    }
    let len = le_u32(&h, REC_OFF_LEN);
    if u64::from(len) > avail - REC_HEADER_LEN {
        return Ok(RecParse::Bad(format!(
            "record length {len} beyond end of file ({} bytes left)",
            avail - REC_HEADER_LEN
        )));
    }
    // Allocation bounded by the file's actual length (checked above).
    let body = read_vec_at(
        file,
        path,
        off + REC_HEADER_LEN,
        usize_len(u64::from(len)),
        op,
    )?;
    if crc32c::crc32c(&body) != le_u32(&h, REC_OFF_CRC) {
        return Ok(RecParse::Bad("record checksum mismatch".into()));
    }
    match decode_change_set(&body) {
        Ok(cs) => Ok(RecParse::Ok(
            RecIdx {
                offset: off,
                body_len: len,
                last_seq: cs.header.last_seq,
            },
            Box::new(cs),
        )),
        Err(m) => Ok(RecParse::Bad(format!("record does not decode: {m}"))),
    }
}

/// Is there any valid record starting in `(from, file_len)`? Scans for the
/// record magic in bounded windows and fully validates each candidate.
fn valid_record_after(file: &File, path: &Path, from: u64, file_len: u64) -> Result<Option<u64>> {
    let valid = |cand: u64, _: &[u8]| -> Result<Option<u64>> {
        let rec = parse_record(file, path, cand, file_len, "open")?;
        Ok(matches!(rec, RecParse::Ok(..)).then_some(cand))
    };
    scan_for_magic(file, path, from, file_len, REC_MAGIC, REC_HEADER_LEN, valid)
}

impl Journal {
    /// Open (creating if needed) the journal of `disk` under `dir` with
    /// default options, recovering from any crash. See [`Recovery`].
    pub fn open(dir: &Path, disk: &str) -> Result<(Journal, Recovery)> {
        Self::open_with(dir, disk, JournalOptions::default())
    }

    /// [`Journal::open`] with explicit options.
    pub fn open_with(dir: &Path, disk: &str, opts: JournalOptions) -> Result<(Journal, Recovery)> {
        validate_disk_name(disk)?;
        if opts.segment_size == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "open",
                "segment size must be positive",
            ));
        }
        let disk_dir = dir.join(disk);
        let jdir = disk_dir.join(JOURNAL_DIR);
        let existed = jdir.is_dir();
        fs::create_dir_all(&jdir).map_err(|e| Error::io("create directory", &jdir, e))?;
        if !existed {
            sync_dir(&disk_dir)?;
            sync_dir(dir)?;
        }

        let mut removed = Vec::new();
        let mut segnos = Vec::new();
        let entries = fs::read_dir(&jdir).map_err(|e| Error::io("list directory", &jdir, e))?;
        for ent in entries {
            let ent = ent.map_err(|e| Error::io("list directory", &jdir, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(TMP_EXT) {
                let p = ent.path();
                fs::remove_file(&p).map_err(|e| Error::io("remove temp file", &p, e))?;
                removed.push(p);
            } else if let Some(n) = parse_segment_file_name(name, SEG_EXT, SEGNO_DIGITS) {
                segnos.push(n);
            }
        }
        let atmp = disk_dir.join(APPLIED_TMP);
        if atmp.exists() {
            fs::remove_file(&atmp).map_err(|e| Error::io("remove temp file", &atmp, e))?;
            removed.push(atmp);
            sync_dir(&disk_dir)?;
        }
        if !removed.is_empty() {
            sync_dir(&jdir)?;
        }
        segnos.sort_unstable();
        if let Some((a, b)) = segment_gap(&segnos) {
            let missing = jdir.join(seg_name(a + 1));
            return Err(Error::corrupt(
                "open",
                &missing,
                0,
                format!("segment {} missing between {a} and {b}", a + 1),
            ));
        }

        let mut segments = Vec::new();
        let mut state: ChainState = None;
        let mut change_sets = 0u64;
        let mut torn_tail = None;
        let mut truncated_bytes = 0;
        let nseg = segnos.len();
        for (i, &segno) in segnos.iter().enumerate() {
            let path = jdir.join(seg_name(segno));
            let is_last = i + 1 == nseg;
            let (file, file_len, hb) =
                open_segment_file(&path, is_last, SEG_HEADER_LEN, &SEGMENT_OPS)?;
            let hdr = decode_seg_header(&hb, &path)?;
            if hdr.segno != segno {
                return Err(Error::corrupt(
                    "open",
                    &path,
                    u64_len(SEG_OFF_SEGNO),
                    format!("header says segment {}, file name {segno}", hdr.segno),
                ));
            }
            if hdr.disk != disk {
                return Err(Error::corrupt(
                    "open",
                    &path,
                    u64_len(SEG_OFF_DISK),
                    format!("segment of disk {:?}, expected {disk:?}", hdr.disk),
                ));
            }
            if i == 0 {
                state = hdr.prev;
            } else if hdr.prev != state {
                return Err(Error::corrupt(
                    "open",
                    &path,
                    u64_len(SEG_OFF_PREV_LAST),
                    format!(
                        "segment starts after {:?}, previous segment ends at {state:?}",
                        hdr.prev
                    ),
                ));
            }
            let mut records = Vec::new();
            let mut off = SEG_HEADER_LEN;
            while off < file_len {
                match parse_record(&file, &path, off, file_len, "open")? {
                    RecParse::Ok(idx, cs) => {
                        if cs.header.disk != disk {
                            return Err(Error::corrupt(
                                "open",
                                &path,
                                off,
                                format!("record of disk {:?}", cs.header.disk),
                            ));
                        }
                        if let Err(e) = check_next(state, &cs.header, "open") {
                            return Err(Error::corrupt(
                                "open",
                                &path,
                                off,
                                format!("sequence chain broken: {}", e.detail()),
                            ));
                        }
                        state = Some((cs.header.last_seq, cs.header.epoch));
                        off += REC_HEADER_LEN + u64::from(idx.body_len);
                        records.push(idx);
                        change_sets += 1;
                    }
                    RecParse::Bad(why) => {
                        if !is_last {
                            return Err(Error::corrupt("open", &path, off, why));
                        }
                        if let Some(at) = valid_record_after(&file, &path, off, file_len)? {
                            return Err(Error::corrupt(
                                "open",
                                &path,
                                off,
                                format!("{why}; a valid record follows at offset {at}"),
                            ));
                        }
                        // Torn tail: cut it.
                        truncate_synced(&file, &path, off, "truncate torn tail")?;
                        truncated_bytes = file_len - off;
                        torn_tail = Some((path.clone(), off));
                        break;
                    }
                }
            }
            segments.push(Segment {
                segno,
                path,
                len: off,
                records,
            });
        }

        let applied = read_applied(&disk_dir)?;
        if let Some(a) = applied {
            let ok = matches!(state, Some((last, _)) if a <= last);
            if !ok {
                return Err(Error::corrupt(
                    "open",
                    &disk_dir.join(APPLIED_FILE),
                    u64_len(APPLIED_OFF_SEQ),
                    format!("applied watermark {a} beyond the durable journal ({state:?})"),
                ));
            }
        }

        let active = if segments.is_empty() {
            let (seg, file) = create_segment(&jdir, disk, 0, None)?;
            segments.push(seg);
            file
        } else {
            let p = &segments[segments.len() - 1].path;
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| Error::io("open segment", p, e))?
        };

        let recovery = Recovery {
            last_seq: state.map(|s| s.0),
            epoch: state.map(|s| s.1),
            change_sets,
            segments: u64_len(segments.len()),
            torn_tail,
            truncated_bytes,
            removed_temp_files: removed,
            applied,
        };
        Ok((
            Journal {
                disk: disk.to_string(),
                disk_dir,
                dir: jdir,
                opts,
                segments,
                active,
                state,
                applied,
                change_sets,
                poisoned: false,
            },
            recovery,
        ))
    }

    /// The disk name.
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// Last durable sequence (`None` for a journal that never held a set).
    pub fn last_seq(&self) -> Option<u64> {
        self.state.map(|s| s.0)
    }

    /// Epoch of the last durable change set.
    pub fn epoch(&self) -> Option<u64> {
        self.state.map(|s| s.1)
    }

    /// Change sets held (after pruning).
    pub fn change_sets(&self) -> u64 {
        self.change_sets
    }

    /// Segment files held.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Numbers of the segment files held, oldest first.
    pub fn segment_numbers(&self) -> Vec<u64> {
        self.segments.iter().map(|s| s.segno).collect()
    }

    /// Check `cs` against the sequence rules without writing anything.
    pub fn check(&self, cs: &ChangeSet) -> Result<()> {
        if cs.header.disk != self.disk {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "append",
                format!(
                    "change set of disk {:?} sent to journal of {:?}",
                    cs.header.disk, self.disk
                ),
            ));
        }
        check_next(self.state, &cs.header, "append")
    }

    /// Append `cs` durably. `Ok` means the record is written and
    /// `fdatasync`ed: the ack may be sent. Duplicates, gaps and invalid sets
    /// are refused before anything is written (see the module docs).
    pub fn append(&mut self, cs: &ChangeSet) -> Result<Appended> {
        if self.poisoned {
            return Err(Error::new(
                ErrorKind::Io,
                "append",
                "an earlier write or sync failed; reopen the journal",
            )
            .at_path(&self.dir));
        }
        self.check(cs)?;
        // The record is written as two pieces, its head (record header and
        // the change set up to its payload) and the sealed payload as the
        // caller holds it: no copy of the payload is made.
        let (head, body_len) = record_head(cs)?;
        let rec_len = u64_len(head.len()) + u64_len(cs.payload.len());

        let mut rolled = false;
        let cur = &self.segments[self.segments.len() - 1];
        if !cur.records.is_empty() && cur.len.saturating_add(rec_len) > self.opts.segment_size {
            let segno = cur.segno + 1;
            match create_segment(&self.dir, &self.disk, segno, self.state) {
                Ok((seg, file)) => {
                    self.segments.push(seg);
                    self.active = file;
                    rolled = true;
                }
                Err(e) => {
                    self.poisoned = true;
                    return Err(e);
                }
            }
        }
        let last = self.segments.len() - 1;
        let seg = &mut self.segments[last];
        let off = seg.len;
        let res = self
            .active
            .write_all_at(&head, off)
            .and_then(|()| {
                self.active
                    .write_all_at(&cs.payload, off + u64_len(head.len()))
            })
            .map_err(|e| Error::io("append write", &seg.path, e).at_offset(off))
            .and_then(|()| {
                self.active
                    .sync_data()
                    .map_err(|e| Error::io("append sync", &seg.path, e).at_offset(off))
            });
        if let Err(e) = res {
            self.poisoned = true;
            return Err(e);
        }
        seg.len = off + rec_len;
        seg.records.push(RecIdx {
            offset: off,
            body_len,
            last_seq: cs.header.last_seq,
        });
        self.state = Some((cs.header.last_seq, cs.header.epoch));
        self.change_sets += 1;
        Ok(Appended {
            segment: seg.segno,
            offset: off,
            bytes: rec_len,
            last_seq: cs.header.last_seq,
            epoch: cs.header.epoch,
            rolled,
        })
    }

    /// Durable change sets in order, starting with the first whose
    /// `last_seq >= seq` (from the oldest held if pruning removed earlier
    /// ones). Each record is re-read and re-verified; a defect ends the
    /// iteration with an error.
    pub fn iter_from(&self, seq: u64) -> Iter<'_> {
        let mut si = 0;
        let mut ri = 0;
        'find: while si < self.segments.len() {
            let recs = &self.segments[si].records;
            if recs.last().is_some_and(|r| r.last_seq >= seq) {
                ri = recs.partition_point(|r| r.last_seq < seq);
                break 'find;
            }
            si += 1;
        }
        Iter {
            journal: self,
            seg: si,
            rec: ri,
            file: None,
            done: false,
        }
    }

    /// Bytes the journal's segment files hold.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Change sets held beyond the applied watermark: (sets, stored bytes).
    pub fn unapplied(&self) -> (u64, u64) {
        let applied = self.applied;
        let mut n = 0u64;
        let mut bytes = 0u64;
        for r in self.segments.iter().flat_map(|s| s.records.iter()) {
            if applied.is_none_or(|a| r.last_seq > a) {
                n += 1;
                bytes += u64::from(r.body_len);
            }
        }
        (n, bytes)
    }

    /// The last durable change set, read back (`None`: empty journal).
    pub fn last_change_set(&self) -> Option<Result<ChangeSet>> {
        self.iter_from(self.last_seq()?).next()
    }

    /// The applied watermark: every change set with `last_seq <=` it has
    /// been applied to the replica.
    pub fn applied(&self) -> Option<u64> {
        self.applied
    }

    /// Record durably (temp + fsync + rename + fsync dir) that change sets
    /// up to `seq` are applied. `seq` must not exceed the last durable
    /// sequence nor go below the current watermark.
    pub fn set_applied(&mut self, seq: u64) -> Result<()> {
        let inval = |m: String| Error::new(ErrorKind::InvalidInput, "set_applied", m);
        match self.state {
            Some((last, _)) if seq <= last => {}
            s => {
                return Err(inval(format!(
                    "watermark {seq} beyond the last durable seq {:?}",
                    s.map(|s| s.0)
                )))
            }
        }
        if let Some(a) = self.applied {
            if seq < a {
                return Err(inval(format!("watermark {seq} below current {a}")));
            }
            if seq == a {
                return Ok(());
            }
        }
        write_applied(&self.disk_dir, seq)?;
        self.applied = Some(seq);
        Ok(())
    }

    /// Delete whole non-active segments whose change sets all have
    /// `last_seq <= min(seq, applied)`. Never touches the active segment or
    /// unapplied data.
    pub fn truncate_before(&mut self, seq: u64) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        let Some(applied) = self.applied else {
            return Ok(pruned);
        };
        let limit = seq.min(applied);
        while self.segments.len() > 1 {
            let s = &self.segments[0];
            let droppable = s.records.last().is_none_or(|r| r.last_seq <= limit);
            if !droppable {
                break;
            }
            fs::remove_file(&s.path).map_err(|e| Error::io("remove segment", &s.path, e))?;
            pruned.segments += 1;
            pruned.change_sets += u64_len(s.records.len());
            pruned.bytes += s.len;
            self.change_sets -= u64_len(s.records.len());
            self.segments.remove(0);
        }
        if pruned.segments > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(pruned)
    }
}

/// The operation names of the segment files' errors.
const SEGMENT_OPS: SegmentOps = SegmentOps {
    create: "create segment",
    write_header: "write segment header",
    rename: "rename segment",
    open: "open segment",
    stat: "stat segment",
};

fn create_segment(dir: &Path, disk: &str, segno: u64, prev: ChainState) -> Result<(Segment, File)> {
    let hdr = encode_seg_header(&SegHeader {
        segno,
        prev,
        disk: disk.to_string(),
    })?;
    let (path, file) = create_segment_file(dir, &seg_name(segno), TMP_EXT, &hdr, &SEGMENT_OPS)?;
    Ok((
        Segment {
            segno,
            path,
            len: SEG_HEADER_LEN,
            records: Vec::new(),
        },
        file,
    ))
}

fn read_applied(disk_dir: &Path) -> Result<Option<u64>> {
    let path = disk_dir.join(APPLIED_FILE);
    let b = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read applied watermark", &path, e)),
    };
    let bad = |off: usize, m: &str| Error::corrupt("open", &path, u64_len(off), m);
    if b.len() != APPLIED_LEN {
        return Err(bad(0, "applied watermark file has the wrong size"));
    }
    if b[..8] != APPLIED_MAGIC {
        return Err(bad(0, "bad applied watermark magic"));
    }
    if le_u32(&b, APPLIED_OFF_CRC) != crc32c::crc32c(&b[..APPLIED_OFF_CRC]) {
        return Err(bad(APPLIED_OFF_CRC, "applied watermark checksum mismatch"));
    }
    if le_u32(&b, APPLIED_OFF_VERSION) != APPLIED_VERSION {
        return Err(bad(
            APPLIED_OFF_VERSION,
            "unsupported applied watermark version",
        ));
    }
    if le_u32(&b, APPLIED_OFF_FLAGS) != 0 {
        return Err(bad(APPLIED_OFF_FLAGS, "unknown applied watermark flags"));
    }
    Ok(Some(le_u64(&b, APPLIED_OFF_SEQ)))
}

fn write_applied(disk_dir: &Path, seq: u64) -> Result<()> {
    let mut b = [0u8; APPLIED_LEN];
    b[..8].copy_from_slice(&APPLIED_MAGIC);
    b[APPLIED_OFF_VERSION..APPLIED_OFF_VERSION + 4].copy_from_slice(&APPLIED_VERSION.to_le_bytes());
    b[APPLIED_OFF_SEQ..APPLIED_OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&b[..APPLIED_OFF_CRC]);
    b[APPLIED_OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
    let tmp = disk_dir.join(APPLIED_TMP);
    let path = disk_dir.join(APPLIED_FILE);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io("write applied watermark", &tmp, e))?;
    f.write_all_at(&b, 0)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write applied watermark", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io("rename applied watermark", &path, e))?;
    sync_dir(disk_dir)
}

/// Iterator over durable change sets; see [`Journal::iter_from`].
#[derive(Debug)]
pub struct Iter<'a> {
    journal: &'a Journal,
    seg: usize,
    rec: usize,
    file: Option<File>,
    done: bool,
}

impl Iter<'_> {
    fn read_next(&mut self) -> Option<Result<ChangeSet>> {
        loop {
            let seg = self.journal.segments.get(self.seg)?;
            let Some(idx) = seg.records.get(self.rec) else {
                self.seg += 1;
                self.rec = 0;
                self.file = None;
                continue;
            };
            if self.file.is_none() {
                match File::open(&seg.path) {
                    Ok(f) => self.file = Some(f),
                    Err(e) => return Some(Err(Error::io("read", &seg.path, e))),
                }
            }
            let file = self.file.as_ref()?;
            self.rec += 1;
            let end = idx.offset + REC_HEADER_LEN + u64::from(idx.body_len);
            return Some(
                match parse_record(file, &seg.path, idx.offset, end, "read") {
                    Ok(RecParse::Ok(got, cs)) if got.body_len == idx.body_len => Ok(*cs),
                    Ok(RecParse::Ok(..)) => Err(Error::corrupt(
                        "read",
                        &seg.path,
                        idx.offset,
                        "record length changed",
                    )),
                    Ok(RecParse::Bad(why)) => {
                        Err(Error::corrupt("read", &seg.path, idx.offset, why))
                    }
                    Err(e) => Err(e),
                },
            );
        }
    }
}

impl Iterator for Iter<'_> {
    type Item = Result<ChangeSet>;

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
mod tests;
