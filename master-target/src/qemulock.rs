//! Whether a qemu process (a virtual machine, qemu-nbd, qemu-img) has an
//! image open for writing, read from the locks qemu takes on it.
//!
//! qemu's file driver (`block/file-posix.c`) holds open-file-description
//! locks on single bytes of every image file it opens: a shared lock on
//! byte `100 + i` for each permission bit `i` it uses, and on byte
//! `200 + i` for each permission it does not share with other users. The
//! write permission is bit 1, so a writer holds byte 101, and a writer that
//! lets nobody else write (the default) holds byte 201 too. Asking the
//! kernel whether an exclusive lock on those bytes would conflict
//! (`F_OFD_GETLK`) tells without taking anything.
//!
//! ferry writes an adopted image in place: it must not be one a running
//! machine writes too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// qemu's byte for "uses the permission" (`RAW_LOCK_PERM_BASE`).
pub const PERM_BASE: i64 = 100;
/// qemu's byte for "does not share the permission" (`RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: i64 = 200;
/// The write permission's bit (`BLK_PERM_WRITE` = 1 << 1).
pub const WRITE_BIT: i64 = 1;

/// A lock constant as the `flock` field type (they are all small; an
/// impossible value becomes -1, which fcntl refuses).
fn short(v: libc::c_int) -> libc::c_short {
    libc::c_short::try_from(v).unwrap_or(-1)
}

/// Whether some process holds a lock on byte `byte` of `file` that an
/// exclusive lock would conflict with.
fn byte_locked(file: &File, byte: i64) -> std::io::Result<bool> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = short(libc::F_WRLCK);
    lock.l_whence = short(libc::SEEK_SET);
    lock.l_start = byte;
    lock.l_len = 1;
    // SAFETY: F_OFD_GETLK reads and writes the `flock` we own for the
    // call; the descriptor is open for its duration.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lock.l_type != short(libc::F_UNLCK))
}

/// Whether a qemu process has the image file at `path` open for writing.
pub fn held_for_writing(path: &Path) -> Result<bool> {
    let file = File::open(path).map_err(|e| Error::io("probe qemu's locks", path, e))?;
    for byte in [PERM_BASE + WRITE_BIT, SHARED_BASE + WRITE_BIT] {
        if byte_locked(&file, byte).map_err(|e| Error::io("probe qemu's locks", path, e))? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Refuse to write `path` in place while a qemu process writes it.
pub fn refuse_if_in_use(path: &Path, op: &'static str) -> Result<()> {
    if held_for_writing(path)? {
        return Err(Error::new(
            crate::error::ErrorKind::InvalidInput,
            op,
            format!(
                "{} is open for writing by another program (it holds qemu's write lock: a \
                 virtual machine or qemu-nbd): stop it first",
                path.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    /// Take qemu's shared lock on `byte` through a descriptor of our own.
    fn lock_like_qemu(file: &File, byte: i64) {
        // SAFETY: as in `byte_locked`; F_OFD_SETLK with a lock we own.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = short(libc::F_RDLCK);
        lock.l_whence = short(libc::SEEK_SET);
        lock.l_start = byte;
        lock.l_len = 1;
        // SAFETY: see above.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    #[test]
    fn a_writer_lock_is_seen_and_a_reader_lock_is_not() {
        let tmp = TempDir::new("qemulock");
        let path = tmp.path().join("disk.vmdk");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        assert!(!held_for_writing(&path).unwrap());
        // A reader (qemu-img info): consistent-read only, byte 100.
        let reader = File::open(&path).unwrap();
        lock_like_qemu(&reader, PERM_BASE);
        assert!(!held_for_writing(&path).unwrap());
        // A writer: byte 101; one that shares no writing: byte 201 too.
        let writer = File::open(&path).unwrap();
        lock_like_qemu(&writer, SHARED_BASE + WRITE_BIT);
        assert!(held_for_writing(&path).unwrap());
        let e = refuse_if_in_use(&path, "reprotect").unwrap_err();
        assert!(e.to_string().contains("qemu's write lock"), "{e}");
        drop(writer);
        assert!(!held_for_writing(&path).unwrap());
        let writer = File::open(&path).unwrap();
        lock_like_qemu(&writer, PERM_BASE + WRITE_BIT);
        assert!(held_for_writing(&path).unwrap());
        assert!(held_for_writing(&tmp.path().join("missing")).is_err());
    }
}
