//! `ferry target` and `ferry sidecar`: the two ends of continuous
//! replication, and their status verbs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ferry_ring::ring::now_ns;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry_master_target::daemon::{self as target_daemon, TargetConfig};
use ferry_master_target::site::{read_statuses, Consistency, DiskStatus};
use ferry_sidecar::daemon::{self as sidecar_daemon, SidecarConfig, METRICS_FILE, SIDECAR_DIR};
use ferry_vhd::Format;

use crate::image::EXIT_ERROR;

pub(crate) fn size(s: &str) -> std::result::Result<u64, String> {
    ferry_vhd::parse_size(s).map_err(|e| e.to_string())
}

fn stop_flag() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    Ok(stop)
}

/// `ferry target [DAEMON FLAGS]` or `ferry target status ...`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
    ferry credentials init ./creds --host web01\n  \
    ferry target --data ./site-b --listen 127.0.0.1:9443 --credentials ./creds\n  \
    ferry target status --data ./site-b\n  \
    ferry target status --data ./site-b --json"
)]
pub struct TargetArgs {
    #[command(subcommand)]
    command: Option<TargetCommand>,
    #[command(flatten)]
    daemon: TargetDaemonArgs,
}

#[derive(Debug, Subcommand)]
enum TargetCommand {
    /// Per host and disk: applied sequence, lag, journal size, replica,
    /// consistency.
    Status(TargetStatusArgs),
    /// Register this target with the control-plane server (run on the
    /// target).
    Register(crate::server::TargetRegisterArgs),
    /// A one-time token for a target to register with (admin).
    Token(crate::server::TokenArgs),
    /// Every registered target (admin).
    List(crate::server::ListArgs),
}

/// Run the recovery-site receiver.
#[derive(Debug, Args)]
struct TargetDaemonArgs {
    /// Data directory: journals, replicas, status.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Address to listen on (host:port).
    #[arg(long, default_value = "0.0.0.0:9443")]
    listen: String,
    /// Credentials directory made by `ferry credentials init`.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// This target's certificate name in the credentials directory.
    #[arg(long, default_value = "target")]
    name: String,
    /// Format of new replicas: vhd-dynamic, vhd-fixed or raw.
    #[arg(long, default_value = "vhd-dynamic")]
    replica_format: String,
    /// Largest frame accepted (e.g. 64M).
    #[arg(long, value_parser = size)]
    max_frame: Option<u64>,
    /// How long recovery points are kept for hosts whose sidecar sends no
    /// retention (no policy file): 30s, 5m, 1h, 2d (a number alone is
    /// seconds). A host's policy `retention` takes precedence.
    #[arg(long, default_value = "24h", value_parser = parse_retention)]
    retention: Duration,
    /// Size of each disk's history (undo) segment files: retention frees
    /// space a segment at a time (e.g. 64M).
    #[arg(long, default_value = "64M", value_parser = size)]
    history_segment_size: u64,
    /// Serve Prometheus metrics (plain HTTP) on this address.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// A directory jobs from the control-plane server may write failover
    /// images under, besides the data directory (repeat).
    #[arg(long = "export-root")]
    export_roots: Vec<PathBuf>,
}

fn parse_retention(s: &str) -> std::result::Result<Duration, String> {
    match ferry_sidecar::policy::parse_duration(s) {
        Some(d) if d >= Duration::from_secs(1) => Ok(d),
        Some(_) => Err("at least 1s".to_owned()),
        None => Err(format!("{s:?}: use 30s, 5m, 1h or 2d")),
    }
}

#[derive(Debug, Args)]
struct TargetStatusArgs {
    /// Data directory of the target.
    #[arg(long)]
    data: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Dispatch `ferry target`.
pub fn run_target(args: TargetArgs) -> Result<ExitCode> {
    match args.command {
        Some(TargetCommand::Status(s)) => target_status(&s),
        Some(TargetCommand::Register(a)) => crate::server::run_target_register(&a),
        Some(TargetCommand::Token(a)) => {
            crate::server::issue_token(&a, ferry_api::types::Role::Target)
        }
        Some(TargetCommand::List(a)) => crate::server::run_target_list(&a),
        None => target(args.daemon),
    }
}

fn target(args: TargetDaemonArgs) -> Result<ExitCode> {
    let data = args
        .data
        .context("give --data DIR (see `ferry target --help`)")?;
    let stop = stop_flag()?;
    let registration = match &args.credentials {
        Some(_) => None,
        None => crate::agent::Registration::load(&data)?,
    };
    let (creds, name) = match (&args.credentials, &registration) {
        (Some(c), _) => (c.clone(), args.name),
        (None, Some(reg)) => {
            // The data keys of the hosts protected here, before any connects.
            if let Err(e) = reg
                .client()
                .and_then(|c| crate::agent::sync_data_keys(&c, reg))
            {
                tracing::warn!(error = %e, "data keys not fetched from the server yet (retrying)");
            }
            (reg.credentials.clone(), reg.name.clone())
        }
        (None, None) => anyhow::bail!(
            "give --credentials DIR (made by `ferry credentials init`), \
             or register the target: `ferry target register`"
        ),
    };
    if let Some(reg) = registration {
        crate::agent::spawn_target_agent(
            reg,
            data.clone(),
            args.export_roots.clone(),
            stop.clone(),
        )?;
    }
    crate::metrics::serve(
        args.metrics_listen.as_deref(),
        &stop,
        crate::metrics::over(data.clone(), crate::metrics::target_page),
    )?;
    let mut cfg = TargetConfig::new(data, args.listen, creds);
    cfg.name = name;
    cfg.replica_format = match args.replica_format.as_str() {
        "vhd-dynamic" => Format::VhdDynamic,
        "vhd-fixed" => Format::VhdFixed,
        "raw" => Format::Raw,
        other => anyhow::bail!("--replica-format {other}: use vhd-dynamic, vhd-fixed or raw"),
    };
    if let Some(m) = args.max_frame {
        cfg.max_frame = usize::try_from(m).context("--max-frame")?;
    }
    cfg.retention = args.retention;
    cfg.history_segment_size = args.history_segment_size;
    target_daemon::run(cfg, stop, |addr| {
        eprintln!("ferry target: listening on {addr}");
    })?;
    Ok(ExitCode::SUCCESS)
}

fn seq(s: Option<u64>) -> String {
    s.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub(crate) fn human_bytes(b: u64) -> String {
    human_f64(b as f64)
}

fn human_f64(mut v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn consistency_text(c: &Consistency) -> String {
    match c {
        Consistency::Consistent { since } => format!("consistent since seq {since}"),
        Consistency::Inconsistent { reason } => format!("inconsistent: {reason}"),
    }
}

fn target_status(args: &TargetStatusArgs) -> Result<ExitCode> {
    let statuses = read_statuses(&args.data)
        .with_context(|| format!("read the status of {}", args.data.display()))?;
    let running = target_daemon::is_running(&args.data);
    if args.json {
        let v = serde_json::json!({
            "data": args.data,
            "running": running,
            "disks": statuses,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "target {}: {}",
        args.data.display(),
        if running {
            "running"
        } else {
            "not running (figures as last written)"
        }
    );
    if statuses.is_empty() {
        println!("no protected disks yet");
    }
    for st in &statuses {
        print_disk(st);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_disk(st: &DiskStatus) {
    let age = Duration::from_nanos(now_ns().saturating_sub(st.updated_ns)).as_secs();
    println!();
    println!(
        "{}/{}  ({}, {})",
        st.host,
        st.disk,
        human_bytes(st.size),
        if st.replication_stopped {
            "failed over: replication stopped"
        } else if st.connected {
            "sidecar connected"
        } else {
            "sidecar not connected"
        }
    );
    println!(
        "  applied seq      {}  (received {}, epoch {})",
        seq(st.applied_seq),
        seq(st.received_seq),
        seq(st.epoch)
    );
    match &st.source_lag {
        Some(l) => println!(
            "  lag              {} records, {}, {:.1} s  (source side, reported {} s ago)",
            l.records,
            human_bytes(l.bytes),
            l.seconds,
            Duration::from_nanos(now_ns().saturating_sub(l.reported_ns)).as_secs()
        ),
        None => println!("  lag              not reported yet"),
    }
    println!(
        "  apply backlog    {} change sets, {}",
        st.apply_backlog_sets,
        human_bytes(st.apply_backlog_bytes)
    );
    println!(
        "  journal          {} (received sets, dropped once applied), history {} (undo behind the points)",
        human_bytes(st.journal_bytes),
        human_bytes(st.undo_bytes)
    );
    println!(
        "  replica          {} ({})",
        st.replica_path.display(),
        st.replica_format
    );
    println!("  consistency      {}", consistency_text(&st.consistency));
    println!(
        "  received         {} change sets, {} ({} resync)",
        st.received_sets,
        human_bytes(st.received_bytes),
        human_bytes(st.resync_bytes)
    );
    let p = &st.points;
    match (&p.oldest, &p.newest) {
        (Some(o), Some(n)) => {
            println!(
                "  points           {} (oldest {} seq {}, newest {} seq {} {:?})",
                p.count,
                utc(o.time_ns),
                o.seq,
                utc(n.time_ns),
                n.seq,
                n.name
            );
            let ago = |t: Option<u64>| {
                t.map_or_else(
                    || "never".to_owned(),
                    |t| {
                        format!(
                            "{} s ago",
                            Duration::from_nanos(now_ns().saturating_sub(t)).as_secs()
                        )
                    },
                )
            };
            println!(
                "  last points      crash-consistent {}, app-consistent {}",
                ago(p.last_crash_ns),
                ago(p.last_app_ns)
            );
        }
        _ => println!("  points           none yet (made only while the replica is consistent)"),
    }
    if let Some(g) = &st.last_gap {
        println!("  last gap         {g}");
    }
    if let Some(e) = &st.apply_error {
        println!("  apply error      {e}");
    }
    println!("  updated          {age} s ago");
}

/// `ferry sidecar [DAEMON FLAGS]` or `ferry sidecar status ...`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
    ferry sidecar --state ./web01 --target 127.0.0.1:9443 --credentials ./creds\n  \
    ferry sidecar --state ./web01 --target dr.example:9443 --credentials ./creds --bandwidth 50M\n  \
    ferry sidecar --state ./web01 --target 127.0.0.1:9443 --credentials ./creds --policy policy.toml\n  \
    ferry sidecar status --state ./web01"
)]
pub struct SidecarArgs {
    #[command(subcommand)]
    command: Option<SidecarCommand>,
    #[command(flatten)]
    daemon: SidecarDaemonArgs,
}

#[derive(Debug, Subcommand)]
enum SidecarCommand {
    /// Shipping metrics: churn, shipped bytes, compression, lag (the RPO).
    Status(SidecarStatusArgs),
}

/// Drain the filter's rings and ship the change stream to a target.
#[derive(Debug, Args)]
struct SidecarDaemonArgs {
    /// State directory of the filter (`ferry filter --state`).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Target address (host:port).
    #[arg(long)]
    target: Option<String>,
    /// Credentials directory made by `ferry credentials init`.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Host name (default: the only HOST.datakey in the credentials).
    #[arg(long)]
    host: Option<String>,
    /// Policy file (TOML): point intervals, retention, compression,
    /// bandwidth (see the sidecar crate's `policy` module).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Bandwidth limit in bytes per second on the wire (e.g. 50M; 0 = none;
    /// overrides the policy).
    #[arg(long, value_parser = size)]
    bandwidth: Option<u64>,
    /// Largest change set, raw bytes (e.g. 16M).
    #[arg(long, value_parser = size)]
    batch_bytes: Option<u64>,
    /// Most records per change set.
    #[arg(long)]
    batch_records: Option<usize>,
    /// zstd level of the payload (1 default; negative values are zstd's
    /// fast modes, e.g. -3, for links faster than a core compresses;
    /// overrides the policy).
    #[arg(long, allow_hyphen_values = true)]
    compression_level: Option<i32>,
    /// Change sets in flight before the first acknowledgement is awaited.
    #[arg(long, default_value_t = ferry_sidecar::net::DEFAULT_WINDOW)]
    window: usize,
    /// After an idle spell, wait this many milliseconds for more writes
    /// before building a change set.
    #[arg(long, default_value = "2")]
    batch_delay_ms: u64,
    /// On-disk spool per disk for outages longer than the ring holds (e.g. 1G; 0 = none).
    #[arg(long, value_parser = size)]
    spool_size: Option<u64>,
    /// Serve Prometheus metrics (plain HTTP) on this address.
    #[arg(long)]
    metrics_listen: Option<String>,
}

#[derive(Debug, Args)]
struct SidecarStatusArgs {
    /// State directory of the filter.
    #[arg(long)]
    state: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Dispatch `ferry sidecar`.
pub fn run_sidecar(args: SidecarArgs) -> Result<ExitCode> {
    match args.command {
        Some(SidecarCommand::Status(s)) => sidecar_status(&s),
        None => sidecar(args.daemon),
    }
}

fn sidecar(args: SidecarDaemonArgs) -> Result<ExitCode> {
    let state = args
        .state
        .clone()
        .context("give --state DIR (the filter's)")?;
    let local_policy = match &args.policy {
        Some(path) => Some(ferry_sidecar::policy::Policy::from_file(path)?),
        None => None,
    };
    let stop = stop_flag()?;
    crate::metrics::serve(
        args.metrics_listen.as_deref(),
        &stop,
        crate::metrics::over(state.clone(), crate::metrics::sidecar_page),
    )?;
    if args.target.is_none() {
        if let Some(reg) = crate::agent::Registration::load(&state)? {
            // Registered: the server says where to and under which policy.
            crate::agent::run_registered_sidecar(&reg, &state, &stop, |plan, flag| {
                let mut cfg =
                    SidecarConfig::new(state.clone(), plan.target.clone(), reg.credentials.clone());
                cfg.host = Some(reg.name.clone());
                cfg.target_name = Some(plan.target_name.clone());
                let policy = server_policy(&plan.policy, local_policy.as_ref());
                cfg.bandwidth = policy.bandwidth;
                cfg.zstd_level = policy.compression_level;
                cfg.policy = Some(policy);
                sidecar_overrides(&args, &mut cfg)?;
                Ok(sidecar_daemon::run(cfg, flag)?)
            })?;
            return Ok(ExitCode::SUCCESS);
        }
    }
    let target = args
        .target
        .clone()
        .context("give --target HOST:PORT (or register the host: `ferry host register`)")?;
    let creds = args
        .credentials
        .clone()
        .context("give --credentials DIR (made by `ferry credentials init`)")?;
    let mut cfg = SidecarConfig::new(state, target, creds);
    cfg.host = args.host.clone();
    if let Some(policy) = local_policy {
        cfg.bandwidth = policy.bandwidth;
        cfg.zstd_level = policy.compression_level;
        cfg.policy = Some(policy);
    }
    sidecar_overrides(&args, &mut cfg)?;
    sidecar_daemon::run(cfg, stop)?;
    Ok(ExitCode::SUCCESS)
}

/// The server's policy as the sidecar runs it; what only the host knows
/// (file systems to freeze, scripts around the freeze) comes from its
/// local `--policy` file.
fn server_policy(
    p: &ferry_api::types::Policy,
    local: Option<&ferry_sidecar::policy::Policy>,
) -> ferry_sidecar::policy::Policy {
    ferry_sidecar::policy::Policy {
        crash_interval: Duration::from_secs(p.crash_interval_secs)
            .max(ferry_sidecar::policy::MIN_INTERVAL),
        app_interval: p.app_interval_secs.map(Duration::from_secs),
        app_mounts: local.map(|l| l.app_mounts.clone()).unwrap_or_default(),
        app_pre: local.and_then(|l| l.app_pre.clone()),
        app_post: local.and_then(|l| l.app_post.clone()),
        retention: Duration::from_secs(p.retention_secs.max(1)),
        compression_level: p.compression_level,
        bandwidth: p.bandwidth,
    }
}

/// The command line's tuning flags, over whatever the policy set.
fn sidecar_overrides(args: &SidecarDaemonArgs, cfg: &mut SidecarConfig) -> Result<()> {
    if let Some(b) = args.bandwidth {
        cfg.bandwidth = b;
    }
    if let Some(b) = args.batch_bytes {
        cfg.limits.max_bytes = usize::try_from(b).context("--batch-bytes")?;
    }
    if let Some(r) = args.batch_records {
        cfg.limits.max_records = r;
    }
    cfg.batch_delay = std::time::Duration::from_millis(args.batch_delay_ms);
    if let Some(l) = args.compression_level {
        cfg.zstd_level = l;
    }
    cfg.window = args.window;
    if let Some(sz) = args.spool_size {
        cfg.spool_size = sz;
    }
    Ok(())
}

fn sidecar_status(args: &SidecarStatusArgs) -> Result<ExitCode> {
    let path = metrics_path(&args.state);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "ferry: no sidecar metrics at {} ({e}): is `ferry sidecar` running?",
                path.display()
            );
            return Ok(ExitCode::from(EXIT_ERROR));
        }
    };
    let v: serde_json::Value = serde_json::from_str(&text).context("parse metrics")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "sidecar of host {} -> {}",
        v["host"].as_str().unwrap_or("?"),
        v["target"].as_str().unwrap_or("?")
    );
    for d in v["disks"].as_array().into_iter().flatten() {
        let u = |k: &str| d[k].as_u64().unwrap_or(0);
        let f = |k: &str| d[k].as_f64().unwrap_or(0.0);
        println!();
        println!(
            "{}  ({}, epoch {}, acked seq {})",
            d["disk"].as_str().unwrap_or("?"),
            if d["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "not connected"
            },
            u("epoch"),
            u("acked_seq")
        );
        println!(
            "  lag          {} records, {}, {:.1} s",
            u("lag_records"),
            human_bytes(u("lag_bytes")),
            f("lag_seconds")
        );
        println!("  churn        {}/s", human_f64(f("churn_bytes_per_sec")));
        println!(
            "  shipped      {} raw -> {} on the wire ({:.2}x), {} change sets ({} resync)",
            human_bytes(u("raw_bytes")),
            human_bytes(u("shipped_bytes")),
            f("compression_ratio"),
            u("change_sets"),
            u("resync_sets")
        );
        if u("resync_raw_bytes") + u("exchange_skipped_bytes") > 0 {
            println!(
                "  resync       {} sent, {} equal at the target (checksum exchange: not sent)",
                human_bytes(u("resync_raw_bytes")),
                human_bytes(u("exchange_skipped_bytes"))
            );
        }
        if let Some(e) = d["last_point_error"].as_str() {
            println!("  points       last scheduled point not made: {e}");
        } else if let Some(t) = d["last_crash_point_ns"].as_u64() {
            println!("  points       last crash-consistent {}", utc(t));
        }
        if u("spool_sets") > 0 {
            println!(
                "  spool        {} change sets, {} (target unreachable)",
                u("spool_sets"),
                human_bytes(u("spool_bytes"))
            );
        }
        match d["consistent_since"].as_u64() {
            Some(s) => println!("  consistency  consistent since seq {s}"),
            None => println!("  consistency  inconsistent (resync running or pending)"),
        }
        if let Some(e) = d["last_error"].as_str() {
            println!("  last error   {e}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn metrics_path(state: &Path) -> PathBuf {
    state.join(SIDECAR_DIR).join(METRICS_FILE)
}

/// The disks a running sidecar reports as not consistent (a resync runs or
/// is owed): a tag taken now on them is recorded but is no recovery point.
/// Empty when no sidecar has written its metrics in the last 10 s.
pub(crate) fn inconsistent_disks(state: &Path) -> Vec<String> {
    let path = metrics_path(state);
    let fresh = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age < Duration::from_secs(10));
    let Some(v) = fresh
        .then(|| std::fs::read_to_string(&path).ok())
        .flatten()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    else {
        return Vec::new();
    };
    v["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|d| d["consistent_since"].is_null())
        .filter_map(|d| d["disk"].as_str().map(str::to_string))
        .collect()
}

/// `ferry points HOST --data DIR [--json]`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    ferry points web01\n  \
    ferry points web01 --data ./site-b\n  \
    ferry points web01 --data ./site-b --json")]
pub struct PointsArgs {
    /// The protected host.
    host: String,
    /// Data directory of the target (without it: through the control-plane
    /// server, read by the host's target).
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    conn: crate::server::Conn,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// List a host's recovery points: tags at which every disk's replica was
/// a consistent prefix of the source's write order.
pub fn run_points(args: &PointsArgs) -> Result<ExitCode> {
    let points: Vec<ferry_master_target::points::Point> = match &args.data {
        Some(data) => ferry_master_target::points::of_host(data, &args.host)
            .with_context(|| format!("points of {} in {}", args.host, data.display()))?,
        None => serde_json::from_value(crate::server::host_job(
            &args.conn,
            &args.host,
            "points",
            &serde_json::json!({}),
            false,
        )?)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&points)?);
        return Ok(ExitCode::SUCCESS);
    }
    if points.is_empty() {
        println!("no recovery points for {} yet", args.host);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<24} {:<6} {:>20}  name", "time (UTC)", "kind", "seq");
    for p in &points {
        println!(
            "{:<24} {:<6} {:>20}  {}",
            utc(p.time_ns),
            if p.app { "app" } else { "crash" },
            p.seq,
            p.name
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `YYYY-MM-DD HH:MM:SS.mmm` of UNIX nanoseconds (UTC).
fn utc(ns: u64) -> String {
    ferry_master_target::clock::utc(ns)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn inconsistent_disks_come_from_fresh_sidecar_metrics() {
        let state = std::env::temp_dir().join(format!("ferry-incons-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state);
        // No sidecar: nothing to say.
        assert!(super::inconsistent_disks(&state).is_empty());
        let path = super::metrics_path(&state);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            &path,
            r#"{"disks": [{"disk": "a", "consistent_since": 7},
                          {"disk": "b", "consistent_since": null},
                          {"disk": "c"}]}"#,
        )
        .unwrap();
        assert_eq!(super::inconsistent_disks(&state), ["b", "c"]);
        // Metrics nobody rewrote for a while: a sidecar that is gone.
        let old = std::time::SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(super::inconsistent_disks(&state).is_empty());
        std::fs::remove_dir_all(&state).unwrap();
    }

    #[test]
    fn target_retention_flag() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct T {
            #[command(flatten)]
            args: super::TargetArgs,
        }
        let parse = |extra: &[&str]| {
            let argv = ["ferry-target", "--data", "d", "--credentials", "c"];
            T::try_parse_from(argv.iter().chain(extra)).map(|t| t.args.daemon.retention)
        };
        assert_eq!(parse(&[]).unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse(&["--retention", "2d"]).unwrap(),
            Duration::from_secs(2 * 86_400)
        );
        assert_eq!(
            parse(&["--retention", "90"]).unwrap(),
            Duration::from_secs(90)
        );
        for bad in ["0s", "1w", "soon"] {
            assert!(parse(&["--retention", bad]).is_err(), "{bad}");
        }
    }
}
