//! `ferry`: the one installed binary. Each daemon and each user verb is a
//! subcommand; this file only parses the command line and dispatches.

mod image;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Image(cmd) => image::run(cmd),
    };
    match outcome {
        Ok(code) => code,
        Err(err) => {
            eprintln!("ferry: {err:#}");
            ExitCode::from(image::EXIT_ERROR)
        }
    }
}
