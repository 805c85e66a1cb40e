//! The Linux NBD client, configured over generic netlink (family `nbd`,
//! include/uapi/linux/nbd-netlink.h; the handlers are `nbd_genl_*` in
//! drivers/block/nbd.c).
//!
//! The kernel never negotiates: we tell it the size, the logical block size
//! and the transmission flags, and hand it one end of a connected socket
//! (the filter serves the other end, in transmission mode only). With a
//! request timeout and a dead-connection timeout set, a connection that
//! ends does not fail the device: the kernel requeues the requests that
//! were in flight (after the request timeout) and waits up to the
//! dead-connection timeout for `NBD_CMD_RECONFIGURE` with a new socket.
//! That is how a filter restarts under a mounted file system.
//!
//! The backend identifier (`NBD_ATTR_BACKEND_IDENTIFIER`, shown in
//! `/sys/block/nbdN/backend`) names the filter state and disk a device
//! belongs to; a reconfigure with a different identifier is refused by the
//! kernel, so a filter never reattaches to another filter's device.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::netlink::{self, Attrs, Socket};

/// `NBD_GENL_FAMILY_NAME`.
pub const FAMILY: &str = "nbd";
/// `NBD_GENL_VERSION`.
pub const VERSION: u8 = 1;

/// `NBD_CMD_CONNECT`.
pub const NBD_CMD_CONNECT: u8 = 1;
/// `NBD_CMD_DISCONNECT`.
pub const NBD_CMD_DISCONNECT: u8 = 2;
/// `NBD_CMD_RECONFIGURE`.
pub const NBD_CMD_RECONFIGURE: u8 = 3;

/// `NBD_ATTR_INDEX` (u32): the device number N of /dev/nbdN.
pub const NBD_ATTR_INDEX: u16 = 1;
/// `NBD_ATTR_SIZE_BYTES` (u64).
pub const NBD_ATTR_SIZE_BYTES: u16 = 2;
/// `NBD_ATTR_BLOCK_SIZE_BYTES` (u64): the logical block size (512..4096).
pub const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
/// `NBD_ATTR_TIMEOUT` (u64 seconds): per-request timeout.
pub const NBD_ATTR_TIMEOUT: u16 = 4;
/// `NBD_ATTR_SERVER_FLAGS` (u64): the NBD transmission flags.
pub const NBD_ATTR_SERVER_FLAGS: u16 = 5;
/// `NBD_ATTR_CLIENT_FLAGS` (u64): `NBD_CFLAG_*`.
pub const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
/// `NBD_ATTR_SOCKETS` (nested `NBD_SOCK_ITEM`s).
pub const NBD_ATTR_SOCKETS: u16 = 7;
/// `NBD_ATTR_DEAD_CONN_TIMEOUT` (u64 seconds).
pub const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
/// `NBD_ATTR_BACKEND_IDENTIFIER` (string, Linux 5.14+).
pub const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
/// `NBD_SOCK_ITEM` (nested, inside `NBD_ATTR_SOCKETS`).
pub const NBD_SOCK_ITEM: u16 = 1;
/// `NBD_SOCK_FD` (u32, inside `NBD_SOCK_ITEM`).
pub const NBD_SOCK_FD: u16 = 1;

/// How a device is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size: 512, 1024, 2048 or 4096 (the backing device's).
    pub block_size: u32,
    /// NBD transmission flags (`NBD_FLAG_*`, with `HAS_FLAGS`).
    pub server_flags: u16,
    /// A request unanswered this long is requeued (and its connection
    /// treated as dead).
    pub timeout: Duration,
    /// How long the kernel waits for a new connection before failing the
    /// device's requests.
    pub dead_conn_timeout: Duration,
    /// Who serves the device (`/sys/block/nbdN/backend`).
    pub backend: String,
}

impl Attach {
    fn common(&self, attrs: &mut Attrs) -> io::Result<()> {
        attrs
            .u64(NBD_ATTR_TIMEOUT, self.timeout.as_secs().max(1))
            .u64(
                NBD_ATTR_DEAD_CONN_TIMEOUT,
                self.dead_conn_timeout.as_secs().max(1),
            )
            .string(NBD_ATTR_BACKEND_IDENTIFIER, &self.backend)?;
        Ok(())
    }
}

/// Attributes of `NBD_CMD_CONNECT`: `index` (None: the kernel picks a free
/// device), size, block size, flags, timeouts, backend, and the socket.
pub fn connect_attrs(attach: &Attach, index: Option<u32>, socket: i32) -> io::Result<Attrs> {
    if !matches!(attach.block_size, 512 | 1024 | 2048 | 4096) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "NBD block size {} must be 512, 1024, 2048 or 4096",
                attach.block_size
            ),
        ));
    }
    let mut attrs = Attrs::new();
    if let Some(index) = index {
        attrs.u32(NBD_ATTR_INDEX, index);
    }
    attrs
        .u64(NBD_ATTR_SIZE_BYTES, attach.size)
        .u64(NBD_ATTR_BLOCK_SIZE_BYTES, u64::from(attach.block_size))
        .u64(NBD_ATTR_SERVER_FLAGS, u64::from(attach.server_flags))
        // No NBD_CFLAG_*: the device outlives our socket and waits for us.
        .u64(NBD_ATTR_CLIENT_FLAGS, 0);
    attach.common(&mut attrs)?;
    attrs.nested(NBD_ATTR_SOCKETS, &socket_list(socket)?)?;
    Ok(attrs)
}

/// Attributes of `NBD_CMD_RECONFIGURE`: the device, its timeouts, the
/// backend (the kernel refuses a different one) and the new socket.
pub fn reconfigure_attrs(attach: &Attach, index: u32, socket: i32) -> io::Result<Attrs> {
    let mut attrs = Attrs::new();
    attrs.u32(NBD_ATTR_INDEX, index);
    attach.common(&mut attrs)?;
    attrs.nested(NBD_ATTR_SOCKETS, &socket_list(socket)?)?;
    Ok(attrs)
}

fn socket_list(socket: i32) -> io::Result<Attrs> {
    let fd = u32::try_from(socket)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative socket fd"))?;
    let mut item = Attrs::new();
    item.u32(NBD_SOCK_FD, fd);
    let mut list = Attrs::new();
    list.nested(NBD_SOCK_ITEM, &item)?;
    Ok(list)
}

/// The device index in a CONNECT answer.
pub fn parse_connect_reply(replies: &[(u8, Vec<u8>)]) -> io::Result<u32> {
    for (_, attrs) in replies {
        for (kind, payload) in netlink::parse_attrs(attrs)? {
            if kind == NBD_ATTR_INDEX {
                return netlink::attr_u32(payload);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "the kernel's NBD connect answer names no device",
    ))
}

/// A netlink session with the kernel's NBD driver.
#[derive(Debug)]
pub struct Nbd {
    socket: Socket,
    family: u16,
}

/// Says what to do when the `nbd` family is missing.
pub fn module_missing_error(source: io::Error) -> io::Error {
    io::Error::new(
        source.kind(),
        format!(
            "the kernel's NBD driver is not loaded ({source}): run `modprobe nbd` \
             (and list nbd in /etc/modules-load.d/ so it loads at boot)"
        ),
    )
}

impl Nbd {
    /// Opens a session; a missing `nbd` module is reported with the fix.
    pub fn open() -> io::Result<Nbd> {
        let mut socket = Socket::open()?;
        let family = socket.family(FAMILY).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOENT) {
                module_missing_error(e)
            } else {
                e
            }
        })?;
        Ok(Nbd { socket, family })
    }

    /// Attaches `socket` as a new device and returns its index. The kernel
    /// takes its own reference on the socket: the caller closes its copy.
    pub fn connect(
        &mut self,
        attach: &Attach,
        index: Option<u32>,
        socket: BorrowedFd<'_>,
    ) -> io::Result<u32> {
        let attrs = connect_attrs(attach, index, socket.as_raw_fd())?;
        let replies = self
            .socket
            .request(self.family, NBD_CMD_CONNECT, VERSION, &attrs)?;
        parse_connect_reply(&replies)
    }

    /// Gives device `index` a new socket in place of its dead one.
    pub fn reconfigure(
        &mut self,
        attach: &Attach,
        index: u32,
        socket: BorrowedFd<'_>,
    ) -> io::Result<()> {
        let attrs = reconfigure_attrs(attach, index, socket.as_raw_fd())?;
        self.socket
            .request(self.family, NBD_CMD_RECONFIGURE, VERSION, &attrs)?;
        Ok(())
    }

    /// Disconnects device `index` (the kernel sends `NBD_CMD_DISC`).
    pub fn disconnect(&mut self, index: u32) -> io::Result<()> {
        let mut attrs = Attrs::new();
        attrs.u32(NBD_ATTR_INDEX, index);
        self.socket
            .request(self.family, NBD_CMD_DISCONNECT, VERSION, &attrs)?;
        Ok(())
    }
}

/// `/dev/nbdN`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// Parses `/dev/nbdN` (or `nbdN`) into N.
pub fn parse_device(text: &str) -> Option<u32> {
    let name = text.strip_prefix("/dev/").unwrap_or(text);
    let digits = name.strip_prefix("nbd")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The backend identifier the kernel keeps for device `index`, from sysfs
/// (None: no such device, or not connected).
pub fn backend_of(sys_block: &Path, index: u32) -> Option<String> {
    let text = std::fs::read_to_string(sys_block.join(format!("nbd{index}/backend"))).ok()?;
    let text = text.trim_end_matches('\n');
    (!text.is_empty()).then(|| text.to_string())
}

/// Whether something holds device `index` or one of its partitions: a
/// mounted file system (by device number in mountinfo), a device-mapper
/// table or md array (`holders/`). Read from sysfs and mountinfo only; see
/// [`exclusively_held`] for what only the kernel knows (swap, other mount
/// namespaces, btrfs).
pub fn in_use(sys_block: &Path, mountinfo: &str, index: u32) -> bool {
    let dir = sys_block.join(format!("nbd{index}"));
    let name = format!("nbd{index}");
    let mut devices = vec![dir.clone()];
    if let Ok(entries) = std::fs::read_dir(&dir) {
        devices.extend(
            entries
                .flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&format!("{name}p"))
                })
                .map(|e| e.path()),
        );
    }
    devices.iter().any(|device| {
        let held = std::fs::read_dir(device.join("holders"))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        let dev = std::fs::read_to_string(device.join("dev")).unwrap_or_default();
        let dev = dev.trim();
        let mounted = !dev.is_empty()
            && mountinfo
                .lines()
                .any(|line| line.split(' ').nth(2) == Some(dev));
        held || mounted
    })
}

/// Whether the kernel refuses an exclusive open of `/dev/nbdN`: it is
/// mounted (in any namespace), a swap device, or held by dm/md. Opening
/// and closing does no I/O on a connected device.
pub fn exclusively_held(index: u32) -> bool {
    let path = device_path(index);
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&path);
    matches!(opened, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach() -> Attach {
        Attach {
            size: 64 << 20,
            block_size: 4096,
            server_flags: 0x1 | 0x4 | 0x8,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
            backend: "ferry:data:0123456789abcdef".into(),
        }
    }

    fn fields(bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
        netlink::parse_attrs(bytes)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_vec()))
            .collect()
    }

    fn kinds(fields: &[(u16, Vec<u8>)]) -> Vec<u16> {
        fields.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn connect_carries_every_setting_and_the_socket() {
        let attrs = connect_attrs(&attach(), Some(3), 17).unwrap();
        let top = fields(attrs.as_bytes());
        assert_eq!(
            kinds(&top),
            vec![
                NBD_ATTR_INDEX,
                NBD_ATTR_SIZE_BYTES,
                NBD_ATTR_BLOCK_SIZE_BYTES,
                NBD_ATTR_SERVER_FLAGS,
                NBD_ATTR_CLIENT_FLAGS,
                NBD_ATTR_TIMEOUT,
                NBD_ATTR_DEAD_CONN_TIMEOUT,
                NBD_ATTR_BACKEND_IDENTIFIER,
                NBD_ATTR_SOCKETS,
            ]
        );
        assert_eq!(top[0].1, 3u32.to_ne_bytes());
        assert_eq!(top[1].1, (64u64 << 20).to_ne_bytes());
        assert_eq!(top[2].1, 4096u64.to_ne_bytes());
        assert_eq!(top[3].1, 0xdu64.to_ne_bytes());
        assert_eq!(top[4].1, 0u64.to_ne_bytes());
        assert_eq!(top[5].1, 30u64.to_ne_bytes());
        assert_eq!(top[6].1, 120u64.to_ne_bytes());
        assert_eq!(top[7].1, b"ferry:data:0123456789abcdef\0");
        let items = fields(&top[8].1);
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].0, NBD_SOCK_ITEM);
        assert_eq!(
            fields(&items[0].1),
            vec![(NBD_SOCK_FD, 17u32.to_ne_bytes().to_vec())]
        );
        // Without an index the kernel picks a free device.
        let attrs = connect_attrs(&attach(), None, 17).unwrap();
        assert_eq!(fields(attrs.as_bytes())[0].0, NBD_ATTR_SIZE_BYTES);
    }

    #[test]
    fn connect_refuses_block_sizes_the_kernel_refuses() {
        for bad in [0, 1, 256, 8192, 3000] {
            let mut a = attach();
            a.block_size = bad;
            assert!(connect_attrs(&a, None, 3).is_err(), "{bad}");
        }
        assert!(connect_attrs(&attach(), None, -1).is_err());
    }

    #[test]
    fn reconfigure_names_the_device_the_backend_and_the_socket() {
        let attrs = reconfigure_attrs(&attach(), 2, 9).unwrap();
        let top = fields(attrs.as_bytes());
        assert_eq!(
            kinds(&top),
            vec![
                NBD_ATTR_INDEX,
                NBD_ATTR_TIMEOUT,
                NBD_ATTR_DEAD_CONN_TIMEOUT,
                NBD_ATTR_BACKEND_IDENTIFIER,
                NBD_ATTR_SOCKETS,
            ]
        );
        assert_eq!(top[0].1, 2u32.to_ne_bytes());
    }

    #[test]
    fn answers_are_parsed() {
        let mut reply = Attrs::new();
        reply.u32(NBD_ATTR_INDEX, 5);
        let replies = vec![(NBD_CMD_CONNECT, reply.as_bytes().to_vec())];
        assert_eq!(parse_connect_reply(&replies).unwrap(), 5);
        assert!(parse_connect_reply(&[]).is_err());
    }

    #[test]
    fn device_names() {
        assert_eq!(parse_device("/dev/nbd0"), Some(0));
        assert_eq!(parse_device("nbd12"), Some(12));
        for bad in ["/dev/nbd", "/dev/sda", "/dev/nbd1p1", "nbd-1", ""] {
            assert_eq!(parse_device(bad), None, "{bad}");
        }
        assert_eq!(device_path(3), PathBuf::from("/dev/nbd3"));
    }

    #[test]
    fn use_is_read_from_sysfs_and_mountinfo() {
        let dir = std::env::temp_dir().join(format!("ferry-nbd-sys-{}", std::process::id()));
        let dev = dir.join("nbd1");
        std::fs::create_dir_all(dev.join("holders")).unwrap();
        std::fs::write(dev.join("dev"), "43:16\n").unwrap();
        std::fs::write(dev.join("backend"), "ferry:data:1\n").unwrap();
        let mounted = "36 25 43:16 / /mnt rw - ext4 /dev/nbd1 rw\n";
        let other = "36 25 8:1 / / rw - ext4 /dev/sda1 rw\n";
        assert!(in_use(&dir, mounted, 1));
        assert!(!in_use(&dir, other, 1));
        let part = dev.join("nbd1p1");
        std::fs::create_dir_all(part.join("holders")).unwrap();
        std::fs::write(part.join("dev"), "43:17\n").unwrap();
        let part_mounted = "37 25 43:17 / /srv rw - xfs /dev/nbd1p1 rw\n";
        assert!(in_use(&dir, part_mounted, 1), "a mounted partition");
        std::fs::create_dir_all(part.join("holders/dm-4")).unwrap();
        assert!(in_use(&dir, other, 1), "a partition under dm");
        std::fs::remove_dir(part.join("holders/dm-4")).unwrap();
        std::fs::create_dir_all(dev.join("holders/dm-3")).unwrap();
        assert!(in_use(&dir, other, 1));
        assert_eq!(backend_of(&dir, 1).as_deref(), Some("ferry:data:1"));
        assert_eq!(backend_of(&dir, 2), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
