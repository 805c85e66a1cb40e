//! The control-plane verbs: `ferry server init|run`, `ferry host
//! token|register|list|show`, `ferry target token|register|list` (in
//! `replicate.rs`'s `ferry target`), `ferry policy create|list|show`,
//! `ferry protect`, `ferry status`, `ferry job list|show|wait`.
//!
//! Admin verbs find the server in `--server URL --token T --ca FILE`, or in
//! the environment (`FERRY_SERVER`, `FERRY_TOKEN`, `FERRY_CA`) that
//! `ferry server init` prints.
//!
//! Exit codes of these verbs: 0 done; 1 a job waited for failed; 2 a local
//! error (bad arguments, files); 3 the server could not be reached or its
//! certificate is not trusted; 4 the server refused the credentials (401,
//! 403); 5 not found (404); 6 refused as it stands (409 conflict, 422
//! invalid).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_api::types::{
    Alert, HostInfo, Job, JobState, Policy, ProtectRequest, Protection, RegisterRequest,
    Registered, Role, TargetInfo, TokenIssued, TokenRequest,
};
use ferry_api::Client;
use serde_json::json;

/// Exit code: a job waited for failed.
pub const EXIT_JOB_FAILED: u8 = 1;
/// Exit code: the server could not be reached, or is not trusted.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit code: the credentials were refused (401, 403).
pub const EXIT_REFUSED: u8 = 4;
/// Exit code: not found (404).
pub const EXIT_NOT_FOUND: u8 = 5;
/// Exit code: refused as it stands (409, 422).
pub const EXIT_CONFLICT: u8 = 6;

/// The file a registered host or target keeps its server settings in
/// (in its state or data directory).
pub const SERVER_FILE: &str = "server.json";
/// The file next to it holding its API token (0600).
pub const TOKEN_FILE: &str = "server.token";
/// The credentials directory a registration writes (in the state or data
/// directory).
pub const CREDENTIALS_DIR: &str = "credentials";

/// The exit code for an error of these verbs.
pub fn exit_code(err: &anyhow::Error) -> Option<u8> {
    if err.chain().any(|e| e.downcast_ref::<JobFailed>().is_some()) {
        return Some(EXIT_JOB_FAILED);
    }
    let api = err
        .chain()
        .find_map(|e| e.downcast_ref::<ferry_api::Error>())?;
    use ferry_api::ErrorKind as K;
    Some(match (api.kind(), api.status()) {
        (K::Connect | K::Tls | K::Http, _) => EXIT_UNREACHABLE,
        (K::Api, Some(401 | 403)) => EXIT_REFUSED,
        (K::Api, Some(404)) => EXIT_NOT_FOUND,
        (K::Api, Some(409 | 422)) => EXIT_CONFLICT,
        _ => crate::image::EXIT_ERROR,
    })
}

/// Where the server is and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// The server's URL, https://HOST[:PORT] (default: $FERRY_SERVER).
    #[arg(long, global = true)]
    server: Option<String>,
    /// The API token (default: $FERRY_TOKEN).
    #[arg(long, global = true)]
    token: Option<String>,
    /// The server's CA certificate (default: $FERRY_CA).
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
}

impl Conn {
    /// A client of the server these options name.
    pub fn client(&self) -> Result<Client> {
        let from_env = |v: &Option<String>, var: &str| {
            v.clone()
                .or_else(|| std::env::var(var).ok().filter(|s| !s.is_empty()))
        };
        let url = from_env(&self.server, "FERRY_SERVER").ok_or_else(|| {
            anyhow!("no server: give --server https://HOST:PORT or set FERRY_SERVER")
        })?;
        let token = from_env(&self.token, "FERRY_TOKEN")
            .ok_or_else(|| anyhow!("no token: give --token or set FERRY_TOKEN"))?;
        let ca = self
            .ca
            .clone()
            .or_else(|| std::env::var_os("FERRY_CA").map(PathBuf::from))
            .ok_or_else(|| anyhow!("no CA certificate: give --ca FILE or set FERRY_CA"))?;
        let pem = std::fs::read(&ca).with_context(|| format!("read {}", ca.display()))?;
        Ok(Client::new(&url, &pem, Some(token.trim().to_owned()))?)
    }
}

// ---- ferry server -------------------------------------------------------

/// `ferry server`.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Make a data directory: CA, API certificate, database, admin token.
    #[command(
        after_help = "Example:\n  ferry server init --data /var/lib/ferry-server --name cp.example.com"
    )]
    Init(ServerInitArgs),
    /// Serve the API over TLS.
    #[command(
        after_help = "Example:\n  ferry server run --data /var/lib/ferry-server --listen 0.0.0.0:7443"
    )]
    Run(ServerRunArgs),
}

/// `ferry server init`.
#[derive(Debug, Args)]
pub struct ServerInitArgs {
    /// Data directory to create.
    #[arg(long)]
    data: PathBuf,
    /// DNS names or addresses clients reach the server by (besides
    /// localhost, 127.0.0.1 and ::1); repeat for several.
    #[arg(long = "name")]
    names: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// `ferry server run`.
#[derive(Debug, Args)]
pub struct ServerRunArgs {
    /// Data directory made by `ferry server init`.
    #[arg(long)]
    data: PathBuf,
    /// Address to listen on (HOST:PORT; port 0 picks one, written to
    /// DATA/server.addr).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: String,
    /// Serve Prometheus metrics (plain HTTP: loopback or a management
    /// network) on this address, e.g. 127.0.0.1:9750.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// A daemon silent this long raises a heartbeat-lost alert (daemons
    /// report every 5 s).
    #[arg(long, default_value = "30s", value_parser = parse_secs)]
    heartbeat_timeout: u64,
}

/// Runs `ferry server ...`.
pub fn run_server(cmd: ServerCommand) -> Result<ExitCode> {
    match cmd {
        ServerCommand::Init(a) => {
            let r = ferry_server::daemon::init(&a.data, &a.names)?;
            if a.json {
                print_json(&json!({
                    "data": r.data, "admin_token": r.admin_token,
                    "ca": r.ca_path, "ca_fingerprint": r.ca_fingerprint,
                }))?;
            } else {
                println!("server data directory {} made", r.data.display());
                println!(
                    "CA certificate  {} ({})",
                    r.ca_path.display(),
                    r.ca_fingerprint
                );
                println!(
                    "admin token     {} (also in {})",
                    r.admin_token,
                    r.data
                        .join(ferry_server::daemon::ADMIN_TOKEN_FILE)
                        .display()
                );
                println!();
                println!("Start it:  ferry server run --data {}", r.data.display());
                println!("Then, for the CLI:");
                println!(
                    "  export FERRY_SERVER=https://127.0.0.1:{} FERRY_CA={} FERRY_TOKEN=$(cat {})",
                    ferry_api::client::DEFAULT_PORT,
                    r.ca_path.display(),
                    r.data
                        .join(ferry_server::daemon::ADMIN_TOKEN_FILE)
                        .display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ServerCommand::Run(a) => {
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, stop.clone()).context("signal handler")?;
            }
            let options = ferry_server::daemon::RunOptions {
                metrics: a.metrics_listen.clone(),
                heartbeat_timeout_secs: Some(
                    i64::try_from(a.heartbeat_timeout).unwrap_or(i64::MAX),
                ),
            };
            ferry_server::daemon::run(&a.data, &a.listen, &options, stop)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

// ---- registration -------------------------------------------------------

/// How a host or target reaches the server to register.
#[derive(Debug, Args)]
pub struct RegisterConn {
    /// The server's URL, https://HOST[:PORT].
    #[arg(long)]
    server: String,
    /// The one-time registration token (`ferry host token`).
    #[arg(long)]
    token: String,
    /// The server's CA fingerprint (sha256:HEX) as printed with the token:
    /// the CA is fetched and checked against it.
    #[arg(long, conflicts_with = "ca", required_unless_present = "ca")]
    ca_fingerprint: Option<String>,
    /// The server's CA certificate, if already copied here.
    #[arg(long)]
    ca: Option<PathBuf>,
}

impl RegisterConn {
    fn ca_pem(&self) -> Result<String> {
        match (&self.ca, &self.ca_fingerprint) {
            (Some(path), _) => {
                std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
            }
            (None, Some(fp)) => Ok(ferry_api::client::fetch_pinned_ca(&self.server, fp)?),
            (None, None) => bail!("give --ca-fingerprint or --ca"),
        }
    }
}

/// Registers `name` in `role` and writes what it received under `dir`:
/// `credentials/` (CA, certificate, key, a host's data key),
/// `server.json` and `server.token`.
pub fn register(
    conn: &RegisterConn,
    role: Role,
    name: &str,
    address: Option<String>,
    dir: &Path,
) -> Result<Registered> {
    let ca_pem = conn.ca_pem()?;
    let client = Client::new(&conn.server, ca_pem.as_bytes(), None)?;
    let reg: Registered = client.post(
        "/v1/register",
        &RegisterRequest {
            token: conn.token.trim().to_owned(),
            role,
            name: name.to_owned(),
            address,
        },
    )?;
    if reg.ca_pem.trim() != ca_pem.trim() {
        bail!("the server answered with another CA than the one pinned: refusing its credentials");
    }
    let creds = dir.join(CREDENTIALS_DIR);
    make_private_dir(dir)?;
    make_private_dir(&creds)?;
    write_private(&creds.join("ca.crt"), reg.ca_pem.as_bytes())?;
    write_private(&creds.join(format!("{name}.crt")), reg.cert_pem.as_bytes())?;
    write_private(&creds.join(format!("{name}.key")), reg.key_pem.as_bytes())?;
    if let Some(hex) = &reg.datakey_hex {
        write_private(&creds.join(format!("{name}.datakey")), &from_hex(hex)?)?;
    }
    write_private(
        &dir.join(TOKEN_FILE),
        format!("{}\n", reg.api_token).as_bytes(),
    )?;
    let settings = json!({
        "url": client.url(),
        "role": role.as_str(),
        "name": name,
        "ca": creds.join("ca.crt"),
        "credentials": creds,
    });
    write_private(&dir.join(SERVER_FILE), format!("{settings:#}\n").as_bytes())?;
    Ok(reg)
}

/// Bytes of the lower- or upper-case hex the server sends (data keys).
pub(crate) fn from_hex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        bail!("odd-length hex from the server");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16).map_err(|_| anyhow!("bad hex from the server"))
        })
        .collect()
}

fn make_private_dir(dir: &Path) -> Result<()> {
    Ok(ferry_server::daemon::make_private_dir(dir)?)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(ferry_server::daemon::write_private(path, bytes)?)
}

/// `ferry host token` / `ferry target token`.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The name the registrant must use (default: any).
    #[arg(long)]
    name: Option<String>,
    /// How long the token is valid (30m, 24h, 7d).
    #[arg(long, default_value = "24h", value_parser = parse_secs)]
    ttl: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Issues a registration token for `role`.
pub fn issue_token(a: &TokenArgs, role: Role) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let t: TokenIssued = client.post(
        "/v1/registration-tokens",
        &TokenRequest {
            role,
            name: a.name.clone(),
            ttl_secs: a.ttl,
        },
    )?;
    if a.json {
        print_json(&t)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("token {} (one use, until {})", t.token, utc(t.expires_at));
    let name = t.name.clone().unwrap_or_else(|| "NAME".into());
    match role {
        Role::Host => println!(
            "on the host:  ferry host register --server {} --token {} --ca-fingerprint {} --name {name} --state STATE_DIR",
            client.url(),
            t.token,
            t.ca_fingerprint
        ),
        _ => println!(
            "on the target:  ferry target register --server {} --token {} --ca-fingerprint {} --name {name} --address HOST:PORT --data DATA_DIR",
            client.url(),
            t.token,
            t.ca_fingerprint
        ),
    }
    Ok(ExitCode::SUCCESS)
}

// ---- ferry host ---------------------------------------------------------

/// `ferry host`.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// A one-time token for a host to register with (admin).
    #[command(after_help = "Example:\n  ferry host token --name web01 --ttl 1h")]
    Token(TokenArgs),
    /// Register this host with the server (run on the host).
    #[command(
        after_help = "Example:\n  ferry host register --server https://cp:7443 --token fyr_... \\\n    --ca-fingerprint sha256:... --name web01 --state /var/lib/ferry/web01"
    )]
    Register(HostRegisterArgs),
    /// Every registered host (admin).
    List(ListArgs),
    /// One host: heartbeats, disks, protections.
    Show(ShowArgs),
}

/// `ferry host register`.
#[derive(Debug, Args)]
pub struct HostRegisterArgs {
    /// This host's name.
    #[arg(long)]
    name: String,
    /// The host's state directory (the filter's `--state`): credentials
    /// and server settings are written there.
    #[arg(long)]
    state: PathBuf,
    #[command(flatten)]
    conn: RegisterConn,
}

/// `--json` only.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) conn: Conn,
}

/// A name and `--json`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The name.
    pub(crate) name: String,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) conn: Conn,
}

/// Runs `ferry host ...`.
pub fn run_host(cmd: &HostCommand) -> Result<ExitCode> {
    match cmd {
        HostCommand::Token(a) => issue_token(a, Role::Host),
        HostCommand::Register(a) => {
            let reg = register(&a.conn, Role::Host, &a.name, None, &a.state)?;
            println!(
                "host {} registered; credentials in {}, server settings in {}",
                reg.name,
                a.state.join(CREDENTIALS_DIR).display(),
                a.state.join(SERVER_FILE).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::List(a) => {
            let hosts: Vec<HostInfo> = a.conn.client()?.get("/v1/hosts")?;
            if a.json {
                print_json(&hosts)?;
            } else {
                print_hosts(&hosts);
            }
            Ok(ExitCode::SUCCESS)
        }
        HostCommand::Show(a) => {
            let host: HostInfo = a.conn.client()?.get(&format!("/v1/hosts/{}", a.name))?;
            if a.json {
                print_json(&host)?;
            } else {
                print_host(&host);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_hosts(hosts: &[HostInfo]) {
    let mut t = Table::new(&[
        "HOST",
        "DISKS",
        "PROTECTED",
        "FILTER",
        "SIDECAR",
        "REGISTERED",
    ]);
    for h in hosts {
        t.row(vec![
            h.name.clone(),
            h.disks.len().to_string(),
            h.protections.len().to_string(),
            heartbeat_age(h, ferry_api::types::Component::Filter),
            heartbeat_age(h, ferry_api::types::Component::Sidecar),
            utc(h.registered_at),
        ]);
    }
    t.print();
}

fn print_host(h: &HostInfo) {
    println!("host {} (registered {})", h.name, utc(h.registered_at));
    for c in [
        ferry_api::types::Component::Filter,
        ferry_api::types::Component::Sidecar,
    ] {
        println!("  {:<8} last heartbeat {}", c.as_str(), heartbeat_age(h, c));
    }
    let mut t = Table::new(&[
        "DISK", "SIZE", "STATE", "SINCE", "POLICY", "TARGET", "REASON",
    ]);
    for d in &h.disks {
        let p = h.protections.iter().find(|p| p.disk == d.name);
        t.row(vec![
            d.name.clone(),
            crate::replicate::human_bytes(d.size),
            p.map_or("unprotected".into(), |p| p.state.as_str().into()),
            p.map_or(String::new(), |p| utc(p.since)),
            p.map_or(String::new(), |p| p.policy.clone()),
            p.map_or(String::new(), |p| p.target.clone()),
            p.map_or(String::new(), |p| p.reason.clone()),
        ]);
    }
    for p in h
        .protections
        .iter()
        .filter(|p| !h.disks.iter().any(|d| d.name == p.disk))
    {
        t.row(vec![
            p.disk.clone(),
            "?".into(),
            p.state.as_str().into(),
            utc(p.since),
            p.policy.clone(),
            p.target.clone(),
            p.reason.clone(),
        ]);
    }
    t.print();
}

fn heartbeat_age(h: &HostInfo, c: ferry_api::types::Component) -> String {
    h.heartbeats
        .iter()
        .find(|hb| hb.component == c)
        .map_or("never".into(), |hb| ago(hb.at))
}

// ---- ferry target (control-plane verbs) ---------------------------------

/// `ferry target register`.
#[derive(Debug, Args)]
pub struct TargetRegisterArgs {
    /// This target's name.
    #[arg(long)]
    name: String,
    /// The replication address sidecars reach this target at (HOST:PORT).
    #[arg(long)]
    address: String,
    /// The target's data directory (`ferry target --data`).
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    conn: RegisterConn,
}

/// Runs `ferry target register`.
pub fn run_target_register(a: &TargetRegisterArgs) -> Result<ExitCode> {
    let reg = register(
        &a.conn,
        Role::Target,
        &a.name,
        Some(a.address.clone()),
        &a.data,
    )?;
    println!(
        "target {} registered; credentials in {}, server settings in {}",
        reg.name,
        a.data.join(CREDENTIALS_DIR).display(),
        a.data.join(SERVER_FILE).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs `ferry target list`.
pub fn run_target_list(a: &ListArgs) -> Result<ExitCode> {
    let targets: Vec<TargetInfo> = a.conn.client()?.get("/v1/targets")?;
    if a.json {
        print_json(&targets)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&["TARGET", "ADDRESS", "HEARTBEAT", "REGISTERED"]);
    for x in &targets {
        t.row(vec![
            x.name.clone(),
            x.address.clone(),
            x.heartbeat.as_ref().map_or("never".into(), |h| ago(h.at)),
            utc(x.registered_at),
        ]);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}

// ---- ferry policy -------------------------------------------------------

/// `ferry policy`.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create a replication policy.
    #[command(
        after_help = "Example:\n  ferry policy create gold --rpo 5m --retention 3d --crash-interval 1m --app-interval 1h"
    )]
    Create(PolicyCreateArgs),
    /// Every policy.
    List(ListArgs),
    /// One policy.
    Show(ShowArgs),
    /// Change a policy (a failback policy too: `NAME-failback`, made with
    /// NAME); the sidecars under it take the change with their next plan.
    #[command(
        after_help = "Example:\n  ferry policy set gold-failback --rpo 30m --app-interval off"
    )]
    Set(PolicySetArgs),
}

/// `ferry policy set`: only the given settings change.
#[derive(Debug, Args)]
pub struct PolicySetArgs {
    /// The policy's name.
    name: String,
    /// Alert when a disk's lag exceeds this.
    #[arg(long, value_parser = parse_secs)]
    rpo: Option<u64>,
    /// How long recovery points are kept.
    #[arg(long, value_parser = parse_secs)]
    retention: Option<u64>,
    /// Interval of crash-consistent points.
    #[arg(long, value_parser = parse_secs)]
    crash_interval: Option<u64>,
    /// Interval of app-consistent points, or "off".
    #[arg(long)]
    app_interval: Option<String>,
    /// zstd level (negative: fast modes).
    #[arg(long, allow_negative_numbers = true)]
    compression_level: Option<i32>,
    /// Bytes per second on the wire (e.g. 50M; 0: unlimited).
    #[arg(long, value_parser = crate::replicate::size)]
    bandwidth: Option<u64>,
    /// Print the policy as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// `--app-interval`: a duration or "off".
fn app_interval(text: &str) -> Result<Option<u64>> {
    match text {
        "off" => Ok(None),
        s => Ok(Some(
            parse_secs(s).map_err(|e| anyhow!("--app-interval: {e}"))?,
        )),
    }
}

/// `ferry policy create`.
#[derive(Debug, Args)]
pub struct PolicyCreateArgs {
    /// The policy's name.
    name: String,
    /// Alert when a disk's lag exceeds this.
    #[arg(long, default_value = "15m", value_parser = parse_secs)]
    rpo: u64,
    /// How long recovery points are kept.
    #[arg(long, default_value = "24h", value_parser = parse_secs)]
    retention: u64,
    /// Interval of crash-consistent points.
    #[arg(long, default_value = "5m", value_parser = parse_secs)]
    crash_interval: u64,
    /// Interval of app-consistent points, or "off".
    #[arg(long, default_value = "1h")]
    app_interval: String,
    /// zstd level (negative: fast modes).
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    compression_level: i32,
    /// Bytes per second on the wire (e.g. 50M; 0: unlimited).
    #[arg(long, default_value = "0", value_parser = crate::replicate::size)]
    bandwidth: u64,
    /// Print the created policy as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Runs `ferry policy ...`.
pub fn run_policy(cmd: &PolicyCommand) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Create(a) => {
            let app_interval_secs = app_interval(&a.app_interval)?;
            let p = Policy {
                name: a.name.clone(),
                rpo_alert_secs: a.rpo,
                retention_secs: a.retention,
                crash_interval_secs: a.crash_interval,
                app_interval_secs,
                compression_level: a.compression_level,
                bandwidth: a.bandwidth,
                failback: None,
            };
            let created: Policy = a.conn.client()?.post("/v1/policies", &p)?;
            if a.json {
                print_json(&created)?;
            } else {
                print_policies(&[created]);
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::List(a) => {
            let list: Vec<Policy> = a.conn.client()?.get("/v1/policies")?;
            if a.json {
                print_json(&list)?;
            } else {
                print_policies(&list);
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Show(a) => {
            let p: Policy = a.conn.client()?.get(&format!("/v1/policies/{}", a.name))?;
            if a.json {
                print_json(&p)?;
            } else {
                print_policies(&[p]);
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Set(a) => {
            let client = a.conn.client()?;
            let path = format!("/v1/policies/{}", a.name);
            let mut p: Policy = client.get(&path)?;
            if let Some(v) = a.rpo {
                p.rpo_alert_secs = v;
            }
            if let Some(v) = a.retention {
                p.retention_secs = v;
            }
            if let Some(v) = a.crash_interval {
                p.crash_interval_secs = v;
            }
            if let Some(v) = &a.app_interval {
                p.app_interval_secs = app_interval(v)?;
            }
            if let Some(v) = a.compression_level {
                p.compression_level = v;
            }
            if let Some(v) = a.bandwidth {
                p.bandwidth = v;
            }
            let changed: Policy = client.put(&path, &p)?;
            if a.json {
                print_json(&changed)?;
            } else {
                print_policies(&[changed]);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_policies(list: &[Policy]) {
    let mut t = Table::new(&[
        "POLICY",
        "RPO ALERT",
        "RETENTION",
        "CRASH",
        "APP",
        "ZSTD",
        "BANDWIDTH",
        "FAILBACK",
    ]);
    for p in list {
        t.row(vec![
            p.name.clone(),
            secs(p.rpo_alert_secs),
            secs(p.retention_secs),
            secs(p.crash_interval_secs),
            p.app_interval_secs.map_or("off".into(), secs),
            p.compression_level.to_string(),
            if p.bandwidth == 0 {
                "unlimited".into()
            } else {
                format!("{}/s", crate::replicate::human_bytes(p.bandwidth))
            },
            p.failback.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.print();
}

// ---- ferry protect ------------------------------------------------------

/// `ferry protect`.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  ferry protect web01 --disk data --disk logs --policy gold --target site-b"
)]
pub struct ProtectArgs {
    /// The host.
    host: String,
    /// A disk to protect (repeat; default: every disk the host reported).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// The policy.
    #[arg(long)]
    policy: String,
    /// The target.
    #[arg(long)]
    target: String,
    /// Wait until every disk is protected (its initial copy done), with a
    /// progress bar; give up after this long (e.g. 2h).
    #[arg(long, value_parser = parse_secs)]
    wait: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Runs `ferry protect`.
pub fn run_protect(a: &ProtectArgs) -> Result<ExitCode> {
    let list: Vec<Protection> = a.conn.client()?.post(
        &format!("/v1/hosts/{}/protect", a.host),
        &ProtectRequest {
            disks: a.disks.clone(),
            policy: a.policy.clone(),
            target: a.target.clone(),
        },
    )?;
    let list = match a.wait {
        Some(secs) => wait_protected(
            &a.conn.client()?,
            &a.host,
            Duration::from_secs(secs),
            !a.json,
        )?,
        None => list,
    };
    if a.json {
        print_json(&list)?;
    } else {
        print_protections(&list);
    }
    Ok(ExitCode::SUCCESS)
}

/// Polls `host` until every protected disk is `protected`, drawing the
/// initial copy's progress from the bytes still to resync.
fn wait_protected(
    client: &Client,
    host: &str,
    timeout: Duration,
    bar: bool,
) -> Result<Vec<Protection>> {
    let started = Instant::now();
    let pb = bar.then(|| {
        let pb = indicatif::ProgressBar::new(1);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed}",
        ) {
            pb.set_style(style);
        }
        pb
    });
    let mut most = 0u64;
    loop {
        let h: HostInfo = client.get(&format!("/v1/hosts/{host}"))?;
        let left: u64 = h.protections.iter().map(|p| p.resync_bytes).sum();
        most = most.max(left);
        if let Some(pb) = &pb {
            let states: Vec<&str> = h.protections.iter().map(|p| p.state.as_str()).collect();
            pb.set_message(format!("{host}: {}", states.join(", ")));
            pb.set_length(most.max(1));
            pb.set_position(most - left);
        }
        let done = !h.protections.is_empty()
            && h.protections
                .iter()
                .all(|p| p.state == ferry_api::types::ProtectionState::Protected);
        if done {
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            return Ok(h.protections);
        }
        if started.elapsed() >= timeout {
            bail!("{host} is not protected after {:?}", started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_protections(list: &[Protection]) {
    let mut t = Table::new(&[
        "HOST", "DISK", "STATE", "LAG", "SINCE", "POLICY", "TARGET", "REASON",
    ]);
    for p in list {
        t.row(vec![
            p.host.clone(),
            p.disk.clone(),
            p.state.as_str().into(),
            format!("{} s", p.lag_secs),
            ago(p.since),
            p.policy.clone(),
            p.target.clone(),
            p.reason.clone(),
        ]);
    }
    t.print();
}

// ---- ferry status -------------------------------------------------------

/// `ferry status`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  ferry status\n  ferry status web01 --watch")]
pub struct StatusArgs {
    /// Only this host.
    host: Option<String>,
    /// Redraw every 2 seconds until interrupted.
    #[arg(long)]
    watch: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Runs `ferry status`.
pub fn run_status(a: &StatusArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    loop {
        let hosts: Vec<HostInfo> = match &a.host {
            Some(h) => vec![client.get(&format!("/v1/hosts/{h}"))?],
            None => client.get("/v1/hosts")?,
        };
        if a.json {
            print_json(&hosts)?;
        } else {
            if a.watch {
                print!("\x1b[2J\x1b[H");
            }
            print_hosts(&hosts);
            println!();
            let all: Vec<Protection> = hosts.iter().flat_map(|h| h.protections.clone()).collect();
            print_protections(&all);
            let alerts: Vec<Alert> = client.get("/v1/alerts")?;
            let alerts: Vec<Alert> = alerts
                .into_iter()
                .filter(|al| {
                    a.host
                        .as_deref()
                        .is_none_or(|h| al.subject.split('/').next() == Some(h))
                })
                .collect();
            println!();
            print_alerts(&alerts);
        }
        if !a.watch {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

// ---- jobs on a host's target --------------------------------------------

/// A job that ended without doing its work (exit [`EXIT_JOB_FAILED`]).
#[derive(Debug)]
pub struct JobFailed(pub Job);

impl std::fmt::Display for JobFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {} ({} {}) failed: {}",
            self.0.id,
            self.0.kind,
            self.0.subject,
            self.0.error.as_deref().unwrap_or("no reason given")
        )
    }
}

impl std::error::Error for JobFailed {}

/// Queues `action` (`failover`, `commit`, `test-failover`,
/// `test-failover-cleanup`) of `host` on its target through the server,
/// waits for it (a progress bar when `bar`) and returns its result.
pub fn host_job<B: serde::Serialize>(
    conn: &Conn,
    host: &str,
    action: &str,
    body: &B,
    bar: bool,
) -> Result<serde_json::Value> {
    let client = conn.client()?;
    let job: Job = client.post(&format!("/v1/hosts/{host}/{action}"), body)?;
    if bar {
        eprintln!(
            "job {} queued on {}",
            job.id,
            job.owner.trim_start_matches("target:")
        );
    }
    let job = wait_job(&client, job.id, None, bar)?;
    match (job.state, job.result.clone()) {
        (JobState::Succeeded, Some(v)) => Ok(v),
        _ => Err(JobFailed(job).into()),
    }
}

/// Fails over (or tests) every host of `group` at one group point through
/// the server: waits for every member's job and returns their results;
/// an error naming the first failed job if any failed.
pub fn group_job(
    conn: &Conn,
    group: &str,
    body: &ferry_api::types::GroupFailoverRequest,
    bar: bool,
) -> Result<Vec<serde_json::Value>> {
    let client = conn.client()?;
    let queued: serde_json::Value = client.post(&format!("/v1/groups/{group}/failover"), body)?;
    let jobs: Vec<Job> = serde_json::from_value(queued["jobs"].clone())?;
    if bar {
        eprintln!(
            "group {group} at {}: jobs {}",
            queued["point"]["name"].as_str().unwrap_or("?"),
            jobs.iter()
                .map(|j| format!("{} ({})", j.id, j.subject))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut results = Vec::new();
    let mut failed = None;
    for job in jobs {
        let job = wait_job(&client, job.id, None, bar)?;
        match (job.state, job.result.clone()) {
            (JobState::Succeeded, Some(v)) => results.push(v),
            _ => {
                failed.get_or_insert(job);
            }
        }
    }
    match failed {
        Some(job) => Err(JobFailed(job).into()),
        None => Ok(results),
    }
}

// ---- ferry plan ---------------------------------------------------------

/// `ferry plan`.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Create a recovery plan: ordered steps, each a group, some hosts or a
    /// manual instruction, with optional scripts the server runs around it.
    #[command(after_help = "Steps (repeat --step, run in order):\n  \
        group=GROUP[;pre=CMD][;post=CMD]       a replication group at one group point\n  \
        hosts=H1,H2[;pre=CMD][;post=CMD]       hosts, each at its own point\n  \
        manual=TEXT                            wait for `ferry job continue JOB`\n\n\
        Example:\n  ferry plan create shop-dr --step 'group=shop;pre=/opt/dr/fence.sh' \\\n    \
        --step 'manual=Switch DNS to site B' --step 'hosts=mail01;post=/opt/dr/check.sh'\n\n\
        Or from a JSON file ({\"name\": ..., \"steps\": [...]}) with --file.")]
    Create(PlanCreateArgs),
    /// Every plan.
    List(ListArgs),
    /// One plan.
    Show(ShowArgs),
    /// Run a plan as a job: --test (test failovers, replication goes on),
    /// --failover, or --cleanup (remove the test failovers); waits for it
    /// with a progress bar unless --no-wait.
    #[command(
        after_help = "Examples:\n  ferry plan run shop-dr --test\n  ferry plan run shop-dr --cleanup\n  ferry plan run shop-dr --failover --point latest-group --format vmdk-stream"
    )]
    Run(PlanRunArgs),
}

/// `ferry plan create`.
#[derive(Debug, Args)]
pub struct PlanCreateArgs {
    /// The plan's name.
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// A step (see below); repeat.
    #[arg(long = "step")]
    steps: Vec<String>,
    /// The plan as JSON instead.
    #[arg(long, conflicts_with_all = ["name", "steps"])]
    file: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// `ferry plan run`.
#[derive(Debug, Args)]
pub struct PlanRunArgs {
    /// The plan.
    name: String,
    /// Test failovers.
    #[arg(long, group = "mode", required = true)]
    test: bool,
    /// Failovers.
    #[arg(long, group = "mode")]
    failover: bool,
    /// Remove the test failovers.
    #[arg(long, group = "mode")]
    cleanup: bool,
    /// The point (default: latest-group for group steps, latest for host
    /// steps).
    #[arg(long)]
    point: Option<String>,
    /// Image format of failovers.
    #[arg(long)]
    format: Option<String>,
    /// Print the queued job and return at once.
    #[arg(long)]
    no_wait: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Parses a `--step` of `ferry plan create`.
pub fn parse_step(spec: &str) -> Result<ferry_api::types::PlanStep> {
    use ferry_api::types::{PlanStep, StepAction};
    let (head, mut rest) = match spec
        .find(";pre=")
        .into_iter()
        .chain(spec.find(";post="))
        .min()
    {
        Some(i) => (&spec[..i], &spec[i..]),
        None => (spec, ""),
    };
    let mut pre = None;
    let mut post = None;
    while !rest.is_empty() {
        let (key, body) = if let Some(b) = rest.strip_prefix(";pre=") {
            ("pre", b)
        } else if let Some(b) = rest.strip_prefix(";post=") {
            ("post", b)
        } else {
            bail!("step {spec:?}: expected ;pre=CMD or ;post=CMD");
        };
        let end = [body.find(";pre="), body.find(";post=")]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(body.len());
        let value = body[..end].trim().to_owned();
        if value.is_empty() {
            bail!("step {spec:?}: empty {key} command");
        }
        if key == "pre" {
            pre = Some(value)
        } else {
            post = Some(value)
        }
        rest = &body[end..];
    }
    let (kind, value) = head
        .split_once('=')
        .ok_or_else(|| anyhow!("step {spec:?}: want group=G, hosts=H1,H2 or manual=TEXT"))?;
    let action = match kind.trim() {
        "group" => StepAction::Group {
            group: value.trim().to_owned(),
        },
        "hosts" => StepAction::Hosts {
            hosts: value
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_owned)
                .collect(),
        },
        "manual" => StepAction::Manual {
            text: value.trim().to_owned(),
        },
        other => bail!("step {spec:?}: unknown kind {other:?} (group, hosts, manual)"),
    };
    if matches!(action, StepAction::Manual { .. }) && (pre.is_some() || post.is_some()) {
        bail!("step {spec:?}: a manual step has no scripts");
    }
    Ok(PlanStep { action, pre, post })
}

/// Runs `ferry plan ...`.
pub fn run_plan(cmd: &PlanCommand) -> Result<ExitCode> {
    use ferry_api::types::{Plan, PlanMode, PlanRunRequest};
    match cmd {
        PlanCommand::Create(a) => {
            let plan = match &a.file {
                Some(f) => serde_json::from_slice::<Plan>(
                    &std::fs::read(f).with_context(|| format!("read {}", f.display()))?,
                )
                .with_context(|| format!("parse {}", f.display()))?,
                None => Plan {
                    name: a.name.clone().unwrap_or_default(),
                    steps: a
                        .steps
                        .iter()
                        .map(|s| parse_step(s))
                        .collect::<Result<_>>()?,
                },
            };
            let plan: Plan = a.conn.client()?.post("/v1/plans", &plan)?;
            print_plans(&[plan], a.json)
        }
        PlanCommand::List(a) => {
            let list: Vec<Plan> = a.conn.client()?.get("/v1/plans")?;
            print_plans(&list, a.json)
        }
        PlanCommand::Show(a) => {
            let p: Plan = a.conn.client()?.get(&format!("/v1/plans/{}", a.name))?;
            print_plans(&[p], a.json)
        }
        PlanCommand::Run(a) => {
            let mode = match (a.test, a.failover) {
                (true, _) => PlanMode::Test,
                (_, true) => PlanMode::Failover,
                _ => PlanMode::Cleanup,
            };
            let client = a.conn.client()?;
            let req = PlanRunRequest {
                mode,
                point: a.point.clone(),
                format: a.format.clone(),
            };
            let job: Job = client.post(&format!("/v1/plans/{}/run", a.name), &req)?;
            if a.no_wait {
                if a.json {
                    print_json(&job)?;
                } else {
                    println!("job {} queued: ferry job wait {}", job.id, job.id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let job = wait_job(&client, job.id, None, !a.json)?;
            if a.json {
                print_json(&job)?;
            } else {
                print_job(&job);
            }
            Ok(job_exit(&job))
        }
    }
}

fn print_plans(list: &[ferry_api::types::Plan], json: bool) -> Result<ExitCode> {
    use ferry_api::types::StepAction;
    if json {
        match list {
            [one] => print_json(one)?,
            _ => print_json(&list)?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    for p in list {
        println!("plan {}", p.name);
        for (i, s) in p.steps.iter().enumerate() {
            let what = match &s.action {
                StepAction::Group { group } => format!("group {group}"),
                StepAction::Hosts { hosts } => format!("hosts {}", hosts.join(", ")),
                StepAction::Manual { text } => format!("manual: {text}"),
            };
            let pre = s
                .pre
                .as_ref()
                .map(|c| format!(" [pre: {c}]"))
                .unwrap_or_default();
            let post = s
                .post
                .as_ref()
                .map(|c| format!(" [post: {c}]"))
                .unwrap_or_default();
            println!("  {}. {what}{pre}{post}", i + 1);
        }
    }
    Ok(ExitCode::SUCCESS)
}

// ---- ferry alerts -------------------------------------------------------

/// Runs `ferry alerts`: exit 0 with none, 1 with a critical one.
pub fn run_alerts(a: &ListArgs) -> Result<ExitCode> {
    let alerts: Vec<Alert> = a.conn.client()?.get("/v1/alerts")?;
    if a.json {
        print_json(&alerts)?;
    } else {
        print_alerts(&alerts);
    }
    Ok(if alerts.iter().any(|al| al.severity == "critical") {
        ExitCode::from(EXIT_JOB_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_alerts(alerts: &[Alert]) {
    if alerts.is_empty() {
        println!("no alerts");
        return;
    }
    let mut t = Table::new(&["SEVERITY", "ALERT", "SUBJECT", "WHAT"]);
    for al in alerts {
        t.row(vec![
            al.severity.clone(),
            al.kind.clone(),
            al.subject.clone(),
            al.message.clone(),
        ]);
    }
    t.print();
}

// ---- ferry job ----------------------------------------------------------

/// `ferry job`.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Recent jobs, newest first.
    List(JobListArgs),
    /// One job with its log.
    Show(JobShowArgs),
    /// Wait for a job to end, with a progress bar; exit 1 if it failed.
    Wait(JobWaitArgs),
    /// Let a plan run waiting at a manual step go on.
    Continue(JobShowArgs),
    /// Cancel a plan run, or a job its target has not taken yet.
    Cancel(JobShowArgs),
}

/// `ferry job list`.
#[derive(Debug, Args)]
pub struct JobListArgs {
    /// Most jobs to show.
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// `ferry job show`.
#[derive(Debug, Args)]
pub struct JobShowArgs {
    /// The job's number.
    id: i64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// `ferry job wait`.
#[derive(Debug, Args)]
pub struct JobWaitArgs {
    /// The job's number.
    id: i64,
    /// Give up after this long (exit 2; the job goes on).
    #[arg(long, value_parser = parse_secs)]
    timeout: Option<u64>,
    /// Print the ended job as JSON instead of a progress bar.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// Runs `ferry job ...`.
pub fn run_job(cmd: &JobCommand) -> Result<ExitCode> {
    match cmd {
        JobCommand::List(a) => {
            let jobs: Vec<Job> = a
                .conn
                .client()?
                .get(&format!("/v1/jobs?limit={}", a.limit))?;
            if a.json {
                print_json(&jobs)?;
            } else {
                print_jobs(&jobs);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Show(a) => {
            let job: Job = a.conn.client()?.get(&format!("/v1/jobs/{}", a.id))?;
            if a.json {
                print_json(&job)?;
            } else {
                print_job(&job);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel(a) => {
            let job: Job = a
                .conn
                .client()?
                .post(&format!("/v1/jobs/{}/cancel", a.id), &json!({}))?;
            if a.json {
                print_json(&job)?;
            } else {
                println!("job {} cancelled", job.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Continue(a) => {
            let job: Job = a
                .conn
                .client()?
                .post(&format!("/v1/jobs/{}/continue", a.id), &json!({}))?;
            if a.json {
                print_json(&job)?;
            } else {
                println!("job {} continues", job.id);
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Wait(a) => {
            let job = wait_job(
                &a.conn.client()?,
                a.id,
                a.timeout.map(Duration::from_secs),
                !a.json,
            )?;
            if a.json {
                print_json(&job)?;
            } else {
                print_job(&job);
            }
            Ok(job_exit(&job))
        }
    }
}

/// The exit code of an ended job.
pub fn job_exit(job: &Job) -> ExitCode {
    match job.state {
        JobState::Succeeded => ExitCode::SUCCESS,
        _ => ExitCode::from(EXIT_JOB_FAILED),
    }
}

/// Polls job `id` until it ends (or `timeout` passes: an error), drawing a
/// progress bar on a terminal when `bar`.
pub fn wait_job(client: &Client, id: i64, timeout: Option<Duration>, bar: bool) -> Result<Job> {
    let started = Instant::now();
    let pb = bar.then(|| {
        let pb = indicatif::ProgressBar::new(1000);
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {percent:>3}% {elapsed}")
        {
            pb.set_style(style);
        }
        pb
    });
    loop {
        let job: Job = client.get(&format!("/v1/jobs/{id}"))?;
        if let Some(pb) = &pb {
            pb.set_message(format!(
                "job {} {} {}",
                job.id,
                job.kind,
                job.state.as_str()
            ));
            // Clamped to 0..=1000 first, so the cast neither truncates nor wraps.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            pb.set_position((job.progress.clamp(0.0, 1.0) * 1000.0).round() as u64);
        }
        if job.state.is_final() {
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            return Ok(job);
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            bail!(
                "job {id} is still {} after {:?}",
                job.state.as_str(),
                started.elapsed()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_jobs(jobs: &[Job]) {
    let mut t = Table::new(&[
        "JOB", "KIND", "SUBJECT", "STATE", "PROGRESS", "CREATED", "OWNER",
    ]);
    for j in jobs {
        t.row(vec![
            j.id.to_string(),
            j.kind.clone(),
            j.subject.clone(),
            j.state.as_str().into(),
            format!("{:.0}%", j.progress * 100.0),
            ago(j.created_at),
            j.owner.clone(),
        ]);
    }
    t.print();
}

fn print_job(j: &Job) {
    println!(
        "job {} {} {}: {} ({:.0}%), owner {}",
        j.id,
        j.kind,
        j.subject,
        j.state.as_str(),
        j.progress * 100.0,
        j.owner
    );
    if let Some(e) = &j.error {
        println!("error: {e}");
    }
    if let Some(r) = &j.result {
        // The whole result is in --json; people get its head.
        let text = r.to_string();
        match text.char_indices().nth(200) {
            Some((cut, _)) => println!("result: {}... (--json for all of it)", &text[..cut]),
            None => println!("result: {text}"),
        }
    }
    for l in &j.log {
        println!("  {}  {}", utc(l.at), l.line);
    }
}

// ---- output helpers -----------------------------------------------------

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A plain text table: columns as wide as their widest cell.
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|s| (*s).to_owned()).collect()],
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for r in &self.rows {
            let line: Vec<String> = r
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            println!("{}", line.join("  ").trim_end());
        }
    }
}

/// Parses 30s, 5m, 1h, 2d (a number alone: seconds) into seconds, at least 1.
pub fn parse_secs(s: &str) -> std::result::Result<u64, String> {
    match ferry_sidecar::policy::parse_duration(s) {
        Some(d) if d.as_secs() >= 1 => Ok(d.as_secs()),
        Some(_) => Err("at least 1s".into()),
        None => Err(format!("{s:?}: want a duration like 30s, 5m, 1h, 2d")),
    }
}

fn secs(s: u64) -> String {
    match s {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of Unix seconds.
pub(crate) fn utc(t: i64) -> String {
    u64::try_from(t)
        .ok()
        .and_then(|s| s.checked_mul(1_000_000_000))
        .map_or_else(
            || t.to_string(),
            |ns| ferry_master_target::clock::utc(ns)[..19].to_owned(),
        )
}

fn ago(t: i64) -> String {
    let d = ferry_server::db::now().saturating_sub(t).max(0);
    format!("{} ago", secs_rough(d))
}

fn secs_rough(d: i64) -> String {
    match d {
        d if d < 120 => format!("{d}s"),
        d if d < 7200 => format!("{}m", d / 60),
        d if d < 172_800 => format!("{}h", d / 3600),
        d => format!("{}d", d / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::types::StepAction;

    #[test]
    fn plan_steps_parse_with_their_scripts() {
        let s = parse_step("group=shop;pre=/opt/fence.sh a;b;post=echo done").unwrap();
        assert_eq!(
            s.action,
            StepAction::Group {
                group: "shop".into()
            }
        );
        assert_eq!(s.pre.as_deref(), Some("/opt/fence.sh a;b"));
        assert_eq!(s.post.as_deref(), Some("echo done"));
        let s = parse_step("hosts=web01, web02").unwrap();
        assert_eq!(
            s.action,
            StepAction::Hosts {
                hosts: vec!["web01".into(), "web02".into()]
            }
        );
        assert_eq!((s.pre, s.post), (None, None));
        let s = parse_step("manual=Switch DNS; then call Bob").unwrap();
        assert_eq!(
            s.action,
            StepAction::Manual {
                text: "Switch DNS; then call Bob".into()
            }
        );
        for bad in [
            "group",
            "disk=x",
            "hosts=web01;pre=",
            "manual=x;post=y",
            "=x",
        ] {
            assert!(parse_step(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_and_exit_codes() {
        assert_eq!(parse_secs("15m"), Ok(900));
        assert!(parse_secs("0").is_err());
        assert_eq!(secs(86_400), "1d");
        assert_eq!(secs(90), "90s");
        let e: anyhow::Error = ferry_api::Error::api(403, "forbidden".into(), "no".into()).into();
        assert_eq!(exit_code(&e), Some(EXIT_REFUSED));
        let e: anyhow::Error = ferry_api::Error::new(ferry_api::ErrorKind::Connect, "down").into();
        assert_eq!(exit_code(&e), Some(EXIT_UNREACHABLE));
        assert_eq!(exit_code(&anyhow::anyhow!("local")), None);
    }
}
