//! VMDK: monolithicSparse, monolithicFlat and streamOptimized.
//!
//! * [`sparse`]: one file holding a 512-byte `SparseExtentHeader`, an
//!   embedded text descriptor, a redundant and a primary grain directory
//!   (GD) with their preallocated grain tables (GTs), then 64 KiB grains
//!   appended as they are first written (the layout qemu and VMware use).
//! * [`flat`]: a text descriptor naming a raw `-flat.vmdk` extent.
//! * [`stream`]: the same header, then deflate-compressed grains each behind
//!   a grain marker, GTs and the GD behind metadata markers, and a footer
//!   (a copy of the header with the real GD offset) before the
//!   end-of-stream marker. Written strictly in ascending order.
//!
//! Every offset in a sparse header, GD or GT counts 512-byte sectors.
//! Parsers check each table against the file length before allocating for
//! it, and refuse tables and grains that overlap.

mod descriptor;
mod flat;
mod sparse;
mod stream;

use std::path::Path;

use crate::error::{Error, Result};
use crate::fileio::bytes::{le_u16, le_u32, le_u64, put_le_u16, put_le_u32, put_le_u64};
use crate::fileio::ImageFile;
use crate::image::{Format, Image, SECTOR};
use crate::{CreateOptions, OpenOptions};

/// Field offsets of the 512-byte little-endian `SparseExtentHeader`
/// (VMDK 5.0 specification, "Hosted Sparse Extent Header").
pub mod hdr {
    /// `magicNumber`: u32, the bytes "KDMV".
    pub const MAGIC: usize = 0;
    /// `version`: u32, 1 (plain), 2 (zeroed-grain GTEs) or 3 (stream / CBT).
    pub const VERSION: usize = 4;
    /// `flags`: u32, see the `FLAG_*` constants.
    pub const FLAGS: usize = 8;
    /// `capacity`: u64, virtual disk size in sectors.
    pub const CAPACITY: usize = 12;
    /// `grainSize`: u64, sectors per grain (a power of two, 128 = 64 KiB).
    pub const GRAIN_SIZE: usize = 20;
    /// `descriptorOffset`: u64, sector of the embedded descriptor (0 = none).
    pub const DESC_OFFSET: usize = 28;
    /// `descriptorSize`: u64, sectors reserved for the embedded descriptor.
    pub const DESC_SIZE: usize = 36;
    /// `numGTEsPerGT`: u32, entries per grain table (always 512).
    pub const NUM_GTES_PER_GT: usize = 44;
    /// `rgdOffset`: u64, sector of the redundant grain directory.
    pub const RGD_OFFSET: usize = 48;
    /// `gdOffset`: u64, sector of the grain directory ([`GD_AT_END`] = in the footer).
    pub const GD_OFFSET: usize = 56;
    /// `overHead`: u64, sectors of metadata before the first grain.
    pub const OVERHEAD: usize = 64;
    /// `uncleanShutdown`: u8, set while the image is open for writing.
    pub const UNCLEAN_SHUTDOWN: usize = 72;
    /// `singleEndLineChar`, `nonEndLineChar`, `doubleEndLineChar1/2`: the
    /// bytes `\n`, ` `, `\r`, `\n` that reveal a text-mode (CR/LF) transfer.
    pub const NEWLINE_CHARS: usize = 73;
    /// `compressAlgorithm`: u16, 0 = none, 1 = deflate.
    pub const COMPRESS_ALGORITHM: usize = 77;
    /// Bytes 79..512 are padding.
    pub const LEN: usize = 512;
}

/// The header's magic number as stored on disk.
pub const MAGIC: &[u8; 4] = b"KDMV";
/// The newline-detection bytes.
pub const NEWLINE_CHARS: [u8; 4] = *b"\n \r\n";
/// `flags` bit 0: the newline-detection bytes are valid.
pub const FLAG_VALID_NEWLINE: u32 = 1 << 0;
/// `flags` bit 1: a redundant grain directory and tables are kept.
pub const FLAG_REDUNDANT_GT: u32 = 1 << 1;
/// `flags` bit 2: GTE value 1 means "zeroed grain".
#[allow(dead_code)]
pub const FLAG_ZEROED_GTE: u32 = 1 << 2;
/// `flags` bit 16: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// `flags` bit 17: grains and metadata carry markers (stream-optimized).
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `compressAlgorithm` deflate (zlib, RFC 1950).
pub const COMPRESS_DEFLATE: u16 = 1;
/// `gdOffset` in a stream-optimized leading header: the GD is found via the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// GTE value of a grain that reads as zeros without being stored.
pub const GTE_ZEROED: u32 = 1;
/// Entries per grain table: the only value VMware and qemu use.
pub const GTES_PER_GT: u32 = 512;
/// Bytes of one grain table.
pub const GT_BYTES: u64 = 512 * 4;
/// Sectors of one grain table.
pub const GT_SECTORS: u64 = GT_BYTES / SECTOR;
/// Default grain: 128 sectors (64 KiB).
pub const DEFAULT_GRAIN_SECTORS: u64 = 128;
/// Largest grain accepted: 2048 sectors (1 MiB). Grain buffers are this big.
pub const MAX_GRAIN_SECTORS: u64 = 2048;
/// Largest virtual size accepted or created: 64 TiB.
pub const MAX_CAPACITY_SECTORS: u64 = (64u64 << 40) / SECTOR;
/// Largest embedded or standalone descriptor read: 64 KiB.
pub const MAX_DESCRIPTOR_BYTES: u64 = 64 * 1024;
/// Sector of the embedded descriptor in images we create.
pub const DESC_SECTOR: u64 = 1;
/// Sectors reserved for the embedded descriptor in images we create.
pub const DESC_SECTORS: u64 = 20;

/// A decoded and validated `SparseExtentHeader`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SparseHeader {
    pub(crate) version: u32,
    pub(crate) flags: u32,
    /// Virtual size in sectors.
    pub(crate) capacity: u64,
    /// Sectors per grain.
    pub(crate) grain_size: u64,
    pub(crate) desc_offset: u64,
    pub(crate) desc_size: u64,
    pub(crate) rgd_offset: u64,
    pub(crate) gd_offset: u64,
    pub(crate) overhead: u64,
    pub(crate) unclean_shutdown: bool,
    pub(crate) compress_algorithm: u16,
}

impl SparseHeader {
    /// A header for a new image of `capacity` sectors with 64 KiB grains.
    pub(crate) fn new(capacity: u64) -> Self {
        SparseHeader {
            version: 1,
            flags: FLAG_VALID_NEWLINE | FLAG_REDUNDANT_GT,
            capacity,
            grain_size: DEFAULT_GRAIN_SECTORS,
            desc_offset: DESC_SECTOR,
            desc_size: DESC_SECTORS,
            rgd_offset: 0,
            gd_offset: 0,
            overhead: 0,
            unclean_shutdown: false,
            compress_algorithm: 0,
        }
    }

    /// Decode and validate the header read from `at` in `file`.
    pub(crate) fn decode(b: &[u8; hdr::LEN], file: &ImageFile, at: u64) -> Result<Self> {
        let bad = |field: usize, msg: String| corrupt_at(file, at + field as u64, msg);
        if &b[hdr::MAGIC..hdr::MAGIC + 4] != MAGIC {
            return Err(bad(
                hdr::MAGIC,
                "no KDMV magic: not a sparse VMDK header".into(),
            ));
        }
        let h = SparseHeader {
            version: le_u32(b, hdr::VERSION),
            flags: le_u32(b, hdr::FLAGS),
            capacity: le_u64(b, hdr::CAPACITY),
            grain_size: le_u64(b, hdr::GRAIN_SIZE),
            desc_offset: le_u64(b, hdr::DESC_OFFSET),
            desc_size: le_u64(b, hdr::DESC_SIZE),
            rgd_offset: le_u64(b, hdr::RGD_OFFSET),
            gd_offset: le_u64(b, hdr::GD_OFFSET),
            overhead: le_u64(b, hdr::OVERHEAD),
            unclean_shutdown: b[hdr::UNCLEAN_SHUTDOWN] != 0,
            compress_algorithm: le_u16(b, hdr::COMPRESS_ALGORITHM),
        };
        if !(1..=3).contains(&h.version) {
            return Err(bad(
                hdr::VERSION,
                format!("unknown sparse header version {}", h.version),
            ));
        }
        if h.flags & FLAG_VALID_NEWLINE != 0
            && b[hdr::NEWLINE_CHARS..hdr::NEWLINE_CHARS + 4] != NEWLINE_CHARS
        {
            return Err(bad(
                hdr::NEWLINE_CHARS,
                "newline-detection bytes are mangled: the file went through a text-mode transfer"
                    .into(),
            ));
        }
        if h.grain_size == 0 || !h.grain_size.is_power_of_two() || h.grain_size > MAX_GRAIN_SECTORS
        {
            return Err(bad(
                hdr::GRAIN_SIZE,
                format!(
                    "grain size {} sectors is not a power of two between 1 and {MAX_GRAIN_SECTORS}",
                    h.grain_size
                ),
            ));
        }
        let gtes = le_u32(b, hdr::NUM_GTES_PER_GT);
        if gtes != GTES_PER_GT {
            return Err(bad(
                hdr::NUM_GTES_PER_GT,
                format!("{gtes} entries per grain table (must be {GTES_PER_GT})"),
            ));
        }
        if h.capacity > MAX_CAPACITY_SECTORS {
            return Err(bad(
                hdr::CAPACITY,
                format!(
                    "capacity of {} sectors is beyond the 64 TiB limit",
                    h.capacity
                ),
            ));
        }
        if h.compress_algorithm > COMPRESS_DEFLATE {
            return Err(bad(
                hdr::COMPRESS_ALGORITHM,
                format!("unknown compression algorithm {}", h.compress_algorithm),
            ));
        }
        Ok(h)
    }

    /// The 512 bytes of this header.
    pub(crate) fn encode(&self) -> [u8; hdr::LEN] {
        let mut b = [0u8; hdr::LEN];
        b[hdr::MAGIC..hdr::MAGIC + 4].copy_from_slice(MAGIC);
        put_le_u32(&mut b, hdr::VERSION, self.version);
        put_le_u32(&mut b, hdr::FLAGS, self.flags);
        put_le_u64(&mut b, hdr::CAPACITY, self.capacity);
        put_le_u64(&mut b, hdr::GRAIN_SIZE, self.grain_size);
        put_le_u64(&mut b, hdr::DESC_OFFSET, self.desc_offset);
        put_le_u64(&mut b, hdr::DESC_SIZE, self.desc_size);
        put_le_u32(&mut b, hdr::NUM_GTES_PER_GT, GTES_PER_GT);
        put_le_u64(&mut b, hdr::RGD_OFFSET, self.rgd_offset);
        put_le_u64(&mut b, hdr::GD_OFFSET, self.gd_offset);
        put_le_u64(&mut b, hdr::OVERHEAD, self.overhead);
        b[hdr::UNCLEAN_SHUTDOWN] = u8::from(self.unclean_shutdown);
        b[hdr::NEWLINE_CHARS..hdr::NEWLINE_CHARS + 4].copy_from_slice(&NEWLINE_CHARS);
        put_le_u16(&mut b, hdr::COMPRESS_ALGORITHM, self.compress_algorithm);
        b
    }

    /// Whether grains are compressed (stream-optimized).
    pub(crate) fn is_stream(&self) -> bool {
        self.flags & FLAG_COMPRESSED != 0 || self.compress_algorithm == COMPRESS_DEFLATE
    }

    /// Bytes per grain (validated to at most 1 MiB).
    pub(crate) fn grain_bytes(&self) -> u64 {
        self.grain_size * SECTOR
    }

    /// Grains covering the capacity.
    pub(crate) fn num_grains(&self) -> u64 {
        self.capacity.div_ceil(self.grain_size)
    }

    /// Grain tables (and GD entries) covering the capacity.
    pub(crate) fn num_gts(&self) -> u64 {
        self.num_grains().div_ceil(u64::from(GTES_PER_GT))
    }

    /// Sectors of a grain directory.
    pub(crate) fn gd_sectors(&self) -> u64 {
        (self.num_gts() * 4).div_ceil(SECTOR)
    }
}

/// A corruption error at `offset` of `file`.
pub(crate) fn corrupt_at(file: &ImageFile, offset: u64, msg: impl Into<String>) -> Error {
    Error::corrupt(msg).at_offset(offset).at_path(file.path())
}

/// `sectors * 512`, or `None` on overflow.
pub(crate) fn sector_bytes(sectors: u64) -> Option<u64> {
    sectors.checked_mul(SECTOR)
}

/// Whether `count` bytes at sector `sector` lie inside a file of `len` bytes.
pub(crate) fn fits(sector: u64, count: u64, len: u64) -> bool {
    sector_bytes(sector)
        .and_then(|s| s.checked_add(count))
        .is_some_and(|end| end <= len)
}

/// Read `count` little-endian u32 entries at sector `sector`, refusing a
/// table that does not lie inside the file (checked before allocating).
pub(crate) fn read_table(
    file: &ImageFile,
    file_len: u64,
    sector: u64,
    count: u64,
    what: &str,
    entry_at: u64,
) -> Result<Vec<u32>> {
    let bytes = count * 4;
    if sector == 0 || !fits(sector, bytes, file_len) {
        return Err(corrupt_at(
            file,
            entry_at,
            format!("{what} at sector {sector} ({bytes} bytes) lies beyond the end of the file"),
        ));
    }
    let mut raw = vec![0u8; usize::try_from(bytes).map_err(|_| Error::corrupt("table too big"))?];
    file.read_exact_at(&mut raw, sector * SECTOR)?;
    Ok(raw.chunks_exact(4).map(|c| le_u32(c, 0)).collect())
}

/// Encode u32 entries little-endian.
pub(crate) fn encode_table(entries: &[u32]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

/// Splits a byte range of the disk at grain boundaries: yields
/// `(grain index, offset inside the grain, range of the caller's buffer)`.
#[derive(Debug)]
pub(crate) struct GrainChunks {
    pos: u64,
    end: u64,
    base: u64,
    grain: u64,
}

impl GrainChunks {
    /// Chunks of `len` bytes at disk offset `offset` for grains of `grain` bytes.
    pub(crate) fn new(offset: u64, len: usize, grain: u64) -> Self {
        GrainChunks {
            pos: offset,
            end: offset + len as u64,
            base: offset,
            grain,
        }
    }
}

impl Iterator for GrainChunks {
    type Item = (u64, u64, std::ops::Range<usize>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let g = self.pos / self.grain;
        let in_off = self.pos % self.grain;
        let n = (self.grain - in_off).min(self.end - self.pos);
        // Both ends lie inside the caller's buffer, whose length is a usize.
        let from = usize::try_from(self.pos - self.base).ok()?;
        let to = usize::try_from(self.pos - self.base + n).ok()?;
        self.pos += n;
        Some((g, in_off, from..to))
    }
}

/// A region of the file claimed by a table or grain, for overlap checks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Claim {
    /// First sector.
    pub(crate) start: u64,
    /// Sectors.
    pub(crate) len: u64,
    /// Byte offset of the entry that points here (for the error message).
    pub(crate) from: u64,
    pub(crate) what: &'static str,
}

/// Refuse claims that overlap each other (two GTEs sharing a grain, a GT
/// inside a grain, ...): writes through one would corrupt the other.
pub(crate) fn check_overlaps(file: &ImageFile, claims: &mut [Claim]) -> Result<()> {
    claims.sort_unstable_by_key(|c| (c.start, c.from));
    for pair in claims.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if a.start.saturating_add(a.len) > b.start {
            return Err(corrupt_at(
                file,
                b.from,
                format!(
                    "{} at sector {} overlaps the {} at sector {} (referenced from offset {})",
                    b.what, b.start, a.what, a.start, a.from
                ),
            ));
        }
    }
    Ok(())
}

/// Validate a size for a new VMDK and return its capacity in sectors.
pub(crate) fn capacity_for(path: &Path, size: u64, round: bool) -> Result<u64> {
    let sectors = if size / SECTOR * SECTOR == size {
        size / SECTOR
    } else if round {
        size.div_ceil(SECTOR)
    } else {
        return Err(Error::invalid(format!(
            "VMDK size {size} is not a multiple of {SECTOR} bytes (use rounding to round it up)"
        ))
        .at_path(path));
    };
    if sectors > MAX_CAPACITY_SECTORS {
        return Err(
            Error::invalid(format!("VMDK size {size} is beyond the 64 TiB limit")).at_path(path),
        );
    }
    Ok(sectors)
}

/// Read and decode the header at the start of a `KDMV` file.
pub(crate) fn read_header(file: &ImageFile) -> Result<SparseHeader> {
    let len = file.len()?;
    if len < SECTOR {
        return Err(corrupt_at(
            file,
            0,
            format!("file of {len} bytes is too short for a header"),
        ));
    }
    let b: [u8; hdr::LEN] = file.read_array(0)?;
    SparseHeader::decode(&b, file, 0)
}

/// Tell sparse from stream-optimized by the header flags of a `KDMV` file.
pub(crate) fn detect_sparse(file: &ImageFile) -> Result<Format> {
    let header = read_header(file)?;
    Ok(if header.is_stream() {
        Format::VmdkStream
    } else {
        Format::VmdkSparse
    })
}

/// Open a VMDK of any supported kind.
pub fn open(path: &Path, options: OpenOptions) -> Result<Box<dyn Image>> {
    let probe = ImageFile::open(path, false)?;
    let len = probe.len()?;
    let mut head = [0u8; 32];
    let head_len = usize::try_from(len.min(32)).unwrap_or(0);
    probe.read_exact_at(&mut head[..head_len], 0)?;
    let head = &head[..head_len];
    if head.starts_with(MAGIC) {
        match detect_sparse(&probe)? {
            Format::VmdkStream => {
                if options.writable {
                    return Err(Error::unsupported(
                        "stream-optimized VMDK cannot be opened for writing (it is written once, \
                         sequentially, when created)",
                    )
                    .at_path(path));
                }
                Ok(Box::new(stream::StreamReader::open(probe)?))
            }
            _ => {
                let file = if options.writable {
                    ImageFile::open(path, true)?
                } else {
                    probe
                };
                Ok(Box::new(sparse::SparseImage::open(file, options.sync)?))
            }
        }
    } else if head.starts_with(b"# Disk DescriptorFile") {
        flat::open(probe, options)
    } else {
        Err(
            Error::corrupt("neither a KDMV sparse header nor a text descriptor: not a VMDK")
                .at_offset(0)
                .at_path(path),
        )
    }
}

/// Create a VMDK of `format`.
pub fn create(
    path: &Path,
    format: Format,
    size: u64,
    options: &CreateOptions,
) -> Result<Box<dyn Image>> {
    let capacity = capacity_for(path, size, options.round)?;
    match format {
        Format::VmdkSparse => Ok(Box::new(sparse::SparseImage::create(
            path,
            capacity,
            options.sync,
        )?)),
        Format::VmdkFlat => Ok(Box::new(flat::FlatImage::create(path, capacity)?)),
        Format::VmdkStream => Ok(Box::new(stream::StreamWriter::create(
            path,
            capacity,
            options.sync,
        )?)),
        other => Err(Error::invalid(format!("{other} is not a VMDK format")).at_path(path)),
    }
}

/// Remove a half-created file when creation fails (best effort).
pub(crate) struct RemoveOnError<'a> {
    pub(crate) path: &'a Path,
    pub(crate) armed: bool,
}

impl Drop for RemoveOnError<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_unaligned_sizes_through_the_crate_api() {
        let dir = crate::testutil::TempDir::new("api");
        for f in [Format::VmdkSparse, Format::VmdkFlat, Format::VmdkStream] {
            let p = dir.path(&format!("zero-{}.vmdk", f.name()));
            let mut img = crate::create(&p, f, 0, &CreateOptions::default()).unwrap();
            img.finish().unwrap();
            drop(img);
            let mut img = crate::open(&p, OpenOptions::read_only()).unwrap();
            assert_eq!((img.format(), img.size()), (f, 0));
            assert!(img.map(0, 0).unwrap().is_empty());
            assert!(img.check().unwrap().iter().all(|p| !p.damage));

            let p = dir.path(&format!("odd-{}.vmdk", f.name()));
            let e = crate::create(&p, f, 1000, &CreateOptions::default()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
            let opts = CreateOptions {
                round: true,
                ..Default::default()
            };
            let mut img = crate::create(&p, f, 1000, &opts).unwrap();
            assert_eq!(img.size(), 1024);
            img.write_at(b"xyz", 1021).unwrap();
            img.finish().unwrap();
            drop(img);
            let mut img = crate::open(&p, OpenOptions::read_only()).unwrap();
            let mut b = [0u8; 4];
            img.read_at(&mut b, 1020).unwrap();
            assert_eq!(&b, b"\0xyz");
            let e = crate::create(&p, f, 1 << 20, &CreateOptions::default()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Io, "never clobbers");
        }
        let e = crate::create(
            &dir.path("big.vmdk"),
            Format::VmdkSparse,
            65 << 40,
            &CreateOptions::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidInput);
    }

    #[test]
    fn header_round_trips_with_documented_offsets() {
        let mut h = SparseHeader::new(2048);
        h.rgd_offset = 21;
        h.gd_offset = 26;
        h.overhead = 128;
        let b = h.encode();
        assert_eq!(&b[0..4], b"KDMV");
        assert_eq!(le_u32(&b, 4), 1);
        assert_eq!(le_u64(&b, 12), 2048);
        assert_eq!(le_u64(&b, 20), 128);
        assert_eq!(le_u32(&b, 44), 512);
        assert_eq!(&b[73..77], b"\n \r\n");
        let dir = crate::testutil::TempDir::new("hdr");
        let p = dir.path("h");
        std::fs::write(&p, b).unwrap();
        let f = ImageFile::open(&p, false).unwrap();
        assert_eq!(SparseHeader::decode(&b, &f, 0).unwrap(), h);
        let mut bad = b;
        bad[75] = b'\n';
        let e = SparseHeader::decode(&bad, &f, 0).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
        assert_eq!(e.offset(), Some(73));
    }
}
