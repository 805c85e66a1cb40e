//! monolithicSparse VMDK: one file with header, embedded descriptor,
//! redundant and primary grain directories with preallocated grain tables,
//! then grains appended as they are first written.
//!
//! Layout of images created here (the same as qemu's):
//!
//! ```text
//! sector 0            SparseExtentHeader
//! sector 1..21        embedded descriptor (20 sectors)
//! sector 21           redundant GD, then its GTs (4 sectors each)
//! gdOffset            GD, then its GTs
//! overHead            grains (128 sectors each), grain-aligned, in allocation order
//! ```
//!
//! Allocation is crash-safe under [`SyncPolicy::Ordered`]: new grains are
//! appended and made durable before any GTE points at them, so a crash
//! leaves at worst unreferenced (leaked) space at the end of the file.

use std::path::Path;

use super::descriptor::{self, Descriptor};
use super::{
    check_overlaps, corrupt_at, encode_table, fits, hdr, read_header, read_table, Claim,
    GrainChunks, RemoveOnError, SparseHeader, DESC_SECTOR, DESC_SECTORS, FLAG_REDUNDANT_GT,
    GD_AT_END, GTES_PER_GT, GTE_ZEROED, GT_BYTES, GT_SECTORS, MAX_DESCRIPTOR_BYTES,
};
use crate::error::{Error, Result};
use crate::fileio::bytes::le_u32;
use crate::fileio::{is_zero, ImageFile};
use crate::image::{check_range, push_extent, Extent, Format, Image, Problem, SyncPolicy, SECTOR};

/// New grains gathered before one append + sync + table update (16 MiB of 64 KiB grains).
const ALLOC_BATCH: usize = 256;
/// Bytes read at once while loading grain tables (they are usually contiguous).
const GT_READ_WINDOW: u64 = 1 << 20;

/// A grain table held in memory.
#[derive(Debug, Clone)]
enum Gt {
    /// GD entry 0: no table; the span reads as zeros and cannot be written.
    Absent,
    /// A table on disk whose entries are all 0 (kept without memory).
    Empty,
    /// A table with allocated entries.
    Loaded(Box<[u32]>),
}

/// An open monolithicSparse VMDK.
#[derive(Debug)]
pub(crate) struct SparseImage {
    file: ImageFile,
    header: SparseHeader,
    size: u64,
    grain_bytes: u64,
    /// Primary GD: sector of each GT.
    gd: Vec<u32>,
    /// Redundant GD, when the image keeps one.
    rgd: Option<Vec<u32>>,
    /// Primary GTs (the redundant copies are written, never read, except by `check`).
    gts: Vec<Gt>,
    file_len: u64,
    /// Sector where the next new grain goes (grain-aligned, past everything referenced).
    next_grain: u64,
    sync: SyncPolicy,
    /// `uncleanShutdown` is set on disk by us and must be cleared on flush.
    dirty: bool,
}

/// New grains of one write, contiguous in memory in the order they will be appended.
#[derive(Debug, Default)]
struct NewGrains {
    grains: Vec<u64>,
    data: Vec<u8>,
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

impl SparseImage {
    /// Create a new image of `capacity` sectors.
    pub(crate) fn create(path: &Path, capacity: u64, sync: SyncPolicy) -> Result<Self> {
        let mut header = SparseHeader::new(capacity);
        let n = header.num_gts();
        let gd_sectors = header.gd_sectors();
        header.rgd_offset = DESC_SECTOR + DESC_SECTORS;
        header.gd_offset = header.rgd_offset + gd_sectors + n * GT_SECTORS;
        header.overhead =
            (header.gd_offset + gd_sectors + n * GT_SECTORS).next_multiple_of(header.grain_size);

        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::invalid("image file name is not UTF-8").at_path(path))?;
        descriptor::check_file_name(name).map_err(|e| e.at_path(path))?;
        let text = descriptor::render(
            "monolithicSparse",
            capacity,
            &format!("SPARSE \"{name}\""),
            descriptor::random_cid()?,
        );
        if text.len() as u64 > DESC_SECTORS * SECTOR {
            return Err(
                Error::invalid("file name too long for the embedded descriptor").at_path(path),
            );
        }
        let table = |first: u64| -> Result<Vec<u32>> {
            (0..n)
                .map(|i| {
                    u32::try_from(first + gd_sectors + i * GT_SECTORS)
                        .map_err(|_| Error::invalid("disk too large for a sparse VMDK"))
                })
                .collect()
        };
        let rgd = table(header.rgd_offset)?;
        let gd = table(header.gd_offset)?;

        let file = ImageFile::create_new(path)?;
        let mut guard = RemoveOnError { path, armed: true };
        let file_len = header.overhead * SECTOR;
        // GTs are left as holes: they read as zeros (every grain unallocated).
        file.set_len(file_len)?;
        file.write_all_at(&header.encode(), 0)?;
        file.write_all_at(text.as_bytes(), DESC_SECTOR * SECTOR)?;
        file.write_all_at(&encode_table(&rgd), header.rgd_offset * SECTOR)?;
        file.write_all_at(&encode_table(&gd), header.gd_offset * SECTOR)?;
        if sync == SyncPolicy::Ordered {
            file.sync_data()?;
        }
        guard.armed = false;
        Ok(SparseImage {
            file,
            size: capacity * SECTOR,
            grain_bytes: header.grain_bytes(),
            next_grain: header.overhead,
            header,
            gd,
            rgd: Some(rgd),
            gts: vec![Gt::Empty; to_usize(n)],
            file_len,
            sync,
            dirty: false,
        })
    }

    /// Open and validate an existing image.
    pub(crate) fn open(file: ImageFile, sync: SyncPolicy) -> Result<Self> {
        let file_len = file.len()?;
        let header = read_header(&file)?;
        if header.gd_offset == GD_AT_END {
            return Err(Error::unsupported(
                "uncompressed sparse VMDK with its grain directory in a footer",
            )
            .at_path(file.path()));
        }
        let mut claims = vec![Claim {
            start: 0,
            len: 1,
            from: 0,
            what: "header",
        }];
        if header.desc_offset != 0 && header.desc_size != 0 {
            read_embedded_descriptor(&file, file_len, &header)?;
            claims.push(Claim {
                start: header.desc_offset,
                len: header.desc_size,
                from: hdr::DESC_OFFSET as u64,
                what: "embedded descriptor",
            });
        }
        let n = header.num_gts();
        let grain_size = header.grain_size;
        let gd_at = header.gd_offset.saturating_mul(SECTOR);
        let (gd, rgd) = if n == 0 {
            (Vec::new(), None)
        } else {
            let gd = read_table(
                &file,
                file_len,
                header.gd_offset,
                n,
                "grain directory",
                hdr::GD_OFFSET as u64,
            )?;
            claims.push(Claim {
                start: header.gd_offset,
                len: header.gd_sectors(),
                from: hdr::GD_OFFSET as u64,
                what: "grain directory",
            });
            let rgd = if header.flags & FLAG_REDUNDANT_GT != 0 && header.rgd_offset != 0 {
                claims.push(Claim {
                    start: header.rgd_offset,
                    len: header.gd_sectors(),
                    from: hdr::RGD_OFFSET as u64,
                    what: "redundant grain directory",
                });
                Some(read_table(
                    &file,
                    file_len,
                    header.rgd_offset,
                    n,
                    "redundant grain directory",
                    hdr::RGD_OFFSET as u64,
                )?)
            } else {
                None
            };
            (gd, rgd)
        };

        let mut gts = Vec::with_capacity(gd.len());
        let mut window: (u64, Vec<u8>) = (0, Vec::new());
        let mut max_grain_end = 0u64;
        for (t, &gt_sector) in gd.iter().enumerate() {
            let entry_at = gd_at + t as u64 * 4;
            if let Some(rgd) = &rgd {
                let r = u64::from(rgd[t]);
                if r != 0 {
                    let r_at = header.rgd_offset * SECTOR + t as u64 * 4;
                    if !fits(r, GT_BYTES, file_len) {
                        return Err(corrupt_at(
                            &file,
                            r_at,
                            format!("redundant grain table {t} at sector {r} lies beyond the end of the file"),
                        ));
                    }
                    claims.push(Claim {
                        start: r,
                        len: GT_SECTORS,
                        from: r_at,
                        what: "redundant grain table",
                    });
                }
            }
            let s = u64::from(gt_sector);
            if s == 0 {
                gts.push(Gt::Absent);
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
            let at = s * SECTOR;
            if at < window.0 || at + GT_BYTES > window.0 + window.1.len() as u64 {
                let len = GT_READ_WINDOW.min(file_len - at);
                window.1.resize(to_usize(len), 0);
                file.read_exact_at(&mut window.1, at)?;
                window.0 = at;
            }
            let off = to_usize(at - window.0);
            let raw = &window.1[off..off + to_usize(GT_BYTES)];
            let entries: Box<[u32]> = raw.chunks_exact(4).map(|c| le_u32(c, 0)).collect();
            let mut any = false;
            for (i, &e) in entries.iter().enumerate() {
                any |= e != 0;
                if e <= GTE_ZEROED {
                    continue;
                }
                let e = u64::from(e);
                let e_at = at + i as u64 * 4;
                if e < header.overhead {
                    return Err(corrupt_at(
                        &file,
                        e_at,
                        format!(
                            "grain table {t} entry {i} points at sector {e}, inside the metadata \
                             area (overHead is {})",
                            header.overhead
                        ),
                    ));
                }
                if e * SECTOR >= file_len {
                    return Err(corrupt_at(
                        &file,
                        e_at,
                        format!(
                            "grain table {t} entry {i} points at sector {e}, beyond the end of the \
                             file ({file_len} bytes)"
                        ),
                    ));
                }
                claims.push(Claim {
                    start: e,
                    len: grain_size,
                    from: e_at,
                    what: "grain",
                });
                max_grain_end = max_grain_end.max(e + grain_size);
            }
            gts.push(if any { Gt::Loaded(entries) } else { Gt::Empty });
        }
        check_overlaps(&file, &mut claims)?;
        let next_grain = file_len
            .div_ceil(SECTOR)
            .max(header.overhead)
            .max(max_grain_end)
            .checked_next_multiple_of(grain_size)
            .ok_or_else(|| corrupt_at(&file, hdr::OVERHEAD as u64, "overHead is absurd"))?;
        Ok(SparseImage {
            file,
            size: header.capacity * SECTOR,
            grain_bytes: header.grain_bytes(),
            header,
            gd,
            rgd,
            gts,
            file_len,
            next_grain,
            sync,
            dirty: false,
        })
    }

    fn gte(&self, grain: u64) -> u32 {
        let t = to_usize(grain / u64::from(GTES_PER_GT));
        let i = to_usize(grain % u64::from(GTES_PER_GT));
        match self.gts.get(t) {
            Some(Gt::Loaded(gt)) => gt[i],
            _ => 0,
        }
    }

    /// The GTE of `grain` for a write: refuses spans without a grain table.
    fn gte_for_write(&self, grain: u64) -> Result<u32> {
        let t = to_usize(grain / u64::from(GTES_PER_GT));
        match self.gts.get(t) {
            Some(Gt::Absent) | None => Err(Error::unsupported(format!(
                "grain table {t} is not allocated (GD entry 0); writing there would need a new \
                 grain table"
            ))
            .at_path(self.file.path())),
            _ => Ok(self.gte(grain)),
        }
    }

    /// Read file bytes at `at`; bytes past the end of the file read as zeros
    /// (a last grain may be partly written).
    fn read_phys(&self, buf: &mut [u8], at: u64) -> Result<()> {
        let avail = to_usize(self.file_len.saturating_sub(at)).min(buf.len());
        self.file.read_exact_at(&mut buf[..avail], at)?;
        buf[avail..].fill(0);
        Ok(())
    }

    fn mark_dirty(&mut self) -> Result<()> {
        if !self.dirty {
            self.file.write_all_at(&[1], hdr::UNCLEAN_SHUTDOWN as u64)?;
            if self.sync == SyncPolicy::Ordered {
                self.file.sync_data()?;
            }
            self.dirty = true;
        }
        Ok(())
    }

    /// Append new grains, make them durable, then point the GTEs (primary
    /// and redundant) at them.
    fn allocate(&mut self, batch: &mut NewGrains) -> Result<()> {
        if batch.grains.is_empty() {
            return Ok(());
        }
        let grain_size = self.header.grain_size;
        let start = self.next_grain;
        let count = batch.grains.len() as u64;
        let last = start + (count - 1) * grain_size;
        if u32::try_from(last).is_err() {
            return Err(Error::unsupported(
                "the image file would grow beyond 2 TiB, the most sparse VMDK grain tables address",
            )
            .at_path(self.file.path()));
        }
        let at = start * SECTOR;
        self.file.write_all_at(&batch.data, at)?;
        self.file_len = self.file_len.max(at + batch.data.len() as u64);
        self.next_grain = start + count * grain_size;
        if self.sync == SyncPolicy::Ordered {
            self.file.sync_data()?;
        }
        // (gt index, first entry, last entry) runs to write back.
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (k, &g) in batch.grains.iter().enumerate() {
            let t = to_usize(g / u64::from(GTES_PER_GT));
            let i = to_usize(g % u64::from(GTES_PER_GT));
            let entry = u32::try_from(start + k as u64 * grain_size).unwrap_or(u32::MAX);
            let gt = &mut self.gts[t];
            if !matches!(gt, Gt::Loaded(_)) {
                *gt = Gt::Loaded(vec![0u32; GTES_PER_GT as usize].into_boxed_slice());
            }
            if let Gt::Loaded(entries) = gt {
                entries[i] = entry;
            }
            match runs.last_mut() {
                Some((rt, lo, hi)) if *rt == t => {
                    *lo = (*lo).min(i);
                    *hi = (*hi).max(i);
                }
                _ => runs.push((t, i, i)),
            }
        }
        for (t, lo, hi) in runs {
            let Gt::Loaded(entries) = &self.gts[t] else {
                continue;
            };
            let bytes = encode_table(&entries[lo..=hi]);
            let rel = lo as u64 * 4;
            self.file
                .write_all_at(&bytes, u64::from(self.gd[t]) * SECTOR + rel)?;
            if let Some(rgd) = &self.rgd {
                if rgd[t] != 0 {
                    self.file
                        .write_all_at(&bytes, u64::from(rgd[t]) * SECTOR + rel)?;
                }
            }
        }
        batch.grains.clear();
        batch.data.clear();
        Ok(())
    }
}

/// Read and check the embedded descriptor: a parent or several extents
/// would make this file alone the wrong disk.
pub(crate) fn read_embedded_descriptor(
    file: &ImageFile,
    file_len: u64,
    header: &SparseHeader,
) -> Result<Descriptor> {
    let bytes = header
        .desc_size
        .checked_mul(SECTOR)
        .filter(|&b| b <= MAX_DESCRIPTOR_BYTES)
        .ok_or_else(|| {
            corrupt_at(
                file,
                hdr::DESC_SIZE as u64,
                format!(
                    "embedded descriptor of {} sectors is too large",
                    header.desc_size
                ),
            )
        })?;
    if !fits(header.desc_offset, bytes, file_len) {
        return Err(corrupt_at(
            file,
            hdr::DESC_OFFSET as u64,
            "embedded descriptor lies beyond the end of the file",
        ));
    }
    let mut text = vec![0u8; to_usize(bytes)];
    let at = header.desc_offset * SECTOR;
    file.read_exact_at(&mut text, at)?;
    let desc = Descriptor::parse(&text).map_err(|e| e.at_offset(at).at_path(file.path()))?;
    if desc.has_parent() {
        return Err(Error::unsupported(
            "VMDK delta disk with a parent (parentCID is set): open the whole chain with VMware \
             tools",
        )
        .at_path(file.path()));
    }
    if desc.extents.len() > 1 {
        return Err(Error::unsupported(format!(
            "embedded descriptor lists {} extents; only single-extent sparse VMDKs are supported",
            desc.extents.len()
        ))
        .at_path(file.path()));
    }
    Ok(desc)
}

impl Image for SparseImage {
    fn format(&self) -> Format {
        Format::VmdkSparse
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len(), "read").map_err(|e| e.at_path(self.path()))?;
        // Physically contiguous grains are read with one call.
        let mut pending: Option<(u64, std::ops::Range<usize>)> = None;
        for (g, in_off, r) in GrainChunks::new(offset, buf.len(), self.grain_bytes) {
            let gte = self.gte(g);
            if gte <= GTE_ZEROED {
                buf[r].fill(0);
                continue;
            }
            let phys = u64::from(gte) * SECTOR + in_off;
            match &mut pending {
                Some((p, pr)) if *p + pr.len() as u64 == phys && pr.end == r.start => {
                    pr.end = r.end;
                }
                _ => {
                    if let Some((p, pr)) = pending.take() {
                        self.read_phys(&mut buf[pr], p)?;
                    }
                    pending = Some((phys, r));
                }
            }
        }
        if let Some((p, pr)) = pending {
            self.read_phys(&mut buf[pr], p)?;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len(), "write").map_err(|e| e.at_path(self.path()))?;
        if !self.file.writable() {
            return Err(Error::invalid("image is open read-only").at_path(self.path()));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.mark_dirty()?;
        let mut batch = NewGrains::default();
        let grain_bytes = to_usize(self.grain_bytes);
        for (g, in_off, r) in GrainChunks::new(offset, buf.len(), self.grain_bytes) {
            let data = &buf[r];
            let gte = self.gte_for_write(g)?;
            if gte > GTE_ZEROED {
                let at = u64::from(gte) * SECTOR + in_off;
                self.file.write_all_at(data, at)?;
                self.file_len = self.file_len.max(at + data.len() as u64);
                continue;
            }
            if is_zero(data) {
                // Unallocated and zeroed grains already read as zeros.
                continue;
            }
            let base = batch.data.len();
            batch.data.resize(base + grain_bytes, 0);
            let from = base + to_usize(in_off);
            batch.data[from..from + data.len()].copy_from_slice(data);
            batch.grains.push(g);
            if batch.grains.len() >= ALLOC_BATCH {
                self.allocate(&mut batch)?;
            }
        }
        self.allocate(&mut batch)
    }

    fn flush(&mut self) -> Result<()> {
        self.file.sync_data()?;
        if self.dirty {
            self.file.write_all_at(&[0], hdr::UNCLEAN_SHUTDOWN as u64)?;
            self.file.sync_data()?;
            self.dirty = false;
        }
        Ok(())
    }

    fn map(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::invalid("map range beyond the disk").at_path(self.path()))?;
        let span = self.grain_bytes * u64::from(GTES_PER_GT);
        let mut map = Vec::new();
        let mut pos = offset;
        while pos < end {
            let g = pos / self.grain_bytes;
            let t = to_usize(g / u64::from(GTES_PER_GT));
            let (next, allocated) = if matches!(self.gts.get(t), Some(Gt::Loaded(_))) {
                ((g + 1) * self.grain_bytes, self.gte(g) > GTE_ZEROED)
            } else {
                ((t as u64 + 1) * span, false)
            };
            let next = next.min(end);
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

    fn allocated_bytes(&mut self) -> Result<u64> {
        let grains: u64 = self
            .gts
            .iter()
            .map(|gt| match gt {
                Gt::Loaded(e) => e.iter().filter(|&&e| e > GTE_ZEROED).count() as u64,
                _ => 0,
            })
            .sum();
        Ok(grains * self.grain_bytes)
    }

    fn check(&mut self) -> Result<Vec<Problem>> {
        let mut problems = Vec::new();
        if self.header.unclean_shutdown {
            problems.push(Problem {
                offset: hdr::UNCLEAN_SHUTDOWN as u64,
                what: "uncleanShutdown is set: the image was not closed cleanly".into(),
                damage: false,
            });
        }
        // Regions in use past the metadata: grains and any tables living there.
        let mut used: Vec<(u64, u64)> = Vec::new();
        for (t, gt) in self.gts.iter().enumerate() {
            if self.gd[t] != 0 {
                used.push((u64::from(self.gd[t]) * SECTOR, GT_BYTES));
            }
            if let Gt::Loaded(entries) = gt {
                used.extend(
                    entries
                        .iter()
                        .filter(|&&e| e > GTE_ZEROED)
                        .map(|&e| (u64::from(e) * SECTOR, self.grain_bytes)),
                );
            }
        }
        if let Some(rgd) = &self.rgd {
            let mut raw = vec![0u8; to_usize(GT_BYTES)];
            for (t, (&p, &r)) in self.gd.iter().zip(rgd).enumerate() {
                let r_at = self.header.rgd_offset * SECTOR + t as u64 * 4;
                if (p == 0) != (r == 0) {
                    problems.push(Problem {
                        offset: r_at,
                        what: format!(
                            "grain directory entry {t} is {p} but the redundant entry is {r}"
                        ),
                        damage: true,
                    });
                }
                if p == 0 || r == 0 {
                    continue;
                }
                used.push((u64::from(r) * SECTOR, GT_BYTES));
                let at = u64::from(r) * SECTOR;
                self.file.read_exact_at(&mut raw, at)?;
                let mut first = None;
                let mut count = 0usize;
                for i in 0..GTES_PER_GT as usize {
                    let red = le_u32(&raw, i * 4);
                    let pri = match &self.gts[t] {
                        Gt::Loaded(e) => e[i],
                        _ => 0,
                    };
                    if red != pri {
                        count += 1;
                        first.get_or_insert((i, red, pri));
                    }
                }
                if let Some((i, red, pri)) = first {
                    problems.push(Problem {
                        offset: at + i as u64 * 4,
                        what: format!(
                            "redundant grain table {t} differs from the primary in {count} \
                             entries (first: entry {i} is {red}, primary {pri})"
                        ),
                        damage: true,
                    });
                }
            }
        }
        used.sort_unstable();
        let mut cursor = self.header.overhead * SECTOR;
        let mut leaked = 0u64;
        let mut first_leak = None;
        for (start, len) in used {
            if start > cursor {
                leaked += start - cursor;
                first_leak.get_or_insert(cursor);
            }
            cursor = cursor.max(start + len);
        }
        if self.file_len > cursor {
            leaked += self.file_len - cursor;
            first_leak.get_or_insert(cursor);
        }
        if let Some(at) = first_leak {
            problems.push(Problem {
                offset: at,
                what: format!("{leaked} bytes are not referenced by any grain table (leaked)"),
                damage: false,
            });
        }
        Ok(problems)
    }
}

impl Drop for SparseImage {
    fn drop(&mut self) {
        if self.dirty {
            // Best effort: clear uncleanShutdown after syncing everything.
            let _ = self.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{
        compressible_pattern as pattern, have_qemu_img, qemu_img, qemu_vmdk_agrees, TempDir,
    };
    use crate::ErrorKind;

    const MIB: u64 = 1 << 20;

    fn create(path: &Path, size: u64) -> SparseImage {
        SparseImage::create(path, size / SECTOR, SyncPolicy::Ordered).unwrap()
    }

    fn open(path: &Path, writable: bool) -> Result<SparseImage> {
        SparseImage::open(ImageFile::open(path, writable)?, SyncPolicy::Ordered)
    }

    fn read_all(img: &mut dyn Image) -> Vec<u8> {
        let mut out = vec![0u8; to_usize(img.size())];
        img.read_at(&mut out, 0).unwrap();
        out
    }

    #[test]
    fn round_trip_odd_offsets_and_reopen() {
        let dir = TempDir::new("sparse-rt");
        let p = dir.path("a.vmdk");
        let size = 70 * MIB + 3 * SECTOR; // not a grain multiple, spans 3 GTs
        let mut model = vec![0u8; to_usize(size)];
        {
            let mut img = create(&p, size);
            let writes: [(u64, usize); 7] = [
                (0, 1),
                (1, 100_000),
                (65_535, 3),
                (10 * MIB + 7, 300_000),
                (32 * MIB - 5, 10),
                (size - 700, 700),
                (40 * MIB, to_usize(4 * MIB)),
            ];
            for (k, (off, len)) in writes.into_iter().enumerate() {
                let data = pattern(len, k as u64 + 1);
                img.write_at(&data, off).unwrap();
                model[to_usize(off)..to_usize(off) + len].copy_from_slice(&data);
            }
            // Overwrite inside an allocated grain, and write zeros to an unallocated one.
            img.write_at(&[9u8; 10], 5).unwrap();
            model[5..15].fill(9);
            img.write_at(&vec![0u8; 65536], 20 * MIB).unwrap();
            assert_eq!(read_all(&mut img), model);
            img.flush().unwrap();
        }
        let mut img = open(&p, false).unwrap();
        assert_eq!(img.size(), size);
        assert_eq!(read_all(&mut img), model);
        let mut odd = vec![0u8; 77_777];
        img.read_at(&mut odd, 10 * MIB + 3).unwrap();
        assert_eq!(
            &odd[..],
            &model[to_usize(10 * MIB + 3)..to_usize(10 * MIB + 3) + 77_777]
        );
        let problems = img.check().unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        let map = img.map(0, size).unwrap();
        assert_eq!(map.iter().map(|e| e.length).sum::<u64>(), size);
        assert!(map[0].allocated && map[0].offset == 0);
        assert!(!map
            .iter()
            .any(|e| e.allocated && e.offset <= 20 * MIB && e.end() > 20 * MIB));
        let alloc = img.allocated_bytes().unwrap();
        let allocated_runs: u64 = map.iter().filter(|e| e.allocated).map(|e| e.length).sum();
        assert!(alloc >= allocated_runs && alloc / 65536 * 65536 == alloc);
        if have_qemu_img() {
            let ps = p.to_str().unwrap();
            qemu_vmdk_agrees(ps, &model, &dir.path("a.raw"));
        }
    }

    #[test]
    fn redundant_tables_stay_identical() {
        let dir = TempDir::new("sparse-rgd");
        let p = dir.path("r.vmdk");
        let mut img = create(&p, 64 * MIB);
        for k in 0..40u64 {
            img.write_at(&pattern(1000, k), (k * 1_234_567) % (64 * MIB - 1000))
                .unwrap();
        }
        img.flush().unwrap();
        drop(img);
        let mut img = open(&p, false).unwrap();
        assert!(img.check().unwrap().is_empty());
        let f = ImageFile::open(&p, false).unwrap();
        for t in 0..img.gd.len() {
            let a = read_table(&f, f.len().unwrap(), u64::from(img.gd[t]), 512, "gt", 0).unwrap();
            let rgd = img.rgd.as_ref().unwrap();
            let b = read_table(&f, f.len().unwrap(), u64::from(rgd[t]), 512, "gt", 0).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn crash_before_gte_update_reads_zeros() {
        let dir = TempDir::new("sparse-crash");
        let p = dir.path("c.vmdk");
        let mut img = create(&p, 8 * MIB);
        img.write_at(&[7u8; 512], 0).unwrap();
        img.flush().unwrap();
        let end = img.file_len;
        drop(img);
        // A grain appended (as the first step of allocation) but never referenced.
        let f = ImageFile::open(&p, true).unwrap();
        f.write_all_at(&pattern(65536, 3), end).unwrap();
        drop(f);
        let mut img = open(&p, true).unwrap();
        let mut buf = vec![1u8; 65536];
        img.read_at(&mut buf, MIB).unwrap();
        assert!(is_zero(&buf));
        let problems = img.check().unwrap();
        assert!(problems.iter().all(|p| !p.damage), "{problems:?}");
        assert!(problems
            .iter()
            .any(|p| p.what.contains("leaked") && p.offset == end));
        // The next allocation goes after the leaked grain and works.
        img.write_at(&[5u8; 100], MIB).unwrap();
        img.flush().unwrap();
        drop(img);
        let mut img = open(&p, false).unwrap();
        img.read_at(&mut buf[..100], MIB).unwrap();
        assert_eq!(&buf[..100], &[5u8; 100]);
    }

    #[test]
    fn unclean_shutdown_is_reported() {
        let dir = TempDir::new("sparse-unclean");
        let p = dir.path("u.vmdk");
        let mut img = create(&p, 4 * MIB);
        img.write_at(&[1u8; 4096], 0).unwrap();
        // Simulate a crash: forget the image without clearing the flag.
        std::mem::forget(img);
        let mut img = open(&p, false).unwrap();
        let problems = img.check().unwrap();
        assert!(
            problems.iter().any(|p| p.offset == 72 && !p.damage),
            "{problems:?}"
        );
    }

    fn corrupt_case(name: &str, damage: impl FnOnce(&ImageFile, &SparseImage)) -> Error {
        let dir = TempDir::new(name);
        let p = dir.path("x.vmdk");
        let mut img = create(&p, 40 * MIB);
        img.write_at(&pattern(200_000, 1), 0).unwrap();
        img.write_at(&pattern(1000, 2), 36 * MIB).unwrap();
        img.flush().unwrap();
        let f = ImageFile::open(&p, true).unwrap();
        damage(&f, &img);
        drop(img);
        drop(f);
        let err = open(&p, false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{name}: {err}");
        assert_eq!(err.path(), Some(p.as_path()), "{name}: {err}");
        err
    }

    #[test]
    fn corrupt_images_are_refused() {
        let e = corrupt_case("trunc", |f, img| {
            f.set_len(img.header.overhead * SECTOR).unwrap()
        });
        assert!(e.message().contains("beyond the end"), "{e}");
        corrupt_case("short", |f, _| f.set_len(300).unwrap());
        corrupt_case("magic", |f, _| f.write_all_at(b"XXXX", 0).unwrap());
        corrupt_case("version", |f, _| {
            f.write_all_at(&9u32.to_le_bytes(), 4).unwrap()
        });
        corrupt_case("grain", |f, _| {
            f.write_all_at(&100u64.to_le_bytes(), 20).unwrap()
        });
        corrupt_case("grain0", |f, _| {
            f.write_all_at(&0u64.to_le_bytes(), 20).unwrap()
        });
        corrupt_case("gtes", |f, _| {
            f.write_all_at(&128u32.to_le_bytes(), 44).unwrap()
        });
        let e = corrupt_case("capacity", |f, _| {
            f.write_all_at(&u64::MAX.to_le_bytes(), 12).unwrap()
        });
        assert_eq!(e.offset(), Some(12));
        let e = corrupt_case("gd-entry", |f, img| {
            let at = img.header.gd_offset * SECTOR;
            f.write_all_at(&u32::MAX.to_le_bytes(), at).unwrap();
        });
        // 40 MiB: 2 GTs, 1 GD sector; RGD at 21, its GTs at 22..30, GD at 30.
        assert_eq!(e.offset(), Some(30 * SECTOR), "{e}");
        corrupt_case("gd-offset", |f, _| {
            f.write_all_at(&(1u64 << 40).to_le_bytes(), 56).unwrap()
        });
        let e = corrupt_case("dup-gte", |f, img| {
            let Gt::Loaded(gt) = &img.gts[0] else {
                panic!()
            };
            let at = u64::from(img.gd[0]) * SECTOR + 4;
            f.write_all_at(&gt[0].to_le_bytes(), at).unwrap();
        });
        assert!(e.message().contains("overlaps"), "{e}");
        let e = corrupt_case("gte-meta", |f, img| {
            let at = u64::from(img.gd[0]) * SECTOR + 8;
            f.write_all_at(&5u32.to_le_bytes(), at).unwrap();
        });
        assert!(e.message().contains("metadata"), "{e}");
        corrupt_case("gt-overlap", |f, img| {
            // Point GT 1 at GT 0.
            let at = img.header.gd_offset * SECTOR + 4;
            f.write_all_at(&img.gd[0].to_le_bytes(), at).unwrap();
        });
        corrupt_case("newline", |f, _| f.write_all_at(b"\r\n", 73).unwrap());
        corrupt_case("desc", |f, _| {
            f.write_all_at(&1000u64.to_le_bytes(), 36).unwrap()
        });
    }

    /// Random damage to the metadata never panics: open fails cleanly or
    /// the image reads, maps, checks and even takes writes.
    #[test]
    fn random_metadata_damage_never_panics() {
        let dir = TempDir::new("sparse-fuzz");
        let good = dir.path("good.vmdk");
        let mut img = create(&good, 40 * MIB + 512);
        img.write_at(&pattern(300_000, 1), 7).unwrap();
        img.write_at(&pattern(70_000, 2), 33 * MIB).unwrap();
        img.flush().unwrap();
        drop(img);
        let bytes = std::fs::read(&good).unwrap();
        let meta = to_usize(128 * SECTOR);
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let p = dir.path("bad.vmdk");
        for round in 0..300 {
            let mut b = bytes.clone();
            for _ in 0..1 + rnd() % 4 {
                // Mostly header fields, sometimes GD/GT bytes.
                let at = if round % 2 == 0 {
                    rnd() % 80
                } else {
                    rnd() % meta as u64
                };
                let v = match rnd() % 4 {
                    0 => 0,
                    1 => 0xff,
                    _ => rnd().to_le_bytes()[0],
                };
                b[to_usize(at)] = v;
            }
            if round % 7 == 0 {
                b.truncate(to_usize(rnd() % b.len() as u64));
            }
            let _ = std::fs::remove_file(&p);
            std::fs::write(&p, &b).unwrap();
            if let Ok(mut img) = open(&p, true) {
                let size = img.size();
                let mut buf = vec![0u8; to_usize(size.min(2 * MIB))];
                let _ = img.read_at(&mut buf, 0);
                let _ = img.map(0, size);
                let _ = img.check();
                let _ = img.allocated_bytes();
                if size > 0 {
                    let _ = img.write_at(&[1u8; 3000], size.saturating_sub(3000) / 2);
                }
            }
        }
    }

    #[test]
    fn read_only_refuses_writes_and_bounds_are_checked() {
        let dir = TempDir::new("sparse-ro");
        let p = dir.path("r.vmdk");
        drop(create(&p, MIB));
        let mut img = open(&p, false).unwrap();
        assert_eq!(
            img.write_at(&[1], 0).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let mut b = [0u8; 2];
        assert_eq!(
            img.read_at(&mut b, MIB - 1).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(img.allocated_bytes().unwrap(), 0);
        assert_eq!(
            img.map(0, MIB).unwrap(),
            vec![Extent {
                offset: 0,
                length: MIB,
                allocated: false
            }]
        );
    }

    #[test]
    fn qemu_created_image_reads_and_writes() {
        if !have_qemu_img() {
            return;
        }
        let dir = TempDir::new("sparse-qemu");
        let p = dir.path("q.vmdk");
        let ps = p.to_str().unwrap();
        let raw = dir.path("q.raw");
        let data: Vec<u8> = pattern(to_usize(5 * MIB + 1024), 9);
        let mut model = vec![0u8; to_usize(100 * MIB)];
        model[to_usize(MIB)..to_usize(MIB) + data.len()].copy_from_slice(&data);
        model[to_usize(99 * MIB)..to_usize(99 * MIB) + 3].copy_from_slice(b"end");
        std::fs::write(&raw, &model).unwrap();
        let (ok, out) = qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            raw.to_str().unwrap(),
            ps,
        ]);
        assert!(ok, "{out}");
        let mut img = open(&p, true).unwrap();
        assert_eq!(read_all(&mut img), model);
        img.write_at(b"ferry", 50 * MIB + 3).unwrap();
        img.write_at(b"again", MIB + 10).unwrap();
        model[to_usize(50 * MIB + 3)..to_usize(50 * MIB + 8)].copy_from_slice(b"ferry");
        model[to_usize(MIB + 10)..to_usize(MIB + 15)].copy_from_slice(b"again");
        img.flush().unwrap();
        drop(img);
        let (ok, out) = qemu_img(&["check", "-f", "vmdk", ps]);
        assert!(ok, "qemu-img check: {out}");
        std::fs::write(&raw, &model).unwrap();
        let (ok, out) = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            "vmdk",
            raw.to_str().unwrap(),
            ps,
        ]);
        assert!(ok, "qemu-img compare: {out}");
    }
}
