//! Copying and comparing images of any two formats.
//!
//! Conversion reads the source on one thread and writes on the caller's, so
//! reading, zero detection and the destination's own work (compression for
//! stream-optimized VMDK) overlap. Only allocated source runs are read, and
//! runs of zeros are never written: the destination is fresh, so it reads
//! zeros there already and sparse formats leave them unallocated.

use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::fileio::is_zero;
use crate::image::{Extent, Image};

/// Bytes read from the source at a time.
pub const CHUNK: usize = 4 << 20;
/// Granularity at which zero runs are detected and skipped.
pub const ZERO_GRANULE: usize = 64 << 10;
/// Source range mapped at a time (bounds the extent list's memory).
const MAP_WINDOW: u64 = 1 << 30;
/// Chunks in flight between the reader thread and the writer.
const IN_FLIGHT: usize = 4;

/// What a conversion did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConvertStats {
    /// Bytes read from allocated source runs.
    pub bytes_read: u64,
    /// Bytes written to the destination (non-zero data only).
    pub bytes_written: u64,
}

/// What the destination of a conversion holds before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// A freshly created image: it reads zeros everywhere, so only the
    /// source's non-zero data is written.
    Fresh,
    /// An image that already has content (a differencing disk over its
    /// parent): every granule that differs from it is written, zeros too.
    OverExisting,
}

/// Copy every byte of `src` into `dst` (at least as large), then finish it.
/// `progress` is called with (bytes done, total) as work proceeds.
pub fn convert(
    src: &mut dyn Image,
    dst: &mut dyn Image,
    destination: Destination,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    if dst.size() < src.size() {
        return Err(Error::invalid(format!(
            "destination ({} bytes) is smaller than the source ({} bytes)",
            dst.size(),
            src.size()
        )));
    }
    let total = src.size();
    let mut stats = ConvertStats::default();
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<(u64, Vec<u8>)>>(IN_FLIGHT);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..IN_FLIGHT + 1 {
        empty_tx.send(vec![0u8; CHUNK]).expect("receiver alive");
    }
    std::thread::scope(|scope| -> Result<()> {
        let reader = std::thread::Builder::new()
            .name("convert-read".into())
            .spawn_scoped(scope, move || {
                read_source(src, destination, &full_tx, &empty_rx)
            })
            .map_err(|e| Error::io(e, "spawn reader thread"))?;
        let mut outcome = Ok(());
        for item in full_rx.iter() {
            let (offset, buf) = match item {
                Ok(chunk) => chunk,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            stats.bytes_read += buf.len() as u64;
            let written = match destination {
                Destination::Fresh => write_nonzero(dst, &buf, offset, &mut stats),
                Destination::OverExisting => write_changed(dst, &buf, offset, &mut stats),
            };
            if let Err(e) = written {
                outcome = Err(e);
                break;
            }
            progress(offset + buf.len() as u64, total);
            // The reader may have finished; a closed channel is fine.
            let _ = empty_tx.send(buf);
        }
        drop(full_rx);
        drop(empty_tx);
        reader.join().expect("reader thread does not panic");
        outcome
    })?;
    dst.finish()?;
    progress(total, total);
    Ok(stats)
}

/// Reader thread: send the runs of `src` the destination needs (allocated
/// ones for a fresh destination, all of it otherwise) in chunks of at most
/// [`CHUNK`] bytes, reusing buffers handed back on `empty`.
fn read_source(
    src: &mut dyn Image,
    destination: Destination,
    full: &mpsc::SyncSender<Result<(u64, Vec<u8>)>>,
    empty: &mpsc::Receiver<Vec<u8>>,
) {
    let size = src.size();
    let mut window = 0u64;
    while window < size {
        let len = MAP_WINDOW.min(size - window);
        let extents = match destination {
            Destination::Fresh => src.map(window, len),
            Destination::OverExisting => Ok(vec![Extent {
                offset: window,
                length: len,
                allocated: true,
            }]),
        };
        let extents = match extents {
            Ok(map) => map,
            Err(e) => {
                let _ = full.send(Err(e));
                return;
            }
        };
        for Extent { offset, length, .. } in extents.into_iter().filter(|e| e.allocated) {
            let mut pos = offset;
            while pos < offset + length {
                let Ok(mut buf) = empty.recv() else { return };
                let n = usize::try_from((offset + length - pos).min(CHUNK as u64)).expect("chunk");
                buf.resize(n, 0);
                let item = src.read_at(&mut buf, pos).map(|()| (pos, buf));
                let failed = item.is_err();
                if full.send(item).is_err() || failed {
                    return;
                }
                pos += n as u64;
            }
        }
        window += len;
    }
}

/// Write the non-zero [`ZERO_GRANULE`] runs of `buf` at `offset`.
fn write_nonzero(
    dst: &mut dyn Image,
    buf: &[u8],
    offset: u64,
    stats: &mut ConvertStats,
) -> Result<()> {
    let mut run_start: Option<usize> = None;
    let mut at = 0;
    while at < buf.len() {
        let end = (at + ZERO_GRANULE).min(buf.len());
        let zero = is_zero(&buf[at..end]);
        match (zero, run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(start)) => {
                dst.write_at(&buf[start..at], offset + start as u64)?;
                stats.bytes_written += (at - start) as u64;
                run_start = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(start) = run_start {
        dst.write_at(&buf[start..], offset + start as u64)?;
        stats.bytes_written += (buf.len() - start) as u64;
    }
    Ok(())
}

/// Write the [`ZERO_GRANULE`] pieces of `buf` that differ from what `dst`
/// already holds at `offset`.
fn write_changed(
    dst: &mut dyn Image,
    buf: &[u8],
    offset: u64,
    stats: &mut ConvertStats,
) -> Result<()> {
    let mut current = vec![0u8; buf.len()];
    dst.read_at(&mut current, offset)?;
    for (i, (new, old)) in buf
        .chunks(ZERO_GRANULE)
        .zip(current.chunks(ZERO_GRANULE))
        .enumerate()
    {
        if new != old {
            dst.write_at(new, offset + (i * ZERO_GRANULE) as u64)?;
            stats.bytes_written += new.len() as u64;
        }
    }
    Ok(())
}

/// The first offset at which `a` and `b` read differently, or `None` if they
/// hold the same content. A size difference counts only where the larger
/// image holds non-zero bytes past the smaller one's end.
pub fn first_difference(a: &mut dyn Image, b: &mut dyn Image) -> Result<Option<u64>> {
    let common = a.size().min(b.size());
    let mut buf_a = vec![0u8; CHUNK];
    let mut buf_b = vec![0u8; CHUNK];
    let mut window = 0u64;
    while window < common {
        let len = MAP_WINDOW.min(common - window);
        for (offset, length) in union_allocated(&a.map(window, len)?, &b.map(window, len)?) {
            let mut pos = offset;
            while pos < offset + length {
                let n = usize::try_from((offset + length - pos).min(CHUNK as u64)).expect("chunk");
                a.read_at(&mut buf_a[..n], pos)?;
                b.read_at(&mut buf_b[..n], pos)?;
                if let Some(i) = buf_a[..n].iter().zip(&buf_b[..n]).position(|(x, y)| x != y) {
                    return Ok(Some(pos + i as u64));
                }
                pos += n as u64;
            }
        }
        window += len;
    }
    if a.size() > b.size() {
        first_nonzero(a, common, &mut buf_a)
    } else {
        first_nonzero(b, common, &mut buf_a)
    }
}

/// The first non-zero byte at or after `from`.
fn first_nonzero(img: &mut dyn Image, from: u64, buf: &mut [u8]) -> Result<Option<u64>> {
    let size = img.size();
    if from >= size {
        return Ok(None);
    }
    for e in img
        .map(from, size - from)?
        .into_iter()
        .filter(|e| e.allocated)
    {
        let mut pos = e.offset;
        while pos < e.end() {
            let n = usize::try_from((e.end() - pos).min(buf.len() as u64)).expect("chunk");
            img.read_at(&mut buf[..n], pos)?;
            if let Some(i) = buf[..n].iter().position(|&x| x != 0) {
                return Ok(Some(pos + i as u64));
            }
            pos += n as u64;
        }
    }
    Ok(None)
}

/// Ranges allocated in either map (both maps cover the same range, sorted).
fn union_allocated(a: &[Extent], b: &[Extent]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = a
        .iter()
        .chain(b)
        .filter(|e| e.allocated)
        .map(|e| (e.offset, e.end()))
        .collect();
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{pattern, TempDir};
    use crate::{create, CreateOptions, Format};

    #[test]
    fn union_merges_overlaps() {
        let e = |offset, length, allocated| Extent {
            offset,
            length,
            allocated,
        };
        let a = [e(0, 10, true), e(10, 10, false), e(20, 5, true)];
        let b = [e(0, 5, false), e(5, 10, true), e(15, 10, false)];
        assert_eq!(union_allocated(&a, &b), vec![(0, 15), (20, 5)]);
    }

    #[test]
    fn convert_skips_zeros_and_compare_finds_first_difference() {
        let dir = TempDir::new("convert");
        let size = 12u64 << 20;
        let mut src = create(
            &dir.path("s.raw"),
            Format::Raw,
            size,
            &CreateOptions::default(),
        )
        .unwrap();
        src.write_at(&pattern(1, 100_000), 3 << 20).unwrap();
        src.write_at(&vec![0u8; 1 << 20], 8 << 20).unwrap(); // allocated zeros
        src.write_at(&pattern(2, 4096), size - 4096).unwrap();
        let mut dst = create(
            &dir.path("d.vhd"),
            Format::VhdDynamic,
            size,
            &CreateOptions::default(),
        )
        .unwrap();
        let mut calls = 0;
        let stats = convert(
            src.as_mut(),
            dst.as_mut(),
            Destination::Fresh,
            &mut |_, _| calls += 1,
        )
        .unwrap();
        assert!(calls > 0);
        // Only the two patterns (rounded to granules or file-system blocks) are
        // written: not the allocated megabyte of zeros.
        assert!(stats.bytes_written >= 100_000 + 4096, "{stats:?}");
        assert!(
            stats.bytes_written <= 2 * (ZERO_GRANULE as u64) + 4096,
            "{stats:?}"
        );
        assert_eq!(first_difference(src.as_mut(), dst.as_mut()).unwrap(), None);
        // Two 2 MiB blocks: the one holding 3 MiB and the last one.
        assert_eq!(dst.allocated_bytes().unwrap(), 2 * (2 << 20));
        dst.write_at(&[7], (5 << 20) + 3).unwrap();
        assert_eq!(
            first_difference(src.as_mut(), dst.as_mut()).unwrap(),
            Some((5 << 20) + 3)
        );
    }

    #[test]
    fn convert_over_a_parent_writes_zeros_that_differ() {
        let dir = TempDir::new("convert-diff");
        let size = 4u64 << 20;
        let base = dir.path("base.vhd");
        let mut parent =
            create(&base, Format::VhdDynamic, size, &CreateOptions::default()).unwrap();
        parent.write_at(&pattern(1, 1 << 20), 0).unwrap();
        drop(parent);
        let mut src = create(
            &dir.path("s.raw"),
            Format::Raw,
            size,
            &CreateOptions::default(),
        )
        .unwrap();
        src.write_at(&pattern(1, 1 << 19), 0).unwrap(); // same first half MiB, zeros after
        let options = CreateOptions {
            parent: Some(base),
            ..CreateOptions::default()
        };
        let mut dst = create(&dir.path("c.vhd"), Format::VhdDiff, 0, &options).unwrap();
        let stats = convert(
            src.as_mut(),
            dst.as_mut(),
            Destination::OverExisting,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(stats.bytes_written, 1 << 19);
        assert_eq!(first_difference(src.as_mut(), dst.as_mut()).unwrap(), None);
    }

    #[test]
    fn compare_counts_only_nonzero_tails() {
        let dir = TempDir::new("compare-size");
        let mut a = create(
            &dir.path("a.raw"),
            Format::Raw,
            1 << 20,
            &CreateOptions::default(),
        )
        .unwrap();
        let mut b = create(
            &dir.path("b.raw"),
            Format::Raw,
            2 << 20,
            &CreateOptions::default(),
        )
        .unwrap();
        assert_eq!(first_difference(a.as_mut(), b.as_mut()).unwrap(), None);
        b.write_at(&[1], (1 << 20) + 5).unwrap();
        assert_eq!(
            first_difference(a.as_mut(), b.as_mut()).unwrap(),
            Some((1 << 20) + 5)
        );
    }
}
