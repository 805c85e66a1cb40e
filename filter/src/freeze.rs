//! App-consistent points: freeze file systems (FIFREEZE), run the user's
//! pre/post scripts, and thaw, always and within a deadline.
//!
//! A frozen file system blocks its writers, so a watchdog thread thaws
//! everything when the deadline passes even if the caller is stuck; and
//! because the file systems usually live on disks this filter serves, the
//! caller must freeze *before* it holds back the disks' write path (the
//! freeze itself flushes through it).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, ErrorKind, Result};

/// `_IOWR('X', 119, int)`: freeze a file system (linux/fs.h).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
/// `_IOWR('X', 120, int)`: thaw it.
const FITHAW: libc::c_ulong = 0xC004_5878;

/// File systems frozen by this process, thawed on drop or at the deadline.
#[derive(Debug)]
pub struct Frozen {
    inner: Arc<FrozenInner>,
    started: Instant,
}

#[derive(Debug)]
struct FrozenInner {
    mounts: Mutex<Vec<(PathBuf, File)>>,
    thawed: AtomicBool,
}

impl FrozenInner {
    /// Thaw every file system still frozen; idempotent.
    fn thaw_all(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let mut mounts = self.mounts.lock().expect("frozen lock");
        for (path, dir) in mounts.drain(..).rev() {
            if let Err(e) = ioctl(&dir, FITHAW) {
                errors.push(format!("thaw {}: {e}", path.display()));
            }
        }
        self.thawed.store(true, Ordering::SeqCst);
        errors
    }
}

fn ioctl(dir: &File, request: libc::c_ulong) -> std::io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE/FITHAW take an int argument (unused by the kernel);
    // we pass a pointer to a live local int and a descriptor we own.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request, &mut arg) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Frozen {
    /// Freeze `mounts` in order; on failure thaw the ones already frozen.
    /// Whatever happens, everything is thawed `deadline` after the call.
    pub fn freeze(mounts: &[PathBuf], deadline: Duration) -> Result<Frozen> {
        let inner = Arc::new(FrozenInner {
            mounts: Mutex::new(Vec::new()),
            thawed: AtomicBool::new(false),
        });
        for mount in mounts {
            let dir =
                File::open(mount).map_err(|e| Error::io(e, "open mount point").with_path(mount))?;
            if let Err(e) = ioctl(&dir, FIFREEZE) {
                inner.thaw_all();
                return Err(Error::io(e, "FIFREEZE").with_path(mount));
            }
            inner
                .mounts
                .lock()
                .expect("frozen lock")
                .push((mount.clone(), dir));
        }
        let watchdog = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("freeze-watchdog".into())
            .spawn(move || {
                let end = Instant::now() + deadline;
                while !watchdog.thawed.load(Ordering::SeqCst) {
                    if Instant::now() >= end {
                        let errors = watchdog.thaw_all();
                        tracing::warn!(
                            ?errors,
                            "freeze deadline passed: file systems thawed by the watchdog"
                        );
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .map_err(|e| {
                inner.thaw_all();
                Error::io(e, "start freeze watchdog")
            })?;
        Ok(Frozen {
            inner,
            started: Instant::now(),
        })
    }

    /// Thaw now; returns how long the file systems were frozen.
    pub fn thaw(self) -> Result<Duration> {
        let frozen_for = self.started.elapsed();
        let errors = self.inner.thaw_all();
        if errors.is_empty() {
            Ok(frozen_for)
        } else {
            Err(Error::new(ErrorKind::Io, errors.join("; ")))
        }
    }

    /// Whether the watchdog already thawed (the deadline passed).
    pub fn expired(&self) -> bool {
        self.inner.thawed.load(Ordering::SeqCst)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.inner.thaw_all();
    }
}

/// Run `sh -c COMMAND`, killing it at `timeout`. Fails on a non-zero exit.
pub fn run_script(what: &str, command: &str, timeout: Duration) -> Result<()> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| Error::io(e, what))?;
    let end = Instant::now() + timeout;
    loop {
        match child.try_wait().map_err(|e| Error::io(e, what))? {
            Some(status) if status.success() => return Ok(()),
            Some(status) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("{what} script `{command}` failed: {status}"),
                ))
            }
            None if Instant::now() >= end => {
                kill(&mut child);
                return Err(Error::new(
                    ErrorKind::Io,
                    format!("{what} script `{command}` did not finish within {timeout:?}: killed"),
                ));
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether `path` is a mount point (its device differs from its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Ok(parent)) = (std::fs::metadata(path), std::fs::metadata(path.join(".."))) else {
        return false;
    };
    me.dev() != parent.dev() || me.ino() == parent.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_succeed_fail_and_time_out() {
        run_script("pre", "true", Duration::from_secs(5)).unwrap();
        let e = run_script("pre", "exit 3", Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("failed"), "{e}");
        let started = Instant::now();
        let e = run_script("post", "sleep 30", Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains("killed"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn freezing_a_missing_mount_fails_cleanly() {
        // Real freezes are exercised by the rig tier on a loop-mounted file
        // system; never freeze the build machine's own file systems here.
        let missing = std::env::temp_dir().join("ferry-does-not-exist");
        let e = Frozen::freeze(&[missing], Duration::from_secs(1)).unwrap_err();
        assert!(e.to_string().contains("open mount point"), "{e}");
    }
}
