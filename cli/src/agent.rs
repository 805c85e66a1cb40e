//! The daemons' side of the control plane. A filter, sidecar or target
//! whose directory holds `server.json` (written by `ferry host register` /
//! `ferry target register`) reports to the server and takes its
//! configuration from it:
//!
//! - the filter posts a heartbeat with its disks every [`HEARTBEAT`];
//! - the sidecar waits until the host is protected, replicates to the
//!   target under the policy the server names, posts each disk's state
//!   (shipping, consistent, lag) and restarts its shipping when the
//!   configuration changes (another target or policy, a failover);
//! - the target writes the data keys of the hosts protected to it into its
//!   credentials, posts its status, and runs the jobs the server queues for
//!   it (failover, commit, test failover, cleanup, points) through its own
//!   control socket, reporting progress lines and the result; output
//!   directories stay inside its data directory or an `--export-root`.
//!
//! The server being away never stops replication: heartbeats are retried
//! at the next beat, a sidecar keeps the last plan the server gave
//! (`STATE/server-plan.json`), and a job's result is kept on the target's
//! disk (`DATA/server-results/`) until the server takes it or says the job
//! is no longer the target's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use ferry_api::types::{
    Component, DiskInfo, DiskReplication, HeartbeatRequest, HostConfig, Job, JobFinish,
    JobProgress, TargetConfig,
};
use ferry_api::Client;
use serde::Deserialize;
use serde_json::json;

use crate::server::{SERVER_FILE, TOKEN_FILE};

/// How often daemons report.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How often a target asks for jobs.
pub const JOB_POLL: Duration = Duration::from_secs(1);
/// How often a running job's lease is renewed.
pub const LEASE_RENEWAL: Duration = Duration::from_secs(30);
/// How long a job's result is retried while the server is away.
pub const RESULT_RETRY: Duration = Duration::from_secs(6 * 3600);

/// What `register` wrote: where the server is and who we are.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The server's URL.
    pub url: String,
    /// Our name.
    pub name: String,
    /// The credentials directory (CA, our certificate and key, data keys).
    pub credentials: PathBuf,
    ca: PathBuf,
    token: String,
}

#[derive(Debug, Deserialize)]
struct ServerFile {
    url: String,
    name: String,
    ca: PathBuf,
    credentials: PathBuf,
}

impl Registration {
    /// The registration in `dir`, if it has one.
    pub fn load(dir: &Path) -> Result<Option<Registration>> {
        let path = dir.join(SERVER_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        let f: ServerFile =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let token_path = dir.join(TOKEN_FILE);
        let token = std::fs::read_to_string(&token_path)
            .with_context(|| format!("read {}", token_path.display()))?
            .trim()
            .to_owned();
        Ok(Some(Registration {
            url: f.url,
            name: f.name,
            credentials: f.credentials,
            ca: f.ca,
            token,
        }))
    }

    /// A client of the server with our token.
    pub fn client(&self) -> Result<Client> {
        let pem = std::fs::read(&self.ca).with_context(|| format!("read {}", self.ca.display()))?;
        Ok(Client::new(&self.url, &pem, Some(self.token.clone()))?
            .with_timeout(Duration::from_secs(15)))
    }
}

/// Logs a failed call to the server at most once a minute per place.
#[derive(Debug)]
struct Quiet {
    last: Option<Instant>,
    what: &'static str,
}

impl Quiet {
    fn new(what: &'static str) -> Quiet {
        Quiet { last: None, what }
    }

    fn failed(&mut self, e: &dyn std::fmt::Display) {
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(error = %e, "{}: the control-plane server did not answer (retrying)", self.what);
            self.last = Some(Instant::now());
        }
    }

    fn ok(&mut self) {
        if self.last.take().is_some() {
            tracing::info!("{}: the control-plane server answers again", self.what);
        }
    }
}

/// Sleeps up to `d`, waking early when `stop` is set; true if stopped.
fn nap(stop: &AtomicBool, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
    }
    stop.load(Ordering::Relaxed)
}

// ---- filter ---------------------------------------------------------------

/// Starts the filter's heartbeat thread: its disks and status, every beat.
pub fn spawn_filter_heartbeats(
    reg: Registration,
    state: PathBuf,
    group_listen: Option<String>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let client = reg.client()?;
    std::thread::Builder::new()
        .name("server-heartbeat".into())
        .spawn(move || {
            let mut quiet = Quiet::new("filter heartbeat");
            loop {
                let mut req = filter_report(&state);
                req.status["group_listen"] = json!(group_listen);
                match client.post::<_, serde_json::Value>("/v1/heartbeat", &req) {
                    Ok(_) => quiet.ok(),
                    Err(e) => quiet.failed(&e),
                }
                if nap(&stop, HEARTBEAT) {
                    return;
                }
            }
        })
        .context("start the heartbeat thread")?;
    Ok(())
}

fn filter_report(state: &Path) -> HeartbeatRequest {
    let ctl = ferry_sidecar::filterctl::FilterControl::new(state);
    let (disks, status) = match ctl.status() {
        Ok(s) => (
            s.disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.name.clone(),
                    size: d.size,
                })
                .collect(),
            json!({
                "running": true,
                "seq": s.seq,
                "disks": s.disks.iter().map(|d| json!({
                    "disk": d.name, "tracking": d.tracking, "dirty_bytes": d.dirty_bytes,
                    "lag_seconds": d.lag_seconds,
                })).collect::<Vec<_>>(),
            }),
        ),
        Err(e) => (
            Vec::new(),
            json!({"running": false, "error": e.to_string()}),
        ),
    };
    HeartbeatRequest {
        component: Component::Filter,
        // An unreachable filter reports no disks: the server keeps the last
        // list rather than forgetting them.
        disks,
        replication: Vec::new(),
        status,
    }
}

// ---- sidecar --------------------------------------------------------------

/// What the sidecar runs with, from the server: replication restarts when
/// this changes. Kept in `STATE/server-plan.json` for when the server is
/// away.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct ShippingPlan {
    /// The target's address.
    pub target: String,
    /// The target's name (its certificate's).
    pub target_name: String,
    /// The policy.
    pub policy: ferry_api::types::Policy,
}

/// The plan the host's configuration calls for (None: do not replicate).
pub fn shipping_plan(cfg: &HostConfig) -> Option<ShippingPlan> {
    if !cfg.replicating() {
        return None;
    }
    Some(ShippingPlan {
        target: cfg.target.as_ref()?.address.clone(),
        target_name: cfg.target.as_ref()?.name.clone(),
        policy: cfg.policy.clone()?,
    })
}

/// The sidecar's report: each protected disk's state from its metrics.
pub fn sidecar_report(state: &Path, cfg: Option<&HostConfig>) -> HeartbeatRequest {
    let metrics = std::fs::read_to_string(crate::replicate::metrics_path(state))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    // Figures of a run to another target (before a reprotect swapped the
    // host's direction) say nothing of the replica the plan names now: a
    // stale "consistent" would mark a disk protected while its resync to
    // the new target still runs.
    let planned = cfg
        .and_then(|c| c.target.as_ref())
        .map(|t| t.address.as_str());
    let current = |m: &serde_json::Value| planned.is_none_or(|a| m["target"] == a);
    let disk_metrics = metrics.as_ref().filter(|m| current(m));
    let filter = ferry_sidecar::filterctl::FilterControl::new(state)
        .status()
        .ok();
    let mut replication = Vec::new();
    for p in cfg.map(|c| c.protections.as_slice()).unwrap_or_default() {
        let m = disk_metrics
            .and_then(|m| m["disks"].as_array())
            .and_then(|a| a.iter().find(|d| d["disk"] == p.disk.as_str()).cloned());
        let Some(m) = m else { continue };
        // A filter that does not answer (restarting) says nothing of the
        // replica: report nothing rather than "inconsistent".
        let Some(fd) = filter
            .as_ref()
            .and_then(|f| f.disks.iter().find(|d| d.name == p.disk))
        else {
            continue;
        };
        let settled = fd.settled();
        let lag = m["lag_seconds"].as_f64().unwrap_or(0.0);
        replication.push(DiskReplication {
            disk: p.disk.clone(),
            shipping: m["connected"] == true,
            consistent: !m["consistent_since"].is_null() && settled,
            // Whole seconds of lag: rounding up keeps a lag never reported
            // as smaller than it is.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            lag_secs: lag.max(0.0).ceil() as u64,
            resync_bytes: fd.dirty_bytes,
        });
    }
    HeartbeatRequest {
        component: Component::Sidecar,
        disks: Vec::new(),
        replication,
        status: metrics.unwrap_or_default(),
    }
}

/// Fetches the host's configuration.
pub fn host_config(client: &Client, name: &str) -> Result<HostConfig> {
    Ok(client.get(&format!("/v1/hosts/{name}/config"))?)
}

/// Runs a registered host's sidecar: waits for protection, replicates with
/// the server's plan (`configure` turns it into the daemon's configuration
/// and runs it until the given flag is set), re-plans on every change,
/// until `stop`.
pub fn run_registered_sidecar(
    reg: &Registration,
    state: &Path,
    stop: &Arc<AtomicBool>,
    mut run_plan: impl FnMut(&ShippingPlan, Arc<AtomicBool>) -> Result<()>,
) -> Result<()> {
    let client = reg.client()?;
    let mut quiet = Quiet::new("sidecar configuration");
    while !stop.load(Ordering::Relaxed) {
        let plan = match host_config(&client, &reg.name) {
            Ok(cfg) => {
                quiet.ok();
                let _ = client.post::<_, serde_json::Value>(
                    "/v1/heartbeat",
                    &sidecar_report(state, Some(&cfg)),
                );
                let plan = shipping_plan(&cfg);
                remember_plan(state, plan.as_ref());
                plan
            }
            Err(e) => {
                quiet.failed(&e);
                // The server being away never stops replication: the last
                // plan it gave holds until it answers again.
                let cached = cached_plan(state);
                if cached.is_some() {
                    tracing::warn!(host = %reg.name, "the server does not answer: replicating with the last plan it gave");
                }
                cached
            }
        };
        let Some(plan) = plan else {
            tracing::debug!(host = %reg.name, "not protected (or failed over): waiting");
            nap(stop, HEARTBEAT);
            continue;
        };
        tracing::info!(host = %reg.name, target = %plan.target, policy = %plan.policy.name, "replicating as the server says");
        let inner = Arc::new(AtomicBool::new(false));
        let watcher = spawn_plan_watcher(
            reg.clone(),
            client.clone(),
            state.to_path_buf(),
            plan.clone(),
            stop.clone(),
            inner.clone(),
        )?;
        let outcome = run_plan(&plan, inner.clone());
        inner.store(true, Ordering::Relaxed);
        let _ = watcher.join();
        outcome?;
    }
    Ok(())
}

/// The file the sidecar keeps the server's last plan in.
const PLAN_FILE: &str = "server-plan.json";

/// Keeps (or, when the server says not to replicate, removes) the plan.
fn remember_plan(state: &Path, plan: Option<&ShippingPlan>) {
    let path = state.join(PLAN_FILE);
    let outcome = match plan {
        Some(p) => serde_json::to_vec(p)
            .map_err(|e| anyhow!(e))
            .and_then(|b| Ok(ferry_server::daemon::write_private(&path, &b)?)),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(anyhow!(e)),
            _ => Ok(()),
        },
    };
    if let Err(e) = outcome {
        tracing::warn!(error = %e, path = %path.display(), "cannot keep the server's plan");
    }
}

/// The last plan the server gave, if any.
fn cached_plan(state: &Path) -> Option<ShippingPlan> {
    serde_json::from_slice(&std::fs::read(state.join(PLAN_FILE)).ok()?).ok()
}

/// While a plan runs: heartbeats with each disk's state, and the flag set
/// when the server's plan changes or the daemon is told to stop.
fn spawn_plan_watcher(
    reg: Registration,
    client: Client,
    state: PathBuf,
    plan: ShippingPlan,
    stop: Arc<AtomicBool>,
    inner: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("server-heartbeat".into())
        .spawn(move || {
            let mut quiet = Quiet::new("sidecar heartbeat");
            loop {
                // The daemon's own stop (a signal) ends the plan too.
                let deadline = Instant::now() + HEARTBEAT;
                while Instant::now() < deadline {
                    if inner.load(Ordering::Relaxed) {
                        return;
                    }
                    if stop.load(Ordering::Relaxed) {
                        inner.store(true, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                match host_config(&client, &reg.name) {
                    Ok(cfg) => {
                        quiet.ok();
                        let _ = client.post::<_, serde_json::Value>("/v1/heartbeat", &sidecar_report(&state, Some(&cfg)));
                        if shipping_plan(&cfg).as_ref() != Some(&plan) {
                            tracing::info!(host = %reg.name, "the server changed this host's replication: restarting it");
                            inner.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                    Err(e) => quiet.failed(&e),
                }
            }
        })
        .context("start the heartbeat thread")
}

// ---- target ---------------------------------------------------------------

/// Writes the data keys of the hosts protected to this target into its
/// credentials directory (new or changed ones only).
pub fn sync_data_keys(client: &Client, reg: &Registration) -> Result<usize> {
    let cfg: TargetConfig = client.get(&format!("/v1/targets/{}/config", reg.name))?;
    let mut written = 0;
    for h in cfg.hosts {
        ferry_protocol::credentials::validate_name("host", &h.name)?;
        let key = crate::server::from_hex(&h.datakey_hex)?;
        let path = ferry_protocol::credentials::datakey_path(&reg.credentials, &h.name);
        if std::fs::read(&path).ok().as_deref() == Some(&key[..]) {
            continue;
        }
        ferry_server::daemon::write_private(&path, &key)?;
        tracing::info!(host = %h.name, "data key received from the server");
        written += 1;
    }
    Ok(written)
}

/// The target's report: its status documents.
fn target_report(data: &Path) -> HeartbeatRequest {
    let status = match ferry_master_target::site::read_statuses(data) {
        Ok(list) => serde_json::to_value(&list).unwrap_or_default(),
        Err(e) => json!({"error": e.to_string()}),
    };
    let (free, total) = fs_space(data).unwrap_or((0, 0));
    HeartbeatRequest {
        component: Component::Target,
        disks: Vec::new(),
        replication: Vec::new(),
        status: json!({"disks": status, "free_bytes": free, "total_bytes": total}),
    }
}

/// Free (for unprivileged use) and total bytes of the file system holding
/// `path`.
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is writable
    // memory of the right type; statvfs fills it on success only.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialized `st`.
    let st = unsafe { st.assume_init() };
    let frsize = u64::from(u32::try_from(st.f_frsize).unwrap_or(4096));
    Some((
        st.f_bavail.saturating_mul(frsize),
        st.f_blocks.saturating_mul(frsize),
    ))
}

/// Starts the target's threads: heartbeats with data-key refresh, and the
/// job runner.
pub fn spawn_target_agent(
    reg: Registration,
    data: PathBuf,
    export_roots: Vec<PathBuf>,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    let client = reg.client()?;
    {
        let (reg, client, data, stop) = (reg.clone(), client.clone(), data.clone(), stop.clone());
        std::thread::Builder::new()
            .name("server-heartbeat".into())
            .spawn(move || {
                let mut quiet = Quiet::new("target heartbeat");
                loop {
                    let beat =
                        client.post::<_, serde_json::Value>("/v1/heartbeat", &target_report(&data));
                    match beat.and_then(|_| {
                        sync_data_keys(&client, &reg).map_err(|e| {
                            ferry_api::Error::new(ferry_api::ErrorKind::Decode, e.to_string())
                        })
                    }) {
                        Ok(_) => quiet.ok(),
                        Err(e) => quiet.failed(&e),
                    }
                    if nap(&stop, HEARTBEAT) {
                        return;
                    }
                }
            })
            .context("start the heartbeat thread")?;
    }
    std::thread::Builder::new()
        .name("server-jobs".into())
        .spawn(move || {
            let mut quiet = Quiet::new("job poll");
            // Results a previous run of this target could not deliver first.
            resend_results(&client, &data, &stop);
            while !nap(&stop, JOB_POLL) {
                match client.post::<_, Option<Job>>("/v1/jobs/claim", &json!({})) {
                    Ok(Some(job)) => {
                        quiet.ok();
                        run_job(&client, &data, &export_roots, &job, &stop);
                    }
                    Ok(None) => quiet.ok(),
                    Err(e) => quiet.failed(&e),
                }
            }
        })
        .context("start the job thread")?;
    Ok(())
}

/// Runs one job through the target's control socket and reports it.
fn run_job(client: &Client, data: &Path, roots: &[PathBuf], job: &Job, stop: &AtomicBool) {
    tracing::info!(job = job.id, kind = %job.kind, host = %job.subject, "job taken");
    let path = format!("/v1/jobs/{}/progress", job.id);
    // The lease is renewed while the job runs, progress lines or not (a
    // long copy says nothing for minutes).
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !nap(&done, LEASE_RENEWAL) {
                let _ = client.post::<_, Job>(
                    &path,
                    &JobProgress {
                        progress: None,
                        log: Vec::new(),
                    },
                );
            }
        });
        let outcome = run_job_body(client, data, roots, job, &path);
        done.store(true, Ordering::Relaxed);
        let finish = match outcome {
            Ok(result) => JobFinish {
                result: Some(result),
                error: None,
            },
            Err(e) => JobFinish {
                result: None,
                error: Some(format!("{e:#}")),
            },
        };
        tracing::info!(job = job.id, ok = finish.error.is_none(), "job ended");
        // Kept on disk until the server has it: a restart of this target
        // (or a long outage of the server) does not lose what was done.
        let kept = keep_result(data, job.id, &finish);
        if report_finish(client, job.id, &finish, stop) {
            forget_result(kept.as_deref());
        }
    });
}

/// What a job does: a read of the data directory, or a verb through the
/// target's control socket.
fn run_job_body(
    client: &Client,
    data: &Path,
    roots: &[PathBuf],
    job: &Job,
    path: &str,
) -> Result<serde_json::Value> {
    let mut progress = |line: &str| {
        let _ = client.post::<_, Job>(
            path,
            &JobProgress {
                progress: None,
                log: vec![line.to_owned()],
            },
        );
    };
    if let Err(e) = ferry_protocol::credentials::validate_name("host", &job.subject) {
        // Host names become paths here: never take one that is not a name.
        return Err(anyhow!("job {} names no valid host: {e}", job.id));
    }
    if job.kind == "points" {
        // Read-only: straight from the data directory, as `ferry points --data`.
        let points = ferry_master_target::points::of_host(data, &job.subject)?;
        return Ok(serde_json::to_value(points)?);
    }
    let req = job_request(data, roots, job)?;
    ferry_master_target::control::call(data, &req, &mut progress)?
        .ok_or_else(|| anyhow!("the target's control socket does not answer"))
}

/// A job's output directory must lie in the data directory or under an
/// `--export-root` of the target: whoever queues jobs (the server, an
/// admin token) must not make the target write anywhere it likes.
fn check_export_path(data: &Path, roots: &[PathBuf], out: &Path) -> Result<()> {
    use std::path::Component;
    if out.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(anyhow!(
            "output directory {}: no '..' allowed",
            out.display()
        ));
    }
    let out = std::path::absolute(out)?;
    let allowed = std::iter::once(data.to_path_buf())
        .chain(roots.iter().cloned())
        .filter_map(|r| std::path::absolute(r).ok())
        .any(|root| out.starts_with(&root));
    if !allowed {
        return Err(anyhow!(
            "output directory {} is outside the data directory and every --export-root of this target",
            out.display()
        ));
    }
    Ok(())
}

/// Posts a job's end, retrying while the server is away (it may be
/// restarting), until it is taken or refused as no longer ours.
/// Returns true once the server took the result or refused it for good
/// (the job is no longer this target's); false if it is still to be sent.
fn report_finish(client: &Client, id: i64, finish: &JobFinish, stop: &AtomicBool) -> bool {
    let started = Instant::now();
    let mut quiet = Quiet::new("job result");
    loop {
        match client.post::<_, Job>(&format!("/v1/jobs/{id}/finish"), finish) {
            Ok(_) => return true,
            Err(e)
                if e.kind() == ferry_api::ErrorKind::Api && e.status().is_some_and(|s| s < 500) =>
            {
                tracing::warn!(job = id, error = %e, "the server refused the job's result");
                return true;
            }
            Err(e) => quiet.failed(&e),
        }
        if started.elapsed() >= RESULT_RETRY || nap(stop, Duration::from_secs(2)) {
            tracing::error!(
                job = id,
                "the job's result is kept on disk and sent when the target starts again"
            );
            return false;
        }
    }
}

/// Where undelivered job results wait (`DATA/server-results/ID.json`).
const RESULTS_DIR: &str = "server-results";

/// Writes a job's result before it is sent; its path, if written.
fn keep_result(data: &Path, id: i64, finish: &JobFinish) -> Option<PathBuf> {
    let dir = data.join(RESULTS_DIR);
    let path = dir.join(format!("{id}.json"));
    let written = ferry_server::daemon::make_private_dir(&dir)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(serde_json::to_vec(finish)?))
        .and_then(|b| Ok(ferry_server::daemon::write_private(&path, &b)?));
    match written {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!(job = id, error = %e, "cannot keep the job's result on disk");
            None
        }
    }
}

fn forget_result(path: Option<&Path>) {
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

/// Sends the results a previous run kept (a restart between a job's end
/// and its report).
fn resend_results(client: &Client, data: &Path, stop: &AtomicBool) {
    let Ok(entries) = std::fs::read_dir(data.join(RESULTS_DIR)) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let id = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<i64>().ok());
        let finish = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<JobFinish>(&b).ok());
        match (id, finish) {
            (Some(id), Some(finish)) => {
                tracing::info!(job = id, "sending a result kept from before a restart");
                if report_finish(client, id, &finish, stop) {
                    forget_result(Some(&path));
                }
            }
            _ => {
                tracing::warn!(path = %path.display(), "not a kept job result: removed");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// The control request a job stands for; an output directory left open
/// defaults to `DATA/failover/HOST` (or the current failover's, for a
/// change of point) and `DATA/test-failover/HOST`.
fn job_request(
    data: &Path,
    roots: &[PathBuf],
    job: &Job,
) -> Result<ferry_master_target::control::Request> {
    let mut params = job.params.clone();
    if let Some(out) = params["out"].as_str() {
        check_export_path(data, roots, Path::new(out))?;
    }
    // A reprotect writes into the images it adopts: the same rule.
    for image in params["images"].as_array().into_iter().flatten() {
        let path = image["path"].as_str().unwrap_or_default();
        check_export_path(data, roots, Path::new(path))?;
    }
    if params["out"].is_null() {
        let host = &job.subject;
        let default = match job.kind.as_str() {
            "failover" => {
                let previous = ferry_master_target::failover::failover_state(data, host)?
                    .filter(|_| params["change_point"] == true)
                    .map(|m| m.out);
                Some(previous.unwrap_or_else(|| data.join("failover").join(host)))
            }
            "test-failover" => Some(data.join("test-failover").join(host)),
            _ => None,
        };
        match default {
            Some(out) => params["out"] = json!(out),
            None => {
                if let Some(o) = params.as_object_mut() {
                    o.remove("out");
                }
            }
        }
    }
    serde_json::from_value(params)
        .with_context(|| format!("job {} has parameters this target cannot run", job.id))
}
