//! Client of the filter's control socket (`STATE/control.sock`, JSON lines,
//! version 1; the protocol is documented in `ferry_filter::control`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, ErrorKind, Result};

/// Name of the control socket in the filter's state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest wait for an answer (a barrier waits for writes in flight; a tag
/// may freeze file systems).
const TIMEOUT: Duration = Duration::from_secs(60);

/// One disk as the filter reports it (the fields the sidecar uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FilterDisk {
    /// Disk name.
    pub name: String,
    /// Backing device or file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Tracking state: `data`, `metadata` or `bitmap`.
    pub tracking: String,
    /// Dirty bits still set (awaiting resync, or claimed and not committed).
    /// Required: a filter that does not report it cannot be judged settled.
    pub dirty_bytes: u64,
    /// Dirty bits the ring holds resync records for.
    pub claimed_bytes: u64,
    /// Age of the oldest record not yet committed by the sidecar, seconds.
    #[serde(default)]
    pub lag_seconds: f64,
}

impl FilterDisk {
    /// Data state with nothing left to resync.
    pub fn settled(&self) -> bool {
        self.tracking == "data" && self.dirty_bytes == 0 && self.claimed_bytes == 0
    }
}

/// The filter's status (the fields the sidecar uses).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FilterStatus {
    /// Filter process id.
    pub pid: u32,
    /// Highest sequence assigned so far.
    #[serde(default)]
    pub seq: u64,
    /// Protected disks.
    pub disks: Vec<FilterDisk>,
}

/// A connection-per-request client.
#[derive(Debug, Clone)]
pub struct FilterControl {
    socket: PathBuf,
}

impl FilterControl {
    /// The control socket of the filter whose state directory is `state`.
    pub fn new(state: &Path) -> FilterControl {
        FilterControl {
            socket: state.join(SOCKET_NAME),
        }
    }

    fn request(&self, req: Value) -> Result<Value> {
        let ctx = |what: &str| format!("filter control {}: {what}", self.socket.display());
        let mut s = UnixStream::connect(&self.socket).map_err(|e| {
            Error::with_source(
                ErrorKind::Filter,
                ctx("connect (is `ferry filter` running?)"),
                e,
            )
        })?;
        s.set_read_timeout(Some(TIMEOUT))
            .and_then(|()| s.set_write_timeout(Some(TIMEOUT)))
            .map_err(|e| Error::with_source(ErrorKind::Filter, ctx("socket options"), e))?;
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes())
            .map_err(|e| Error::with_source(ErrorKind::Filter, ctx("send"), e))?;
        let mut answer = String::new();
        BufReader::new(&s)
            .read_line(&mut answer)
            .map_err(|e| Error::with_source(ErrorKind::Filter, ctx("receive"), e))?;
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| Error::with_source(ErrorKind::Filter, ctx("bad answer"), e))?;
        if v.get("ok") != Some(&Value::Bool(true)) {
            let why = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            return Err(Error::new(ErrorKind::Filter, ctx(why)));
        }
        Ok(v)
    }

    /// `status`.
    pub fn status(&self) -> Result<FilterStatus> {
        let mut v = self.request(json!({"version": 1, "op": "status"}))?;
        serde_json::from_value(v["status"].take()).map_err(|e| {
            Error::with_source(ErrorKind::Filter, "filter status: unexpected shape", e)
        })
    }

    /// `barrier`: the highest sequence assigned once writes in flight landed.
    pub fn barrier(&self) -> Result<u64> {
        let v = self.request(json!({"version": 1, "op": "barrier"}))?;
        v["barrier"]["seq"]
            .as_u64()
            .ok_or_else(|| Error::new(ErrorKind::Filter, "filter barrier: no seq in the answer"))
    }

    /// `tag` (crash consistent): returns its sequence.
    pub fn tag(&self, name: &str) -> Result<u64> {
        let v = self.request(json!({"version": 1, "op": "tag", "name": name}))?;
        v["tag"]["seq"]
            .as_u64()
            .ok_or_else(|| Error::new(ErrorKind::Filter, "filter tag: no seq in the answer"))
    }

    /// An app-consistent `tag`: `mounts` frozen around it, `pre`/`post`
    /// scripts run (the filter's watchdog thaws at `timeout`). Returns its
    /// sequence.
    pub fn tag_app(
        &self,
        name: &str,
        mounts: &[PathBuf],
        pre: Option<&str>,
        post: Option<&str>,
        timeout: Duration,
    ) -> Result<u64> {
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let v = self.request(json!({
            "version": 1, "op": "tag", "name": name, "app": true,
            "mounts": mounts, "pre": pre, "post": post, "timeout_ms": timeout_ms,
        }))?;
        v["tag"]["seq"]
            .as_u64()
            .ok_or_else(|| Error::new(ErrorKind::Filter, "filter tag: no seq in the answer"))
    }

    /// `resync-all` of one disk: returns the bytes marked dirty.
    pub fn resync_all(&self, disk: &str) -> Result<u64> {
        let v = self.request(json!({"version": 1, "op": "resync-all", "disk": disk}))?;
        Ok(v["resync"]["bytes"].as_u64().unwrap_or(0))
    }
}
