//! `ferry filter`: the daemon. Opens the disks, serves them over NBD,
//! answers the control socket, keeps tracking state moving, and stops
//! cleanly on SIGTERM.
//!
//! State directory layout (the meeting point with the sidecar):
//!
//! ```text
//! STATE/filter.lock          flock: one filter per state directory
//! STATE/filter.json          pid, listeners, disks and their ring paths
//! STATE/control.sock         control socket (status, tag, barrier, resync-all)
//! STATE/seq                  host-wide sequence numbers reserved so far
//! STATE/tags.jsonl           tag names by sequence number (the ring holds ids)
//! STATE/disks/NAME/meta      activity log + dirty bitmap + clean flag
//! STATE/disks/NAME/ring  ->  /dev/shm/ferry-<id>/NAME.ring
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::{FilterConfig, Listen};
use crate::control::{
    self, BarrierOutcome, HoldOutcome, HoldRequest, HostStatus, ResyncDisk, ResyncOutcome,
    ResyncRequest, TagOutcome, TagRequest,
};
use crate::disk::Disk;
use crate::error::{Error, Result};
use crate::export::Exports;
use crate::freeze::{run_script, Frozen};
use crate::kernel;
use crate::nbd::{self, ServeOptions};
use crate::order::Sequencer;
use crate::uring::Uring;

/// Sequence numbers reserved on disk at a time: a restart continues above
/// the reservation, so numbers never repeat even after kill -9.
const SEQ_BLOCK: u64 = 1 << 20;
/// How often housekeeping runs.
const HOUSEKEEPING: Duration = Duration::from_millis(100);
/// How long a clean stop waits for connections to finish their requests.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// The host: every disk, the sequencer, the state directory.
#[derive(Debug)]
pub struct Host {
    disks: Vec<Arc<Disk>>,
    sequencer: Arc<Sequencer>,
    state: PathBuf,
    seq_file: File,
    tag_lock: Mutex<()>,
    app: crate::config::AppSettings,
}

impl Host {
    /// Reserve sequence numbers ahead of use (durably), then let the
    /// sequencer hand them out.
    fn reserve_seq(&self) -> Result<()> {
        let next = self.sequencer.peek();
        if next + SEQ_BLOCK / 2 < self.sequencer.limit() {
            return Ok(());
        }
        let reserved = next + SEQ_BLOCK;
        write_seq(&self.seq_file, reserved)?;
        self.sequencer.raise_limit(reserved);
        Ok(())
    }

    fn housekeep(&self) {
        for disk in &self.disks {
            disk.housekeep();
        }
        if let Err(e) = self.reserve_seq() {
            tracing::error!(error = %e, "cannot reserve sequence numbers");
        }
    }

    fn record_tag_name(&self, seq: u64, request: &TagRequest) -> Result<()> {
        #[derive(Serialize)]
        struct Line<'a> {
            seq: u64,
            name: &'a str,
            app: bool,
            time_ns: u64,
        }
        let path = self.state.join("tags.jsonl");
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(e, "open tag log").with_path(&path))?;
        let time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let line = serde_json::to_string(&Line {
            seq,
            name: &request.name,
            app: request.app,
            time_ns,
        })
        .map_err(|e| Error::control(e.to_string()))?;
        writeln!(file, "{line}").map_err(|e| Error::io(e, "write tag log").with_path(&path))?;
        file.sync_data()
            .map_err(|e| Error::io(e, "sync tag log").with_path(&path))
    }

    /// Hold every disk's write path, take one sequence number, record the
    /// tag on every disk, release.
    fn insert_tag(&self, request: &TagRequest) -> Result<(u64, Duration)> {
        let started = Instant::now();
        let barriers: Vec<_> = self.disks.iter().map(|d| d.gate().barrier()).collect();
        if let Some(why) = self.disks.iter().find_map(|d| d.unfit_for_tag()) {
            return Err(Error::control(why));
        }
        let seq = self.sequencer.next();
        self.record_tag_name(seq, request)?;
        for disk in &self.disks {
            disk.tag(seq, seq)?;
        }
        drop(barriers);
        Ok((seq, started.elapsed()))
    }
}

impl control::Handler for Host {
    fn status(&self) -> HostStatus {
        HostStatus {
            pid: std::process::id(),
            state: self.state.clone(),
            next_seq: self.sequencer.peek(),
            seq: self.sequencer.peek().saturating_sub(1),
            disks: self.disks.iter().map(|d| d.status()).collect(),
        }
    }

    fn tag(&self, request: &TagRequest) -> Result<TagOutcome> {
        if request.name.is_empty()
            || request.name.len() > 128
            || request.name.contains(['\n', '\0'])
        {
            return Err(Error::control(
                "a tag name is 1-128 characters without newlines",
            ));
        }
        let _one_at_a_time = self.tag_lock.lock().expect("tag lock");
        let timeout = Duration::from_millis(request.timeout_ms.max(1));
        if !request.app {
            let (seq, barrier) = self.insert_tag(request)?;
            return Ok(self.outcome(request, seq, barrier, Duration::ZERO));
        }
        // App-consistent: pre -> freeze -> tag -> thaw -> post; post and thaw always.
        let result = (|| {
            if let Some(pre) = &request.pre {
                run_script("pre", pre, timeout)?;
            }
            let frozen = Frozen::freeze(&request.mounts, timeout)?;
            let tagged = self.insert_tag(request);
            let expired = frozen.expired();
            let frozen_for = frozen.thaw()?;
            let (seq, barrier) = tagged?;
            if expired {
                return Err(Error::control(format!(
                    "file systems were thawed by the {timeout:?} deadline before the tag was taken"
                )));
            }
            Ok(self.outcome(request, seq, barrier, frozen_for))
        })();
        let post = request
            .post
            .as_ref()
            .map(|post| run_script("post", post, timeout));
        match (result, post) {
            (Ok(outcome), None | Some(Ok(()))) => Ok(outcome),
            (Ok(outcome), Some(Err(e))) => {
                tracing::warn!(tag = %outcome.name, error = %e, "post script failed after the tag was taken");
                Err(Error::control(format!(
                    "tag {} taken at seq {}, but {e}",
                    outcome.name, outcome.seq
                )))
            }
            (Err(e), _) => Err(e),
        }
    }

    fn barrier(&self) -> Result<BarrierOutcome> {
        Ok(BarrierOutcome {
            seq: self.quiet_seq(),
        })
    }

    fn hold(
        &self,
        request: &HoldRequest,
        deadline: Instant,
        link: &mut dyn control::HoldLink,
    ) -> Result<HoldOutcome> {
        let tag = TagRequest {
            name: request.name.clone(),
            app: request.app,
            ..TagRequest::default()
        };
        if request.app && self.app.is_empty() {
            return Err(Error::control(
                "no app settings here: start the filter with --app-mount/--app-pre/--app-post",
            ));
        }
        if tag.name.is_empty() || tag.name.len() > 128 || tag.name.contains(['\n', '\0']) {
            return Err(Error::control(
                "a tag name is 1-128 characters without newlines",
            ));
        }
        // Another tag (an app-consistent one freezes file systems) may hold
        // the lock: wait for it only until the deadline.
        let _one_at_a_time = loop {
            match self.tag_lock.try_lock() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(p)) => break p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(Error::control("another tag is being taken: no hold"))
                }
            }
        };
        if request.app {
            return self.app_hold(&tag, deadline, link);
        }
        self.hold_gates(&tag, link)
    }

    fn resync_all(&self, request: &ResyncRequest) -> Result<ResyncOutcome> {
        let disks: Vec<&Arc<Disk>> = match &request.disk {
            Some(name) => {
                let disk = self.disks.iter().find(|d| d.name() == name.as_str());
                vec![disk.ok_or_else(|| Error::control(format!("no disk named {name:?}")))?]
            }
            None => self.disks.iter().collect(),
        };
        let mut outcome = ResyncOutcome::default();
        for disk in disks {
            let bytes = disk.resync_all()?;
            outcome.bytes += bytes;
            outcome.disks.push(ResyncDisk {
                name: disk.name().to_string(),
                bytes,
            });
        }
        Ok(outcome)
    }
}

impl Host {
    /// The hold itself: every disk's gate held (writes in flight finish
    /// and are recorded, new ones wait) until `decide` says whether the
    /// coordinator has every member quiet; the tag if it does; release.
    fn hold_gates(
        &self,
        tag: &TagRequest,
        link: &mut dyn control::HoldLink,
    ) -> Result<HoldOutcome> {
        let started = Instant::now();
        // (Waiting for writes in flight is not bounded by the deadline:
        // they are ordinary I/O; `decide` releases at once if it passed.)
        let barriers: Vec<_> = self.disks.iter().map(|d| d.gate().barrier()).collect();
        if let Some(why) = self.disks.iter().find_map(|d| d.unfit_for_tag()) {
            return Err(Error::control(why));
        }
        let held_seq = self.sequencer.peek().saturating_sub(1);
        let committed = link.held(held_seq);
        let tag_outcome = if committed {
            let seq = self.sequencer.next();
            self.record_tag_name(seq, tag)?;
            for disk in &self.disks {
                disk.tag(seq, seq)?;
            }
            Some(self.outcome(tag, seq, started.elapsed(), Duration::ZERO))
        } else {
            None
        };
        drop(barriers);
        let held_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        tracing::info!(name = %tag.name, held_seq, committed, held_us, "group hold");
        Ok(HoldOutcome {
            held_seq,
            committed,
            tag: tag_outcome,
            held_us,
        })
    }

    /// An app-consistent hold: pre script, freeze (a watchdog thaws at
    /// `deadline` whatever happens), `frozen` to the coordinator and its
    /// go-ahead, the hold (its own timeout counts from the go-ahead), thaw;
    /// the post script runs after the answer, off this thread. The tag
    /// counts only if the file systems were still frozen when it was taken.
    fn app_hold(
        &self,
        tag: &TagRequest,
        deadline: Instant,
        link: &mut dyn control::HoldLink,
    ) -> Result<HoldOutcome> {
        let prepare = Duration::from_millis(crate::control::APP_PREPARE_MS);
        let result = (|| {
            if let Some(pre) = &self.app.pre {
                run_script("pre", pre, prepare)?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let frozen = Frozen::freeze(&self.app.mounts, left)?;
            let held = if link.frozen() {
                self.hold_gates(tag, link)
            } else {
                // The coordinator aborted (or went silent) before anyone held.
                Ok(HoldOutcome {
                    held_seq: 0,
                    committed: false,
                    tag: None,
                    held_us: 0,
                })
            };
            let expired = frozen.expired();
            frozen.thaw()?;
            let held = held?;
            if expired && held.committed {
                return Err(Error::control(format!(
                    "file systems were thawed by the deadline before the tag {} was taken",
                    tag.name
                )));
            }
            Ok(held)
        })();
        if let Some(post) = self.app.post.clone() {
            // After the answer: the coordinator's wait does not include it.
            let name = tag.name.clone();
            let spawned = std::thread::Builder::new()
                .name("app-post".into())
                .spawn(move || {
                    if let Err(e) = run_script("post", &post, prepare) {
                        tracing::warn!(tag = %name, error = %e, "post script failed after the group hold");
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the post script");
            }
        }
        result
    }

    /// Every disk's gate held at once (in disk order, as tags take them):
    /// every request that got a ticket before has been recorded, so every
    /// write that reached a device has a sequence number below `peek`.
    fn quiet_seq(&self) -> u64 {
        let barriers: Vec<_> = self.disks.iter().map(|d| d.gate().barrier()).collect();
        let seq = self.sequencer.peek().saturating_sub(1);
        drop(barriers);
        seq
    }

    fn outcome(
        &self,
        request: &TagRequest,
        seq: u64,
        barrier: Duration,
        frozen: Duration,
    ) -> TagOutcome {
        TagOutcome {
            name: request.name.clone(),
            seq,
            app: request.app,
            disks: self.disks.iter().map(|d| d.name().to_string()).collect(),
            barrier_us: u64::try_from(barrier.as_micros()).unwrap_or(u64::MAX),
            frozen_us: u64::try_from(frozen.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

fn write_seq(file: &File, value: u64) -> Result<()> {
    file.write_all_at(&value.to_le_bytes(), 0)
        .map_err(|e| Error::io(e, "write seq"))?;
    file.sync_data().map_err(|e| Error::io(e, "sync seq"))
}

/// The first sequence number of this run: what `STATE/seq` reserved, or for
/// a new state directory the current time in nanoseconds since 1970. A
/// host whose state directory was lost or recreated so keeps issuing larger
/// numbers than before (assuming fewer than 10^9 writes per second and a
/// clock that does not jump back), and the recovery site can continue its
/// chain in a new epoch instead of seeing old numbers again.
fn read_seq(file: &File) -> u64 {
    let mut bytes = [0u8; 8];
    match file.read_exact_at(&mut bytes, 0) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX / 2))
            .unwrap_or(1),
    }
}

/// Take the state directory's lock, so two filters never share it.
/// How long a starting filter waits for a previous one to release its
/// state directory.
const STATE_LOCK_WAIT: Duration = Duration::from_secs(60);

fn lock_state(state: &Path) -> Result<File> {
    let path = state.join("filter.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(e, "open lock").with_path(&path))?;
    // A filter killed a moment ago may still be exiting (unmapping its
    // locked memory takes a while on a slow machine) and hold the lock:
    // wait for it rather than fail the restart.
    match ferry_ring::meta::flock_exclusive_within(&file, STATE_LOCK_WAIT) {
        Ok(()) => Ok(file),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Err(Error::config(format!(
            "another ferry filter is using {} (lock held on {})",
            state.display(),
            path.display()
        ))),
        Err(e) => Err(Error::io(e, "lock state").with_path(&path)),
    }
}

/// Directory in shared memory for this state directory's rings.
fn ring_dir(state: &Path) -> PathBuf {
    let hash = crate::stable_hash(state.as_os_str().as_encoded_bytes());
    PathBuf::from("/dev/shm").join(format!("ferry-{hash:016x}"))
}

/// Best effort: the kernel must not wait on this process's own I/O to free
/// memory (we sit in a block device's write path).
fn become_io_flusher() {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "PR_SET_IO_FLUSHER not set");
    }
}

/// Best effort: a daemon in a block device's write path must not wait on
/// its own pages being read back from swap or from the device it serves.
fn lock_memory() {
    // SAFETY: mlockall takes flags only.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "mlockall failed: the filter's memory may be paged out");
    }
}

/// Live NBD connections, so a stop can end their request loops.
#[derive(Debug, Default)]
struct Connections {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Stream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn shutdown_read(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Read),
            Stream::Tcp(s) => s.shutdown(Shutdown::Read),
        };
    }
}

/// Description of the running filter, for the sidecar and humans.
#[derive(Debug, Serialize)]
struct FilterInfo<'a> {
    pid: u32,
    listen: Vec<String>,
    disks: Vec<DiskInfo<'a>>,
}

#[derive(Debug, Serialize)]
struct DiskInfo<'a> {
    name: &'a str,
    size: u64,
    ring: &'a Path,
    /// The kernel NBD device the disk is served as, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    nbd_device: Option<PathBuf>,
}

/// Run the filter until `stop` is set (SIGTERM/SIGINT set it too).
pub fn run(config: FilterConfig, stop: Arc<AtomicBool>) -> Result<()> {
    run_with(config, stop, |_| Ok(()))
}

/// A disk served to the kernel, as `started` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDevice {
    /// Disk name.
    pub disk: String,
    /// Its `/dev/nbdN`.
    pub device: PathBuf,
}

/// [`run`], calling `started` once every disk is served (listeners bound,
/// kernel devices attached, control socket up). An error from `started`
/// stops the filter cleanly and is returned.
pub fn run_with(
    config: FilterConfig,
    stop: Arc<AtomicBool>,
    started: impl FnOnce(&[KernelDevice]) -> Result<()>,
) -> Result<()> {
    config.validate()?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))
        .map_err(|e| Error::io(e, "SIGTERM handler"))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))
        .map_err(|e| Error::io(e, "SIGINT handler"))?;
    let state = &config.state;
    std::fs::create_dir_all(state)
        .map_err(|e| Error::io(e, "create state dir").with_path(state))?;
    let state = state
        .canonicalize()
        .map_err(|e| Error::io(e, "resolve state dir").with_path(state))?;
    let _lock = lock_state(&state)?;
    become_io_flusher();

    let seq_path = state.join("seq");
    let seq_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&seq_path)
        .map_err(|e| Error::io(e, "open seq").with_path(&seq_path))?;
    let first = read_seq(&seq_file).max(1);
    write_seq(&seq_file, first + SEQ_BLOCK)?;
    let sequencer = Sequencer::new(first, first + SEQ_BLOCK);

    let rings = ring_dir(&state);
    std::fs::create_dir_all(&rings)
        .map_err(|e| Error::io(e, "create ring dir").with_path(&rings))?;
    let uring = Uring::start().map_err(|e| Error::io(e, "io_uring setup"))?;
    let mut disks = Vec::new();
    for disk in &config.disks {
        let opened = Disk::open(
            disk,
            &config,
            &state,
            &rings,
            Arc::clone(&sequencer),
            Arc::clone(&uring),
        )?;
        tracing::info!(disk = %disk.name, path = %disk.path.display(), size = opened.size(), ring = %opened.ring_path().display(), "disk protected");
        disks.push(Arc::new(opened));
    }
    let host = Arc::new(Host {
        disks: disks.clone(),
        sequencer,
        state: state.clone(),
        seq_file,
        tag_lock: Mutex::new(()),
        app: config.app.clone(),
    });
    let control_path = state.join(control::SOCKET_NAME);
    let _ = std::fs::remove_file(&control_path);
    let control_listener = UnixListener::bind(&control_path)
        .map_err(|e| Error::io(e, "bind control socket").with_path(&control_path))?;
    let control_thread = {
        let (handler, stop) = (
            Arc::clone(&host) as Arc<dyn control::Handler>,
            Arc::clone(&stop),
        );
        spawn("control", move || {
            control::serve(control_listener, handler, stop)
        })?
    };
    if let Some(link) = &config.group_link {
        // A group port that cannot be served costs group points, not the
        // protection of the disks: warn and go on.
        let handler = Arc::clone(&host) as Arc<dyn control::Handler>;
        if let Err(e) = crate::grouplink::spawn(link, handler, Arc::clone(&stop)) {
            tracing::warn!(error = %e, "group rounds over the network are off");
        }
    }
    let housekeeping = {
        let (host, stop) = (Arc::clone(&host), Arc::clone(&stop));
        spawn("housekeeping", move || {
            while !stop.load(Ordering::Relaxed) {
                host.housekeep();
                std::thread::sleep(HOUSEKEEPING);
            }
        })?
    };

    let exports = Arc::new(Exports::new(disks.clone()));
    let connections = Arc::new(Connections::default());
    let shutdown = Arc::new(AtomicBool::new(false));
    if !config.nbd_devices.is_empty() {
        lock_memory();
    }
    // A device that cannot be attached stops the filter, through the same
    // clean stop as a signal (the disks are closed clean).
    let backend = Arc::clone(&exports) as Arc<dyn nbd::Backend>;
    let (links, mut failure) = match kernel::attach::attach_all(
        &config.nbd_devices,
        config.nbd_timeouts,
        &backend,
        &state,
    ) {
        Ok(links) => (links, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    drop(backend);
    let mut acceptors = Vec::new();
    let mut unix_paths = Vec::new();
    if failure.is_none() {
        for listen in &config.listen {
            match listen_on(
                listen,
                &exports,
                &connections,
                &stop,
                &shutdown,
                &mut unix_paths,
            ) {
                Ok(acceptor) => acceptors.push(acceptor),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
    }
    if failure.is_none() {
        if let Err(e) = write_info(&state, &config, &disks, &links) {
            failure = Some(e);
        }
    }
    if failure.is_none() {
        let devices: Vec<KernelDevice> = links
            .iter()
            .map(|l| KernelDevice {
                disk: l.disk().to_string(),
                device: l.device(),
            })
            .collect();
        if let Err(e) = started(&devices) {
            failure = Some(e);
        }
    }
    if failure.is_some() {
        stop.store(true, Ordering::Relaxed);
    } else {
        tracing::info!(state = %state.display(), disks = disks.len(), "ferry filter running");
    }

    while !stop.load(Ordering::Relaxed) {
        if let Some(link) = links.iter().find(|l| l.is_lost()) {
            // Its writes can no longer reach us: stopping says so, and a
            // supervisor's restart attaches again.
            failure = Some(Error::control(format!(
                "{} (disk {}) was disconnected by someone else",
                link.device().display(),
                link.disk()
            )));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("stopping: finishing in-flight requests");
    for a in acceptors {
        let _ = a.join();
    }
    kernel::attach::stop_all(links);
    for stream in connections.live.lock().expect("connections").values() {
        stream.shutdown_read();
    }
    let deadline = Instant::now() + STOP_GRACE;
    let threads: Vec<_> = connections
        .threads
        .lock()
        .expect("threads")
        .drain(..)
        .collect();
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            shutdown.store(true, Ordering::Relaxed);
            tracing::warn!("a connection did not finish within the grace period");
        }
    }
    let _ = housekeeping.join();
    let _ = control_thread.join();
    host.housekeep();
    drop(exports);
    let Ok(host) = Arc::try_unwrap(host) else {
        return Err(Error::control(
            "connections still hold the disks; not marking them clean",
        ));
    };
    drop(disks);
    let mut result = Ok(());
    for disk in host.disks {
        let name = disk.name().to_string();
        match Arc::try_unwrap(disk) {
            Ok(disk) => {
                if let Err(e) = disk.close() {
                    tracing::error!(disk = %name, error = %e, "clean close failed");
                    result = Err(e);
                }
            }
            Err(_) => tracing::error!(disk = %name, "disk still in use at stop; left unclean"),
        }
    }
    for path in unix_paths.iter().chain([&control_path]) {
        let _ = std::fs::remove_file(path);
    }
    // The closed disks removed their rings; the directory goes when empty.
    let _ = std::fs::remove_dir(&rings);
    tracing::info!("ferry filter stopped");
    match failure {
        Some(e) => Err(e),
        None => result,
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io(e, "spawn thread"))
}

fn write_info(
    state: &Path,
    config: &FilterConfig,
    disks: &[Arc<Disk>],
    links: &[kernel::attach::Link],
) -> Result<()> {
    let info = FilterInfo {
        pid: std::process::id(),
        listen: config
            .listen
            .iter()
            .map(|l| match l {
                Listen::Unix(p) => format!("unix:{}", p.display()),
                Listen::Tcp(a) => format!("tcp:{a}"),
            })
            .collect(),
        disks: disks
            .iter()
            .map(|d| DiskInfo {
                name: d.name(),
                size: d.size(),
                ring: d.ring_path(),
                nbd_device: links
                    .iter()
                    .find(|l| l.disk() == d.name())
                    .map(|l| l.device()),
            })
            .collect(),
    };
    let path = state.join("filter.json");
    let text = serde_json::to_string_pretty(&info).map_err(|e| Error::control(e.to_string()))?;
    std::fs::write(&path, text).map_err(|e| Error::io(e, "write filter.json").with_path(&path))
}

/// Bind one listener and start its accept thread.
fn listen_on(
    listen: &Listen,
    exports: &Arc<Exports>,
    connections: &Arc<Connections>,
    stop: &Arc<AtomicBool>,
    shutdown: &Arc<AtomicBool>,
    unix_paths: &mut Vec<PathBuf>,
) -> Result<JoinHandle<()>> {
    let (exports, connections, stop, shutdown) = (
        Arc::clone(exports),
        Arc::clone(connections),
        Arc::clone(stop),
        Arc::clone(shutdown),
    );
    match listen {
        Listen::Unix(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(e, "create socket dir").with_path(dir))?;
            }
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)
                .map_err(|e| Error::io(e, "bind NBD socket").with_path(path))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| Error::io(e, "nonblocking"))?;
            unix_paths.push(path.clone());
            spawn("accept-unix", move || {
                accept_loop(
                    &stop,
                    || match listener.accept() {
                        Ok((s, _)) => Some(Ok(s)),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                        Err(e) => Some(Err(e)),
                    },
                    |s: UnixStream| {
                        let _ = s.set_nonblocking(false);
                        let clone = s.try_clone().ok().map(Stream::Unix);
                        serve_connection(s, clone, &exports, &connections, &shutdown);
                    },
                );
            })
        }
        Listen::Tcp(addr) => {
            let listener =
                TcpListener::bind(addr).map_err(|e| Error::io(e, "bind NBD TCP address"))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| Error::io(e, "nonblocking"))?;
            spawn("accept-tcp", move || {
                accept_loop(
                    &stop,
                    || match listener.accept() {
                        Ok((s, _)) => Some(Ok(s)),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                        Err(e) => Some(Err(e)),
                    },
                    |s: TcpStream| {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_nodelay(true);
                        let clone = s.try_clone().ok().map(Stream::Tcp);
                        serve_connection(s, clone, &exports, &connections, &shutdown);
                    },
                );
            })
        }
    }
}

fn accept_loop<S>(
    stop: &AtomicBool,
    mut accept: impl FnMut() -> Option<std::io::Result<S>>,
    mut serve: impl FnMut(S),
) {
    while !stop.load(Ordering::Relaxed) {
        match accept() {
            Some(Ok(stream)) => serve(stream),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve_connection<S: nbd::Connection + Send + 'static>(
    stream: S,
    clone: Option<Stream>,
    exports: &Arc<Exports>,
    connections: &Arc<Connections>,
    shutdown: &Arc<AtomicBool>,
) {
    let id = connections.next.fetch_add(1, Ordering::Relaxed);
    if let Some(clone) = clone {
        connections
            .live
            .lock()
            .expect("connections")
            .insert(id, clone);
    }
    let (exports, conns, shutdown) = (
        Arc::clone(exports),
        Arc::clone(connections),
        Arc::clone(shutdown),
    );
    let options = ServeOptions {
        shutdown: Some(shutdown),
        ..ServeOptions::default()
    };
    let thread = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            match nbd::serve(stream, exports.as_ref(), options) {
                Ok(()) => tracing::debug!(conn = id, "NBD client disconnected"),
                Err(e) => tracing::info!(conn = id, error = %e, "NBD connection ended"),
            }
            conns.live.lock().expect("connections").remove(&id);
        });
    match thread {
        Ok(t) => {
            let mut threads = connections.threads.lock().expect("threads");
            threads.retain(|t| !t.is_finished());
            threads.push(t);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start a connection thread");
            connections.live.lock().expect("connections").remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Request, ResyncRequest};
    use crate::disk::tests::{drain, Rig};
    use crate::order::Range;
    use ferry_ring::ring::Consumer;

    fn host(rig: &Rig) -> Arc<Host> {
        let sequencer = Sequencer::new(1, u64::MAX);
        let disk = Arc::new(rig.open_with(Arc::clone(&sequencer)));
        let state = rig.state();
        let seq_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(state.join("seq"))
            .unwrap();
        Arc::new(Host {
            disks: vec![disk],
            sequencer,
            state,
            seq_file,
            tag_lock: Mutex::new(()),
            app: crate::config::AppSettings::default(),
        })
    }

    #[test]
    fn barrier_and_resync_all_through_the_control_socket() {
        let mut rig = Rig::new("control", 16 * (1 << 20), &[Range::new(0, 1 << 20)]);
        rig.config.initial_copy = false;
        let host = host(&rig);
        let disk = Arc::clone(&host.disks[0]);
        let state = rig.state();
        let listener = UnixListener::bind(state.join(control::SOCKET_NAME)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (handler, stop) = (
                Arc::clone(&host) as Arc<dyn control::Handler>,
                Arc::clone(&stop),
            );
            std::thread::spawn(move || control::serve(listener, handler, stop))
        };
        let call = |request: &Request| control::call(&state, request, Duration::from_secs(10));

        for i in 0..5u64 {
            let mut data = disk.write_buffer(4096);
            data.as_mut_slice().fill(1);
            disk.write(i * 4096, data, false).unwrap();
        }
        let mut consumer = Consumer::open(&rig.dir.join("rings").join("d.ring")).unwrap();
        let (records, _) = drain(&mut consumer);
        let last = records.last().unwrap().seq;
        let barrier = call(&Request::Barrier).unwrap().barrier.unwrap();
        assert!(barrier.seq >= last, "{} < {last}", barrier.seq);
        assert_eq!(barrier.seq, last, "nothing else took a number");
        let status = call(&Request::Status).unwrap().status.unwrap();
        assert_eq!((status.seq, status.next_seq), (last, last + 1));

        // A request in flight holds the barrier back.
        let ticket = disk.gate().begin(Some(Range::new(0, 4096)));
        let waiting = {
            let state = state.clone();
            std::thread::spawn(move || {
                control::call(&state, &Request::Barrier, Duration::from_secs(10))
                    .unwrap()
                    .barrier
                    .unwrap()
                    .seq
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiting.is_finished(), "the barrier waits for the ticket");
        let seq = host.sequencer.next(); // what the request records
        disk.gate().finish(ticket);
        assert_eq!(waiting.join().unwrap(), seq);

        // resync-all: the whole 16 MiB disk (holes too), then claimed.
        let all = call(&Request::ResyncAll(ResyncRequest::default()))
            .unwrap()
            .resync
            .unwrap();
        assert_eq!(all.bytes, 16 << 20);
        assert_eq!(
            (all.disks[0].name.as_str(), all.disks[0].bytes),
            ("d", 16 << 20)
        );
        let named = call(&Request::ResyncAll(ResyncRequest {
            disk: Some("d".into()),
        }))
        .unwrap()
        .resync
        .unwrap();
        assert_eq!(named.bytes, 16 << 20);
        let unknown = call(&Request::ResyncAll(ResyncRequest {
            disk: Some("nope".into()),
        }))
        .unwrap_err();
        assert!(unknown.to_string().contains("no disk named"), "{unknown}");
        host.housekeep();
        let status = call(&Request::Status).unwrap().status.unwrap();
        assert_eq!(status.disks[0].dirty_bytes, 16 << 20);
        assert_eq!(status.disks[0].claimed_bytes, 16 << 20);
        let (records, end) = drain(&mut consumer);
        assert_eq!(records.len(), 4, "4 MiB claims");
        assert_eq!((records[0].offset, records[0].length), (0, 4 << 20));
        assert!(call(&Request::Barrier).unwrap().barrier.unwrap().seq >= records[0].seq);
        consumer.commit(end).unwrap();
        host.housekeep();
        let status = call(&Request::Status).unwrap().status.unwrap();
        assert_eq!(status.disks[0].dirty_bytes, 0);
        assert_eq!(status.disks[0].tracking, "data");

        stop.store(true, Ordering::Relaxed);
        server.join().unwrap();
    }
}
