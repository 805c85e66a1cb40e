//! `ferry target`: accept authenticated sidecars over TLS and keep their
//! disks' journals and replicas (see [`crate::site`] and [`crate::server`]).
//!
//! One thread accepts (`accept`), one thread per connection
//! (`conn-PEER`), one applier thread per disk (`apply-HOST-DISK`).

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::{credentials, frame, tls};
use ferry_vhd::Format;

use crate::error::{Error, ErrorKind, Result};
use crate::server::{serve_connection, RefusalLog, ServerContext};
use crate::site::{Site, SiteOptions};

/// Name of the lock file in the data directory.
pub const LOCK_FILE: &str = "target.lock";
/// A connection with no frame for this long is dropped (sidecars send a
/// heartbeat every few seconds when idle).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a TLS handshake or a single write may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Most connections served at once (one thread each); more are closed at
/// once, so a flood of half-open handshakes cannot exhaust the target.
pub const MAX_CONNECTIONS: usize = 512;

/// How to run the target.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Data directory.
    pub data: PathBuf,
    /// Address to listen on (`127.0.0.1:9443`).
    pub listen: String,
    /// Credentials directory (ca.crt, NAME.crt, NAME.key, HOST.datakey).
    pub credentials: PathBuf,
    /// This target's name (its certificate's name).
    pub name: String,
    /// Replica format for new disks.
    pub replica_format: Format,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// How long recovery points are kept for hosts whose policy names no
    /// retention (`ferry target --retention`; see
    /// [`crate::hostpolicy::retention`]).
    pub retention: Duration,
    /// Size of the undo log's segment files ([`crate::undo`]).
    pub history_segment_size: u64,
}

impl TargetConfig {
    /// Defaults for everything but the three required paths.
    pub fn new(data: PathBuf, listen: String, credentials: PathBuf) -> TargetConfig {
        TargetConfig {
            data,
            listen,
            credentials,
            name: credentials::DEFAULT_TARGET.to_owned(),
            replica_format: Format::VhdDynamic,
            max_frame: frame::MAX_FRAME,
            retention: Duration::from_secs(24 * 60 * 60),
            history_segment_size: crate::undo::DEFAULT_SEGMENT_SIZE,
        }
    }
}

/// Hold `DATA/target.lock` for the life of the returned file.
pub fn lock_data_dir(data: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(data).map_err(|e| Error::io("create data directory", data, e))?;
    let path = data.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("open lock file", &path, e))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "lock data directory",
            "another ferry target is running on this data directory",
        )
        .at_path(&path));
    }
    Ok(f)
}

/// Whether a target holds the data directory's lock now.
pub fn is_running(data: &Path) -> bool {
    let Ok(f) = std::fs::File::open(data.join(LOCK_FILE)) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    rc != 0
}

/// File in the data directory naming the credentials directory the target
/// last ran with (so that verbs run without a target can open disks).
pub const TARGET_FILE: &str = "target.json";

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        return p.to_path_buf();
    }
    std::env::current_dir().map_or_else(|_| p.to_path_buf(), |d| d.join(p))
}

fn record_target(data: &Path, credentials: &Path, options: &SiteOptions) {
    let value = serde_json::json!({
        "credentials": credentials,
        "retention_secs": options.retention.as_secs(),
        "history_segment_size": options.history_segment_size,
    });
    if let Err(e) = crate::site::write_json_atomically(&data.join(TARGET_FILE), &value, true) {
        tracing::warn!(error = %e, "cannot record the credentials directory");
    }
}

/// The credentials directory and site options the target last ran with,
/// as far as recorded (defaults otherwise).
pub fn recorded_target(data: &Path) -> (Option<PathBuf>, SiteOptions) {
    let mut options = SiteOptions::default();
    let Some(v) = std::fs::read(data.join(TARGET_FILE))
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
    else {
        return (None, options);
    };
    if let Some(r) = v["retention_secs"].as_u64().filter(|&r| r > 0) {
        options.retention = Duration::from_secs(r);
    }
    if let Some(n) = v["history_segment_size"].as_u64().filter(|&n| n > 0) {
        options.history_segment_size = n;
    }
    (v["credentials"].as_str().map(PathBuf::from), options)
}

/// Run until `stop` is set. `ready` is called with the bound address once
/// the target accepts connections.
pub fn run(cfg: TargetConfig, stop: Arc<AtomicBool>, ready: impl FnOnce(&str)) -> Result<()> {
    let _lock = lock_data_dir(&cfg.data)?;
    let tls_config = tls::server_config(&cfg.credentials, &cfg.name).map_err(|e| {
        Error::new(
            ErrorKind::InvalidInput,
            "load target credentials",
            e.to_string(),
        )
        .at_path(&cfg.credentials)
    })?;
    let site_creds = absolute(&cfg.credentials);
    let options = SiteOptions {
        replica_format: cfg.replica_format,
        retention: cfg.retention,
        history_segment_size: cfg.history_segment_size,
    };
    record_target(&cfg.data, &site_creds, &options);
    let site = Arc::new(Site::new(
        &cfg.data,
        options,
        Box::new(move |host, disk| {
            credentials::data_key(&site_creds, host, disk).map_err(|e| e.to_string())
        }),
    )?);
    // Appliers catch up on what the journals hold before anything else.
    let opened = site.open_all();
    if opened > 0 {
        tracing::info!(disks = opened, "disks opened: their journals are applied");
    }
    // Without the control socket (a path too long for a unix socket) the
    // target still replicates; the verbs then say how to run them.
    let control = match crate::control::serve(Arc::clone(&site), Arc::clone(&stop)) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "no control socket: failover verbs need the target stopped");
            None
        }
    };
    let creds = cfg.credentials.clone();
    let ctx = Arc::new(ServerContext {
        site: Arc::clone(&site),
        target_name: cfg.name.clone(),
        keys: Box::new(move |host, disk| {
            credentials::data_key(&creds, host, disk).map_err(|e| e.to_string())
        }),
        max_frame: cfg.max_frame,
        refusals: RefusalLog::default(),
    });
    let listener = TcpListener::bind(&cfg.listen)
        .map_err(|e| Error::io("listen", Path::new(&cfg.listen), e))?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| cfg.listen.clone());
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("listen", Path::new(&cfg.listen), e))?;
    tracing::info!(listen = %local, data = %cfg.data.display(), "target ready");
    ready(&local);
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((tcp, addr)) => {
                let peer = addr.to_string();
                if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    ctx.refusals.log(
                        &peer,
                        &crate::server::Refusal {
                            code: 0,
                            message: format!("{MAX_CONNECTIONS} connections open: closed"),
                        },
                    );
                    continue;
                }
                let ctx = Arc::clone(&ctx);
                let tls_config = Arc::clone(&tls_config);
                let slot = ConnectionSlot::take(&active);
                let spawned = std::thread::Builder::new()
                    .name(format!("conn-{peer}"))
                    .spawn(move || {
                        let _slot = slot;
                        handle(&ctx, tcp, tls_config, &peer);
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot spawn a connection thread");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_readable(&listener),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    tracing::info!("target stopping");
    if let Some(t) = control {
        let _ = t.join();
    }
    site.shutdown();
    Ok(())
}

/// One of the [`MAX_CONNECTIONS`], given back when dropped.
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    fn take(active: &Arc<AtomicUsize>) -> ConnectionSlot {
        active.fetch_add(1, Ordering::Relaxed);
        ConnectionSlot(Arc::clone(active))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Wait up to 100 ms for a connection to accept (then the stop flag is
/// checked again).
fn wait_readable(listener: &TcpListener) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd that lives across the call.
    unsafe { libc::poll(&mut fd, 1, 100) };
}

fn handle(ctx: &ServerContext, tcp: TcpStream, cfg: Arc<rustls::ServerConfig>, peer: &str) {
    let setup = tcp
        .set_nonblocking(false)
        .and_then(|()| tcp.set_read_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| tcp.set_write_timeout(Some(IO_TIMEOUT)));
    if let Err(e) = setup {
        tracing::warn!(peer, error = %e, "socket setup failed");
        return;
    }
    let mut stream = match tls::accept(tcp, cfg) {
        Ok(s) => s,
        Err(e) => {
            ctx.refusals.log(
                peer,
                &crate::server::Refusal {
                    code: 0,
                    message: format!("TLS handshake: {e}"),
                },
            );
            return;
        }
    };
    if let Err(e) = stream.sock.set_read_timeout(Some(IDLE_TIMEOUT)) {
        tracing::warn!(peer, error = %e, "socket setup failed");
        return;
    }
    serve_connection(ctx, &mut stream, peer, |s, host| {
        tls::peer_host_matches(&s.conn, host)
    });
}
