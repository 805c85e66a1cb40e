//! `ferry server init` and `ferry server run`: the data directory and the
//! TLS listener.
//!
//! Data directory (0700):
//!
//! | path | what |
//! |---|---|
//! | `server.db` | the state ([`crate::db`]), with its `-wal` and `-shm` files |
//! | `credentials/` | the CA, the API certificate `ferry-server.crt`, and every registered host's and target's certificate (and host data keys), as `ferry credentials init` lays them out |
//! | `admin.token` | the admin token made by `init` (0600): `FERRY_TOKEN` for the CLI |
//! | `server.addr` | the address `run` listens on, rewritten at every start |
//!
//! The listener takes at most [`MAX_CONNECTIONS`] connections at a time,
//! one thread each (`api-conn`); a connection may carry several requests
//! (keep-alive) and is closed after [`IDLE_TIMEOUT`] of silence. A janitor
//! thread fails jobs whose owner stopped reporting.

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::http::{self, HttpErrorKind, Response};
use ferry_api::types::Role;
use ferry_protocol::credentials::{self, ServerCert};

use crate::api::{self, Api};
use crate::auth;
use crate::db::Store;
use crate::error::{Error, ErrorKind, Result};

/// The database file in the data directory.
pub const DB_FILE: &str = "server.db";
/// The credentials directory in the data directory.
pub const CREDENTIALS_DIR: &str = "credentials";
/// The admin token file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The file `run` writes its listening address to.
pub const ADDR_FILE: &str = "server.addr";
/// The name of the API's certificate in the credentials directory.
pub const SERVER_CERT_NAME: &str = "ferry-server";
/// Most connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection silent this long (between or within requests) is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often plan runs are moved on.
pub const PLAN_TICK: Duration = Duration::from_secs(1);
/// How often the janitor looks for jobs whose lease ran out.
pub const JANITOR_INTERVAL: Duration = Duration::from_secs(5);

/// How `run` runs beyond its address.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Serve Prometheus metrics (plain HTTP) here.
    pub metrics: Option<String>,
    /// A daemon silent this long raises `heartbeat-lost` (default 30 s).
    pub heartbeat_timeout_secs: Option<i64>,
}

/// What `init` made.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The data directory.
    pub data: PathBuf,
    /// The admin token (also in `DATA/admin.token`).
    pub admin_token: String,
    /// The CA certificate's path.
    pub ca_path: PathBuf,
    /// `sha256:HEX` of the CA certificate.
    pub ca_fingerprint: String,
}

/// Makes a new data directory: the CA and the API certificate (valid for
/// `localhost`, 127.0.0.1, ::1 and `names`), the database, an admin token.
/// Refuses a directory that already holds a database.
pub fn init(data: &Path, names: &[String]) -> Result<InitReport> {
    const OP: &str = "server init";
    let db_path = data.join(DB_FILE);
    if db_path.exists() {
        return Err(Error::new(
            ErrorKind::Conflict,
            OP,
            format!(
                "{} already exists: this data directory is in use",
                db_path.display()
            ),
        ));
    }
    make_private_dir(data)?;
    let creds = data.join(CREDENTIALS_DIR);
    let cert = ServerCert {
        name: SERVER_CERT_NAME.to_owned(),
        extra_names: names.to_vec(),
        client_use: true,
    };
    credentials::ensure(&creds, &[cert], &[])?;
    let store = Store::open(&db_path)?;
    let admin_token = auth::new_token(Role::Admin, false)?;
    store.add_token(
        &auth::token_hash(&admin_token),
        Role::Admin,
        None,
        false,
        None,
        None,
    )?;
    write_private(
        &data.join(ADMIN_TOKEN_FILE),
        format!("{admin_token}\n").as_bytes(),
    )?;
    let ca_path = creds.join(credentials::CA_CERT);
    let ca_pem = std::fs::read(&ca_path).map_err(Error::io(OP, ca_path.display().to_string()))?;
    let ca_fingerprint = ferry_api::client::ca_fingerprint(&ca_pem)
        .map_err(|e| Error::new(ErrorKind::Credentials, OP, e.to_string()))?;
    Ok(InitReport {
        data: data.to_path_buf(),
        admin_token,
        ca_path,
        ca_fingerprint,
    })
}

/// Serves the API of the data directory `data` on `listen` until `stop`
/// is set (and Prometheus metrics, if `options` say so).
pub fn run(data: &Path, listen: &str, options: &RunOptions, stop: Arc<AtomicBool>) -> Result<()> {
    const OP: &str = "server run";
    let db_path = data.join(DB_FILE);
    if !db_path.exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            OP,
            format!(
                "{} does not exist: run `ferry server init --data {}` first",
                db_path.display(),
                data.display()
            ),
        ));
    }
    let store = Store::open(&db_path)?;
    let renewed = store.renew_running_leases()?;
    if renewed > 0 {
        tracing::info!(jobs = renewed, "running jobs get a fresh lease to report");
    }
    let creds = data.join(CREDENTIALS_DIR);
    let ca_path = creds.join(credentials::CA_CERT);
    let ca_pem =
        std::fs::read_to_string(&ca_path).map_err(Error::io(OP, ca_path.display().to_string()))?;
    let tls = ferry_protocol::tls::api_server_config(&creds, SERVER_CERT_NAME)?;
    let mut api = Api::new(store, creds, ca_pem)?;
    if let Some(secs) = options.heartbeat_timeout_secs {
        api = api.with_heartbeat_timeout(secs);
    }
    let api = Arc::new(api);
    let listener =
        TcpListener::bind(listen).map_err(Error::io(OP, format!("listen on {listen}")))?;
    let local = listener
        .local_addr()
        .map_err(Error::io(OP, "local address".into()))?;
    write_private(&data.join(ADDR_FILE), format!("{local}\n").as_bytes())?;
    listener
        .set_nonblocking(true)
        .map_err(Error::io(OP, "listener".into()))?;
    tracing::info!(addr = %local, data = %data.display(), "control-plane server listening");

    if let Some(addr) = options.metrics.as_deref() {
        let api = api.clone();
        let bound =
            ferry_api::metrics::spawn(addr, stop.clone(), Arc::new(move || api.metrics_page()))
                .map_err(Error::io(OP, format!("metrics on {addr}")))?;
        tracing::info!(addr = %bound, "metrics at http://{bound}/metrics");
    }
    let janitor = spawn_janitor(api.clone(), stop.clone())?;
    let runner = {
        let (api, stop) = (api.clone(), stop.clone());
        std::thread::Builder::new()
            .name("plan-runner".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    crate::plans::tick(api.store());
                    std::thread::sleep(PLAN_TICK);
                }
            })
            .map_err(Error::io(OP, "plan runner thread".into()))?
    };
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "too many connections: refused");
                    drop(tcp);
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let (api, tls, active) = (api.clone(), tls.clone(), active.clone());
                let spawned =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            serve_connection(&api, tcp, tls);
                            active.fetch_sub(1, Ordering::AcqRel);
                        });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a connection thread");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    let _ = janitor.join();
    let _ = runner.join();
    tracing::info!("control-plane server stopped");
    Ok(())
}

fn spawn_janitor(api: Arc<Api>, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("api-janitor".into())
        .spawn(move || {
            let mut last = std::time::Instant::now() - JANITOR_INTERVAL;
            while !stop.load(Ordering::Relaxed) {
                crate::groups::take_due(api.coordinator(), api.store());
                if last.elapsed() >= JANITOR_INTERVAL {
                    last = std::time::Instant::now();
                    match api.expire_jobs() {
                        Ok(jobs) => {
                            for job in jobs {
                                tracing::warn!(job = job.id, kind = %job.kind, error = ?job.error, "job failed: lease ran out");
                            }
                        }
                        Err(e) => tracing::error!(error = %e, "expiring jobs failed"),
                    }
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
        })
        .map_err(Error::io("server run", "janitor thread".into()))
}

/// Serves one connection: TLS handshake, then requests until the client
/// closes, asks to close, sends something unparsable or stays silent past
/// [`IDLE_TIMEOUT`].
fn serve_connection(api: &Api, tcp: TcpStream, tls: Arc<rustls::ServerConfig>) {
    let peer_addr = tcp.peer_addr().ok();
    let peer_ip = peer_addr.map(|a| a.ip());
    let peer = peer_addr.map(|a| a.to_string()).unwrap_or_default();
    if tcp.set_nonblocking(false).is_err()
        || tcp.set_read_timeout(Some(IDLE_TIMEOUT)).is_err()
        || tcp.set_write_timeout(Some(IDLE_TIMEOUT)).is_err()
    {
        return;
    }
    let stream = match ferry_protocol::tls::accept(tcp, tls) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    loop {
        let req = match http::read_request(&mut reader) {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                if !matches!(e.kind, HttpErrorKind::Io | HttpErrorKind::Closed) {
                    let answer = api::error_response(&Error::new(
                        ErrorKind::Invalid,
                        "read request",
                        e.to_string(),
                    ));
                    let answer = Response {
                        status: e.status(),
                        ..answer
                    };
                    let _ = http::write_response(reader.get_mut(), &answer, true);
                }
                return;
            }
        };
        let close = req.wants_close();
        let resp = api.handle(&req, peer_ip);
        tracing::debug!(%peer, method = req.method.as_str(), path = %req.path, status = resp.status, "request");
        let stream = reader.get_mut();
        if http::write_response(stream, &resp, close).is_err() || stream.flush().is_err() || close {
            return;
        }
    }
}

/// Creates `dir` (and parents) with mode 0700.
pub fn make_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Error::io("server init", dir.display().to_string()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io("server init", dir.display().to_string()))
}

/// Writes a 0600 file through a temporary file, fsync and a rename (as
/// the credentials are written).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(credentials::write_secret(path, bytes, true)?)
}
