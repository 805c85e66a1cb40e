//! The JSON bodies of the control-plane API, shared by the server, the CLI
//! and the daemons. Every field is named as it travels; enums travel as
//! kebab-case strings. Unknown fields are ignored on read so that a newer
//! server can add fields without breaking older clients.

use serde::{Deserialize, Serialize};

/// Version of the API, the first path segment (`/v1/...`).
pub const API_VERSION: &str = "v1";

/// Who may hold a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The operator: everything.
    Admin,
    /// A protected host: its own configuration, status and heartbeats.
    Host,
    /// A recovery-site target: its configuration, status and its jobs.
    Target,
}

impl Role {
    /// The lower-case name (`admin`, `host`, `target`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Host => "host",
            Role::Target => "target",
        }
    }
}

/// `POST /v1/registration-tokens` (admin): a one-time token for a host or
/// a target to register with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// `host` or `target`.
    pub role: Role,
    /// The name the registrant must use (None: any free name).
    #[serde(default)]
    pub name: Option<String>,
    /// How long the token is valid, in seconds.
    pub ttl_secs: u64,
}

/// The answer to a [`TokenRequest`]: the token is shown this once (the
/// server keeps only its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIssued {
    /// The one-time token.
    pub token: String,
    /// `host` or `target`.
    pub role: Role,
    /// The name it is bound to, if any.
    pub name: Option<String>,
    /// Unix time after which it is refused.
    pub expires_at: i64,
    /// `sha256:HEX` of the server's CA certificate (DER), for the
    /// registrant to pin the server before trusting it.
    pub ca_fingerprint: String,
}

/// `POST /v1/register` (no bearer token: the one-time token is in the body).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The one-time token.
    pub token: String,
    /// `host` or `target` (must match the token).
    pub role: Role,
    /// The name to register under.
    pub name: String,
    /// A target's replication address (`HOST:PORT`), which the sidecars of
    /// the hosts protected to it connect to.
    #[serde(default)]
    pub address: Option<String>,
}

/// The answer to a [`RegisterRequest`]: an API token for the registrant and
/// its replication credentials (PEM), all shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// The registered name.
    pub name: String,
    /// `host` or `target`.
    pub role: Role,
    /// Bearer token for the API (host or target role).
    pub api_token: String,
    /// The CA certificate every replication and API certificate chains to.
    pub ca_pem: String,
    /// The registrant's replication certificate (client for a host,
    /// server for a target).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM).
    pub key_pem: String,
    /// A host's data key (hex of 32 bytes); None for a target.
    #[serde(default)]
    pub datakey_hex: Option<String>,
}

/// A host as the server knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The host's name.
    pub name: String,
    /// Unix time of its (latest) registration.
    pub registered_at: i64,
    /// The last heartbeat of each of its daemons.
    #[serde(default)]
    pub heartbeats: Vec<Heartbeat>,
    /// Disks it reported.
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// Its protected disks.
    #[serde(default)]
    pub protections: Vec<Protection>,
}

/// A disk of a host, as reported by its filter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The disk's name (the filter's export name).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// A daemon that reports to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    /// The write interceptor on a host.
    Filter,
    /// The shipper on a host.
    Sidecar,
    /// The recovery-site receiver.
    Target,
}

impl Component {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Filter => "filter",
            Component::Sidecar => "sidecar",
            Component::Target => "target",
        }
    }

    /// Parses the lower-case name.
    pub fn parse(s: &str) -> Option<Component> {
        match s {
            "filter" => Some(Component::Filter),
            "sidecar" => Some(Component::Sidecar),
            "target" => Some(Component::Target),
            _ => None,
        }
    }
}

/// The last heartbeat of one daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Which daemon.
    pub component: Component,
    /// Unix time it arrived.
    pub at: i64,
    /// What the daemon reported (its status document).
    #[serde(default)]
    pub status: serde_json::Value,
}

/// `POST /v1/heartbeat` (host or target): a daemon is alive and this is
/// its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    /// Which daemon.
    pub component: Component,
    /// Disks seen (a filter reports its disks; others leave this empty).
    #[serde(default)]
    pub disks: Vec<DiskInfo>,
    /// Per-disk replication state (a sidecar reports it).
    #[serde(default)]
    pub replication: Vec<DiskReplication>,
    /// The daemon's own status document, kept as sent.
    #[serde(default)]
    pub status: serde_json::Value,
}

/// What a sidecar says of one disk's replication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReplication {
    /// The disk.
    pub disk: String,
    /// Whether change sets reach the target.
    pub shipping: bool,
    /// Whether the target's replica is consistent (no resync pending).
    pub consistent: bool,
    /// Seconds between the oldest unshipped write and now (the RPO now).
    #[serde(default)]
    pub lag_secs: u64,
    /// Bytes still to resync.
    #[serde(default)]
    pub resync_bytes: u64,
}

/// A replication policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// The policy's name.
    pub name: String,
    /// Alert when the lag exceeds this many seconds.
    pub rpo_alert_secs: u64,
    /// How long recovery points are kept.
    pub retention_secs: u64,
    /// Interval of crash-consistent points.
    pub crash_interval_secs: u64,
    /// Interval of app-consistent points (None: off).
    #[serde(default)]
    pub app_interval_secs: Option<u64>,
    /// zstd level (negative: fast modes).
    pub compression_level: i32,
    /// Bytes per second on the wire (0: unlimited).
    pub bandwidth: u64,
    /// The policy replication back from the recovery site runs under after
    /// a failover (`ferry reprotect`): made with this one as
    /// `NAME-failback`, editable like any policy. None for a failback
    /// policy itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<String>,
}

impl Policy {
    /// The defaults of a new policy called `name`: 15 min RPO alert, 24 h
    /// retention, crash points every 5 min, app points every hour, zstd 1,
    /// no bandwidth limit.
    pub fn with_defaults(name: &str) -> Policy {
        Policy {
            name: name.to_owned(),
            rpo_alert_secs: 15 * 60,
            retention_secs: 24 * 3600,
            crash_interval_secs: 5 * 60,
            app_interval_secs: Some(3600),
            compression_level: 1,
            bandwidth: 0,
            failback: None,
        }
    }

    /// The name of the failback policy made with the policy `name`.
    pub fn failback_name(name: &str) -> String {
        format!("{name}-failback")
    }

    /// The failback policy made with `forward`: the seed's defaults for
    /// replication back (RPO alert 15 min, retention 24 h, crash points
    /// every 5 min, app-consistent points every 60 min) with the forward
    /// policy's compression and bandwidth (the same link).
    pub fn failback_of(forward: &Policy) -> Policy {
        Policy {
            compression_level: forward.compression_level,
            bandwidth: forward.bandwidth,
            ..Policy::with_defaults(&Policy::failback_name(&forward.name))
        }
    }

    /// Why the policy is unusable, if it is.
    pub fn problem(&self) -> Option<String> {
        if self.rpo_alert_secs == 0 {
            return Some("the RPO alert threshold must be at least 1 s".into());
        }
        if self.retention_secs == 0 {
            return Some("the retention must be at least 1 s".into());
        }
        if self.crash_interval_secs == 0 {
            return Some("the crash-consistent interval must be at least 1 s".into());
        }
        if self.app_interval_secs == Some(0) {
            return Some("the app-consistent interval must be at least 1 s (or off)".into());
        }
        if !(-7..=22).contains(&self.compression_level) {
            return Some(format!(
                "compression level {} is outside -7..=22",
                self.compression_level
            ));
        }
        None
    }
}

/// Where a protected disk is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtectionState {
    /// Protection was asked for; the host has not shipped yet.
    Enabling,
    /// The first full copy is on its way; no consistent point yet.
    InitialSync,
    /// Replicating, the replica consistent.
    Protected,
    /// The replica is inconsistent until a resync completes.
    ResyncRequired,
    /// A failover is running.
    FailoverInProgress,
    /// Failed over: replication stopped, the chosen point exported.
    FailedOver,
    /// The failover was committed: history dropped.
    Committed,
    /// After a commit: replicating back from the recovery site.
    Reprotecting,
    /// Failing back to the original site.
    FailbackInProgress,
    /// Failed back; protection can start again.
    FailedBack,
}

impl ProtectionState {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtectionState::Enabling => "enabling",
            ProtectionState::InitialSync => "initial-sync",
            ProtectionState::Protected => "protected",
            ProtectionState::ResyncRequired => "resync-required",
            ProtectionState::FailoverInProgress => "failover-in-progress",
            ProtectionState::FailedOver => "failed-over",
            ProtectionState::Committed => "committed",
            ProtectionState::Reprotecting => "reprotecting",
            ProtectionState::FailbackInProgress => "failback-in-progress",
            ProtectionState::FailedBack => "failed-back",
        }
    }

    /// Whether the disk is (to be) replicating: enabling, initial-sync,
    /// protected, resync-required. The other states stop the sidecar.
    pub fn is_replicating(self) -> bool {
        matches!(
            self,
            ProtectionState::Enabling
                | ProtectionState::InitialSync
                | ProtectionState::Protected
                | ProtectionState::ResyncRequired
        )
    }

    /// Whether the host's sidecar ships the disk: a replicating state, or
    /// reprotecting (replicating back from the recovery site).
    pub fn ships(self) -> bool {
        self.is_replicating() || self == ProtectionState::Reprotecting
    }

    /// Every state, in life order.
    pub const ALL: [ProtectionState; 10] = [
        ProtectionState::Enabling,
        ProtectionState::InitialSync,
        ProtectionState::Protected,
        ProtectionState::ResyncRequired,
        ProtectionState::FailoverInProgress,
        ProtectionState::FailedOver,
        ProtectionState::Committed,
        ProtectionState::Reprotecting,
        ProtectionState::FailbackInProgress,
        ProtectionState::FailedBack,
    ];

    /// Parses the kebab-case name.
    pub fn parse(s: &str) -> Option<ProtectionState> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// `POST /v1/hosts/HOST/protect` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectRequest {
    /// Disks to protect (empty: every disk the host reported).
    #[serde(default)]
    pub disks: Vec<String>,
    /// The policy's name.
    pub policy: String,
    /// The target's name.
    pub target: String,
}

/// One protected disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    /// The host.
    pub host: String,
    /// The disk.
    pub disk: String,
    /// The policy's name.
    pub policy: String,
    /// The target's name.
    pub target: String,
    /// Where it is in its life.
    pub state: ProtectionState,
    /// Unix time it entered that state.
    pub since: i64,
    /// Why it is there (the event that moved it).
    pub reason: String,
    /// The lag the sidecar last reported, seconds (the RPO now).
    #[serde(default)]
    pub lag_secs: u64,
    /// Bytes still to resync, as last reported.
    #[serde(default)]
    pub resync_bytes: u64,
}

/// A recovery-site target as the server knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// The target's name.
    pub name: String,
    /// Its replication address (`HOST:PORT`).
    pub address: String,
    /// Unix time of its (latest) registration.
    pub registered_at: i64,
    /// Its last heartbeat.
    #[serde(default)]
    pub heartbeat: Option<Heartbeat>,
}

/// The state of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Waiting for its owner to take it.
    Queued,
    /// Its owner is running it.
    Running,
    /// Done.
    Succeeded,
    /// Ended without doing what it was asked (the error says why).
    Failed,
}

impl JobState {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }

    /// Parses the kebab-case name.
    pub fn parse(s: &str) -> Option<JobState> {
        [
            JobState::Queued,
            JobState::Running,
            JobState::Succeeded,
            JobState::Failed,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// A job: work the server asked of a daemon (or runs itself), with its
/// progress, log and result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Its number.
    pub id: i64,
    /// What it does (`failover`, `test-failover`, `commit`, `plan`, ...).
    pub kind: String,
    /// What it acts on (a host, a group, a plan).
    pub subject: String,
    /// Who runs it: `target:NAME` or `server`.
    pub owner: String,
    /// Its state.
    pub state: JobState,
    /// 0.0 to 1.0.
    pub progress: f64,
    /// Its parameters as given.
    #[serde(default)]
    pub params: serde_json::Value,
    /// Its result once succeeded.
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Unix times.
    pub created_at: i64,
    /// When its owner took it.
    #[serde(default)]
    pub started_at: Option<i64>,
    /// When it ended.
    #[serde(default)]
    pub finished_at: Option<i64>,
    /// Its log, oldest first.
    #[serde(default)]
    pub log: Vec<JobLogLine>,
}

/// One line of a job's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLogLine {
    /// Unix time.
    pub at: i64,
    /// The text.
    pub line: String,
}

/// `POST /v1/jobs/ID/progress` (the job's owner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// 0.0 to 1.0 (None: unchanged).
    #[serde(default)]
    pub progress: Option<f64>,
    /// Lines to append to the log.
    #[serde(default)]
    pub log: Vec<String>,
}

/// `POST /v1/jobs/ID/finish` (the job's owner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobFinish {
    /// The result when it succeeded.
    #[serde(default)]
    pub result: Option<serde_json::Value>,
    /// Why it failed (None: it succeeded).
    #[serde(default)]
    pub error: Option<String>,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable lower-case kind (`unauthenticated`, `forbidden`,
    /// `not-found`, `conflict`, `invalid`, ...).
    pub kind: String,
    /// What went wrong, for the operator.
    pub message: String,
}

/// `GET /v1/hosts/HOST/config` (the host, or admin): what its sidecar and
/// filter should do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostConfig {
    /// The host.
    pub host: String,
    /// Where its disks replicate to (None: not protected yet).
    #[serde(default)]
    pub target: Option<TargetRef>,
    /// The policy of its protected disks (None: not protected yet). One
    /// policy per host: `protect` refuses a second one.
    #[serde(default)]
    pub policy: Option<Policy>,
    /// The protected disks and their states.
    #[serde(default)]
    pub protections: Vec<Protection>,
}

impl HostConfig {
    /// Whether replication should run: protected (or reprotecting) disks,
    /// none failed over.
    pub fn replicating(&self) -> bool {
        self.target.is_some() && self.protections.iter().any(|p| p.state.ships())
    }
}

/// A target as a host needs to know it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetRef {
    /// The target's name (its certificate's name).
    pub name: String,
    /// Its replication address.
    pub address: String,
}

/// `GET /v1/targets/TARGET/config` (the target, or admin): the hosts
/// protected to it, with the data keys it needs to open their change sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetConfig {
    /// The target.
    pub target: String,
    /// Its hosts.
    pub hosts: Vec<TargetHost>,
}

/// A host protected to a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetHost {
    /// The host.
    pub name: String,
    /// Its data key (hex of 32 bytes).
    pub datakey_hex: String,
}

/// `POST /v1/hosts/HOST/failover` (admin): a failover job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverJobRequest {
    /// The point: `latest`, `latest-processed`, `latest-app`, a name or a
    /// time.
    pub point: String,
    /// The image format (default vhd-dynamic).
    #[serde(default)]
    pub format: Option<String>,
    /// Output directory on the target (default: `DATA/failover/HOST`).
    #[serde(default)]
    pub out: Option<String>,
    /// Replace the point of a failed-over host.
    #[serde(default)]
    pub change_point: bool,
    /// SHA-256 of every image in the manifest.
    #[serde(default = "yes")]
    pub checksums: bool,
}

/// One image a reprotect adopts as a disk's replica at the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReprotectImage {
    /// The disk.
    pub disk: String,
    /// The image's path on the target's machine (inside its data
    /// directory or an `--export-root`).
    pub path: String,
}

/// `POST /v1/hosts/HOST/reprotect` (admin): a reprotect job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReprotectRequest {
    /// The target that receives the stream (replicating back: the primary
    /// site's; default: the other direction's, if a round trip left one).
    #[serde(default)]
    pub target: Option<String>,
    /// Images adopted as replicas (replicating back into the original
    /// disks); none keeps the replicas the target holds.
    #[serde(default)]
    pub images: Vec<ReprotectImage>,
}

/// `POST /v1/hosts/HOST/failback` (admin): a failback job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailbackRequest {
    /// The point: `latest`, `latest-app`, a name or a time.
    pub point: String,
}

/// `POST /v1/hosts/HOST/test-failover` (admin): a test failover job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailoverJobRequest {
    /// The point.
    pub point: String,
    /// Output directory on the target (default: `DATA/test-failover/HOST`).
    #[serde(default)]
    pub out: Option<String>,
}

fn yes() -> bool {
    true
}

/// A replication group: hosts whose points are taken together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// The group's name.
    pub name: String,
    /// Its hosts, in the order rounds reach them.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Take a group point this often (None: only when asked).
    #[serde(default)]
    pub interval_secs: Option<u64>,
    /// Longest time the members' writes stay held in a round, ms.
    #[serde(default = "default_group_timeout_ms")]
    pub timeout_ms: u64,
    /// Take an app-consistent group point this often (None: only when
    /// asked).
    #[serde(default)]
    pub app_interval_secs: Option<u64>,
}

/// The default hold of a group round: 300 ms.
pub fn default_group_timeout_ms() -> u64 {
    300
}

/// `POST /v1/groups/GROUP/hosts` (admin): add hosts to a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupHosts {
    /// The hosts to add.
    pub hosts: Vec<String>,
}

/// `POST /v1/groups/GROUP/points` (admin): take a group point now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GroupPointRequest {
    /// The point's name (default: `GROUP-MILLISECONDS`).
    #[serde(default)]
    pub name: Option<String>,
    /// App-consistent: every member freezes its file systems first.
    #[serde(default)]
    pub app: bool,
}

/// A group round as the server recorded it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupPoint {
    /// Its number.
    pub id: i64,
    /// The group.
    pub group: String,
    /// The point's name: the tag every member took.
    pub name: String,
    /// `taken` (a group-consistent point), `aborted`, `partial` or
    /// `not-started`.
    pub result: String,
    /// Whether the members froze their file systems (app-consistent).
    #[serde(default)]
    pub app: bool,
    /// Unix time of the round.
    pub at: i64,
    /// From the first hold to the last answer, µs.
    #[serde(default)]
    pub elapsed_us: Option<u64>,
    /// Per member: how it ended (the coordinator's outcome), or why the
    /// round did not start.
    #[serde(default)]
    pub members: serde_json::Value,
}

/// `POST /v1/groups/GROUP/failover` (admin): fail every member over at one
/// common point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupFailoverRequest {
    /// `latest-group` (the newest taken group point), `latest-group-app`
    /// (the newest app-consistent one) or a group point's name.
    pub point: String,
    /// The image format (default vhd-dynamic).
    #[serde(default)]
    pub format: Option<String>,
    /// Run a test failover instead (replication goes on).
    #[serde(default)]
    pub test: bool,
}

/// A recovery plan: ordered steps, each failing over (or testing) a group
/// or some hosts with scripts around it, or waiting for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The plan's name.
    pub name: String,
    /// Its steps, run in order.
    pub steps: Vec<PlanStep>,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStep {
    /// What the step does.
    pub action: StepAction,
    /// A shell command the server runs before the step (a non-zero exit
    /// fails the plan). Runs again if the server restarts during it: make
    /// it idempotent.
    #[serde(default)]
    pub pre: Option<String>,
    /// A shell command the server runs after the step.
    #[serde(default)]
    pub post: Option<String>,
}

/// What a plan step does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum StepAction {
    /// Every host of a replication group at one group point.
    Group {
        /// The group.
        group: String,
    },
    /// These hosts, each at its own point.
    Hosts {
        /// The hosts.
        hosts: Vec<String>,
    },
    /// Wait until the operator runs `ferry job continue JOB`.
    Manual {
        /// What the operator should do first.
        text: String,
    },
}

/// How a plan runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanMode {
    /// Test failovers: replication goes on.
    Test,
    /// Failovers: replication of every host in the plan stops.
    Failover,
    /// Remove the test failovers of every host in the plan.
    Cleanup,
}

impl PlanMode {
    /// The kebab-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PlanMode::Test => "test",
            PlanMode::Failover => "failover",
            PlanMode::Cleanup => "cleanup",
        }
    }
}

/// `POST /v1/plans/PLAN/run` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanRunRequest {
    /// Test, failover or cleanup.
    pub mode: PlanMode,
    /// The point: default `latest-group` for group steps and `latest`
    /// (`latest-processed` for tests) for host steps; a name applies to
    /// every step.
    #[serde(default)]
    pub point: Option<String>,
    /// Image format of failovers (default vhd-dynamic).
    #[serde(default)]
    pub format: Option<String>,
}

/// Something the operator should look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// What kind: `rpo-exceeded`, `no-crash-point`, `no-app-point`,
    /// `resync-required`, `heartbeat-lost`, `spool-space-low`,
    /// `journal-space-low`.
    pub kind: String,
    /// `warning` or `critical`.
    pub severity: String,
    /// What it is about: `HOST/DISK`, `HOST/COMPONENT` or `target:NAME`.
    pub subject: String,
    /// For people.
    pub message: String,
}
