//! Recovery plans run by the server: a plan run is a job the server owns
//! (`owner = server`), moved on by the `plan-runner` thread once a second.
//!
//! Each step runs its `pre` script, then either queues its hosts' jobs on
//! their targets (one transaction per step: a group step's members all
//! move, or none) and waits for them, or waits for the operator (`ferry
//! job continue JOB`), then runs its `post` script. Where the run is (step,
//! phase, the jobs it waits for) is the job's cursor in the database,
//! written in the same transaction as the jobs a step queues, so a server
//! restart resumes every run where it was: a step's jobs are never queued
//! twice, a job that ended while the server was away is seen at the next
//! tick. A script that was running when the server stopped runs again.
//!
//! A step fails the run when a script exits non-zero or one of its jobs
//! fails; the steps after it do not run (hosts already failed over stay
//! so: the operator decides, with the job's log in hand).

use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_api::types::{
    Job, JobState, Plan, PlanMode, PlanRunRequest, PlanStep, ProtectionState, StepAction,
};
use serde_json::{json, Value};

use crate::db::{HostJob, JobGate, Store};
use crate::error::{Error, ErrorKind, Result};
use crate::lifecycle::Event;

/// Longest a plan script may run before it is killed (and the run fails).
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);
/// Lines of a script's output kept in the job log.
const SCRIPT_LOG_LINES: usize = 20;

/// Queues a run of `plan` as a server job; returns it.
pub fn start(store: &Store, plan: &Plan, req: &PlanRunRequest) -> Result<Job> {
    if plan.steps.is_empty() {
        return Err(Error::new(
            ErrorKind::Conflict,
            "run plan",
            format!("plan {} has no steps", plan.name),
        ));
    }
    let params = json!({
        "plan": plan.name, "mode": req.mode, "point": req.point, "format": req.format,
        // The steps as they are now: editing the plan does not change a run.
        "steps": plan.steps,
    });
    let id = store.create_job(
        &format!("plan-{}", req.mode.as_str()),
        &plan.name,
        "server",
        &params,
    )?;
    store.job(id, false)
}

/// Moves every unfinished plan run on as far as it can go now.
pub fn tick(store: &Store) {
    let jobs = match store.server_jobs() {
        Ok(j) => j,
        Err(e) => {
            tracing::error!(error = %e, "reading plan runs failed");
            return;
        }
    };
    for (job, cursor) in jobs {
        if let Err(e) = advance(store, &job, cursor) {
            tracing::warn!(job = job.id, error = %e, "plan run failed");
            if let Err(e2) = store.finish_server_job(job.id, None, Some(&e.to_string())) {
                tracing::error!(job = job.id, error = %e2, "recording the failed plan run failed");
            }
        }
    }
}

/// Where a run is.
#[derive(Debug, Clone, PartialEq)]
struct Cursor {
    step: usize,
    phase: Phase,
    children: Vec<i64>,
    continued: bool,
    results: Vec<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Pre,
    Jobs,
    Manual,
    Post,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Pre => "pre",
            Phase::Jobs => "jobs",
            Phase::Manual => "manual",
            Phase::Post => "post",
        }
    }
}

impl Cursor {
    fn from_json(v: &Value) -> Cursor {
        let phase = match v["phase"].as_str() {
            Some("jobs") => Phase::Jobs,
            Some("manual") => Phase::Manual,
            Some("post") => Phase::Post,
            _ => Phase::Pre,
        };
        Cursor {
            step: v["step"]
                .as_u64()
                .and_then(|s| usize::try_from(s).ok())
                .unwrap_or(0),
            phase,
            children: v["children"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_i64).collect())
                .unwrap_or_default(),
            continued: v["continued"] == true,
            results: v["results"].as_array().cloned().unwrap_or_default(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "step": self.step, "phase": self.phase.as_str(), "children": self.children,
            "continued": self.continued, "results": self.results,
        })
    }
}

/// The run's request and steps, from its parameters.
fn run_of(job: &Job) -> Result<(PlanRunRequest, Vec<PlanStep>)> {
    let bad = |e: serde_json::Error| Error::new(ErrorKind::Db, "read plan run", e.to_string());
    let req: PlanRunRequest = serde_json::from_value(job.params.clone()).map_err(bad)?;
    let steps: Vec<PlanStep> = serde_json::from_value(job.params["steps"].clone()).map_err(bad)?;
    Ok((req, steps))
}

fn advance(store: &Store, job: &Job, cursor: Value) -> Result<()> {
    let (req, steps) = run_of(job)?;
    let mut c = Cursor::from_json(&cursor);
    let total = steps.len().max(1);
    loop {
        let Some(step) = steps.get(c.step) else {
            let result = json!({ "plan": job.subject, "mode": req.mode, "steps": c.results });
            store.finish_server_job(job.id, Some(&result), None)?;
            tracing::info!(job = job.id, plan = %job.subject, "plan run succeeded");
            return Ok(());
        };
        #[allow(clippy::cast_precision_loss)]
        let progress = (c.step as f64) / (total as f64);
        let n = c.step + 1;
        match c.phase {
            Phase::Pre => {
                let mut log = vec![format!("step {n}: {}", describe(&step.action))];
                if let Some(cmd) = &step.pre {
                    log.extend(run_script(cmd, job, n, "pre")?);
                }
                c.phase = match step.action {
                    StepAction::Manual { .. } => Phase::Manual,
                    _ => Phase::Jobs,
                };
                if let StepAction::Manual { text } = &step.action {
                    log.push(format!(
                        "waiting for the operator: {text} (then: ferry job continue {})",
                        job.id
                    ));
                }
                store.advance_server_job(job.id, &c.to_json(), progress, &log, &[])?;
            }
            Phase::Manual => {
                if !c.continued {
                    if job.state == JobState::Queued {
                        store.advance_server_job(job.id, &c.to_json(), progress, &[], &[])?;
                    }
                    return Ok(());
                }
                c.continued = false;
                c.phase = Phase::Post;
                store.advance_server_job(job.id, &c.to_json(), progress, &[], &[])?;
            }
            Phase::Jobs if c.children.is_empty() => {
                let (point, hosts) = step_targets(store, &step.action, &req)?;
                let owned = host_jobs(store, &hosts, &point, req.mode, req.format.as_deref());
                let jobs: Vec<HostJob<'_>> = owned.iter().map(OwnedHostJob::as_host_job).collect();
                if jobs.is_empty() {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        "plan step",
                        format!("step {n} has no hosts"),
                    ));
                }
                // The jobs and the cursor naming them: one transaction.
                let line = if point.is_empty() {
                    format!("step {n}: queued")
                } else {
                    format!("step {n}: queued at point {point}")
                };
                store.advance_server_job(job.id, &c.to_json(), progress, &[line], &jobs)?;
                return Ok(());
            }
            Phase::Jobs => {
                let children: Vec<Job> = c
                    .children
                    .iter()
                    .map(|&id| store.job(id, false))
                    .collect::<Result<_>>()?;
                if let Some(failed) = children.iter().find(|j| j.state == JobState::Failed) {
                    return Err(Error::new(
                        ErrorKind::Conflict,
                        "plan step",
                        format!(
                            "step {n}: job {} ({} {}) failed: {}",
                            failed.id,
                            failed.kind,
                            failed.subject,
                            failed.error.as_deref().unwrap_or("no reason given")
                        ),
                    ));
                }
                if !children.iter().all(|j| j.state == JobState::Succeeded) {
                    return Ok(());
                }
                c.results.push(json!({
                    "step": n,
                    "jobs": children.iter().map(|j| json!({"id": j.id, "host": j.subject, "result": j.result})).collect::<Vec<_>>(),
                }));
                c.children.clear();
                c.phase = Phase::Post;
                store.advance_server_job(
                    job.id,
                    &c.to_json(),
                    progress,
                    &[format!("step {n}: done")],
                    &[],
                )?;
            }
            Phase::Post => {
                let log = match &step.post {
                    Some(cmd) => run_script(cmd, job, n, "post")?,
                    None => Vec::new(),
                };
                c.step += 1;
                c.phase = Phase::Pre;
                #[allow(clippy::cast_precision_loss)]
                let progress = (c.step as f64) / (total as f64);
                store.advance_server_job(job.id, &c.to_json(), progress, &log, &[])?;
            }
        }
    }
}

fn describe(a: &StepAction) -> String {
    match a {
        StepAction::Group { group } => format!("group {group}"),
        StepAction::Hosts { hosts } => format!("hosts {}", hosts.join(", ")),
        StepAction::Manual { text } => format!("manual: {text}"),
    }
}

/// The point a step runs at and its hosts.
fn step_targets(
    store: &Store,
    action: &StepAction,
    req: &PlanRunRequest,
) -> Result<(String, Vec<String>)> {
    match action {
        StepAction::Group { group } => {
            let g = store.group(group)?;
            if req.mode == PlanMode::Cleanup {
                return Ok((String::new(), g.hosts));
            }
            let spec = req.point.clone().unwrap_or_else(|| "latest-group".into());
            let point = crate::groups::resolve(store, group, &spec)?;
            // The hosts whose tag the round holds, not the group as it is now.
            let hosts = crate::groups::members_of(&point);
            Ok((point.name, hosts))
        }
        StepAction::Hosts { hosts } if req.mode == PlanMode::Cleanup => {
            Ok((String::new(), hosts.clone()))
        }
        StepAction::Hosts { hosts } => {
            let default = match req.mode {
                PlanMode::Test => "latest-processed",
                _ => "latest",
            };
            Ok((
                req.point.clone().unwrap_or_else(|| default.into()),
                hosts.clone(),
            ))
        }
        StepAction::Manual { .. } => Ok((String::new(), Vec::new())),
    }
}

/// A [`HostJob`] with owned parts.
#[derive(Debug, Clone)]
pub struct OwnedHostJob {
    host: String,
    kind: &'static str,
    params: Value,
    gate: JobGate,
}

impl OwnedHostJob {
    /// Borrowed, for the store.
    pub fn as_host_job(&self) -> HostJob<'_> {
        HostJob {
            host: &self.host,
            kind: self.kind,
            params: self.params.clone(),
            gate: self.gate,
        }
    }
}

/// The jobs that take `hosts` to `point` in `mode`: failovers (a host
/// already failed over changes its point), test failovers or cleanups.
pub fn host_jobs(
    store: &Store,
    hosts: &[String],
    point: &str,
    mode: PlanMode,
    format: Option<&str>,
) -> Vec<OwnedHostJob> {
    hosts
        .iter()
        .map(|host| {
            let (kind, params, gate) = match mode {
                PlanMode::Failover => {
                    let failed_over = store.protections(Some(host)).is_ok_and(|ps| {
                        !ps.is_empty() && ps.iter().all(|p| p.state == ProtectionState::FailedOver)
                    });
                    let params = json!({"op": "failover", "host": host, "point": point,
                        "format": format.unwrap_or("vhd-dynamic"), "out": null,
                        "change_point": failed_over, "checksums": true});
                    ("failover", params, JobGate::Start(Event::FailoverStarted))
                }
                PlanMode::Test => (
                    "test-failover",
                    json!({"op": "test-failover", "host": host, "point": point, "out": null}),
                    JobGate::Free,
                ),
                PlanMode::Cleanup => (
                    "test-failover-cleanup",
                    json!({"op": "test-failover-cleanup", "host": host}),
                    JobGate::Free,
                ),
            };
            OwnedHostJob {
                host: host.clone(),
                kind,
                params,
                gate,
            }
        })
        .collect()
}

/// Runs a plan script (`sh -c`) with the run's context in its environment;
/// its output's last lines go to the log. Non-zero exit or a timeout fails.
fn run_script(cmd: &str, job: &Job, step: usize, when: &str) -> Result<Vec<String>> {
    let op = "plan script";
    use std::os::unix::process::CommandExt;
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        // Its own process group: a timeout kills what it started too.
        .process_group(0)
        .env("FERRY_PLAN", &job.subject)
        .env("FERRY_PLAN_MODE", job.kind.trim_start_matches("plan-"))
        .env("FERRY_JOB", job.id.to_string())
        .env("FERRY_STEP", step.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::new(
                ErrorKind::Io,
                op,
                format!("step {step} {when} script {cmd:?}: {e}"),
            )
        })?;
    let pid = child.id();
    // Pipes are drained while the script runs (a chatty script must not
    // block on a full pipe); the wait is bounded.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("plan-script".into())
        .spawn(move || {
            let _ = tx.send(child.wait_with_output());
        })
        .map_err(|e| Error::new(ErrorKind::Io, op, format!("script thread: {e}")))?;
    let out = match rx.recv_timeout(SCRIPT_TIMEOUT) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(Error::new(
                ErrorKind::Io,
                op,
                format!("waiting for {cmd:?}: {e}"),
            ))
        }
        Err(_) => {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) on the process group of the script we
                // started (its pid is the group id); at worst it is gone
                // already and the call fails harmlessly.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            return Err(Error::new(
                ErrorKind::Conflict,
                op,
                format!("step {step} {when} script {cmd:?} ran past {SCRIPT_TIMEOUT:?}: killed"),
            ));
        }
    };
    let status = out.status;
    let output = [out.stdout, out.stderr].concat();
    let text = String::from_utf8_lossy(&output);
    let lines: Vec<&str> = text.lines().collect();
    let mut log = vec![format!(
        "step {step}: {when} script {cmd:?} exited with {status}"
    )];
    log.extend(
        lines[lines.len().saturating_sub(SCRIPT_LOG_LINES)..]
            .iter()
            .map(|l| format!("  | {l}")),
    );
    if !status.success() {
        return Err(Error::new(
            ErrorKind::Conflict,
            op,
            format!(
                "step {step} {when} script {cmd:?} failed ({status}): {}",
                lines.last().unwrap_or(&"")
            ),
        ));
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_default_to_the_start() {
        let c = Cursor::from_json(&Value::Null);
        assert_eq!((c.step, c.phase, c.continued), (0, Phase::Pre, false));
        let c = Cursor {
            step: 3,
            phase: Phase::Manual,
            children: vec![7, 9],
            continued: true,
            results: vec![json!({"step": 1})],
        };
        assert_eq!(Cursor::from_json(&c.to_json()), c);
    }
}
