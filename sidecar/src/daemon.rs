//! `ferry sidecar`: one shipping thread per protected disk (`ship-DISK`),
//! each with its own TLS connection to the target, and a metrics writer.
//!
//! # One disk's loop
//!
//! 1. Open the disk's ring (`STATE/disks/NAME/ring`); connect with mutual
//!    TLS, say Hello, read the resume point (next seq, epoch, consistency);
//!    deliver the spool first, if it holds anything.
//! 2. Decide the epoch ([`plan_epoch`]): continue the target's chain, or
//!    open a new epoch when records may have been lost (the ring was
//!    recreated since this sidecar last shipped from it, the target
//!    reported a gap or came back with fewer acknowledged sets than it had,
//!    or an epoch opened here never reached it), or start a fresh chain
//!    when the target holds nothing. A target that lost a disk, or sets,
//!    this sidecar shipped gets a full resync (`resync-all` on the filter;
//!    the checksum exchange keeps it to what differs).
//! 3. Drain: [`drain_once`] ships sets, a window of them in flight, and
//!    commits the ring after each durable ack. When idle, settle the
//!    consistency claim (the filter reports nothing dirty), report the lag
//!    (the peak of the interval), send heartbeats.
//! 4. Any failure: drop the connection, back off (0.5 s doubling to 30 s),
//!    go to 1. The ring keeps the unacknowledged records. While backing
//!    off, the ring keeps draining into the on-disk spool (in the chain of
//!    the last connection; see [`crate::spool`]), which the next connection
//!    delivers first.
//!
//! # Local state (`STATE/sidecar/`)
//!
//! * `lock`: flock held while running (one sidecar per filter).
//! * `nonce-stream`: see [`crate::stamp`].
//! * `spool/NAME/`: change sets waiting for the target ([`crate::spool`]).
//! * `disks/NAME.json`: epoch, ring generation last shipped from, whether
//!   anything was ever shipped, a lower bound of the last acknowledged
//!   sequence ([`LocalDisk`]).
//! * `metrics.json`: per-disk counters and lag, rewritten every second
//!   ([`DiskMetrics`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::message::{DiskHello, DiskResume, Progress};
use ferry_protocol::payload::Key;
use ferry_protocol::{credentials, frame, tls};
use ferry_ring::ring::{now_ns, Consumer};
use serde::{Deserialize, Serialize};

use crate::batch::{BatchLimits, Batcher};
use crate::error::{Error, ErrorKind, Result};
use crate::filterctl::{FilterControl, FilterDisk};
use crate::net::NetTransport;
use crate::ship::{drain_once, ShipOptions};
use crate::spool::{Delivered, Spool, SpoolTransport};
use crate::stamp::{next_nonce_stream, Consistency, DiskStamp, Nonces};
use crate::uring_read::DirectReader;

/// The sidecar's directory inside the filter's state directory.
pub const SIDECAR_DIR: &str = "sidecar";
/// Metrics file name.
pub const METRICS_FILE: &str = "metrics.json";
/// Idle connections send a heartbeat this often.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// Lag reports to the target this often.
const PROGRESS: Duration = Duration::from_secs(1);
/// Longest back-off between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Network timeout for connect, handshake, each read and write.
const NET_TIMEOUT: Duration = Duration::from_secs(60);
/// Default spool size per disk.
pub const DEFAULT_SPOOL_SIZE: u64 = 1 << 30;
/// Least time between two consistency tags requested of the filter.
const TAG_INTERVAL: Duration = Duration::from_secs(30);

/// How to run the sidecar.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// The filter's state directory.
    pub state: PathBuf,
    /// Target address (`host:port`).
    pub target: String,
    /// The name the target's certificate must carry (None: the address's
    /// host). A registered host knows its target by name and reaches it by
    /// address.
    pub target_name: Option<String>,
    /// Credentials directory (ca.crt, HOST.crt, HOST.key, HOST.datakey).
    pub credentials: PathBuf,
    /// Host name (default: the only `*.datakey` in the credentials).
    pub host: Option<String>,
    /// Change-set limits.
    pub limits: BatchLimits,
    /// zstd level (negative: fast modes).
    pub zstd_level: i32,
    /// Change sets in flight before the first ack is awaited.
    pub window: usize,
    /// Scheduled recovery points (None: only user tags).
    pub policy: Option<crate::policy::Policy>,
    /// Bytes per second on the wire (0: unlimited).
    pub bandwidth: u64,
    /// Largest frame sent.
    pub max_frame: usize,
    /// Most bytes the on-disk spool of each disk holds during an outage.
    pub spool_size: u64,
    /// After an idle spell, wait this long for more records before building
    /// a set (size limits are in `limits`; sets also grow by themselves
    /// while the previous one waits for its ack).
    pub batch_delay: Duration,
}

impl SidecarConfig {
    /// Defaults for everything but the required paths.
    pub fn new(state: PathBuf, target: String, credentials: PathBuf) -> SidecarConfig {
        SidecarConfig {
            state,
            target,
            credentials,
            host: None,
            limits: BatchLimits {
                max_bytes: 16 << 20,
                max_records: 16 << 10,
            },
            zstd_level: crate::ship::ZSTD_LEVEL,
            window: crate::net::DEFAULT_WINDOW,
            policy: None,
            bandwidth: 0,
            max_frame: frame::MAX_FRAME,
            spool_size: DEFAULT_SPOOL_SIZE,
            batch_delay: Duration::from_millis(2),
            target_name: None,
        }
    }
}

impl SidecarConfig {
    /// How sets are built and packed; a drain returns at least every
    /// [`PROGRESS`] so that lag reports and heartbeats keep flowing.
    pub fn ship_options(&self) -> ShipOptions {
        ShipOptions {
            limits: self.limits,
            zstd_level: self.zstd_level,
            max_time: Some(PROGRESS / 2),
        }
    }
}

/// The largest lag seen over a report interval (by age of the oldest
/// unacknowledged record; records and bytes at that moment).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PeakLag {
    records: u64,
    bytes: u64,
    ns: u64,
}

impl PeakLag {
    fn observe(&mut self, lag: ferry_ring::ring::Lag) {
        let ns = lag
            .oldest_age
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        if ns > self.ns || (ns == self.ns && lag.records > self.records) {
            *self = PeakLag {
                records: lag.records,
                bytes: lag.payload_bytes,
                ns,
            };
        }
    }
}

/// What the sidecar remembers of a disk between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalDisk {
    /// Epoch of the sets last built.
    pub epoch: u64,
    /// Generation of the ring last shipped from.
    pub ring_generation: Option<u64>,
    /// Whether the target ever acknowledged a set of this disk.
    pub shipped: bool,
    /// A lower bound of the last sequence the target acknowledged (saved at
    /// most once a second): a target that comes back with less lost
    /// acknowledged sets (restored from a backup, storage that lied).
    #[serde(default)]
    pub acked_seq: u64,
}

impl LocalDisk {
    fn path(state: &Path, disk: &str) -> PathBuf {
        state
            .join(SIDECAR_DIR)
            .join("disks")
            .join(format!("{disk}.json"))
    }

    fn load(state: &Path, disk: &str) -> LocalDisk {
        std::fs::read(Self::path(state, disk))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save(&self, state: &Path, disk: &str) -> Result<()> {
        let path = Self::path(state, disk);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::with_source(ErrorKind::Io, format!("create {}", dir.display()), e)
            })?;
        }
        write_json_atomically(&path, self)?;
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::with_source(ErrorKind::Io, format!("sync {}", dir.display()), e))
    }
}

fn write_json_atomically(path: &Path, value: &impl Serialize) -> Result<()> {
    let io = |e: std::io::Error| {
        Error::with_source(ErrorKind::Io, format!("write {}", path.display()), e)
    };
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(value).map_err(|e| io(std::io::Error::other(e)))?;
    {
        use std::io::Write;
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(&text).map_err(io)?;
        f.sync_data().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// What the epoch decision says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochPlan {
    /// Epoch to build sets in.
    pub epoch: u64,
    /// Whether this opens a new epoch (the replica becomes inconsistent).
    pub new_epoch: bool,
    /// Whether the whole disk must be resynced (the target lost it).
    pub resync_all: bool,
}

/// Decide the epoch after the target's resume point; see the module docs.
/// `gap`: the target refused a set as not following its last one, or came
/// back with fewer acknowledged sets than it had: records are missing there
/// and nothing local says which, so the whole disk is resynced.
pub fn plan_epoch(local: &LocalDisk, resume: &DiskResume, generation: u64, gap: bool) -> EpochPlan {
    let epoch = local.epoch.max(resume.epoch).max(1);
    if resume.next_seq == 0 {
        // The target holds no change set: a fresh chain. If this sidecar
        // shipped the disk before, the target lost it (or a reprotect reset
        // it): copy everything again. A seeded replica (an adopted image, a
        // kept copy) may hold anything anywhere, so the whole disk is
        // compared, holes included, not just the allocated regions.
        return EpochPlan {
            epoch,
            new_epoch: false,
            resync_all: local.shipped || resume.seeded,
        };
    }
    let recreated = local.ring_generation != Some(generation);
    // An epoch opened here that never reached the target (a restart came
    // first) is still open: its first set must declare the break.
    let unfinished = local.epoch > resume.epoch;
    if recreated || gap || unfinished {
        EpochPlan {
            epoch: epoch + 1,
            new_epoch: true,
            // A gap with the same ring is unexplained: the filter's dirty
            // bits need not cover it.
            resync_all: gap && !recreated,
        }
    } else {
        EpochPlan {
            epoch,
            new_epoch: false,
            resync_all: false,
        }
    }
}

/// Per-disk counters (`metrics.json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DiskMetrics {
    /// Disk name.
    pub disk: String,
    /// Connected to the target.
    pub connected: bool,
    /// Current epoch.
    pub epoch: u64,
    /// Last sequence acknowledged.
    pub acked_seq: u64,
    /// Change sets acknowledged since start.
    pub change_sets: u64,
    /// Of those, Resync sets.
    pub resync_sets: u64,
    /// Records shipped.
    pub records: u64,
    /// Raw data bytes shipped (before compression).
    pub raw_bytes: u64,
    /// Sealed bytes sent (after compression and encryption).
    pub shipped_bytes: u64,
    /// Raw bytes of Resync sets.
    pub resync_raw_bytes: u64,
    /// Re-read zero bytes sent as Zero extents.
    pub zero_bytes: u64,
    /// Resync bytes not sent because the target held them (checksum exchange).
    pub exchange_skipped_bytes: u64,
    /// raw / shipped.
    pub compression_ratio: f64,
    /// Raw bytes per second over the last metrics interval (the churn).
    pub churn_bytes_per_sec: f64,
    /// Records not yet acknowledged.
    pub lag_records: u64,
    /// Their payload bytes.
    pub lag_bytes: u64,
    /// Age of the oldest unacknowledged record, seconds (the RPO).
    pub lag_seconds: f64,
    /// Consistent from this sequence (None: inconsistent).
    pub consistent_since: Option<u64>,
    /// Change sets in the on-disk spool (waiting for the target).
    pub spool_sets: u64,
    /// Bytes in the spool.
    pub spool_bytes: u64,
    /// When the last scheduled crash-consistent point was taken (UNIX ns).
    pub last_crash_point_ns: Option<u64>,
    /// When the last scheduled app-consistent point was taken (UNIX ns).
    pub last_app_point_ns: Option<u64>,
    /// Why the last scheduled point was not made, if it was not.
    pub last_point_error: Option<String>,
    /// Reconnects since start.
    pub reconnects: u64,
    /// The last error, if the disk is not shipping.
    pub last_error: Option<String>,
    /// When written (UNIX ns).
    pub updated_ns: u64,
}

/// The host name to use: the configured one, or the only data key in the
/// credentials directory.
pub fn host_name(cfg: &SidecarConfig) -> Result<String> {
    if let Some(h) = &cfg.host {
        return Ok(h.clone());
    }
    let dir = std::fs::read_dir(&cfg.credentials).map_err(|e| {
        Error::with_source(
            ErrorKind::Io,
            format!("read credentials {}", cfg.credentials.display()),
            e,
        )
    })?;
    let hosts: Vec<String> = dir
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".datakey"))
                .map(str::to_owned)
        })
        .collect();
    match hosts.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::new(
            ErrorKind::Io,
            format!(
                "no HOST.datakey in {}: run `ferry credentials init {} --host NAME`",
                cfg.credentials.display(),
                cfg.credentials.display()
            ),
        )),
        many => Err(Error::new(
            ErrorKind::Io,
            format!(
                "{} hosts in {} ({}): pass --host",
                many.len(),
                cfg.credentials.display(),
                many.join(", ")
            ),
        )),
    }
}

fn lock(state: &Path) -> Result<File> {
    let dir = state.join(SIDECAR_DIR);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::with_source(ErrorKind::Io, format!("create {}", dir.display()), e))?;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::with_source(ErrorKind::Io, format!("open {}", path.display()), e))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::new(
            ErrorKind::Io,
            format!(
                "another ferry sidecar runs on {} ({} is locked)",
                state.display(),
                path.display()
            ),
        ));
    }
    Ok(f)
}

/// Everything the disk threads share.
struct Shared {
    cfg: SidecarConfig,
    host: String,
    tls: Arc<rustls::ClientConfig>,
    filter: FilterControl,
    stop: Arc<AtomicBool>,
    metrics: Mutex<BTreeMap<String, DiskMetrics>>,
    metrics_file: Mutex<()>,
    nonce_lock: Mutex<()>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleep up to `d`, waking early on stop.
    fn nap(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stopping() {
            let now = Instant::now();
            if now >= end {
                return;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(100)));
        }
    }

    /// Write `metrics.json` now (every second, and at once when a disk
    /// connects, disconnects or spools, so readers never see an old state
    /// of those).
    fn publish_metrics(&self) {
        let _one_writer = self.metrics_file.lock().expect("metrics file lock");
        let disks: Vec<DiskMetrics> = {
            let mut m = self.metrics.lock().expect("metrics lock");
            for d in m.values_mut() {
                d.updated_ns = now_ns();
            }
            m.values().cloned().collect()
        };
        #[derive(Serialize)]
        struct Metrics<'a> {
            host: &'a str,
            target: &'a str,
            /// The spool's capacity (each disk's `spool_bytes` count against it).
            spool_size: u64,
            disks: Vec<DiskMetrics>,
        }
        let m = Metrics {
            host: &self.host,
            target: &self.cfg.target,
            spool_size: self.cfg.spool_size,
            disks,
        };
        let path = self.cfg.state.join(SIDECAR_DIR).join(METRICS_FILE);
        if let Err(e) = write_json_atomically(&path, &m) {
            tracing::warn!(error = %e, "cannot write metrics");
        }
    }

    fn metrics(&self, disk: &str, f: impl FnOnce(&mut DiskMetrics)) {
        let mut m = self.metrics.lock().expect("metrics lock");
        let e = m.entry(disk.to_owned()).or_insert_with(|| DiskMetrics {
            disk: disk.to_owned(),
            ..DiskMetrics::default()
        });
        f(e);
    }
}

/// Run until `stop` is set.
pub fn run(cfg: SidecarConfig, stop: Arc<AtomicBool>) -> Result<()> {
    let _lock = lock(&cfg.state)?;
    let host = host_name(&cfg)?;
    let tls = tls::client_config(&cfg.credentials, &host)
        .map_err(|e| Error::protocol(format!("load credentials of host {host}"), e))?;
    let filter = FilterControl::new(&cfg.state);
    let shared = Arc::new(Shared {
        cfg,
        host,
        tls,
        filter,
        stop,
        metrics: Mutex::new(BTreeMap::new()),
        metrics_file: Mutex::new(()),
        nonce_lock: Mutex::new(()),
    });
    let disks = wait_for_filter(&shared)?;
    let mut threads = Vec::new();
    for disk in disks {
        let s = Arc::clone(&shared);
        let name = disk.name.clone();
        let t = std::thread::Builder::new()
            .name(format!("ship-{name}"))
            .spawn(move || disk_thread(&s, &disk))
            .map_err(|e| Error::with_source(ErrorKind::Io, format!("spawn ship-{name}"), e))?;
        threads.push(t);
    }
    let disk_threads = threads.len();
    if let Some(policy) = shared.cfg.policy.clone() {
        let s = Arc::clone(&shared);
        let t = std::thread::Builder::new()
            .name("points".into())
            .spawn(move || schedule_points(&s, &policy))
            .map_err(|e| Error::with_source(ErrorKind::Io, "spawn points", e))?;
        threads.push(t);
    }
    tracing::info!(host = %shared.host, target = %shared.cfg.target, disks = disk_threads, "sidecar running");
    let mut last_raw: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
    while !shared.stopping() {
        update_churn(&shared, &mut last_raw);
        shared.publish_metrics();
        shared.nap(Duration::from_secs(1));
    }
    for t in threads {
        let _ = t.join();
    }
    shared.publish_metrics();
    Ok(())
}

/// Update the churn figures (bytes per second since the last call).
fn update_churn(shared: &Shared, last_raw: &mut BTreeMap<String, (u64, Instant)>) {
    let now = Instant::now();
    let mut m = shared.metrics.lock().expect("metrics lock");
    for d in m.values_mut() {
        let (raw0, t0) = last_raw.get(&d.disk).copied().unwrap_or((d.raw_bytes, now));
        let secs = now.duration_since(t0).as_secs_f64();
        if secs > 0.0 {
            d.churn_bytes_per_sec = (d.raw_bytes - raw0.min(d.raw_bytes)) as f64 / secs;
        }
        last_raw.insert(d.disk.clone(), (d.raw_bytes, now));
    }
}

/// Take crash- and app-consistent points on the policy's schedule. A point
/// is requested only while every disk's replica is consistent; the filter
/// refuses while a disk is not in the data state. Either way the reason
/// goes into the metrics (`last_point_error`).
fn schedule_points(shared: &Shared, policy: &crate::policy::Policy) {
    let start = Instant::now();
    let mut next_crash = start + policy.crash_interval;
    let mut next_app = policy.app_interval.map(|i| start + i);
    while !shared.stopping() {
        let now = Instant::now();
        let app_due = next_app.is_some_and(|t| now >= t);
        if app_due || now >= next_crash {
            let result = take_point(shared, policy, app_due);
            let at = now_ns();
            {
                let mut m = shared.metrics.lock().expect("metrics lock");
                for d in m.values_mut() {
                    match &result {
                        Ok(()) => {
                            d.last_crash_point_ns = Some(at);
                            if app_due {
                                d.last_app_point_ns = Some(at);
                            }
                            d.last_point_error = None;
                        }
                        Err(e) => d.last_point_error = Some(e.clone()),
                    }
                }
            }
            if let Err(e) = result {
                tracing::warn!(app = app_due, reason = %e, "no recovery point made");
            }
            next_crash = Instant::now() + policy.crash_interval;
            if app_due {
                next_app = policy.app_interval.map(|i| Instant::now() + i);
            }
        }
        let wake = next_app.map_or(next_crash, |a| a.min(next_crash));
        shared.nap(wake.saturating_duration_since(Instant::now()));
    }
}

fn take_point(
    shared: &Shared,
    policy: &crate::policy::Policy,
    app: bool,
) -> std::result::Result<(), String> {
    let inconsistent: Vec<String> = shared
        .metrics
        .lock()
        .expect("metrics lock")
        .values()
        .filter(|d| d.consistent_since.is_none())
        .map(|d| d.disk.clone())
        .collect();
    if !inconsistent.is_empty() {
        return Err(format!(
            "replica of {} not consistent yet (initial copy or resync running)",
            inconsistent.join(", ")
        ));
    }
    let secs = now_ns() / 1_000_000_000;
    let made = if app {
        shared.filter.tag_app(
            &format!("app-{secs}"),
            &policy.app_mounts,
            policy.app_pre.as_deref(),
            policy.app_post.as_deref(),
            Duration::from_secs(10),
        )
    } else {
        shared.filter.tag(&format!("crash-{secs}"))
    };
    made.map(|_| ()).map_err(|e| e.to_string())
}

/// The filter's disks, waiting (with a log line) until the filter answers.
fn wait_for_filter(shared: &Shared) -> Result<Vec<FilterDisk>> {
    let mut logged = false;
    loop {
        match shared.filter.status() {
            Ok(st) => return Ok(st.disks),
            Err(e) if !logged => {
                tracing::warn!(error = %e, "waiting for the filter");
                logged = true;
            }
            Err(_) => {}
        }
        if shared.stopping() {
            return Ok(Vec::new());
        }
        shared.nap(Duration::from_millis(500));
    }
}

fn disk_thread(shared: &Shared, disk: &FilterDisk) {
    let mut backoff = Duration::from_millis(500);
    let mut session = match DiskSession::new(shared, disk) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(disk = %disk.name, error = %e, "cannot ship this disk");
            shared.metrics(&disk.name, |m| m.last_error = Some(e.to_string()));
            return;
        }
    };
    while !shared.stopping() {
        let started = Instant::now();
        match session.connect_and_ship(shared) {
            Ok(()) => break,
            Err(e) => {
                if e.kind() == ErrorKind::Gap {
                    session.gap = true;
                }
                tracing::warn!(disk = %disk.name, error = %e, retry_in = ?backoff, "shipping interrupted");
                shared.metrics(&disk.name, |m| {
                    m.connected = false;
                    m.reconnects += 1;
                    m.last_error = Some(e.to_string());
                });
                shared.publish_metrics();
            }
        }
        if started.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_millis(500);
        }
        session.spool_for(shared, backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    shared.metrics(&disk.name, |m| m.connected = false);
}

/// One disk's shipping state across reconnects.
struct DiskSession {
    name: String,
    size: u64,
    ring_path: PathBuf,
    backing: DirectReader,
    key: Key,
    nonces: Nonces,
    consumer: Option<Consumer>,
    local: LocalDisk,
    /// The target reported a gap: open a new epoch on reconnect.
    gap: bool,
    /// When `local` was last saved for its `acked_seq`.
    acked_saved: Instant,
    /// Sets drained while the target is unreachable.
    spool: Spool,
    /// The stream's chain (batcher, consistency) since the last connect;
    /// what the spool continues while disconnected.
    chain: Option<Chain>,
}

/// Where the stream stands: what the next set chains to, and its claim.
#[derive(Debug)]
struct Chain {
    batcher: Batcher,
    consistency: Consistency,
}

impl DiskSession {
    fn new(shared: &Shared, disk: &FilterDisk) -> Result<DiskSession> {
        let key = credentials::data_key(&shared.cfg.credentials, &shared.host, &disk.name)
            .map_err(|e| Error::protocol(format!("data key of disk {}", disk.name), e))?;
        // Resync reads bypass the page cache (O_DIRECT through io_uring
        // into registered buffers) where the file system allows it.
        let backing = DirectReader::open(&disk.path).map_err(|e| {
            Error::with_source(ErrorKind::Io, format!("open {}", disk.path.display()), e)
        })?;
        tracing::info!(disk = %disk.name, direct = backing.direct(), registered = backing.registered(), "backing device open for resync reads");
        let stream = {
            let _g = shared.nonce_lock.lock().expect("nonce lock");
            next_nonce_stream(&shared.cfg.state.join(SIDECAR_DIR))?
        };
        Ok(DiskSession {
            name: disk.name.clone(),
            size: disk.size,
            ring_path: shared.cfg.state.join("disks").join(&disk.name).join("ring"),
            backing,
            key,
            nonces: Nonces::new(stream)?,
            consumer: None,
            local: LocalDisk::load(&shared.cfg.state, &disk.name),
            gap: false,
            acked_saved: Instant::now(),
            spool: Spool::open(
                &shared
                    .cfg
                    .state
                    .join(SIDECAR_DIR)
                    .join("spool")
                    .join(&disk.name),
                shared.cfg.spool_size,
            )?,
            chain: None,
        })
    }

    /// The ring, reopened if the filter recreated it.
    fn consumer(&mut self) -> Result<&mut Consumer> {
        let stale = self
            .consumer
            .as_ref()
            .is_some_and(|c| c.check_generation().is_err());
        if stale || self.consumer.is_none() {
            self.consumer = None;
            let c = Consumer::open(&self.ring_path)
                .map_err(|e| Error::ring(format!("open ring {}", self.ring_path.display()), e))?;
            self.consumer = Some(c);
        }
        self.consumer
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Ring, "ring not open"))
    }

    fn connect_and_ship(&mut self, shared: &Shared) -> Result<()> {
        let generation = self.consumer()?.generation();
        let stream = match &shared.cfg.target_name {
            None => tls::connect(&shared.cfg.target, Arc::clone(&shared.tls), NET_TIMEOUT),
            Some(name) => tls::server_name_for(name).and_then(|sn| {
                tls::connect_as(&shared.cfg.target, sn, Arc::clone(&shared.tls), NET_TIMEOUT)
            }),
        }
        .map_err(|e| {
            Error::with_source(
                ErrorKind::Transport,
                format!("connect to {}", shared.cfg.target),
                e,
            )
        })?;
        let hello = DiskHello {
            name: self.name.clone(),
            size: self.size,
            ring_generation: generation,
        };
        let (mut transport, resume) = NetTransport::handshake(
            stream,
            &shared.host,
            vec![hello],
            crate::policy::Policy::hello_retention_secs(shared.cfg.policy.as_ref()),
            shared.cfg.max_frame,
            shared.cfg.bandwidth,
        )?;
        let resume = resume
            .into_iter()
            .find(|r| r.name == self.name)
            .ok_or_else(|| {
                Error::new(ErrorKind::Rejected, "the target's Welcome lacks this disk")
            })?;
        let delivered = self.deliver_spool(shared, &mut transport, resume.next_seq)?;
        // What the target holds now: its resume point, or the spool's end.
        let (target_last, target_epoch) = match delivered {
            Some(d) => (d.last_seq, d.epoch.max(resume.epoch)),
            None => (resume.next_seq.saturating_sub(1), resume.epoch),
        };
        // Resyncs compare checksums first once the replica held a full copy
        // or holds data from elsewhere (a failback's adopted image); during
        // an initial copy into an empty replica every block differs and
        // hashing would be wasted. Settling turns it on below.
        transport.set_exchange(resume.consistent_from != 0 || resume.seeded);
        transport.set_window(shared.cfg.window);
        let regressed = resume.next_seq != 0 && target_last < self.local.acked_seq;
        if regressed {
            tracing::error!(disk = %self.name, target_last, acked = self.local.acked_seq, "the target lost acknowledged change sets: full resync");
        }
        let effective = DiskResume {
            epoch: target_epoch,
            ..resume.clone()
        };
        let plan = plan_epoch(&self.local, &effective, generation, self.gap || regressed);
        // The claim: what the delivered spool ended with, else the one
        // carried on from before the outage, else the target's.
        let mut consistency = match (delivered, self.chain.take()) {
            (Some(d), _) => Consistency::resume(d.consistent_from),
            (None, Some(c)) if resume.next_seq != 0 => c.consistency,
            _ => Consistency::resume(resume.consistent_from),
        };
        if plan.resync_all {
            let bytes = shared.filter.resync_all(&self.name)?;
            tracing::warn!(disk = %self.name, bytes, "the target lacks this disk's data: full resync");
        }
        if plan.new_epoch || plan.resync_all || resume.next_seq == 0 {
            consistency.broken_at(target_last.saturating_add(1));
        }
        if plan.new_epoch {
            tracing::warn!(disk = %self.name, epoch = plan.epoch, "new epoch: records may be missing at the target; resyncing the dirty regions");
        }
        self.gap = false;
        self.local.epoch = plan.epoch;
        self.local.ring_generation = Some(generation);
        // Whatever the target holds now is the new baseline (a regression
        // is being repaired by the full resync above).
        self.local.acked_seq = target_last;
        self.local.save(&shared.cfg.state, &self.name)?;
        self.acked_saved = Instant::now();
        let resume_after = target_last;
        let spooled = delivered.map(|d| d.last_seq);
        let batcher = Batcher::new(&shared.host, &self.name, plan.epoch, resume_after)
            .with_state_dir(&shared.cfg.state);
        shared.metrics(&self.name, |m| {
            m.connected = true;
            m.epoch = plan.epoch;
            m.last_error = None;
            m.spool_sets = 0;
            m.spool_bytes = 0;
        });
        shared.publish_metrics();
        tracing::info!(disk = %self.name, next_seq = resume.next_seq, epoch = plan.epoch, consistent_from = resume.consistent_from, spooled = ?spooled, "connected to the target");
        let mut chain = Chain {
            batcher,
            consistency,
        };
        let result = self.ship(shared, &mut transport, &mut chain);
        if let Some(c) = self.consumer.as_mut() {
            chain.batcher.rewind(c);
        }
        self.chain = Some(chain);
        result
    }

    /// Send what the spool holds, in order, before anything from the ring.
    /// Returns what the last delivered set was. Spooled sets the target
    /// cannot take (it holds nothing, or refuses them) left the ring
    /// already: the filter marks the whole disk for resync (durably) before
    /// they are dropped, and a refusal opens a new epoch.
    fn deliver_spool(
        &mut self,
        shared: &Shared,
        transport: &mut NetTransport<tls::ClientStream>,
        next_seq: u64,
    ) -> Result<Option<Delivered>> {
        if self.spool.is_empty() {
            return Ok(None);
        }
        if next_seq == 0 {
            // A new or wiped site cannot take a continuation.
            tracing::warn!(disk = %self.name, sets = self.spool.len(), "the target holds nothing: dropping the spool, full resync follows");
            shared.filter.resync_all(&self.name)?;
            self.spool.clear()?;
            return Ok(None);
        }
        let sets = self.spool.len();
        match self.spool.flush_to(transport) {
            Ok(last) => {
                tracing::info!(disk = %self.name, sets, "spool delivered");
                Ok(last)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Gap | ErrorKind::Rejected | ErrorKind::Corrupt
                ) =>
            {
                tracing::error!(disk = %self.name, error = %e, "the target cannot take the spooled sets: full resync, then dropping them");
                shared.filter.resync_all(&self.name)?;
                self.spool.clear()?;
                self.chain = None;
                Err(Error::new(
                    ErrorKind::Gap,
                    format!("spooled sets refused ({e}); resyncing in a new epoch"),
                ))
            }
            Err(e) => Err(e),
        }
    }

    /// While the target is unreachable, for up to `d`: keep draining the
    /// ring into the spool (in the chain of the last connection), so the
    /// ring does not overflow. Without a chain (never connected since
    /// start) or with the spool full, just wait.
    fn spool_for(&mut self, shared: &Shared, d: Duration) {
        let deadline = Instant::now() + d;
        let mut full_logged = false;
        while !shared.stopping() && Instant::now() < deadline {
            match self.spool_once(shared) {
                Ok(true) => {}
                Ok(false) => {
                    let c = self.consumer.as_mut();
                    let left = deadline.saturating_duration_since(Instant::now());
                    match c {
                        Some(c) => {
                            let _ = c.wait(left.min(Duration::from_millis(200)));
                        }
                        None => shared.nap(left.min(Duration::from_millis(200))),
                    }
                }
                Err(e) => {
                    if e.kind() == ErrorKind::TooLarge {
                        if !full_logged {
                            tracing::warn!(disk = %self.name, error = %e, "spool full: the ring will overflow into metadata/bitmap state (resync later)");
                            full_logged = true;
                        }
                    } else {
                        tracing::warn!(disk = %self.name, error = %e, "spooling failed");
                    }
                    shared.nap(deadline.saturating_duration_since(Instant::now()));
                }
            }
        }
        let (sets, bytes) = (self.spool.len(), self.spool.bytes());
        shared.metrics(&self.name, |m| {
            m.spool_sets = u64::try_from(sets).unwrap_or(u64::MAX);
            m.spool_bytes = bytes;
        });
        shared.publish_metrics();
    }

    /// One drain of the ring into the spool; Ok(true) if sets were spooled.
    fn spool_once(&mut self, shared: &Shared) -> Result<bool> {
        if self.chain.is_none() {
            return Ok(false);
        }
        self.follow_ring_generation(shared)?;
        let (Some(chain), Some(consumer)) = (self.chain.as_mut(), self.consumer.as_mut()) else {
            return Ok(false);
        };
        let mut barrier = || shared.filter.barrier();
        let mut stamp = DiskStamp {
            nonces: &mut self.nonces,
            consistency: &mut chain.consistency,
            barrier: &mut barrier,
        };
        let stats = drain_once(
            consumer,
            &mut chain.batcher,
            &self.backing,
            &self.key,
            &mut SpoolTransport {
                spool: &mut self.spool,
            },
            &mut stamp,
            shared.cfg.ship_options(),
        )?;
        Ok(stats.change_sets > 0)
    }

    /// While spooling: if the filter recreated the ring, its unshipped
    /// records are gone (the filter's dirty bits cover them), so the chain
    /// continues in a new epoch that declares the replica inconsistent.
    fn follow_ring_generation(&mut self, shared: &Shared) -> Result<()> {
        let before = self.consumer.as_ref().map(Consumer::generation);
        let consumer = self.consumer()?;
        let generation = consumer.generation();
        if before == Some(generation) {
            return Ok(());
        }
        let Some(chain) = self.chain.as_mut() else {
            return Ok(());
        };
        let consumer = self
            .consumer
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Ring, "ring not open"))?;
        chain.batcher.rewind(consumer);
        let epoch = chain.batcher.epoch() + 1;
        chain.batcher.set_epoch(epoch);
        chain
            .consistency
            .broken_at(chain.batcher.acked_end().saturating_add(1));
        self.local.epoch = epoch;
        self.local.ring_generation = Some(generation);
        self.local.save(&shared.cfg.state, &self.name)?;
        tracing::warn!(disk = %self.name, epoch, "ring recreated while disconnected: new epoch");
        Ok(())
    }

    fn ship(
        &mut self,
        shared: &Shared,
        transport: &mut NetTransport<tls::ClientStream>,
        chain: &mut Chain,
    ) -> Result<()> {
        let options = shared.cfg.ship_options();
        let mut last_progress = Instant::now() - PROGRESS;
        let mut last_traffic = Instant::now();
        let mut last_tag: Option<Instant> = None;
        let mut wire_consistent = false;
        let mut peak = PeakLag::default();
        while !shared.stopping() {
            let consumer = self
                .consumer
                .as_mut()
                .ok_or_else(|| Error::new(ErrorKind::Ring, "ring not open"))?;
            consumer
                .check_generation()
                .map_err(|e| Error::ring("the filter recreated the ring", e))?;
            // The lag before draining: its peak over a report interval is
            // the RPO the user sees (after a drain it would read zero).
            peak.observe(
                consumer
                    .lag()
                    .map_err(|e| Error::ring("read the ring's lag", e))?,
            );
            let mut barrier = || shared.filter.barrier();
            let mut stamp = DiskStamp {
                nonces: &mut self.nonces,
                consistency: &mut chain.consistency,
                barrier: &mut barrier,
            };
            let stats = drain_once(
                consumer,
                &mut chain.batcher,
                &self.backing,
                &self.key,
                transport,
                &mut stamp,
                options,
            )?;
            if stats.change_sets > 0 {
                last_traffic = Instant::now();
                wire_consistent = stats.last_consistent_from != 0;
                self.local.acked_seq = self.local.acked_seq.max(stats.last_seq);
                if !self.local.shipped || self.acked_saved.elapsed() >= Duration::from_secs(1) {
                    self.local.shipped = true;
                    self.local.save(&shared.cfg.state, &self.name)?;
                    self.acked_saved = Instant::now();
                }
                shared.metrics(&self.name, |m| {
                    m.change_sets += stats.change_sets;
                    m.resync_sets += stats.resync_sets;
                    m.records += stats.records;
                    m.raw_bytes += stats.raw_bytes;
                    m.shipped_bytes += stats.sealed_bytes;
                    m.resync_raw_bytes += stats.resync_raw_bytes;
                    m.zero_bytes += stats.zero_bytes;
                    m.exchange_skipped_bytes += stats.exchange_skipped_bytes;
                    m.acked_seq = stats.last_seq;
                    if m.shipped_bytes > 0 {
                        m.compression_ratio = m.raw_bytes as f64 / m.shipped_bytes as f64;
                    }
                });
            }
            let idle = stats.change_sets == 0;
            if idle && chain.consistency.since().is_none() {
                self.try_settle(shared, &mut chain.consistency)?;
                let since = chain.consistency.since();
                if since.is_some() {
                    // A tag may carry the new claim right away, and later
                    // resyncs are worth a checksum exchange.
                    last_tag = None;
                    transport.set_exchange(true);
                }
                shared.metrics(&self.name, |m| m.consistent_since = since);
            }
            if idle && chain.consistency.since().is_some() && !wire_consistent {
                // Nothing is being written: let a tag carry the claim.
                if last_tag.is_none_or(|t| t.elapsed() >= TAG_INTERVAL) {
                    last_tag = Some(Instant::now());
                    match shared
                        .filter
                        .tag(&format!("ferry-consistent-{}", now_ns() / 1_000_000_000))
                    {
                        Ok(seq) => {
                            tracing::info!(disk = %self.name, seq, "consistency point tagged")
                        }
                        Err(e) => {
                            tracing::debug!(disk = %self.name, error = %e, "consistency tag refused; retrying later")
                        }
                    }
                }
            }
            let consumer = self
                .consumer
                .as_mut()
                .ok_or_else(|| Error::new(ErrorKind::Ring, "ring not open"))?;
            if last_progress.elapsed() >= PROGRESS {
                last_progress = Instant::now();
                peak.observe(
                    consumer
                        .lag()
                        .map_err(|e| Error::ring("read the ring's lag", e))?,
                );
                let mut lag = std::mem::take(&mut peak);
                // The filter's view too: it knows the oldest change not yet
                // shipped even when the ring overflowed (metadata, bitmap).
                if let Ok(st) = shared.filter.status() {
                    if let Some(d) = st.disks.iter().find(|d| d.name == self.name) {
                        let ns = Duration::try_from_secs_f64(d.lag_seconds)
                            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                        lag.ns = lag.ns.max(ns);
                    }
                }
                transport.progress(Progress {
                    disk: self.name.clone(),
                    lag_records: lag.records,
                    lag_bytes: lag.bytes,
                    lag_ns: lag.ns,
                    time_ns: now_ns(),
                })?;
                let since = chain.consistency.since();
                shared.metrics(&self.name, |m| {
                    m.lag_records = lag.records;
                    m.lag_bytes = lag.bytes;
                    m.lag_seconds = Duration::from_nanos(lag.ns).as_secs_f64();
                    m.consistent_since = since;
                });
            }
            if last_traffic.elapsed() >= HEARTBEAT {
                transport.heartbeat()?;
                last_traffic = Instant::now();
            }
            if idle {
                let woke = consumer
                    .wait(Duration::from_millis(200))
                    .map_err(|e| Error::ring("wait for records", e))?;
                if woke && !shared.cfg.batch_delay.is_zero() {
                    // Let a trickle of writes gather into one change set
                    // (one fsync at the target) instead of one set each.
                    std::thread::sleep(shared.cfg.batch_delay);
                }
            }
        }
        Ok(())
    }

    /// The filter says nothing is dirty and it is in the data state, and
    /// every record published before it said so has been shipped: the
    /// replica is consistent again (see [`Consistency::settle`]).
    fn try_settle(&mut self, shared: &Shared, consistency: &mut Consistency) -> Result<()> {
        let status = shared.filter.status()?;
        let Some(d) = status.disks.iter().find(|d| d.name == self.name) else {
            return Ok(());
        };
        if !d.settled() {
            return Ok(());
        }
        let barrier = shared.filter.barrier()?;
        let consumer = self
            .consumer
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::Ring, "ring not open"))?;
        if consumer.committed() < consumer.published() {
            // Records arrived meanwhile; they may be re-read data. Next round.
            return Ok(());
        }
        if let Some(c) = consistency.settle(barrier) {
            tracing::info!(disk = %self.name, consistent_from = c, "resync complete: the replica is consistent from this sequence");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resume(next_seq: u64, epoch: u64) -> DiskResume {
        DiskResume {
            name: "d".into(),
            next_seq,
            epoch,
            consistent_from: 0,
            seeded: false,
        }
    }

    #[test]
    fn epoch_plans() {
        let fresh = LocalDisk::default();
        // First protection: a fresh chain at epoch 1, no resync-all.
        let p = plan_epoch(&fresh, &resume(0, 0), 5, false);
        assert_eq!((p.epoch, p.new_epoch, p.resync_all), (1, false, false));
        // Same ring, target continues: same epoch.
        let known = LocalDisk {
            epoch: 3,
            ring_generation: Some(5),
            shipped: true,
            acked_seq: 99,
        };
        let p = plan_epoch(&known, &resume(100, 3), 5, false);
        assert_eq!((p.epoch, p.new_epoch, p.resync_all), (3, false, false));
        // Ring recreated: new epoch, the dirty bits cover the loss.
        let p = plan_epoch(&known, &resume(100, 3), 6, false);
        assert_eq!((p.epoch, p.new_epoch, p.resync_all), (4, true, false));
        // Gap with the same ring: unexplained, full resync.
        let p = plan_epoch(&known, &resume(100, 3), 5, true);
        assert_eq!((p.epoch, p.new_epoch, p.resync_all), (4, true, true));
        // Target lost the disk this sidecar shipped before.
        let p = plan_epoch(&known, &resume(0, 0), 5, false);
        assert!(p.resync_all);
        // The target's epoch is ahead of ours (another sidecar state).
        let p = plan_epoch(&fresh, &resume(100, 7), 5, false);
        assert_eq!((p.epoch, p.new_epoch), (8, true));
        // An epoch opened locally that never reached the target is reopened.
        let ahead = LocalDisk {
            epoch: 4,
            ..known.clone()
        };
        let p = plan_epoch(&ahead, &resume(100, 3), 5, false);
        assert_eq!((p.epoch, p.new_epoch, p.resync_all), (5, true, false));
        // A seeded replica (a failback's adopted image): a first protection
        // compares the whole disk, holes included.
        let seeded = DiskResume {
            seeded: true,
            ..resume(0, 0)
        };
        let p = plan_epoch(&fresh, &seeded, 5, false);
        assert_eq!((p.epoch, p.new_epoch, p.resync_all), (1, false, true));
        // Once sets arrived, the seed no longer decides.
        let p = plan_epoch(
            &known,
            &DiskResume {
                next_seq: 100,
                epoch: 3,
                ..seeded
            },
            5,
            false,
        );
        assert!(!p.resync_all);
    }
}
