//! `ferry image ...`: the disk-image verbs.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_vhd::convert::{self, Destination};
use ferry_vhd::{CreateOptions, ErrorKind, Format, OpenOptions, SyncPolicy};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Exit code for "the images differ" (compare) and "the image is damaged" (check).
pub const EXIT_DIFFERENT: u8 = 1;
/// Exit code for an error that stopped the command.
pub const EXIT_ERROR: u8 = 2;

const FORMATS_HELP: &str = "Formats: raw, vhd-fixed, vhd-dynamic, vhd-diff, vmdk-sparse, \
vmdk-flat, vmdk-stream. Sizes take K/M/G/T suffixes (powers of 1024).";

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Create an empty image.
    #[command(after_help = format!("{FORMATS_HELP}\n\nExamples:\n  \
        ferry image create --format vhd-dynamic --size 10G disk.vhd\n  \
        ferry image create --format vhd-fixed --size 1000M --round azure.vhd\n  \
        ferry image create --format vhd-diff --parent base.vhd overlay.vhd\n  \
        ferry image create --format vmdk-sparse --size 20G disk.vmdk"))]
    Create(CreateArgs),
    /// Show format, virtual size, allocation and parent chain.
    #[command(
        after_help = "Examples:\n  ferry image info disk.vhd\n  ferry image info --json overlay.vhd"
    )]
    Info(InfoArgs),
    /// Verify checksums, table bounds and overlaps (exit 0 clean, 1 damaged, 2 error).
    #[command(after_help = "Examples:\n  ferry image check disk.vmdk\n  \
        ferry image check --repair disk.vhd   # rewrite a footer lost in a crash")]
    Check(CheckArgs),
    /// Convert any image to any format; zero blocks stay unallocated in sparse targets.
    #[command(after_help = format!("{FORMATS_HELP}\n\nExamples:\n  \
        ferry image convert --format vhd-dynamic disk.raw disk.vhd\n  \
        ferry image convert --format vmdk-stream disk.vhd disk.vmdk\n  \
        ferry image convert --format vhd-fixed --round disk.vmdk azure.vhd"))]
    Convert(ConvertArgs),
    /// Compare the content of two images (exit 0 same, 1 different, 2 error).
    #[command(after_help = "Examples:\n  ferry image compare disk.raw disk.vhd")]
    Compare(CompareArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format.
    #[arg(long, short = 'f', value_parser = parse_format)]
    format: Format,
    /// Virtual size (e.g. 512M, 10G); a vhd-diff takes its parent's size.
    #[arg(long, short = 's', value_parser = parse_size)]
    size: Option<u64>,
    /// Parent image of a vhd-diff.
    #[arg(long)]
    parent: Option<PathBuf>,
    /// Round the size up to what the format needs (whole MiB for vhd-fixed).
    #[arg(long)]
    round: bool,
    /// Path of the new image (never overwritten).
    path: PathBuf,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Image to describe.
    path: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Open the image read-write first, which repairs what a crash leaves
    /// behind (a VHD footer lost during block allocation).
    #[arg(long)]
    repair: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Image to check.
    path: PathBuf,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Destination format.
    #[arg(long, short = 'f', value_parser = parse_format)]
    format: Format,
    /// Parent of a vhd-diff destination: only what differs from it is stored.
    #[arg(long)]
    parent: Option<PathBuf>,
    /// Round the size up to what the destination format needs.
    #[arg(long)]
    round: bool,
    /// Show a progress bar even when stderr is not a terminal (or never: --progress=false).
    #[arg(long)]
    progress: Option<bool>,
    /// Source image (format detected from its content).
    src: PathBuf,
    /// Destination path (must not exist).
    dst: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

fn parse_format(text: &str) -> Result<Format, String> {
    Format::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = Format::ALL.iter().map(|f| f.name()).collect();
        format!("unknown format {text:?}; one of: {}", names.join(", "))
    })
}

fn parse_size(text: &str) -> Result<u64, String> {
    ferry_vhd::parse_size(text).map_err(|e| e.message().to_string())
}

/// Run one image verb; the exit code carries compare/check verdicts.
pub fn run(cmd: ImageCommand) -> Result<ExitCode> {
    match cmd {
        ImageCommand::Create(args) => create(args),
        ImageCommand::Info(args) => info(args),
        ImageCommand::Check(args) => check(args),
        ImageCommand::Convert(args) => convert(args),
        ImageCommand::Compare(args) => compare(args),
    }
}

fn create(args: CreateArgs) -> Result<ExitCode> {
    let size = match (args.format, args.size) {
        (_, Some(size)) => size,
        (Format::VhdDiff, None) => 0,
        (_, None) => bail!("--size is required for {}", args.format),
    };
    let options = CreateOptions {
        parent: args.parent,
        round: args.round,
        sync: SyncPolicy::Ordered,
    };
    let mut image = ferry_vhd::create(&args.path, args.format, size, &options)?;
    image.finish()?;
    println!(
        "created {} ({}, {})",
        args.path.display(),
        args.format,
        human(image.size())
    );
    Ok(ExitCode::SUCCESS)
}

fn info(args: InfoArgs) -> Result<ExitCode> {
    let mut image = ferry_vhd::open(&args.path, OpenOptions::read_only())?;
    let allocated = image.allocated_bytes()?;
    let chain = ferry_vhd::chain(image.as_ref());
    let mut files = vec![image.path().to_path_buf()];
    files.extend(image.extra_files());
    let disk_usage: u64 = files.iter().map(|f| usage_of(f)).sum();
    if args.json {
        let chain: Vec<_> = chain
            .iter()
            .map(|(p, f)| serde_json::json!({ "path": p, "format": f.name() }))
            .collect();
        let doc = serde_json::json!({
            "path": image.path(),
            "format": image.format().name(),
            "virtual_size": image.size(),
            "allocated_bytes": allocated,
            "disk_usage": disk_usage,
            "files": files,
            "chain": chain,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("image:          {}", image.path().display());
        println!("format:         {}", image.format());
        println!(
            "virtual size:   {} ({} bytes)",
            human(image.size()),
            image.size()
        );
        println!("allocated:      {} ({allocated} bytes)", human(allocated));
        println!("disk usage:     {} ({disk_usage} bytes)", human(disk_usage));
        for extra in image.extra_files() {
            println!("extent file:    {}", extra.display());
        }
        if chain.len() > 1 {
            let links: Vec<String> = chain
                .iter()
                .map(|(p, f)| format!("{} ({f})", p.display()))
                .collect();
            println!("parent chain:   {}", links.join(" -> "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn usage_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn check(args: CheckArgs) -> Result<ExitCode> {
    let options = if args.repair {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    let opened = ferry_vhd::open(&args.path, options);
    let mut image = match opened {
        Ok(image) => image,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::Corrupt | ErrorKind::Parent | ErrorKind::Unsupported
            ) =>
        {
            if args.json {
                let doc = serde_json::json!({
                    "path": args.path, "clean": false,
                    "problems": [{ "what": e.to_string(), "offset": e.offset(), "damage": true }],
                });
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                println!("{}: damaged: {e}", args.path.display());
            }
            return Ok(ExitCode::from(EXIT_DIFFERENT));
        }
        Err(e) => return Err(e.into()),
    };
    let problems = image.check()?;
    let damaged = problems.iter().any(|p| p.damage);
    if args.json {
        let doc = serde_json::json!({
            "path": args.path, "format": image.format().name(),
            "clean": !damaged, "problems": problems,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for p in &problems {
            let tag = if p.damage { "damaged" } else { "note" };
            println!(
                "{}: {tag}: at offset {}: {}",
                args.path.display(),
                p.offset,
                p.what
            );
        }
        if !damaged {
            println!("{}: {} image is clean", args.path.display(), image.format());
        }
    }
    Ok(if damaged {
        ExitCode::from(EXIT_DIFFERENT)
    } else {
        ExitCode::SUCCESS
    })
}

fn convert(args: ConvertArgs) -> Result<ExitCode> {
    let mut src = ferry_vhd::open(&args.src, OpenOptions::read_only())
        .with_context(|| format!("opening source {}", args.src.display()))?;
    if args.dst.exists() {
        bail!(
            "{} exists; ferry never overwrites an image",
            args.dst.display()
        );
    }
    let destination = if args.format == Format::VhdDiff {
        Destination::OverExisting
    } else {
        Destination::Fresh
    };
    let size = if args.format == Format::VhdDiff {
        0
    } else {
        src.size()
    };
    // A conversion target is not read by anyone until it is complete, so it
    // skips the per-allocation syncs and is flushed once at the end.
    let options = CreateOptions {
        parent: args.parent,
        round: args.round,
        sync: SyncPolicy::Deferred,
    };
    let mut dst = ferry_vhd::create(&args.dst, args.format, size, &options)?;
    let files = {
        let mut f = vec![dst.path().to_path_buf()];
        f.extend(dst.extra_files());
        f
    };
    let bar = progress_bar(args.progress, src.size());
    let outcome = convert::convert(src.as_mut(), dst.as_mut(), destination, &mut |done, _| {
        bar.set_position(done)
    });
    bar.finish_and_clear();
    drop(dst);
    match outcome {
        Ok(stats) => {
            eprintln!(
                "converted {} -> {} ({}): {} read, {} written",
                args.src.display(),
                args.dst.display(),
                args.format,
                human(stats.bytes_read),
                human(stats.bytes_written)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // Never leave a half-written image behind under the final name.
            for f in files {
                let _ = std::fs::remove_file(f);
            }
            Err(e.into())
        }
    }
}

fn progress_bar(wanted: Option<bool>, total: u64) -> ProgressBar {
    let show = wanted.unwrap_or_else(|| std::io::stderr().is_terminal());
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template"),
    );
    bar
}

fn compare(args: CompareArgs) -> Result<ExitCode> {
    let mut a = ferry_vhd::open(&args.a, OpenOptions::read_only())
        .with_context(|| format!("opening {}", args.a.display()))?;
    let mut b = ferry_vhd::open(&args.b, OpenOptions::read_only())
        .with_context(|| format!("opening {}", args.b.display()))?;
    if a.size() != b.size() {
        eprintln!("note: sizes differ ({} vs {} bytes)", a.size(), b.size());
    }
    match convert::first_difference(a.as_mut(), b.as_mut())? {
        None => {
            println!("images are identical");
            Ok(ExitCode::SUCCESS)
        }
        Some(offset) => {
            println!(
                "content differs at offset {offset} (sector {})",
                offset / 512
            );
            Ok(ExitCode::from(EXIT_DIFFERENT))
        }
    }
}

/// A size in binary units, e.g. "1.5 GiB" (whole numbers without decimals).
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let unit = (0..UNITS.len())
        .rev()
        .find(|&u| bytes >> (10 * u) > 0)
        .unwrap_or(0);
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        return format!("{} {}", bytes / scale, UNITS[unit]);
    }
    let tenths = (bytes % scale) * 10 / scale;
    format!("{}.{tenths} {}", bytes / scale, UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::human;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(10 << 30), "10 GiB");
        assert_eq!(human(3 << 19), "1.5 MiB");
        assert_eq!(human((1 << 30) + 512), "1.0 GiB");
    }
}
