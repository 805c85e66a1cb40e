//! Raw images: byte N of the file is byte N of the disk.

use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fileio::ImageFile;
use crate::image::{check_range, push_extent, Extent, Format, Image, Problem};

/// A raw image file (or a block device).
#[derive(Debug)]
pub struct RawImage {
    file: ImageFile,
    size: u64,
}

impl RawImage {
    /// Create a sparse raw file of `size` bytes.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = ImageFile::create_new(path)?;
        file.set_len(size)?;
        Ok(RawImage { file, size })
    }

    /// Open an existing raw file; its length is the disk size.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = ImageFile::open(path, writable)?;
        let size = file.len()?;
        Ok(RawImage { file, size })
    }

    pub(crate) fn from_file(file: ImageFile, size: u64) -> Self {
        RawImage { file, size }
    }

    /// The next offset at or after `from` where `whence` (SEEK_DATA or
    /// SEEK_HOLE) holds, or `None` when the file system cannot say.
    fn seek(&self, from: u64, whence: libc::c_int) -> Option<u64> {
        let from = libc::off_t::try_from(from).ok()?;
        let fd = std::fs::File::as_raw_fd(self.file_handle());
        // SAFETY: lseek on a file descriptor we own has no memory-safety
        // preconditions; an error is reported through the return value.
        let at = unsafe { libc::lseek(fd, from, whence) };
        u64::try_from(at).ok()
    }

    fn file_handle(&self) -> &std::fs::File {
        self.file.raw()
    }
}

impl Image for RawImage {
    fn format(&self) -> Format {
        Format::Raw
    }

    fn path(&self) -> &Path {
        self.file.path()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len(), "read")?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len(), "write")?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> Result<()> {
        self.file.sync_data()
    }

    /// Holes (SEEK_HOLE) are unallocated; everything else is data. A file
    /// system without hole reporting makes the whole disk allocated.
    fn map(&mut self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| Error::invalid("map range beyond the disk").at_path(self.path()))?;
        let mut map = Vec::new();
        let mut pos = offset;
        while pos < end {
            let data = self.seek(pos, libc::SEEK_DATA).unwrap_or(end).min(end);
            push_extent(
                &mut map,
                Extent {
                    offset: pos,
                    length: data - pos,
                    allocated: false,
                },
            );
            if data >= end {
                break;
            }
            let hole = self.seek(data, libc::SEEK_HOLE).unwrap_or(end).min(end);
            push_extent(
                &mut map,
                Extent {
                    offset: data,
                    length: hole - data,
                    allocated: true,
                },
            );
            pos = hole;
        }
        Ok(map)
    }

    fn allocated_bytes(&mut self) -> Result<u64> {
        self.file.disk_usage()
    }

    fn check(&mut self) -> Result<Vec<Problem>> {
        Ok(Vec::new())
    }
}
