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

/// `ferry reprotect HOST --data DIR [--image DISK=PATH]...`.
#[derive(Debug, Args)]
#[command(
    after_help = "Run on the target that is to receive the host's stream. On the \
primary site's target, adopt the machine's original disk images (VMDK monolithicSparse or \
monolithicFlat, VHD dynamic or fixed, raw): the stream of the failed-over machine is written \
into them in place. On the recovery site's target after a failback, without --image: the \
replica kept there is compared and brought up to date. Either way the sender resyncs the \
whole disk through the checksum exchange, so only blocks that differ travel.\n\nExamples:\n  \
    ferry reprotect web01 --data ./site-a --image data=/vm/web01/web01-data.vmdk\n  \
    ferry reprotect web01 --data ./site-b"
)]
pub struct ReprotectArgs {
    /// The host whose stream this target is to receive.
    host: String,
    /// Data directory of the target.
    #[arg(long)]
    data: PathBuf,
    /// DISK=PATH: adopt the image at PATH as the replica of DISK (repeat
    /// per disk).
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
        path: std::path::absolute(path).with_context(|| format!("resolve {path}"))?,
    })
}

pub fn run_reprotect(args: &ReprotectArgs) -> Result<ExitCode> {
    let images = args
        .images
        .iter()
        .map(|i| parse_image(i))
        .collect::<Result<Vec<_>>>()?;
    let req = Request::Reprotect {
        host: args.host.clone(),
        images,
    };
    let v = crate::failover::run(&args.data, args.credentials.as_deref(), &req)?;
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
    /// Data directory of the target that received the reverse stream.
    #[arg(long)]
    data: PathBuf,
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
    let req = Request::Failback {
        host: args.host.clone(),
        point: args.point.clone(),
    };
    let v = crate::failover::run(&args.data, args.credentials.as_deref(), &req)?;
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
