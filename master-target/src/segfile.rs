//! Low-level helpers shared by the crate's segmented logs, the change-set
//! [`journal`](crate::journal) and the [`undo`](crate::undo) log:
//! little-endian fields, length conversions, segment file names, directory
//! syncs, positional reads, and creating, opening and scanning segment
//! files. The formats themselves (and their constants) are documented in
//! those modules; nothing here decides a byte of them.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The little-endian `u16` at `b[off..off + 2]`.
pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}

/// The little-endian `u32` at `b[off..off + 4]`.
pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

/// The little-endian `u64` at `b[off..off + 8]`.
pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Copy `v` into `b` at `off`.
pub(crate) fn put_bytes(b: &mut [u8], off: usize, v: &[u8]) {
    b[off..off + v.len()].copy_from_slice(v);
}

/// A `u64` length as a `usize` (saturating).
pub(crate) fn usize_len(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// A `usize` length as a `u64` (saturating).
pub(crate) fn u64_len(v: usize) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// The file name of segment `segno`: the number zero-padded to `digits`
/// digits, then `ext` (with its dot).
pub(crate) fn segment_file_name(segno: u64, ext: &str, digits: usize) -> String {
    format!("{segno:0digits$}{ext}")
}

/// The segment number a [`segment_file_name`] of `ext` and `digits` names
/// (`None` for any other name).
pub(crate) fn parse_segment_file_name(name: &str, ext: &str, digits: usize) -> Option<u64> {
    let num = name.strip_suffix(ext)?;
    if num.len() != digits || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse().ok()
}

/// The first pair of neighbours in the sorted segment numbers `segnos`
/// that are not consecutive: a segment is missing after the first.
pub(crate) fn segment_gap(segnos: &[u64]) -> Option<(u64, u64)> {
    segnos
        .windows(2)
        .find(|w| w[1] != w[0] + 1)
        .map(|w| (w[0], w[1]))
}

/// `fsync` the directory `path` (after creating, renaming or removing an
/// entry in it).
pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", path, e))
}

/// Read exactly `len` bytes at `off`; the caller has checked `off + len`
/// against the file length.
pub(crate) fn read_vec_at(
    file: &File,
    path: &Path,
    off: u64,
    len: usize,
    op: &'static str,
) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, off)
        .map_err(|e| Error::io(op, path, e).at_offset(off))?;
    Ok(buf)
}

/// Cut `file` to `len` bytes and `fsync` it (a torn tail).
pub(crate) fn truncate_synced(file: &File, path: &Path, len: u64, op: &'static str) -> Result<()> {
    file.set_len(len)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(op, path, e).at_offset(len))
}

/// The operation names a log reports in the errors of its segment files.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SegmentOps {
    /// Creating a new segment's temporary file.
    pub create: &'static str,
    /// Writing and syncing its header.
    pub write_header: &'static str,
    /// Renaming it into place.
    pub rename: &'static str,
    /// Opening an existing segment.
    pub open: &'static str,
    /// Reading its length.
    pub stat: &'static str,
}

/// Create the segment file `dir/name` holding only `header`, atomically:
/// written as `name` + `tmp_ext`, synced, renamed to `name`, directory
/// synced. Returns its path and the file, open for reading and writing.
pub(crate) fn create_segment_file(
    dir: &Path,
    name: &str,
    tmp_ext: &str,
    header: &[u8],
    ops: &SegmentOps,
) -> Result<(PathBuf, File)> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{tmp_ext}"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(ops.create, &tmp, e))?;
    file.write_all_at(header, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(ops.write_header, &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(ops.rename, &path, e))?;
    sync_dir(dir)?;
    Ok((path, file))
}

/// Open the existing segment file `path` (for writing too if `writable`)
/// and read its `header_len` header bytes. Returns the file, its length
/// and the header; a file shorter than a header is
/// [`ErrorKind::Corrupt`](crate::ErrorKind::Corrupt).
pub(crate) fn open_segment_file(
    path: &Path,
    writable: bool,
    header_len: u64,
    ops: &SegmentOps,
) -> Result<(File, u64, Vec<u8>)> {
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| Error::io(ops.open, path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(ops.stat, path, e))?
        .len();
    if file_len < header_len {
        return Err(Error::corrupt(
            "open",
            path,
            0,
            format!("segment header truncated ({file_len} bytes)"),
        ));
    }
    let header = read_vec_at(&file, path, 0, usize_len(header_len), "open")?;
    Ok((file, file_len, header))
}

/// Scan `(from, file_len)` of `file` for the record magic `magic` (stored
/// little endian), in bounded windows, and call `probe` with each offset
/// at which it starts with at least `rec_header_len` bytes left, and the
/// window's bytes from there on (at least 4, maybe fewer than a record
/// header). Stops at the first `Some` the probe returns.
pub(crate) fn scan_for_magic<T>(
    file: &File,
    path: &Path,
    from: u64,
    file_len: u64,
    magic: u32,
    rec_header_len: u64,
    mut probe: impl FnMut(u64, &[u8]) -> Result<Option<T>>,
) -> Result<Option<T>> {
    const WINDOW: u64 = 1 << 20;
    let magic = magic.to_le_bytes();
    let mut pos = from + 1;
    while pos + rec_header_len <= file_len {
        let n = (file_len - pos).min(WINDOW);
        let buf = read_vec_at(file, path, pos, usize_len(n), "open")?;
        for i in 0..buf.len().saturating_sub(3) {
            if buf[i..i + 4] != magic {
                continue;
            }
            let cand = pos + u64_len(i);
            if cand + rec_header_len > file_len {
                // So are all later candidates: none holds a record.
                break;
            }
            if let Some(found) = probe(cand, &buf[i..])? {
                return Ok(Some(found));
            }
        }
        // Overlap by 3 bytes so a magic straddling windows is seen.
        pos += n.saturating_sub(3).max(1);
    }
    Ok(None)
}
