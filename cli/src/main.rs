//! `ferry`: the one installed binary. Each daemon and each user verb is a
//! subcommand; this file only parses the command line and dispatches.

mod agent;
mod credentials;
mod failback;
mod failover;
mod filter;
mod group;
mod image;
mod metrics;
mod replicate;
mod server;
mod volume;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// ferry: disaster-recovery replication for Linux block devices.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Disk images: create, inspect, check, convert and compare
    /// (raw, VHD fixed/dynamic/differencing, VMDK sparse/flat/stream-optimized).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The write interceptor: serve protected disks over NBD and record
    /// every write in write order (`ferry filter --help`).
    Filter(Box<filter::FilterArgs>),
    /// Slide the filter under a mounted device-mapper volume (LVM or dm):
    /// no unmount, the same device; runs until stopped.
    ProtectVolume(Box<volume::ProtectVolumeArgs>),
    /// Slide the filter back out from under a protected volume and stop it.
    UnprotectVolume(volume::UnprotectVolumeArgs),
    /// Make the CA, certificates and data keys a target and its hosts need.
    Credentials(credentials::CredentialsArgs),
    /// The recovery-site receiver: journals and replica images
    /// (`ferry target --help`), and `ferry target status|register|token|list`.
    Target(Box<replicate::TargetArgs>),
    /// Ship the filter's change stream to a target (`ferry sidecar --help`),
    /// and `ferry sidecar status`.
    Sidecar(Box<replicate::SidecarArgs>),
    /// A host's recovery points at a target (`ferry points HOST [--data DIR]`).
    Points(replicate::PointsArgs),
    /// Stop a host's replication and write its disks' images at a recovery
    /// point, with a manifest (`--change-point` picks another before commit).
    Failover(Box<failover::FailoverArgs>),
    /// Finalize a failover at its point; the other points are dropped.
    Commit(failover::CommitArgs),
    /// Accept a failed-over host's stream into seeded replicas: its
    /// original images (`--image DISK=PATH`, written in place) or the
    /// replica kept here; only differing blocks travel.
    Reprotect(failback::ReprotectArgs),
    /// Fail a reprotected host back into its replicas in place, at a point
    /// (`ferry commit` finalizes it).
    Failback(failback::FailbackArgs),
    /// Replication groups and group-consistent points: create, add, list,
    /// show, take, points (through the server), point (local filters).
    #[command(subcommand)]
    Group(group::GroupCommand),
    /// Writable images of a host at a point while replication goes on
    /// (`ferry test-failover cleanup HOST --data DIR` removes them).
    TestFailover(Box<failover::TestFailoverArgs>),
    /// The control-plane server: `ferry server init --data DIR`, `ferry
    /// server run --data DIR --listen ADDR`.
    #[command(subcommand)]
    Server(server::ServerCommand),
    /// Hosts known to the server: token, register, list, show.
    #[command(subcommand)]
    Host(server::HostCommand),
    /// Replication policies: create, list, show.
    #[command(subcommand)]
    Policy(server::PolicyCommand),
    /// Protect disks of a registered host under a policy to a target.
    Protect(server::ProtectArgs),
    /// Hosts, their daemons' heartbeats and their disks' protection states.
    Status(server::StatusArgs),
    /// What needs attention: RPO over threshold, points missing, resync
    /// required, heartbeats lost, space low (exit 1 if any is critical).
    Alerts(server::ListArgs),
    /// Jobs the server runs: list, show, wait, continue, cancel.
    #[command(subcommand)]
    Job(server::JobCommand),
    /// Recovery plans: create, list, show, run --test|--failover|--cleanup.
    #[command(subcommand)]
    Plan(server::PlanCommand),
}

/// Logs to stderr; `FERRY_LOG` = error|warn|info|debug|trace (default info).
fn init_logging() {
    let level = match std::env::var("FERRY_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("warn") => tracing::Level::WARN,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Keep large buffers (change sets of many MiB) on the heap once freed, so
/// that the next one reuses its pages instead of mapping fresh ones and
/// faulting every page in again (glibc would unmap anything above 32 MiB
/// and trim the heap eagerly).
fn keep_large_buffers() {
    // SAFETY: mallopt only changes allocator tuning parameters; called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
    }
}

fn main() -> ExitCode {
    keep_large_buffers();
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Image(cmd) => image::run(cmd),
        Command::Filter(args) => filter::run(*args),
        Command::ProtectVolume(args) => volume::run_protect(*args),
        Command::UnprotectVolume(args) => {
            init_logging();
            volume::run_unprotect(&args)
        }
        Command::Credentials(args) => credentials::run(args).map(|()| ExitCode::SUCCESS),
        Command::Target(args) => {
            init_logging();
            replicate::run_target(*args)
        }
        Command::Sidecar(args) => {
            init_logging();
            replicate::run_sidecar(*args)
        }
        Command::Points(args) => replicate::run_points(&args),
        Command::Failover(args) => failover::run_failover(&args),
        Command::Commit(args) => failover::run_commit(&args),
        Command::Reprotect(args) => failback::run_reprotect(&args),
        Command::Failback(args) => failback::run_failback(&args),
        Command::Group(cmd) => group::run(&cmd),
        Command::TestFailover(args) => failover::run_test_failover(&args),
        Command::Server(cmd) => {
            init_logging();
            server::run_server(cmd)
        }
        Command::Host(cmd) => server::run_host(&cmd),
        Command::Policy(cmd) => server::run_policy(&cmd),
        Command::Protect(args) => server::run_protect(&args),
        Command::Status(args) => server::run_status(&args),
        Command::Alerts(args) => server::run_alerts(&args),
        Command::Job(cmd) => server::run_job(&cmd),
        Command::Plan(cmd) => server::run_plan(&cmd),
    };
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ferry: {}", error_chain(&err));
            ExitCode::from(server::exit_code(&err).unwrap_or(image::EXIT_ERROR))
        }
    }
}

/// The error and its causes, `: `-separated, without repeating a cause
/// whose text its parent's message already carries (the libraries' I/O
/// errors say their source in their own message).
fn error_chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod error_chain_tests {
    #[test]
    fn causes_already_said_are_not_repeated() {
        let io = std::io::Error::other("disk gone");
        let err = anyhow::Error::new(std::io::Error::other(format!("read meta: {io}")))
            .context("open disk data");
        assert_eq!(
            super::error_chain(&err),
            "open disk data: read meta: disk gone"
        );
        let err = anyhow::anyhow!("inner").context("outer");
        assert_eq!(super::error_chain(&err), "outer: inner");
    }
}
