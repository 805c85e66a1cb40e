//! `ferry reprotect` and `ferry failback`: the reverse direction, on a
//! target's data directory (see `ferry_master_target::failback`). Like the
//! failover verbs they run inside the running `ferry target`, or here on
//! the locked data directory when none runs.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use ferry_master_target::control::Request;
use ferry_master_target::failback::{Adopt, Reprotected};

/// `ferry reprotect HOST --data DIR [--image DISK=PATH]...`, or through
/// the server: `ferry reprotect HOST [--target T] [--image DISK=PATH]...`.
#[derive(Debug, Args)]
#[command(
    after_help = "Run on the target that is to receive the host's stream. On the \
primary site's target, adopt the machine's original disk images (VMDK monolithicSparse or \
monolithicFlat, VHD dynamic or fixed, raw): the stream of the failed-over machine is written \
into them in place. On the recovery site's target after a failback, without --image: the \
replica kept there is compared and brought up to date. Either way the sender resyncs the \
whole disk through the checksum exchange, so only blocks that differ travel.\n\nWithout \
--data, through the server: a committed host replicates back to --target under its policy's \
failback policy; a failed-back host is protected forward again (its former target and \
policy).\n\nExamples:\n  \
    ferry reprotect web01 --data ./site-a --image data=/vm/web01/web01-data.vmdk\n  \
    ferry reprotect web01 --data ./site-b\n  \
    ferry reprotect web01 --target site-a --image data=/vmfs/web01/web01-data.vmdk\n  \
    ferry reprotect web01"
)]
pub struct ReprotectArgs {
    /// The host whose stream this target is to receive.
    host: String,
    /// Data directory of the target (without it: through the server).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Through the server: the target that receives the stream back (the
    /// primary site's).
    #[arg(long, conflicts_with = "data")]
    target: Option<String>,
    #[command(flatten)]
    conn: crate::server::Conn,
    /// DISK=PATH: adopt the image at PATH as the replica of DISK (repeat
    /// per disk; through the server, an absolute path on the target).
    #[arg(long = "image", value_name = "DISK=PATH")]
    images: Vec<String>,
    /// Credentials directory (only when no target runs).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_image(text: &str) -> Result<Adopt> {
    let (disk, path) = text
        .split_once('=')
        .filter(|(d, p)| !d.is_empty() && !p.is_empty())
        .with_context(|| format!("--image {text:?}: expected DISK=PATH"))?;
    Ok(Adopt {
        disk: disk.to_owned(),
        path: PathBuf::from(path),
    })
}

pub fn run_reprotect(args: &ReprotectArgs) -> Result<ExitCode> {
    let images = args
        .images
        .iter()
        .map(|i| parse_image(i))
        .collect::<Result<Vec<_>>>()?;
    let v = match &args.data {
        Some(data) => {
            // Paths on this machine: resolved here, where the target runs.
            let images = images
                .into_iter()
                .map(|a| {
                    let path = std::path::absolute(&a.path)
                        .with_context(|| format!("resolve {}", a.path.display()))?;
                    Ok(Adopt { path, ..a })
                })
                .collect::<Result<Vec<_>>>()?;
            let req = Request::Reprotect {
                host: args.host.clone(),
                images,
            };
            crate::failover::run(data, args.credentials.as_deref(), &req)?
        }
        None => {
            let body = ferry_api::types::ReprotectRequest {
                target: args.target.clone(),
                images: images
                    .into_iter()
                    .map(|a| ferry_api::types::ReprotectImage {
                        disk: a.disk,
                        path: a.path.to_string_lossy().into_owned(),
                    })
                    .collect(),
            };
            crate::server::host_job(&args.conn, &args.host, "reprotect", &body, !args.json)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    let r: Reprotected = serde_json::from_value(v)?;
    println!(
        "{} is protected into this target again: its sidecar compares every block and sends what differs",
        r.host
    );
    for d in &r.disks {
        println!(
            "disk      {}: {} ({}{}, {} bytes, {} stored)",
            d.disk,
            d.replica.display(),
            d.format,
            if d.adopted { ", adopted" } else { "" },
            d.size,
            d.allocated_bytes
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `ferry failback HOST --data DIR --point P`.
#[derive(Debug, Args)]
#[command(
    after_help = "Stops the reverse replication, applies everything received and \
brings the host's replicas (the adopted original images) to the point in place. \
`ferry commit HOST --data DIR` finalizes it; an interrupted failback is finished by running \
it again (at the point it chose).\n\nExamples:\n  \
    ferry failback web01 --data ./site-a --point latest\n  \
    ferry commit web01 --data ./site-a"
)]
pub struct FailbackArgs {
    /// The host to fail back.
    host: String,
    /// Data directory of the target that received the reverse stream
    /// (without it: through the server, on the host's current target).
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    conn: crate::server::Conn,
    /// Recovery point: latest, latest-app, a point name or a time.
    #[arg(long, default_value = "latest")]
    point: String,
    /// Credentials directory (only when no target runs).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run_failback(args: &FailbackArgs) -> Result<ExitCode> {
    let v = match &args.data {
        Some(data) => {
            let req = Request::Failback {
                host: args.host.clone(),
                point: args.point.clone(),
            };
            crate::failover::run(data, args.credentials.as_deref(), &req)?
        }
        None => crate::server::host_job(
            &args.conn,
            &args.host,
            "failback",
            &ferry_api::types::FailbackRequest {
                point: args.point.clone(),
            },
            !args.json,
        )?,
    };
    crate::failover::show_manifest(v, args.json)
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_arguments() {
        let a = super::parse_image("data=/vm/web01.vmdk").unwrap();
        assert_eq!(
            (a.disk.as_str(), a.path.to_str()),
            ("data", Some("/vm/web01.vmdk"))
        );
        for bad in ["data", "=x", "data=", ""] {
            assert!(super::parse_image(bad).is_err(), "{bad}");
        }
    }
}
