//! Materializing a disk at a recovery point.
//!
//! The replica always holds the latest applied state; the undo log
//! ([`crate::undo`]) holds, for every applied change set, what the set
//! overwrote. A point `P` is reached in three steps, none of which reads
//! more than the replica file plus the undo recorded after `P`:
//!
//! 1. [`snapshot`]: copy the replica file: a reflink where the file
//!    system shares blocks (XFS, btrfs: nothing moves), else in-kernel
//!    `copy_file_range` through `std::io::copy` (a raw replica's holes stay
//!    holes). The caller holds the disk's apply gate meanwhile, so the copy
//!    is one applied state `A`.
//! 2. [`rewind`]: walk the undo sets recorded after `P` (up to `A`) in
//!    order and write each range's old bytes into the copy, the first set
//!    to mention a byte winning: that set saw the byte as it was at `P`.
//!    Only ranges written after `P` are touched: the cost follows the
//!    data that differs, not the disk size.
//! 3. [`export`]: the copy is the image when the asked format is the
//!    replica's; otherwise it is converted (every allocated byte) and
//!    removed.
//!
//! Every output is built under a temporary name and renamed into place,
//! so a crash or an error never leaves a half-made image under the final
//! name.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use ferry_vhd::convert::{self, Destination};
use ferry_vhd::{CreateOptions, Format, Image, OpenOptions, SyncPolicy};

use crate::error::{Error, Result};
use crate::undo::{UndoKind, UndoLog};

/// Zeros written per call when a rewind restores zeros.
const ZERO_CHUNK: usize = 1 << 20;

/// The file name extension of an image of `format`.
pub fn extension(format: Format) -> &'static str {
    match format {
        Format::Raw => "img",
        Format::VhdFixed | Format::VhdDynamic | Format::VhdDiff => "vhd",
        Format::VmdkSparse | Format::VmdkFlat | Format::VmdkStream => "vmdk",
    }
}

/// Byte ranges already restored by a rewind (first writer wins).
#[derive(Debug, Default)]
pub struct Covered {
    /// start -> end, disjoint and not touching.
    ranges: BTreeMap<u64, u64>,
}

impl Covered {
    /// The parts of `[offset, offset + length)` not covered yet, in order.
    pub fn uncovered(&self, offset: u64, length: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(length);
        let mut out = Vec::new();
        let mut at = offset;
        // The range starting at or before `offset` may reach into it.
        if let Some((_, &e)) = self.ranges.range(..=offset).next_back() {
            at = at.max(e);
        }
        for (&s, &e) in self.ranges.range(offset..end) {
            if s > at {
                out.push((at, s - at));
            }
            at = at.max(e);
        }
        if at < end {
            out.push((at, end - at));
        }
        out
    }

    /// Mark `[offset, offset + length)` covered.
    pub fn insert(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let mut start = offset;
        let mut end = offset.saturating_add(length);
        if let Some((&s, &e)) = self.ranges.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
            }
        }
        let absorbed: Vec<u64> = self.ranges.range(start..=end).map(|(&s, _)| s).collect();
        for s in absorbed {
            if let Some(e) = self.ranges.remove(&s) {
                end = end.max(e);
            }
        }
        self.ranges.insert(start, end);
    }

    /// Bytes covered.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }
}

/// What a rewind did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rewound {
    /// Undo sets read.
    pub sets: u64,
    /// Bytes of old data written back.
    pub bytes_restored: u64,
    /// Bytes made zero again.
    pub bytes_zeroed: u64,
}

/// Rewind `image`, which holds the replica's state after applying
/// `applied`, to the state after `point` (`None`: before the first set,
/// the empty disk). `undo` must reach `point` ([`UndoLog::reaches`]);
/// sets recorded after `applied` (appended after the snapshot was taken)
/// are not read.
pub fn rewind(
    image: &mut dyn Image,
    undo: &UndoLog,
    point: Option<u64>,
    applied: Option<u64>,
) -> Result<Rewound> {
    let mut done = Rewound::default();
    if point == applied {
        return Ok(done);
    }
    let mut covered = Covered::default();
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut last_set = None;
    for part in undo.parts_from(point)? {
        let part = part?;
        if applied.is_none_or(|a| part.set.first_seq > a) {
            break;
        }
        if last_set != Some(part.set.last_seq) {
            done.sets += 1;
            last_set = Some(part.set.last_seq);
        }
        let mut data_at = 0usize;
        for x in &part.extents {
            let len = usize::try_from(x.length)
                .map_err(|_| bad_part(x.offset, "extent longer than memory"))?;
            for (off, n) in covered.uncovered(x.offset, x.length) {
                match x.kind {
                    UndoKind::Data => {
                        let from = data_at + usize::try_from(off - x.offset).unwrap_or(usize::MAX);
                        let piece = usize::try_from(n)
                            .ok()
                            .and_then(|n| from.checked_add(n))
                            .and_then(|end| part.data.get(from..end))
                            .ok_or_else(|| bad_part(x.offset, "extent runs past its data"))?;
                        image
                            .write_at(piece, off)
                            .map_err(|e| Error::image("rewind", e))?;
                        done.bytes_restored += n;
                    }
                    UndoKind::Zeros => {
                        zero_range(image, off, n, &zeros)?;
                        done.bytes_zeroed += n;
                    }
                }
                covered.insert(off, n);
            }
            if x.kind == UndoKind::Data {
                data_at += len;
            }
        }
    }
    image.flush().map_err(|e| Error::image("rewind", e))?;
    Ok(done)
}

fn bad_part(offset: u64, what: &str) -> Error {
    Error::new(
        crate::ErrorKind::Corrupt,
        "rewind",
        format!("undo extent at disk offset {offset}: {what}"),
    )
}

/// Make `[offset, offset + length)` of `image` read as zeros, writing only
/// over runs it stores.
pub fn zero_range(image: &mut dyn Image, offset: u64, length: u64, zeros: &[u8]) -> Result<()> {
    zero_allocated(image, offset, length, zeros).map_err(|e| Error::image("zero range", e))
}

/// [`zero_range`] with the image library's error: writes `zeros` (in
/// pieces of at most its length) over the runs of `[offset, offset +
/// length)` the image reports allocated; the others already read as zeros.
/// Also the applier's ([`crate::applier`]) Zero and Trim extents.
pub(crate) fn zero_allocated(
    image: &mut dyn Image,
    offset: u64,
    length: u64,
    zeros: &[u8],
) -> ferry_vhd::Result<()> {
    let runs = image.map(offset, length)?;
    for run in runs.iter().filter(|r| r.allocated) {
        let end = run.offset.saturating_add(run.length);
        let mut at = run.offset;
        while at < end {
            let n = usize::try_from(end - at)
                .unwrap_or(usize::MAX)
                .min(zeros.len());
            image.write_at(&zeros[..n], at)?;
            at += u64::try_from(n).unwrap_or(u64::MAX);
        }
    }
    Ok(())
}

/// How [`snapshot`] copied the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMethod {
    /// A reflink (`FICLONE`: XFS, btrfs): the copy shares the replica's
    /// blocks until either is written; no data moves.
    Reflink,
    /// `copy_file_range` of the file (raw replicas: of each data run).
    Copy,
}

/// Share `src`'s blocks with the empty file `dst` (FICLONE). `Ok(false)`
/// when the file system cannot (ext4, another file system): the caller
/// copies instead.
fn reflink(src: &File, dst: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: FICLONE takes the source descriptor as its argument and
    // touches no memory of ours; both descriptors are open for the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY | libc::EPERM) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

/// Copy the replica file `replica` (of `format`) to the new file `dst`:
/// a reflink where the file system shares blocks, else an in-kernel copy
/// (raw replicas run by run, so holes stay holes; image formats whole).
/// The copy is not synced (the caller syncs the final image once).
pub fn snapshot(replica: &Path, format: Format, dst: &Path) -> Result<CopyMethod> {
    let mut src = File::open(replica).map_err(|e| Error::io("open replica", replica, e))?;
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(|e| Error::io("create snapshot", dst, e))?;
    if reflink(&src, &out).map_err(|e| Error::io("reflink replica", dst, e))? {
        return Ok(CopyMethod::Reflink);
    }
    let len = src
        .metadata()
        .map_err(|e| Error::io("stat replica", replica, e))?
        .len();
    let runs = if format == Format::Raw {
        let mut img = ferry_vhd::open_as(replica, Format::Raw, OpenOptions::read_only())
            .map_err(|e| Error::image("map replica", e))?;
        img.map(0, len)
            .map_err(|e| Error::image("map replica", e))?
            .into_iter()
            .filter(|r| r.allocated)
            .map(|r| (r.offset, r.length))
            .collect()
    } else {
        vec![(0, len)]
    };
    out.set_len(len)
        .map_err(|e| Error::io("size snapshot", dst, e))?;
    for (offset, length) in runs {
        src.seek(SeekFrom::Start(offset))
            .and_then(|_| out.seek(SeekFrom::Start(offset)))
            .map_err(|e| Error::io("seek snapshot", dst, e))?;
        // std::io::copy between files uses copy_file_range: no user copy.
        let n = std::io::copy(&mut std::io::Read::take(&mut src, length), &mut out)
            .map_err(|e| Error::io("copy replica", dst, e))?;
        if n != length {
            return Err(Error::io(
                "copy replica",
                replica,
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "replica shrank"),
            ));
        }
    }
    Ok(CopyMethod::Copy)
}

/// Open the snapshot `path` (of `format`) for writing and rewind it to
/// `point` with the undo log in `undo_dir` (opened read-only: the applier
/// may be appending to it).
pub fn rewind_file(
    path: &Path,
    format: Format,
    undo_dir: &Path,
    point: Option<u64>,
    applied: Option<u64>,
) -> Result<Rewound> {
    if point == applied {
        return Ok(Rewound::default());
    }
    let undo = UndoLog::open_read_only(undo_dir)?;
    let mut image = ferry_vhd::open_as(
        path,
        format,
        OpenOptions {
            writable: true,
            sync: SyncPolicy::Deferred,
        },
    )
    .map_err(|e| Error::image("open snapshot", e))?;
    rewind(image.as_mut(), &undo, point, applied)
}

/// The files an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The image (a VMDK descriptor for `vmdk-flat`).
    pub path: PathBuf,
    /// Further files of the image (the flat extent).
    pub extra: Vec<PathBuf>,
}

impl Exported {
    /// Every file, the image first.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut f = vec![self.path.clone()];
        f.extend(self.extra.iter().cloned());
        f
    }
}

/// Turn the rewound snapshot `base` (of `base_format`) into the image
/// `out` of `format`: a rename when the formats agree, else a conversion
/// (then `base` is removed). `out` must not exist. The image is synced.
pub fn export(
    base: &Path,
    base_format: Format,
    format: Format,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Exported> {
    if out.exists() {
        return Err(Error::new(
            crate::ErrorKind::InvalidInput,
            "export",
            "the image exists; ferry never overwrites an image",
        )
        .at_path(out));
    }
    if format == base_format {
        File::open(base)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("sync image", base, e))?;
        fs::rename(base, out).map_err(|e| Error::io("rename image", out, e))?;
        sync_parent(out)?;
        return Ok(Exported {
            path: out.to_path_buf(),
            extra: Vec::new(),
        });
    }
    let mut src = ferry_vhd::open_as(base, base_format, OpenOptions::read_only())
        .map_err(|e| Error::image("open snapshot", e))?;
    let options = CreateOptions {
        parent: None,
        round: true,
        sync: SyncPolicy::Deferred,
    };
    let mut dst = ferry_vhd::create(out, format, src.size(), &options)
        .map_err(|e| Error::image("create image", e))?;
    let exported = Exported {
        path: out.to_path_buf(),
        extra: dst.extra_files(),
    };
    let outcome = convert::convert(src.as_mut(), dst.as_mut(), Destination::Fresh, progress);
    drop(dst);
    if let Err(e) = outcome {
        for f in exported.files() {
            let _ = fs::remove_file(f);
        }
        return Err(Error::image("convert", e));
    }
    drop(src);
    fs::remove_file(base).map_err(|e| Error::io("remove snapshot", base, e))?;
    sync_parent(out)?;
    Ok(exported)
}

/// Make a directory entry change under `path`'s parent durable.
pub fn sync_parent(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

/// SHA-256 of a file, lower-case hex (what `sha256sum` prints).
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = File::open(path).map_err(|e| Error::io("checksum", path, e))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io("checksum", path, e))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_ranges_merge_and_split() {
        let mut c = Covered::default();
        assert_eq!(c.uncovered(10, 10), vec![(10, 10)]);
        c.insert(12, 3);
        assert_eq!(c.uncovered(10, 10), vec![(10, 2), (15, 5)]);
        c.insert(18, 4);
        assert_eq!(c.uncovered(10, 10), vec![(10, 2), (15, 3)]);
        c.insert(15, 3); // bridges the two
        assert_eq!(c.uncovered(0, 30), vec![(0, 12), (22, 8)]);
        assert_eq!(c.bytes(), 10);
        c.insert(0, 100);
        assert!(c.uncovered(0, 100).is_empty());
        assert_eq!(c.bytes(), 100);
        assert_eq!(c.ranges.len(), 1);
    }

    proptest::proptest! {
        #[test]
        fn covered_matches_a_bitmap(ops in proptest::collection::vec((0usize..200, 1usize..40), 1..40)) {
            let mut c = Covered::default();
            let mut bits = [false; 256];
            let wide = |n: usize| u64::try_from(n).unwrap();
            for (off, len) in ops {
                let expect: Vec<u64> = (off..off + len).filter(|&i| !bits[i]).map(wide).collect();
                let got: Vec<u64> = c
                    .uncovered(wide(off), wide(len))
                    .into_iter()
                    .flat_map(|(s, n)| s..s + n)
                    .collect();
                proptest::prop_assert_eq!(got, expect);
                c.insert(wide(off), wide(len));
                for b in &mut bits[off..off + len] {
                    *b = true;
                }
            }
            proptest::prop_assert_eq!(c.bytes(), wide(bits.iter().filter(|&&b| b).count()));
        }
    }
}
