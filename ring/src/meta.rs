//! Per-disk persistent tracking metadata: the crash-safety state of one
//! protected disk.
//!
//! After `kill -9` or a power loss, the next `ferry filter` start must know
//! every region of the disk that may hold writes acknowledged to the
//! application but not yet confirmed shipped to the recovery site. After a
//! clean stop it must know that none do, except regions explicitly left
//! dirty. Three structures, one file (DRBD's activity log plus md's
//! write-intent bitmap plus a clean flag):
//!
//! 1. **Activity log (AL)** of hot extents (default 4 MiB, 1024 slots). Before a
//!    write is acknowledged every extent it touches is durably in the AL. Only
//!    the first write to a cold extent pays a write + `fdatasync`; writes to
//!    hot extents cost nothing on disk. Per slot the module keeps (in memory)
//!    the highest record sequence written to the extent; [`MetaFile::release`]
//!    makes extents whose last sequence is committed *evictable*, and they are
//!    evicted lazily, only when a slot is needed (so re-hot extents do not pay
//!    again). If the AL is full and nothing is evictable, the write's range is
//!    set in the bitmap durably instead ([`Coverage::Bitmap`]): never block,
//!    never lose track.
//! 2. **Dirty bitmap** over the whole disk (granule 4 KiB up to 512 GiB, 16 KiB
//!    above, see [`default_granularity`]). Bits are set for writes the ring
//!    could not hold (the filter's bitmap state) and for AL-overflow
//!    fallbacks, and cleared by the caller after a resync shipped the region.
//!    Bits set inside an AL extent are written lazily (the AL covers them);
//!    an extent whose bits are not yet durable is never evicted before they
//!    are (the bitmap is flushed and synced first).
//! 3. **Clean flag**, set durably by [`MetaFile::close_clean`] and cleared
//!    durably by [`MetaFile::open`] before the first write can be acknowledged.
//!
//! # On-disk format (version 1, little-endian)
//!
//! ```text
//!  offset 0      +--------------------------------------+
//!                | header, 512 bytes, written once       |  HDR_* offsets
//!  4096          +--------------------------------------+
//!  AL_OFFSET     | AL copy 0  (al_copy_size bytes)       |  AL_* offsets
//!                +--------------------------------------+
//!                | AL copy 1  (al_copy_size bytes)       |
//!  bitmap_offset +--------------------------------------+  4096-aligned
//!                | bitmap sector 0: 504 bytes of bits,   |  BM_* offsets
//!                |   u32 sector index, u32 crc32c        |
//!                | bitmap sector 1 ...                   |
//!  file_size     +--------------------------------------+
//! ```
//!
//! - The **header** holds the magic, version, geometry, the derived layout
//!   (checked against the geometry on open), a random instance id, and a
//!   crc32c. It is written once, at creation (into a temporary file that is
//!   synced and then hard-linked into place, so a crash during creation leaves
//!   either no file or a complete one). Nothing mutable lives in it, so it is
//!   never exposed to a torn write.
//! - The **AL** exists twice. Each copy holds a generation counter, the
//!   instance id, the flags (bit 0: clean), the number of extents, the extent
//!   numbers, and a crc32c over all of it. An update always writes the copy
//!   that does *not* hold the newest generation, with generation + 1, and then
//!   `fdatasync`s. Open picks the valid copy with the highest generation.
//!   *Why two alternating copies*: an update never overwrites the newest
//!   durable copy, so a torn or lost update (any subset of its sectors on disk)
//!   either yields a valid new copy or an invalid one, in which case the
//!   previous copy, untouched, is used; no sector atomicity is needed for the
//!   AL at all. The cost, rewriting the occupied entries (8 bytes each, 8 KiB
//!   for a full 1024-slot log) per cold-extent miss, is small next to the sync
//!   each miss pays anyway. The clean flag lives in the AL copy too, so it is
//!   updated by the same torn-safe mechanism, and the header stays immutable.
//! - The **bitmap** is updated in place, 512-byte sector by sector. Each
//!   sector carries its own index and crc32c. Bits only need to be durable at
//!   specific points (before an ack when the AL does not cover them, before
//!   the extent covering them leaves the AL); every sector write carries the
//!   in-memory image, a superset of the bits that must survive, so under the
//!   usual 512-byte write atomicity (the assumption DRBD and md also make)
//!   a torn multi-sector write leaves every sector either old (all bits that
//!   were durable) or new. A sector that nevertheless fails its checksum is
//!   treated as *all dirty* (conservative: a larger resync, never a loss) and
//!   rewritten; the count is reported.
//!
//! # Crash argument
//!
//! Invariant: at every instant, every byte of every acknowledged write whose
//! sequence is not committed, and every dirty granule set and not cleared, is
//! covered by (a) an extent in the newest valid durable AL copy or (b) a set
//! bit in the durable bitmap.
//!
//! - [`MetaFile::before_write`] returns `Ok` only after the new extents are in
//!   a synced AL copy (or the range's bits are synced): (a) or (b) holds
//!   before the ack. Hot extents are already durable: an extent enters the
//!   in-memory AL only after the AL copy naming it is synced.
//! - An extent leaves the AL only when its last sequence is committed (its
//!   writes are at the target) *and* after every pending bitmap sector
//!   overlapping it was written and synced (its bitmap-state bits are durable).
//!   The AL copy without it is written only after that sync.
//! - [`MetaFile::set_dirty`] writes lazily only when the whole range is covered
//!   by AL extents; otherwise it syncs the bits before returning.
//! - [`MetaFile::clear_dirty`] is lazy: an old durable bit is conservative.
//!   It never clears the granules of a write acknowledged through the bitmap
//!   fallback whose sequence is not committed yet (those bits are that
//!   write's only tracking), so a resync racing with such a write cannot
//!   untrack it.
//! - [`MetaFile::open`] of an unclean file first folds all AL extents into the
//!   bitmap and syncs it, and only then writes an empty, unclean AL copy: a
//!   crash in between reopens the old AL again (idempotent). The regions stay
//!   tracked as bits until the caller resyncs and clears them.
//! - [`MetaFile::close_clean`] folds extents that are still unreleased into the
//!   bitmap, syncs the bitmap, then writes an empty AL copy with the clean flag.
//! - A failed write or sync poisons the handle (after a failed `fdatasync` the
//!   kernel may have dropped the dirty pages): every later mutating call fails
//!   until the file is reopened, which re-derives everything from disk.
//!
//! A producer holds an exclusive `flock` on the file; the consumer uses
//! [`MetaFile::inspect`], which never writes and tolerates concurrent updates
//! (alternating AL copies; bitmap sectors re-read on checksum failure).

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

// ---------------------------------------------------------------------------
// Format constants
// ---------------------------------------------------------------------------

/// File magic, at [`HDR_MAGIC`].
pub const MAGIC: [u8; 8] = *b"FERRYMET";
/// Format version, at [`HDR_VERSION`].
pub const VERSION: u32 = 1;
/// The sector size the format is built from (bitmap atomicity unit).
pub const SECTOR_SIZE: u64 = 512;
/// Alignment of the AL copies and of the bitmap area.
pub const AREA_ALIGN: u64 = 4096;

/// Length of the header (sector 0).
pub const HEADER_LEN: usize = 512;
/// Header: `[u8; 8]` magic, [`MAGIC`].
pub const HDR_MAGIC: usize = 0;
/// Header: `u32` format version, [`VERSION`].
pub const HDR_VERSION: usize = 8;
/// Header: `u32` header length in bytes, [`HEADER_LEN`].
pub const HDR_HEADER_LEN: usize = 12;
/// Header: `u64` size of the protected disk in bytes.
pub const HDR_DISK_SIZE: usize = 16;
/// Header: `u64` bytes per bitmap bit (power of two).
pub const HDR_GRANULARITY: usize = 24;
/// Header: `u64` bytes per activity-log extent (power of two).
pub const HDR_EXTENT_SIZE: usize = 32;
/// Header: `u32` number of activity-log slots.
pub const HDR_AL_SLOTS: usize = 40;
/// Header: `u32` feature flags; none defined, must be 0.
pub const HDR_FEATURES: usize = 44;
/// Header: `u64` offset of AL copy 0 (copy 1 follows at + `al_copy_size`).
pub const HDR_AL_OFFSET: usize = 48;
/// Header: `u64` bytes reserved per AL copy.
pub const HDR_AL_COPY_SIZE: usize = 56;
/// Header: `u64` offset of the bitmap area.
pub const HDR_BITMAP_OFFSET: usize = 64;
/// Header: `u64` number of 512-byte bitmap sectors.
pub const HDR_BITMAP_SECTORS: usize = 72;
/// Header: `u64` minimum file size.
pub const HDR_FILE_SIZE: usize = 80;
/// Header: `u64` instance id, repeated in every AL copy.
pub const HDR_INSTANCE: usize = 88;
/// Header: `u32` crc32c of bytes `[0, HDR_CRC)`.
pub const HDR_CRC: usize = 508;

/// AL copy magic, at [`AL_MAGIC_OFF`].
pub const AL_MAGIC: [u8; 8] = *b"FERRYAL1";
/// AL copy: `[u8; 8]` magic.
pub const AL_MAGIC_OFF: usize = 0;
/// AL copy: `u64` generation; the valid copy with the highest one wins.
pub const AL_GENERATION: usize = 8;
/// AL copy: `u64` instance id, equal to the header's.
pub const AL_INSTANCE: usize = 16;
/// AL copy: `u32` flags, [`AL_FLAG_CLEAN`].
pub const AL_FLAGS: usize = 24;
/// AL copy: `u32` number of extent entries.
pub const AL_COUNT: usize = 28;
/// AL copy: `u64` reserved, 0.
pub const AL_RESERVED: usize = 32;
/// AL copy: `u32` crc32c of `[0, AL_ENTRIES + 8 * count)` with this field zero.
pub const AL_CRC: usize = 40;
/// AL copy: first `u64` extent number (extent `e` covers bytes
/// `[e * extent_size, (e + 1) * extent_size)`).
pub const AL_ENTRIES: usize = 48;
/// AL flag: the producer closed cleanly.
pub const AL_FLAG_CLEAN: u32 = 1;

/// Bitmap sector: bytes of bits (bit `i` of byte `j` = granule
/// `sector * BITS_PER_SECTOR + 8 * j + i`).
pub const BM_BITS_LEN: usize = 504;
/// Bitmap sector: `u32` sector index (detects misplaced sectors).
pub const BM_INDEX: usize = 504;
/// Bitmap sector: `u32` crc32c of `[0, BM_CRC)`.
pub const BM_CRC: usize = 508;
/// Granules per bitmap sector.
pub const BITS_PER_SECTOR: u64 = 8 * BM_BITS_LEN as u64;

/// Default activity-log extent size.
pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
/// Default number of activity-log slots.
pub const DEFAULT_AL_SLOTS: u32 = 1024;
/// Largest disk whose default granularity is 4 KiB.
pub const SMALL_DISK_LIMIT: u64 = 512 << 30;

/// Limits on the geometry (anything outside is invalid or corrupt).
pub const MAX_DISK_SIZE: u64 = 1 << 56;
/// Smallest granularity.
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity (and extent size).
pub const MAX_EXTENT_SIZE: u64 = 1 << 30;
/// Smallest extent size.
pub const MIN_EXTENT_SIZE: u64 = 4096;
/// Most activity-log slots.
pub const MAX_AL_SLOTS: u32 = 1 << 16;
/// Largest bitmap area (1 GiB: 34 TB at 4 KiB granules).
pub const MAX_BITMAP_BYTES: u64 = 1 << 30;

const INSPECT_ATTEMPTS: u32 = 5;
/// Fallback writes remembered before coalescing.
const MAX_PINS: usize = 4096;

/// The bitmap granularity the seed's filter uses: 4 KiB for disks up to
/// 512 GiB, 16 KiB above.
pub fn default_granularity(disk_size: u64) -> u64 {
    if disk_size <= SMALL_DISK_LIMIT {
        4096
    } else {
        16384
    }
}

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// A byte range of the protected disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Range {
    /// A range.
    pub fn new(offset: u64, len: u64) -> Self {
        Range { offset, len }
    }

    /// One past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// The shape of a tracking file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaGeometry {
    /// Size of the protected disk in bytes.
    pub disk_size: u64,
    /// Bytes per dirty bit (power of two, 512 B ..= extent size).
    pub granularity: u64,
    /// Bytes per activity-log extent (power of two, 4 KiB ..= 1 GiB).
    pub extent_size: u64,
    /// Number of activity-log slots (1 ..= 65536).
    pub al_slots: u32,
}

impl MetaGeometry {
    /// The defaults for a disk: [`default_granularity`], 4 MiB extents, 1024 slots.
    pub fn new(disk_size: u64) -> Self {
        MetaGeometry {
            disk_size,
            granularity: default_granularity(disk_size),
            extent_size: DEFAULT_EXTENT_SIZE,
            al_slots: DEFAULT_AL_SLOTS,
        }
    }

    /// Check the limits; `Err` names the offending field.
    pub fn validate(&self) -> Result<()> {
        Layout::compute(self).map(|_| ()).map_err(Error::invalid)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.disk_size == 0 || self.disk_size > MAX_DISK_SIZE {
            return Err(format!(
                "disk size {} out of range 1..={MAX_DISK_SIZE}",
                self.disk_size
            ));
        }
        if !self.granularity.is_power_of_two()
            || self.granularity < MIN_GRANULARITY
            || self.granularity > MAX_EXTENT_SIZE
        {
            return Err(format!(
                "granularity {} is not a power of two in {MIN_GRANULARITY}..={MAX_EXTENT_SIZE}",
                self.granularity
            ));
        }
        if !self.extent_size.is_power_of_two()
            || self.extent_size < MIN_EXTENT_SIZE
            || self.extent_size > MAX_EXTENT_SIZE
        {
            return Err(format!(
                "extent size {} is not a power of two in {MIN_EXTENT_SIZE}..={MAX_EXTENT_SIZE}",
                self.extent_size
            ));
        }
        if self.extent_size < self.granularity {
            return Err(format!(
                "extent size {} is smaller than the granularity {}",
                self.extent_size, self.granularity
            ));
        }
        if self.al_slots == 0 || self.al_slots > MAX_AL_SLOTS {
            return Err(format!(
                "activity-log slots {} out of range 1..={MAX_AL_SLOTS}",
                self.al_slots
            ));
        }
        Ok(())
    }
}

/// How [`MetaFile::before_write`] made a write safe to acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coverage {
    /// Every extent was already in the activity log: no disk I/O.
    Hot,
    /// Cold extents were added to the activity log (one write + sync, two if
    /// an evicted extent's bitmap bits had to be flushed first).
    Logged,
    /// The activity log had no room: the write's range (rounded out to
    /// granules) is now durably dirty in the bitmap and will stay dirty until
    /// the caller resyncs and clears it.
    Bitmap,
}

/// Counters of a [`MetaFile`] since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaStats {
    /// `fdatasync` calls.
    pub syncs: u64,
    /// AL copies written.
    pub al_writes: u64,
    /// Extents found hot by `before_write`.
    pub al_hits: u64,
    /// Extents found cold by `before_write`.
    pub al_misses: u64,
    /// Extents evicted from the AL.
    pub evictions: u64,
    /// `before_write` calls that fell back to the bitmap.
    pub fallbacks: u64,
    /// Bitmap sectors written.
    pub bitmap_sector_writes: u64,
}

/// What the producer learns when it opens a tracking file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The previous producer closed with [`MetaFile::close_clean`].
    pub was_clean: bool,
    /// Every region that may hold writes not confirmed at the target: after a
    /// crash the AL extents and dirty bits, after a clean close the dirty bits.
    /// Sorted, merged, clipped to the disk. These regions are now dirty bits
    /// in the file (they stay tracked until [`MetaFile::clear_dirty`]).
    pub possibly_unshipped: Vec<Range>,
    /// The AL extents the file held (already included above).
    pub al_extents: Vec<Range>,
    /// Bitmap sectors that failed their checksum and were taken as all dirty.
    pub bad_bitmap_sectors: u64,
}

/// A read-only view of a tracking file, for the consumer ([`MetaFile::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaSnapshot {
    /// The file's geometry.
    pub geometry: MetaGeometry,
    /// The clean flag is set (no producer has it open for writing).
    pub clean: bool,
    /// Generation of the AL copy read.
    pub generation: u64,
    /// Extents in the AL.
    pub al_extents: Vec<Range>,
    /// Regions with dirty bits (durable or about to be; lazily written bits of
    /// AL extents may be missing, the AL covers them).
    pub dirty: Vec<Range>,
    /// `al_extents` and `dirty`, merged: what may currently be unshipped.
    pub possibly_unshipped: Vec<Range>,
    /// Bitmap sectors that failed their checksum on every attempt (reported
    /// as all dirty).
    pub bad_bitmap_sectors: u64,
}

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    n_granules: u64,
    n_extents: u64,
    bitmap_sectors: u64,
    al_offset: u64,
    al_copy_size: u64,
    bitmap_offset: u64,
    file_size: u64,
}

impl Layout {
    fn compute(geo: &MetaGeometry) -> std::result::Result<Layout, String> {
        geo.check()?;
        // All products below are bounded by the checks: no overflow.
        let n_granules = geo.disk_size.div_ceil(geo.granularity);
        let bitmap_sectors = n_granules.div_ceil(BITS_PER_SECTOR);
        let bitmap_bytes = bitmap_sectors * SECTOR_SIZE;
        if bitmap_bytes > MAX_BITMAP_BYTES {
            return Err(format!(
                "bitmap of {bitmap_bytes} bytes exceeds {MAX_BITMAP_BYTES} (raise the granularity)"
            ));
        }
        let n_extents = geo.disk_size.div_ceil(geo.extent_size);
        let al_copy_size = round_up(AL_ENTRIES as u64 + 8 * u64::from(geo.al_slots), AREA_ALIGN);
        let al_offset = AREA_ALIGN;
        let bitmap_offset = al_offset + 2 * al_copy_size;
        Ok(Layout {
            n_granules,
            n_extents,
            bitmap_sectors,
            al_offset,
            al_copy_size,
            bitmap_offset,
            file_size: bitmap_offset + bitmap_bytes,
        })
    }

    fn al_copy_offset(&self, copy: usize) -> u64 {
        if copy == 0 {
            self.al_offset
        } else {
            self.al_offset + self.al_copy_size
        }
    }

    fn bitmap_bytes(&self) -> u64 {
        self.bitmap_sectors * SECTOR_SIZE
    }
}

fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

/// Index conversion for values already bounded by a validated layout.
fn ix(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn encode_header(geo: &MetaGeometry, layout: &Layout, instance: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[HDR_MAGIC..HDR_MAGIC + 8].copy_from_slice(&MAGIC);
    put_u32(&mut h, HDR_VERSION, VERSION);
    put_u32(&mut h, HDR_HEADER_LEN, 512);
    put_u64(&mut h, HDR_DISK_SIZE, geo.disk_size);
    put_u64(&mut h, HDR_GRANULARITY, geo.granularity);
    put_u64(&mut h, HDR_EXTENT_SIZE, geo.extent_size);
    put_u32(&mut h, HDR_AL_SLOTS, geo.al_slots);
    put_u32(&mut h, HDR_FEATURES, 0);
    put_u64(&mut h, HDR_AL_OFFSET, layout.al_offset);
    put_u64(&mut h, HDR_AL_COPY_SIZE, layout.al_copy_size);
    put_u64(&mut h, HDR_BITMAP_OFFSET, layout.bitmap_offset);
    put_u64(&mut h, HDR_BITMAP_SECTORS, layout.bitmap_sectors);
    put_u64(&mut h, HDR_FILE_SIZE, layout.file_size);
    put_u64(&mut h, HDR_INSTANCE, instance);
    let crc = crc32c::crc32c(&h[..HDR_CRC]);
    put_u32(&mut h, HDR_CRC, crc);
    h
}

/// Validate a header; errors are corruption messages (with the field offset).
fn decode_header(
    h: &[u8; HEADER_LEN],
) -> std::result::Result<(MetaGeometry, Layout, u64), (String, usize)> {
    if h[HDR_MAGIC..HDR_MAGIC + 8] != MAGIC {
        return Err(("bad magic: not a ferry metadata file".into(), HDR_MAGIC));
    }
    let version = get_u32(h, HDR_VERSION);
    if version != VERSION {
        return Err((format!("unsupported version {version}"), HDR_VERSION));
    }
    let crc = get_u32(h, HDR_CRC);
    if crc != crc32c::crc32c(&h[..HDR_CRC]) {
        return Err(("header checksum mismatch".into(), HDR_CRC));
    }
    if get_u32(h, HDR_HEADER_LEN) != 512 {
        return Err(("bad header length".into(), HDR_HEADER_LEN));
    }
    if get_u32(h, HDR_FEATURES) != 0 {
        return Err(("unknown feature flags".into(), HDR_FEATURES));
    }
    let geo = MetaGeometry {
        disk_size: get_u64(h, HDR_DISK_SIZE),
        granularity: get_u64(h, HDR_GRANULARITY),
        extent_size: get_u64(h, HDR_EXTENT_SIZE),
        al_slots: get_u32(h, HDR_AL_SLOTS),
    };
    let layout =
        Layout::compute(&geo).map_err(|m| (format!("bad geometry: {m}"), HDR_DISK_SIZE))?;
    let stored = [
        (HDR_AL_OFFSET, layout.al_offset),
        (HDR_AL_COPY_SIZE, layout.al_copy_size),
        (HDR_BITMAP_OFFSET, layout.bitmap_offset),
        (HDR_BITMAP_SECTORS, layout.bitmap_sectors),
        (HDR_FILE_SIZE, layout.file_size),
    ];
    for (off, want) in stored {
        let got = get_u64(h, off);
        if got != want {
            return Err((
                format!("layout field says {got}, geometry implies {want}"),
                off,
            ));
        }
    }
    Ok((geo, layout, get_u64(h, HDR_INSTANCE)))
}

/// One AL copy, padded to whole sectors.
fn encode_al(generation: u64, instance: u64, clean: bool, extents: &[u64]) -> Vec<u8> {
    let used = AL_ENTRIES + 8 * extents.len();
    let mut b = vec![0u8; ix(round_up(used as u64, SECTOR_SIZE))];
    b[AL_MAGIC_OFF..AL_MAGIC_OFF + 8].copy_from_slice(&AL_MAGIC);
    put_u64(&mut b, AL_GENERATION, generation);
    put_u64(&mut b, AL_INSTANCE, instance);
    put_u32(&mut b, AL_FLAGS, if clean { AL_FLAG_CLEAN } else { 0 });
    // extents.len() <= al_slots <= MAX_AL_SLOTS.
    put_u32(
        &mut b,
        AL_COUNT,
        u32::try_from(extents.len()).unwrap_or(u32::MAX),
    );
    for (i, e) in extents.iter().enumerate() {
        put_u64(&mut b, AL_ENTRIES + 8 * i, *e);
    }
    let crc = crc32c::crc32c(&b[..used]);
    put_u32(&mut b, AL_CRC, crc);
    b
}

/// A valid AL copy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct AlCopy {
    generation: u64,
    clean: bool,
    extents: Vec<u64>,
}

/// Stamp a bitmap sector's index and checksum.
fn seal_sector(sector: &mut [u8], index: u64) {
    // The index is informative; the low 32 bits are enough to catch misplacement.
    put_u32(
        sector,
        BM_INDEX,
        u32::try_from(index & u64::from(u32::MAX)).unwrap_or(0),
    );
    let crc = crc32c::crc32c(&sector[..BM_CRC]);
    put_u32(sector, BM_CRC, crc);
}

fn sector_ok(sector: &[u8], index: u64) -> bool {
    u64::from(get_u32(sector, BM_INDEX)) == (index & u64::from(u32::MAX))
        && get_u32(sector, BM_CRC) == crc32c::crc32c(&sector[..BM_CRC])
}

/// Set (or clear) bits `[lo, hi)` of one sector's bit bytes; true if anything changed.
fn fill_bits(bits: &mut [u8], mut lo: u64, hi: u64, value: bool) -> bool {
    let mut changed = false;
    while lo < hi {
        let byte = ix(lo / 8);
        if lo & 7 == 0 && hi - lo >= 8 {
            let n = ix((hi - lo) / 8);
            let v = if value { 0xff } else { 0 };
            let run = &mut bits[byte..byte + n];
            if run.iter().any(|b| *b != v) {
                run.fill(v);
                changed = true;
            }
            lo += 8 * (n as u64);
        } else {
            let mask = 1u8 << (lo % 8);
            let old = bits[byte];
            bits[byte] = if value { old | mask } else { old & !mask };
            changed |= bits[byte] != old;
            lo += 1;
        }
    }
    changed
}

/// Sort and merge ranges (overlapping or adjacent), dropping empty ones.
pub fn merge_ranges(mut v: Vec<Range>) -> Vec<Range> {
    v.retain(|r| r.len > 0);
    v.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(v.len());
    for r in v {
        if let Some(last) = out.last_mut() {
            if r.offset <= last.end() {
                let end = last.end().max(r.end());
                last.len = end - last.offset;
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// Granule runs of a bitmap image (sealed sectors), as byte ranges clipped to the disk.
fn bitmap_ranges(image: &[u8], geo: &MetaGeometry, layout: &Layout) -> Vec<Range> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for s in 0..layout.bitmap_sectors {
        let base = ix(s * SECTOR_SIZE);
        let bits = &image[base..base + BM_BITS_LEN];
        for (j, &byte) in bits.iter().enumerate() {
            if byte == 0 {
                continue;
            }
            for bit in 0..8u64 {
                if byte & (1u8 << bit) == 0 {
                    continue;
                }
                let g = s * BITS_PER_SECTOR + 8 * (j as u64) + bit;
                if g >= layout.n_granules {
                    break;
                }
                match runs.last_mut() {
                    Some(last) if last.1 == g => last.1 = g + 1,
                    _ => runs.push((g, g + 1)),
                }
            }
        }
    }
    runs.into_iter()
        .map(|(g0, g1)| {
            let start = g0 * geo.granularity;
            let end = (g1 * geo.granularity).min(geo.disk_size);
            Range::new(start, end - start)
        })
        .collect()
}

fn extent_range(geo: &MetaGeometry, e: u64) -> Range {
    let start = e * geo.extent_size;
    let end = (start + geo.extent_size).min(geo.disk_size);
    Range::new(start, end - start)
}

// ---------------------------------------------------------------------------
// Storage backend (a file; a simulated disk in tests)
// ---------------------------------------------------------------------------

trait Backend: fmt::Debug + Send {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
}

#[derive(Debug)]
struct FileBackend(File);

impl Backend for FileBackend {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
}

fn read_exact(io: &dyn Backend, buf: &mut [u8], offset: u64, path: &Path) -> Result<()> {
    io.read_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::corrupt("file truncated")
        } else {
            Error::io(e, "read")
        }
        .at_path(path)
        .at_offset(offset)
    })
}

/// Everything read and validated from a file.
#[derive(Debug)]
struct Loaded {
    geo: MetaGeometry,
    layout: Layout,
    instance: u64,
    al: AlCopy,
    al_copy: usize,
    bitmap: Vec<u8>,
    bad_sectors: Vec<u64>,
}

fn read_al_copy(
    io: &dyn Backend,
    layout: &Layout,
    geo: &MetaGeometry,
    instance: u64,
    copy: usize,
    path: &Path,
) -> Result<Option<AlCopy>> {
    let off = layout.al_copy_offset(copy);
    let mut head = [0u8; AL_ENTRIES];
    read_exact(io, &mut head, off, path)?;
    if head[AL_MAGIC_OFF..AL_MAGIC_OFF + 8] != AL_MAGIC || get_u64(&head, AL_INSTANCE) != instance {
        return Ok(None);
    }
    let count = get_u32(&head, AL_COUNT);
    if count > geo.al_slots {
        return Ok(None);
    }
    // Bounded by al_slots <= MAX_AL_SLOTS, and inside the file (length checked).
    let used = AL_ENTRIES + 8 * ix(u64::from(count));
    let mut buf = vec![0u8; used];
    read_exact(io, &mut buf, off, path)?;
    let crc = get_u32(&buf, AL_CRC);
    put_u32(&mut buf, AL_CRC, 0);
    if crc != crc32c::crc32c(&buf) {
        return Ok(None);
    }
    let extents: Vec<u64> = (0..ix(u64::from(count)))
        .map(|i| get_u64(&buf, AL_ENTRIES + 8 * i))
        .collect();
    if extents.iter().any(|e| *e >= layout.n_extents) {
        return Ok(None);
    }
    Ok(Some(AlCopy {
        generation: get_u64(&buf, AL_GENERATION),
        clean: get_u32(&buf, AL_FLAGS) & AL_FLAG_CLEAN != 0,
        extents,
    }))
}

fn load(io: &dyn Backend, path: &Path) -> Result<Loaded> {
    let len = io.len().map_err(|e| Error::io(e, "stat").at_path(path))?;
    if len < HEADER_LEN as u64 {
        return Err(
            Error::corrupt(format!("file of {len} bytes is shorter than the header")).at_path(path),
        );
    }
    let mut h = [0u8; HEADER_LEN];
    read_exact(io, &mut h, 0, path)?;
    let (geo, layout, instance) = decode_header(&h)
        .map_err(|(m, off)| Error::corrupt(m).at_path(path).at_offset(off as u64))?;
    if len < layout.file_size {
        return Err(Error::corrupt(format!(
            "file of {len} bytes is shorter than its layout ({} bytes)",
            layout.file_size
        ))
        .at_path(path));
    }
    let a = read_al_copy(io, &layout, &geo, instance, 0, path)?;
    let b = read_al_copy(io, &layout, &geo, instance, 1, path)?;
    let (al, al_copy) = match (a, b) {
        (Some(a), Some(b)) if b.generation > a.generation => (b, 1),
        (Some(a), _) => (a, 0),
        (None, Some(b)) => (b, 1),
        (None, None) => {
            return Err(Error::corrupt("no valid activity-log copy (checksum)")
                .at_path(path)
                .at_offset(layout.al_offset))
        }
    };
    // Checked against the file length above.
    let mut bitmap = vec![0u8; ix(layout.bitmap_bytes())];
    read_exact(io, &mut bitmap, layout.bitmap_offset, path)?;
    let bad_sectors = (0..layout.bitmap_sectors)
        .filter(|&s| {
            let base = ix(s * SECTOR_SIZE);
            !sector_ok(&bitmap[base..base + ix(SECTOR_SIZE)], s)
        })
        .collect();
    Ok(Loaded {
        geo,
        layout,
        instance,
        al,
        al_copy,
        bitmap,
        bad_sectors,
    })
}

fn new_instance() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mixed = (t ^ (u128::from(std::process::id()) << 64)).to_le_bytes();
    let v = crc32c::crc32c(&mixed[..8]);
    let w = crc32c::crc32c(&mixed[8..]);
    (u64::from(v) << 32 | u64::from(w)) ^ u64::try_from(t & u128::from(u64::MAX)).unwrap_or(0)
}

/// How long opening waits for a previous producer's lock to go: a closed
/// file whose last reference an io_uring instance held is released by the
/// kernel's deferred teardown, a moment after the close.
const LOCK_WAIT: Duration = Duration::from_secs(2);

fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    match flock_exclusive_within(file, LOCK_WAIT) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(Error::new(
            ErrorKind::Io,
            "already open for writing by another producer",
        )
        .at_path(path)),
        Err(e) => Err(Error::io(e, "flock").at_path(path)),
    }
}

/// Takes an exclusive `flock` on `file`, waiting up to `wait` for a holder
/// that is going away (a process still exiting, a descriptor io_uring
/// releases late). Fails with `EWOULDBLOCK` if it is still held then.
pub fn flock_exclusive_within(file: &File, wait: Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock only takes the descriptor number; `file` keeps it
        // open for the whole call, and no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || std::time::Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------
// MetaFile
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Slot {
    extent: u64,
    last_seq: u64,
    last_use: u64,
}

/// The producer's handle on a tracking file (exclusive: `flock`).
///
/// Dropping it without [`MetaFile::close_clean`] is a crash as far as the
/// file is concerned: the next open reports every AL extent.
pub struct MetaFile {
    path: PathBuf,
    io: Box<dyn Backend>,
    geo: MetaGeometry,
    layout: Layout,
    instance: u64,
    slots: Vec<Option<Slot>>,
    index: HashMap<u64, usize>,
    committed: Option<u64>,
    tick: u64,
    al_generation: u64,
    al_copy: usize,
    bitmap: Vec<u8>,
    pending: BTreeSet<u64>,
    /// Granule-rounded ranges of writes acknowledged through the bitmap
    /// fallback, with their sequence: their bits survive `clear_dirty` until
    /// the sequence is committed.
    pins: Vec<(u64, Range)>,
    stats: MetaStats,
    poisoned: bool,
}

impl fmt::Debug for MetaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaFile")
            .field("path", &self.path)
            .field("geometry", &self.geo)
            .field("al_used", &self.index.len())
            .field("al_generation", &self.al_generation)
            .field("committed", &self.committed)
            .field("pending_sectors", &self.pending.len())
            .field("stats", &self.stats)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl MetaFile {
    /// Create a new tracking file (it must not exist), open for writing and
    /// marked unclean. The file is built under a temporary name, synced, then
    /// linked into place, so a crash leaves no half-made file at `path`.
    pub fn create(path: &Path, geometry: MetaGeometry) -> Result<MetaFile> {
        let layout = Layout::compute(&geometry).map_err(|m| Error::invalid(m).at_path(path))?;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| Error::io(e, "create").at_path(&tmp))?;
        let result = (|| {
            lock_exclusive(&file, path)?;
            file.set_len(layout.file_size)
                .map_err(|e| Error::io(e, "set_len").at_path(&tmp))?;
            let meta = MetaFile::create_on(
                Box::new(FileBackend(
                    file.try_clone().map_err(|e| Error::io(e, "dup"))?,
                )),
                path,
                geometry,
                layout,
            )?;
            file.sync_all()
                .map_err(|e| Error::io(e, "fsync").at_path(&tmp))?;
            std::fs::hard_link(&tmp, path).map_err(|e| Error::io(e, "link").at_path(path))?;
            Ok(meta)
        })();
        let _ = std::fs::remove_file(&tmp);
        let meta = result?;
        if let Some(dir) = path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(e, "fsync directory").at_path(dir))?;
        }
        Ok(meta)
    }

    /// Write a fresh image through `io` (sized by the caller) and sync it.
    fn create_on(
        io: Box<dyn Backend>,
        path: &Path,
        geo: MetaGeometry,
        layout: Layout,
    ) -> Result<MetaFile> {
        let instance = new_instance();
        let mut bitmap = vec![0u8; ix(layout.bitmap_bytes())];
        for s in 0..layout.bitmap_sectors {
            let base = ix(s * SECTOR_SIZE);
            seal_sector(&mut bitmap[base..base + ix(SECTOR_SIZE)], s);
        }
        let mut meta = MetaFile {
            path: path.to_path_buf(),
            io,
            geo,
            layout,
            instance,
            slots: vec![None; ix(u64::from(geo.al_slots))],
            index: HashMap::new(),
            committed: None,
            tick: 0,
            al_generation: 1,
            al_copy: 0,
            bitmap,
            pending: BTreeSet::new(),
            pins: Vec::new(),
            stats: MetaStats::default(),
            poisoned: false,
        };
        let off = meta.layout.bitmap_offset;
        meta.write_raw_bitmap(off)?;
        let copy1 = encode_al(0, instance, false, &[]);
        meta.write_io(&copy1, layout.al_copy_offset(1))?;
        let copy0 = encode_al(1, instance, false, &[]);
        meta.write_io(&copy0, layout.al_copy_offset(0))?;
        meta.write_io(&encode_header(&geo, &layout, instance), 0)?;
        meta.sync()?;
        Ok(meta)
    }

    fn write_raw_bitmap(&mut self, off: u64) -> Result<()> {
        if let Err(e) = self.io.write_at(&self.bitmap, off) {
            self.poisoned = true;
            return Err(Error::io(e, "write").at_path(&self.path).at_offset(off));
        }
        Ok(())
    }

    /// Open an existing file for writing (the producer). Validates everything,
    /// folds the previous activity log into the bitmap, marks the file unclean
    /// durably, and reports what may be unshipped.
    pub fn open(path: &Path) -> Result<(MetaFile, Recovery)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(e, "open").at_path(path))?;
        lock_exclusive(&file, path)?;
        MetaFile::open_on(Box::new(FileBackend(file)), path)
    }

    fn open_on(io: Box<dyn Backend>, path: &Path) -> Result<(MetaFile, Recovery)> {
        let loaded = load(io.as_ref(), path)?;
        let Loaded {
            geo,
            layout,
            instance,
            al,
            al_copy,
            bitmap,
            bad_sectors,
        } = loaded;
        let mut meta = MetaFile {
            path: path.to_path_buf(),
            io,
            geo,
            layout,
            instance,
            slots: vec![None; ix(u64::from(geo.al_slots))],
            index: HashMap::new(),
            committed: None,
            tick: 0,
            al_generation: al.generation,
            al_copy,
            bitmap,
            pending: BTreeSet::new(),
            pins: Vec::new(),
            stats: MetaStats::default(),
            poisoned: false,
        };
        // Unreadable bitmap sectors: everything they cover is dirty.
        for &s in &bad_sectors {
            let base = ix(s * SECTOR_SIZE);
            meta.bitmap[base..base + BM_BITS_LEN].fill(0xff);
            meta.pending.insert(s);
        }
        // The AL extents become dirty bits (a clean close leaves none).
        let al_extents = merge_ranges(al.extents.iter().map(|&e| extent_range(&geo, e)).collect());
        for r in &al_extents {
            meta.set_bits(*r);
        }
        // Bits durable before the AL that named these extents is replaced.
        if meta.write_pending()? {
            meta.sync()?;
        }
        meta.write_al(&[], false)?;
        let recovery = Recovery {
            was_clean: al.clean,
            possibly_unshipped: meta.dirty_ranges(),
            al_extents,
            bad_bitmap_sectors: bad_sectors.len() as u64,
        };
        Ok((meta, recovery))
    }

    /// Read a tracking file without changing it (the consumer). Tolerates a
    /// producer writing concurrently: an AL copy or bitmap sector caught
    /// mid-write fails its checksum and the read is retried; a bitmap sector
    /// still bad after the retries is reported as all dirty.
    pub fn inspect(path: &Path) -> Result<MetaSnapshot> {
        let file = File::open(path).map_err(|e| Error::io(e, "open").at_path(path))?;
        MetaFile::inspect_on(&FileBackend(file), path)
    }

    fn inspect_on(io: &dyn Backend, path: &Path) -> Result<MetaSnapshot> {
        let mut attempt = 0;
        let loaded = loop {
            attempt += 1;
            let last = attempt >= INSPECT_ATTEMPTS;
            match load(io, path) {
                Ok(l) if l.bad_sectors.is_empty() || last => break l,
                Ok(_) => {}
                // Only the AL copies can be "caught mid-write"; the header is
                // immutable, but retrying costs little.
                Err(e) if e.kind() == ErrorKind::Corrupt && !last => {}
                Err(e) => return Err(e),
            }
            std::thread::sleep(Duration::from_millis(2 * u64::from(attempt)));
        };
        let mut bitmap = loaded.bitmap;
        for &s in &loaded.bad_sectors {
            let base = ix(s * SECTOR_SIZE);
            bitmap[base..base + BM_BITS_LEN].fill(0xff);
        }
        let geo = loaded.geo;
        let al_extents = merge_ranges(
            loaded
                .al
                .extents
                .iter()
                .map(|&e| extent_range(&geo, e))
                .collect(),
        );
        let dirty = bitmap_ranges(&bitmap, &geo, &loaded.layout);
        let mut all = al_extents.clone();
        all.extend_from_slice(&dirty);
        Ok(MetaSnapshot {
            geometry: geo,
            clean: loaded.al.clean,
            generation: loaded.al.generation,
            al_extents,
            dirty,
            possibly_unshipped: merge_ranges(all),
            bad_bitmap_sectors: loaded.bad_sectors.len() as u64,
        })
    }

    /// The file's geometry.
    pub fn geometry(&self) -> MetaGeometry {
        self.geo
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Counters since open.
    pub fn stats(&self) -> MetaStats {
        self.stats
    }

    /// Number of extents in the activity log.
    pub fn al_len(&self) -> usize {
        self.index.len()
    }

    /// Make a write safe to acknowledge: every extent it touches is durably
    /// in the activity log (or, if the log has no room, its range is durably
    /// dirty in the bitmap). `seq` is the write's record sequence; it must be
    /// above the committed sequence. Returns only when the write may be acked.
    pub fn before_write(&mut self, range: Range, seq: u64) -> Result<Coverage> {
        self.check_writable()?;
        self.check_range(range)?;
        if let Some(c) = self.committed {
            if seq <= c {
                return Err(Error::invalid(format!(
                    "write sequence {seq} is not above the committed sequence {c}"
                ))
                .at_path(&self.path));
            }
        }
        if range.len == 0 {
            return Ok(Coverage::Hot);
        }
        self.tick += 1;
        let e0 = range.offset / self.geo.extent_size;
        let e1 = (range.end() - 1) / self.geo.extent_size;
        let mut cold: Vec<u64> = Vec::new();
        for e in e0..=e1 {
            match self.index.get(&e) {
                Some(&i) => {
                    if let Some(slot) = self.slots[i].as_mut() {
                        slot.last_seq = slot.last_seq.max(seq);
                        slot.last_use = self.tick;
                    }
                    self.stats.al_hits += 1;
                }
                None => {
                    cold.push(e);
                    self.stats.al_misses += 1;
                }
            }
        }
        if cold.is_empty() {
            return Ok(Coverage::Hot);
        }
        let Some(targets) = self.find_slots(cold.len(), e0, e1) else {
            // No room: the bitmap carries this write, durably before the ack.
            self.set_bits(range);
            self.write_pending()?;
            self.sync()?;
            self.stats.fallbacks += 1;
            let (g0, g1) = self.granules_out(range);
            let gran = self.geo.granularity;
            self.pin(seq, Range::new(g0 * gran, (g1 - g0) * gran));
            return Ok(Coverage::Bitmap);
        };
        let mut slots = self.slots.clone();
        for (&i, &e) in targets.iter().zip(&cold) {
            slots[i] = Some(Slot {
                extent: e,
                last_seq: seq,
                last_use: self.tick,
            });
        }
        self.commit_slots(slots)?;
        Ok(Coverage::Logged)
    }

    /// Pick `k` slots: free ones first, then evictable ones, least recently
    /// used first, never one of the extents `e0..=e1`. `None` if there are
    /// not enough.
    fn find_slots(&self, k: usize, e0: u64, e1: u64) -> Option<Vec<usize>> {
        let mut out: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none())
            .take(k)
            .collect();
        if out.len() < k {
            let mut evictable: Vec<(u64, usize)> = self
                .slots
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.map(|s| (i, s)))
                .filter(|(_, s)| self.is_evictable(s) && !(e0..=e1).contains(&s.extent))
                .map(|(i, s)| (s.last_use, i))
                .collect();
            if out.len() + evictable.len() < k {
                return None;
            }
            evictable.sort_unstable();
            out.extend(evictable.iter().take(k - out.len()).map(|&(_, i)| i));
        }
        Some(out)
    }

    fn is_evictable(&self, slot: &Slot) -> bool {
        self.committed.is_some_and(|c| slot.last_seq <= c)
    }

    /// Make `slots` the activity log: flush the bitmap bits of evicted
    /// extents first, then write and sync the AL copy, then adopt it.
    fn commit_slots(&mut self, slots: Vec<Option<Slot>>) -> Result<()> {
        let mut evicted = Vec::new();
        for (old, new) in self.slots.iter().zip(&slots) {
            if let Some(o) = old {
                if new.map(|n| n.extent) != Some(o.extent) {
                    evicted.push(o.extent);
                }
            }
        }
        if evicted.iter().any(|&e| self.pending_overlaps_extent(e)) {
            self.write_pending()?;
            self.sync()?;
        }
        let extents: Vec<u64> = slots.iter().flatten().map(|s| s.extent).collect();
        self.write_al(&extents, false)?;
        self.stats.evictions += evicted.len() as u64;
        self.index = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (s.extent, i)))
            .collect();
        self.slots = slots;
        Ok(())
    }

    /// The consumer committed every record up to `committed_seq` (durable at
    /// the target): extents whose last write is at or below it become
    /// evictable. Nothing is written; eviction happens when a slot is needed.
    pub fn release(&mut self, committed_seq: u64) {
        let c = self
            .committed
            .map_or(committed_seq, |c| c.max(committed_seq));
        self.committed = Some(c);
        self.pins.retain(|(seq, _)| *seq > c);
    }

    /// Remember a fallback write until its sequence is committed, keeping the
    /// list short by coalescing (a wider pin only keeps more bits).
    fn pin(&mut self, seq: u64, range: Range) {
        self.pins.push((seq, range));
        if self.pins.len() <= MAX_PINS {
            return;
        }
        self.pins.sort_unstable_by_key(|(_, r)| r.offset);
        let mut merged: Vec<(u64, Range)> = Vec::with_capacity(self.pins.len());
        for &(seq, r) in &self.pins {
            match merged.last_mut() {
                Some((s, last)) if r.offset <= last.end() => {
                    *s = (*s).max(seq);
                    let end = last.end().max(r.end());
                    last.len = end - last.offset;
                }
                _ => merged.push((seq, r)),
            }
        }
        // Still too many: join neighbours, gaps included.
        while merged.len() > MAX_PINS / 2 {
            merged = merged
                .chunks(2)
                .map(|c| {
                    let (s0, a) = c[0];
                    let (s1, b) = *c.last().unwrap_or(&c[0]);
                    (s0.max(s1), Range::new(a.offset, b.end() - a.offset))
                })
                .collect();
        }
        self.pins = merged;
    }

    /// Evict every evictable extent now (one AL write + sync, plus a bitmap
    /// flush if needed); returns how many. Useful when idle, so a crash
    /// resyncs less.
    pub fn trim(&mut self) -> Result<usize> {
        self.check_writable()?;
        let mut slots = self.slots.clone();
        let mut n = 0;
        for s in slots.iter_mut() {
            if s.is_some_and(|slot| self.is_evictable(&slot)) {
                *s = None;
                n += 1;
            }
        }
        if n > 0 {
            self.commit_slots(slots)?;
        }
        Ok(n)
    }

    /// Mark `range` dirty (rounded out to granules): writes the ring could not
    /// hold. If every extent of the range is in the activity log the bits are
    /// written lazily (the AL covers them, and they are flushed before the
    /// extent leaves it); otherwise they are durable when this returns.
    pub fn set_dirty(&mut self, range: Range) -> Result<()> {
        self.check_writable()?;
        self.check_range(range)?;
        if range.len == 0 {
            return Ok(());
        }
        self.set_bits(range);
        let e0 = range.offset / self.geo.extent_size;
        let e1 = (range.end() - 1) / self.geo.extent_size;
        let covered = (e0..=e1).all(|e| self.index.contains_key(&e));
        if !covered {
            let (g0, g1) = self.granules_out(range);
            let s0 = g0 / BITS_PER_SECTOR;
            let s1 = (g1 - 1) / BITS_PER_SECTOR;
            if self.pending.range(s0..=s1).next().is_some() {
                self.write_pending()?;
                self.sync()?;
            }
        }
        Ok(())
    }

    /// Mark many ranges dirty at once (each rounded out to granules) and
    /// make the bits durable with one write pass and at most one sync:
    /// for marking a whole disk's allocated regions (initial copy, full
    /// resync), where [`MetaFile::set_dirty`] would sync once per range.
    /// Every range is checked before any bit is set.
    pub fn set_dirty_ranges(&mut self, ranges: &[Range]) -> Result<()> {
        self.check_writable()?;
        for &range in ranges {
            self.check_range(range)?;
        }
        for &range in ranges {
            self.set_bits(range);
        }
        if self.write_pending()? {
            self.sync()?;
        }
        Ok(())
    }

    /// Clear the bits of the granules lying entirely inside `range` (a partial
    /// granule at the disk's end counts as entire): call after a resync
    /// shipped the region's current content. Lazy: written with the next
    /// flush (a stale set bit only costs a resync).
    ///
    /// Granules of writes acknowledged through the bitmap fallback
    /// ([`Coverage::Bitmap`]) whose sequence is not yet committed keep their
    /// bits: those bits are the write's only tracking, and the resync may
    /// have read the region before the write landed. Clear again after the
    /// commit. The caller must likewise not clear a region that took a
    /// [`MetaFile::set_dirty`] after the resync read it.
    pub fn clear_dirty(&mut self, range: Range) -> Result<()> {
        self.check_writable()?;
        self.check_range(range)?;
        let gran = self.geo.granularity;
        let g0 = range.offset.div_ceil(gran);
        let g1 = if range.end() == self.geo.disk_size {
            self.layout.n_granules
        } else {
            range.end() / gran
        };
        if g0 >= g1 {
            return Ok(());
        }
        let mut keep: Vec<(u64, u64)> = self
            .pins
            .iter()
            .map(|(_, r)| (r.offset / gran, r.end().div_ceil(gran)))
            .filter(|&(a, b)| a < g1 && b > g0)
            .collect();
        keep.sort_unstable();
        let mut from = g0;
        for (a, b) in keep {
            if a > from {
                self.fill_granules(from, a, false);
            }
            from = from.max(b);
        }
        if from < g1 {
            self.fill_granules(from, g1, false);
        }
        Ok(())
    }

    /// Make the bitmap durable (the activity log always is).
    pub fn flush(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.write_pending()? {
            self.sync()?;
        }
        Ok(())
    }

    /// Current dirty bits as merged byte ranges.
    pub fn dirty_ranges(&self) -> Vec<Range> {
        bitmap_ranges(&self.bitmap, &self.geo, &self.layout)
    }

    /// Current activity-log extents as merged byte ranges.
    pub fn al_extents(&self) -> Vec<Range> {
        merge_ranges(
            self.index
                .keys()
                .map(|&e| extent_range(&self.geo, e))
                .collect(),
        )
    }

    /// Regions that may currently be unshipped: AL extents plus dirty bits.
    pub fn possibly_unshipped(&self) -> Vec<Range> {
        let mut v = self.al_extents();
        v.extend(self.dirty_ranges());
        merge_ranges(v)
    }

    /// Close cleanly: call after everything written was committed (or moved
    /// to dirty bits on purpose). Extents still unreleased are folded into the
    /// bitmap so nothing is lost; the bitmap is synced, then an empty AL copy
    /// with the clean flag is written and synced.
    pub fn close_clean(mut self) -> Result<()> {
        self.check_writable()?;
        let unreleased: Vec<Range> = self
            .slots
            .iter()
            .flatten()
            .filter(|s| !self.is_evictable(s))
            .map(|s| extent_range(&self.geo, s.extent))
            .collect();
        for r in unreleased {
            self.set_bits(r);
        }
        if self.write_pending()? {
            self.sync()?;
        }
        self.write_al(&[], true)?;
        self.slots.iter_mut().for_each(|s| *s = None);
        self.index.clear();
        Ok(())
    }

    // -- internals ----------------------------------------------------------

    fn check_writable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::new(
                ErrorKind::Io,
                "an earlier write or sync failed: reopen the tracking file",
            )
            .at_path(&self.path));
        }
        Ok(())
    }

    fn check_range(&self, range: Range) -> Result<()> {
        match range.offset.checked_add(range.len) {
            Some(end) if end <= self.geo.disk_size => Ok(()),
            _ => Err(Error::invalid(format!(
                "range {}+{} is past the end of the disk ({} bytes)",
                range.offset, range.len, self.geo.disk_size
            ))
            .at_path(&self.path)),
        }
    }

    /// Granules touched by a non-empty in-bounds range.
    fn granules_out(&self, range: Range) -> (u64, u64) {
        let gran = self.geo.granularity;
        (range.offset / gran, range.end().div_ceil(gran))
    }

    fn set_bits(&mut self, range: Range) {
        if range.len == 0 {
            return;
        }
        let (g0, g1) = self.granules_out(range);
        self.fill_granules(g0, g1, true);
    }

    fn fill_granules(&mut self, g0: u64, g1: u64, value: bool) {
        let g1 = g1.min(self.layout.n_granules);
        let mut g = g0;
        while g < g1 {
            let s = g / BITS_PER_SECTOR;
            let first = s * BITS_PER_SECTOR;
            let hi = g1.min(first + BITS_PER_SECTOR);
            let base = ix(s * SECTOR_SIZE);
            if fill_bits(
                &mut self.bitmap[base..base + BM_BITS_LEN],
                g - first,
                hi - first,
                value,
            ) {
                self.pending.insert(s);
            }
            g = hi;
        }
    }

    fn pending_overlaps_extent(&self, e: u64) -> bool {
        let r = extent_range(&self.geo, e);
        if r.len == 0 {
            return false;
        }
        let (g0, g1) = self.granules_out(r);
        self.pending
            .range(g0 / BITS_PER_SECTOR..=(g1 - 1) / BITS_PER_SECTOR)
            .next()
            .is_some()
    }

    /// Write every pending bitmap sector (no sync); true if anything was written.
    fn write_pending(&mut self) -> Result<bool> {
        if self.pending.is_empty() {
            return Ok(false);
        }
        let sectors: Vec<u64> = std::mem::take(&mut self.pending).into_iter().collect();
        for &s in &sectors {
            let base = ix(s * SECTOR_SIZE);
            seal_sector(&mut self.bitmap[base..base + ix(SECTOR_SIZE)], s);
        }
        let mut i = 0;
        while i < sectors.len() {
            let mut j = i + 1;
            while j < sectors.len() && sectors[j] == sectors[j - 1] + 1 {
                j += 1;
            }
            let (s0, s1) = (sectors[i], sectors[j - 1] + 1);
            let off = self.layout.bitmap_offset + s0 * SECTOR_SIZE;
            let buf = &self.bitmap[ix(s0 * SECTOR_SIZE)..ix(s1 * SECTOR_SIZE)];
            if let Err(e) = self.io.write_at(buf, off) {
                self.poisoned = true;
                return Err(Error::io(e, "write bitmap")
                    .at_path(&self.path)
                    .at_offset(off));
            }
            self.stats.bitmap_sector_writes += s1 - s0;
            i = j;
        }
        Ok(true)
    }

    /// Write a new AL copy over the older one and sync it.
    fn write_al(&mut self, extents: &[u64], clean: bool) -> Result<()> {
        let generation = self.al_generation + 1;
        let copy = 1 - self.al_copy;
        let buf = encode_al(generation, self.instance, clean, extents);
        self.write_io(&buf, self.layout.al_copy_offset(copy))?;
        self.sync()?;
        self.al_generation = generation;
        self.al_copy = copy;
        self.stats.al_writes += 1;
        Ok(())
    }

    fn write_io(&mut self, buf: &[u8], off: u64) -> Result<()> {
        if let Err(e) = self.io.write_at(buf, off) {
            self.poisoned = true;
            return Err(Error::io(e, "write").at_path(&self.path).at_offset(off));
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.stats.syncs += 1;
        if let Err(e) = self.io.sync() {
            self.poisoned = true;
            return Err(Error::io(e, "fdatasync").at_path(&self.path));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
