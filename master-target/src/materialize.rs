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
use std::os::unix::fs::FileExt;
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

/// Where [`walk_undo`] puts a range's old bytes: (offset, length, bytes or
/// `None` for zeros).
pub type Restore<'a> = &'a mut dyn FnMut(u64, u64, Option<&[u8]>) -> Result<()>;

/// Walk the undo recorded after `point` (`None`: before the first set, the
/// empty disk), calling `restore(offset, length, bytes)` with the bytes a
/// range held at `point` (`None`: zeros), each byte once: the first set to
/// mention a byte saw it as it was at `point`.
///
/// `undo` must be a copy taken together with the replica's snapshot (under
/// the apply gate): every set in it is walked, also one whose undo was
/// captured but whose apply had not finished (its old bytes are then
/// partly the current ones: restoring them is right either way). When no
/// set starts at `point`, nothing was applied after it only if `point` is
/// the `applied` watermark; otherwise the point is out of reach (error).
pub fn walk_undo(
    undo: &UndoLog,
    point: Option<u64>,
    applied: Option<u64>,
    restore: Restore<'_>,
) -> Result<(Rewound, Covered)> {
    let mut done = Rewound::default();
    let mut covered = Covered::default();
    let starts_here = match point {
        Some(p) => undo.reaches(p),
        None => undo.first_set().is_some_and(|s| s.prev_applied.is_none()),
    };
    if !starts_here && point == applied {
        return Ok((done, covered));
    }
    let mut last_set = None;
    for part in undo.parts_from(point)? {
        let part = part?;
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
                        restore(off, n, Some(piece))?;
                        done.bytes_restored += n;
                    }
                    UndoKind::Zeros => {
                        restore(off, n, None)?;
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
    Ok((done, covered))
}

/// Rewind `image`, which holds the replica's state after applying
/// `applied`, to the state after `point` (see [`walk_undo`]).
pub fn rewind(
    image: &mut dyn Image,
    undo: &UndoLog,
    point: Option<u64>,
    applied: Option<u64>,
) -> Result<Rewound> {
    let zeros = vec![0u8; ZERO_CHUNK];
    let (done, _) = walk_undo(undo, point, applied, &mut |off, n, bytes| match bytes {
        Some(b) => image
            .write_at(b, off)
            .map_err(|e| Error::image("rewind", e)),
        None => zero_range(image, off, n, &zeros),
    })?;
    image.flush().map_err(|e| Error::image("rewind", e))?;
    Ok(done)
}

/// The replica as it was at a point, read-only, without copying it: reads
/// come from the replica except in the ranges written after the point,
/// whose old bytes a sparse overlay file holds (zeros are its holes). The
/// replica must not change while the view is read (hold the apply gate).
#[derive(Debug)]
pub struct PointView {
    replica: Box<dyn Image>,
    overlay: File,
    covered: Covered,
}

impl PointView {
    /// Build the view of `replica` (at `applied`) at `point`, the overlay
    /// in the new file `overlay` (removed when the view is dropped).
    pub fn new(
        replica: Box<dyn Image>,
        undo: &UndoLog,
        point: Option<u64>,
        applied: Option<u64>,
        overlay: &Path,
    ) -> Result<(PointView, Rewound)> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(overlay)
            .map_err(|e| Error::io("create overlay", overlay, e))?;
        // Unlinked at once: the descriptor keeps it for the view's life, and
        // nothing is left behind whatever happens.
        fs::remove_file(overlay).map_err(|e| Error::io("unlink overlay", overlay, e))?;
        file.set_len(replica.size())
            .map_err(|e| Error::io("size overlay", overlay, e))?;
        let (done, covered) = walk_undo(undo, point, applied, &mut |off, _, bytes| {
            match bytes {
                Some(b) => file
                    .write_all_at(b, off)
                    .map_err(|e| Error::io("write overlay", overlay, e)),
                None => Ok(()), // a hole reads as zeros
            }
        })?;
        Ok((
            PointView {
                replica,
                overlay: file,
                covered,
            },
            done,
        ))
    }
}

fn read_only() -> ferry_vhd::Error {
    ferry_vhd::Error::invalid("a point view is read-only".to_owned())
}

impl Image for PointView {
    fn format(&self) -> Format {
        self.replica.format()
    }

    fn path(&self) -> &Path {
        self.replica.path()
    }

    fn size(&self) -> u64 {
        self.replica.size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> ferry_vhd::Result<()> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let mut at = 0u64;
        let gaps = self.covered.uncovered(offset, len);
        let mut gaps = gaps.into_iter().peekable();
        while at < len {
            let pos = offset + at;
            let (from_replica, n) = match gaps.peek() {
                Some(&(g, gl)) if g == pos => {
                    gaps.next();
                    (true, gl)
                }
                Some(&(g, _)) => (false, g - pos),
                None => (false, len - at),
            };
            let lo = usize::try_from(at).unwrap_or(usize::MAX);
            let hi = usize::try_from(at + n).unwrap_or(usize::MAX);
            let piece = &mut buf[lo..hi];
            if from_replica {
                self.replica.read_at(piece, pos)?;
            } else {
                self.overlay
                    .read_exact_at(piece, pos)
                    .map_err(|e| ferry_vhd::Error::io(e, "read overlay"))?;
            }
            at += n;
        }
        Ok(())
    }

    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> ferry_vhd::Result<()> {
        Err(read_only())
    }

    fn flush(&mut self) -> ferry_vhd::Result<()> {
        Ok(())
    }

    fn map(&mut self, offset: u64, length: u64) -> ferry_vhd::Result<Vec<ferry_vhd::Extent>> {
        // A range restored from the overlay may hold data where the
        // replica holds none: call it allocated (zeros read from it are
        // skipped by the conversion anyway).
        let mut out = Vec::new();
        let end = offset.saturating_add(length);
        let mut at = offset;
        for (g, gl) in self.covered.uncovered(offset, length) {
            if g > at {
                ferry_vhd::image::push_extent(
                    &mut out,
                    ferry_vhd::Extent {
                        offset: at,
                        length: g - at,
                        allocated: true,
                    },
                );
            }
            for x in self.replica.map(g, gl)? {
                ferry_vhd::image::push_extent(&mut out, x);
            }
            at = g + gl;
        }
        if at < end {
            ferry_vhd::image::push_extent(
                &mut out,
                ferry_vhd::Extent {
                    offset: at,
                    length: end - at,
                    allocated: true,
                },
            );
        }
        Ok(out)
    }

    fn allocated_bytes(&mut self) -> ferry_vhd::Result<u64> {
        Ok(self.replica.allocated_bytes()? + self.covered.bytes())
    }

    fn check(&mut self) -> ferry_vhd::Result<Vec<ferry_vhd::Problem>> {
        Ok(Vec::new())
    }
}

/// Convert `view` into the new image `out` of `format` (synced).
pub fn export_view(
    view: &mut PointView,
    format: Format,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Exported> {
    refuse_existing(out)?;
    convert_into(view, format, out, progress)
}

fn refuse_existing(out: &Path) -> Result<()> {
    if out.exists() {
        return Err(Error::new(
            crate::ErrorKind::InvalidInput,
            "export",
            "the image exists; ferry never overwrites an image",
        )
        .at_path(out));
    }
    Ok(())
}

/// Convert `src` into the new image `out` of `format`, synced; nothing is
/// left under `out` on failure.
fn convert_into(
    src: &mut dyn Image,
    format: Format,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Exported> {
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
    let outcome = convert::convert(src, dst.as_mut(), Destination::Fresh, progress);
    drop(dst);
    if let Err(e) = outcome {
        for f in exported.files() {
            let _ = fs::remove_file(f);
        }
        return Err(Error::image("convert", e));
    }
    sync_parent(out)?;
    Ok(exported)
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
    /// No copy: converted into the asked format straight from the replica
    /// read at the point ([`PointView`]).
    Converted,
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
/// `point` with `undo` (a read-only copy: the applier may be appending to
/// the log meanwhile).
pub fn rewind_file(
    path: &Path,
    format: Format,
    undo: &UndoLog,
    point: Option<u64>,
    applied: Option<u64>,
) -> Result<Rewound> {
    let mut image = ferry_vhd::open_as(
        path,
        format,
        OpenOptions {
            writable: true,
            sync: SyncPolicy::Deferred,
        },
    )
    .map_err(|e| Error::image("open snapshot", e))?;
    rewind(image.as_mut(), undo, point, applied)
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
    refuse_existing(out)?;
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
    let exported = convert_into(src.as_mut(), format, out, progress)?;
    drop(src);
    fs::remove_file(base).map_err(|e| Error::io("remove snapshot", base, e))?;
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

    /// A 1 MiB raw replica written by three sets, their undo recorded the
    /// way the applier does; every point through a copy + rewind and
    /// through a view + conversion gives the disk as it was.
    #[test]
    fn a_view_and_a_rewound_copy_agree_with_the_disk_at_every_point() {
        use crate::undo::{SetInfo, UndoExtent, UndoOptions};
        let t = crate::testutil::TempDir::new("materialize");
        let replica = t.path().join("replica.img");
        let size = 1u64 << 20;
        let opts = CreateOptions::default();
        drop(ferry_vhd::create(&replica, Format::Raw, size, &opts).unwrap());
        let (mut undo, _) = UndoLog::open(&t.path().join("undo"), UndoOptions::default()).unwrap();
        let mut disk = vec![0u8; 1 << 20];
        let mut states = vec![(None, disk.clone())];
        let writes: [&[(usize, usize, u8)]; 3] = [
            &[(0, 8192, 1), (500_000, 100, 2)],
            &[(4096, 8192, 3), (700_000, 4096, 4)],
            &[(0, 4096, 0), (500_050, 100, 5), (1_040_000, 8576, 6)],
        ];
        let mut img = ferry_vhd::open(&replica, OpenOptions::read_write()).unwrap();
        let mut applied = None;
        for (i, set) in writes.iter().enumerate() {
            let seq = u64::try_from(i + 1).unwrap() * 10;
            let mut w = undo
                .begin_set(SetInfo {
                    epoch: 1,
                    first_seq: seq - 5,
                    last_seq: seq,
                    prev_applied: applied,
                    consistent_from: 1,
                })
                .unwrap();
            let mut extents = Vec::new();
            let mut old = Vec::new();
            for &(off, len, _) in set.iter() {
                let o = u64::try_from(off).unwrap();
                let l = u64::try_from(len).unwrap();
                extents.push(UndoExtent::data(o, l));
                old.extend_from_slice(&disk[off..off + len]);
            }
            w.add_part(&extents, &old).unwrap();
            w.finish().unwrap();
            for &(off, len, byte) in set.iter() {
                disk[off..off + len].fill(byte);
                img.write_at(&disk[off..off + len], u64::try_from(off).unwrap())
                    .unwrap();
            }
            applied = Some(seq);
            states.push((applied, disk.clone()));
        }
        img.flush().unwrap();
        drop(img);
        let read_all = |img: &mut dyn Image| {
            let mut buf = vec![0u8; 1 << 20];
            img.read_at(&mut buf, 0).unwrap();
            buf
        };
        for (n, (point, want)) in states.iter().enumerate() {
            let copy = t.path().join(format!("copy-{n}.img"));
            snapshot(&replica, Format::Raw, &copy).unwrap();
            rewind_file(&copy, Format::Raw, &undo, *point, applied).unwrap();
            let mut c = ferry_vhd::open(&copy, OpenOptions::read_only()).unwrap();
            assert!(read_all(c.as_mut()) == *want, "rewound copy at {point:?}");

            let base = ferry_vhd::open(&replica, OpenOptions::read_only()).unwrap();
            let overlay = t.path().join(format!("overlay-{n}"));
            let (mut view, _) = PointView::new(base, &undo, *point, applied, &overlay).unwrap();
            assert!(!overlay.exists(), "the overlay is unlinked at once");
            assert!(read_all(&mut view) == *want, "view at {point:?}");
            let mut piece = vec![0u8; 300];
            view.read_at(&mut piece, 499_990).unwrap();
            assert_eq!(piece[..], want[499_990..500_290]);
            let out = t.path().join(format!("out-{n}.vhd"));
            export_view(&mut view, Format::VhdDynamic, &out, &mut |_, _| {}).unwrap();
            let mut o = ferry_vhd::open(&out, OpenOptions::read_only()).unwrap();
            assert!(read_all(o.as_mut()) == *want, "converted view at {point:?}");
        }
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
