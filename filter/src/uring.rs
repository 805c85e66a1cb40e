//! Backing-device I/O through io_uring.
//!
//! One engine thread owns the ring. Callers (one thread per NBD connection)
//! hand it an operation on a buffer they keep borrowed and block until the
//! completion is reaped, so a buffer stays owned (and alive) for as long as
//! the kernel may touch it. New submissions wake the engine through an
//! eventfd that the engine keeps a read armed on inside the ring.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};

/// user_data of the eventfd read that wakes the engine.
const WAKE_TOKEN: u64 = u64::MAX;
/// Submission queue entries.
const QUEUE_DEPTH: u32 = 256;

/// One backing-device operation.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read {
        fd: RawFd,
        ptr: *mut u8,
        len: u32,
        offset: u64,
    },
    Write {
        fd: RawFd,
        ptr: *const u8,
        len: u32,
        offset: u64,
        dsync: bool,
    },
    Fsync {
        fd: RawFd,
        datasync: bool,
    },
    Fallocate {
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
    },
}

// SAFETY: the raw pointers in an Op refer to a buffer that the submitting
// thread keeps borrowed, and does not touch, until the operation's
// completion has been delivered back to it (see `Uring::run`).
unsafe impl Send for Op {}

/// Where the engine delivers a result (a negative errno or a byte count).
#[derive(Debug, Default)]
struct Slot {
    result: Mutex<Option<i32>>,
    ready: Condvar,
}

struct Request {
    op: Op,
    slot: Arc<Slot>,
}

/// Handle to the io_uring engine thread; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Uring {
    tx: Mutex<mpsc::Sender<Request>>,
    wake: OwnedFd,
    engine: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").field("op", &self.op).finish()
    }
}

thread_local! {
    /// Each caller thread reuses one completion slot (one operation in flight per thread).
    static SLOT: Arc<Slot> = Arc::new(Slot::default());
}

impl Uring {
    /// Start the engine thread.
    pub fn start(name: &str) -> io::Result<Arc<Uring>> {
        let ring = IoUring::new(QUEUE_DEPTH)?;
        // SAFETY: eventfd has no memory-safety preconditions; the returned
        // descriptor (checked below) is owned by the OwnedFd.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let (tx, rx) = mpsc::channel();
        let wake_fd = wake.as_raw_fd();
        let engine = std::thread::Builder::new()
            .name(format!("uring-{name}"))
            .spawn(move || run(ring, rx, wake_fd))?;
        Ok(Arc::new(Uring {
            tx: Mutex::new(tx),
            wake,
            engine: Mutex::new(Some(engine)),
        }))
    }

    /// Submit `op` and wait for its result.
    fn call(&self, op: Op) -> io::Result<usize> {
        SLOT.with(|slot| {
            *slot.result.lock().expect("slot lock") = None;
            let request = Request {
                op,
                slot: Arc::clone(slot),
            };
            self.tx
                .lock()
                .expect("sender lock")
                .send(request)
                .map_err(|_| io::Error::other("io_uring engine stopped"))?;
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
            let n =
                unsafe { libc::write(self.wake.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
            if n != 8 {
                // The engine may still pick the request up on its next wake;
                // waiting below stays correct either way.
                tracing::warn!(error = %io::Error::last_os_error(), "eventfd write failed");
            }
            let mut result = slot.result.lock().expect("slot lock");
            // The buffer behind `op` is borrowed by our caller until this
            // returns: never return before the completion arrived.
            while result.is_none() {
                result = slot.ready.wait(result).expect("slot lock");
            }
            let res = result.take().expect("checked above");
            usize::try_from(res).map_err(|_| io::Error::from_raw_os_error(-res))
        })
    }

    /// Read exactly `buf.len()` bytes at `offset` (bytes past the end of a file read as zeros).
    pub fn read_exact(&self, fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let len = u32::try_from(rest.len()).unwrap_or(!4095);
            let n = self.call(Op::Read {
                fd,
                ptr: rest.as_mut_ptr(),
                len,
                offset: offset + done as u64,
            })?;
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
        while done < buf.len() {
            let rest = &buf[done..];
            let len = u32::try_from(rest.len()).unwrap_or(!4095);
            let n = self.call(Op::Write {
                fd,
                ptr: rest.as_ptr(),
                len,
                offset: offset + done as u64,
                dsync,
            })?;
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
        self.call(Op::Fsync { fd, datasync }).map(drop)
    }

    /// fallocate (punch hole, zero range) through the ring.
    pub fn fallocate(&self, fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        self.call(Op::Fallocate {
            fd,
            mode,
            offset,
            len,
        })
        .map(drop)
    }

    /// Stop the engine after the operations already submitted complete.
    pub fn stop(&self) {
        // Replacing the sender drops the only one: the engine drains and exits.
        let (dead, _) = mpsc::channel();
        *self.tx.lock().expect("sender lock") = dead;
        let one: u64 = 1;
        // SAFETY: as in `call`.
        unsafe { libc::write(self.wake.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
        if let Some(engine) = self.engine.lock().expect("engine lock").take() {
            let _ = engine.join();
        }
    }
}

/// The engine: move requests into the submission queue, reap completions.
fn run(mut ring: IoUring, rx: mpsc::Receiver<Request>, wake_fd: RawFd) {
    let mut wake_buf = [0u8; 8];
    let mut in_flight: HashMap<u64, Arc<Slot>> = HashMap::new();
    let mut backlog: Vec<Request> = Vec::new();
    let mut next_id = 0u64;
    let mut wake_armed = false;
    let mut closed = false;
    loop {
        if !wake_armed && !closed {
            let read = opcode::Read::new(types::Fd(wake_fd), wake_buf.as_mut_ptr(), 8)
                .build()
                .user_data(WAKE_TOKEN);
            // SAFETY: `wake_buf` lives on this thread's stack for the whole
            // loop, which outlives every submission made from it.
            if unsafe { ring.submission().push(&read) }.is_ok() {
                wake_armed = true;
            }
        }
        loop {
            match rx.try_recv() {
                Ok(req) => backlog.push(req),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut pushed = Vec::new();
        for req in backlog.drain(..) {
            let id = next_id;
            next_id = next_id.wrapping_add(1) % WAKE_TOKEN;
            let entry = build(req.op).user_data(id);
            // SAFETY: the buffers named by the entry stay borrowed by the
            // submitting thread until we deliver this entry's completion.
            if unsafe { ring.submission().push(&entry) }.is_err() {
                pushed.push(req);
                continue;
            }
            in_flight.insert(id, req.slot);
        }
        backlog = pushed;
        if closed && in_flight.is_empty() && backlog.is_empty() {
            return;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) && e.raw_os_error() != Some(libc::EBUSY) {
                tracing::error!(error = %e, "io_uring submit failed");
            }
        }
        for cqe in ring.completion() {
            if cqe.user_data() == WAKE_TOKEN {
                wake_armed = false;
                continue;
            }
            if let Some(slot) = in_flight.remove(&cqe.user_data()) {
                *slot.result.lock().expect("slot lock") = Some(cqe.result());
                slot.ready.notify_one();
            }
        }
    }
}

fn build(op: Op) -> io_uring::squeue::Entry {
    match op {
        Op::Read {
            fd,
            ptr,
            len,
            offset,
        } => opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build(),
        Op::Write {
            fd,
            ptr,
            len,
            offset,
            dsync,
        } => {
            let flags = if dsync { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(types::Fd(fd), ptr, len)
                .offset(offset)
                .rw_flags(flags)
                .build()
        }
        Op::Fsync { fd, datasync } => {
            let flags = if datasync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            opcode::Fsync::new(types::Fd(fd)).flags(flags).build()
        }
        Op::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => opcode::Fallocate::new(types::Fd(fd), len)
            .offset(offset)
            .mode(mode)
            .build(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let uring = Uring::start("test").unwrap();
        let fd = file.as_raw_fd();
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
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
        uring.stop();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn many_threads_share_one_engine() {
        let path = scratch("mt");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let uring = Uring::start("test-mt").unwrap();
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
        uring.stop();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn errors_come_back_as_io_errors() {
        let uring = Uring::start("test-err").unwrap();
        let e = uring.sync(-1, true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        uring.stop();
    }
}
