//! Dynamic and differencing VHDs: a block allocation table (BAT) of sector
//! offsets; each allocated block is a sector bitmap followed by the data.
//!
//! Bitmap bits are most-significant-bit first (bit 7 of byte 0 is sector 0 of
//! the block). In a dynamic disk a clear bit reads as zeros; in a
//! differencing disk it reads from the parent. New dynamic blocks get every
//! bit set (as qemu does), so partial blocks rely on the file's hole reading
//! as zeros; new differencing blocks get exactly the written sectors.
//!
//! Growing the image is crash-safe (see [`DynamicVhd::allocate_block`]): the
//! block and the moved footer are written and synced before the BAT entry
//! that makes them reachable. A crash in between leaves an image whose end
//! footer may be gone; [`super::read_footer`] then uses the copy at offset 0,
//! and a read-write open rewrites the end footer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::footer::*;
use super::{open_chained, read_footer, FoundFooter};
use crate::error::{Context, Error, ErrorKind, Result};
use crate::fileio::{random_bytes, ImageFile};
use crate::image::{check_range, push_extent, Extent, Format, Image, Problem, SyncPolicy, SECTOR};
use crate::{CreateOptions, OpenOptions};

/// BAT entry of a block that is not allocated.
pub const BAT_UNUSED: u32 = u32::MAX;
/// Offset of the dynamic header in the images we write.
const HEADER_OFFSET: u64 = FOOTER_SIZE as u64;
/// Offset of the BAT in the images we write (right after the header).
const TABLE_OFFSET: u64 = HEADER_OFFSET + HEADER_SIZE as u64;
/// Bitmaps kept in memory before the cache is emptied (32 MiB worth).
const BITMAP_CACHE_LIMIT: usize = 65_536;

fn round_up_sector(n: u64) -> u64 {
    n.div_ceil(SECTOR) * SECTOR
}

/// A dynamic or differencing VHD.
#[derive(Debug)]
pub struct DynamicVhd {
    file: ImageFile,
    footer: Footer,
    header: DynamicHeader,
    /// One entry per block of the virtual disk (entries past it are ignored).
    bat: Vec<u32>,
    block_size: u64,
    bitmap_size: u64,
    /// Where the end footer sits, and so where the next block goes.
    append_at: u64,
    /// Unreferenced bytes between the last block and the footer.
    leaked: u64,
    sync: SyncPolicy,
    parent: Option<Box<dyn Image>>,
    bitmaps: HashMap<u32, Box<[u8]>>,
    footer_problem: Option<String>,
}

/// A region of the file that holds metadata, for overlap checks.
#[derive(Debug, Clone, Copy)]
struct Region {
    start: u64,
    end: u64,
    what: &'static str,
}

impl DynamicVhd {
    /// Create an empty dynamic VHD of `size` bytes (already settled).
    pub fn create(path: &Path, size: u64, options: &CreateOptions) -> Result<Self> {
        let file = ImageFile::create_new(path)?;
        let footer = Footer::new(DiskType::Dynamic, size, random_bytes()?);
        write_layout(&file, &footer, empty_parent_fields(), &[], options.sync)?;
        Self::reopen(file, options.sync)
    }

    /// Create a differencing VHD whose parent is `parent`. `size` 0 means the
    /// parent's size; any other size must equal it.
    pub fn create_child(
        path: &Path,
        parent: &Path,
        size: u64,
        options: &CreateOptions,
    ) -> Result<Self> {
        let parent_file = ImageFile::open(parent, false)?;
        let parent_footer = read_footer(&parent_file)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Parent,
                    format!("parent is not a usable VHD: {e}"),
                )
                .at_path(parent)
            })?
            .footer;
        if size != 0 && size != parent_footer.current_size {
            return Err(Error::invalid(format!(
                "a differencing disk has its parent's size ({}), not {size}",
                parent_footer.current_size
            ))
            .at_path(path));
        }
        let parent_abs = parent
            .canonicalize()
            .map_err(|e| Error::io(e, "open").at_path(parent))?;
        let child_dir = absolute_dir_of(path)?;
        let relative = relative_path(&child_dir, &parent_abs);
        let name = parent_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let fields = ParentFields {
            uuid: parent_footer.unique_id,
            timestamp: parent_footer.timestamp,
            name: name.unwrap_or_default(),
        };
        let locators = [
            (PLATFORM_W2RU, utf16le(&relative.to_string_lossy())),
            (PLATFORM_W2KU, utf16le(&parent_abs.to_string_lossy())),
        ];
        let file = ImageFile::create_new(path)?;
        let footer = Footer::new(
            DiskType::Differencing,
            parent_footer.current_size,
            random_bytes()?,
        );
        write_layout(&file, &footer, fields, &locators, options.sync)?;
        Self::reopen(file, options.sync)
    }

    fn reopen(file: ImageFile, sync: SyncPolicy) -> Result<Self> {
        let found = read_footer(&file)?;
        let path = file.path().to_path_buf();
        Self::open(
            file,
            found,
            OpenOptions {
                writable: true,
                sync,
            },
            &mut Vec::new(),
        )
        .path_ctx(&path)
    }

    /// Open a dynamic or differencing VHD whose footer was already read.
    /// `visited` holds the canonical paths of the children opened so far.
    pub(crate) fn open(
        file: ImageFile,
        found: FoundFooter,
        options: OpenOptions,
        visited: &mut Vec<PathBuf>,
    ) -> Result<Self> {
        let len = file.len()?;
        let footer = found.footer;
        let header_offset = footer.data_offset;
        if header_offset
            .checked_add(HEADER_SIZE as u64)
            .is_none_or(|end| end > len)
        {
            return Err(Error::corrupt(format!(
                "dynamic header offset {header_offset} lies beyond the end of the file ({len})"
            ))
            .at_offset(F_DATA_OFFSET as u64));
        }
        let header = DynamicHeader::decode(&file.read_array::<HEADER_SIZE>(header_offset)?)
            .map_err(|e| e.at_offset(header_offset).during("read dynamic header"))?;
        let block_size = u64::from(header.block_size);
        let blocks = footer.current_size.div_ceil(block_size);
        if u64::from(header.max_table_entries) < blocks {
            return Err(Error::corrupt(format!(
                "BAT has {} entries but the disk needs {blocks}",
                header.max_table_entries
            ))
            .at_offset(header_offset + H_MAX_TABLE_ENTRIES as u64));
        }
        let bat_bytes = u64::from(header.max_table_entries) * 4;
        let table_offset = header.table_offset;
        if table_offset
            .checked_add(bat_bytes)
            .is_none_or(|end| end > len)
        {
            return Err(Error::corrupt(format!(
                "BAT of {bat_bytes} bytes at {table_offset} runs past the end of the file ({len})"
            ))
            .at_offset(header_offset + H_TABLE_OFFSET as u64));
        }
        // Bounded by the file length checked above.
        let mut raw_bat = vec![
            0u8;
            usize::try_from(blocks * 4).map_err(|_| {
                Error::unsupported("BAT too large for this machine's address space")
            })?
        ];
        file.read_exact_at(&mut raw_bat, table_offset)?;
        let bat: Vec<u32> = raw_bat
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();

        let bitmap_size = round_up_sector(block_size / SECTOR / 8);
        let mut metadata = vec![
            Region {
                start: header_offset,
                end: header_offset + HEADER_SIZE as u64,
                what: "header",
            },
            Region {
                start: table_offset,
                end: round_up_sector(table_offset + bat_bytes),
                what: "BAT",
            },
        ];
        if found.at_end || footer.data_offset >= FOOTER_SIZE as u64 {
            metadata.push(Region {
                start: 0,
                end: FOOTER_SIZE as u64,
                what: "footer copy",
            });
        }
        if footer.disk_type == DiskType::Differencing {
            for (i, loc) in header
                .locators
                .iter()
                .enumerate()
                .filter(|(_, l)| l.code != 0)
            {
                let at = header_offset + (H_PARENT_LOCATORS + i * PARENT_LOCATOR_SIZE) as u64;
                let end = loc
                    .data_offset
                    .checked_add(u64::from(loc.data_length))
                    .filter(|&end| end <= len && loc.data_length <= MAX_LOCATOR_LEN)
                    .ok_or_else(|| {
                        Error::corrupt(format!(
                            "parent locator {i} ({} bytes at {}) lies outside the file",
                            loc.data_length, loc.data_offset
                        ))
                        .at_offset(at)
                    })?;
                metadata.push(Region {
                    start: loc.data_offset,
                    end,
                    what: "parent locator",
                });
            }
        }
        let data_end = if found.at_end {
            len - FOOTER_SIZE as u64
        } else {
            len
        };
        let blocks_end = validate_bat(
            &bat,
            table_offset,
            block_size + bitmap_size,
            &metadata,
            data_end,
        )?;
        let meta_end = metadata
            .iter()
            .map(|r| round_up_sector(r.end))
            .max()
            .unwrap_or(0);
        let next = round_up_sector(blocks_end.max(meta_end));

        let parent = if footer.disk_type == DiskType::Differencing {
            Some(resolve_parent(
                &file,
                &header,
                footer.current_size,
                visited,
            )?)
        } else {
            None
        };

        let mut vhd = DynamicVhd {
            append_at: if found.at_end { data_end } else { next },
            leaked: if found.at_end { data_end - next } else { 0 },
            file,
            footer,
            header,
            bat,
            block_size,
            bitmap_size,
            sync: options.sync,
            parent,
            bitmaps: HashMap::new(),
            footer_problem: found.other_problem,
        };
        if !found.at_end && options.writable {
            vhd.rewrite_end_footer()?;
        }
        Ok(vhd)
    }

    /// After an interrupted allocation: drop whatever follows the last block
    /// and put the footer back at the end.
    fn rewrite_end_footer(&mut self) -> Result<()> {
        self.file.set_len(self.append_at)?;
        self.file
            .write_all_at(&self.footer.encode(), self.append_at)?;
        self.file.sync_data()?;
        self.footer_problem = None;
        Ok(())
    }

    /// The decoded footer.
    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    /// The decoded dynamic header.
    pub fn header(&self) -> &DynamicHeader {
        &self.header
    }

    fn is_diff(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    /// File offset of block `index`'s bitmap, if allocated.
    fn block_offset(&self, index: usize) -> Option<u64> {
        match self.bat[index] {
            BAT_UNUSED => None,
            sector => Some(u64::from(sector) * SECTOR),
        }
    }

    /// The sector bitmap of an allocated block, cached.
    fn bitmap(&mut self, index: usize) -> Result<&[u8]> {
        let key = u32::try_from(index).expect("BAT index fits u32");
        if !self.bitmaps.contains_key(&key) {
            let offset = self
                .block_offset(index)
                .expect("bitmap of an allocated block");
            let len = usize::try_from(self.bitmap_size).expect("bitmap size is small");
            let mut bitmap = vec![0u8; len].into_boxed_slice();
            self.file.read_exact_at(&mut bitmap, offset)?;
            if self.bitmaps.len() >= BITMAP_CACHE_LIMIT {
                self.bitmaps.clear();
            }
            self.bitmaps.insert(key, bitmap);
        }
        Ok(&self.bitmaps[&key])
    }

    /// Split `[offset, offset + len)` into per-block pieces:
    /// (block index, offset in block, offset in the caller's buffer, length).
    fn pieces(&self, offset: u64, len: u64) -> impl Iterator<Item = (usize, u64, usize, usize)> {
        let block_size = self.block_size;
        let end = offset + len;
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let index = usize::try_from(pos / block_size).expect("block index fits usize");
            let in_block = pos % block_size;
            let n = (block_size - in_block).min(end - pos);
            let at = usize::try_from(pos - offset).expect("buffer offset fits usize");
            pos += n;
            Some((
                index,
                in_block,
                at,
                usize::try_from(n).expect("piece fits usize"),
            ))
        })
    }

    fn read_block(&mut self, index: usize, in_block: u64, out: &mut [u8]) -> Result<()> {
        let virtual_offset = index as u64 * self.block_size + in_block;
        let Some(block) = self.block_offset(index) else {
            return self.read_below(out, virtual_offset);
        };
        let data = block + self.bitmap_size;
        let runs = sector_runs(self.bitmap(index)?, in_block, out.len() as u64);
        for (start, len, present) in runs {
            let piece = &mut out[usize::try_from(start - in_block).expect("small")..]
                [..usize::try_from(len).expect("small")];
            if present {
                self.file.read_exact_at(piece, data + start)?;
            } else {
                self.read_below(piece, index as u64 * self.block_size + start)?;
            }
        }
        Ok(())
    }

    /// Bytes not stored in this image: the parent's, or zeros.
    fn read_below(&mut self, out: &mut [u8], offset: u64) -> Result<()> {
        match &mut self.parent {
            Some(parent) => parent.read_at(out, offset),
            None => {
                out.fill(0);
                Ok(())
            }
        }
    }

    fn write_aligned(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        let pieces: Vec<_> = self.pieces(offset, buf.len() as u64).collect();
        for (index, in_block, at, n) in pieces {
            let data = &buf[at..at + n];
            match self.block_offset(index) {
                Some(block) => self.write_allocated(index, block, in_block, data)?,
                None => self.allocate_block(index, in_block, data)?,
            }
        }
        Ok(())
    }

    fn write_allocated(
        &mut self,
        index: usize,
        block: u64,
        in_block: u64,
        data: &[u8],
    ) -> Result<()> {
        self.file
            .write_all_at(data, block + self.bitmap_size + in_block)?;
        let first = usize::try_from(in_block / SECTOR).expect("small");
        let count = data.len() / usize::try_from(SECTOR).expect("small");
        if all_set(self.bitmap(index)?, first, count) {
            return Ok(());
        }
        // The data must be durable before the bits that make it visible.
        if self.sync == SyncPolicy::Ordered {
            self.file.sync_data()?;
        }
        let key = u32::try_from(index).expect("BAT index fits u32");
        let bitmap = self.bitmaps.get_mut(&key).expect("bitmap cached above");
        set_bits(bitmap, first, count);
        self.file.write_all_at(bitmap, block)
    }

    /// Grow the file by one block, in the crash-safe order:
    /// 1. bitmap and data at the old footer position, footer after them;
    /// 2. fdatasync (the block and the new footer are durable);
    /// 3. the BAT entry that makes the block reachable (synced by the next
    ///    allocation's step 2 or by `flush`).
    ///
    /// A crash before 3 leaves the old BAT: the block is unreachable space,
    /// and every earlier block reads as before.
    fn allocate_block(&mut self, index: usize, in_block: u64, data: &[u8]) -> Result<()> {
        let at = self.append_at;
        let sector = u32::try_from(at / SECTOR).map_err(|_| {
            Error::unsupported("VHD file would exceed the format's 2 TiB limit")
                .at_path(self.file.path())
        })?;
        let mut bitmap = vec![0u8; usize::try_from(self.bitmap_size).expect("small")];
        if self.is_diff() {
            let first = usize::try_from(in_block / SECTOR).expect("small");
            set_bits(&mut bitmap, first, data.len() / 512);
        } else {
            bitmap.fill(0xff);
        }
        let new_end = at + self.bitmap_size + self.block_size;
        self.file.write_all_at(&bitmap, at)?;
        self.file
            .write_all_at(data, at + self.bitmap_size + in_block)?;
        self.file.write_all_at(&self.footer.encode(), new_end)?;
        if self.sync == SyncPolicy::Ordered {
            self.file.sync_data()?;
        }
        let entry_offset = self.header.table_offset + index as u64 * 4;
        self.file
            .write_all_at(&sector.to_be_bytes(), entry_offset)?;
        self.bat[index] = sector;
        self.append_at = new_end;
        if self.bitmaps.len() >= BITMAP_CACHE_LIMIT {
            self.bitmaps.clear();
        }
        self.bitmaps.insert(
            u32::try_from(index).expect("fits"),
            bitmap.into_boxed_slice(),
        );
        Ok(())
    }

    fn map_below(&mut self, map: &mut Vec<Extent>, offset: u64, length: u64) -> Result<()> {
        match &mut self.parent {
            Some(parent) => {
                for e in parent.map(offset, length)? {
                    push_extent(map, e);
                }
            }
            None => push_extent(
                map,
                Extent {
                    offset,
                    length,
                    allocated: false,
                },
            ),
        }
        Ok(())
    }
}

impl Image for DynamicVhd {
    fn format(&self) -> Format {
        if self.is_diff() {
            Format::VhdDiff
        } else {
            Format::VhdDynamic
        }
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.footer.current_size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len(), "read").path_ctx(self.file.path())?;
        let pieces: Vec<_> = self.pieces(offset, buf.len() as u64).collect();
        for (index, in_block, at, n) in pieces {
            self.read_block(index, in_block, &mut buf[at..at + n])?;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len(), "write").path_ctx(self.file.path())?;
        if !self.file.writable() {
            return Err(Error::invalid("image is open read-only").at_path(self.file.path()));
        }
        let end = offset + buf.len() as u64;
        if offset.is_multiple_of(SECTOR) && end.is_multiple_of(SECTOR) {
            return self.write_aligned(buf, offset);
        }
        // Read-modify-write of the partial sectors at either edge.
        let start = offset / SECTOR * SECTOR;
        let aligned_end = round_up_sector(end);
        let mut tmp = vec![0u8; usize::try_from(aligned_end - start).expect("fits")];
        let tail = tmp.len() - 512;
        self.read_at(&mut tmp[..512], start)?;
        self.read_at(&mut tmp[tail..], aligned_end - SECTOR)?;
        let head = usize::try_from(offset - start).expect("small");
        tmp[head..head + buf.len()].copy_from_slice(buf);
        self.write_aligned(&tmp, start)
    }

    fn flush(&mut self) -> Result<()> {
        self.file.sync_data()
    }

    fn map(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        check_range(
            self.size(),
            offset,
            usize::try_from(length).unwrap_or(usize::MAX),
            "map",
        )?;
        let mut map = Vec::new();
        let pieces: Vec<_> = self.pieces(offset, length).collect();
        for (index, in_block, _, n) in pieces {
            let base = index as u64 * self.block_size;
            let n = n as u64;
            if self.block_offset(index).is_none() {
                self.map_below(&mut map, base + in_block, n)?;
            } else if !self.is_diff() {
                push_extent(
                    &mut map,
                    Extent {
                        offset: base + in_block,
                        length: n,
                        allocated: true,
                    },
                );
            } else {
                for (start, len, present) in sector_runs(self.bitmap(index)?, in_block, n) {
                    if present {
                        push_extent(
                            &mut map,
                            Extent {
                                offset: base + start,
                                length: len,
                                allocated: true,
                            },
                        );
                    } else {
                        self.map_below(&mut map, base + start, len)?;
                    }
                }
            }
        }
        Ok(map)
    }

    fn allocated_bytes(&mut self) -> Result<u64> {
        Ok(self.bat.iter().filter(|&&e| e != BAT_UNUSED).count() as u64 * self.block_size)
    }

    fn parent(&self) -> Option<&dyn Image> {
        self.parent.as_deref()
    }

    fn check(&mut self) -> Result<Vec<Problem>> {
        let mut problems = Vec::new();
        if let Some(what) = &self.footer_problem {
            problems.push(Problem {
                offset: self.append_at,
                what: what.clone(),
                damage: true,
            });
        }
        if self.leaked > 0 {
            problems.push(Problem {
                offset: self.append_at - self.leaked,
                what: format!(
                    "{} bytes after the last block are not referenced (leaked)",
                    self.leaked
                ),
                damage: false,
            });
        }
        if let Some(parent) = &mut self.parent {
            let parent_path = parent.path().display().to_string();
            for mut p in parent.check()? {
                p.what = format!("in parent {parent_path}: {}", p.what);
                problems.push(p);
            }
        }
        Ok(problems)
    }
}

/// Check every BAT entry: inside the file, clear of metadata, no two blocks
/// overlapping. Returns the end of the last block (0 if none).
fn validate_bat(
    bat: &[u32],
    table_offset: u64,
    block_span: u64,
    metadata: &[Region],
    data_end: u64,
) -> Result<u64> {
    let mut blocks: Vec<(u64, usize)> = bat
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != BAT_UNUSED)
        .map(|(i, &e)| (u64::from(e) * SECTOR, i))
        .collect();
    blocks.sort_unstable();
    let mut last_end = 0u64;
    let mut last_index = None;
    for &(start, index) in &blocks {
        let entry_at = table_offset + index as u64 * 4;
        let end = start + block_span;
        if end > data_end {
            return Err(Error::corrupt(format!(
                "BAT entry {index} points at a block ({start}..{end}) past the end of the data area ({data_end})"
            ))
            .at_offset(entry_at));
        }
        if let Some(region) = metadata.iter().find(|r| start < r.end && r.start < end) {
            return Err(Error::corrupt(format!(
                "BAT entry {index} points at a block ({start}..{end}) over the {} ({}..{})",
                region.what, region.start, region.end
            ))
            .at_offset(entry_at));
        }
        if let Some(prev) = last_index.filter(|_| start < last_end) {
            return Err(Error::corrupt(format!(
                "BAT entries {prev} and {index} point at overlapping blocks"
            ))
            .at_offset(entry_at));
        }
        last_end = end;
        last_index = Some(index);
    }
    Ok(last_end)
}

/// Runs of sectors in `[start, start + len)` (byte offsets within a block)
/// that are present (bit set) or absent, clipped to the range.
fn sector_runs(bitmap: &[u8], start: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let end = start + len;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = start;
    while pos < end {
        let sector = usize::try_from(pos / SECTOR).expect("small");
        let present = bitmap[sector / 8] & (0x80 >> (sector % 8)) != 0;
        let next = ((pos / SECTOR + 1) * SECTOR).min(end);
        match runs.last_mut() {
            Some(run) if run.2 == present => run.1 += next - pos,
            _ => runs.push((pos, next - pos, present)),
        }
        pos = next;
    }
    runs
}

fn all_set(bitmap: &[u8], first: usize, count: usize) -> bool {
    (first..first + count).all(|s| bitmap[s / 8] & (0x80 >> (s % 8)) != 0)
}

fn set_bits(bitmap: &mut [u8], first: usize, count: usize) {
    for s in first..first + count {
        bitmap[s / 8] |= 0x80 >> (s % 8);
    }
}

/// Header fields that name the parent.
struct ParentFields {
    uuid: [u8; 16],
    timestamp: u32,
    name: String,
}

fn empty_parent_fields() -> ParentFields {
    ParentFields {
        uuid: [0; 16],
        timestamp: 0,
        name: String::new(),
    }
}

/// Write a new dynamic/differencing image: footer copy, header, BAT (all
/// unused), parent locator data, footer.
fn write_layout(
    file: &ImageFile,
    footer: &Footer,
    parent: ParentFields,
    locator_data: &[(u32, Vec<u8>)],
    sync: SyncPolicy,
) -> Result<()> {
    let block_size = DEFAULT_BLOCK_SIZE;
    let entries = u32::try_from(footer.current_size.div_ceil(u64::from(block_size)))
        .map_err(|_| Error::invalid("disk too large for a VHD"))?;
    let bat_bytes = round_up_sector(u64::from(entries) * 4);
    let mut locators = [ParentLocator::default(); PARENT_LOCATOR_COUNT];
    let mut next = TABLE_OFFSET + bat_bytes;
    for (slot, (code, data)) in locators.iter_mut().zip(locator_data) {
        let space = round_up_sector(data.len() as u64);
        *slot = ParentLocator {
            code: *code,
            data_space: u32::try_from(space).map_err(|_| Error::invalid("parent path too long"))?,
            data_length: u32::try_from(data.len())
                .map_err(|_| Error::invalid("parent path too long"))?,
            data_offset: next,
        };
        file.write_all_at(data, next)?;
        next += space;
    }
    let header = DynamicHeader {
        table_offset: TABLE_OFFSET,
        max_table_entries: entries,
        block_size,
        parent_uuid: parent.uuid,
        parent_timestamp: parent.timestamp,
        parent_name: parent.name,
        locators,
    };
    let encoded_footer = footer.encode();
    file.write_all_at(&encoded_footer, 0)?;
    file.write_all_at(&header.encode(), HEADER_OFFSET)?;
    let bat =
        vec![0xffu8; usize::try_from(bat_bytes).map_err(|_| Error::invalid("BAT too large"))?];
    file.write_all_at(&bat, TABLE_OFFSET)?;
    file.write_all_at(&encoded_footer, next)?;
    if sync == SyncPolicy::Ordered {
        file.sync_data()?;
    }
    Ok(())
}

fn utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn absolute_dir_of(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.canonicalize()
        .map_err(|e| Error::io(e, "resolve directory").at_path(&dir))
}

/// `to` expressed relative to the directory `from` (both absolute).
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to_parts: Vec<_> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    let mut out = PathBuf::from(".");
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to_parts[common..] {
        out.push(part);
    }
    out
}

/// `a/./b` as `a/b` (for display; `..` is left for the file system to resolve).
fn without_dot_components(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| *c != std::path::Component::CurDir)
        .collect()
}

/// Candidate parent paths from the locators and the parent name, in order
/// of preference: relative, absolute, Mac URL, bare name beside the child.
fn parent_candidates(file: &ImageFile, header: &DynamicHeader) -> Result<Vec<PathBuf>> {
    let child_dir = absolute_dir_of(file.path())?;
    let mut candidates = Vec::new();
    for code in [PLATFORM_W2RU, PLATFORM_W2KU, PLATFORM_MACX] {
        for loc in header.locators.iter().filter(|l| l.code == code) {
            // Bounds were checked when the image was opened.
            let mut data = vec![0u8; usize::try_from(loc.data_length).expect("bounded")];
            file.read_exact_at(&mut data, loc.data_offset)?;
            let text = if code == PLATFORM_MACX {
                let s = String::from_utf8_lossy(&data).into_owned();
                s.strip_prefix("file://").map(str::to_owned).unwrap_or(s)
            } else {
                let units: Vec<u16> = data
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units).replace('\\', "/")
            };
            let text = text.trim_end_matches('\0');
            if !text.is_empty() {
                candidates.push(without_dot_components(&child_dir.join(text)));
            }
        }
    }
    if !header.parent_name.is_empty() {
        candidates.push(without_dot_components(
            &child_dir.join(header.parent_name.replace('\\', "/")),
        ));
    }
    Ok(candidates)
}

/// Find, open and verify a differencing disk's parent.
fn resolve_parent(
    file: &ImageFile,
    header: &DynamicHeader,
    size: u64,
    visited: &mut Vec<PathBuf>,
) -> Result<Box<dyn Image>> {
    let candidates = parent_candidates(file, header)?;
    let Some(found) = candidates.iter().find(|p| p.is_file()) else {
        let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::new(
            ErrorKind::Parent,
            format!(
                "parent image {:?} not found (looked at: {})",
                header.parent_name,
                if tried.is_empty() {
                    "no locators".to_string()
                } else {
                    tried.join(", ")
                }
            ),
        ));
    };
    let parent_footer = read_footer(&ImageFile::open(found, false)?)?.footer;
    if parent_footer.unique_id != header.parent_uuid {
        return Err(Error::new(
            ErrorKind::Parent,
            format!(
                "parent {} has unique id {} but this disk was made from {}",
                found.display(),
                uuid_string(&parent_footer.unique_id),
                uuid_string(&header.parent_uuid)
            ),
        ));
    }
    if parent_footer.timestamp != header.parent_timestamp {
        return Err(Error::new(
            ErrorKind::Parent,
            format!(
                "parent {} has time stamp {} but this disk expects {} (the parent was modified)",
                found.display(),
                parent_footer.timestamp,
                header.parent_timestamp
            ),
        ));
    }
    let parent = open_chained(found, OpenOptions::read_only(), visited)?;
    if parent.size() != size {
        return Err(Error::new(
            ErrorKind::Parent,
            format!(
                "parent {} is {} bytes, this disk {size}",
                found.display(),
                parent.size()
            ),
        ));
    }
    Ok(parent)
}

#[cfg(test)]
mod tests;
