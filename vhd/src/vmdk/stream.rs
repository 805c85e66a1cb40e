//! streamOptimized VMDK, laid out the way VMware's own writer (open-vmdk)
//! does:
//!
//! ```text
//! sector 0     header: flags = newline | compressed | markers, gdOffset = GD_AT_END
//! sector 1     embedded descriptor (createType="streamOptimized")
//! overHead     for each non-zero grain, ascending:
//!                grain marker {lba: u64, size: u32} + zlib stream, padded to a sector
//!              after the grains of each 512-grain span:
//!                GT marker {numSectors, 0, type 1} (one sector) + the GT (4 sectors)
//!              GD marker {numSectors, 0, type 2} + GD
//!              footer marker {1, 0, type 3} + footer (the header with the real gdOffset)
//!              end-of-stream marker (a zero sector)
//! ```
//!
//! GD entries point at GT sectors, GTEs at grain-marker sectors. All-zero
//! grains and GTs of all-zero spans are not written.
//!
//! Writing is strictly ascending. Grains are compressed in batches, in
//! parallel on every available core, then appended in order.

use std::path::Path;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::descriptor;
use super::sparse::read_embedded_descriptor;
use super::{
    check_overlaps, corrupt_at, encode_table, fits, hdr, read_header, read_table, Claim,
    GrainChunks, RemoveOnError, SparseHeader, COMPRESS_DEFLATE, DESC_SECTOR, DESC_SECTORS,
    FLAG_COMPRESSED, FLAG_MARKERS, FLAG_VALID_NEWLINE, GD_AT_END, GTES_PER_GT, GTE_ZEROED,
    GT_BYTES, GT_SECTORS,
};
use crate::error::{Error, ErrorKind, Result};
use crate::fileio::bytes::{le_u32, le_u64, put_le_u32, put_le_u64};
use crate::fileio::{is_zero, ImageFile};
use crate::image::{check_range, push_extent, Extent, Format, Image, Problem, SyncPolicy, SECTOR};

/// Field offsets of a marker (grain or metadata), at the start of a sector.
mod marker {
    /// u64: the grain's first sector (grain marker) or the sectors of
    /// metadata that follow (metadata marker).
    pub(super) const VAL: usize = 0;
    /// u32: compressed bytes (grain marker) or 0 (metadata marker).
    pub(super) const SIZE: usize = 8;
    /// u32: metadata marker type (only when `SIZE` is 0).
    pub(super) const TYPE: usize = 12;
    /// Compressed grain data starts here, right after `SIZE`.
    pub(super) const GRAIN_DATA: usize = 12;
}
/// Metadata marker type: end of stream.
const MARKER_EOS: u32 = 0;
/// Metadata marker type: a grain table follows.
const MARKER_GT: u32 = 1;
/// Metadata marker type: the grain directory follows.
const MARKER_GD: u32 = 2;
/// Metadata marker type: the footer follows.
const MARKER_FOOTER: u32 = 3;
/// Stream-optimized header version (what VMware writes).
const STREAM_VERSION: u32 = 3;
/// zlib level: the default, as VMware and qemu use.
const LEVEL: u32 = 6;
/// Grains per worker in one compression batch.
const GRAINS_PER_WORKER: usize = 32;
/// Smallest compression batch (64 grains = 4 MiB).
const MIN_BATCH: usize = 64;

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn metadata_marker(sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    put_le_u64(&mut m, marker::VAL, sectors);
    put_le_u32(&mut m, marker::TYPE, kind);
    m
}

fn pad_to_sector(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(512), 0);
}

/// Largest compressed grain accepted: twice the grain (deflate's worst case
/// is a fraction of a percent over the input).
fn max_compressed(grain_bytes: u64) -> u64 {
    grain_bytes * 2
}

/// A stream-optimized VMDK opened for reading.
#[derive(Debug)]
pub(crate) struct StreamReader {
    file: ImageFile,
    /// The footer's copy when the leading header defers the GD to the end.
    header: SparseHeader,
    size: u64,
    grain_bytes: u64,
    gts: Vec<Option<Box<[u32]>>>,
    file_len: u64,
    /// Grain whose inflated bytes are in `cache`.
    cached: Option<u64>,
    cache: Vec<u8>,
    compressed: Vec<u8>,
    inflater: Decompress,
}

impl StreamReader {
    /// Open and validate a stream-optimized image.
    pub(crate) fn open(file: ImageFile) -> Result<Self> {
        let file_len = file.len()?;
        let lead = read_header(&file)?;
        let mut claims = vec![Claim {
            start: 0,
            len: 1,
            from: 0,
            what: "header",
        }];
        if lead.desc_offset != 0 && lead.desc_size != 0 {
            read_embedded_descriptor(&file, file_len, &lead)?;
            claims.push(Claim {
                start: lead.desc_offset,
                len: lead.desc_size,
                from: hdr::DESC_OFFSET as u64,
                what: "embedded descriptor",
            });
        }
        let header = if lead.gd_offset == GD_AT_END {
            if file_len < 4 * SECTOR {
                return Err(corrupt_at(
                    &file,
                    0,
                    "file too short for a stream-optimized footer",
                ));
            }
            // footer marker, footer, end-of-stream marker: the last three sectors.
            let tail_at = file_len - 3 * SECTOR;
            let tail: [u8; 1536] = file.read_array(tail_at)?;
            if le_u32(&tail, marker::SIZE) != 0 || le_u32(&tail, marker::TYPE) != MARKER_FOOTER {
                return Err(corrupt_at(
                    &file,
                    tail_at,
                    "no footer marker before the end of the file (the image is incomplete?)",
                ));
            }
            let eos = &tail[1024..];
            if le_u64(eos, marker::VAL) != 0
                || le_u32(eos, marker::SIZE) != 0
                || le_u32(eos, marker::TYPE) != MARKER_EOS
            {
                return Err(corrupt_at(&file, tail_at + 1024, "no end-of-stream marker"));
            }
            let footer_bytes: &[u8; 512] = tail[512..1024]
                .try_into()
                .map_err(|_| corrupt_at(&file, tail_at, "footer"))?;
            let footer = SparseHeader::decode(footer_bytes, &file, tail_at + 512)?;
            if footer.gd_offset == GD_AT_END {
                return Err(corrupt_at(
                    &file,
                    tail_at + 512 + hdr::GD_OFFSET as u64,
                    "footer does not give the grain directory's offset",
                ));
            }
            if footer.capacity != lead.capacity || footer.grain_size != lead.grain_size {
                return Err(corrupt_at(
                    &file,
                    tail_at + 512,
                    "footer disagrees with the header about capacity or grain size",
                ));
            }
            claims.push(Claim {
                start: tail_at / SECTOR,
                len: 3,
                from: 0,
                what: "footer",
            });
            footer
        } else {
            lead
        };

        let n = header.num_gts();
        let gd = if n == 0 {
            Vec::new()
        } else {
            claims.push(Claim {
                start: header.gd_offset,
                len: header.gd_sectors(),
                from: hdr::GD_OFFSET as u64,
                what: "grain directory",
            });
            read_table(
                &file,
                file_len,
                header.gd_offset,
                n,
                "grain directory",
                hdr::GD_OFFSET as u64,
            )?
        };
        let mut gts = Vec::with_capacity(gd.len());
        let mut raw = vec![0u8; to_usize(GT_BYTES)];
        for (t, &s) in gd.iter().enumerate() {
            let s = u64::from(s);
            let entry_at = header.gd_offset * SECTOR + t as u64 * 4;
            if s == 0 {
                gts.push(None);
                continue;
            }
            if !fits(s, GT_BYTES, file_len) {
                return Err(corrupt_at(
                    &file,
                    entry_at,
                    format!("grain table {t} at sector {s} lies beyond the end of the file"),
                ));
            }
            claims.push(Claim {
                start: s,
                len: GT_SECTORS,
                from: entry_at,
                what: "grain table",
            });
            file.read_exact_at(&mut raw, s * SECTOR)?;
            let entries: Box<[u32]> = raw.chunks_exact(4).map(|c| le_u32(c, 0)).collect();
            for (i, &e) in entries.iter().enumerate() {
                if e <= GTE_ZEROED {
                    continue;
                }
                let e = u64::from(e);
                let e_at = s * SECTOR + i as u64 * 4;
                if !fits(e, marker::GRAIN_DATA as u64, file_len) {
                    return Err(corrupt_at(
                        &file,
                        e_at,
                        format!("grain table {t} entry {i} points at sector {e}, beyond the end of the file"),
                    ));
                }
                claims.push(Claim {
                    start: e,
                    len: 1,
                    from: e_at,
                    what: "grain",
                });
            }
            gts.push(Some(entries));
        }
        check_overlaps(&file, &mut claims)?;
        let grain_bytes = header.grain_bytes();
        Ok(StreamReader {
            file,
            size: header.capacity * SECTOR,
            grain_bytes,
            header,
            gts,
            file_len,
            cached: None,
            cache: vec![0u8; to_usize(grain_bytes)],
            compressed: Vec::new(),
            inflater: Decompress::new(true),
        })
    }

    fn gte(&self, grain: u64) -> u32 {
        let t = to_usize(grain / u64::from(GTES_PER_GT));
        let i = to_usize(grain % u64::from(GTES_PER_GT));
        match self.gts.get(t) {
            Some(Some(gt)) => gt[i],
            _ => 0,
        }
    }

    /// Inflate grain `g` (stored behind the marker at sector `gte`) into the
    /// cache, unless it is there already.
    fn load(&mut self, g: u64, gte: u32) -> Result<()> {
        if self.cached == Some(g) {
            return Ok(());
        }
        self.cached = None;
        let at = u64::from(gte) * SECTOR;
        let m: [u8; 12] = self.file.read_array(at)?;
        let csize = u64::from(le_u32(&m, marker::SIZE));
        if csize == 0 || csize > max_compressed(self.grain_bytes) {
            return Err(corrupt_at(
                &self.file,
                at + marker::SIZE as u64,
                format!("grain {g} has an impossible compressed size of {csize} bytes"),
            ));
        }
        let data_at = at + marker::GRAIN_DATA as u64;
        if data_at + csize > self.file_len {
            return Err(corrupt_at(
                &self.file,
                at,
                format!("grain {g} ({csize} compressed bytes) runs past the end of the file"),
            ));
        }
        self.compressed.resize(to_usize(csize), 0);
        self.file.read_exact_at(&mut self.compressed, data_at)?;
        self.inflater.reset(true);
        let status = self
            .inflater
            .decompress(&self.compressed, &mut self.cache, FlushDecompress::Finish)
            .map_err(|e| {
                corrupt_at(
                    &self.file,
                    data_at,
                    format!("grain {g} does not inflate: {e}"),
                )
            })?;
        let out = to_usize(self.inflater.total_out());
        let need = to_usize(self.grain_bytes.min(self.size - g * self.grain_bytes));
        if status != Status::StreamEnd {
            return Err(corrupt_at(
                &self.file,
                data_at,
                format!(
                    "grain {g} is truncated or inflates to more than {} bytes",
                    self.grain_bytes
                ),
            ));
        }
        if out < need {
            return Err(corrupt_at(
                &self.file,
                data_at,
                format!("grain {g} inflates to {out} bytes, expected {need}"),
            ));
        }
        self.cache[out..].fill(0);
        self.cached = Some(g);
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len(), "read")
            .map_err(|e| e.at_path(self.file.path()))?;
        for (g, in_off, r) in GrainChunks::new(offset, buf.len(), self.grain_bytes) {
            let gte = self.gte(g);
            if gte <= GTE_ZEROED {
                buf[r].fill(0);
                continue;
            }
            self.load(g, gte)?;
            let from = to_usize(in_off);
            let len = r.len();
            buf[r].copy_from_slice(&self.cache[from..from + len]);
        }
        Ok(())
    }

    fn allocation(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::invalid("map range beyond the disk").at_path(self.file.path()))?;
        let mut map = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g = pos / self.grain_bytes;
            let next = ((g + 1) * self.grain_bytes).min(end);
            let allocated = self.gte(g) > GTE_ZEROED;
            push_extent(
                &mut map,
                Extent {
                    offset: pos,
                    length: next - pos,
                    allocated,
                },
            );
            pos = next;
        }
        Ok(map)
    }

    fn stored_grains(&self) -> u64 {
        self.gts
            .iter()
            .flatten()
            .map(|gt| gt.iter().filter(|&&e| e > GTE_ZEROED).count() as u64)
            .sum()
    }

    /// Inflate every grain and compare its marker's LBA with its position.
    fn verify(&mut self) -> Result<Vec<Problem>> {
        let mut problems = Vec::new();
        let grains = self.header.num_grains();
        for g in 0..grains {
            let gte = self.gte(g);
            if gte <= GTE_ZEROED {
                continue;
            }
            self.cached = None;
            let at = u64::from(gte) * SECTOR;
            let lba = le_u64(&self.file.read_array::<8>(at)?, marker::VAL);
            match self.load(g, gte) {
                Ok(()) if lba != g * self.header.grain_size => problems.push(Problem {
                    offset: at,
                    what: format!(
                        "grain {g}'s marker names sector {lba}, expected {}",
                        g * self.header.grain_size
                    ),
                    damage: true,
                }),
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Corrupt => problems.push(Problem {
                    offset: e.offset().unwrap_or(u64::from(gte) * SECTOR),
                    what: e.message().to_string(),
                    damage: true,
                }),
                Err(e) => return Err(e),
            }
        }
        self.cached = None;
        Ok(problems)
    }
}

impl Image for StreamReader {
    fn format(&self) -> Format {
        Format::VmdkStream
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read(buf, offset)
    }

    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(
            Error::unsupported("stream-optimized VMDK cannot be modified after it is written")
                .at_path(self.file.path()),
        )
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn map(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.allocation(offset, length)
    }

    fn allocated_bytes(&mut self) -> Result<u64> {
        Ok(self.stored_grains() * self.grain_bytes)
    }

    fn check(&mut self) -> Result<Vec<Problem>> {
        self.verify()
    }
}

/// zlib-compress one grain, reusing `c`'s state.
fn deflate(c: &mut Compress, data: &[u8]) -> Result<Vec<u8>> {
    c.reset();
    let mut out = Vec::with_capacity(data.len() / 2 + 1024);
    loop {
        let consumed = to_usize(c.total_in()).min(data.len());
        let status = c
            .compress_vec(&data[consumed..], &mut out, FlushCompress::Finish)
            .map_err(|e| Error::new(ErrorKind::Io, format!("deflate failed: {e}")))?;
        if status == Status::StreamEnd {
            return Ok(out);
        }
        out.reserve(out.capacity().max(4096));
    }
}

/// Compress `grains` in order, split across `workers` threads.
fn compress_all(grains: &[(u64, Vec<u8>)], workers: usize) -> Result<Vec<Vec<u8>>> {
    let level = Compression::new(LEVEL);
    if workers <= 1 || grains.len() < 2 {
        let mut c = Compress::new(level, true);
        return grains.iter().map(|(_, d)| deflate(&mut c, d)).collect();
    }
    let per = grains.len().div_ceil(workers);
    std::thread::scope(|s| {
        let handles: Vec<_> = grains
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    let mut c = Compress::new(level, true);
                    part.iter()
                        .map(|(_, d)| deflate(&mut c, d))
                        .collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        let mut out = Vec::with_capacity(grains.len());
        for h in handles {
            let part = h
                .join()
                .map_err(|_| Error::new(ErrorKind::Io, "a compression thread panicked"))??;
            out.extend(part);
        }
        Ok(out)
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Writing,
    Finished,
    /// A write failed half-way: the stream cannot be completed.
    Failed,
}

/// A stream-optimized VMDK being written (ascending offsets only).
#[derive(Debug)]
pub(crate) struct StreamWriter {
    file: ImageFile,
    header: SparseHeader,
    size: u64,
    grain_bytes: u64,
    /// File offset of the next marker (sector-aligned).
    pos: u64,
    gd: Vec<u32>,
    /// The grain table being filled, for span `gt_index`.
    gt: Box<[u32]>,
    gt_index: u64,
    gt_used: bool,
    /// The grain being assembled from partial writes.
    cur: Option<(u64, Vec<u8>)>,
    /// Grains below this are sealed; writing there is refused.
    sealed_below: u64,
    /// Sealed non-zero grains waiting for compression.
    batch: Vec<(u64, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
    batch_limit: usize,
    workers: usize,
    stored_grains: u64,
    state: State,
    /// After `finish`: the image reopened for reads, map and check.
    reader: Option<StreamReader>,
}

impl StreamWriter {
    /// Create a new stream-optimized image of `capacity` sectors. Nothing
    /// points at grain data before the footer is written, so the sync policy
    /// changes nothing: `flush` and `finish` always sync. Dropping the
    /// writer without `finish` leaves an incomplete image that will not open.
    pub(crate) fn create(path: &Path, capacity: u64, _sync: SyncPolicy) -> Result<Self> {
        let mut header = SparseHeader::new(capacity);
        header.version = STREAM_VERSION;
        header.flags = FLAG_VALID_NEWLINE | FLAG_COMPRESSED | FLAG_MARKERS;
        header.compress_algorithm = COMPRESS_DEFLATE;
        header.gd_offset = GD_AT_END;
        header.rgd_offset = 0;
        header.overhead = (DESC_SECTOR + DESC_SECTORS).next_multiple_of(header.grain_size);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid("image file name is not UTF-8").at_path(path))?;
        descriptor::check_file_name(name).map_err(|e| e.at_path(path))?;
        let text = descriptor::render(
            "streamOptimized",
            capacity,
            &format!("SPARSE \"{name}\""),
            descriptor::random_cid()?,
        );
        if text.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(
                Error::invalid("file name too long for the embedded descriptor").at_path(path),
            );
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 16);
        let gd = vec![0u32; to_usize(header.num_gts())];
        let file = ImageFile::create_new(path)?;
        let mut guard = RemoveOnError { path, armed: true };
        file.write_all_at(&header.encode(), 0)?;
        file.write_all_at(text.as_bytes(), DESC_SECTOR * SECTOR)?;
        guard.armed = false;
        Ok(StreamWriter {
            file,
            size: capacity * SECTOR,
            grain_bytes: header.grain_bytes(),
            pos: header.overhead * SECTOR,
            header,
            gd,
            gt: vec![0u32; GTES_PER_GT as usize].into_boxed_slice(),
            gt_index: 0,
            gt_used: false,
            cur: None,
            sealed_below: 0,
            batch: Vec::new(),
            spare: Vec::new(),
            batch_limit: (workers * GRAINS_PER_WORKER).max(MIN_BATCH),
            workers,
            stored_grains: 0,
            state: State::Writing,
            reader: None,
        })
    }

    fn ensure_writing(&self) -> Result<()> {
        match self.state {
            State::Writing => Ok(()),
            State::Finished => Err(Error::invalid(
                "stream-optimized VMDK is finished: no more writes",
            )
            .at_path(self.file.path())),
            State::Failed => Err(Error::invalid(
                "an earlier write to this stream-optimized VMDK failed; it cannot be completed",
            )
            .at_path(self.file.path())),
        }
    }

    /// Run `f`, marking the stream failed if it errs (the file is then
    /// in an unknown state).
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if r.is_err() {
            self.state = State::Failed;
        }
        r
    }

    /// Move the grain being assembled to the compression batch.
    fn seal(&mut self) -> Result<()> {
        let Some((g, data)) = self.cur.take() else {
            return Ok(());
        };
        self.sealed_below = g + 1;
        if is_zero(&data) {
            self.spare.push(data);
        } else {
            self.batch.push((g, data));
            if self.batch.len() >= self.batch_limit {
                self.flush_batch()?;
            }
        }
        Ok(())
    }

    /// Append the grain table being filled (if it has entries) to `out`,
    /// which will be written at `self.pos`.
    fn emit_gt(&mut self, out: &mut Vec<u8>) -> Result<()> {
        if !self.gt_used {
            return Ok(());
        }
        out.extend_from_slice(&metadata_marker(GT_SECTORS, MARKER_GT));
        let sector = (self.pos + out.len() as u64) / SECTOR;
        self.gd[to_usize(self.gt_index)] = u32::try_from(sector).map_err(|_| too_big())?;
        out.extend_from_slice(&encode_table(&self.gt));
        self.gt.fill(0);
        self.gt_used = false;
        Ok(())
    }

    /// Compress the batch in parallel and append the grains in order.
    fn flush_batch(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let grains = std::mem::take(&mut self.batch);
        let compressed = compress_all(&grains, self.workers)?;
        let total: usize = compressed.iter().map(|c| c.len() + 512).sum();
        let mut out = Vec::with_capacity(total + 4096);
        for ((g, raw), c) in grains.into_iter().zip(compressed) {
            let t = g / u64::from(GTES_PER_GT);
            if t != self.gt_index {
                self.emit_gt(&mut out)?;
                self.gt_index = t;
            }
            let sector = (self.pos + out.len() as u64) / SECTOR;
            self.gt[to_usize(g % u64::from(GTES_PER_GT))] =
                u32::try_from(sector).map_err(|_| too_big())?;
            self.gt_used = true;
            let mut m = [0u8; marker::GRAIN_DATA];
            put_le_u64(&mut m, marker::VAL, g * self.header.grain_size);
            put_le_u32(
                &mut m,
                marker::SIZE,
                u32::try_from(c.len()).map_err(|_| too_big())?,
            );
            out.extend_from_slice(&m);
            out.extend_from_slice(&c);
            pad_to_sector(&mut out);
            self.stored_grains += 1;
            if self.spare.len() < self.batch_limit {
                self.spare.push(raw);
            }
        }
        self.file.write_all_at(&out, self.pos)?;
        self.pos += out.len() as u64;
        Ok(())
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.ensure_writing()?;
        check_range(self.size, offset, buf.len(), "write")
            .map_err(|e| e.at_path(self.file.path()))?;
        let grain_bytes = to_usize(self.grain_bytes);
        for (g, in_off, r) in GrainChunks::new(offset, buf.len(), self.grain_bytes) {
            let floor = self.cur.as_ref().map_or(self.sealed_below, |(cg, _)| *cg);
            if g < floor {
                return Err(Error::unsupported(format!(
                    "stream-optimized VMDK is written sequentially: a write at byte {offset} \
                     goes back before byte {} already written",
                    floor * self.grain_bytes
                ))
                .at_path(self.file.path()));
            }
            if self.cur.as_ref().is_some_and(|(cg, _)| *cg != g) {
                self.guarded(|w| w.seal())?;
            }
            let data = &buf[r];
            let grain = match &mut self.cur {
                Some((_, grain)) => grain,
                None => {
                    let mut grain = self.spare.pop().unwrap_or_default();
                    grain.clear();
                    grain.resize(grain_bytes, 0);
                    &mut self.cur.insert((g, grain)).1
                }
            };
            let from = to_usize(in_off);
            grain[from..from + data.len()].copy_from_slice(data);
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<()> {
        self.seal()?;
        self.flush_batch()?;
        let mut out = Vec::new();
        self.emit_gt(&mut out)?;
        let gd_sectors = self.header.gd_sectors();
        out.extend_from_slice(&metadata_marker(gd_sectors, MARKER_GD));
        let gd_sector = (self.pos + out.len() as u64) / SECTOR;
        out.extend_from_slice(&encode_table(&self.gd));
        pad_to_sector(&mut out);
        out.extend_from_slice(&metadata_marker(1, MARKER_FOOTER));
        let mut footer = self.header.clone();
        footer.gd_offset = gd_sector;
        out.extend_from_slice(&footer.encode());
        out.extend_from_slice(&[0u8; 512]); // end-of-stream marker
        self.file.write_all_at(&out, self.pos)?;
        self.pos += out.len() as u64;
        self.file.sync_data()
    }

    /// The finished image, reopened for reading.
    fn reader(&mut self) -> Result<&mut StreamReader> {
        if self.state != State::Finished {
            return Err(Error::unsupported(
                "a stream-optimized VMDK cannot be read while it is being written",
            )
            .at_path(self.file.path()));
        }
        if self.reader.is_none() {
            let file = ImageFile::open(self.file.path(), false)?;
            self.reader = Some(StreamReader::open(file)?);
        }
        self.reader
            .as_mut()
            .ok_or_else(|| Error::invalid("stream reader unavailable").at_path(self.file.path()))
    }
}

fn too_big() -> Error {
    Error::unsupported("stream-optimized VMDK file would exceed 2 TiB, the most its tables address")
}

impl Image for StreamWriter {
    fn format(&self) -> Format {
        Format::VmdkStream
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.reader()?.read(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.write(buf, offset)
    }

    /// Compresses and writes the grains sealed so far and syncs them; the
    /// grain being assembled stays in memory until the writer moves on.
    fn flush(&mut self) -> Result<()> {
        match self.state {
            State::Writing => self.guarded(|w| {
                w.flush_batch()?;
                w.file.sync_data()
            }),
            State::Finished => Ok(()),
            State::Failed => self.ensure_writing(),
        }
    }

    fn finish(&mut self) -> Result<()> {
        match self.state {
            State::Finished => Ok(()),
            State::Failed => self.ensure_writing(),
            State::Writing => {
                self.guarded(|w| w.complete())?;
                self.state = State::Finished;
                Ok(())
            }
        }
    }

    fn map(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        self.reader()?.allocation(offset, length)
    }

    fn allocated_bytes(&mut self) -> Result<u64> {
        let pending = self.batch.len() as u64 + u64::from(self.cur.is_some());
        Ok((self.stored_grains + pending) * self.grain_bytes)
    }

    fn check(&mut self) -> Result<Vec<Problem>> {
        if self.state != State::Finished {
            return Ok(vec![Problem {
                offset: self.pos,
                what: "stream-optimized VMDK is not finished (no footer yet)".into(),
                damage: true,
            }]);
        }
        self.reader()?.verify()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        compressible_pattern as pattern, have_qemu_img, qemu_img, qemu_vmdk_agrees, TempDir,
    };
    use crate::{ErrorKind, OpenOptions};

    const MIB: u64 = 1 << 20;

    fn read_all(img: &mut dyn Image) -> Vec<u8> {
        let mut out = vec![0u8; to_usize(img.size())];
        img.read_at(&mut out, 0).unwrap();
        out
    }

    /// Writes in ascending order with zero gaps and odd, partial-grain pieces.
    fn write_model(img: &mut dyn Image, size: u64) -> Vec<u8> {
        let mut model = vec![0u8; to_usize(size)];
        let pieces: Vec<(u64, usize)> = vec![
            (0, 512),
            (513, 1000),                  // same grain, after a gap
            (70_000, 3),                  // next grain
            (MIB - 17, 200_000),          // spans grains
            (5 * MIB, to_usize(8 * MIB)), // many grains: several batches, crosses a GT span
            (33 * MIB + 1, 65_536),
            (40 * MIB, 65_536), // an all-zero grain written explicitly
            (size - 10, 10),
        ];
        for (k, (off, len)) in pieces.into_iter().enumerate() {
            let data = if off == 40 * MIB {
                vec![0u8; len]
            } else {
                pattern(len, k as u64 + 7)
            };
            img.write_at(&data, off).unwrap();
            model[to_usize(off)..to_usize(off) + len].copy_from_slice(&data);
        }
        model
    }

    #[test]
    fn round_trip_ascending_with_gaps() {
        let dir = TempDir::new("stream-rt");
        let p = dir.path("s.vmdk");
        let size = 80 * MIB + 1024; // last grain partial
        let mut w = StreamWriter::create(&p, size / SECTOR, SyncPolicy::Deferred).unwrap();
        let model = write_model(&mut w, size);
        assert_eq!(
            w.read_at(&mut [0u8; 1], 0).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        w.finish().unwrap();
        w.finish().unwrap();
        assert_eq!(
            w.write_at(&[1], size - 1).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(read_all(&mut w), model);
        drop(w);

        assert_eq!(crate::detect(&p).unwrap(), Format::VmdkStream);
        let mut img = super::super::open(&p, OpenOptions::read_only()).unwrap();
        assert_eq!(img.format(), Format::VmdkStream);
        assert_eq!(img.size(), size);
        assert_eq!(read_all(img.as_mut()), model);
        let mut odd = vec![0u8; 100_001];
        img.read_at(&mut odd, 5 * MIB + 99).unwrap();
        assert_eq!(
            &odd[..],
            &model[to_usize(5 * MIB + 99)..to_usize(5 * MIB + 99) + 100_001]
        );
        assert!(img.check().unwrap().is_empty());
        let map = img.map(0, size).unwrap();
        assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), size);
        assert!(!map
            .iter()
            .any(|e| e.allocated && e.offset <= 40 * MIB && e.end() > 40 * MIB));
        assert!(!map
            .iter()
            .any(|e| e.allocated && e.offset <= 20 * MIB && e.end() > 20 * MIB));
        let e = super::super::open(&p, OpenOptions::read_write()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);

        // Layout checks: header flags, GD at end, footer.
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(le_u32(&bytes, hdr::FLAGS), 1 | (1 << 16) | (1 << 17));
        assert_eq!(le_u64(&bytes, hdr::GD_OFFSET), GD_AT_END);
        let n = bytes.len();
        assert_eq!(le_u32(&bytes[n - 1536..], 12), MARKER_FOOTER);
        assert_eq!(&bytes[n - 1024..n - 1020], b"KDMV");
        assert!(bytes[n - 512..].iter().all(|&b| b == 0));
        // First grain marker at overHead: lba 0 then a zlib stream.
        let first = 128 * 512;
        assert_eq!(le_u64(&bytes, first), 0);
        assert_eq!(bytes[first + 12], 0x78);

        if have_qemu_img() {
            let ps = p.to_str().unwrap();
            qemu_vmdk_agrees(ps, &model, &dir.path("m.raw"));
        }
    }

    #[test]
    fn descending_write_is_refused() {
        let dir = TempDir::new("stream-desc");
        let p = dir.path("d.vmdk");
        let mut w = StreamWriter::create(&p, 4 * MIB / SECTOR, SyncPolicy::Ordered).unwrap();
        w.write_at(&[1u8; 100], 200_000).unwrap();
        // Inside the grain being assembled: fine.
        w.write_at(&[2u8; 100], 196_608).unwrap();
        let e = w.write_at(&[3u8; 10], 1000).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.message().contains("sequentially"), "{e}");
        w.write_at(&[4u8; 10], 3 * MIB).unwrap();
        let e = w.write_at(&[3u8; 10], 200_000).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        w.finish().unwrap();
        let mut img = super::super::open(&p, OpenOptions::read_only()).unwrap();
        let mut b = [0u8; 4];
        img.read_at(&mut b, 196_606).unwrap();
        assert_eq!(b, [0, 0, 2, 2]);
        img.read_at(&mut b, 3 * MIB + 8).unwrap();
        assert_eq!(b, [4, 4, 0, 0]);
    }

    #[test]
    fn unfinished_or_damaged_streams_are_corrupt() {
        let dir = TempDir::new("stream-bad");
        let p = dir.path("u.vmdk");
        let mut w = StreamWriter::create(&p, 8 * MIB / SECTOR, SyncPolicy::Deferred).unwrap();
        w.write_at(&pattern(to_usize(3 * MIB), 1), 0).unwrap();
        w.flush().unwrap();
        drop(w); // no finish
        let e = super::super::open(&p, OpenOptions::read_only()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");

        let p = dir.path("g.vmdk");
        let mut w = StreamWriter::create(&p, 8 * MIB / SECTOR, SyncPolicy::Deferred).unwrap();
        w.write_at(&pattern(to_usize(3 * MIB), 1), 0).unwrap();
        w.finish().unwrap();
        drop(w);
        // Damage the first grain's compressed bytes: open works, read fails cleanly.
        let f = ImageFile::open(&p, true).unwrap();
        f.write_all_at(&[0xffu8; 64], 128 * 512 + 40).unwrap();
        let mut img = super::super::open(&p, OpenOptions::read_only()).unwrap();
        let mut b = vec![0u8; 4096];
        assert_eq!(
            img.read_at(&mut b, 0).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let problems = img.check().unwrap();
        assert!(problems.iter().any(|p| p.damage), "{problems:?}");
        // An absurd compressed size.
        f.write_all_at(&u32::MAX.to_le_bytes(), 128 * 512 + 8)
            .unwrap();
        let mut img = super::super::open(&p, OpenOptions::read_only()).unwrap();
        assert_eq!(
            img.read_at(&mut b, 0).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        // A GD entry beyond the end of the file.
        let len = f.len().unwrap();
        let footer: [u8; 512] = f.read_array(len - 1024).unwrap();
        let gd = le_u64(&footer, hdr::GD_OFFSET);
        f.write_all_at(&u32::MAX.to_le_bytes(), gd * 512).unwrap();
        let e = super::super::open(&p, OpenOptions::read_only())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(e.offset(), Some(gd * 512));
        // Truncated.
        f.set_len(len - 100).unwrap();
        let e = super::super::open(&p, OpenOptions::read_only())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    /// Random damage anywhere never panics.
    #[test]
    fn random_damage_never_panics() {
        let dir = TempDir::new("stream-fuzz");
        let good = dir.path("good.vmdk");
        let mut w =
            StreamWriter::create(&good, (34 * MIB + 512) / SECTOR, SyncPolicy::Deferred).unwrap();
        w.write_at(&pattern(200_000, 1), 5).unwrap();
        w.write_at(&pattern(100_000, 2), 33 * MIB).unwrap();
        w.finish().unwrap();
        drop(w);
        let bytes = std::fs::read(&good).unwrap();
        let mut x = 0x0bad_5eed_u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let p = dir.path("bad.vmdk");
        let n = bytes.len() as u64;
        for round in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..1 + rnd() % 4 {
                let at = match round % 3 {
                    0 => rnd() % 80,
                    1 => n - 1 - rnd() % 4096,
                    _ => rnd() % n,
                };
                b[to_usize(at)] = rnd().to_le_bytes()[0];
            }
            let _ = std::fs::remove_file(&p);
            std::fs::write(&p, &b).unwrap();
            if let Ok(mut img) = super::super::open(&p, OpenOptions::read_only()) {
                let size = img.size();
                let mut buf = vec![0u8; to_usize(size.min(MIB))];
                let _ = img.read_at(&mut buf, 0);
                let _ = img.map(0, size);
                let _ = img.check();
            }
        }
    }

    #[test]
    fn qemu_stream_images_read_identically() {
        if !have_qemu_img() {
            return;
        }
        let dir = TempDir::new("stream-qemu");
        let raw = dir.path("src.raw");
        let size = 40 * MIB + 512;
        let mut model = vec![0u8; to_usize(size)];
        let data = pattern(to_usize(6 * MIB + 333), 4);
        model[to_usize(MIB + 5)..to_usize(MIB + 5) + data.len()].copy_from_slice(&data);
        model[to_usize(size - 3)..].copy_from_slice(b"end");
        std::fs::write(&raw, &model).unwrap();
        let p = dir.path("q.vmdk");
        let (ok, out) = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            raw.to_str().unwrap(),
            p.to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
        let mut img = super::super::open(&p, OpenOptions::read_only()).unwrap();
        assert_eq!(img.format(), Format::VmdkStream);
        assert_eq!(read_all(img.as_mut()), model);
        assert!(img.check().unwrap().is_empty());
    }

    #[test]
    fn compression_is_parallel_and_ordered() {
        let grains: Vec<(u64, Vec<u8>)> = (0..37).map(|g| (g, pattern(65536, g))).collect();
        let one = compress_all(&grains, 1).unwrap();
        let many = compress_all(&grains, 4).unwrap();
        assert_eq!(one, many);
        let mut d = Decompress::new(true);
        let mut out = vec![0u8; 65536];
        for ((_, raw), c) in grains.iter().zip(&many) {
            d.reset(true);
            assert_eq!(
                d.decompress(c, &mut out, FlushDecompress::Finish).unwrap(),
                Status::StreamEnd
            );
            assert_eq!(&out, raw);
        }
    }
}
