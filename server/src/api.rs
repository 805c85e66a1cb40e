//! The API's routes: a request in, a response out, no I/O but the store.
//!
//! | method and path | who | what |
//! |---|---|---|
//! | `GET /v1/health` | anyone | `{"ok": true, "version": ...}` |
//! | `GET /v1/ca` | anyone | the CA certificate (PEM), for pinning |
//! | `POST /v1/registration-tokens` | admin | a one-time token ([`TokenRequest`]) |
//! | `POST /v1/register` | a one-time token | credentials ([`RegisterRequest`] -> [`Registered`]) |
//! | `GET /v1/hosts` | admin | every host |
//! | `GET /v1/hosts/H` | admin, host H | one host |
//! | `PUT /v1/hosts/H/disks` | admin, host H | the host's disks |
//! | `POST /v1/hosts/H/protect` | admin | protect disks ([`ProtectRequest`]) |
//! | `GET /v1/hosts/H/config` | admin, host H | what the host's daemons should do |
//! | `POST /v1/hosts/H/failover`, `.../commit`, `.../test-failover`, `.../test-failover-cleanup`, `.../points`, `.../failback` | admin | a job on the host's target |
//! | `POST /v1/hosts/H/reprotect` | admin | swap the host's direction, a job on the new target ([`ReprotectRequest`]) |
//! | `POST /v1/heartbeat` | host, target | a daemon's heartbeat ([`HeartbeatRequest`]) |
//! | `GET /v1/targets`, `GET /v1/targets/T` | admin; admin, target T | targets |
//! | `GET/POST /v1/policies`, `GET/PUT /v1/policies/P` | admin | policies (a new one comes with `P-failback`) |
//! | `GET /v1/protections` | admin | every protected disk |
//! | `GET /v1/alerts` | admin | alerts holding now ([`crate::health`]) |
//! | `GET /v1/jobs`, `GET /v1/jobs/N` | admin; admin, the job's owner | jobs |
//! | `POST /v1/jobs/claim` | target | the target's next queued job |
//! | `POST /v1/jobs/N/progress`, `POST /v1/jobs/N/finish` | the job's owner | report |
//!
//! Every answer is JSON; errors are `{"error": {"kind", "message"}}` with
//! the status of [`ErrorKind::http_status`]. A request that fails changes
//! nothing: each change is one store transaction.

use std::net::IpAddr;
use std::path::PathBuf;

use ferry_api::http::{Method, Request, Response};
use ferry_api::types::{
    ApiError, Component, DiskInfo, FailbackRequest, FailoverJobRequest, Group,
    GroupFailoverRequest, GroupHosts, GroupPointRequest, HeartbeatRequest, Job, JobFinish,
    JobProgress, JobState, Plan, PlanMode, PlanRunRequest, Policy, ProtectRequest, RegisterRequest,
    Registered, ReprotectRequest, Role, StepAction, TargetConfig, TargetHost,
    TestFailoverJobRequest, TokenIssued, TokenRequest,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;

use crate::auth::{self, Scope};
use crate::db::{now, HostJob, JobGate, Principal, Store};
use crate::error::{Error, ErrorKind, Result};
use crate::groups::Coordinator;
use crate::lifecycle::Event;

/// Longest registration-token lifetime.
pub const MAX_TOKEN_TTL_SECS: u64 = 7 * 24 * 3600;

/// Most jobs a list returns.
pub const MAX_JOB_LIST: u32 = 500;

/// The API over a store and a credentials directory.
#[derive(Debug)]
pub struct Api {
    store: Store,
    credentials: PathBuf,
    ca_pem: String,
    ca_fingerprint: String,
    coordinator: Coordinator,
    heartbeat_lost_secs: Option<i64>,
}

impl Api {
    /// The API of `store`, issuing credentials in `credentials` (whose
    /// `ca.crt` is `ca_pem`).
    pub fn new(store: Store, credentials: PathBuf, ca_pem: String) -> Result<Api> {
        let fingerprint = ferry_api::client::ca_fingerprint(ca_pem.as_bytes())
            .map_err(|e| Error::new(ErrorKind::Credentials, "read CA", e.to_string()))?;
        let coordinator = Coordinator::new(&credentials, crate::daemon::SERVER_CERT_NAME)?;
        Ok(Api {
            store,
            credentials,
            ca_pem,
            ca_fingerprint: fingerprint,
            coordinator,
            heartbeat_lost_secs: None,
        })
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store's view for the alert rules.
    pub fn snapshot(&self) -> Result<crate::health::Snapshot> {
        Ok(crate::health::Snapshot {
            heartbeat_lost_secs: self.heartbeat_lost_secs,
            hosts: self.store.hosts()?,
            targets: self.store.targets()?,
            policies: self.store.policies()?,
        })
    }

    /// Every alert that holds now.
    pub fn alerts(&self) -> Result<Vec<ferry_api::types::Alert>> {
        Ok(crate::health::alerts(&self.snapshot()?, now()))
    }

    /// The server's Prometheus page: protections by state, lag per disk,
    /// alerts, jobs by state, daemons' heartbeat ages.
    pub fn metrics_page(&self) -> String {
        use ferry_api::metrics::{Kind, Page};
        let mut page = Page::new();
        let Ok(snap) = self.snapshot() else {
            page.sample(
                "ferry_server_up",
                "1 when the server can read its database.",
                Kind::Gauge,
                &[],
                0.0,
            );
            return page.render();
        };
        page.sample(
            "ferry_server_up",
            "1 when the server can read its database.",
            Kind::Gauge,
            &[],
            1.0,
        );
        let now = now();
        for h in &snap.hosts {
            for p in &h.protections {
                let labels = [
                    ("host", p.host.as_str()),
                    ("disk", p.disk.as_str()),
                    ("state", p.state.as_str()),
                ];
                page.sample(
                    "ferry_protection_state",
                    "1 for the state each protected disk is in.",
                    Kind::Gauge,
                    &labels,
                    1.0,
                );
                let labels = [("host", p.host.as_str()), ("disk", p.disk.as_str())];
                #[allow(clippy::cast_precision_loss)]
                page.sample(
                    "ferry_lag_seconds",
                    "Lag of each protected disk as its sidecar last reported (the RPO now).",
                    Kind::Gauge,
                    &labels,
                    p.lag_secs as f64,
                );
                #[allow(clippy::cast_precision_loss)]
                page.sample(
                    "ferry_resync_bytes",
                    "Bytes each disk still has to resync.",
                    Kind::Gauge,
                    &labels,
                    p.resync_bytes as f64,
                );
            }
            for b in &h.heartbeats {
                #[allow(clippy::cast_precision_loss)]
                page.sample(
                    "ferry_heartbeat_age_seconds",
                    "Seconds since each daemon's last heartbeat.",
                    Kind::Gauge,
                    &[
                        ("host", h.name.as_str()),
                        ("component", b.component.as_str()),
                    ],
                    (now - b.at) as f64,
                );
            }
        }
        for t in &snap.targets {
            if let Some(b) = &t.heartbeat {
                #[allow(clippy::cast_precision_loss)]
                page.sample(
                    "ferry_heartbeat_age_seconds",
                    "Seconds since each daemon's last heartbeat.",
                    Kind::Gauge,
                    &[("host", t.name.as_str()), ("component", "target")],
                    (now - b.at) as f64,
                );
            }
        }
        let alerts = crate::health::alerts(&snap, now);
        let mut counts: std::collections::BTreeMap<(String, String), u32> = Default::default();
        for a in &alerts {
            *counts
                .entry((a.kind.clone(), a.severity.clone()))
                .or_default() += 1;
        }
        for ((kind, severity), n) in counts {
            page.sample(
                "ferry_alerts",
                "Alerts holding now, by kind and severity.",
                Kind::Gauge,
                &[("kind", kind.as_str()), ("severity", severity.as_str())],
                f64::from(n),
            );
        }
        if let Ok(jobs) = self.store.jobs(MAX_JOB_LIST) {
            let mut by_state: std::collections::BTreeMap<&str, u32> = Default::default();
            for j in &jobs {
                *by_state.entry(j.state.as_str()).or_default() += 1;
            }
            for (state, n) in by_state {
                page.sample(
                    "ferry_jobs",
                    "Recent jobs by state.",
                    Kind::Gauge,
                    &[("state", state)],
                    f64::from(n),
                );
            }
        }
        page.render()
    }

    /// Fails the jobs whose owner stopped reporting (the janitor).
    pub fn expire_jobs(&self) -> Result<Vec<ferry_api::types::Job>> {
        self.store.expire_jobs(follow_job)
    }

    /// Sets how long a daemon may be silent before `heartbeat-lost`.
    pub fn with_heartbeat_timeout(mut self, secs: i64) -> Api {
        self.heartbeat_lost_secs = Some(secs);
        self
    }

    /// The group coordinator.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Answers one request from `peer`.
    pub fn handle(&self, req: &Request, peer: Option<IpAddr>) -> Response {
        match self.route(req, peer) {
            Ok(resp) => resp,
            Err(e) => {
                if e.kind().http_status() >= 500 {
                    tracing::error!(error = %e, path = %req.path, "request failed");
                } else {
                    tracing::debug!(error = %e, path = %req.path, "request refused");
                }
                error_response(&e)
            }
        }
    }

    fn route(&self, req: &Request, peer: Option<IpAddr>) -> Result<Response> {
        let seg = req.segments();
        let seg: Vec<&str> = seg.iter().map(|s| &**s).collect();
        match (req.method, seg.as_slice()) {
            (Method::Get, ["v1", "health"]) => Ok(ok(
                &json!({"ok": true, "version": env!("CARGO_PKG_VERSION")}),
            )),
            (Method::Get, ["v1", "ca"]) => Ok(Response::text(200, &self.ca_pem)),
            (Method::Post, ["v1", "register"]) => self.register(body(req)?),
            _ => {
                let who = self.authenticate(req)?;
                self.route_authenticated(req, &seg, &who, peer)
            }
        }
    }

    fn route_authenticated(
        &self,
        req: &Request,
        seg: &[&str],
        who: &Principal,
        peer: Option<IpAddr>,
    ) -> Result<Response> {
        let need = |scope: Scope<'_>| -> Result<()> {
            if auth::allowed(who, scope) {
                Ok(())
            } else {
                Err(auth::forbidden(who, scope))
            }
        };
        match (req.method, seg) {
            (Method::Post, ["v1", "registration-tokens"]) => {
                need(Scope::Admin)?;
                self.issue_token(body(req)?)
            }
            (Method::Get, ["v1", "hosts"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.hosts()?))
            }
            (Method::Get, ["v1", "hosts", host]) => {
                need(Scope::Host(host))?;
                Ok(ok(&self.store.host(host)?))
            }
            (Method::Put, ["v1", "hosts", host, "disks"]) => {
                need(Scope::Host(host))?;
                let disks: Vec<DiskInfo> = body(req)?;
                self.store.host(host)?;
                self.store
                    .heartbeat_disks(host, &disks)
                    .and_then(|()| self.store.host(host))
                    .map(|h| ok(&h))
            }
            (Method::Get, ["v1", "hosts", host, "config"]) => {
                need(Scope::Host(host))?;
                Ok(ok(&self.store.host_config(host)?))
            }
            (Method::Post, ["v1", "hosts", host, "reprotect"]) => {
                need(Scope::Admin)?;
                self.reprotect(host, body(req)?)
            }
            (Method::Post, ["v1", "hosts", host, action]) if host_action(action).is_some() => {
                need(Scope::Admin)?;
                self.host_job(host, action, req)
            }
            (Method::Get, ["v1", "targets", target, "config"]) => {
                need(Scope::Target(target))?;
                self.target_config(target)
            }
            (Method::Post, ["v1", "hosts", host, "protect"]) => {
                need(Scope::Admin)?;
                let r: ProtectRequest = body(req)?;
                Ok(ok(&self
                    .store
                    .protect(host, &r.disks, &r.policy, &r.target)?))
            }
            (Method::Post, ["v1", "heartbeat"]) => self.heartbeat(who, body(req)?, peer),
            (Method::Get, ["v1", "groups"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.groups()?))
            }
            (Method::Post, ["v1", "groups"]) => {
                need(Scope::Admin)?;
                let g: Group = body(req)?;
                check_name("group", &g.name)?;
                if g.timeout_ms == 0 || g.timeout_ms > ferry_filter::control::MAX_HOLD_MS {
                    return Err(invalid(format!(
                        "timeout {} ms: must be 1 to {} ms",
                        g.timeout_ms,
                        ferry_filter::control::MAX_HOLD_MS
                    )));
                }
                if g.interval_secs == Some(0) || g.app_interval_secs == Some(0) {
                    return Err(invalid("intervals must be at least 1 s".into()));
                }
                self.store.create_group(&g)?;
                Ok(created(&self.store.group(&g.name)?))
            }
            (Method::Get, ["v1", "groups", group]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.group(group)?))
            }
            (Method::Post, ["v1", "groups", group, "hosts"]) => {
                need(Scope::Admin)?;
                let h: GroupHosts = body(req)?;
                self.store.add_group_hosts(group, &h.hosts)?;
                Ok(ok(&self.store.group(group)?))
            }
            (Method::Get, ["v1", "groups", group, "points"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.group_points(group, 100)?))
            }
            (Method::Post, ["v1", "groups", group, "points"]) => {
                need(Scope::Admin)?;
                let r: GroupPointRequest = body(req)?;
                Ok(ok(&self.coordinator.take(
                    &self.store,
                    group,
                    r.name,
                    r.app,
                )?))
            }
            (Method::Get, ["v1", "plans"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.plans()?))
            }
            (Method::Post, ["v1", "plans"]) => {
                need(Scope::Admin)?;
                self.create_plan(&body(req)?)
            }
            (Method::Get, ["v1", "plans", name]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.plan(name)?))
            }
            (Method::Post, ["v1", "plans", name, "run"]) => {
                need(Scope::Admin)?;
                let plan = self.store.plan(name)?;
                let r: PlanRunRequest = body(req)?;
                let job = crate::plans::start(&self.store, &plan, &r)?;
                tracing::info!(job = job.id, plan = %name, mode = r.mode.as_str(), "plan run queued");
                Ok(Response::json(
                    202,
                    &serde_json::to_value(&job).unwrap_or_default(),
                ))
            }
            (Method::Post, ["v1", "jobs", id, "cancel"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.cancel_job(job_id(id)?, follow_job)?))
            }
            (Method::Post, ["v1", "jobs", id, "continue"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.continue_job(job_id(id)?)?))
            }
            (Method::Post, ["v1", "groups", group, "failover"]) => {
                need(Scope::Admin)?;
                self.group_failover(group, body(req)?)
            }
            (Method::Get, ["v1", "targets"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.targets()?))
            }
            (Method::Get, ["v1", "targets", target]) => {
                need(Scope::Target(target))?;
                Ok(ok(&self.store.target(target)?))
            }
            (Method::Get, ["v1", "policies"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.policies()?))
            }
            (Method::Post, ["v1", "policies"]) => {
                need(Scope::Admin)?;
                let p: Policy = body(req)?;
                check_name("policy", &p.name)?;
                self.store.create_policy(&p)?;
                Ok(created(&self.store.policy(&p.name)?))
            }
            (Method::Get, ["v1", "policies", name]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.policy(name)?))
            }
            (Method::Put, ["v1", "policies", name]) => {
                need(Scope::Admin)?;
                let mut p: Policy = body(req)?;
                p.name = (*name).to_owned();
                Ok(ok(&self.store.update_policy(&p)?))
            }
            (Method::Get, ["v1", "alerts"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.alerts()?))
            }
            (Method::Get, ["v1", "protections"]) => {
                need(Scope::Admin)?;
                Ok(ok(&self.store.protections(None)?))
            }
            (Method::Get, ["v1", "jobs"]) => {
                need(Scope::Admin)?;
                let limit = match req.query_param("limit") {
                    None => 50,
                    Some(v) => v
                        .parse::<u32>()
                        .map_err(|_| invalid(format!("limit {v:?} is not a number")))?,
                };
                Ok(ok(&self.store.jobs(limit.min(MAX_JOB_LIST))?))
            }
            (Method::Get, ["v1", "jobs", id]) => {
                let job = self.store.job(job_id(id)?, true)?;
                if !(matches!(who, Principal::Admin)
                    || owner_of(who).as_deref() == Some(&job.owner))
                {
                    return Err(auth::forbidden(who, Scope::Admin));
                }
                Ok(ok(&job))
            }
            (Method::Post, ["v1", "jobs", "claim"]) => {
                let owner = owner_of(who).ok_or_else(|| auth::forbidden(who, Scope::Admin))?;
                Ok(ok(&self.store.claim_job(&owner)?))
            }
            (Method::Post, ["v1", "jobs", id, "progress"]) => {
                let owner = owner_of(who).ok_or_else(|| auth::forbidden(who, Scope::Admin))?;
                let p: JobProgress = body(req)?;
                Ok(ok(&self.store.job_progress(
                    job_id(id)?,
                    &owner,
                    p.progress,
                    &p.log,
                )?))
            }
            (Method::Post, ["v1", "jobs", id, "finish"]) => {
                let owner = owner_of(who).ok_or_else(|| auth::forbidden(who, Scope::Admin))?;
                let f: JobFinish = body(req)?;
                let job = self.store.finish_job(
                    job_id(id)?,
                    &owner,
                    f.result.as_ref(),
                    f.error.as_deref(),
                    follow_job,
                )?;
                Ok(ok(&job))
            }
            _ => Err(Error::new(
                ErrorKind::NotFound,
                "route",
                format!("no such API call: {} {}", req.method.as_str(), req.path),
            )),
        }
    }

    fn authenticate(&self, req: &Request) -> Result<Principal> {
        let refused =
            |why: &str| Error::new(ErrorKind::Unauthenticated, "authenticate", why.to_owned());
        let token = req
            .bearer_token()
            .ok_or_else(|| refused("no bearer token (Authorization: Bearer TOKEN)"))?;
        if token.len() > auth::MAX_TOKEN_LEN {
            return Err(refused("unknown token"));
        }
        self.store
            .principal(&auth::token_hash(token))?
            .ok_or_else(|| refused("unknown token"))
    }

    fn issue_token(&self, r: TokenRequest) -> Result<Response> {
        if r.role == Role::Admin {
            return Err(invalid(
                "registration tokens are for hosts and targets".into(),
            ));
        }
        if r.ttl_secs == 0 || r.ttl_secs > MAX_TOKEN_TTL_SECS {
            return Err(invalid(format!(
                "ttl {} s: must be 1 to {MAX_TOKEN_TTL_SECS} s",
                r.ttl_secs
            )));
        }
        if let Some(name) = &r.name {
            check_registrant_name(r.role, name)?;
        }
        let token = auth::new_token(r.role, true)?;
        let ttl = i64::try_from(r.ttl_secs).unwrap_or(i64::MAX);
        let expires_at = now().saturating_add(ttl);
        self.store.add_token(
            &auth::token_hash(&token),
            r.role,
            None,
            true,
            r.name.as_deref(),
            Some(expires_at),
        )?;
        Ok(created(&TokenIssued {
            token,
            role: r.role,
            name: r.name,
            expires_at,
            ca_fingerprint: self.ca_fingerprint.clone(),
        }))
    }

    fn register(&self, r: RegisterRequest) -> Result<Response> {
        check_registrant_name(r.role, &r.name)?;
        if r.role == Role::Target {
            let addr = r
                .address
                .as_deref()
                .ok_or_else(|| invalid("a target registers with --address HOST:PORT".into()))?;
            ferry_protocol::tls::split_host_port(addr)
                .map_err(|e| invalid(format!("target address: {e}")))?;
        }
        let api_token = auth::new_token(r.role, false)?;
        let registered = self.store.register(
            &auth::token_hash(&r.token),
            r.role,
            &r.name,
            r.address.as_deref(),
            &auth::token_hash(&api_token),
            || self.issue_credentials(&r, &api_token),
        )?;
        tracing::info!(role = r.role.as_str(), name = %r.name, "registered");
        Ok(created(&registered))
    }

    /// Makes (or reuses) the registrant's certificate, key and, for a host,
    /// data key, and returns them. A re-registering host keeps its data key:
    /// what the target holds stays readable.
    fn issue_credentials(&self, r: &RegisterRequest, api_token: &str) -> Result<Registered> {
        use ferry_protocol::credentials::{self, ServerCert};
        let dir = &self.credentials;
        let datakey_hex = match r.role {
            Role::Host => {
                credentials::ensure(dir, &[], std::slice::from_ref(&r.name))?;
                let key = read_private(&credentials::datakey_path(dir, &r.name))?;
                Some(auth::hex(&key))
            }
            _ => {
                // Only the target's own name: names a registrant could pick
                // (its address) would let it pass for the server or another
                // target. Sidecars check the target's certificate for its
                // name, whatever address they reach it at.
                credentials::ensure(dir, &[ServerCert::new(&r.name)], &[])?;
                None
            }
        };
        let text = |p: PathBuf| -> Result<String> {
            String::from_utf8(read_private(&p)?).map_err(|_| {
                Error::new(
                    ErrorKind::Credentials,
                    "read credentials",
                    format!("{} is not text", p.display()),
                )
            })
        };
        Ok(Registered {
            name: r.name.clone(),
            role: r.role,
            api_token: api_token.to_owned(),
            ca_pem: self.ca_pem.clone(),
            cert_pem: text(credentials::cert_path(dir, &r.name))?,
            key_pem: text(credentials::key_path(dir, &r.name))?,
            datakey_hex,
        })
    }

    /// Queues a failover, commit, test failover or cleanup of `host` on
    /// its target; a failover or commit moves the host's disks in the same
    /// transaction (refused, with nothing queued, if the lifecycle does not
    /// allow it).
    fn host_job(&self, host: &str, action: &str, req: &Request) -> Result<Response> {
        let (kind, gate) =
            host_action(action).ok_or_else(|| invalid(format!("no action {action}")))?;
        let params = match kind {
            "failover" => failover_params(host, &body(req)?),
            "test-failover" => {
                let r: TestFailoverJobRequest = body(req)?;
                json!({"op": "test-failover", "host": host, "point": r.point, "out": r.out})
            }
            "failback" => {
                let r: FailbackRequest = body(req)?;
                json!({"op": "failback", "host": host, "point": r.point})
            }
            other => json!({"op": other, "host": host}),
        };
        let job = self.store.create_host_job(host, kind, &params, gate)?;
        tracing::info!(job = job.id, kind, host, owner = %job.owner, "job queued");
        Ok(Response::json(
            202,
            &serde_json::to_value(&job).unwrap_or_default(),
        ))
    }

    /// Swaps `host`'s direction and queues the reprotect job on the target
    /// that now receives its stream (see `Store::reprotect_host`).
    fn reprotect(&self, host: &str, r: ReprotectRequest) -> Result<Response> {
        for i in &r.images {
            check_name("disk", &i.disk)?;
            if !std::path::Path::new(&i.path).is_absolute() {
                return Err(invalid(format!(
                    "image {}: an absolute path on the target",
                    i.path
                )));
            }
        }
        let params = json!({"op": "reprotect", "host": host, "images": r.images});
        let job = self
            .store
            .reprotect_host(host, r.target.as_deref(), &params)?;
        tracing::info!(job = job.id, host, owner = %job.owner, "reprotect queued");
        Ok(Response::json(
            202,
            &serde_json::to_value(&job).unwrap_or_default(),
        ))
    }

    fn target_config(&self, target: &str) -> Result<Response> {
        self.store.target(target)?;
        let mut hosts = Vec::new();
        for name in self.store.hosts_of_target(target)? {
            let path = ferry_protocol::credentials::datakey_path(&self.credentials, &name);
            hosts.push(TargetHost {
                datakey_hex: auth::hex(&read_private(&path)?),
                name,
            });
        }
        Ok(ok(&TargetConfig {
            target: target.to_owned(),
            hosts,
        }))
    }

    /// Fails every member of `group` over (or tests it) at one group
    /// point: one job per host, queued together or not at all.
    fn group_failover(&self, group: &str, r: GroupFailoverRequest) -> Result<Response> {
        // The hosts whose tag the round holds, not the group as it is now.
        let point = crate::groups::resolve(&self.store, group, &r.point)?;
        let hosts = crate::groups::members_of(&point);
        let mode = if r.test {
            PlanMode::Test
        } else {
            PlanMode::Failover
        };
        let owned =
            crate::plans::host_jobs(&self.store, &hosts, &point.name, mode, r.format.as_deref());
        let jobs: Vec<HostJob<'_>> = owned
            .iter()
            .map(crate::plans::OwnedHostJob::as_host_job)
            .collect();
        let jobs = self.store.create_host_jobs(&jobs)?;
        tracing::info!(group, point = %point.name, jobs = jobs.len(), test = r.test, "group failover queued");
        Ok(Response::json(202, &json!({"point": point, "jobs": jobs})))
    }

    fn create_plan(&self, plan: &Plan) -> Result<Response> {
        check_name("plan", &plan.name)?;
        if plan.steps.is_empty() {
            return Err(invalid("a plan needs at least one step".into()));
        }
        for step in &plan.steps {
            match &step.action {
                StepAction::Group { group } => {
                    self.store.group(group)?;
                }
                StepAction::Hosts { hosts } if hosts.is_empty() => {
                    return Err(invalid("a hosts step needs at least one host".into()))
                }
                StepAction::Hosts { hosts } => {
                    for h in hosts {
                        self.store.host(h)?;
                    }
                }
                StepAction::Manual { text } if text.trim().is_empty() => {
                    return Err(invalid("a manual step needs its instruction".into()))
                }
                StepAction::Manual { .. } => {}
            }
        }
        self.store.create_plan(plan)?;
        Ok(created(&self.store.plan(&plan.name)?))
    }

    fn heartbeat(
        &self,
        who: &Principal,
        hb: HeartbeatRequest,
        peer: Option<IpAddr>,
    ) -> Result<Response> {
        if let (Principal::Host(h), Component::Filter) = (who, hb.component) {
            let listen = hb.status.get("group_listen").and_then(|v| v.as_str());
            self.store
                .set_group_addr(h, group_addr(listen, peer).as_deref())?;
        }
        let owner = match (who, hb.component) {
            (Principal::Host(h), Component::Filter | Component::Sidecar) => h,
            (Principal::Target(t), Component::Target) => t,
            _ => {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    "heartbeat",
                    format!("a {} heartbeat from this token", hb.component.as_str()),
                ))
            }
        };
        let changed =
            self.store
                .heartbeat(owner, hb.component, &hb.disks, &hb.replication, &hb.status)?;
        Ok(ok(&json!({ "changed": changed })))
    }
}

/// The job kind of `POST /v1/hosts/H/ACTION` and the lifecycle event it
/// starts with.
fn host_action(action: &str) -> Option<(&'static str, JobGate)> {
    Some(match action {
        "failover" => ("failover", JobGate::Start(Event::FailoverStarted)),
        "commit" => ("commit", JobGate::Require(Event::Committed)),
        "test-failover" => ("test-failover", JobGate::Free),
        "test-failover-cleanup" => ("test-failover-cleanup", JobGate::Free),
        "points" => ("points", JobGate::Free),
        "failback" => ("failback", JobGate::Start(Event::FailbackStarted)),
        _ => return None,
    })
}

/// The lifecycle follows a host job's end (inside the job's transaction).
fn follow_job(tx: &rusqlite::Transaction<'_>, job: &Job) -> Result<()> {
    let ok = job.state == JobState::Succeeded;
    let event = match (job.kind.as_str(), ok) {
        ("failover", true) => Event::FailoverSucceeded,
        ("failover", false) => Event::FailoverFailed,
        ("commit", true) => Event::Committed,
        ("failback", true) => Event::FailbackSucceeded,
        ("failback", false) => Event::FailbackFailed,
        ("reprotect", false) => return crate::db::undo_reprotect_in(tx, &job.subject),
        _ => return Ok(()),
    };
    // Lenient: a disk protected after the job started has nothing to follow.
    crate::db::transition_host_in(tx, &job.subject, event, true).map(|_| ())
}

fn read_private(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(Error::io("read credentials", path.display().to_string()))
}

/// The control request of a failover job.
fn failover_params(host: &str, r: &FailoverJobRequest) -> serde_json::Value {
    json!({"op": "failover", "host": host, "point": r.point,
        "format": r.format.clone().unwrap_or_else(|| "vhd-dynamic".into()),
        "out": r.out, "change_point": r.change_point, "checksums": r.checksums})
}

/// Where a filter's group port is reached: its listening address, with an
/// unspecified IP (0.0.0.0, ::) replaced by the address its heartbeat came
/// from.
fn group_addr(listen: Option<&str>, peer: Option<IpAddr>) -> Option<String> {
    let listen: std::net::SocketAddr = listen?.parse().ok()?;
    if !listen.ip().is_unspecified() {
        return Some(listen.to_string());
    }
    Some(std::net::SocketAddr::new(peer?, listen.port()).to_string())
}

/// Who owns jobs run by `who` (`target:NAME`); None for others.
fn owner_of(who: &Principal) -> Option<String> {
    match who {
        Principal::Target(t) => Some(format!("target:{t}")),
        _ => None,
    }
}

fn job_id(s: &str) -> Result<i64> {
    s.parse::<i64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| invalid(format!("job id {s:?} is not a number")))
}

fn invalid(why: String) -> Error {
    Error::new(ErrorKind::Invalid, "request", why)
}

fn check_name(what: &str, name: &str) -> Result<()> {
    ferry_protocol::credentials::validate_name(what, name).map_err(|e| invalid(e.to_string()))
}

fn check_registrant_name(role: Role, name: &str) -> Result<()> {
    check_name(role.as_str(), name)?;
    // Certificate names compare without case: so do ours.
    if name != name.to_ascii_lowercase() {
        return Err(invalid(format!("{name:?}: names are lower case")));
    }
    for reserved in [
        crate::daemon::SERVER_CERT_NAME,
        ferry_protocol::credentials::TARGET_ALIAS,
        "localhost",
    ] {
        if name == reserved {
            return Err(invalid(format!("{name:?} is reserved")));
        }
    }
    Ok(())
}

fn body<T: DeserializeOwned>(req: &Request) -> Result<T> {
    serde_json::from_slice(&req.body).map_err(|e| invalid(format!("request body: {e}")))
}

fn ok<T: Serialize>(v: &T) -> Response {
    Response::json(
        200,
        &serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
    )
}

fn created<T: Serialize>(v: &T) -> Response {
    Response::json(
        201,
        &serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
    )
}

/// The one place an error becomes an answer.
pub fn error_response(e: &Error) -> Response {
    let body = ApiError {
        kind: e.kind().as_str().to_owned(),
        message: e.to_string(),
    };
    Response::json(e.kind().http_status(), &json!({ "error": body }))
}
