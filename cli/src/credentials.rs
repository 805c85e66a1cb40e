//! `ferry credentials ...`: certificates and data keys for the mutual-TLS
//! link between the sidecars and the target.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry_protocol::credentials::{self, InitReport, CA_CERT, CA_KEY};

/// Certificates and data keys for the sidecar <-> target link.
#[derive(Debug, Args)]
pub struct CredentialsArgs {
    #[command(subcommand)]
    pub command: CredentialsCommand,
}

/// The `ferry credentials` verbs.
#[derive(Debug, Subcommand)]
pub enum CredentialsCommand {
    /// Make or extend a credentials directory: a private CA, the target's
    /// server certificate, and a client certificate and a data key for each
    /// host.
    #[command(after_help = "\
Files (directory 0700, every file 0600):
  ca.crt, ca.key            the CA; ca.key stays here and signs later additions
  TARGET.crt, TARGET.key    the target's server certificate (also valid for
                            localhost, ferry-target, 127.0.0.1 and ::1)
  HOST.crt, HOST.key        host HOST's client certificate
  HOST.datakey              32 random bytes: root of HOST's per-disk data keys

Running init again on the same directory adds hosts with the same CA. Existing
files are never overwritten without --force; --force reissues certificates but
keeps the CA and never replaces a data key (data sealed under it would become
unreadable).

Examples:
  ferry credentials init ./creds --host web01
  ferry credentials init ./creds --host web02            # later: same CA
  ferry credentials init ./creds --host web01,db01 --target dr.example.com
  ferry credentials init ./creds --host web01 --force    # reissue web01's certificate")]
    Init {
        /// Credentials directory (created with mode 0700 if missing).
        dir: PathBuf,
        /// Name of a protected host (its certificate's name): 1-63 of
        /// A-Z a-z 0-9 . _ -. Repeat the option or separate with commas.
        #[arg(long, required = true, value_delimiter = ',', value_name = "HOST")]
        host: Vec<String>,
        /// Name of the target: the DNS name or IP address the sidecars
        /// connect to; also names its files (TARGET.crt, TARGET.key).
        #[arg(long, default_value = credentials::DEFAULT_TARGET, value_name = "NAME")]
        target: String,
        /// Reissue the certificates of the named target and hosts even if
        /// they exist.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `ferry credentials ...`.
pub fn run(args: CredentialsArgs) -> Result<()> {
    match args.command {
        CredentialsCommand::Init {
            dir,
            host,
            target,
            force,
        } => {
            let report = credentials::init(&dir, &host, &target, force)
                .with_context(|| format!("credentials init {}", dir.display()))?;
            print!("{}", describe(&report));
            Ok(())
        }
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// What init did and which files go where, as printed.
fn describe(r: &InitReport) -> String {
    let mut out = String::new();
    if r.ca_created {
        out.push_str(&format!("new CA in {}\n", r.dir.display()));
    } else {
        out.push_str(&format!(
            "reusing the CA in {} ({})\n",
            r.dir.display(),
            r.dir.join(CA_KEY).display()
        ));
    }
    for p in &r.created {
        out.push_str(&format!("  created {}\n", p.display()));
    }
    for p in r.kept.iter().filter(|p| {
        let n = file_name(p);
        n != CA_CERT && n != CA_KEY
    }) {
        out.push_str(&format!("  kept    {}\n", p.display()));
    }
    let t = &r.target;
    let datakeys: Vec<String> = r.hosts.iter().map(|h| format!("{h}.datakey")).collect();
    out.push_str("\nCopy (keeping mode 0600, into a directory only root can read):\n");
    out.push_str(&format!(
        "  {:<16} {CA_CERT} {t}.crt {t}.key {}\n",
        "to the target:",
        datakeys.join(" ")
    ));
    for h in &r.hosts {
        out.push_str(&format!(
            "  {:<16} {CA_CERT} {h}.crt {h}.key {h}.datakey\n",
            format!("to host {h}:")
        ));
    }
    out.push_str(&format!(
        "{CA_KEY} stays here (offline if possible): it is only needed to add hosts.\n"
    ));
    out
}
