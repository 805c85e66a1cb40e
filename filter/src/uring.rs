//! Backing-device I/O through io_uring.
//!
//! Every thread that does backing I/O (the NBD connection workers) owns a
//! small ring of its own, created on first use: it submits one operation
//! and waits for its completion in the same system call, so a request costs
//! no hand-off to another thread. The buffer of an operation is borrowed by
//! the caller for the whole call, and the call returns only after the
//! completion was reaped: the buffer stays owned and alive for as long as
//! the kernel may touch it.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

/// Entries of each thread's ring (one operation is in flight per thread).
const QUEUE_DEPTH: u32 = 4;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
    static NEXT_TOKEN: std::cell::Cell<u64> = const { std::cell::Cell::new(1) };
}

/// Backing-device I/O through per-thread io_uring instances.
#[derive(Debug, Default)]
pub struct Uring {
    operations: AtomicU64,
}

impl Uring {
    /// Check that io_uring works here (the first ring of this thread).
    /// Each thread's ring goes away with its thread: nothing to stop.
    pub fn start() -> io::Result<Arc<Uring>> {
        RING.with(|ring| ensure_ring(&mut ring.borrow_mut()).map(drop))?;
        Ok(Arc::new(Uring::default()))
    }

    /// Operations completed so far.
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::Relaxed)
    }

    /// Submit one entry and wait for its result (bytes, or the errno as an error).
    ///
    /// # Safety
    /// Every buffer the entry names must stay valid, and not be used by
    /// anything else, until this returns.
    unsafe fn call(&self, entry: squeue::Entry) -> io::Result<usize> {
        let res = RING.with(|cell| -> io::Result<i32> {
            let mut slot = cell.borrow_mut();
            let token = NEXT_TOKEN.with(|t| {
                let token = t.get();
                t.set(token.wrapping_add(1));
                token
            });
            let ring = ensure_ring(&mut slot)?;
            let entry = entry.user_data(token);
            // SAFETY: the caller guarantees the entry's buffers outlive this
            // call, and we do not return while the kernel may still use them.
            unsafe { ring.submission().push(&entry) }
                .map_err(|_| io::Error::other("io_uring submission queue full"))?;
            loop {
                if let Err(e) = ring.submit_and_wait(1) {
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::EAGAIN | libc::EBUSY) => {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            continue;
                        }
                        _ if ring.submission().is_empty() => {
                            // The kernel took the entry: its buffer is in
                            // use until the completion arrives. Keep waiting.
                            tracing::warn!(error = %e, "io_uring wait failed; retrying");
                            std::thread::sleep(std::time::Duration::from_millis(1));
                            continue;
                        }
                        _ => {
                            // Never submitted: drop this thread's ring (and
                            // with it the queued entry) and report.
                            *slot = None;
                            return Err(e);
                        }
                    }
                }
                // Completions of earlier calls cannot be pending (every call
                // waits for its own), but match by token regardless.
                if let Some(cqe) = ring.completion().find(|c| c.user_data() == token) {
                    return Ok(cqe.result());
                }
            }
        })?;
        self.operations.fetch_add(1, Ordering::Relaxed);
        usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res))
    }

    /// Read exactly `buf.len()` bytes at `offset` (bytes past the end of a file read as zeros).
    pub fn read_exact(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let len = u32::try_from(rest.len()).unwrap_or(1 << 30);
            let entry = opcode::Read::new(types::Fd(fd), rest.as_mut_ptr(), len)
                .offset(offset + done as u64)
                .build();
            // SAFETY: `rest` is borrowed mutably for the whole call.
            let n = unsafe { self.call(entry) }?;
            if n == 0 {
                rest.fill(0);
                return Ok(());
            }
            done += n;
        }
        Ok(())
    }

    /// Write all of `buf` at `offset`; with `dsync`, durable before returning (FUA).
    pub fn write_all(&self, fd: RawFd, buf: &[u8], offset: u64, dsync: bool) -> io::Result<()> {
        let mut done = 0;
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        while done < buf.len() {
            let rest = &buf[done..];
            let len = u32::try_from(rest.len()).unwrap_or(1 << 30);
            let entry = opcode::Write::new(types::Fd(fd), rest.as_ptr(), len)
                .offset(offset + done as u64)
                .rw_flags(flags)
                .build();
            // SAFETY: `rest` is borrowed for the whole call.
            let n = unsafe { self.call(entry) }?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "backing device took no bytes",
                ));
            }
            done += n;
        }
        Ok(())
    }

    /// fdatasync (or fsync) through the ring.
    pub fn sync(&self, fd: RawFd, datasync: bool) -> io::Result<()> {
        let flags = if datasync {
            types::FsyncFlags::DATASYNC
        } else {
            types::FsyncFlags::empty()
        };
        let entry = opcode::Fsync::new(types::Fd(fd)).flags(flags).build();
        // SAFETY: no buffers.
        unsafe { self.call(entry) }.map(drop)
    }

    /// fallocate (punch hole, zero range) through the ring.
    pub fn fallocate(&self, fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let entry = opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build();
        // SAFETY: no buffers.
        unsafe { self.call(entry) }.map(drop)
    }
}

fn ensure_ring(slot: &mut Option<IoUring>) -> io::Result<&mut IoUring> {
    if slot.is_none() {
        *slot = Some(IoUring::new(QUEUE_DEPTH)?);
    }
    Ok(slot.as_mut().expect("just set"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("ferry-uring-{name}-{}", std::process::id()))
    }

    #[test]
    fn write_read_sync_and_punch_through_the_ring() {
        let path = scratch("rw");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let uring = Uring::start().unwrap();
        let fd = file.as_raw_fd();
        let data: Vec<u8> = (0..1u32 << 20)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        uring.write_all(fd, &data, 4096, false).unwrap();
        uring.write_all(fd, &data[..512], 0, true).unwrap();
        uring.sync(fd, true).unwrap();
        let mut back = vec![0u8; data.len()];
        uring.read_exact(fd, &mut back, 4096).unwrap();
        assert!(back == data);
        uring
            .fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                4096,
                8192,
            )
            .unwrap();
        let mut hole = vec![1u8; 8192];
        file.read_exact_at(&mut hole, 4096).unwrap();
        assert!(hole.iter().all(|&b| b == 0));
        // Reading past the end of the file gives zeros, not an error.
        let mut tail = vec![1u8; 4096];
        uring.read_exact(fd, &mut tail, 1 << 30).unwrap();
        assert!(tail.iter().all(|&b| b == 0));
        assert!(uring.operations() >= 5);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn many_threads_each_with_their_ring() {
        let path = scratch("mt");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let uring = Uring::start().unwrap();
        let fd = file.as_raw_fd();
        std::thread::scope(|s| {
            for t in 0..8u8 {
                let uring = &uring;
                s.spawn(move || {
                    for i in 0..200u64 {
                        let buf = vec![t; 4096];
                        let off = (u64::from(t) * 200 + i) * 4096;
                        uring.write_all(fd, &buf, off, false).unwrap();
                        let mut back = vec![0u8; 4096];
                        uring.read_exact(fd, &mut back, off).unwrap();
                        assert!(back.iter().all(|&b| b == t));
                    }
                });
            }
        });
        assert_eq!(uring.operations(), 8 * 200 * 2);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn errors_come_back_as_io_errors() {
        let uring = Uring::start().unwrap();
        let e = uring.sync(-1, true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
    }
}
