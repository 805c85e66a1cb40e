//! Sliding the interceptor under a live device-mapper volume, and back out.
//!
//! A volume `NAME` (an LVM logical volume, or any dm device) keeps its
//! device number and its mounted file system throughout:
//!
//! 1. **prepare**: a new dm device `ferry-base-NAME` gets the volume's
//!    current table: the same blocks, a second way in. The filter protects
//!    `/dev/mapper/ferry-base-NAME` and serves it as `/dev/nbdN`.
//! 2. **slide in**: load `0 SIZE linear NBD_MAJ:MIN 0` into the volume's
//!    inactive slot, suspend it (the kernel flushes and freezes the file
//!    system: every write before the cut reached the old table), resume
//!    (every write after it goes through the filter).
//! 3. **slide out**: the same with the base's table; then the filter stops
//!    and the base device is removed.
//!
//! A volume whose table already points at an NBD device carrying this
//! filter's backend identifier is one a previous filter process slid
//! under: a restart reattaches to that device instead of sliding again.
//!
//! Upstream Linux cannot do this for a mounted plain partition: its block
//! device has no table to swap ([`not_a_volume`] says what to do instead).

use std::path::{Path, PathBuf};

use super::dm::{self, Control, Target};
use super::nbd_netlink;
use crate::error::{Error, Result};

/// Prefix of the dm device holding a protected volume's original table.
pub const BASE_PREFIX: &str = "ferry-base-";
/// Targets that may be live twice (the volume and its base) for a moment:
/// they only map blocks. Stateful ones (raid, mirror, cache, snapshot,
/// thin, era, integrity, vdo...) would run their metadata twice.
pub const STATELESS_TARGETS: &[&str] = &["linear", "striped", "crypt"];
/// `BLKFLSBUF` (include/uapi/linux/fs.h, `_IO(0x12, 97)`): write back and
/// drop a block device's page cache.
const BLKFLSBUF: libc::Ioctl = 0x1261;
/// Major number of the kernel's NBD devices (include/uapi/linux/major.h).
pub const NBD_MAJOR: u32 = 43;
const SYS_BLOCK: &str = "/sys/block";
const SYS_DEV_BLOCK: &str = "/sys/dev/block";

/// The dm device holding volume `name`'s original table.
pub fn base_name(name: &str) -> String {
    format!("{BASE_PREFIX}{name}")
}

/// The error for a block device that is not a dm device, with the
/// supported ways to protect it.
pub fn not_a_volume(path: &Path) -> Error {
    Error::config(format!(
        "{} is not a device-mapper volume: on stock Linux ferry cannot slide under a mounted \
         plain partition or disk (it has no table to swap). Supported ways: (1) an LVM logical \
         volume or any dm device: `ferry protect-volume /dev/VG/LV`; (2) a dm-linear device over \
         the partition made at boot (kernel parameter dm-mod.create=) and mounted instead of it, \
         then protect-volume it; (3) protect before mounting: `ferry filter --disk \
         NAME={} --nbd-device NAME=auto` and mount the /dev/nbdN it prints",
        path.display(),
        path.display()
    ))
}

/// The dm name of a volume path (`/dev/mapper/NAME`, `/dev/VG/LV`).
pub fn resolve(path: &Path) -> Result<String> {
    dm::name_of(path)?.ok_or_else(|| not_a_volume(path))
}

/// The NBD device index a table's only target sends its I/O to, if the
/// table is one linear target over a whole NBD device.
pub fn nbd_target(sys_dev_block: &Path, table: &[Target]) -> Option<u32> {
    let [target] = table else { return None };
    if target.kind != "linear" || target.start != 0 {
        return None;
    }
    let mut params = target.params.split_whitespace();
    let device = params.next()?;
    if params.next()? != "0" {
        return None;
    }
    let (major, minor) = device.split_once(':')?;
    if major.parse::<u32>().ok()? != NBD_MAJOR {
        return None;
    }
    // Minors of NBD devices depend on the module's max_part: ask sysfs.
    let link = std::fs::read_link(sys_dev_block.join(format!("{major}:{minor}"))).ok()?;
    nbd_netlink::parse_device(link.file_name()?.to_str()?)
}

/// The NBD device index the volume's live table runs on (None: its own
/// table).
pub fn running_on(control: &Control, volume: &str) -> Result<Option<u32>> {
    Ok(nbd_target(
        Path::new(SYS_DEV_BLOCK),
        &control.table(volume)?,
    ))
}

/// What `prepare` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// The volume is on its own table; the base device is ready and the
    /// volume must be slid in once the filter serves the base.
    Fresh,
    /// A previous filter slid the volume onto `/dev/nbdN` with this index:
    /// reattach to it, do not slide.
    Restart(u32),
}

/// The device node of a dm device, from the kernel's own naming
/// (devtmpfs makes `/dev/dm-N` whether or not udev runs; udev's
/// `/dev/mapper/NAME` link may come later or never).
pub fn device_node(control: &Control, name: &str) -> Result<PathBuf> {
    let info = control.info(name)?;
    let uevent = Path::new(SYS_DEV_BLOCK).join(format!("{}:{}/uevent", info.major, info.minor));
    let text = std::fs::read_to_string(&uevent)
        .map_err(|e| Error::io(e, "read device name").with_path(&uevent))?;
    let devname = text
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .ok_or_else(|| Error::config(format!("no DEVNAME in {}", uevent.display())))?;
    Ok(Path::new("/dev").join(devname))
}

/// Makes sure `ferry-base-NAME` holds the volume's original table and
/// tells whether the volume still needs sliding. `backend` is the backend
/// identifier the filter will attach with.
pub fn prepare(control: &Control, volume: &str, backend: &str) -> Result<Prepared> {
    let table = control.table(volume)?;
    let base = base_name(volume);
    if let Some(index) = nbd_target(Path::new(SYS_DEV_BLOCK), &table) {
        let owner = nbd_netlink::backend_of(Path::new(SYS_BLOCK), index);
        if owner.as_deref() != Some(backend) {
            return Err(Error::config(format!(
                "volume {volume} already runs on /dev/nbd{index}, served by {}: not ours",
                owner.as_deref().unwrap_or("nobody")
            )));
        }
        control.info(&base).map_err(|e| {
            Error::config(format!(
                "volume {volume} runs on our /dev/nbd{index} but its base device {base} is gone: {e}"
            ))
        })?;
        cancel_deferred_remove(control, &base);
        return Ok(Prepared::Restart(index));
    }
    dm::table_size(&table)?;
    if let Some(t) = table
        .iter()
        .find(|t| !STATELESS_TARGETS.contains(&t.kind.as_str()))
    {
        return Err(Error::config(format!(
            "volume {volume} uses the dm target {:?}, which keeps state of its own: ferry slides only under {} volumes (for others, protect the devices below them)",
            t.kind,
            STATELESS_TARGETS.join(", ")
        )));
    }
    match control.info(&base) {
        Ok(_) => {
            // Left by a run that stopped before sliding: reuse it only if it
            // is exactly the volume's table.
            if control.table(&base)? != table {
                return Err(Error::config(format!(
                    "{base} exists with a table other than {volume}'s: remove it (dmsetup remove {base}) after checking nothing uses it"
                )));
            }
            cancel_deferred_remove(control, &base);
        }
        Err(e) if dm::is_no_such_device(&e) => {
            control.create(&base, None)?;
            let made = control
                .load(&base, &table)
                .and_then(|()| control.resume(&base).map(drop));
            if let Err(e) = made {
                let _ = control.remove(&base);
                return Err(e);
            }
        }
        Err(e) => return Err(e),
    }
    Ok(Prepared::Fresh)
}

/// A base device reused from an earlier run may still carry the deferred
/// removal an unprotect asked for (while a sidecar held it): cancel it, or
/// the kernel would remove the base under the next filter.
fn cancel_deferred_remove(control: &Control, base: &str) {
    // The kernel refuses when no removal is pending: nothing to do then.
    let _ = control.message(base, 0, "@cancel_deferred_remove");
}

/// Writes back and drops the page cache of the base device: pages read or
/// written through one path (the volume's table, or the filter) must not be
/// served or written back after the other path changed the blocks.
pub fn drop_base_cache(control: &Control, volume: &str) -> Result<()> {
    let node = device_node(control, &base_name(volume))?;
    let file = std::fs::File::open(&node)
        .map_err(|e| Error::io(e, "open the base device").with_path(&node))?;
    // SAFETY: BLKFLSBUF takes no argument memory; the descriptor is ours.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), BLKFLSBUF, 0) };
    if rc != 0 {
        return Err(Error::io(std::io::Error::last_os_error(), "BLKFLSBUF").with_path(&node));
    }
    Ok(())
}

/// Swaps `table` in as the volume's live table: load into the inactive
/// slot, suspend (flush and freeze), drop the base's page cache, resume. If
/// a step fails the staged table is dropped and the volume resumed as it
/// was.
pub fn swap_table(control: &Control, volume: &str, table: &[Target]) -> Result<()> {
    control.load(volume, table)?;
    if let Err(e) = control.suspend(volume) {
        let _ = control.clear(volume);
        return Err(e);
    }
    if let Err(e) = drop_base_cache(control, volume) {
        let _ = control.clear(volume);
        let _ = control.resume(volume);
        return Err(e);
    }
    if let Err(e) = control.resume(volume) {
        let _ = control.clear(volume);
        let _ = control.resume(volume);
        return Err(e);
    }
    Ok(())
}

/// Slides the volume onto `/dev/nbdN`.
pub fn slide_in(control: &Control, volume: &str, nbd_index: u32) -> Result<()> {
    let size = dm::table_size(&control.table(volume)?)?;
    let dev_file = Path::new(SYS_BLOCK).join(format!("nbd{nbd_index}/dev"));
    let dev = std::fs::read_to_string(&dev_file)
        .map_err(|e| Error::io(e, "read NBD device number").with_path(&dev_file))?;
    let (major, minor) = dev
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| Error::config(format!("bad device number {dev:?}")))?;
    // dm takes the largest logical block size of its table's devices: a
    // larger one under a mounted file system fails its smaller I/O.
    let info = control.info(volume)?;
    let block_size = |path: PathBuf| {
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_string())
    };
    let ours =
        block_size(Path::new(SYS_BLOCK).join(format!("nbd{nbd_index}/queue/logical_block_size")));
    let theirs = block_size(Path::new(SYS_DEV_BLOCK).join(format!(
        "{}:{}/queue/logical_block_size",
        info.major, info.minor
    )));
    if ours != theirs {
        return Err(Error::config(format!(
            "/dev/nbd{nbd_index} has logical blocks of {} bytes, {volume} of {}: not sliding (leave --block-size unset)",
            ours.unwrap_or_default(),
            theirs.unwrap_or_default()
        )));
    }
    swap_table(control, volume, &[Target::linear(0, size, major, minor, 0)])
}

/// Slides the volume back onto its original table (the base device's).
pub fn slide_out(control: &Control, volume: &str) -> Result<()> {
    let base = base_name(volume);
    let table = control.table(&base)?;
    swap_table(control, volume, &table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_nbd_device_is_recognized() {
        let dir = std::env::temp_dir().join(format!("ferry-volume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("43:32");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("../../devices/virtual/block/nbd1", &link).unwrap();
        let on_nbd = vec![Target::linear(0, 2048, 43, 32, 0)];
        assert_eq!(nbd_target(&dir, &on_nbd), Some(1));
        let offset = vec![Target::linear(0, 2048, 43, 32, 8)];
        assert_eq!(nbd_target(&dir, &offset), None);
        let other = vec![Target::linear(0, 2048, 8, 16, 0)];
        assert_eq!(nbd_target(&dir, &other), None);
        let unknown_minor = vec![Target::linear(0, 2048, 43, 64, 0)];
        assert_eq!(nbd_target(&dir, &unknown_minor), None);
        let two = vec![
            Target::linear(0, 1024, 43, 32, 0),
            Target::linear(1024, 1024, 43, 32, 1024),
        ];
        assert_eq!(nbd_target(&dir, &two), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_and_the_partition_refusal() {
        assert_eq!(base_name("vg0-data"), "ferry-base-vg0-data");
        let e = not_a_volume(Path::new("/dev/sda2")).to_string();
        assert!(e.contains("LVM") && e.contains("dm-mod.create") && e.contains("--nbd-device"));
    }
}
