//! Reader and replay oracle for logs of Linux's `dm-log-writes` target.
//!
//! In the real-kernel VM tests the protected volume's writes pass through
//! `dm-log-writes`, which records every write that reaches the lower device,
//! in the order it is logged, on a separate log device. After the VM exits
//! the test reads that log (a plain file on the host) with [`Log::open`] and
//! asks, with [`matching_prefixes`], at which instants of the log the lower
//! device held exactly the content of a recovery point exported by ferry:
//! the point is crash consistent when some prefix of the log gives it.
//!
//! # Log format
//!
//! Verified against the kernel's `drivers/md/dm-log-writes.c` (the format
//! comment above `struct log_write_super`, `write_metadata`,
//! `log_one_block`, `log_super`, `log_writes_kthread`, `log_writes_ctr`,
//! `log_writes_map`, `normal_end_io`, `log_mark`, `log_writes_dtr`) and
//! against the reader xfstests uses, `src/log-writes/log-writes.c`
//! (`log_open`, `log_seek_entry`, `log_replay_next_entry`,
//! `log_entry_valid`, `log_discard`). All integers are little endian.
//!
//! * **Sector size.** `log_writes_ctr` sets `sectorsize` to the logical
//!   block size of the *lower* device (`bdev_logical_block_size`); older
//!   kernels fixed it at 512. It is stored in the super block, and every
//!   block of the log is that size.
//! * **Super block**, at byte 0 (`WRITE_LOG_SUPER_SECTOR`), written by
//!   `log_super` through `write_metadata` as one zero-padded block:
//!   `magic: u64` at 0 ([`WRITE_LOG_MAGIC`]), `version: u64` at 8
//!   ([`WRITE_LOG_VERSION`]), `nr_entries: u64` at 16, `sectorsize: u32`
//!   at 24.
//! * **Entries** follow from byte `sectorsize` on (`log_writes_ctr` starts
//!   `next_sector` at `sectorsize >> SECTOR_SHIFT`), back to back. Each
//!   starts with one zero-padded block holding `struct log_write_entry`:
//!   `sector: u64` at 0, `nr_sectors: u64` at 8, `flags: u64` at 16,
//!   `data_len: u64` at 24 (32 bytes).
//! * **Units.** `sector` and `nr_sectors` count blocks of the super block's
//!   `sectorsize`, *not* 512-byte sectors: `log_writes_map` stores
//!   `bio_to_dev_sectors(bi_sector)` and `bio_to_dev_sectors(bio_sectors)`,
//!   and xfstests multiplies both by `log->sectorsize`. (With a 512-byte
//!   lower device the two coincide.) [`Entry::offset`] and [`Entry::len`]
//!   give the byte range on the device.
//! * **Data.** The written data, `nr_sectors * sectorsize` bytes, follows
//!   the entry block directly (`log_one_block` writes it at the next
//!   sector). A discard carries no data: `log_writes_kthread` advances the
//!   log position by the entry block only when `LOG_DISCARD_FLAG` is set,
//!   else by `nr_sectors + 1` blocks. So the next entry starts at
//!   `entry + sectorsize + (discard ? 0 : nr_sectors * sectorsize)`.
//! * **Flags** ([`LOG_FLUSH_FLAG`] .. [`LOG_METADATA_FLAG`]) record
//!   `REQ_PREFLUSH`, `REQ_FUA`, `REQ_OP_DISCARD`, a mark and `REQ_META`.
//!   A flush without data is an entry with `nr_sectors` 0.
//! * **Marks** (`dmsetup message DEV 0 mark NAME`, `log_mark`) are entries
//!   with `LOG_MARK_FLAG`, `nr_sectors` 0 and `data_len` = the name's length;
//!   `log_one_block` passes the name to `write_metadata`, which copies it
//!   right after the 32-byte header inside the entry block (no NUL; the
//!   rest of the block is zeroed). Names are cut to `sectorsize - 32 - 1`
//!   bytes (`kstrndup(data, maxsize - 1)`).
//! * **Trusted entries.** `log_writes_kthread` rewrites the super block
//!   (with the count of entries logged so far) only after logging an entry
//!   flagged FUA or MARK, and `log_writes_dtr` (the device's removal) logs a
//!   final mark [`END_MARK`] so the count covers everything. Entries past
//!   `nr_entries` may therefore exist but are not trusted and are ignored
//!   here. A VM test must remove the log-writes device (or send a mark)
//!   before it shuts down, or the tail of the log is lost.
//! * **Order.** Writes without FUA are held until a flush completes and are
//!   then logged before the flush entry, in completion order; FUA writes are
//!   logged as they complete; marks are logged when sent. So a write that
//!   completed before a mark but was not yet flushed is logged *after* the
//!   mark: flush (fsync, `sync`) before marking.
//!
//! `Log::open` also checks what xfstests' `log_entry_valid` checks (no
//! all-zero entry, zero padding after the header), and more: no unknown flag,
//! the padding of the whole block is zero, every entry and its data lie
//! inside the file. It returns errors, never panics.
//!
//! # Replay and discards
//!
//! [`Replay`] applies entries to an in-memory image. With a target image it
//! keeps, per 512-byte sector, whether the sector differs from the target,
//! and their count, updating it only for the sectors an entry touches, so
//! scanning every prefix of a log costs one comparison of the initial image
//! plus time proportional to the bytes the log writes.
//!
//! The content of a discarded range is unspecified afterwards (ferry may
//! replicate a trim as zeroes or keep the old data; the device may do
//! either): each discarded sector matches *any* content until the log writes
//! it again. [`Replay::image`] keeps the bytes it had before the discard.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// `WRITE_LOG_MAGIC`, the super block's magic number.
pub const WRITE_LOG_MAGIC: u64 = 0x6a_7366_7773_6872;
/// `WRITE_LOG_VERSION`, the only version of the format.
pub const WRITE_LOG_VERSION: u64 = 1;

/// Byte offset of the super block's `magic` (u64).
const SUPER_MAGIC: usize = 0;
/// Byte offset of the super block's `version` (u64).
const SUPER_VERSION: usize = 8;
/// Byte offset of the super block's `nr_entries` (u64).
const SUPER_NR_ENTRIES: usize = 16;
/// Byte offset of the super block's `sectorsize` (u32).
const SUPER_SECTORSIZE: usize = 24;
/// Bytes of `struct log_write_super` that carry fields.
const SUPER_LEN: usize = 28;

/// Byte offset of an entry's `sector` (u64).
const ENTRY_SECTOR: usize = 0;
/// Byte offset of an entry's `nr_sectors` (u64).
const ENTRY_NR_SECTORS: usize = 8;
/// Byte offset of an entry's `flags` (u64).
const ENTRY_FLAGS: usize = 16;
/// Byte offset of an entry's `data_len` (u64).
const ENTRY_DATA_LEN: usize = 24;
/// Size of `struct log_write_entry`; a mark's name follows it.
pub const ENTRY_HEADER_LEN: usize = 32;

/// `LOG_FLUSH_FLAG`: the bio had `REQ_PREFLUSH`.
pub const LOG_FLUSH_FLAG: u64 = 1 << 0;
/// `LOG_FUA_FLAG`: the bio had `REQ_FUA`.
pub const LOG_FUA_FLAG: u64 = 1 << 1;
/// `LOG_DISCARD_FLAG`: a discard (no data in the log).
pub const LOG_DISCARD_FLAG: u64 = 1 << 2;
/// `LOG_MARK_FLAG`: a named mark (no data, the name in the entry block).
pub const LOG_MARK_FLAG: u64 = 1 << 3;
/// `LOG_METADATA_FLAG`: the bio had `REQ_META`.
pub const LOG_METADATA_FLAG: u64 = 1 << 4;
/// Every flag the kernel defines.
const KNOWN_FLAGS: u64 =
    LOG_FLUSH_FLAG | LOG_FUA_FLAG | LOG_DISCARD_FLAG | LOG_MARK_FLAG | LOG_METADATA_FLAG;

/// The mark `log_writes_dtr` logs when the device is removed.
pub const END_MARK: &str = "dm-log-writes-end";

/// `SECTOR_SIZE`: the granularity at which [`Replay`] compares images.
pub const SECTOR: u64 = SECTOR_BYTES as u64;
/// [`SECTOR`] as a `usize`.
const SECTOR_BYTES: usize = 512;
/// Largest sector size accepted (logical block sizes are powers of two
/// from 512 up to the page size).
const MAX_SECTOR_SIZE: u64 = 1 << 16;

/// One trusted entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log (0-based); also the number of entries before it.
    pub index: usize,
    /// First block written, in units of the log's sector size.
    pub sector: u64,
    /// Blocks written, in units of the log's sector size.
    pub nr_sectors: u64,
    /// `LOG_*_FLAG` bits.
    pub flags: u64,
    /// The mark's name, for a mark.
    pub mark: Option<String>,
    /// Byte offset on the device (`sector * sector_size`).
    pub offset: u64,
    /// Bytes covered on the device (`nr_sectors * sector_size`).
    pub len: u64,
    /// Byte offset of the entry block in the log file.
    pub log_offset: u64,
    /// Byte offset of the data in the log file.
    data_offset: u64,
}

impl Entry {
    /// The bio had `REQ_PREFLUSH`.
    pub fn is_flush(&self) -> bool {
        self.flags & LOG_FLUSH_FLAG != 0
    }

    /// The bio had `REQ_FUA`.
    pub fn is_fua(&self) -> bool {
        self.flags & LOG_FUA_FLAG != 0
    }

    /// A discard.
    pub fn is_discard(&self) -> bool {
        self.flags & LOG_DISCARD_FLAG != 0
    }

    /// A mark.
    pub fn is_mark(&self) -> bool {
        self.flags & LOG_MARK_FLAG != 0
    }

    /// The bio had `REQ_META`.
    pub fn is_metadata(&self) -> bool {
        self.flags & LOG_METADATA_FLAG != 0
    }

    /// Carries data that changes the device (not a discard, not empty).
    pub fn is_write(&self) -> bool {
        !self.is_discard() && self.len > 0
    }

    /// The device bytes it covers.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len
    }
}

/// A parsed `dm-log-writes` log: its trusted entries and the open file their
/// data is read from.
#[derive(Debug)]
pub struct Log {
    file: File,
    sector_size: u64,
    entries: Vec<Entry>,
    end: u64,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn le_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}

fn le_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn to_usize(n: u64) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| invalid(format!("{n} does not fit in memory")))
}

impl Log {
    /// Parses the super block and its `nr_entries` entries. Errors on a bad
    /// magic, version or sector size, on a malformed entry, and when the
    /// file ends before an entry or its data does.
    pub fn open(path: &Path) -> io::Result<Log> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let what = path.display();
        if file_len < SUPER_LEN as u64 {
            return Err(invalid(format!(
                "{what}: {file_len} bytes, too short for a log-writes super block"
            )));
        }
        let mut sup = [0u8; SUPER_LEN];
        file.read_exact_at(&mut sup, 0)?;
        let magic = le_u64(&sup, SUPER_MAGIC);
        if magic != WRITE_LOG_MAGIC {
            return Err(invalid(format!(
                "{what}: magic {magic:#x}, not a log-writes log ({WRITE_LOG_MAGIC:#x})"
            )));
        }
        let version = le_u64(&sup, SUPER_VERSION);
        if version != WRITE_LOG_VERSION {
            return Err(invalid(format!(
                "{what}: log-writes version {version}, expected {WRITE_LOG_VERSION}"
            )));
        }
        let nr_entries = le_u64(&sup, SUPER_NR_ENTRIES);
        let sector_size = u64::from(le_u32(&sup, SUPER_SECTORSIZE));
        if !sector_size.is_power_of_two() || !(SECTOR..=MAX_SECTOR_SIZE).contains(&sector_size) {
            return Err(invalid(format!("{what}: bad sector size {sector_size}")));
        }
        if file_len < sector_size {
            return Err(invalid(format!(
                "{what}: {file_len} bytes, shorter than the super block ({sector_size})"
            )));
        }

        // Never trust nr_entries for an allocation: each entry takes a block.
        let cap = nr_entries.min(file_len / sector_size);
        let mut entries = Vec::with_capacity(to_usize(cap)?);
        let mut block = vec![0u8; to_usize(sector_size)?];
        let mut pos = sector_size;
        for i in 0..nr_entries {
            let index = to_usize(i)?;
            let at = format!("{what}: entry {i} of {nr_entries} at byte {pos}");
            if file_len - pos < sector_size {
                return Err(invalid(format!("{at}: the log ends at byte {file_len}")));
            }
            file.read_exact_at(&mut block, pos)?;
            let sector = le_u64(&block, ENTRY_SECTOR);
            let nr_sectors = le_u64(&block, ENTRY_NR_SECTORS);
            let flags = le_u64(&block, ENTRY_FLAGS);
            let data_len = le_u64(&block, ENTRY_DATA_LEN);
            if flags == 0 && nr_sectors == 0 {
                return Err(invalid(format!("{at}: empty entry (unwritten log space?)")));
            }
            if flags & !KNOWN_FLAGS != 0 {
                return Err(invalid(format!("{at}: unknown flags {flags:#x}")));
            }
            let mut used = ENTRY_HEADER_LEN;
            let mut mark = None;
            if flags & LOG_MARK_FLAG != 0 {
                let room = block.len() - ENTRY_HEADER_LEN;
                let name_len = usize::try_from(data_len)
                    .ok()
                    .filter(|&n| n <= room)
                    .ok_or_else(|| {
                        invalid(format!(
                            "{at}: mark name of {data_len} bytes, room for {room}"
                        ))
                    })?;
                used += name_len;
                mark = Some(String::from_utf8_lossy(&block[ENTRY_HEADER_LEN..used]).into_owned());
            }
            if block[used..].iter().any(|&b| b != 0) {
                return Err(invalid(format!("{at}: entry block not zero-padded")));
            }
            let (offset, len) = match (
                sector.checked_mul(sector_size),
                nr_sectors.checked_mul(sector_size),
            ) {
                (Some(o), Some(l)) if o.checked_add(l).is_some() => (o, l),
                _ => {
                    return Err(invalid(format!(
                        "{at}: range of {nr_sectors} sectors at {sector} overflows"
                    )))
                }
            };
            let data_offset = pos + sector_size;
            let logged = if flags & LOG_DISCARD_FLAG != 0 {
                0
            } else {
                len
            };
            if file_len - data_offset < logged {
                return Err(invalid(format!(
                    "{at}: its {logged} bytes of data run past the log's end ({file_len})"
                )));
            }
            entries.push(Entry {
                index,
                sector,
                nr_sectors,
                flags,
                mark,
                offset,
                len,
                log_offset: pos,
                data_offset,
            });
            pos = data_offset + logged;
        }
        Ok(Log {
            file,
            sector_size,
            entries,
            end: pos,
        })
    }

    /// The trusted entries, in log order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The sector size of the log (the lower device's logical block size),
    /// the unit of [`Entry::sector`] and [`Entry::nr_sectors`].
    pub fn sector_size(&self) -> u64 {
        self.sector_size
    }

    /// Byte offset just past the last trusted entry.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The bytes a write entry wrote (`entry.len` bytes; empty for discards,
    /// marks and flushes without data).
    pub fn data(&self, entry: &Entry) -> io::Result<Vec<u8>> {
        if entry.is_discard() {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; to_usize(entry.len)?];
        self.read_data(entry, &mut buf)?;
        Ok(buf)
    }

    /// Reads a write entry's data into `buf`, which must be `entry.len`
    /// bytes long.
    pub fn read_data(&self, entry: &Entry, buf: &mut [u8]) -> io::Result<()> {
        if entry.is_discard() || buf.len() as u64 != entry.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "entry {}: {} bytes asked, it has {} bytes of data",
                    entry.index,
                    buf.len(),
                    if entry.is_discard() { 0 } else { entry.len }
                ),
            ));
        }
        self.file.read_exact_at(buf, entry.data_offset)
    }

    /// Index of the first mark named `name`: the number of entries logged
    /// before it, i.e. the prefix length of the log at the mark.
    pub fn position_of_mark(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.mark.as_deref() == Some(name))
    }

    /// The marks, with their positions, in log order.
    pub fn marks(&self) -> impl Iterator<Item = (usize, &str)> {
        self.entries
            .iter()
            .filter_map(|e| e.mark.as_deref().map(|m| (e.index, m)))
    }

    /// The last trusted entry is the mark [`END_MARK`] that the kernel logs
    /// when the device is removed: the log is complete.
    pub fn ended_cleanly(&self) -> bool {
        self.entries.last().and_then(|e| e.mark.as_deref()) == Some(END_MARK)
    }
}

/// Replays entries onto an in-memory image; with a target, tracks how many
/// 512-byte sectors differ from it (see the module doc on discards).
#[derive(Debug)]
pub struct Replay<'t> {
    image: Vec<u8>,
    target: Option<&'t [u8]>,
    /// Per sector: discarded and not written since (matches anything).
    unspecified: Vec<bool>,
    /// Per sector (empty without a target): differs from the target.
    differs: Vec<bool>,
    differing: u64,
}

fn sector_count(len: usize) -> io::Result<usize> {
    if !len.is_multiple_of(SECTOR_BYTES) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("image of {len} bytes is not a whole number of {SECTOR}-byte sectors"),
        ));
    }
    Ok(len / SECTOR_BYTES)
}

impl Replay<'static> {
    /// Replays onto `initial` (a whole number of 512-byte sectors), without
    /// a target.
    pub fn new(initial: Vec<u8>) -> io::Result<Replay<'static>> {
        let sectors = sector_count(initial.len())?;
        Ok(Replay {
            image: initial,
            target: None,
            unspecified: vec![false; sectors],
            differs: Vec::new(),
            differing: 0,
        })
    }
}

impl<'t> Replay<'t> {
    /// Replays onto `initial`, comparing with `target` (same length).
    pub fn with_target(initial: Vec<u8>, target: &'t [u8]) -> io::Result<Replay<'t>> {
        if initial.len() != target.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "initial image has {} bytes, target {}",
                    initial.len(),
                    target.len()
                ),
            ));
        }
        let sectors = sector_count(initial.len())?;
        let s = SECTOR_BYTES;
        let differs: Vec<bool> = initial
            .chunks_exact(s)
            .zip(target.chunks_exact(s))
            .map(|(a, b)| a != b)
            .collect();
        let differing = differs.iter().filter(|&&d| d).count() as u64;
        Ok(Replay {
            image: initial,
            target: Some(target),
            unspecified: vec![false; sectors],
            differs,
            differing,
        })
    }

    /// Applies one entry of `log`: a write stores its data, a discard makes
    /// its range unspecified, marks and empty flushes change nothing. Errors
    /// if the entry reaches past the image's end or its data cannot be read.
    pub fn apply(&mut self, log: &Log, entry: &Entry) -> io::Result<()> {
        if entry.len == 0 {
            return Ok(());
        }
        let image_len = self.image.len() as u64;
        if entry.offset > image_len || image_len - entry.offset < entry.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "entry {} covers bytes {}..{}, past the image's end ({image_len})",
                    entry.index,
                    entry.offset,
                    entry.offset + entry.len
                ),
            ));
        }
        let start = to_usize(entry.offset)?;
        let end = to_usize(entry.offset + entry.len)?;
        let s = SECTOR_BYTES;
        let sectors = start / s..end.div_ceil(s);
        if entry.is_discard() {
            for i in sectors {
                self.unspecified[i] = true;
                if self.differs.get(i) == Some(&true) {
                    self.differs[i] = false;
                    self.differing -= 1;
                }
            }
            return Ok(());
        }
        log.read_data(entry, &mut self.image[start..end])?;
        for i in sectors {
            self.unspecified[i] = false;
            if let Some(target) = self.target {
                let now = self.image[i * s..(i + 1) * s] != target[i * s..(i + 1) * s];
                if now != self.differs[i] {
                    self.differs[i] = now;
                    if now {
                        self.differing += 1;
                    } else {
                        self.differing -= 1;
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies the log's first `k` entries (on top of what was applied).
    pub fn apply_prefix(&mut self, log: &Log, k: usize) -> io::Result<()> {
        for entry in log.entries().iter().take(k) {
            self.apply(log, entry)?;
        }
        Ok(())
    }

    /// The image so far (discarded ranges keep their earlier bytes).
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// Whether the 512-byte sector `sector` was discarded and not written
    /// since (its content is unspecified).
    pub fn is_unspecified(&self, sector: u64) -> bool {
        usize::try_from(sector)
            .ok()
            .and_then(|i| self.unspecified.get(i).copied())
            .unwrap_or(false)
    }

    /// The number of 512-byte sectors that differ from the target (None
    /// without a target).
    pub fn differing_sectors(&self) -> Option<u64> {
        self.target.map(|_| self.differing)
    }

    /// There is a target and the image equals it (unspecified sectors match
    /// anything).
    pub fn matches_target(&self) -> bool {
        self.target.is_some() && self.differing == 0
    }

    /// The first 512-byte sector that differs from the target (a linear
    /// scan, for diagnostics).
    pub fn first_differing_sector(&self) -> Option<u64> {
        self.differs.iter().position(|&d| d).map(|i| i as u64)
    }
}

/// The outcome of comparing every prefix of a log with a target image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixScan {
    /// Every k (0..=n) at which the first k entries give the target.
    pub matching: Vec<usize>,
    /// The first k with the fewest differing sectors.
    pub closest: usize,
    /// The number of differing 512-byte sectors at `closest`.
    pub closest_differing: u64,
    /// The number of differing 512-byte sectors after the whole log.
    pub final_differing: u64,
}

/// Replays the whole log onto `initial`, noting after each prefix how far
/// the image is from `target` (equal lengths, a whole number of 512-byte
/// sectors). Costs one full comparison plus the bytes the log writes.
pub fn scan_prefixes(log: &Log, initial: &[u8], target: &[u8]) -> io::Result<PrefixScan> {
    let mut replay = Replay::with_target(initial.to_vec(), target)?;
    let mut scan = PrefixScan {
        matching: Vec::new(),
        closest: 0,
        closest_differing: u64::MAX,
        final_differing: 0,
    };
    let mut note = |k: usize, differing: u64| {
        if differing == 0 {
            scan.matching.push(k);
        }
        if differing < scan.closest_differing {
            scan.closest = k;
            scan.closest_differing = differing;
        }
        scan.final_differing = differing;
    };
    note(0, replay.differing);
    for (i, entry) in log.entries().iter().enumerate() {
        replay.apply(log, entry)?;
        note(i + 1, replay.differing);
    }
    Ok(scan)
}

/// Every k (0..=n, the number of entries applied) at which replaying the
/// log's first k entries onto `initial` gives exactly `target` (discarded
/// sectors match anything; see the module doc).
pub fn matching_prefixes(log: &Log, initial: &[u8], target: &[u8]) -> io::Result<Vec<usize>> {
    Ok(scan_prefixes(log, initial, target)?.matching)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pattern, Scratch};
    use std::path::PathBuf;

    /// Writes synthetic logs the way dm-log-writes lays them out.
    struct Builder {
        ss: u64,
        body: Vec<u8>,
        count: u64,
    }

    impl Builder {
        fn new(ss: u64) -> Builder {
            Builder {
                ss,
                body: Vec::new(),
                count: 0,
            }
        }

        fn ssz(&self) -> usize {
            usize::try_from(self.ss).unwrap()
        }

        /// A raw entry: header, `inline` bytes after it, then `data`.
        fn raw(
            &mut self,
            sector: u64,
            nr: u64,
            flags: u64,
            data_len: u64,
            inline: &[u8],
            data: &[u8],
        ) {
            let mut block = vec![0u8; self.ssz()];
            block[ENTRY_SECTOR..ENTRY_SECTOR + 8].copy_from_slice(&sector.to_le_bytes());
            block[ENTRY_NR_SECTORS..ENTRY_NR_SECTORS + 8].copy_from_slice(&nr.to_le_bytes());
            block[ENTRY_FLAGS..ENTRY_FLAGS + 8].copy_from_slice(&flags.to_le_bytes());
            block[ENTRY_DATA_LEN..ENTRY_DATA_LEN + 8].copy_from_slice(&data_len.to_le_bytes());
            block[ENTRY_HEADER_LEN..ENTRY_HEADER_LEN + inline.len()].copy_from_slice(inline);
            self.body.extend_from_slice(&block);
            self.body.extend_from_slice(data);
            self.count += 1;
        }

        /// A write of `data` (whole sectors) at byte `offset`.
        fn write_flags(&mut self, offset: u64, data: &[u8], flags: u64) -> &mut Self {
            assert_eq!(offset % self.ss, 0);
            assert_eq!(data.len() as u64 % self.ss, 0);
            self.raw(
                offset / self.ss,
                data.len() as u64 / self.ss,
                flags,
                0,
                &[],
                data,
            );
            self
        }

        fn write(&mut self, offset: u64, data: &[u8]) -> &mut Self {
            self.write_flags(offset, data, 0)
        }

        fn flush(&mut self) -> &mut Self {
            self.raw(0, 0, LOG_FLUSH_FLAG, 0, &[], &[]);
            self
        }

        fn mark(&mut self, name: &str) -> &mut Self {
            self.raw(0, 0, LOG_MARK_FLAG, name.len() as u64, name.as_bytes(), &[]);
            self
        }

        fn discard(&mut self, offset: u64, len: u64) -> &mut Self {
            self.raw(
                offset / self.ss,
                len / self.ss,
                LOG_DISCARD_FLAG,
                0,
                &[],
                &[],
            );
            self
        }

        /// The log's bytes, its super block claiming `nr_entries`.
        fn bytes_with(&self, nr_entries: u64) -> Vec<u8> {
            let mut out = vec![0u8; self.ssz()];
            out[SUPER_MAGIC..SUPER_MAGIC + 8].copy_from_slice(&WRITE_LOG_MAGIC.to_le_bytes());
            out[SUPER_VERSION..SUPER_VERSION + 8].copy_from_slice(&WRITE_LOG_VERSION.to_le_bytes());
            out[SUPER_NR_ENTRIES..SUPER_NR_ENTRIES + 8].copy_from_slice(&nr_entries.to_le_bytes());
            out[SUPER_SECTORSIZE..SUPER_SECTORSIZE + 4]
                .copy_from_slice(&u32::try_from(self.ss).unwrap().to_le_bytes());
            out.extend_from_slice(&self.body);
            out
        }

        fn bytes(&self) -> Vec<u8> {
            self.bytes_with(self.count)
        }
    }

    fn save(scratch: &Scratch, bytes: &[u8]) -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = scratch.path(&format!("log{n}"));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn open(scratch: &Scratch, bytes: &[u8]) -> io::Result<Log> {
        Log::open(&save(scratch, bytes))
    }

    fn err_of(scratch: &Scratch, bytes: &[u8]) -> String {
        match open(scratch, bytes) {
            Ok(log) => panic!("expected an error, parsed {} entries", log.entries().len()),
            Err(e) => e.to_string(),
        }
    }

    fn fill(byte: u8, len: u64) -> Vec<u8> {
        vec![byte; usize::try_from(len).unwrap()]
    }

    #[test]
    fn parses_entries_data_and_marks() {
        let scratch = Scratch::new("logwrites-parse");
        for ss in [512u64, 4096] {
            let a = pattern(1, usize::try_from(2 * ss).unwrap());
            let b = pattern(2, usize::try_from(ss).unwrap());
            let mut builder = Builder::new(ss);
            builder
                .write(0, &a)
                .write_flags(5 * ss, &b, LOG_FUA_FLAG | LOG_METADATA_FLAG)
                .flush()
                .mark("after-b")
                .discard(ss, 3 * ss)
                .write(7 * ss, &b)
                .mark(END_MARK);
            let log = open(&scratch, &builder.bytes()).unwrap();
            assert_eq!(log.sector_size(), ss);
            let e = log.entries();
            assert_eq!(e.len(), 7);
            assert_eq!(
                e.iter().map(|e| e.index).collect::<Vec<_>>(),
                (0..7).collect::<Vec<_>>()
            );

            assert_eq!((e[0].sector, e[0].nr_sectors, e[0].flags), (0, 2, 0));
            assert_eq!((e[0].offset, e[0].len), (0, 2 * ss));
            assert!(e[0].is_write() && !e[0].is_flush() && !e[0].is_mark());
            assert_eq!(log.data(&e[0]).unwrap(), a);
            assert_eq!(e[0].log_offset, ss);

            assert_eq!((e[1].sector, e[1].nr_sectors), (5, 1));
            assert_eq!(e[1].range(), 5 * ss..6 * ss);
            assert!(e[1].is_fua() && e[1].is_metadata());
            assert_eq!(log.data(&e[1]).unwrap(), b);
            assert_eq!(e[1].log_offset, ss + ss + 2 * ss);

            assert!(e[2].is_flush() && !e[2].is_write());
            assert_eq!(e[2].len, 0);
            assert!(log.data(&e[2]).unwrap().is_empty());

            assert!(e[3].is_mark());
            assert_eq!(e[3].mark.as_deref(), Some("after-b"));

            assert!(e[4].is_discard() && !e[4].is_write());
            assert_eq!(e[4].range(), ss..4 * ss);
            assert!(log.data(&e[4]).unwrap().is_empty());
            // A discard takes one block in the log: the next entry follows.
            assert_eq!(e[5].log_offset, e[4].log_offset + ss);
            assert_eq!(log.data(&e[5]).unwrap(), b);
            assert_eq!(e[5].offset, 7 * ss);

            assert_eq!(log.position_of_mark("after-b"), Some(3));
            assert_eq!(log.position_of_mark(END_MARK), Some(6));
            assert_eq!(log.position_of_mark("nope"), None);
            let marks: Vec<_> = log.marks().collect();
            assert_eq!(marks, vec![(3, "after-b"), (6, END_MARK)]);
            assert!(log.ended_cleanly());
            assert_eq!(log.end(), builder.bytes().len() as u64);

            let mut wrong = vec![0u8; 3];
            assert!(log.read_data(&e[0], &mut wrong).is_err());
        }
    }

    #[test]
    fn entries_past_nr_entries_are_not_trusted() {
        let scratch = Scratch::new("logwrites-untrusted");
        let mut builder = Builder::new(512);
        builder
            .write(0, &fill(1, 512))
            .write(512, &fill(2, 512))
            .mark("m")
            .write(1024, &fill(3, 512));
        let log = open(&scratch, &builder.bytes_with(2)).unwrap();
        assert_eq!(log.entries().len(), 2);
        assert_eq!(log.position_of_mark("m"), None);
        assert!(!log.ended_cleanly());
        // Unwritten (zeroed) log space after the trusted entries is fine too.
        let mut bytes = builder.bytes_with(0);
        bytes.extend_from_slice(&[0u8; 4096]);
        assert!(open(&scratch, &bytes).unwrap().entries().is_empty());
    }

    /// The image after each prefix, computed naively.
    fn states(initial: &[u8], ops: &[(u64, Vec<u8>)]) -> Vec<Vec<u8>> {
        let mut img = initial.to_vec();
        let mut out = vec![img.clone()];
        for (off, data) in ops {
            let off = usize::try_from(*off).unwrap();
            img[off..off + data.len()].copy_from_slice(data);
            out.push(img.clone());
        }
        out
    }

    #[test]
    fn finds_the_prefix_a_target_was_taken_at() {
        let scratch = Scratch::new("logwrites-prefix");
        for ss in [512u64, 4096] {
            let size = 16 * ss;
            let initial = pattern(9, usize::try_from(size).unwrap());
            let ops: Vec<(u64, Vec<u8>)> = (0..6u64)
                .map(|i| {
                    (
                        ((i * 5) % 14) * ss,
                        pattern(100 + i, usize::try_from(2 * ss).unwrap()),
                    )
                })
                .collect();
            let mut builder = Builder::new(ss);
            for (off, data) in &ops {
                builder.write(*off, data);
            }
            let log = open(&scratch, &builder.bytes()).unwrap();
            let states = states(&initial, &ops);
            for k in [0usize, 2, 5, 6] {
                let found = matching_prefixes(&log, &initial, &states[k]).unwrap();
                assert_eq!(found, vec![k], "ss {ss} k {k}");
            }
            // The final image is the whole log replayed.
            let mut replay = Replay::new(initial.clone()).unwrap();
            replay.apply_prefix(&log, log.entries().len()).unwrap();
            assert_eq!(replay.image(), &states[6][..]);
            assert!(replay.differing_sectors().is_none() && !replay.matches_target());
        }
    }

    #[test]
    fn a_target_no_prefix_gives_matches_nothing() {
        let scratch = Scratch::new("logwrites-nomatch");
        let initial = vec![0u8; 8192];
        let mut builder = Builder::new(512);
        builder
            .write(0, &fill(1, 512))
            .write(512, &fill(2, 512))
            .flush();
        let log = open(&scratch, &builder.bytes()).unwrap();
        // Sector 1 written without sector 0: never the state of the device.
        let mut target = initial.clone();
        target[512..1024].fill(2);
        assert!(matching_prefixes(&log, &initial, &target)
            .unwrap()
            .is_empty());
        let scan = scan_prefixes(&log, &initial, &target).unwrap();
        assert_eq!((scan.closest, scan.closest_differing), (0, 1));
        assert_eq!(scan.final_differing, 1);
        // A single byte off.
        let mut target = initial.clone();
        target[..1024].fill(1);
        target[512..1024].fill(2);
        target[700] = 3;
        assert!(matching_prefixes(&log, &initial, &target)
            .unwrap()
            .is_empty());
        let mut replay = Replay::with_target(initial.clone(), &target).unwrap();
        replay.apply_prefix(&log, 3).unwrap();
        assert_eq!(replay.differing_sectors(), Some(1));
        assert_eq!(replay.first_differing_sector(), Some(1));
    }

    #[test]
    fn marks_and_flushes_extend_a_match() {
        let scratch = Scratch::new("logwrites-runs");
        let initial = vec![0u8; 4096];
        let mut builder = Builder::new(512);
        builder
            .write(0, &fill(1, 512))
            .flush()
            .mark("x")
            .write(0, &fill(2, 512));
        let log = open(&scratch, &builder.bytes()).unwrap();
        let mut target = initial.clone();
        target[..512].fill(1);
        assert_eq!(
            matching_prefixes(&log, &initial, &target).unwrap(),
            vec![1, 2, 3]
        );
        assert_eq!(log.position_of_mark("x"), Some(2));
    }

    #[test]
    fn overwrites_of_the_same_sector() {
        let scratch = Scratch::new("logwrites-overwrite");
        let initial = vec![0u8; 4096];
        let a = fill(0xa, 1024);
        let b = fill(0xb, 512);
        let mut builder = Builder::new(512);
        builder
            .write(1024, &a)
            .write(1536, &b)
            .write(1024, &a)
            .write(1536, &fill(0, 512));
        let log = open(&scratch, &builder.bytes()).unwrap();
        let mut target = initial.clone();
        target[1024..2048].fill(0xa);
        assert_eq!(
            matching_prefixes(&log, &initial, &target).unwrap(),
            vec![1, 3]
        );
        target[1536..2048].fill(0xb);
        assert_eq!(matching_prefixes(&log, &initial, &target).unwrap(), vec![2]);
        target[1024..1536].fill(0);
        target[1536..2048].fill(0);
        assert_eq!(matching_prefixes(&log, &initial, &target).unwrap(), vec![0]);
    }

    #[test]
    fn discarded_sectors_match_anything_until_written() {
        let scratch = Scratch::new("logwrites-discard");
        for ss in [512u64, 4096] {
            let size = 8 * ss;
            let initial = fill(7, size);
            let mut builder = Builder::new(ss);
            builder
                .write(0, &fill(1, 2 * ss))
                .discard(0, 4 * ss)
                .write(ss, &fill(2, ss));
            let log = open(&scratch, &builder.bytes()).unwrap();
            let s = usize::try_from(ss).unwrap();

            // Discarded as zeroes, or keeping the old data: both match k = 2.
            let mut zeroed = initial.clone();
            zeroed[..4 * s].fill(0);
            assert_eq!(matching_prefixes(&log, &initial, &zeroed).unwrap(), vec![2]);
            let mut kept = initial.clone();
            kept[..2 * s].fill(1);
            assert_eq!(
                matching_prefixes(&log, &initial, &kept).unwrap(),
                vec![1, 2]
            );

            // Written after the discard: must hold the new data.
            let mut after = zeroed.clone();
            after[s..2 * s].fill(2);
            assert_eq!(
                matching_prefixes(&log, &initial, &after).unwrap(),
                vec![2, 3]
            );
            let mut stale = after.clone();
            stale[s..2 * s].fill(1);
            assert_eq!(matching_prefixes(&log, &initial, &stale).unwrap(), vec![2]);
            // Outside the discarded range content still counts.
            let mut outside = after.clone();
            outside[4 * s] = 0;
            assert!(matching_prefixes(&log, &initial, &outside)
                .unwrap()
                .is_empty());

            let mut replay = Replay::new(initial.clone()).unwrap();
            replay.apply_prefix(&log, 3).unwrap();
            let per = ss / SECTOR;
            assert!(replay.is_unspecified(0));
            assert!(replay.is_unspecified(per - 1));
            assert!(!replay.is_unspecified(per));
            assert!(!replay.is_unspecified(2 * per - 1));
            assert!(replay.is_unspecified(2 * per));
            assert!(!replay.is_unspecified(4 * per));
            assert!(!replay.is_unspecified(u64::MAX));
            assert_eq!(replay.image()[0], 1);
            assert_eq!(replay.image()[s], 2);
        }
    }

    #[test]
    fn bad_headers_are_errors() {
        let scratch = Scratch::new("logwrites-header");
        let mut builder = Builder::new(512);
        builder.write(0, &fill(1, 512));
        let good = builder.bytes();

        let mut bytes = good.clone();
        bytes[SUPER_MAGIC] ^= 1;
        assert!(err_of(&scratch, &bytes).contains("magic"));

        let mut bytes = good.clone();
        bytes[SUPER_VERSION] = 2;
        assert!(err_of(&scratch, &bytes).contains("version"));

        for bad in [0u32, 1, 256, 513, 3000, 1 << 20] {
            let mut bytes = good.clone();
            bytes[SUPER_SECTORSIZE..SUPER_SECTORSIZE + 4].copy_from_slice(&bad.to_le_bytes());
            assert!(err_of(&scratch, &bytes).contains("sector size"), "{bad}");
        }

        // A 4096-byte sector size in a file shorter than one block.
        let mut bytes = Builder::new(4096).bytes();
        bytes.truncate(1000);
        err_of(&scratch, &bytes);

        assert!(open(&scratch, &[]).is_err());
        assert!(open(&scratch, &good[..20]).is_err());
        assert!(Log::open(&scratch.path("missing")).is_err());
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let scratch = Scratch::new("logwrites-truncate");
        for ss in [512u64, 4096] {
            let mut builder = Builder::new(ss);
            builder
                .write(0, &fill(1, 3 * ss))
                .flush()
                .discard(0, ss)
                .mark("m")
                .write(ss, &fill(2, ss));
            let bytes = builder.bytes();
            let step = usize::try_from(ss / 8).unwrap();
            for len in (0..bytes.len()).step_by(step).chain([bytes.len() - 1]) {
                assert!(open(&scratch, &bytes[..len]).is_err(), "ss {ss} len {len}");
            }
            assert_eq!(open(&scratch, &bytes).unwrap().entries().len(), 5);
        }
    }

    #[test]
    fn malformed_entries_are_errors() {
        let scratch = Scratch::new("logwrites-malformed");
        let ss = 512u64;
        let mut builder = Builder::new(ss);
        builder.write(0, &fill(1, 2 * ss)).mark("m");

        // Data running past the end of the file.
        let mut bytes = builder.bytes();
        bytes.truncate(bytes.len() - 1024);
        assert!(err_of(&scratch, &bytes).contains("past the log's end"));
        let mut b = Builder::new(ss);
        b.raw(0, 1 << 40, 0, 0, &[], &[]);
        assert!(err_of(&scratch, &b.bytes()).contains("past the log's end"));
        let mut b = Builder::new(ss);
        b.raw(1, u64::MAX / 512, 0, 0, &[], &[]);
        assert!(err_of(&scratch, &b.bytes()).contains("overflows"));

        // nr_entries larger than the file holds.
        for claimed in [3u64, 1000, u64::MAX] {
            assert!(
                open(&scratch, &builder.bytes_with(claimed)).is_err(),
                "{claimed}"
            );
        }
        // ... also when the rest of the log device is zeroes.
        let mut bytes = builder.bytes_with(3);
        bytes.extend_from_slice(&[0u8; 4096]);
        assert!(err_of(&scratch, &bytes).contains("empty entry"));

        // Unknown flags, garbage in the padding, an oversized mark name.
        let mut b = Builder::new(ss);
        b.raw(0, 0, 1 << 7, 0, &[], &[]);
        assert!(err_of(&scratch, &b.bytes()).contains("unknown flags"));
        let mut b = Builder::new(ss);
        b.raw(0, 1, 0, 0, b"junk", &fill(0, ss));
        assert!(err_of(&scratch, &b.bytes()).contains("zero-padded"));
        let mut b = Builder::new(ss);
        b.raw(0, 0, LOG_MARK_FLAG, 2, b"abc", &[]);
        assert!(err_of(&scratch, &b.bytes()).contains("zero-padded"));
        let mut b = Builder::new(ss);
        b.raw(0, 0, LOG_MARK_FLAG, 481, &[], &[]);
        assert!(err_of(&scratch, &b.bytes()).contains("mark name"));
        let mut b = Builder::new(ss);
        b.raw(0, 0, LOG_MARK_FLAG, u64::MAX, &[], &[]);
        assert!(err_of(&scratch, &b.bytes()).contains("mark name"));
        // The longest name that fits is fine.
        let mut b = Builder::new(ss);
        let long = "n".repeat(480);
        b.mark(&long);
        assert_eq!(
            open(&scratch, &b.bytes()).unwrap().position_of_mark(&long),
            Some(0)
        );
    }

    #[test]
    fn replay_rejects_bad_images_and_entries() {
        let scratch = Scratch::new("logwrites-replay-err");
        let mut builder = Builder::new(512);
        builder.write(3584, &fill(1, 1024));
        let log = open(&scratch, &builder.bytes()).unwrap();
        let initial = vec![0u8; 4096];
        // The write runs past a 4096-byte image.
        assert!(matching_prefixes(&log, &initial, &initial).is_err());
        let mut replay = Replay::new(initial.clone()).unwrap();
        assert!(replay.apply(&log, &log.entries()[0]).is_err());
        // Unequal lengths, partial sectors.
        assert!(matching_prefixes(&log, &initial, &initial[..2048]).is_err());
        assert!(Replay::new(vec![0u8; 1000]).is_err());
        assert!(Replay::with_target(vec![0u8; 1000], &[0u8; 1000]).is_err());
        // Big enough: fine.
        let big = vec![0u8; 8192];
        assert_eq!(matching_prefixes(&log, &big, &big).unwrap(), vec![0]);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Write { sector: u64, count: u64, seed: u64 },
            Discard { sector: u64, count: u64 },
            Flush,
            Mark,
        }

        const BLOCKS: u64 = 24;

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0..BLOCKS, 1..4u64, 0..4u64)
                    .prop_map(|(sector, count, seed)| Op::Write { sector, count, seed }),
                1 => (0..BLOCKS, 1..6u64).prop_map(|(sector, count)| Op::Discard { sector, count }),
                1 => Just(Op::Flush),
                1 => Just(Op::Mark),
            ]
        }

        /// Naive model: the image and the unspecified mask after each prefix.
        fn model(
            ss: u64,
            initial: &[u8],
            ops: &[Op],
            zero_discards: bool,
        ) -> Vec<(Vec<u8>, Vec<bool>)> {
            let s = usize::try_from(ss).unwrap();
            let mut img = initial.to_vec();
            let mut wild = vec![false; initial.len()];
            let mut out = vec![(img.clone(), wild.clone())];
            for op in ops {
                match *op {
                    Op::Write {
                        sector,
                        count,
                        seed,
                    } => {
                        let (a, n) = (
                            usize::try_from(sector).unwrap() * s,
                            usize::try_from(count).unwrap() * s,
                        );
                        img[a..a + n].copy_from_slice(&pattern(seed, n));
                        wild[a..a + n].fill(false);
                    }
                    Op::Discard { sector, count } => {
                        let (a, n) = (
                            usize::try_from(sector).unwrap() * s,
                            usize::try_from(count).unwrap() * s,
                        );
                        if zero_discards {
                            img[a..a + n].fill(0);
                        }
                        wild[a..a + n].fill(true);
                    }
                    Op::Flush | Op::Mark => {}
                }
                out.push((img.clone(), wild.clone()));
            }
            out
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]
            #[test]
            fn matching_prefixes_agrees_with_a_naive_replay(
                ops in proptest::collection::vec(op(), 0..40),
                big in any::<bool>(),
                pick in any::<proptest::sample::Index>(),
                zero_discards in any::<bool>(),
            ) {
                let ss = if big { 4096 } else { 512 };
                // Room for the furthest write: BLOCKS + 5 blocks.
                let size = (BLOCKS + 6) * ss;
                let initial = pattern(77, usize::try_from(size).unwrap());
                let mut builder = Builder::new(ss);
                let s = usize::try_from(ss).unwrap();
                for op in &ops {
                    match *op {
                        Op::Write { sector, count, seed } => {
                            builder.write(sector * ss, &pattern(seed, usize::try_from(count).unwrap() * s));
                        }
                        Op::Discard { sector, count } => {
                            builder.discard(sector * ss, count * ss);
                        }
                        Op::Flush => {
                            builder.flush();
                        }
                        Op::Mark => {
                            builder.mark("m");
                        }
                    }
                }
                let scratch = Scratch::new("logwrites-prop");
                let log = open(&scratch, &builder.bytes()).unwrap();
                prop_assert_eq!(log.entries().len(), ops.len());
                let states = model(ss, &initial, &ops, zero_discards);
                let k = pick.index(states.len());
                let target = &states[k].0;
                let found = matching_prefixes(&log, &initial, target).unwrap();
                prop_assert!(found.contains(&k), "k {} not in {:?}", k, found);
                // Exactly the prefixes whose state equals the target outside
                // its unspecified bytes.
                let naive: Vec<usize> = states
                    .iter()
                    .enumerate()
                    .filter(|(_, (img, wild))| {
                        img.iter().zip(target).zip(wild).all(|((a, b), w)| *w || a == b)
                    })
                    .map(|(i, _)| i)
                    .collect();
                prop_assert_eq!(found, naive);
            }
        }
    }
}
