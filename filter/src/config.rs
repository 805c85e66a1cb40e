//! `ferry filter` configuration: from command-line flags or a TOML file.
//!
//! ```toml
//! state = "/var/lib/ferry/web01"     # meeting point with the sidecar
//! listen = ["unix:/run/ferry/web01.sock", "tcp:127.0.0.1:10809"]
//! ring_size = "64M"                  # payload area of each disk's ring
//! initial_copy = true               # first protection copies the allocated data
//! nbd_devices = ["data=/dev/nbd0"] # serve to the kernel as /dev/nbd0 ("data=auto": any free)
//! nbd_timeout = 30                  # seconds before the kernel requeues a request
//! nbd_dead_timeout = 120            # seconds the kernel waits for a restarted filter
//! [[disk]]
//! name = "data"
//! path = "/dev/vg0/data"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// Default payload area of each disk's ring.
pub const DEFAULT_RING_SIZE: u64 = 64 << 20;
/// Payload bytes per record slot: rings get one slot per this many bytes
/// (at least [`MIN_SLOTS`]), enough for 4 KiB writes to fill the payload
/// area before the slots run out.
pub const BYTES_PER_SLOT: u64 = 4096;
/// Fewest record slots in a ring.
pub const MIN_SLOTS: u64 = 1024;
/// Activity-log extent size (DRBD's default).
pub const DEFAULT_AL_EXTENT: u64 = 4 << 20;
/// Activity-log slots.
pub const DEFAULT_AL_SLOTS: u32 = 1024;

/// Where the filter listens for NBD clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl Listen {
    /// Parse `unix:PATH` or `tcp:ADDR:PORT`.
    pub fn parse(text: &str) -> Result<Listen> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::config(format!("empty socket path in {text:?}")));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            return addr
                .parse()
                .map(Listen::Tcp)
                .map_err(|e| Error::config(format!("bad TCP address {addr:?}: {e}")));
        }
        Err(Error::config(format!(
            "listen address {text:?} must start with unix: or tcp:"
        )))
    }
}

/// One protected disk. Unknown keys are refused: in TOML a key written
/// after a `[[disk]]` line belongs to that disk, and a filter-wide setting
/// put there by mistake must not be silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Export name (and the disk's name everywhere else).
    pub name: String,
    /// Backing block device or file.
    pub path: PathBuf,
}

impl DiskConfig {
    /// Parse `NAME=PATH`.
    pub fn parse(text: &str) -> Result<DiskConfig> {
        let (name, path) = text
            .split_once('=')
            .ok_or_else(|| Error::config(format!("--disk {text:?}: expected NAME=PATH")))?;
        let disk = DiskConfig {
            name: name.to_string(),
            path: PathBuf::from(path),
        };
        disk.validate()?;
        Ok(disk)
    }

    fn validate(&self) -> Result<()> {
        let ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !self.name.starts_with('.');
        if !ok {
            return Err(Error::config(format!(
                "disk name {:?}: use 1-64 letters, digits, '-', '_' or '.'",
                self.name
            )));
        }
        if self.path.as_os_str().is_empty() {
            return Err(Error::config(format!(
                "disk {:?} has an empty path",
                self.name
            )));
        }
        Ok(())
    }
}

/// The whole filter configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterConfig {
    /// Protected disks.
    pub disks: Vec<DiskConfig>,
    /// Listening addresses.
    pub listen: Vec<Listen>,
    /// State directory.
    pub state: PathBuf,
    /// Payload area of each ring, bytes.
    pub ring_size: u64,
    /// Record slots of each ring (derived from the ring size unless set).
    pub ring_slots: u32,
    /// Dirty-bitmap granularity (None: 4 KiB up to 512 GiB, 16 KiB above).
    pub granularity: Option<u64>,
    /// Activity-log extent size.
    pub al_extent: u64,
    /// Activity-log slots.
    pub al_slots: u32,
    /// Minimum NBD block size advertised (None: the device's logical block
    /// size, 1 for files).
    pub block_size: Option<u32>,
    /// When a disk is protected for the first time (its tracking file is
    /// created), mark every allocated region dirty so the existing data is
    /// copied to the recovery site. Off (`--no-initial-copy`) only for a
    /// disk known to be identical at the target (e.g. blank on both sides).
    pub initial_copy: bool,
    /// Serve group rounds to a coordinator over the network (None: only
    /// on the local control socket).
    pub group_link: Option<crate::grouplink::GroupLinkConfig>,
    /// What an app-consistent group hold freezes and runs: this host's own
    /// settings, never a coordinator's.
    pub app: AppSettings,
    /// Disks served to the kernel's own NBD client as /dev/nbdN.
    pub nbd_devices: Vec<crate::kernel::attach::Request>,
    /// The kernel NBD client's request and dead-connection timeouts.
    pub nbd_timeouts: crate::kernel::attach::Timeouts,
}

/// Parse `DISK=/dev/nbdN` or `DISK=auto` (any free device).
pub fn parse_nbd_device(text: &str) -> Result<crate::kernel::attach::Request> {
    let bad = || {
        Error::config(format!(
            "--nbd-device {text:?}: expected DISK=/dev/nbdN or DISK=auto"
        ))
    };
    let (disk, device) = text.split_once('=').ok_or_else(bad)?;
    let device = match device {
        "auto" => None,
        path => Some(crate::kernel::nbd_netlink::parse_device(path).ok_or_else(bad)?),
    };
    if disk.is_empty() {
        return Err(bad());
    }
    Ok(crate::kernel::attach::Request {
        disk: disk.to_string(),
        device,
    })
}

/// File systems to freeze and scripts to run around an app-consistent
/// group hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppSettings {
    /// Mount points frozen (FIFREEZE) while the hold lasts.
    pub mounts: Vec<PathBuf>,
    /// Run (`sh -c`) before freezing.
    pub pre: Option<String>,
    /// Run after thawing, always.
    pub post: Option<String>,
}

impl AppSettings {
    /// Whether nothing is set (app holds are then refused).
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty() && self.pre.is_none() && self.post.is_none()
    }
}

/// The TOML file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state: PathBuf,
    #[serde(default)]
    listen: Vec<String>,
    ring_size: Option<String>,
    ring_slots: Option<u32>,
    granularity: Option<String>,
    al_extent: Option<String>,
    al_slots: Option<u32>,
    block_size: Option<u32>,
    initial_copy: Option<bool>,
    #[serde(default)]
    nbd_devices: Vec<String>,
    nbd_timeout: Option<u64>,
    nbd_dead_timeout: Option<u64>,
    #[serde(default)]
    disk: Vec<DiskConfig>,
}

/// Parse sizes like `64M` (K/M/G/T, powers of 1024).
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(Error::config(format!("unknown size suffix in {text:?}"))),
            };
            (&text[..text.len() - 1], shift)
        }
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(1 << shift))
        .ok_or_else(|| Error::config(format!("not a size: {text:?}")))
}

/// Record slots for a payload area: one per [`BYTES_PER_SLOT`], a power of two.
pub fn slots_for(ring_size: u64) -> u32 {
    let slots = (ring_size / BYTES_PER_SLOT)
        .max(MIN_SLOTS)
        .next_power_of_two();
    u32::try_from(slots).unwrap_or(1 << 31)
}

impl FilterConfig {
    /// A configuration with defaults for everything but disks, listeners and state.
    pub fn new(disks: Vec<DiskConfig>, listen: Vec<Listen>, state: PathBuf) -> Self {
        FilterConfig {
            disks,
            listen,
            state,
            ring_size: DEFAULT_RING_SIZE,
            ring_slots: slots_for(DEFAULT_RING_SIZE),
            granularity: None,
            al_extent: DEFAULT_AL_EXTENT,
            al_slots: DEFAULT_AL_SLOTS,
            block_size: None,
            initial_copy: true,
            group_link: None,
            app: AppSettings::default(),
            nbd_devices: Vec::new(),
            nbd_timeouts: crate::kernel::attach::Timeouts::default(),
        }
    }

    /// Read a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(e, "read config").with_path(path))?;
        let file: FileConfig =
            toml::from_str(&text).map_err(|e| Error::config(format!("{}: {e}", path.display())))?;
        let listen = file
            .listen
            .iter()
            .map(|l| Listen::parse(l))
            .collect::<Result<Vec<_>>>()?;
        for disk in &file.disk {
            disk.validate()?;
        }
        let mut config = FilterConfig::new(file.disk, listen, file.state);
        if let Some(size) = file.ring_size {
            config.set_ring_size(parse_size(&size)?);
        }
        if let Some(slots) = file.ring_slots {
            config.ring_slots = slots;
        }
        config.granularity = file.granularity.map(|g| parse_size(&g)).transpose()?;
        if let Some(extent) = file.al_extent {
            config.al_extent = parse_size(&extent)?;
        }
        if let Some(slots) = file.al_slots {
            config.al_slots = slots;
        }
        config.block_size = file.block_size;
        if let Some(copy) = file.initial_copy {
            config.initial_copy = copy;
        }
        config.nbd_devices = file
            .nbd_devices
            .iter()
            .map(|d| parse_nbd_device(d))
            .collect::<Result<_>>()?;
        if let Some(secs) = file.nbd_timeout {
            config.nbd_timeouts.request = std::time::Duration::from_secs(secs);
        }
        if let Some(secs) = file.nbd_dead_timeout {
            config.nbd_timeouts.dead_connection = std::time::Duration::from_secs(secs);
        }
        config.validate()?;
        Ok(config)
    }

    /// Set the payload area and derive the slot count from it.
    pub fn set_ring_size(&mut self, size: u64) {
        self.ring_size = size;
        self.ring_slots = slots_for(size);
    }

    /// Check the whole configuration.
    pub fn validate(&self) -> Result<()> {
        if self.disks.is_empty() {
            return Err(Error::config(
                "no disks: give at least one --disk NAME=PATH",
            ));
        }
        if self.listen.is_empty() && self.nbd_devices.is_empty() {
            return Err(Error::config(
                "nowhere to serve: give --listen unix:SOCKET or tcp:ADDR, or --nbd-device DISK=/dev/nbdN",
            ));
        }
        for request in &self.nbd_devices {
            if !self.disks.iter().any(|d| d.name == request.disk) {
                return Err(Error::config(format!(
                    "--nbd-device names disk {:?}, which is not protected here",
                    request.disk
                )));
            }
            let twice = self
                .nbd_devices
                .iter()
                .filter(|r| r.disk == request.disk)
                .count()
                > 1
                || request.device.is_some_and(|d| {
                    self.nbd_devices
                        .iter()
                        .filter(|r| r.device == Some(d))
                        .count()
                        > 1
                });
            if twice {
                return Err(Error::config(format!(
                    "--nbd-device: disk {:?} or its device given twice",
                    request.disk
                )));
            }
        }
        for t in [self.nbd_timeouts.request, self.nbd_timeouts.dead_connection] {
            if t.as_secs() == 0 {
                return Err(Error::config("NBD timeouts must be at least 1 second"));
            }
        }
        let mut names: Vec<&str> = self.disks.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::config(format!("disk name {:?} given twice", w[0])));
        }
        if self.ring_size < (1 << 20) || !self.ring_size.is_multiple_of(4096) {
            return Err(Error::config(format!(
                "ring size {} must be a multiple of 4 KiB and at least 1 MiB",
                self.ring_size
            )));
        }
        if !self.ring_slots.is_power_of_two() || self.ring_slots < 16 {
            return Err(Error::config(
                "ring slots must be a power of two, at least 16",
            ));
        }
        if let Some(g) = self.granularity {
            if !g.is_power_of_two() || !(512..=(1 << 20)).contains(&g) {
                return Err(Error::config(
                    "granularity must be a power of two from 512 B to 1 MiB",
                ));
            }
        }
        if let Some(b) = self.block_size {
            if !b.is_power_of_two() || b > 65536 {
                return Err(Error::config(
                    "block size must be a power of two up to 64 KiB",
                ));
            }
        }
        if !self.al_extent.is_power_of_two() || self.al_extent < (64 << 10) {
            return Err(Error::config(
                "activity-log extent must be a power of two, at least 64 KiB",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!(
            Listen::parse("unix:/x/s").unwrap(),
            Listen::Unix("/x/s".into())
        );
        assert_eq!(
            Listen::parse("tcp:127.0.0.1:10809").unwrap(),
            Listen::Tcp("127.0.0.1:10809".parse().unwrap())
        );
        assert!(Listen::parse("udp:1").is_err());
        assert!(Listen::parse("unix:").is_err());
        let d = DiskConfig::parse("data=/dev/vg0/data").unwrap();
        assert_eq!(
            (d.name.as_str(), d.path.as_path()),
            ("data", Path::new("/dev/vg0/data"))
        );
        assert!(DiskConfig::parse("nopath").is_err());
        assert!(DiskConfig::parse("bad/name=/x").is_err());
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert!(parse_size("12X").is_err());
        let n = parse_nbd_device("data=/dev/nbd3").unwrap();
        assert_eq!((n.disk.as_str(), n.device), ("data", Some(3)));
        assert_eq!(parse_nbd_device("data=auto").unwrap().device, None);
        for bad in ["data", "=/dev/nbd0", "data=/dev/sda", "data=nbd"] {
            assert!(parse_nbd_device(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn slots_follow_ring_size() {
        assert_eq!(slots_for(64 << 20), 16384);
        assert_eq!(slots_for(1 << 20), 1024);
        assert!(slots_for(3 << 20).is_power_of_two());
    }

    #[test]
    fn toml_file_loads_and_validates() {
        let dir = std::env::temp_dir().join(format!("ferry-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("filter.toml");
        std::fs::write(
            &path,
            "state = \"/tmp/st\"\nlisten = [\"unix:/tmp/st/nbd.sock\"]\nring_size = \"8M\"\n\
             [[disk]]\nname = \"data\"\npath = \"/tmp/disk.img\"\n",
        )
        .unwrap();
        let c = FilterConfig::from_file(&path).unwrap();
        assert_eq!(c.ring_size, 8 << 20);
        assert_eq!(c.ring_slots, 2048);
        assert_eq!(c.disks[0].name, "data");
        assert!(c.initial_copy, "on by default");
        std::fs::write(
            &path,
            "state = \"/tmp/st\"\nlisten = [\"unix:/tmp/st/nbd.sock\"]\ninitial_copy = false\n\
             [[disk]]\nname = \"data\"\npath = \"/tmp/disk.img\"\n",
        )
        .unwrap();
        assert!(!FilterConfig::from_file(&path).unwrap().initial_copy);
        std::fs::write(
            &path,
            "state = \"/tmp/st\"\nnbd_devices = [\"data=/dev/nbd1\"]\nnbd_timeout = 5\n\
             [[disk]]\nname = \"data\"\npath = \"/tmp/disk.img\"\n",
        )
        .unwrap();
        let c = FilterConfig::from_file(&path).unwrap();
        assert!(c.listen.is_empty(), "a kernel device is somewhere to serve");
        assert_eq!(c.nbd_devices[0].device, Some(1));
        assert_eq!(c.nbd_timeouts.request.as_secs(), 5);
        std::fs::write(
            &path,
            "state = \"/tmp/st\"\nnbd_devices = [\"logs=/dev/nbd1\"]\n\
             [[disk]]\nname = \"data\"\npath = \"/tmp/disk.img\"\n",
        )
        .unwrap();
        assert!(
            FilterConfig::from_file(&path).is_err(),
            "unknown disk refused"
        );
        std::fs::write(
            &path,
            "state = \"/tmp/st\"\nlisten = [\"unix:/s/x\"]\n\
             [[disk]]\nname = \"data\"\npath = \"/tmp/disk.img\"\nring_size = \"8M\"\n",
        )
        .unwrap();
        let e = FilterConfig::from_file(&path).unwrap_err();
        assert!(
            e.to_string().contains("ring_size"),
            "a filter key under [[disk]] is refused: {e}"
        );
        std::fs::write(&path, "state = \"/tmp/st\"\nbogus = 1\n").unwrap();
        assert!(
            FilterConfig::from_file(&path).is_err(),
            "unknown keys are refused"
        );
        std::fs::write(
            &path,
            "state = \"/s\"\nlisten = [\"unix:/s/x\"]\n[[disk]]\nname = \"a\"\npath = \"/x\"\n\
             [[disk]]\nname = \"a\"\npath = \"/y\"\n",
        )
        .unwrap();
        let e = FilterConfig::from_file(&path).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
