//! The operator's verbs on a data directory: failover, commit, test
//! failover and its cleanup.
//!
//! The running `ferry target` owns its data directory (appliers, journals,
//! the replica files), so it runs these verbs itself: `DATA/control.sock`
//! (mode 0600) takes one JSON request a connection and answers with
//! progress lines and one final line:
//!
//! ```text
//! -> {"op":"failover","host":"web01","point":"latest","format":"vhd-dynamic","out":"/dr/web01","change_point":false,"checksums":true}
//! <- {"progress":"replication of web01 stopped"}
//! <- {"done":{ ...the manifest... }}        or  {"error":"..."}
//! ```
//!
//! When no target runs, the CLI takes the data directory's lock and runs
//! the same [`execute`] on a [`Site`] of its own.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::failover::{self, FailoverRequest, PointSpec};
use crate::site::Site;

/// The control socket's file name in the data directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// A verb.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// `ferry failover`.
    Failover {
        /// Host.
        host: String,
        /// Point (`latest`, `latest-processed`, `latest-app`, a time or a name).
        point: String,
        /// Image format name.
        format: String,
        /// Output directory.
        out: PathBuf,
        /// Replace the point of a failed-over host.
        #[serde(default)]
        change_point: bool,
        /// SHA-256 of every image in the manifest.
        #[serde(default = "yes")]
        checksums: bool,
    },
    /// `ferry commit`.
    Commit {
        /// Host.
        host: String,
    },
    /// `ferry test-failover`.
    TestFailover {
        /// Host.
        host: String,
        /// Point.
        point: String,
        /// Output directory.
        out: PathBuf,
    },
    /// `ferry test-failover cleanup`.
    TestFailoverCleanup {
        /// Host.
        host: String,
    },
    /// `ferry reprotect`: accept the host's stream into seeded replicas.
    Reprotect {
        /// Host.
        host: String,
        /// Images adopted as replicas.
        #[serde(default)]
        images: Vec<crate::failback::Adopt>,
    },
    /// `ferry failback`: fail over into the replicas in place.
    Failback {
        /// Host.
        host: String,
        /// Point.
        point: String,
    },
}

fn yes() -> bool {
    true
}

/// One line of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// Something the operator should see now.
    Progress(String),
    /// The verb's result.
    Done(serde_json::Value),
    /// The verb failed.
    Error(String),
}

fn invalid(op: &'static str, why: String) -> Error {
    Error::new(ErrorKind::InvalidInput, op, why)
}

fn to_json(v: &impl Serialize) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| invalid("encode result", e.to_string()))
}

/// Run `req` on `site`.
pub fn execute(
    site: &Site,
    req: &Request,
    progress: &mut dyn FnMut(&str),
) -> Result<serde_json::Value> {
    let point = |p: &str| {
        p.parse::<PointSpec>()
            .map_err(|e| invalid("parse point", e))
    };
    let host = match req {
        Request::Failover { host, .. }
        | Request::Commit { host }
        | Request::TestFailover { host, .. }
        | Request::TestFailoverCleanup { host }
        | Request::Reprotect { host, .. }
        | Request::Failback { host, .. } => host,
    };
    let _one_at_a_time = site.host_operation(host)?;
    match req {
        Request::Failover {
            host,
            point: p,
            format,
            out,
            change_point,
            checksums,
        } => {
            let format = ferry_vhd::Format::from_name(format)
                .filter(|f| *f != ferry_vhd::Format::VhdDiff)
                .ok_or_else(|| {
                    invalid(
                        "parse format",
                        format!("{format:?} is not a failover format"),
                    )
                })?;
            let req = FailoverRequest {
                host: host.clone(),
                point: point(p)?,
                format,
                out: out.clone(),
                change_point: *change_point,
                checksums: *checksums,
            };
            to_json(&failover::failover(site, &req, progress)?)
        }
        Request::Commit { host } => to_json(&failover::commit(site, host)?),
        Request::TestFailover {
            host,
            point: p,
            out,
        } => to_json(&failover::test_failover(
            site,
            host,
            &point(p)?,
            out,
            progress,
        )?),
        Request::TestFailoverCleanup { host } => to_json(&failover::cleanup_test(site, host)?),
        Request::Reprotect { host, images } => {
            to_json(&crate::failback::reprotect(site, host, images)?)
        }
        Request::Failback { host, point: p } => to_json(&crate::failback::failback(
            site,
            host,
            &point(p)?,
            progress,
        )?),
    }
}

/// Serve `DATA/control.sock` on a thread until `stop` is set.
pub fn serve(site: Arc<Site>, stop: Arc<AtomicBool>) -> Result<std::thread::JoinHandle<()>> {
    let path = site.dir().join(CONTROL_SOCKET);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove stale control socket", &path, e)),
    }
    let listener =
        UnixListener::bind(&path).map_err(|e| Error::io("bind control socket", &path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io("protect control socket", &path, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("control socket", &path, e))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let site = Arc::clone(&site);
                        let spawned = std::thread::Builder::new()
                            .name("control-request".into())
                            .spawn(move || answer(&site, stream));
                        if let Err(e) = spawned {
                            tracing::error!(error = %e, "cannot spawn a control thread");
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "control accept failed");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            }
            let _ = std::fs::remove_file(&path);
        })
        .map_err(|e| Error::io("spawn control thread", Path::new("control"), e))
}

fn send(stream: &mut UnixStream, reply: &Reply) -> bool {
    let Ok(mut line) = serde_json::to_vec(reply) else {
        return false;
    };
    line.push(b'\n');
    stream.write_all(&line).is_ok()
}

fn answer(site: &Site, stream: UnixStream) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut line = String::new();
    let mut reader = BufReader::new(std::io::Read::take(stream, MAX_REQUEST));
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            send(&mut out, &Reply::Error(format!("bad request: {e}")));
            return;
        }
    };
    tracing::info!(request = ?req, "control request");
    let result = execute(site, &req, &mut |msg| {
        tracing::info!(progress = msg, "control");
        send(&mut out, &Reply::Progress(msg.to_owned()));
    });
    match result {
        Ok(v) => send(&mut out, &Reply::Done(v)),
        Err(e) => {
            tracing::warn!(error = %e, "control request failed");
            send(&mut out, &Reply::Error(e.to_string()))
        }
    };
}

/// Send `req` to the target running on `data`. `Ok(None)`: no target
/// listens there.
pub fn call(
    data: &Path,
    req: &Request,
    progress: &mut dyn FnMut(&str),
) -> Result<Option<serde_json::Value>> {
    let path = data.join(CONTROL_SOCKET);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(Error::io("connect to the target", &path, e)),
    };
    let mut line = serde_json::to_vec(req).map_err(|e| invalid("encode request", e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| Error::io("send request", &path, e))?;
    for line in BufReader::new(stream).lines() {
        let line = line.map_err(|e| Error::io("read reply", &path, e))?;
        match serde_json::from_str::<Reply>(&line) {
            Ok(Reply::Progress(m)) => progress(&m),
            Ok(Reply::Done(v)) => return Ok(Some(v)),
            Ok(Reply::Error(e)) => return Err(Error::new(ErrorKind::InvalidInput, "target", e)),
            Err(e) => return Err(invalid("read reply", format!("{e}: {line}"))),
        }
    }
    Err(Error::new(
        ErrorKind::Io,
        "target",
        "the target closed the control connection without an answer (did it stop?)",
    ))
}
