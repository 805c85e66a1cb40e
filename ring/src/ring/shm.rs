//! The shared mapping, the static header, file locks, futex wake-ups.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::layout::*;
use super::record::{get_u32, get_u64, put_u32, put_u64};
use crate::error::{Error, Result};

/// Nanoseconds since the Unix epoch: the clock of record timestamps and of
/// the lag's age.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

// Small layout constants as u32 (checked to fit at compile time).
#[allow(clippy::cast_possible_truncation)]
const HEADER_SIZE_U32: u32 = HEADER_SIZE as u32;
#[allow(clippy::cast_possible_truncation)]
const RECORD_SIZE_U32: u32 = RECORD_SIZE as u32;
#[allow(clippy::cast_possible_truncation)]
const PAYLOAD_ALIGN_U32: u32 = PAYLOAD_ALIGN as u32;
const _: () =
    assert!(HEADER_SIZE_U32 as usize == HEADER_SIZE && RECORD_SIZE_U32 as usize == RECORD_SIZE);
const _: () = assert!(PAYLOAD_ALIGN_U32 as u64 == PAYLOAD_ALIGN);

/// A `MAP_SHARED` read-write mapping of a whole ring file.
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value until drop; all
// concurrent access to it (from any thread or process) goes through atomics
// (the cache-line counters) or through regions that the ring protocol hands
// to exactly one party at a time (record slots, payload regions), and the
// users of `base()` state that argument where they make references.
unsafe impl Send for Mapping {}
// SAFETY: as for Send: `&Mapping` only exposes atomics and raw pointers.
unsafe impl Sync for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl Mapping {
    /// Map `len` bytes of `file` read-write, shared. `len` must cover the header.
    pub(crate) fn map(file: &File, len: usize) -> io::Result<Mapping> {
        if len < HEADER_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mapping shorter than the header",
            ));
        }
        // SAFETY: a fresh mapping at an address the kernel picks (null hint)
        // of a valid descriptor; it aliases no Rust object. The result is
        // checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Mapping { ptr, len })
    }

    /// The first byte of the mapping (page aligned).
    pub(crate) fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The atomic `u64` at header offset `OFF` (a layout constant).
    pub(crate) fn u64_at<const OFF: usize>(&self) -> &AtomicU64 {
        const { assert!(OFF.is_multiple_of(8) && OFF + 8 <= HEADER_SIZE) };
        // SAFETY: OFF + 8 <= HEADER_SIZE <= len (checked in `map`), so the
        // word is inside the mapping; the mapping is page aligned and OFF is
        // a multiple of 8, so the pointer is aligned for AtomicU64. The memory
        // stays mapped while `self` lives, which bounds the returned lifetime.
        // Every process accesses these counter words only atomically.
        unsafe { AtomicU64::from_ptr(self.base().add(OFF).cast::<u64>()) }
    }

    /// The atomic `u32` at header offset `OFF` (a layout constant).
    pub(crate) fn u32_at<const OFF: usize>(&self) -> &AtomicU32 {
        const { assert!(OFF.is_multiple_of(4) && OFF + 4 <= HEADER_SIZE) };
        // SAFETY: as in `u64_at`, with 4-byte alignment.
        unsafe { AtomicU32::from_ptr(self.base().add(OFF).cast::<u32>()) }
    }

    /// Copy `buf.len()` bytes at `off` out of the mapping; false if out of bounds.
    pub(crate) fn read_at(&self, off: usize, buf: &mut [u8]) -> bool {
        if off
            .checked_add(buf.len())
            .filter(|&end| end <= self.len)
            .is_none()
        {
            return false;
        }
        // SAFETY: the range is inside the mapping (checked above) and `buf`
        // is a distinct Rust buffer. Callers only read ranges that the
        // protocol keeps still (a published, uncommitted slot; the static header).
        unsafe { std::ptr::copy_nonoverlapping(self.base().add(off), buf.as_mut_ptr(), buf.len()) };
        true
    }

    /// Copy `buf` into the mapping at `off`; false if out of bounds.
    pub(crate) fn write_at(&self, off: usize, buf: &[u8]) -> bool {
        if off
            .checked_add(buf.len())
            .filter(|&end| end <= self.len)
            .is_none()
        {
            return false;
        }
        // SAFETY: the range is inside the mapping (checked above). Callers
        // only write ranges the protocol gives them exclusively (the header
        // before the file is published under its name; a free record slot).
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.base().add(off), buf.len()) };
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing borrows the
        // mapping any more (borrows are tied to `&self`, and payload slots
        // hold an `Arc` of the owner).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The static header, decoded and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub slots: u32,
    pub payload_bytes: u64,
    pub disk_size: u64,
    pub generation: u64,
    pub created_ns: u64,
    pub disk_name: String,
}

impl Header {
    pub(crate) fn payload_offset(&self) -> u64 {
        payload_offset(self.slots)
    }

    pub(crate) fn file_len(&self) -> u64 {
        file_len(self.slots, self.payload_bytes)
    }

    /// The static header bytes (crc included).
    pub(crate) fn encode(&self) -> [u8; H_STATIC_END] {
        let mut b = [0u8; H_STATIC_END];
        b[H_MAGIC..H_MAGIC + 8].copy_from_slice(&MAGIC);
        put_u32(&mut b, H_VERSION, VERSION);
        put_u32(&mut b, H_HEADER_SIZE, HEADER_SIZE_U32);
        put_u32(&mut b, H_RECORD_SIZE, RECORD_SIZE_U32);
        put_u32(&mut b, H_SLOTS, self.slots);
        put_u64(&mut b, H_PAYLOAD_BYTES, self.payload_bytes);
        put_u64(&mut b, H_DISK_SIZE, self.disk_size);
        put_u64(&mut b, H_GENERATION, self.generation);
        put_u64(&mut b, H_CREATED_NS, self.created_ns);
        put_u64(&mut b, H_SLOTS_OFFSET, HEADER_SIZE as u64);
        put_u64(&mut b, H_PAYLOAD_OFFSET, self.payload_offset());
        put_u32(&mut b, H_PAYLOAD_ALIGN, PAYLOAD_ALIGN_U32);
        put_u32(&mut b, H_FLAGS, 0);
        let name = self.disk_name.as_bytes();
        b[H_DISK_NAME..H_DISK_NAME + name.len()].copy_from_slice(name);
        let crc = crc32c::crc32c(&b[..H_HEADER_CRC]);
        put_u32(&mut b, H_HEADER_CRC, crc);
        b
    }

    /// Decode and check the header page of a file `file_len` bytes long.
    pub(crate) fn decode(b: &[u8], file_len: u64) -> Result<Header> {
        let bad = |off: usize, what: String| Error::corrupt(what).at_offset(off as u64);
        if b.len() < H_STATIC_END {
            return Err(bad(0, "file shorter than the ring header".into()));
        }
        if b[H_MAGIC..H_MAGIC + 8] != MAGIC {
            return Err(bad(H_MAGIC, "not a ferry ring (bad magic)".into()));
        }
        let version = get_u32(b, H_VERSION);
        if version != VERSION {
            return Err(bad(
                H_VERSION,
                format!("ring format version {version}, expected {VERSION}"),
            ));
        }
        let crc = get_u32(b, H_HEADER_CRC);
        let want = crc32c::crc32c(&b[..H_HEADER_CRC]);
        if crc != want {
            return Err(bad(
                H_HEADER_CRC,
                format!("header crc32c {crc:#010x}, computed {want:#010x}"),
            ));
        }
        let check_u32 = |off: usize, want: u32, what: &str| {
            let got = get_u32(b, off);
            if got == want {
                Ok(())
            } else {
                Err(bad(off, format!("{what} {got}, expected {want}")))
            }
        };
        check_u32(H_HEADER_SIZE, HEADER_SIZE_U32, "header size")?;
        check_u32(H_RECORD_SIZE, RECORD_SIZE_U32, "record size")?;
        check_u32(H_PAYLOAD_ALIGN, PAYLOAD_ALIGN_U32, "payload alignment")?;
        check_u32(H_FLAGS, 0, "header flags")?;
        let slots = get_u32(b, H_SLOTS);
        if !slots.is_power_of_two() || !(MIN_SLOTS..=MAX_SLOTS).contains(&slots) {
            return Err(bad(
                H_SLOTS,
                format!("record slots {slots}: not a power of two in {MIN_SLOTS}..={MAX_SLOTS}"),
            ));
        }
        let payload_bytes = get_u64(b, H_PAYLOAD_BYTES);
        if !payload_bytes.is_multiple_of(PAYLOAD_ALIGN)
            || !(MIN_PAYLOAD_BYTES..=MAX_PAYLOAD_BYTES).contains(&payload_bytes)
        {
            return Err(bad(
                H_PAYLOAD_BYTES,
                format!("payload area of {payload_bytes} bytes is out of bounds"),
            ));
        }
        let slots_off = get_u64(b, H_SLOTS_OFFSET);
        if slots_off != HEADER_SIZE as u64 {
            return Err(bad(
                H_SLOTS_OFFSET,
                format!("record slots at {slots_off}, expected {HEADER_SIZE}"),
            ));
        }
        let pay_off = get_u64(b, H_PAYLOAD_OFFSET);
        if pay_off != payload_offset(slots) {
            return Err(bad(
                H_PAYLOAD_OFFSET,
                format!(
                    "payload area at {pay_off}, expected {}",
                    payload_offset(slots)
                ),
            ));
        }
        let name_bytes = &b[H_DISK_NAME..H_DISK_NAME + MAX_DISK_NAME];
        let name_len = name_bytes
            .iter()
            .position(|&c| c == 0)
            .unwrap_or(MAX_DISK_NAME);
        if name_bytes[name_len..].iter().any(|&c| c != 0) {
            return Err(bad(
                H_DISK_NAME,
                "disk name has bytes after its NUL padding".into(),
            ));
        }
        let disk_name = std::str::from_utf8(&name_bytes[..name_len])
            .map_err(|_| bad(H_DISK_NAME, "disk name is not UTF-8".into()))?
            .to_owned();
        let h = Header {
            slots,
            payload_bytes,
            disk_size: get_u64(b, H_DISK_SIZE),
            generation: get_u64(b, H_GENERATION),
            created_ns: get_u64(b, H_CREATED_NS),
            disk_name,
        };
        if file_len != h.file_len() {
            return Err(Error::corrupt(format!(
                "ring file is {file_len} bytes, its header says {}",
                h.file_len()
            ))
            .at_offset(file_len.min(h.file_len())));
        }
        Ok(h)
    }
}

/// Open an existing ring file read-write, check its header, map it.
pub(crate) fn open_ring(path: &Path) -> Result<(File, Header, Mapping)> {
    let inner = || -> Result<(File, Header, Mapping)> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(e, "open ring"))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(e, "stat ring"))?
            .len();
        let mut page = vec![0u8; HEADER_SIZE];
        if len < HEADER_SIZE as u64 {
            return Err(Error::corrupt(format!(
                "ring file is {len} bytes, shorter than its header"
            ))
            .at_offset(len));
        }
        file.read_exact_at(&mut page, 0)
            .map_err(|e| Error::io(e, "read ring header"))?;
        let header = Header::decode(&page, len)?;
        let map_len = usize::try_from(len)
            .map_err(|_| Error::corrupt("ring larger than the address space"))?;
        let map = Mapping::map(&file, map_len).map_err(|e| Error::io(e, "mmap ring"))?;
        Ok((file, header, map))
    };
    inner().map_err(|e| e.at_path(path))
}

/// Which lock byte each role holds (open-file-description locks).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    Producer,
    Consumer,
}

/// Take the role's exclusive lock on the ring file, without waiting. Held
/// until `file` is closed, released by the kernel when the process dies.
pub(crate) fn lock_role(file: &File, role: Role) -> Result<()> {
    let (start, who) = match role {
        Role::Producer => (0, "producer"),
        Role::Consumer => (1, "consumer"),
    };
    // SAFETY: `flock` is a plain C struct for which all-zero bytes are valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::c_short::try_from(libc::F_WRLCK).unwrap_or(1);
    fl.l_whence = libc::c_short::try_from(libc::SEEK_SET).unwrap_or(0);
    fl.l_start = start;
    fl.l_len = 1;
    // SAFETY: a valid open descriptor and a pointer to an initialized flock
    // that outlives the call.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_OFD_SETLK,
            &fl as *const libc::flock,
        )
    };
    if rc == -1 {
        let e = io::Error::last_os_error();
        let busy = matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES));
        let op = if busy {
            format!("lock ring: another {who} is attached")
        } else {
            format!("lock ring for the {who}")
        };
        return Err(Error::io(e, &op));
    }
    Ok(())
}

/// A fresh generation: random, with a time/pid fallback.
pub(crate) fn new_generation() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(mut f) = File::open("/dev/urandom") {
        if f.read_exact(&mut b).is_ok() {
            let g = u64::from_le_bytes(b);
            if g != 0 {
                return g;
            }
        }
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    (now_ns() ^ (u64::from(std::process::id()) << 40) ^ c.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1
}

/// Wake one waiter on `word` (any process mapping it).
pub(crate) fn futex_wake(word: &AtomicU32) {
    #[cfg(target_os = "linux")]
    // SAFETY: FUTEX_WAKE on the address of a live, aligned u32; the kernel
    // only uses the address as a key. Shared (non-private) futex on purpose:
    // the waiter is another process mapping the same file.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, 1i32);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = word;
}

/// Sleep on `word` while it holds `expected`, at most `timeout`.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    #[cfg(target_os = "linux")]
    {
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
        };
        // SAFETY: FUTEX_WAIT on a live, aligned u32 with a pointer to a
        // timespec that outlives the call; it returns on wake, timeout,
        // signal or when the word no longer holds `expected`.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &ts as *const libc::timespec,
                std::ptr::null::<u32>(),
                0i32,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (word, expected);
        std::thread::sleep(timeout.min(Duration::from_millis(1)));
    }
}
