//! `ferry filter`: the write interceptor daemon and its user verbs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_filter::config::{parse_size, DiskConfig, FilterConfig, Listen};
use ferry_filter::control::{self, Request, TagRequest};

/// `ferry filter [DAEMON FLAGS]` or `ferry filter status|tag ...`.
#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:\n  \
    ferry filter --disk data=./disk.img --listen unix:./web01/nbd.sock --state ./web01\n  \
    ferry filter --disk data=/dev/vdb --nbd-device data=/dev/nbd0 --state /var/lib/ferry/filter\n  \
    ferry filter --config /etc/ferry/filter.toml\n  \
    ferry filter status --state ./web01\n  \
    ferry filter tag before-upgrade --state ./web01 --app --mount /srv --pre 'sync'"
)]
pub struct FilterArgs {
    #[command(subcommand)]
    command: Option<FilterCommand>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
enum FilterCommand {
    /// Per-disk tracking state, ring fill, lag and counters of a running filter.
    Status(StatusArgs),
    /// Insert a tag (recovery point) across all disks of the host.
    Tag(TagArgs),
    /// A minimal consumer: read a disk's ring in order, verify payload
    /// checksums, commit (a stand-in for the sidecar in tests and benchmarks).
    Drain(DrainArgs),
    /// Mark every allocated region of a disk (or all disks) for resync: the
    /// sidecar re-reads them and, where the target holds data, sends only
    /// the blocks whose checksums differ.
    Resync(ResyncArgs),
}

#[derive(Debug, Args)]
struct ResyncArgs {
    /// State directory of the filter.
    #[arg(long)]
    state: PathBuf,
    /// The disk (default: every disk).
    #[arg(long)]
    disk: Option<String>,
}

#[derive(Debug, Args)]
struct DrainArgs {
    /// State directory of the filter.
    #[arg(long)]
    state: PathBuf,
    /// Disk whose ring to drain.
    #[arg(long, default_value = "data")]
    disk: String,
    /// Keep draining until interrupted (SIGINT/SIGTERM) instead of stopping when empty.
    #[arg(long)]
    follow: bool,
    /// Print each record as a JSON line on stdout.
    #[arg(long)]
    print: bool,
    /// Read records without committing them (they stay in the ring).
    #[arg(long)]
    no_commit: bool,
}

/// Run the daemon: serve each disk over NBD and record its writes.
#[derive(Debug, Args)]
pub(crate) struct DaemonArgs {
    /// TOML configuration instead of --disk/--listen/--state (see docs/ARCHITECTURE.md).
    #[arg(long, conflicts_with_all = ["disk", "listen", "state"])]
    pub(crate) config: Option<PathBuf>,
    /// A protected disk: NAME=PATH (block device or file); repeat for more.
    #[arg(long, value_name = "NAME=PATH")]
    pub(crate) disk: Vec<String>,
    /// Where to serve NBD: unix:SOCKET or tcp:ADDR:PORT; repeat for more.
    #[arg(long, value_name = "unix:SOCKET|tcp:ADDR")]
    listen: Vec<String>,
    /// State directory: control socket, tracking metadata, ring links.
    #[arg(long)]
    pub(crate) state: Option<PathBuf>,
    /// Payload area of each disk's ring (e.g. 64M).
    #[arg(long, value_parser = size)]
    ring_size: Option<u64>,
    /// Record slots per ring (default: one per 4 KiB of ring size).
    #[arg(long)]
    ring_slots: Option<u32>,
    /// Dirty-bitmap granularity (default 4K, 16K above 512 GiB).
    #[arg(long, value_parser = size)]
    granularity: Option<u64>,
    /// Activity-log extent size (default 4M).
    #[arg(long, value_parser = size)]
    al_extent: Option<u64>,
    /// Activity-log slots (default 1024).
    #[arg(long)]
    al_slots: Option<u32>,
    /// Minimum NBD block size advertised (default: the device's logical
    /// block size, 1 for files).
    #[arg(long)]
    block_size: Option<u32>,
    /// Do not copy a newly protected disk's existing data (by default its
    /// allocated regions are marked dirty the first time, so the sidecar
    /// ships them): only for a disk known to be identical at the target,
    /// e.g. blank on both sides.
    #[arg(long)]
    no_initial_copy: bool,
    /// Serve group rounds of the control-plane server's coordinator on this
    /// address (mutual TLS; registered hosts only; default
    /// 0.0.0.0:20004 when registered, "off" to disable).
    #[arg(long)]
    group_listen: Option<String>,
    /// Serve Prometheus metrics (plain HTTP) on this address.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// A file system frozen for app-consistent group points (repeat).
    #[arg(long = "app-mount")]
    app_mounts: Vec<PathBuf>,
    /// Command run before freezing for an app-consistent group point.
    #[arg(long)]
    app_pre: Option<String>,
    /// Command run after thawing, always.
    #[arg(long)]
    app_post: Option<String>,
    /// Serve a disk to the kernel's own NBD client: DISK=/dev/nbdN, or
    /// DISK=auto for any free device (needs the nbd module: `modprobe
    /// nbd`). A restarted filter reattaches to the same device.
    #[arg(long, value_name = "DISK=/dev/nbdN|auto")]
    nbd_device: Vec<String>,
    /// Seconds before the kernel requeues an unanswered request on a new
    /// connection (default 30).
    #[arg(long, value_name = "SECS")]
    nbd_timeout: Option<u64>,
    /// Seconds the kernel waits for a restarted filter before failing
    /// requests (default 120).
    #[arg(long, value_name = "SECS")]
    nbd_dead_timeout: Option<u64>,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// State directory of the filter.
    #[arg(long)]
    state: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TagArgs {
    /// Tag name.
    name: String,
    /// State directory of the filter.
    #[arg(long)]
    state: PathBuf,
    /// App-consistent: freeze the --mount file systems around the tag.
    #[arg(long)]
    app: bool,
    /// Mount point to freeze with --app; repeat for more.
    #[arg(long, requires = "app")]
    mount: Vec<PathBuf>,
    /// Command run before freezing (sh -c).
    #[arg(long, requires = "app")]
    pre: Option<String>,
    /// Command run after thawing, always (sh -c).
    #[arg(long, requires = "app")]
    post: Option<String>,
    /// Limit for each script and for the freeze, seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn size(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

/// Run `ferry filter ...`.
pub fn run(args: FilterArgs) -> Result<ExitCode> {
    match args.command {
        Some(FilterCommand::Status(s)) => status(s),
        Some(FilterCommand::Tag(t)) => tag(t),
        Some(FilterCommand::Drain(d)) => drain(d),
        Some(FilterCommand::Resync(r)) => resync(r),
        None => daemon(args.daemon),
    }
}

fn daemon(args: DaemonArgs) -> Result<ExitCode> {
    let config = daemon_config(&args)?;
    run_daemon(config, &args, |_| Ok(()))
}

/// The filter configuration the daemon flags describe.
pub(crate) fn daemon_config(args: &DaemonArgs) -> Result<FilterConfig> {
    let mut config = match &args.config {
        Some(path) => FilterConfig::from_file(path)?,
        None => {
            let Some(state) = args.state.clone() else {
                bail!("give --state DIR (or --config FILE); see `ferry filter --help`");
            };
            let disks = args
                .disk
                .iter()
                .map(|d| DiskConfig::parse(d))
                .collect::<Result<Vec<_>, _>>()?;
            let listen = args
                .listen
                .iter()
                .map(|l| Listen::parse(l))
                .collect::<Result<Vec<_>, _>>()?;
            FilterConfig::new(disks, listen, state)
        }
    };
    if let Some(size) = args.ring_size {
        config.set_ring_size(size);
    }
    if let Some(slots) = args.ring_slots {
        config.ring_slots = slots;
    }
    if let Some(g) = args.granularity {
        config.granularity = Some(g);
    }
    if let Some(e) = args.al_extent {
        config.al_extent = e;
    }
    if let Some(s) = args.al_slots {
        config.al_slots = s;
    }
    if let Some(b) = args.block_size {
        config.block_size = Some(b);
    }
    if args.no_initial_copy {
        config.initial_copy = false;
    }
    for device in &args.nbd_device {
        config
            .nbd_devices
            .push(ferry_filter::config::parse_nbd_device(device)?);
    }
    if let Some(secs) = args.nbd_timeout {
        config.nbd_timeouts.request = std::time::Duration::from_secs(secs);
    }
    if let Some(secs) = args.nbd_dead_timeout {
        config.nbd_timeouts.dead_connection = std::time::Duration::from_secs(secs);
    }
    config.app = ferry_filter::config::AppSettings {
        mounts: args.app_mounts.clone(),
        pre: args.app_pre.clone(),
        post: args.app_post.clone(),
    };
    Ok(config)
}

/// Runs the filter daemon with `config` (and the registration, group port,
/// metrics and heartbeats the flags ask for), calling `started` once every
/// disk is served.
pub(crate) fn run_daemon(
    mut config: FilterConfig,
    args: &DaemonArgs,
    started: impl FnOnce(&[ferry_filter::daemon::KernelDevice]) -> ferry_filter::Result<()>,
) -> Result<ExitCode> {
    crate::init_logging();
    let stop = Arc::new(AtomicBool::new(false));
    let registration = crate::agent::Registration::load(&config.state)?;
    let group_listen = match (args.group_listen.as_deref(), &registration) {
        (Some("off"), _) | (None, None) => None,
        (Some(addr), _) => Some(addr.to_owned()),
        (None, Some(_)) => Some(format!("0.0.0.0:{}", ferry_filter::grouplink::DEFAULT_PORT)),
    };
    if let Some(listen) = &group_listen {
        let reg = registration
            .as_ref()
            .context("--group-listen needs a registered host (`ferry host register`)")?;
        config.group_link = Some(ferry_filter::grouplink::GroupLinkConfig {
            listen: listen.clone(),
            credentials: reg.credentials.clone(),
            host: reg.name.clone(),
            coordinator: ferry_filter::grouplink::COORDINATOR.to_owned(),
        });
    }
    crate::metrics::serve(
        args.metrics_listen.as_deref(),
        &stop,
        crate::metrics::over(config.state.clone(), crate::metrics::filter_page),
    )?;
    if let Some(reg) = registration {
        crate::agent::spawn_filter_heartbeats(
            reg,
            config.state.clone(),
            group_listen,
            stop.clone(),
        )?;
    }
    ferry_filter::daemon::run_with(config, stop, started)?;
    Ok(ExitCode::SUCCESS)
}

fn status(args: StatusArgs) -> Result<ExitCode> {
    let response = control::call(&args.state, &Request::Status, Duration::from_secs(10))?;
    let status = response.status.context("filter sent no status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "filter pid {} state {} seq {} (next {})",
        status.pid,
        status.state.display(),
        status.seq,
        status.next_seq
    );
    for d in &status.disks {
        println!("disk {} ({}, {} bytes)", d.name, d.path.display(), d.size);
        println!("  tracking:  {} ({})", d.tracking, d.reason);
        println!(
            "  ring:      {}/{} slots, {}/{} payload bytes",
            d.ring_slots_used, d.ring_slots, d.ring_payload_used, d.ring_payload
        );
        println!(
            "  lag:       {} records, {} bytes, {:.3} s",
            d.lag_records, d.lag_bytes, d.lag_seconds
        );
        println!(
            "  dirty:     {} bytes awaiting resync, {} of them claimed (in the ring, not committed)",
            d.dirty_bytes, d.claimed_bytes
        );
        let c = &d.counters;
        println!(
            "  counters:  {} writes ({} bytes), {} reads, {} flushes, {} trims, {} zeroes",
            c.writes, c.write_bytes, c.reads, c.flushes, c.trims, c.zeroes
        );
        println!(
            "             {} data records, {} metadata records, {} resync records, {} bitmap writes, {} AL syncs, {} I/O errors",
            c.data_records, c.metadata_records, c.resync_records, c.bitmap_writes, c.al_syncs, c.io_errors
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn resync(args: ResyncArgs) -> Result<ExitCode> {
    let request = Request::ResyncAll(control::ResyncRequest { disk: args.disk });
    let response = control::call(&args.state, &request, Duration::from_secs(60))?;
    let outcome = response.resync.context("filter sent no resync outcome")?;
    for d in &outcome.disks {
        println!("{}: {} bytes marked for resync", d.name, d.bytes);
    }
    Ok(ExitCode::SUCCESS)
}

fn tag(args: TagArgs) -> Result<ExitCode> {
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        bail!("--timeout must be a positive number of seconds");
    }
    let request = TagRequest {
        name: args.name,
        app: args.app,
        mounts: args.mount,
        pre: args.pre,
        post: args.post,
        timeout_ms: Duration::from_secs_f64(args.timeout)
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX),
    };
    let wait = Duration::from_secs_f64(args.timeout * 3.0 + 10.0);
    let response = control::call(&args.state, &Request::Tag(request), wait)?;
    let tag = response.tag.context("filter sent no tag")?;
    let resyncing: Vec<_> = crate::replicate::inconsistent_disks(&args.state)
        .into_iter()
        .filter(|d| tag.disks.contains(d))
        .collect();
    if !resyncing.is_empty() {
        eprintln!(
            "ferry: warning: the sidecar reports {} not consistent yet (a resync runs): \
             this tag will not be a recovery point; tag again once `ferry sidecar status` \
             says consistent",
            resyncing.join(", ")
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tag)?);
    } else {
        println!(
            "tag {} at seq {} on {} ({}; writes held {} us{})",
            tag.name,
            tag.seq,
            tag.disks.join(", "),
            if tag.app {
                "app-consistent"
            } else {
                "crash-consistent"
            },
            tag.barrier_us,
            if tag.app {
                format!(", frozen {} us", tag.frozen_us)
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn drain(args: DrainArgs) -> Result<ExitCode> {
    use ferry_ring::ring::Consumer;
    use std::io::Write;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    let path = args.state.join("disks").join(&args.disk).join("ring");
    let mut consumer =
        Consumer::open(&path).with_context(|| format!("opening ring {}", path.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let (mut records, mut bytes, mut bad) = (0u64, 0u64, 0u64);
    loop {
        let mut end = None;
        while let Some(view) = consumer.next()? {
            let r = view.record;
            let ok = view.verify_payload().is_ok();
            bad += u64::from(!ok);
            records += 1;
            bytes += view.payload.map_or(0, |p| p.len() as u64);
            if args.print {
                writeln!(
                    out,
                    "{{\"seq\":{},\"kind\":\"{:?}\",\"offset\":{},\"length\":{},\"checksum\":{},\"payload\":{},\"payload_ok\":{},\"fua\":{},\"aux\":{},\"timestamp_ns\":{}}}",
                    r.seq, r.kind, r.offset, r.length, r.checksum, view.payload.is_some(), ok, r.fua(), r.aux, r.timestamp_ns
                )?;
            }
            end = Some(view.index + 1);
        }
        out.flush()?;
        if let (Some(end), false) = (end, args.no_commit) {
            consumer.commit(end)?;
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) || (!args.follow && end.is_none()) {
            break;
        }
        if args.follow {
            consumer.check_generation()?;
            consumer.wait(Duration::from_millis(100))?;
        }
    }
    eprintln!("drained {records} records, {bytes} payload bytes, {bad} bad checksums");
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
