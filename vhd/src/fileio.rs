//! Positioned file I/O that reports errors with the file and offset.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A file handle that remembers its path for error messages.
#[derive(Debug)]
pub(crate) struct ImageFile {
    file: File,
    path: PathBuf,
    writable: bool,
}

impl ImageFile {
    /// Open an existing file, read-only or read-write.
    pub(crate) fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(e, "open").at_path(path))?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            writable,
        })
    }

    /// Create a new file; fails if it exists (images are never clobbered silently).
    pub(crate) fn create_new(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io(e, "create").at_path(path))?;
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            writable: true,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The underlying file, for calls this wrapper does not cover.
    pub(crate) fn raw(&self) -> &File {
        &self.file
    }

    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    /// Current file length.
    pub(crate) fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(e, "stat").at_path(&self.path))
    }

    /// Bytes the file occupies on disk (holes excluded).
    pub(crate) fn disk_usage(&self) -> Result<u64> {
        use std::os::unix::fs::MetadataExt;
        self.file
            .metadata()
            .map(|m| m.blocks() * 512)
            .map_err(|e| Error::io(e, "stat").at_path(&self.path))
    }

    /// Read exactly `buf.len()` bytes at `offset`; a short file is corruption.
    pub(crate) fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let err = if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::corrupt(format!(
                    "file ends before {} bytes could be read",
                    buf.len()
                ))
            } else {
                Error::io(e, "read")
            };
            err.at_offset(offset).at_path(&self.path)
        })
    }

    /// Write all of `buf` at `offset`.
    pub(crate) fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if !self.writable {
            return Err(Error::invalid("image is open read-only").at_path(&self.path));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| Error::io(e, "write").at_offset(offset).at_path(&self.path))
    }

    /// Make written data durable (fdatasync).
    pub(crate) fn sync_data(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io(e, "fdatasync").at_path(&self.path))
    }

    /// Truncate or extend the file.
    pub(crate) fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io(e, "truncate").at_path(&self.path))
    }

    /// Read a little-endian or big-endian structure of `N` bytes.
    pub(crate) fn read_array<const N: usize>(&self, offset: u64) -> Result<[u8; N]> {
        let mut buf = [0u8; N];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// Big- and little-endian field accessors over byte slices: every on-disk
/// structure in this crate is decoded through these with named offsets.
pub(crate) mod bytes {
    pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }
    pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
        u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }
    pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }
    pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }
    pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
    }
    pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
    }
    pub(crate) fn put_be_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn put_be_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn put_be_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn put_le_u16(b: &mut [u8], at: usize, v: u16) {
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn put_le_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn put_le_u64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

/// Whether every byte of `buf` is zero (fast path for zero detection).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only yields
        // the correctly aligned middle part of the slice.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Random bytes for UUIDs and identifiers.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out)
        .map_err(|e| Error::io(io::Error::other(e.to_string()), "getrandom"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_covers_unaligned_edges() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        for i in [0, 1, 7, 8, 2048, 4097, 4098] {
            buf[i] = 1;
            assert!(!is_zero(&buf), "byte {i}");
            assert!(!is_zero(&buf[i..]), "slice from {i}");
            buf[i] = 0;
        }
        assert!(is_zero(&[]));
    }
}
