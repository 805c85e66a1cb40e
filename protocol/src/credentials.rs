//! Credentials of the sidecar <-> target link: a private CA, the target's
//! server certificate, one client certificate and one data key per protected
//! host, all in one directory made by [`init`] (`ferry credentials init`).
//!
//! Layout of the directory (0700; every file 0600):
//!
//! | file | what | who needs it |
//! |---|---|---|
//! | `ca.crt` | self-signed CA (ECDSA P-256), the only trust anchor | target and every host |
//! | `ca.key` | the CA's private key | nobody at run time: keep it where `init` runs |
//! | `TARGET.crt`, `TARGET.key` | the target's server certificate (SAN: the target name, `localhost`, `ferry-target`, 127.0.0.1, ::1) | target |
//! | `HOST.crt`, `HOST.key` | host HOST's certificate (CN and SAN DNS = HOST): client towards the target, server of its group port | host HOST |
//! | `HOST.datakey` | 32 random bytes: the root of HOST's per-disk data keys ([`data_key`]) | host HOST and the target |
//!
//! `TARGET` is `target` unless another name is given. Keys are PKCS#8 PEM,
//! certificates PEM.
//!
//! Running [`init`] again on the same directory adds hosts: an existing CA
//! (`ca.key` present) is reused, so every certificate in the directory chains
//! to the same `ca.crt`. Existing certificate pairs are left alone (after
//! checking that they chain to `ca.crt`) unless `force` is set, which reissues
//! the pairs named in the call. Two things `force` never does: replace a CA
//! whose `ca.key` exists (use a new directory for a new CA), and replace a
//! data key (journals and replicas sealed under it would become unreadable;
//! delete the file by hand to start over).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, UnixTime};

use crate::error::{Error, ErrorKind, Result};
use crate::payload::{Key, KEY_LEN};

/// File name of the CA certificate.
pub const CA_CERT: &str = "ca.crt";
/// File name of the CA private key.
pub const CA_KEY: &str = "ca.key";
/// The target's name when none is given (files `target.crt`, `target.key`).
pub const DEFAULT_TARGET: &str = "target";
/// DNS name every target certificate carries besides its own name.
pub const TARGET_ALIAS: &str = "ferry-target";
/// Length of a `HOST.datakey` file in bytes.
pub const DATAKEY_LEN: usize = 32;
/// HKDF-SHA256 salt of the per-disk data keys.
pub const DATA_KEY_SALT: &[u8] = b"ferry data key v1";
/// Longest host or target name.
pub const MAX_NAME_LEN: usize = 63;

/// Validity of the CA certificate, in years from the day it is made.
const CA_YEARS: i32 = 20;
/// Validity of host and target certificates, in years.
const LEAF_YEARS: i32 = 10;

/// What [`init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The credentials directory.
    pub dir: PathBuf,
    /// The target's name.
    pub target: String,
    /// The hosts named in the call (duplicates removed, order kept).
    pub hosts: Vec<String>,
    /// Whether a new CA (key and certificate) was made; false when an
    /// existing `ca.key` was reused.
    pub ca_created: bool,
    /// Files written by this call, in the order written.
    pub created: Vec<PathBuf>,
    /// Files of this call's target and hosts that already existed and were
    /// left as they are.
    pub kept: Vec<PathBuf>,
}

/// Path of NAME's certificate in `dir` (`NAME.crt`).
pub fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.crt"))
}

/// Path of NAME's private key in `dir` (`NAME.key`).
pub fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// Path of HOST's data key in `dir` (`HOST.datakey`).
pub fn datakey_path(dir: &Path, host: &str) -> PathBuf {
    dir.join(format!("{host}.datakey"))
}

fn cred_err(context: impl Into<String>) -> Error {
    Error::new(ErrorKind::Credentials, context)
}

fn io_err<'a>(path: &'a Path, what: &str) -> impl Fn(std::io::Error) -> Error + 'a {
    let what = what.to_owned();
    move |e| Error::from(e).within(&format!("{what} {}", path.display()))
}

/// Checks a host or target name: 1..=63 characters of `[A-Za-z0-9._-]`,
/// not starting with `.` or `-`, not ending with `.`, no empty label, not
/// `ca`. `what` ("host", "target") names it in the error.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let bad = |why: &str| cred_err(format!("{what} name {name:?}: {why}"));
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("must be 1 to {MAX_NAME_LEN} characters")));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(bad(&format!(
            "character {c:?} not allowed (use A-Z a-z 0-9 . _ -)"
        )));
    }
    if name.starts_with(['.', '-']) {
        return Err(bad("must not start with '.' or '-'"));
    }
    if name.ends_with('.') || name.contains("..") {
        return Err(bad("must not end with '.' or contain '..'"));
    }
    if name == "ca" {
        return Err(bad("\"ca\" is the CA's own file name"));
    }
    Ok(())
}

/// A host name must also be a DNS name (it is the certificate's SAN and
/// what the target checks the sidecar's Hello against).
pub(crate) fn validate_host(host: &str) -> Result<()> {
    validate_name("host", host)?;
    if host.parse::<IpAddr>().is_ok() || DnsName::try_from(host).is_err() {
        return Err(cred_err(format!(
            "host name {host:?}: not a valid DNS name (an address is not a host name)"
        )));
    }
    Ok(())
}

/// A target name is a DNS name or an IP address.
pub(crate) fn validate_target(target: &str) -> Result<()> {
    validate_name("target", target)?;
    if target.parse::<IpAddr>().is_err() && DnsName::try_from(target).is_err() {
        return Err(cred_err(format!(
            "target name {target:?}: neither a DNS name nor an IP address"
        )));
    }
    Ok(())
}

/// Reads a secret file (a private key or a data key), refusing one that the
/// group or others may access.
pub(crate) fn read_secret(path: &Path) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(io_err(path, "open"))?;
    let meta = f.metadata().map_err(io_err(path, "stat"))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(cred_err(format!(
            "{} is accessible by group or others (mode {mode:03o}); \
             fix with: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    if !meta.is_file() {
        return Err(cred_err(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    // Bound the read: no secret file of ours is anywhere near this size.
    let mut buf = Vec::new();
    Read::by_ref(&mut f)
        .take(64 * 1024)
        .read_to_end(&mut buf)
        .map_err(io_err(path, "read"))?;
    Ok(buf)
}

/// Reads a PEM file holding one certificate (the first one if several).
pub(crate) fn read_cert(path: &Path) -> Result<CertificateDer<'static>> {
    let bytes = fs::read(path).map_err(io_err(path, "read certificate"))?;
    CertificateDer::from_pem_slice(&bytes)
        .map_err(|e| cred_err(format!("{}: not a PEM certificate: {e}", path.display())))
}

/// Reads the data key of `host` from `dir/HOST.datakey` and derives the key
/// of disk `disk` from it: HKDF-SHA256 with salt [`DATA_KEY_SALT`] and info
/// `host || 0x00 || disk`. The file must hold exactly 32 bytes and must not
/// be accessible by group or others.
pub fn data_key(dir: &Path, host: &str, disk: &str) -> Result<Key> {
    validate_host(host)?;
    if disk.is_empty() {
        return Err(cred_err("data key: empty disk name"));
    }
    let path = datakey_path(dir, host);
    let mut root = read_secret(&path)?;
    let out = if root.len() == DATAKEY_LEN {
        derive_disk_key(&root, host, disk)
    } else {
        Err(cred_err(format!(
            "{}: {} bytes, want {DATAKEY_LEN}",
            path.display(),
            root.len()
        )))
    };
    root.fill(0);
    std::hint::black_box(&mut root);
    out
}

fn derive_disk_key(root: &[u8], host: &str, disk: &str) -> Result<Key> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, DATA_KEY_SALT).extract(root);
    let info: [&[u8]; 3] = [host.as_bytes(), &[0u8], disk.as_bytes()];
    let mut bytes = [0u8; KEY_LEN];
    prk.expand(&info, hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut bytes))
        .map_err(|_| Error::new(ErrorKind::Crypto, "HKDF-SHA256 expand of a data key"))?;
    let key = Key::from_bytes(bytes);
    bytes.fill(0);
    std::hint::black_box(&mut bytes);
    Ok(key)
}

/// How [`init`] treats one certificate pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PairPlan {
    Create,
    Keep,
}

/// The CA [`init`] signs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CaPlan {
    /// New key and certificate.
    New,
    /// Existing key and certificate.
    Reuse,
    /// Existing key, certificate missing: remade from the key (same name,
    /// same key, so certificates it signed still verify).
    ReuseKeyNewCert,
}

fn exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::from(e).within(&format!("stat {}", path.display()))),
    }
}

fn plan_pair(dir: &Path, name: &str, force: bool, ca: CaPlan) -> Result<PairPlan> {
    let (crt, key) = (cert_path(dir, name), key_path(dir, name));
    if force {
        return Ok(PairPlan::Create);
    }
    match (exists(&crt)?, exists(&key)?) {
        (false, false) => Ok(PairPlan::Create),
        (true, true) if ca == CaPlan::New => Err(cred_err(format!(
            "{} exists but {} does not: it was issued by another CA; \
             use --force to reissue it",
            crt.display(),
            dir.join(CA_KEY).display()
        ))),
        (true, true) => Ok(PairPlan::Keep),
        (true, false) | (false, true) => {
            let (have, missing) = if exists(&crt)? {
                (crt, key)
            } else {
                (key, crt)
            };
            Err(cred_err(format!(
                "{} exists but {} does not; refusing to overwrite it \
                 (use --force to reissue both)",
                have.display(),
                missing.display()
            )))
        }
    }
}

/// Creates or extends the credentials directory `dir` for the target
/// `target` and the protected hosts `hosts` (see the module docs).
///
/// Refuses to overwrite any existing file unless `force`; with nothing left
/// to create it is an error (so a repeated call does not silently succeed).
pub fn init(dir: &Path, hosts: &[String], target: &str, force: bool) -> Result<InitReport> {
    if hosts.is_empty() {
        return Err(cred_err("at least one host is needed"));
    }
    issue(dir, &[ServerCert::new(target)], hosts, force, true)
}

/// A server certificate to issue: its name (a DNS name or an IP address,
/// also the file name) and further names or addresses it must be valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCert {
    /// The certificate's name (CN, first SAN, `NAME.crt`).
    pub name: String,
    /// More subject alternative names: DNS names or IP addresses.
    pub extra_names: Vec<String>,
    /// Also valid as a TLS client: only the control-plane server's
    /// certificate, its identity as group coordinator.
    pub client_use: bool,
}

impl ServerCert {
    /// A server certificate called `name` with the default aliases only.
    pub fn new(name: &str) -> Self {
        ServerCert {
            name: name.to_owned(),
            extra_names: Vec::new(),
            client_use: false,
        }
    }
}

/// Makes whatever of the CA, the server certificates and the hosts'
/// certificates and data keys is missing in `dir`, and keeps what exists
/// (checked against the CA). The control-plane server issues credentials
/// this way, one host or target at a time, as they register.
pub fn ensure(dir: &Path, servers: &[ServerCert], hosts: &[String]) -> Result<InitReport> {
    issue(dir, servers, hosts, false, false)
}

fn issue(
    dir: &Path,
    servers: &[ServerCert],
    hosts: &[String],
    force: bool,
    refuse_if_nothing_new: bool,
) -> Result<InitReport> {
    for server in servers {
        validate_target(&server.name)?;
    }
    let target = servers.first().map(|s| s.name.as_str()).unwrap_or_default();
    let mut uniq: Vec<String> = Vec::with_capacity(hosts.len());
    for h in hosts {
        validate_host(h)?;
        if servers.iter().any(|s| &s.name == h) {
            return Err(cred_err(format!(
                "host {h:?} has the target's name; they share files, pick another"
            )));
        }
        if !uniq.contains(h) {
            uniq.push(h.clone());
        }
    }
    let hosts = uniq;

    prepare_dir(dir)?;

    // Decide everything before writing anything.
    let ca_crt_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    let ca_plan = match (exists(&ca_key_path)?, exists(&ca_crt_path)?) {
        (true, true) => CaPlan::Reuse,
        (true, false) => CaPlan::ReuseKeyNewCert,
        (false, false) => CaPlan::New,
        (false, true) if force => CaPlan::New,
        (false, true) => {
            return Err(cred_err(format!(
                "{} exists but {} does not: cannot sign with that CA; \
                 use --force to make a new CA (every host must then be reissued)",
                ca_crt_path.display(),
                ca_key_path.display()
            )))
        }
    };
    let mut server_plans = Vec::with_capacity(servers.len());
    for server in servers {
        server_plans.push((server, plan_pair(dir, &server.name, force, ca_plan)?));
    }
    let mut host_plans = Vec::with_capacity(hosts.len());
    for h in &hosts {
        let pair = plan_pair(dir, h, force, ca_plan)?;
        let dk = datakey_path(dir, h);
        let dk_exists = exists(&dk)?;
        if dk_exists {
            let bytes = read_secret(&dk)?;
            if bytes.len() != DATAKEY_LEN {
                return Err(cred_err(format!(
                    "{}: {} bytes, want {DATAKEY_LEN}",
                    dk.display(),
                    bytes.len()
                )));
            }
        }
        host_plans.push((h.as_str(), pair, !dk_exists));
    }
    let nothing_new = ca_plan == CaPlan::Reuse
        && server_plans.iter().all(|(_, plan)| *plan == PairPlan::Keep)
        && host_plans
            .iter()
            .all(|(_, pair, new_dk)| *pair == PairPlan::Keep && !new_dk);
    if nothing_new && refuse_if_nothing_new {
        return Err(Error::new(
            ErrorKind::Credentials,
            format!(
                "{} already holds credentials for target {target} and host(s) {}; \
                 refusing to overwrite them (use --force to reissue the certificates)",
                dir.display(),
                hosts.join(", ")
            ),
        ));
    }

    let rng = SystemRandom::new();
    let today = days_since_epoch()?;
    let ca_params = ca_params(today);
    let mut created = Vec::new();
    let mut kept = Vec::new();

    // The CA.
    let ca_key = match ca_plan {
        CaPlan::New => {
            let key = new_key_pair()?;
            write_secret(&ca_key_path, key.serialize_pem().as_bytes(), true)?;
            created.push(ca_key_path.clone());
            key
        }
        CaPlan::Reuse | CaPlan::ReuseKeyNewCert => {
            let pem = read_secret(&ca_key_path)?;
            let pem = std::str::from_utf8(&pem).map_err(|_| {
                cred_err(format!("{}: not a PEM private key", ca_key_path.display()))
            })?;
            KeyPair::from_pem(pem).map_err(|e| {
                cred_err(format!(
                    "{}: not a usable private key: {e}",
                    ca_key_path.display()
                ))
            })?
        }
    };
    if ca_plan != CaPlan::Reuse {
        let mut params = ca_params.clone();
        params.serial_number = Some(serial(&rng)?);
        let cert = params
            .self_signed(&ca_key)
            .map_err(|e| cred_err(format!("signing the CA certificate: {e}")))?;
        write_secret(&ca_crt_path, cert.pem().as_bytes(), true)?;
        created.push(ca_crt_path.clone());
    } else {
        kept.push(ca_crt_path.clone());
        kept.push(ca_key_path.clone());
    }
    let ca_der = read_cert(&ca_crt_path)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    // The target and the hosts.
    let mut pairs: Vec<(&str, &[String], PairPlan, Role)> = server_plans
        .iter()
        .map(|(s, plan)| {
            let role = if s.client_use {
                Role::ServerAndClient
            } else {
                Role::Server
            };
            (s.name.as_str(), s.extra_names.as_slice(), *plan, role)
        })
        .collect();
    pairs.extend(
        host_plans
            .iter()
            .map(|(h, p, _)| (*h, &[][..], *p, Role::Client)),
    );
    for (name, extra_names, plan, role) in pairs {
        let (crt, key) = (cert_path(dir, name), key_path(dir, name));
        match plan {
            PairPlan::Keep => {
                let der = read_cert(&crt)?;
                verify_leaf(&ca_der, &der, role).map_err(|e| {
                    cred_err(format!(
                        "{} does not verify against {}: {e}; use --force to reissue it",
                        crt.display(),
                        ca_crt_path.display()
                    ))
                })?;
                kept.push(crt);
                kept.push(key);
            }
            PairPlan::Create => {
                let leaf_key = new_key_pair()?;
                let mut params = leaf_params(name, extra_names, role, today)?;
                params.serial_number = Some(serial(&rng)?);
                let cert = params
                    .signed_by(&leaf_key, &issuer)
                    .map_err(|e| cred_err(format!("signing the certificate of {name}: {e}")))?;
                // Never hand out a certificate that does not chain to ca.crt.
                verify_leaf(&ca_der, cert.der(), role).map_err(|e| {
                    cred_err(format!(
                        "new certificate of {name} does not verify against {}: {e} \
                         (does {} belong to {}?)",
                        ca_crt_path.display(),
                        ca_key_path.display(),
                        ca_crt_path.display()
                    ))
                })?;
                write_secret(&key, leaf_key.serialize_pem().as_bytes(), force)?;
                created.push(key);
                write_secret(&crt, cert.pem().as_bytes(), force)?;
                created.push(crt);
            }
        }
    }
    for (h, _, new_dk) in &host_plans {
        let path = datakey_path(dir, h);
        if *new_dk {
            let mut bytes = [0u8; DATAKEY_LEN];
            rng.fill(&mut bytes)
                .map_err(|_| Error::new(ErrorKind::Crypto, "system random generator"))?;
            let res = write_secret(&path, &bytes, false);
            bytes.fill(0);
            std::hint::black_box(&mut bytes);
            res?;
            created.push(path);
        } else {
            kept.push(path);
        }
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))?;

    Ok(InitReport {
        dir: dir.to_path_buf(),
        target: target.to_owned(),
        hosts,
        ca_created: ca_plan == CaPlan::New,
        created,
        kept,
    })
}

/// Creates `dir` with mode 0700 (parents as needed), or checks that an
/// existing one is a directory that neither group nor others may write.
fn prepare_dir(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(cred_err(format!("{} is not a directory", dir.display())));
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o022 != 0 {
                return Err(cred_err(format!(
                    "{} is writable by group or others (mode {mode:03o}); \
                     fix with: chmod 700 {}",
                    dir.display(),
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir, "create directory"))?;
            // The mode given to mkdir is reduced by the umask; set it exactly.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir, "chmod"))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io_err(parent, "fsync directory"))?;
            }
            Ok(())
        }
        Err(e) => Err(Error::from(e).within(&format!("stat {}", dir.display()))),
    }
}

/// Writes `bytes` to `path` with mode 0600: a temporary file in the same
/// directory, fsync, then rename over `path` (refused if `path` exists and
/// not `overwrite`). The caller fsyncs the directory.
pub fn write_secret(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    if !overwrite && exists(path)? {
        return Err(cred_err(format!(
            "{} already exists; refusing to overwrite it",
            path.display()
        )));
    }
    let name = path
        .file_name()
        .ok_or_else(|| cred_err(format!("{}: no file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::from(e).within(&format!("remove {}", tmp.display()))),
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io_err(&tmp, "chmod"))?;
        f.write_all(bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "rename into place"))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Which side a leaf certificate authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// The target (TLS server).
    Server,
    /// The control-plane server: TLS server of its API, TLS client of the
    /// hosts' group ports (the coordinator).
    ServerAndClient,
    /// A protected host (TLS client).
    Client,
}

/// Checks that `leaf` chains to the CA `ca` for `role`, now.
pub(crate) fn verify_leaf(
    ca: &CertificateDer<'_>,
    leaf: &CertificateDer<'_>,
    role: Role,
) -> std::result::Result<(), webpki::Error> {
    let anchor = webpki::anchor_from_trusted_cert(ca)?;
    let ee = webpki::EndEntityCert::try_from(leaf)?;
    let usage = match role {
        Role::Server | Role::ServerAndClient => webpki::KeyUsage::server_auth(),
        Role::Client => webpki::KeyUsage::client_auth(),
    };
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
}

fn new_key_pair() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::new(ErrorKind::Crypto, format!("generating a P-256 key: {e}")))
}

/// A random positive 128-bit serial number.
fn serial(rng: &SystemRandom) -> Result<SerialNumber> {
    let mut b = [0u8; 16];
    rng.fill(&mut b)
        .map_err(|_| Error::new(ErrorKind::Crypto, "system random generator"))?;
    b[0] = (b[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&b))
}

/// The CA's parameters. Only the name, key usages and key-identifier method
/// matter when an existing CA signs (they must match its certificate), so
/// they are fixed; the dates only go into a new CA certificate.
fn ca_params(today: i64) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CommonName, "ferry CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut p, today, CA_YEARS);
    p
}

fn leaf_params(
    name: &str,
    extra_names: &[String],
    role: Role,
    today: i64,
) -> Result<CertificateParams> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferry");
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    let dns = |s: &str| {
        s.to_owned()
            .try_into()
            .map(SanType::DnsName)
            .map_err(|e| cred_err(format!("name {s:?} in a certificate: {e}")))
    };
    match role {
        Role::Server | Role::ServerAndClient => {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            if role == Role::ServerAndClient {
                // The control-plane server's certificate is also the group
                // coordinator's identity towards the hosts' group ports.
                p.extended_key_usages
                    .push(ExtendedKeyUsagePurpose::ClientAuth);
            }
            let mut sans = Vec::new();
            match name.parse::<IpAddr>() {
                Ok(ip) => sans.push(SanType::IpAddress(ip)),
                Err(_) => sans.push(dns(name)?),
            }
            for alias in ["localhost", TARGET_ALIAS] {
                if alias != name {
                    sans.push(dns(alias)?);
                }
            }
            for extra in extra_names {
                validate_target(extra)?;
                let san = match extra.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => dns(extra)?,
                };
                if !sans.contains(&san) {
                    sans.push(san);
                }
            }
            for ip in [
                IpAddr::from([127, 0, 0, 1]),
                IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ] {
                if name.parse::<IpAddr>() != Ok(ip) {
                    sans.push(SanType::IpAddress(ip));
                }
            }
            p.subject_alt_names = sans;
        }
        Role::Client => {
            // Server use too: a host's filter serves group rounds to the
            // coordinator with it (`ferry filter --group-listen`). The
            // target still checks that a sidecar's Hello names the host of
            // its certificate, and a sidecar checks the target's name, so
            // neither can pass for the other.
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ];
            p.subject_alt_names = vec![dns(name)?];
        }
    }
    set_validity(&mut p, today, LEAF_YEARS);
    Ok(p)
}

/// Valid from yesterday (clock skew between hosts) for `years` years.
fn set_validity(p: &mut CertificateParams, today: i64, years: i32) {
    let (y, m, d) = civil_from_days(today - 1);
    p.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_days(today);
    // 28 is valid in every month, which keeps February 29 out of the way.
    p.not_after = rcgen::date_time_ymd(y.saturating_add(years), m, d.min(28));
}

fn days_since_epoch() -> Result<i64> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| cred_err("the system clock is before 1970"))?
        .as_secs();
    i64::try_from(secs / 86_400).map_err(|_| cred_err("the system clock is out of range"))
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        i32::try_from(y).unwrap_or(9999).clamp(1970, 9999),
        u8::try_from(m).unwrap_or(1),
        u8::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A unique directory under the system temp dir, removed on drop.
    #[derive(Debug)]
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static N: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "ferry-{tag}-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir(&p).unwrap();
            TempDir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    pub fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{hosts, TempDir};
    use super::*;

    const NONCE: crate::payload::NonceParts = crate::payload::NonceParts {
        stream: 0,
        counter: 0,
    };

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_creates_everything_private() {
        let tmp = TempDir::new("creds-init");
        let dir = tmp.path().join("creds");
        let r = init(&dir, &hosts(&["web01"]), DEFAULT_TARGET, false).unwrap();
        assert!(r.ca_created);
        assert_eq!(mode(&dir), 0o700);
        let names = [
            "ca.crt",
            "ca.key",
            "target.crt",
            "target.key",
            "web01.crt",
            "web01.key",
            "web01.datakey",
        ];
        for n in names {
            let p = dir.join(n);
            assert_eq!(mode(&p), 0o600, "{n}");
            assert!(r.created.contains(&p), "{n} not reported");
        }
        assert_eq!(r.created.len(), names.len());
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            names.len(),
            "no temp files left"
        );
        assert_eq!(fs::read(dir.join("web01.datakey")).unwrap().len(), 32);
        let ca = read_cert(&dir.join(CA_CERT)).unwrap();
        for (n, role) in [("target", Role::Server), ("web01", Role::Client)] {
            verify_leaf(&ca, &read_cert(&cert_path(&dir, n)).unwrap(), role).unwrap();
        }
        // The target certificate is valid for its names and the loopback addresses.
        let t = read_cert(&cert_path(&dir, "target")).unwrap();
        let ee = webpki::EndEntityCert::try_from(&t).unwrap();
        for name in ["target", "localhost", "ferry-target", "127.0.0.1", "::1"] {
            let sn = rustls_pki_types::ServerName::try_from(name).unwrap();
            ee.verify_is_valid_for_subject_name(&sn).unwrap();
        }
        // A host certificate serves its group port, for its own name only:
        // it cannot pass for the target.
        let w = read_cert(&cert_path(&dir, "web01")).unwrap();
        verify_leaf(&ca, &w, Role::Server).unwrap();
        let ee = webpki::EndEntityCert::try_from(&w).unwrap();
        let web01 = rustls_pki_types::ServerName::try_from("web01").unwrap();
        ee.verify_is_valid_for_subject_name(&web01).unwrap();
        for other in ["target", "ferry-target", "localhost", "127.0.0.1"] {
            let sn = rustls_pki_types::ServerName::try_from(other).unwrap();
            assert!(ee.verify_is_valid_for_subject_name(&sn).is_err(), "{other}");
        }
    }

    #[test]
    fn reinit_refuses_without_force_and_keeps_data_keys_with_it() {
        let tmp = TempDir::new("creds-reinit");
        let dir = tmp.path().join("creds");
        init(&dir, &hosts(&["web01"]), "target", false).unwrap();
        let ca_before = fs::read(dir.join(CA_CERT)).unwrap();
        let crt_before = fs::read(dir.join("web01.crt")).unwrap();
        let dk_before = fs::read(dir.join("web01.datakey")).unwrap();

        let e = init(&dir, &hosts(&["web01"]), "target", false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Credentials);
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(fs::read(dir.join("web01.crt")).unwrap(), crt_before);

        let r = init(&dir, &hosts(&["web01"]), "target", true).unwrap();
        assert!(!r.ca_created);
        assert_eq!(fs::read(dir.join(CA_CERT)).unwrap(), ca_before, "CA kept");
        assert_ne!(
            fs::read(dir.join("web01.crt")).unwrap(),
            crt_before,
            "reissued"
        );
        assert_eq!(fs::read(dir.join("web01.datakey")).unwrap(), dk_before);
        assert!(r.kept.contains(&dir.join("web01.datakey")));
        assert_eq!(mode(&dir.join("web01.crt")), 0o600);
    }

    #[test]
    fn second_host_reuses_the_ca() {
        let tmp = TempDir::new("creds-add");
        let dir = tmp.path().join("creds");
        init(&dir, &hosts(&["web01"]), "target", false).unwrap();
        let ca_before = fs::read(dir.join(CA_CERT)).unwrap();
        let web01_before = fs::read(dir.join("web01.crt")).unwrap();
        let r = init(&dir, &hosts(&["web01", "web02", "web02"]), "target", false).unwrap();
        assert!(!r.ca_created);
        assert_eq!(r.hosts, hosts(&["web01", "web02"]));
        assert_eq!(fs::read(dir.join(CA_CERT)).unwrap(), ca_before);
        assert_eq!(fs::read(dir.join("web01.crt")).unwrap(), web01_before);
        let mut created = r.created.clone();
        created.sort();
        let mut want = vec![
            dir.join("web02.crt"),
            dir.join("web02.key"),
            dir.join("web02.datakey"),
        ];
        want.sort();
        assert_eq!(created, want);
        let ca = read_cert(&dir.join(CA_CERT)).unwrap();
        verify_leaf(
            &ca,
            &read_cert(&dir.join("web02.crt")).unwrap(),
            Role::Client,
        )
        .unwrap();
    }

    #[test]
    fn missing_ca_cert_is_remade_from_its_key() {
        let tmp = TempDir::new("creds-cacrt");
        let dir = tmp.path().join("creds");
        init(&dir, &hosts(&["web01"]), "target", false).unwrap();
        fs::remove_file(dir.join(CA_CERT)).unwrap();
        let r = init(&dir, &hosts(&["web02"]), "target", false).unwrap();
        assert!(!r.ca_created);
        let ca = read_cert(&dir.join(CA_CERT)).unwrap();
        for (n, role) in [
            ("target", Role::Server),
            ("web01", Role::Client),
            ("web02", Role::Client),
        ] {
            verify_leaf(&ca, &read_cert(&cert_path(&dir, n)).unwrap(), role).unwrap();
        }
    }

    #[test]
    fn leaves_without_their_ca_are_refused() {
        let tmp = TempDir::new("creds-noca");
        let dir = tmp.path().join("creds");
        init(&dir, &hosts(&["web01"]), "target", false).unwrap();
        fs::remove_file(dir.join(CA_KEY)).unwrap();
        let e = init(&dir, &hosts(&["web02"]), "target", false).unwrap_err();
        assert!(e.to_string().contains("ca.key"), "{e}");
        fs::remove_file(dir.join(CA_CERT)).unwrap();
        let e = init(&dir, &hosts(&["web02"]), "target", false).unwrap_err();
        assert!(e.to_string().contains("another CA"), "{e}");
        // A half pair is refused too.
        let tmp2 = TempDir::new("creds-half");
        let dir2 = tmp2.path().join("creds");
        init(&dir2, &hosts(&["web01"]), "target", false).unwrap();
        fs::remove_file(dir2.join("web01.key")).unwrap();
        let e = init(&dir2, &hosts(&["web01"]), "target", false).unwrap_err();
        assert!(e.to_string().contains("web01.key"), "{e}");
        init(&dir2, &hosts(&["web01"]), "target", true).unwrap();
    }

    #[test]
    fn names_are_validated() {
        for bad in [
            "", ".web", "-web", "web/01", "web 01", "web..01", "web.", "ca", "é",
        ] {
            assert!(validate_host(bad).is_err(), "{bad:?}");
        }
        assert!(validate_host(&"a".repeat(64)).is_err());
        assert!(validate_host("10.0.0.5").is_err());
        for good in [
            "web01",
            "web-01.example.com",
            "WEB_01",
            "a",
            &"a".repeat(63),
        ] {
            validate_host(good).unwrap();
        }
        validate_target("10.0.0.5").unwrap();
        validate_target("dr.example.com").unwrap();
        let tmp = TempDir::new("creds-names");
        let dir = tmp.path().join("creds");
        assert!(init(&dir, &hosts(&["../x"]), "target", false).is_err());
        assert!(init(&dir, &hosts(&["target"]), "target", false).is_err());
        assert!(init(&dir, &[], "target", false).is_err());
        assert!(!dir.exists(), "nothing created for bad input");
    }

    #[test]
    fn target_with_another_name_or_an_address() {
        let tmp = TempDir::new("creds-target");
        let dir = tmp.path().join("creds");
        init(&dir, &hosts(&["web01"]), "10.1.2.3", false).unwrap();
        let t = read_cert(&cert_path(&dir, "10.1.2.3")).unwrap();
        let ee = webpki::EndEntityCert::try_from(&t).unwrap();
        for name in ["10.1.2.3", "localhost", "ferry-target", "127.0.0.1"] {
            let sn = rustls_pki_types::ServerName::try_from(name).unwrap();
            ee.verify_is_valid_for_subject_name(&sn).unwrap();
        }
    }

    #[test]
    fn ensure_issues_one_at_a_time_and_keeps_what_exists() {
        let tmp = TempDir::new("creds-ensure");
        let dir = tmp.path().join("creds");
        let mut api = ServerCert::new("ferry-server");
        api.extra_names = vec!["cp.example.com".into(), "10.0.0.9".into()];
        let r = ensure(&dir, &[api], &[]).unwrap();
        assert!(r.ca_created);
        let der = read_cert(&cert_path(&dir, "ferry-server")).unwrap();
        let ee = webpki::EndEntityCert::try_from(&der).unwrap();
        for name in [
            "ferry-server",
            "cp.example.com",
            "10.0.0.9",
            "localhost",
            "127.0.0.1",
        ] {
            let sn = rustls_pki_types::ServerName::try_from(name).unwrap();
            ee.verify_is_valid_for_subject_name(&sn).unwrap();
        }
        // A host later, then the same host again: nothing changes.
        ensure(&dir, &[], &hosts(&["web01"])).unwrap();
        let key = std::fs::read(datakey_path(&dir, "web01")).unwrap();
        let crt = std::fs::read(cert_path(&dir, "web01")).unwrap();
        let r = ensure(&dir, &[], &hosts(&["web01"])).unwrap();
        assert!(r.created.is_empty() && !r.ca_created);
        assert_eq!(std::fs::read(datakey_path(&dir, "web01")).unwrap(), key);
        assert_eq!(std::fs::read(cert_path(&dir, "web01")).unwrap(), crt);
        // Bad extra names are refused before anything is written.
        let mut bad = ServerCert::new("t2");
        bad.extra_names = vec!["not a name".into()];
        assert!(ensure(&dir, &[bad], &[]).is_err());
        assert!(!key_path(&dir, "t2").exists() && !cert_path(&dir, "t2").exists());
    }

    #[test]
    fn data_key_is_deterministic_and_separates_disks_and_hosts() {
        let tmp = TempDir::new("creds-dk");
        let dir = tmp.path().join("creds");
        init(&dir, &hosts(&["web01", "web02"]), "target", false).unwrap();
        let k = |h: &str, d: &str| {
            // Seal a fixed plaintext to compare keys without exposing them.
            let key = data_key(&dir, h, d).unwrap();
            let mut buf = b"ferry".to_vec();
            crate::payload::seal(&key, NONCE, b"", &mut buf).unwrap();
            buf
        };
        assert_eq!(k("web01", "sda"), k("web01", "sda"));
        assert_ne!(k("web01", "sda"), k("web01", "sdb"));
        assert_ne!(k("web01", "sda"), k("web02", "sda"));
        // Same root, different split between host and disk.
        fs::copy(dir.join("web01.datakey"), dir.join("web0.datakey")).unwrap();
        assert_ne!(k("web01", "sda"), k("web0", "1sda"));

        // Known answer: HKDF-SHA256 of a fixed root, checked independently.
        let root = [7u8; 32];
        let key = derive_disk_key(&root, "h", "d").unwrap();
        let mut buf = Vec::new();
        crate::payload::seal(&key, NONCE, b"", &mut buf).unwrap();
        let mut expect = [0u8; 32];
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"ferry data key v1")
            .extract(&root)
            .expand(&[b"h\0d"], hkdf::HKDF_SHA256)
            .unwrap()
            .fill(&mut expect)
            .unwrap();
        let mut buf2 = Vec::new();
        crate::payload::seal(&Key::from_bytes(expect), NONCE, b"", &mut buf2).unwrap();
        assert_eq!(buf, buf2);
    }

    #[test]
    fn data_key_rejects_bad_files() {
        let tmp = TempDir::new("creds-dkbad");
        let dir = tmp.path().join("creds");
        init(&dir, &hosts(&["web01"]), "target", false).unwrap();
        let p = dir.join("web01.datakey");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        let e = data_key(&dir, "web01", "sda").unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        data_key(&dir, "web01", "sda").unwrap();
        fs::write(&p, [1u8; 31]).unwrap();
        let e = data_key(&dir, "web01", "sda").unwrap_err();
        assert!(e.to_string().contains("31 bytes"), "{e}");
        assert!(data_key(&dir, "nohost", "sda").is_err());
        assert!(data_key(&dir, "web01", "").is_err());
        assert!(data_key(&dir, "../web01", "sda").is_err());
        // A broken data key also stops init (it is never overwritten).
        let e = init(&dir, &hosts(&["web01"]), "target", true).unwrap_err();
        assert!(e.to_string().contains("31 bytes"), "{e}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
