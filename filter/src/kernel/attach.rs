//! Serving protected disks to the kernel's own NBD client as `/dev/nbdN`.
//!
//! One [`Link`] per attached disk: a thread named `nbd-kernel-DISK` serves
//! one end of a unix socket pair in transmission mode while the kernel
//! holds the other. The link survives the things a block device in a write
//! path must survive:
//! - **filter restart**: the device is recorded in
//!   `STATE/disks/DISK/kernel-nbd`; a new filter finds it still configured
//!   with its backend identifier and hands the kernel a new socket with
//!   `NBD_CMD_RECONFIGURE`. The kernel requeues what was in flight, so a
//!   write may be executed twice (same data, same place: harmless; the
//!   ring records it twice, in order).
//! - **a timed-out request**: the kernel shuts our socket down and waits
//!   for a new one; the link reconfigures while the filter runs.
//!
//! On a clean stop a device nothing uses is disconnected; one that is
//! mounted or held by a device-mapper table is left configured, waiting
//! for the next filter (a restart must not fail the file system).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::nbd_netlink::{self, Attach, Nbd};
use crate::error::{Error, Result};
use crate::nbd::{self, Backend, ServeOptions};

/// Where the kernel's block devices are described.
const SYS_BLOCK: &str = "/sys/block";
/// The file (under the disk's state directory) naming its device.
const RECORD: &str = "kernel-nbd";
/// Pause between reconnection attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// How long a clean stop waits for the kernel's disconnect to end a link.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Kernel NBD settings shared by every attached disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A request unanswered this long is requeued on a new connection.
    pub request: Duration,
    /// How long the kernel waits for a new connection (a filter restart)
    /// before failing requests.
    pub dead_connection: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request: Duration::from_secs(30),
            dead_connection: Duration::from_secs(120),
        }
    }
}

/// What to attach: a disk and the device it should be (None: any free one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Disk name (its export).
    pub disk: String,
    /// `/dev/nbdN` to use; None picks a free device (or the recorded one).
    pub device: Option<u32>,
}

/// One disk served to the kernel.
#[derive(Debug)]
pub struct Link {
    disk: String,
    index: u32,
    record: PathBuf,
    ours: Arc<Mutex<Option<UnixStream>>>,
    stopping: Arc<AtomicBool>,
    /// Set when the link ended on its own: the device was taken away.
    lost: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Link {
    /// The device this disk is served as.
    pub fn device(&self) -> PathBuf {
        nbd_netlink::device_path(self.index)
    }

    /// The disk's name.
    pub fn disk(&self) -> &str {
        &self.disk
    }

    /// Whether the device was disconnected by someone else: the link no
    /// longer serves it and the filter should stop.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

/// The backend identifier of a disk of the filter whose state is `state`:
/// stable across restarts and across ferry versions (a mounted device must
/// be recognised by the upgraded filter), distinct between filters.
pub fn backend_id(state: &Path, disk: &str) -> String {
    format!(
        "ferry:{disk}:{:016x}",
        crate::stable_hash(state.as_os_str().as_encoded_bytes())
    )
}

/// The logical block size the kernel device gets: the backing device's
/// (512 or 4096), 512 for a file.
pub fn kernel_block_size(advertised_min: u32) -> Result<u32> {
    match advertised_min {
        0..=512 => Ok(512),
        1024 | 2048 | 4096 => Ok(advertised_min),
        other => Err(Error::config(format!(
            "block size {other} is above what the kernel's NBD client takes (4096)"
        ))),
    }
}

/// Attaches each requested disk and starts serving it.
pub fn attach_all(
    requests: &[Request],
    timeouts: Timeouts,
    backend: &Arc<dyn Backend>,
    state: &Path,
) -> Result<Vec<Link>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let mut netlink = Nbd::open().map_err(|e| Error::io(e, "kernel NBD netlink"))?;
    let mut links = Vec::new();
    for request in requests {
        match attach_one(&mut netlink, request, timeouts, backend, state) {
            Ok(link) => links.push(link),
            Err(e) => {
                // Leave nothing half attached behind.
                stop_all(links);
                return Err(e);
            }
        }
    }
    Ok(links)
}

fn attach_one(
    netlink: &mut Nbd,
    request: &Request,
    timeouts: Timeouts,
    backend: &Arc<dyn Backend>,
    state: &Path,
) -> Result<Link> {
    let disk = request.disk.as_str();
    let info = backend
        .export(disk)
        .ok_or_else(|| Error::config(format!("no disk {disk:?} to attach")))?;
    let attach = Attach {
        size: info.size,
        block_size: kernel_block_size(info.block_sizes.min)?,
        server_flags: nbd::transmission_flags(&info, false),
        timeout: timeouts.request,
        dead_conn_timeout: timeouts.dead_connection,
        backend: backend_id(state, disk),
    };
    let record = crate::disk::state_dir_of(state, disk).join(RECORD);
    let recorded = std::fs::read_to_string(&record)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    let (ours, theirs) = UnixStream::pair().map_err(|e| Error::io(e, "socketpair"))?;
    // Ours is ours alone: the device must still carry our backend
    // identifier (the kernel checks it again on reconfigure).
    let reattach = [recorded, request.device].into_iter().flatten().find(|&i| {
        nbd_netlink::backend_of(Path::new(SYS_BLOCK), i).as_deref() == Some(attach.backend.as_str())
    });
    let index = match reattach {
        Some(index) => {
            netlink
                .reconfigure(&attach, index, theirs.as_fd())
                .map_err(|e| {
                    Error::io(e, "NBD_CMD_RECONFIGURE").with_path(&nbd_netlink::device_path(index))
                })?;
            tracing::info!(disk, device = %nbd_netlink::device_path(index).display(), "reattached to the kernel's NBD device");
            index
        }
        None => {
            let index = netlink
                .connect(&attach, request.device, theirs.as_fd())
                .map_err(|e| match request.device {
                    Some(i) => {
                        Error::io(e, "NBD_CMD_CONNECT").with_path(&nbd_netlink::device_path(i))
                    }
                    None => Error::io(e, "NBD_CMD_CONNECT"),
                })?;
            tracing::info!(disk, device = %nbd_netlink::device_path(index).display(), "attached to the kernel's NBD client");
            index
        }
    };
    // The kernel holds its own reference on its end now.
    drop(theirs);
    let started = record_device(&record, index)
        .and_then(|()| start_link(disk, index, attach, ours, backend, &record));
    if started.is_err() && reattach.is_none() {
        // Nobody will serve the device we just configured: give it back.
        let _ = netlink.disconnect(index);
    }
    started
}

/// Writes the device record atomically (a crash leaves the old or the new).
fn record_device(record: &Path, index: u32) -> Result<()> {
    let tmp = record.with_extension("tmp");
    std::fs::write(&tmp, format!("{index}\n"))
        .and_then(|()| std::fs::rename(&tmp, record))
        .map_err(|e| Error::io(e, "record the NBD device").with_path(record))
}

fn start_link(
    disk: &str,
    index: u32,
    attach: Attach,
    ours: UnixStream,
    backend: &Arc<dyn Backend>,
    record: &Path,
) -> Result<Link> {
    let ours = Arc::new(Mutex::new(Some(ours)));
    let stopping = Arc::new(AtomicBool::new(false));
    let lost = Arc::new(AtomicBool::new(false));
    let thread = {
        let (ours, stopping, lost, backend) = (
            Arc::clone(&ours),
            Arc::clone(&stopping),
            Arc::clone(&lost),
            Arc::clone(backend),
        );
        let disk = disk.to_string();
        std::thread::Builder::new()
            .name(format!("nbd-kernel-{disk}"))
            .spawn(move || {
                serve_link(&disk, index, &attach, &ours, &stopping, &backend);
                if !stopping.load(Ordering::Acquire) {
                    lost.store(true, Ordering::Release);
                }
            })
            .map_err(|e| Error::io(e, "spawn thread"))?
    };
    Ok(Link {
        disk: disk.to_string(),
        index,
        record: record.to_path_buf(),
        ours,
        stopping,
        lost,
        thread: Some(thread),
    })
}

/// Serves the kernel until the link is stopped, giving the kernel a new
/// socket whenever its connection ends while the device stays ours.
fn serve_link(
    disk: &str,
    index: u32,
    attach: &Attach,
    ours: &Mutex<Option<UnixStream>>,
    stopping: &AtomicBool,
    backend: &Arc<dyn Backend>,
) {
    let mut last_warning: Option<Instant> = None;
    loop {
        let stream = ours
            .lock()
            .expect("link socket")
            .as_ref()
            .and_then(|s| s.try_clone().ok());
        if let (Some(stream), Some(export), Some(info)) =
            (stream, backend.open(disk), backend.export(disk))
        {
            // No shutdown flag: NBD_ESHUTDOWN would reach the file system
            // as an I/O error, while a closed socket makes the kernel
            // requeue for the next filter.
            let options = ServeOptions::default();
            match nbd::serve_transmission(stream, export, info, options) {
                Ok(()) => tracing::info!(disk, "the kernel disconnected the NBD device"),
                Err(e) => tracing::debug!(disk, error = %e, "kernel NBD connection ended"),
            }
        }
        if stopping.load(Ordering::Acquire) {
            return;
        }
        // Rate-limited: a kernel that keeps refusing must not flood the log.
        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!(
                disk,
                device = index,
                "kernel NBD connection lost; reconnecting"
            );
            last_warning = Some(Instant::now());
        }
        std::thread::sleep(RETRY_PAUSE);
        if nbd_netlink::backend_of(Path::new(SYS_BLOCK), index).as_deref()
            != Some(attach.backend.as_str())
        {
            tracing::error!(
                disk,
                device = index,
                "the NBD device is no longer ours (disconnected by someone else); not serving it"
            );
            return;
        }
        if let Err(e) = reconnect(index, attach, ours, stopping) {
            tracing::debug!(disk, error = %e, "NBD reconfigure failed; retrying");
        }
    }
}

fn reconnect(
    index: u32,
    attach: &Attach,
    ours: &Mutex<Option<UnixStream>>,
    stopping: &AtomicBool,
) -> std::io::Result<()> {
    let (mine, theirs) = UnixStream::pair()?;
    Nbd::open()?.reconfigure(attach, index, theirs.as_fd())?;
    // If the kernel still had a live socket it did not take ours: our end
    // then reads end-of-file at once and the loop tries again.
    let mut slot = ours.lock().expect("link socket");
    // A stop that took the old socket meanwhile must not find a new one
    // served behind its back: checked under the lock stop_all takes.
    if stopping.load(Ordering::Acquire) {
        let _ = mine.shutdown(std::net::Shutdown::Both);
    } else {
        *slot = Some(mine);
    }
    Ok(())
}

/// Stops every link: a device nothing uses is disconnected, a device in
/// use is left waiting for the next filter.
pub fn stop_all(links: Vec<Link>) {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for mut link in links {
        {
            let _slot = link.ours.lock().expect("link socket");
            link.stopping.store(true, Ordering::Release);
        }
        let device = link.device();
        let busy = nbd_netlink::in_use(Path::new(SYS_BLOCK), &mountinfo, link.index)
            || nbd_netlink::exclusively_held(link.index);
        let disconnected = !busy
            && match Nbd::open().and_then(|mut n| n.disconnect(link.index)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(disk = %link.disk, device = %device.display(), error = %e, "NBD disconnect failed");
                    false
                }
            };
        if disconnected {
            let _ = std::fs::remove_file(&link.record);
            tracing::info!(disk = %link.disk, device = %device.display(), "detached from the kernel's NBD client");
        } else {
            tracing::warn!(disk = %link.disk, device = %device.display(), "the NBD device is in use: left configured for the next filter to reattach");
        }
        // Either way our end closes: after a disconnect the kernel has
        // already sent NBD_CMD_DISC; otherwise this tells it the
        // connection is dead (requests wait for the next filter).
        if let Some(stream) = link.ours.lock().expect("link socket").take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        if let Some(thread) = link.thread.take() {
            let deadline = Instant::now() + STOP_GRACE;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(disk = %link.disk, "kernel NBD link did not end in time");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_ids_are_stable_and_distinct() {
        let a = backend_id(Path::new("/var/lib/ferry/a"), "data");
        assert_eq!(a, backend_id(Path::new("/var/lib/ferry/a"), "data"));
        assert_ne!(a, backend_id(Path::new("/var/lib/ferry/b"), "data"));
        assert_ne!(a, backend_id(Path::new("/var/lib/ferry/a"), "logs"));
        assert!(a.starts_with("ferry:data:"));
    }

    #[test]
    fn the_backend_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(crate::stable_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(crate::stable_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(crate::stable_hash(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            backend_id(Path::new("/var/lib/ferry/a"), "data"),
            format!(
                "ferry:data:{:016x}",
                crate::stable_hash(b"/var/lib/ferry/a")
            )
        );
    }

    #[test]
    fn kernel_block_sizes() {
        assert_eq!(kernel_block_size(1).unwrap(), 512);
        assert_eq!(kernel_block_size(512).unwrap(), 512);
        assert_eq!(kernel_block_size(4096).unwrap(), 4096);
        assert!(kernel_block_size(8192).is_err());
    }
}
