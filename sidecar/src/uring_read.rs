//! [`DirectReader`]: re-reads from a protected disk's backing device with
//! O_DIRECT through io_uring, into registered buffers.
//!
//! Payload-less records are read back from the device; going through the
//! page cache would evict the host's working set for data that is read once
//! and shipped. The reader opens the device with O_DIRECT and keeps one
//! small io_uring and [`BUFFERS`] registered buffers of [`BUF_SIZE`] bytes
//! (aligned to 4096). A read of `[offset, offset + len)` is widened to the
//! device's alignment (the logical block size of a block device, 4096 for a
//! regular file), cut into chunks of at most [`BUF_SIZE`], and up to
//! [`BUFFERS`] chunks are in flight at once (`IORING_OP_READ_FIXED`, one
//! buffer each); the wanted bytes are copied into the caller's buffer as
//! each chunk completes.
//!
//! * Short reads continue where they stopped (rounded down to the
//!   alignment); a read that makes no progress before the wanted end is
//!   [`io::ErrorKind::UnexpectedEof`]. So is a read past the end of the
//!   device, checked before any I/O (the size is queried on each call:
//!   `BLKGETSIZE64`, or the file's length).
//! * A failed completion becomes `io::Error::from_raw_os_error(-res)`.
//! * File systems that refuse O_DIRECT (tmpfs before Linux 6.6, some FUSE)
//!   fail the open, or the first read, with EINVAL: [`Mode::Auto`] then
//!   falls back to a buffered descriptor with alignment 1 ([`DirectReader::direct`]
//!   tells which). If registering the buffers fails (`RLIMIT_MEMLOCK`), the
//!   same buffers are used with plain `IORING_OP_READ`
//!   ([`DirectReader::registered`]).
//! * Buffer ownership: a buffer is marked busy when its entry is queued and
//!   free only once its completion is reaped. A failed call reaps every
//!   outstanding completion before it returns (and if even that fails, the
//!   next call does so before it touches a buffer); dropping the reader
//!   does the same, and leaks the buffers rather than free memory the
//!   kernel may still write.
//! * [`ReadAt`] takes `&self`: the ring and buffers sit behind a mutex (one
//!   reader per disk thread, so it is never contended). The reader is
//!   `Send` and `Sync`.

use std::alloc::{self, Layout};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Mutex, PoisonError};

use io_uring::{opcode, types, IoUring};

use crate::batch::ReadAt;

/// Entries of the reader's ring (at most [`BUFFERS`] are in flight).
const QUEUE_DEPTH: u32 = 8;
/// Registered buffers, and so reads in flight at once.
pub const BUFFERS: usize = 4;
/// Bytes per registered buffer: the largest single read.
pub const BUF_SIZE: usize = 1 << 20;
/// Memory alignment of the buffers (covers any device's DMA alignment).
const BUF_ALIGN: usize = 4096;
/// O_DIRECT alignment assumed for regular files.
const FILE_ALIGNMENT: u64 = 4096;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes (linux/fs.h).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IO(0x12, 104)`: logical block size of a block device (linux/fs.h).
const BLKSSZGET: libc::c_ulong = 0x1268;

/// How [`DirectReader::open_with`] opens the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// O_DIRECT; through the page cache if the file system refuses it (EINVAL).
    #[default]
    Auto,
    /// O_DIRECT or an error.
    Direct,
    /// Through the page cache (alignment 1), never O_DIRECT.
    Buffered,
}

/// Reads a backing device with O_DIRECT through io_uring (see the module docs).
pub struct DirectReader {
    // Declared before `file`: dropped (and settled) while the descriptor is open.
    inner: Mutex<Inner>,
    file: File,
    path: PathBuf,
    direct: bool,
    block_device: bool,
    alignment: u64,
}

// The reader moves to a shipping thread and may be shared by reference.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<DirectReader>();
};

impl fmt::Debug for DirectReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectReader")
            .field("path", &self.path)
            .field("direct", &self.direct)
            .field("block_device", &self.block_device)
            .field("alignment", &self.alignment)
            .field("registered", &self.registered())
            .finish_non_exhaustive()
    }
}

impl DirectReader {
    /// Open `path` (a block device or regular file) read-only: O_DIRECT,
    /// or buffered where the file system refuses O_DIRECT ([`Mode::Auto`]).
    pub fn open(path: &Path) -> io::Result<DirectReader> {
        DirectReader::open_with(path, Mode::Auto)
    }

    /// Open `path` read-only as `mode` says.
    pub fn open_with(path: &Path, mode: Mode) -> io::Result<DirectReader> {
        if mode != Mode::Buffered {
            match DirectReader::open_as(path, true) {
                Ok(reader) => return Ok(reader),
                Err(e) if mode == Mode::Auto && e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(
                        path = %path.display(),
                        "O_DIRECT refused (EINVAL); reading through the page cache"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        DirectReader::open_as(path, false)
    }

    fn open_as(path: &Path, direct: bool) -> io::Result<DirectReader> {
        let mut options = OpenOptions::new();
        options.read(true);
        if direct {
            options.custom_flags(libc::O_DIRECT);
        }
        let file = options.open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        if !block_device && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is neither a block device nor a file", path.display()),
            ));
        }
        let alignment = match (direct, block_device) {
            (false, _) => 1,
            (true, true) => logical_block_size(&file)?,
            (true, false) => FILE_ALIGNMENT,
        };
        if !alignment.is_power_of_two() || alignment > BUF_SIZE as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: unusable alignment {alignment}", path.display()),
            ));
        }
        let reader = DirectReader {
            inner: Mutex::new(Inner::new()?),
            file,
            path: path.to_owned(),
            direct,
            block_device,
            alignment,
        };
        if direct {
            // Some file systems take O_DIRECT at open and refuse the I/O
            // (EINVAL): find out now, while falling back is still possible.
            let size = reader.size()?;
            let mut probe = vec![0u8; usize::try_from(size.min(reader.alignment)).unwrap_or(0)];
            reader.read_at(&mut probe, 0)?;
        }
        Ok(reader)
    }

    /// Whether reads bypass the page cache (O_DIRECT).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The alignment reads are widened to (1 when buffered).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Whether the buffers are registered with the ring (reads are
    /// `IORING_OP_READ_FIXED`); false when registering failed.
    pub fn registered(&self) -> bool {
        self.lock().registered
    }

    /// Reads submitted as `IORING_OP_READ_FIXED` so far.
    pub fn fixed_reads(&self) -> u64 {
        self.lock().fixed_reads
    }

    /// Reads submitted as plain `IORING_OP_READ` so far.
    pub fn plain_reads(&self) -> u64 {
        self.lock().plain_reads
    }

    /// Current size of the device or file in bytes.
    pub fn size(&self) -> io::Result<u64> {
        if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points at a live local; the descriptor is open.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(size)
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while the lock was held leaves the busy flags true to the
        // kernel's view (they change only with a push or a reap), and every
        // read settles first: the state is usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ReadAt for DirectReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let size = self.size()?;
        self.lock()
            .read(self.file.as_raw_fd(), self.alignment, size, buf, offset)
    }
}

fn logical_block_size(file: &File) -> io::Result<u64> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // a live local; the descriptor is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut size) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| io::Error::other(format!("BLKSSZGET returned {size}")))
}

fn align_down(x: u64, alignment: u64) -> u64 {
    x - x % alignment
}

fn align_up(x: u64, alignment: u64) -> u64 {
    align_down(x.saturating_add(alignment - 1), alignment)
}

/// One heap buffer of [`BUF_SIZE`] bytes aligned to [`BUF_ALIGN`], zeroed
/// at allocation (so it is always initialized memory).
struct AlignedBuf {
    ptr: NonNull<u8>,
}

// SAFETY: an AlignedBuf exclusively owns its allocation, like a Box<[u8]>;
// nothing about it is tied to the thread that made it.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn layout() -> Layout {
        Layout::from_size_align(BUF_SIZE, BUF_ALIGN).expect("constant layout is valid")
    }

    fn new() -> io::Result<AlignedBuf> {
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(AlignedBuf::layout()) };
        NonNull::new(ptr)
            .map(|ptr| AlignedBuf { ptr })
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by `alloc_zeroed` with this very layout and freed
        // only here. `Inner` drops its buffers only after every read that
        // names them was reaped and the ring is gone (or leaks them).
        unsafe { alloc::dealloc(self.ptr.as_ptr(), AlignedBuf::layout()) }
    }
}

/// One chunk of a read, in the buffer of the same index. Offsets other
/// than `start` are relative to `start` (= byte 0 of the buffer).
#[derive(Debug, Clone, Copy, Default)]
struct Chunk {
    /// Device offset of the chunk (aligned).
    start: u64,
    /// Bytes asked for (a multiple of the alignment).
    len: usize,
    /// Where the submission in flight starts (aligned).
    from: usize,
    /// Bytes valid from the start.
    done: usize,
    /// The wanted bytes: `[want, need)`.
    want: usize,
    need: usize,
    /// Where `want` goes in the caller's buffer.
    dst: usize,
}

struct Inner {
    // Declared before `bufs`: the ring (and its registration) goes first.
    ring: IoUring,
    bufs: Vec<AlignedBuf>,
    registered: bool,
    /// Buffer `i` is named by an entry the kernel may still act on: queued,
    /// or submitted and not reaped.
    busy: [bool; BUFFERS],
    chunks: [Chunk; BUFFERS],
    fixed_reads: u64,
    plain_reads: u64,
}

impl Inner {
    fn new() -> io::Result<Inner> {
        let ring = IoUring::new(QUEUE_DEPTH)?;
        let bufs = (0..BUFFERS)
            .map(|_| AlignedBuf::new())
            .collect::<io::Result<Vec<_>>>()?;
        let iovecs: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.ptr.as_ptr().cast(),
                iov_len: BUF_SIZE,
            })
            .collect();
        // SAFETY: each iovec covers one live allocation of BUF_SIZE bytes
        // owned by `bufs`, which stay allocated until the ring is dropped
        // (field order of Inner; Drop leaks them if reads are outstanding).
        let registered = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "io_uring buffer registration failed (RLIMIT_MEMLOCK?); using plain reads"
                );
                false
            }
        };
        Ok(Inner {
            ring,
            bufs,
            registered,
            busy: [false; BUFFERS],
            chunks: [Chunk::default(); BUFFERS],
            fixed_reads: 0,
            plain_reads: 0,
        })
    }

    /// Fill `buf` from `offset` of a device of `size` bytes.
    fn read(
        &mut self,
        fd: RawFd,
        alignment: u64,
        size: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        // Reads left outstanding by an earlier failure finish first.
        self.settle()?;
        let result = self.read_chunks(fd, alignment, size, buf, offset);
        if result.is_err() {
            // If this fails too, the buffers stay busy and the next call
            // settles before it uses one.
            if let Err(e) = self.settle() {
                tracing::warn!(error = %e, "io_uring: reads still outstanding after a failure");
            }
        }
        result
    }

    fn read_chunks(
        &mut self,
        fd: RawFd,
        alignment: u64,
        size: u64,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&end| end <= size)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "read of {} bytes at {offset} past the end of the device ({size} bytes)",
                        buf.len()
                    ),
                )
            })?;
        let last = align_up(end, alignment).min(align_up(size, alignment));
        let mut next = align_down(offset, alignment);
        loop {
            for slot in 0..BUFFERS {
                if next >= last {
                    break;
                }
                if self.busy[slot] {
                    continue;
                }
                let chunk_end = last.min(next + BUF_SIZE as u64);
                let rel = |at: u64| usize::try_from(at - next).expect("within one buffer");
                self.chunks[slot] = Chunk {
                    start: next,
                    len: rel(chunk_end),
                    from: 0,
                    done: 0,
                    want: rel(offset.max(next)),
                    need: rel(end.min(chunk_end)),
                    dst: usize::try_from(offset.max(next) - offset).expect("within buf"),
                };
                self.submit(fd, slot)?;
                next = chunk_end;
            }
            if !self.busy.contains(&true) {
                return Ok(());
            }
            self.wait()?;
            while let Some((user_data, res)) = self.next_completion() {
                let Some(slot) = self.reap(user_data) else {
                    continue;
                };
                if res == -libc::EINTR || res == -libc::EAGAIN {
                    self.submit(fd, slot)?;
                    continue;
                }
                let n = usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res))?;
                let chunk = &mut self.chunks[slot];
                let reached = chunk.from + n;
                if reached <= chunk.done {
                    // Nothing new (0 bytes, or O_DIRECT re-reading the
                    // partial block at the end): the device ends here.
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "device ended at {} while reading {} bytes at {offset}",
                            chunk.start + chunk.done as u64,
                            buf.len()
                        ),
                    ));
                }
                chunk.done = reached;
                if chunk.done >= chunk.need {
                    let chunk = *chunk;
                    let src = &self.buffer(slot)[chunk.want..chunk.need];
                    buf[chunk.dst..chunk.dst + src.len()].copy_from_slice(src);
                } else {
                    // A short read: go on from where it stopped (O_DIRECT
                    // needs an aligned offset; the buffer start is aligned).
                    chunk.from = usize::try_from(align_down(reached as u64, alignment))
                        .expect("within one buffer");
                    self.submit(fd, slot)?;
                }
            }
        }
    }

    /// Queue the read of `chunks[slot]` from its `from` into buffer `slot`.
    fn submit(&mut self, fd: RawFd, slot: usize) -> io::Result<()> {
        debug_assert!(!self.busy[slot]);
        let chunk = self.chunks[slot];
        let len = u32::try_from(chunk.len - chunk.from).expect("at most BUF_SIZE");
        let ptr = self.bufs[slot].ptr.as_ptr().wrapping_add(chunk.from);
        let at = chunk.start + chunk.from as u64;
        let entry = if self.registered {
            let index = u16::try_from(slot).expect("BUFFERS fits u16");
            opcode::ReadFixed::new(types::Fd(fd), ptr, len, index)
                .offset(at)
                .build()
        } else {
            opcode::Read::new(types::Fd(fd), ptr, len)
                .offset(at)
                .build()
        }
        .user_data(slot as u64);
        // SAFETY: `ptr..ptr + len` lies inside buffer `slot` (from + len =
        // chunk.len <= BUF_SIZE), which with READ_FIXED is registered buffer
        // `slot`. The buffer is not busy, so no other entry names it, and
        // from here it stays allocated and untouched by us until its
        // completion is reaped: `busy` marks it, a failed read settles
        // before returning, and Drop settles or leaks the buffers.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.busy[slot] = true;
        if self.registered {
            self.fixed_reads += 1;
        } else {
            self.plain_reads += 1;
        }
        Ok(())
    }

    /// Submit what is queued and wait for at least one completion.
    fn wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The completion queue is full: reap first.
                    Some(libc::EBUSY) => return Ok(()),
                    Some(libc::EAGAIN) => std::thread::sleep(std::time::Duration::from_millis(1)),
                    _ => return Err(e),
                },
            }
        }
    }

    /// The next completion in the queue: (user data, result).
    fn next_completion(&mut self) -> Option<(u64, i32)> {
        let cqe = self.ring.completion().next()?;
        Some((cqe.user_data(), cqe.result()))
    }

    /// The buffer a completion names, now free; None for a stray one.
    fn reap(&mut self, user_data: u64) -> Option<usize> {
        let slot = usize::try_from(user_data).ok().filter(|&s| s < BUFFERS)?;
        std::mem::replace(&mut self.busy[slot], false).then_some(slot)
    }

    /// Reap every outstanding read (results dropped).
    fn settle(&mut self) -> io::Result<()> {
        while self.busy.contains(&true) {
            self.wait()?;
            while let Some((user_data, _)) = self.next_completion() {
                self.reap(user_data);
            }
        }
        Ok(())
    }

    /// Buffer `slot`, which is not busy.
    fn buffer(&self, slot: usize) -> &[u8] {
        assert!(!self.busy[slot], "buffer {slot} is in use by the kernel");
        // SAFETY: the allocation is BUF_SIZE initialized bytes (zeroed at
        // allocation, then written only by completed reads) and lives as
        // long as `self`; no read names it (not busy), so nothing writes it
        // while the shared borrow of `self` lasts.
        unsafe { std::slice::from_raw_parts(self.bufs[slot].ptr.as_ptr(), BUF_SIZE) }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.settle() {
            // The kernel may still write into the buffers: leak them rather
            // than free memory it can touch.
            tracing::error!(error = %e, "io_uring reads outstanding at drop; leaking their buffers");
            std::mem::forget(std::mem::take(&mut self.bufs));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A scratch file on a disk file system: /tmp may be tmpfs, which
    /// refuses O_DIRECT (before Linux 6.6) and would only test the fallback.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str, data: &[u8]) -> Scratch {
            let path = PathBuf::from("/var/tmp").join(format!(
                "ferry-uring-read-{tag}-{}-{}",
                std::process::id(),
                crate::tests::unique()
            ));
            let mut f = File::create(&path).unwrap();
            f.write_all(data).unwrap();
            f.sync_all().unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// splitmix64: small, deterministic.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.next() % n
            }
        }
    }

    fn content(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = Rng(seed);
        let mut data = Vec::with_capacity(len + 8);
        while data.len() < len {
            data.extend_from_slice(&rng.next().to_le_bytes());
        }
        data.truncate(len);
        data
    }

    fn check(reader: &DirectReader, want: &[u8], offset: u64, len: usize) {
        let mut got = vec![0xa5u8; len];
        reader
            .read_at(&mut got, offset)
            .unwrap_or_else(|e| panic!("read of {len} at {offset}: {e}"));
        let at = usize::try_from(offset).unwrap();
        assert!(
            got == want[at..at + len],
            "read of {len} at {offset} differs"
        );
    }

    /// 200 random unaligned reads (plus the edges) against std::fs::read.
    fn random_reads(mode: Mode, seed: u64) -> DirectReader {
        // Not a multiple of 4096: the last block is partial.
        let size = (23 << 20) + 12_345;
        let scratch = Scratch::new("random", &content(size, seed));
        let want = std::fs::read(&scratch.0).unwrap();
        let reader = DirectReader::open_with(&scratch.0, mode).unwrap();
        if mode == Mode::Buffered {
            assert!(!reader.direct());
            assert_eq!(reader.alignment(), 1);
        }
        let size = want.len() as u64;
        assert_eq!(reader.size().unwrap(), size);
        let mut rng = Rng(seed ^ 0xfeed);
        for i in 0..200 {
            let len = match i % 5 {
                0 => rng.below(20 << 20),                // spans many buffers
                1 => rng.below(4096 * 3),                // a few blocks
                2 => rng.below(2 * BUF_SIZE as u64) + 1, // around one buffer
                3 => rng.below(100),                     // tiny, maybe zero
                _ => rng.below(600_000),
            };
            let len = len.min(size);
            let offset = match i % 7 {
                0 => size - len,                                  // at the very end
                1 => align_down(rng.below(size - len + 1), 4096), // aligned start
                _ => rng.below(size - len + 1),
            };
            check(&reader, &want, offset, usize::try_from(len).unwrap());
        }
        // Edges.
        check(&reader, &want, 0, want.len());
        check(&reader, &want, size, 0);
        check(&reader, &want, size - 1, 1);
        check(&reader, &want, 0, 0);
        check(&reader, &want, 12_345, 0);
        for (offset, len) in [
            (size - 10, 11),
            (size, 1),
            (size + 4096, 10),
            (u64::MAX - 1, 5),
        ] {
            let mut buf = vec![0u8; len];
            let e = reader.read_at(&mut buf, offset).unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::UnexpectedEof,
                "{offset}+{len}: {e}"
            );
        }
        // Still good after errors.
        check(&reader, &want, 4000, 10_000);
        drop(scratch);
        reader
    }

    #[test]
    fn uring_read_random_reads_match_auto() {
        let reader = random_reads(Mode::Auto, 1);
        eprintln!("auto mode: {reader:?}");
    }

    #[test]
    fn uring_read_random_reads_match_buffered() {
        let reader = random_reads(Mode::Buffered, 2);
        assert!(reader.fixed_reads() + reader.plain_reads() > 200);
    }

    #[test]
    fn uring_read_direct_uses_registered_buffers() {
        let data = content((5 << 20) + 100, 3);
        let scratch = Scratch::new("fixed", &data);
        let reader = DirectReader::open(&scratch.0).unwrap();
        if !reader.direct() {
            eprintln!("/var/tmp refuses O_DIRECT here; only the fallback was tested");
            return;
        }
        assert_eq!(reader.alignment(), FILE_ALIGNMENT);
        assert!(
            reader.registered(),
            "registering {BUFFERS} x {BUF_SIZE} bytes failed (RLIMIT_MEMLOCK too low?)"
        );
        let before = reader.fixed_reads();
        check(&reader, &data, 1, data.len() - 1);
        // Six 1 MiB chunks (5 MiB + 100 from offset 0, widened to 4096).
        assert_eq!(reader.fixed_reads() - before, 6);
        assert_eq!(reader.plain_reads(), 0);
        // Also in Direct mode (no fallback allowed).
        let strict = DirectReader::open_with(&scratch.0, Mode::Direct).unwrap();
        assert!(strict.direct());
        check(&strict, &data, 4095, 2);
        assert_eq!(strict.fixed_reads(), 2); // the probe and one block pair
    }

    #[test]
    fn uring_read_small_and_empty_files() {
        for (len, seed) in [(0usize, 4u64), (1, 5), (100, 6), (4096, 7), (4097, 8)] {
            let data = content(len, seed);
            let scratch = Scratch::new("small", &data);
            for mode in [Mode::Auto, Mode::Buffered] {
                let reader = DirectReader::open_with(&scratch.0, mode).unwrap();
                for offset in 0..=len.min(70) {
                    check(&reader, &data, offset as u64, len - offset);
                }
                let mut one = [0u8; 1];
                assert_eq!(
                    reader.read_at(&mut one, len as u64).unwrap_err().kind(),
                    io::ErrorKind::UnexpectedEof
                );
            }
        }
    }

    #[test]
    fn uring_read_shared_between_threads() {
        let data = content(3 << 20, 9);
        let scratch = Scratch::new("threads", &data);
        let reader = DirectReader::open(&scratch.0).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (reader, data) = (&reader, &data);
                s.spawn(move || {
                    let mut rng = Rng(t);
                    for _ in 0..50 {
                        let len = rng.below(300_000);
                        let offset = rng.below(data.len() as u64 - len);
                        check(reader, data, offset, usize::try_from(len).unwrap());
                    }
                });
            }
        });
    }

    #[test]
    fn uring_read_refuses_directories() {
        let e = DirectReader::open(Path::new("/var/tmp")).unwrap_err();
        assert!(
            e.kind() == io::ErrorKind::InvalidInput || e.raw_os_error() == Some(libc::EISDIR),
            "{e}"
        );
    }
}
