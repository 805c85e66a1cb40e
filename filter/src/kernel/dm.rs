//! A small device-mapper client: the dm control ioctls of
//! `include/uapi/linux/dm-ioctl.h` (interface version 4), spoken with
//! `libc::ioctl` on `/dev/mapper/control`.
//!
//! # What ferry uses it for
//!
//! `ferry protect-volume /dev/mapper/NAME` slides the filter's NBD device
//! under a mounted dm volume without unmounting it:
//!
//! 1. [`Control::table`] reads the volume's live table;
//! 2. [`Control::create`] + [`Control::load`] + [`Control::resume`] make a
//!    "base" dm device with that same table (the disk the filter serves);
//! 3. [`Control::load`] stages `0 SIZE linear NBD_MAJ:NBD_MIN 0` as the
//!    volume's inactive table, [`Control::suspend`] freezes the file system
//!    and drains in-flight I/O, and [`Control::resume`] swaps the staged
//!    table in and thaws.
//!
//! `unprotect-volume` reverses it (load the base's table back into the
//! volume, suspend, resume, [`Control::remove`] the base), and the test rig
//! builds dm-linear and dm-log-writes devices and sends log-writes
//! `mark NAME` messages ([`Control::message`]).
//!
//! The kernel accepts `DM_TABLE_LOAD` on a live, unsuspended device, and
//! a resume with a staged table suspends (with the file-system freeze)
//! before swapping. So the shortest suspension is load, then suspend, then
//! resume. Between suspend and resume the caller must not touch the volume,
//! including logging to a file on it: that would wait for the resume it
//! is blocking. [`Control::clear`] drops a staged table when a step fails.
//!
//! # The wire format
//!
//! Every command is `ioctl(fd, _IOWR(DM_IOCTL, CMD, struct dm_ioctl), buf)`
//! on one 8-byte aligned buffer. The buffer starts with `struct dm_ioctl`
//! (312 bytes, native endian; offsets from the header, checked against a
//! `#[repr(C)]` mirror at compile time):
//!
//! | offset | field | meaning |
//! | --- | --- | --- |
//! | 0 | `__u32 version[3]` | in: the interface the caller speaks; out: the kernel's |
//! | 12 | `__u32 data_size` | total buffer size, header included |
//! | 16 | `__u32 data_start` | offset of the payload (we send 312, the kernel answers 312) |
//! | 20 | `__u32 target_count` | in: targets in a loaded table; out: in the table |
//! | 24 | `__s32 open_count` | out: openers of the dm device |
//! | 28 | `__u32 flags` | the `DM_*_FLAG` bits below |
//! | 32 | `__u32 event_nr` | in: udev cookie (we send 0: none); out: event counter |
//! | 36 | `__u32 padding` | |
//! | 40 | `__u64 dev` | device number, `huge_encode_dev` (see [`encode_dev`]) |
//! | 48 | `char name[128]` | dm device name, NUL-terminated |
//! | 176 | `char uuid[129]` | dm uuid, NUL-terminated |
//! | 305 | `char data[7]` | padding up to the 8-byte aligned size, 312 |
//!
//! The payload after it depends on the command:
//!
//! * `DM_TABLE_LOAD` (in) and `DM_TABLE_STATUS` (out): `target_count`
//!   `struct dm_target_spec` (40 bytes: `__u64 sector_start` at 0,
//!   `__u64 length` at 8, `__s32 status` at 16, `__u32 next` at 20,
//!   `char target_type[16]` at 24), each followed by its NUL-terminated
//!   parameter string and padded so the next spec is 8-byte aligned. On
//!   load, `next` counts from the start of the *current* spec; on status,
//!   from the start of the *first* spec (the header says so, and
//!   `drivers/md/dm-ioctl.c` agrees). The kernel rejects a load whose
//!   `next` is unaligned or overlaps the previous spec's parameters.
//! * `DM_TARGET_MSG` (in): `struct dm_target_msg`, `__u64 sector` then the
//!   NUL-terminated message.
//! * `DM_LIST_DEVICES` (out): a chain of `struct dm_name_list`, `__u64 dev`
//!   at 0, `__u32 next` at 8 (from the start of *this* record, 0 for the
//!   last), the NUL-terminated name at 12; newer kernels put event number,
//!   flags and uuid after the name, which we skip. No devices: an empty
//!   payload or a first `dev` of 0.
//!
//! Answers that do not fit set `DM_BUFFER_FULL_FLAG`; [`Control::table`]
//! and [`Control::list`] then retry with a buffer twice as big, from
//! [`MIN_BUFFER`] (16 KiB, libdevmapper's default) up to 32 MiB.
//!
//! Each command sends the oldest interface version that has it (4.0.0, and
//! 4.2.0 for `DM_TARGET_MSG`, as libdevmapper does): the kernel refuses
//! only a different major or a newer minor than its own.
//!
//! # Encoding and decoding are pure
//!
//! [`Request::encode`] (alias [`encode_request`]), [`encode_targets`],
//! [`encode_message`], [`decode_info`], [`decode_targets`] and
//! [`decode_names`] work on byte slices and are tested without a kernel.
//! Decoding checks every offset against the answer and returns an error on
//! a truncated or garbled answer; it never panics or reads out of bounds.
//! All ioctls go through one `unsafe` call, behind a small transport trait
//! that the tests replace by a fake kernel.
//!
//! # udev and secrets
//!
//! We pass no udev cookie (`event_nr` 0) and do not wait for udev. The kernel
//! still emits uevents on resume and remove (it answers with
//! `DM_UEVENT_GENERATED_FLAG`), and udev processes them as events from
//! outside libdevmapper. ferry never needs the `/dev/mapper/NAME` node of a
//! device it has just made: it names devices through the control node and
//! targets by `MAJ:MIN`. udev's probe of a freshly resumed device can hold
//! it open for a moment, so [`Control::remove`] retries `EBUSY` for up to
//! two seconds, as `dmsetup remove --retry` does.
//!
//! A dm-crypt table holds its key (unless it names a keyring key), so table
//! loads and reads set `DM_SECURE_DATA_FLAG`: the kernel wipes its copies.
//! ferry's own copies (the returned [`Target`]s) are ordinary memory.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::offset_of;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

// ---------------------------------------------------------------------------
// Constants of include/uapi/linux/dm-ioctl.h
// ---------------------------------------------------------------------------

/// The control node (`DM_DIR "/" DM_CONTROL_NODE` under /dev).
pub const DM_CONTROL_PATH: &str = "/dev/mapper/control";
/// `DM_IOCTL`: the ioctl type byte.
pub const DM_IOCTL: u32 = 0xfd;
/// `DM_VERSION_MAJOR`: the only interface major this client speaks.
pub const DM_VERSION_MAJOR: u32 = 4;
/// `DM_NAME_LEN`: size of `name`, NUL included.
pub const DM_NAME_LEN: usize = 128;
/// `DM_UUID_LEN`: size of `uuid`, NUL included.
pub const DM_UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`: size of `target_type`, NUL included.
pub const DM_MAX_TYPE_NAME: usize = 16;

/// `DM_VERSION_CMD`: the interface version.
pub const DM_VERSION_CMD: u32 = 0;
/// `DM_REMOVE_ALL_CMD`: remove every dm device (debug only; unused).
pub const DM_REMOVE_ALL_CMD: u32 = 1;
/// `DM_LIST_DEVICES_CMD`: names and numbers of all dm devices.
pub const DM_LIST_DEVICES_CMD: u32 = 2;
/// `DM_DEV_CREATE_CMD`: a new device with no table, suspended.
pub const DM_DEV_CREATE_CMD: u32 = 3;
/// `DM_DEV_REMOVE_CMD`: remove a device and its tables.
pub const DM_DEV_REMOVE_CMD: u32 = 4;
/// `DM_DEV_RENAME_CMD`: rename, or set a missing uuid (unused).
pub const DM_DEV_RENAME_CMD: u32 = 5;
/// `DM_DEV_SUSPEND_CMD`: suspend with `DM_SUSPEND_FLAG`, else resume.
pub const DM_DEV_SUSPEND_CMD: u32 = 6;
/// `DM_DEV_STATUS_CMD`: the header fields of one device.
pub const DM_DEV_STATUS_CMD: u32 = 7;
/// `DM_DEV_WAIT_CMD`: wait for an event (unused).
pub const DM_DEV_WAIT_CMD: u32 = 8;
/// `DM_TABLE_LOAD_CMD`: stage a table in the inactive slot.
pub const DM_TABLE_LOAD_CMD: u32 = 9;
/// `DM_TABLE_CLEAR_CMD`: drop the inactive table.
pub const DM_TABLE_CLEAR_CMD: u32 = 10;
/// `DM_TABLE_DEPS_CMD`: the devices a table uses (unused).
pub const DM_TABLE_DEPS_CMD: u32 = 11;
/// `DM_TABLE_STATUS_CMD`: per-target status, or the table itself with
/// `DM_STATUS_TABLE_FLAG`.
pub const DM_TABLE_STATUS_CMD: u32 = 12;
/// `DM_LIST_VERSIONS_CMD`: loaded target types (unused).
pub const DM_LIST_VERSIONS_CMD: u32 = 13;
/// `DM_TARGET_MSG_CMD`: a message to the target at a sector.
pub const DM_TARGET_MSG_CMD: u32 = 14;
/// `DM_DEV_SET_GEOMETRY_CMD` (unused).
pub const DM_DEV_SET_GEOMETRY_CMD: u32 = 15;
/// `DM_DEV_ARM_POLL_CMD` (unused).
pub const DM_DEV_ARM_POLL_CMD: u32 = 16;
/// `DM_GET_TARGET_VERSION_CMD` (unused).
pub const DM_GET_TARGET_VERSION_CMD: u32 = 17;

/// `DM_READONLY_FLAG` (in/out): read-only table / device.
pub const DM_READONLY_FLAG: u32 = 1 << 0;
/// `DM_SUSPEND_FLAG` (in/out): suspend (in), is suspended (out).
pub const DM_SUSPEND_FLAG: u32 = 1 << 1;
/// `DM_PERSISTENT_DEV_FLAG` (in): create with the minor in `dev`.
pub const DM_PERSISTENT_DEV_FLAG: u32 = 1 << 3;
/// `DM_STATUS_TABLE_FLAG` (in): `DM_TABLE_STATUS` returns the table.
pub const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
/// `DM_ACTIVE_PRESENT_FLAG` (out): a live table is present.
pub const DM_ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
/// `DM_INACTIVE_PRESENT_FLAG` (out): a staged (inactive) table is present.
pub const DM_INACTIVE_PRESENT_FLAG: u32 = 1 << 6;
/// `DM_BUFFER_FULL_FLAG` (out): the answer did not fit.
pub const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
/// `DM_SKIP_BDGET_FLAG` (in): ignored by current kernels.
pub const DM_SKIP_BDGET_FLAG: u32 = 1 << 9;
/// `DM_SKIP_LOCKFS_FLAG` (in): suspend without freezing the file system.
pub const DM_SKIP_LOCKFS_FLAG: u32 = 1 << 10;
/// `DM_NOFLUSH_FLAG` (in): suspend without flushing queued I/O.
pub const DM_NOFLUSH_FLAG: u32 = 1 << 11;
/// `DM_QUERY_INACTIVE_TABLE_FLAG` (in): answer about the inactive table.
pub const DM_QUERY_INACTIVE_TABLE_FLAG: u32 = 1 << 12;
/// `DM_UEVENT_GENERATED_FLAG` (out): the kernel sent a uevent.
pub const DM_UEVENT_GENERATED_FLAG: u32 = 1 << 13;
/// `DM_UUID_FLAG` (in): rename sets the uuid.
pub const DM_UUID_FLAG: u32 = 1 << 14;
/// `DM_SECURE_DATA_FLAG` (in): the kernel wipes its buffers (keys).
pub const DM_SECURE_DATA_FLAG: u32 = 1 << 15;
/// `DM_DATA_OUT_FLAG` (out): a target message produced output.
pub const DM_DATA_OUT_FLAG: u32 = 1 << 16;
/// `DM_DEFERRED_REMOVE` (in/out): remove when last closed.
pub const DM_DEFERRED_REMOVE: u32 = 1 << 17;
/// `DM_INTERNAL_SUSPEND_FLAG` (out): suspended internally.
pub const DM_INTERNAL_SUSPEND_FLAG: u32 = 1 << 18;
/// `DM_IMA_MEASUREMENT_FLAG` (in): return IMA measurement data.
pub const DM_IMA_MEASUREMENT_FLAG: u32 = 1 << 19;

// ---------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------

/// `sizeof(struct dm_ioctl)`, also where our payload starts.
pub const DM_IOCTL_SIZE: usize = 312;
/// `offsetof(struct dm_ioctl, data)`: the smallest `data_size` the kernel
/// accepts.
pub const DM_IOCTL_MIN_SIZE: usize = 305;
/// `sizeof(struct dm_target_spec)`; the parameters follow.
pub const DM_TARGET_SPEC_SIZE: usize = 40;
/// `sizeof(struct dm_target_msg)`: the message follows the sector.
pub const DM_TARGET_MSG_SIZE: usize = 8;
/// Offset of `name` in `struct dm_name_list`.
pub const DM_NAME_LIST_NAME_OFFSET: usize = 12;
/// Buffer size for commands with a payload or an answer (libdevmapper's).
pub const MIN_BUFFER: usize = 16 * 1024;
/// Largest buffer [`Control::table`] and [`Control::list`] grow to.
const MAX_BUFFER: usize = 32 << 20;

const OFF_VERSION: usize = 0;
const OFF_DATA_SIZE: usize = 12;
const OFF_DATA_START: usize = 16;
const OFF_TARGET_COUNT: usize = 20;
const OFF_OPEN_COUNT: usize = 24;
const OFF_FLAGS: usize = 28;
const OFF_EVENT_NR: usize = 32;
const OFF_PADDING: usize = 36;
const OFF_DEV: usize = 40;
const OFF_NAME: usize = 48;
const OFF_UUID: usize = 176;

const SPEC_SECTOR_START: usize = 0;
const SPEC_LENGTH: usize = 8;
const SPEC_STATUS: usize = 16;
const SPEC_NEXT: usize = 20;
const SPEC_TARGET_TYPE: usize = 24;

const NAME_LIST_DEV: usize = 0;
const NAME_LIST_NEXT: usize = 8;

/// `struct dm_ioctl`, only measured: the bytes are built by hand. It gives
/// the ioctl numbers their size and checks the offsets above.
#[repr(C)]
#[allow(dead_code)]
struct DmIoctl {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    padding: u32,
    dev: u64,
    name: [u8; DM_NAME_LEN],
    uuid: [u8; DM_UUID_LEN],
    data: [u8; 7],
}

/// `struct dm_target_spec`, only measured.
#[repr(C)]
#[allow(dead_code)]
struct DmTargetSpec {
    sector_start: u64,
    length: u64,
    status: i32,
    next: u32,
    target_type: [u8; DM_MAX_TYPE_NAME],
}

/// `struct dm_target_msg` without its flexible `message[]`, only measured.
#[repr(C)]
#[allow(dead_code)]
struct DmTargetMsg {
    sector: u64,
}

/// `struct dm_name_list` without its flexible `name[]`, only measured.
#[repr(C)]
#[allow(dead_code)]
struct DmNameList {
    dev: u64,
    next: u32,
}

const _: () = {
    assert!(size_of::<DmIoctl>() == DM_IOCTL_SIZE);
    assert!(offset_of!(DmIoctl, version) == OFF_VERSION);
    assert!(offset_of!(DmIoctl, data_size) == OFF_DATA_SIZE);
    assert!(offset_of!(DmIoctl, data_start) == OFF_DATA_START);
    assert!(offset_of!(DmIoctl, target_count) == OFF_TARGET_COUNT);
    assert!(offset_of!(DmIoctl, open_count) == OFF_OPEN_COUNT);
    assert!(offset_of!(DmIoctl, flags) == OFF_FLAGS);
    assert!(offset_of!(DmIoctl, event_nr) == OFF_EVENT_NR);
    assert!(offset_of!(DmIoctl, padding) == OFF_PADDING);
    assert!(offset_of!(DmIoctl, dev) == OFF_DEV);
    assert!(offset_of!(DmIoctl, name) == OFF_NAME);
    assert!(offset_of!(DmIoctl, uuid) == OFF_UUID);
    assert!(offset_of!(DmIoctl, data) == DM_IOCTL_MIN_SIZE);
    assert!(DM_IOCTL_SIZE.is_multiple_of(8));

    assert!(size_of::<DmTargetSpec>() == DM_TARGET_SPEC_SIZE);
    assert!(offset_of!(DmTargetSpec, sector_start) == SPEC_SECTOR_START);
    assert!(offset_of!(DmTargetSpec, length) == SPEC_LENGTH);
    assert!(offset_of!(DmTargetSpec, status) == SPEC_STATUS);
    assert!(offset_of!(DmTargetSpec, next) == SPEC_NEXT);
    assert!(offset_of!(DmTargetSpec, target_type) == SPEC_TARGET_TYPE);

    assert!(size_of::<DmTargetMsg>() == DM_TARGET_MSG_SIZE);

    assert!(offset_of!(DmNameList, dev) == NAME_LIST_DEV);
    assert!(offset_of!(DmNameList, next) == NAME_LIST_NEXT);
    // name[] follows next directly (char has no alignment).
    assert!(NAME_LIST_NEXT + 4 == DM_NAME_LIST_NAME_OFFSET);
};

/// The ioctl request number of a dm command:
/// `_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`, in the encoding of the target
/// architecture (libc knows the few that differ).
pub fn ioctl_number(cmd: u32) -> libc::Ioctl {
    libc::_IOWR::<DmIoctl>(DM_IOCTL, cmd)
}

/// The header's name of a command, for messages.
fn command_name(cmd: u32) -> &'static str {
    match cmd {
        DM_VERSION_CMD => "DM_VERSION",
        DM_REMOVE_ALL_CMD => "DM_REMOVE_ALL",
        DM_LIST_DEVICES_CMD => "DM_LIST_DEVICES",
        DM_DEV_CREATE_CMD => "DM_DEV_CREATE",
        DM_DEV_REMOVE_CMD => "DM_DEV_REMOVE",
        DM_DEV_RENAME_CMD => "DM_DEV_RENAME",
        DM_DEV_SUSPEND_CMD => "DM_DEV_SUSPEND",
        DM_DEV_STATUS_CMD => "DM_DEV_STATUS",
        DM_DEV_WAIT_CMD => "DM_DEV_WAIT",
        DM_TABLE_LOAD_CMD => "DM_TABLE_LOAD",
        DM_TABLE_CLEAR_CMD => "DM_TABLE_CLEAR",
        DM_TABLE_DEPS_CMD => "DM_TABLE_DEPS",
        DM_TABLE_STATUS_CMD => "DM_TABLE_STATUS",
        DM_LIST_VERSIONS_CMD => "DM_LIST_VERSIONS",
        DM_TARGET_MSG_CMD => "DM_TARGET_MSG",
        DM_DEV_SET_GEOMETRY_CMD => "DM_DEV_SET_GEOMETRY",
        DM_DEV_ARM_POLL_CMD => "DM_DEV_ARM_POLL",
        DM_GET_TARGET_VERSION_CMD => "DM_GET_TARGET_VERSION",
        _ => "unknown dm command",
    }
}

/// The interface version sent with a command: the oldest that has it
/// (libdevmapper's table). The kernel refuses a newer minor than its own.
fn version_for(cmd: u32) -> [u32; 3] {
    match cmd {
        DM_LIST_VERSIONS_CMD => [DM_VERSION_MAJOR, 1, 0],
        DM_TARGET_MSG_CMD => [DM_VERSION_MAJOR, 2, 0],
        _ => [DM_VERSION_MAJOR, 0, 0],
    }
}

// ---------------------------------------------------------------------------
// Device numbers
// ---------------------------------------------------------------------------

/// A device number as the `dev` field carries it: the kernel's
/// `huge_encode_dev`, which is `new_encode_dev` (include/linux/kdev_t.h),
/// `(minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)`, libdevmapper's
/// `MKDEV`. Kernel majors have 12 bits and minors 20, so the inputs are
/// masked to those and the result fits 32 bits.
pub fn encode_dev(major: u32, minor: u32) -> u64 {
    let major = u64::from(major & 0xfff);
    let minor = u64::from(minor & 0xf_ffff);
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The (major, minor) of a `dev` field: `huge_decode_dev`, major bits 8..20,
/// minor bits 0..8 and 20..32. The upper 32 bits are never set.
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let major = (dev & 0xf_ff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xf_ff00);
    // Both are masked to at most 20 bits: the fallbacks never happen.
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    )
}

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// One line of a dm table: `start length kind params`, in 512-byte sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector of the device this target maps.
    pub start: u64,
    /// Sectors it maps.
    pub length: u64,
    /// The target type, e.g. `linear`, `log-writes`, `crypt`.
    pub kind: String,
    /// The target's parameters, as `dmsetup table` prints them.
    pub params: String,
}

impl Target {
    /// A target of any type.
    pub fn new(
        start: u64,
        length: u64,
        kind: impl Into<String>,
        params: impl Into<String>,
    ) -> Target {
        Target {
            start,
            length,
            kind: kind.into(),
            params: params.into(),
        }
    }

    /// `start length linear MAJ:MIN offset`: sectors `start..start+length`
    /// of the dm device map to `offset..` of block device `major:minor`.
    pub fn linear(start: u64, length: u64, major: u32, minor: u32, offset: u64) -> Target {
        Target::new(start, length, "linear", format!("{major}:{minor} {offset}"))
    }
}

impl fmt::Display for Target {
    /// The `dmsetup table` line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.start, self.length, self.kind)?;
        if !self.params.is_empty() {
            write!(f, " {}", self.params)?;
        }
        Ok(())
    }
}

/// What the kernel says about a dm device (the answer's header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The dm name.
    pub name: String,
    /// The dm uuid, if it has one.
    pub uuid: Option<String>,
    /// Block device major.
    pub major: u32,
    /// Block device minor.
    pub minor: u32,
    /// Openers of the block device (mounts, holders, processes).
    pub open_count: i32,
    /// Suspended: I/O is queued.
    pub suspended: bool,
    /// Read-only.
    pub read_only: bool,
    /// A live table is present.
    pub live_table: bool,
    /// A staged (inactive) table is present.
    pub inactive_table: bool,
    /// Targets in the live table.
    pub target_count: u32,
    /// The device's event counter.
    pub event_nr: u32,
}

/// One entry of [`Control::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedDevice {
    /// The dm name (lossily UTF-8).
    pub name: String,
    /// Block device major.
    pub major: u32,
    /// Block device minor.
    pub minor: u32,
}

/// Sectors covered by `table`, checking that its targets are non-empty and
/// contiguous from sector 0 (the kernel refuses gaps too).
pub fn table_size(table: &[Target]) -> Result<u64> {
    if table.is_empty() {
        return Err(Error::config("a dm table needs at least one target"));
    }
    let mut end = 0u64;
    for (i, target) in table.iter().enumerate() {
        if target.start != end {
            return Err(Error::config(format!(
                "dm table target {i} ({target}) starts at sector {}, expected {end}: targets must be contiguous from 0",
                target.start
            )));
        }
        if target.length == 0 {
            return Err(Error::config(format!(
                "dm table target {i} ({target}) has length 0"
            )));
        }
        end = end.checked_add(target.length).ok_or_else(|| {
            Error::config(format!(
                "dm table target {i} ({target}) ends past 2^64 sectors"
            ))
        })?;
    }
    Ok(end)
}

/// Whether `err` is the kernel's "no such dm device" (`ENXIO` from a dm
/// ioctl), e.g. to tell a missing base device from a failure.
pub fn is_no_such_device(err: &Error) -> bool {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<io::Error>())
        .and_then(io::Error::raw_os_error)
        == Some(libc::ENXIO)
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// One ioctl request before encoding: the `struct dm_ioctl` fields a caller
/// sets and the payload placed at `data_start` (312).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Device name; empty for commands about no device.
    pub name: String,
    /// Device uuid; only `DM_DEV_CREATE` sends one (lookups take one of
    /// name and uuid, never both).
    pub uuid: String,
    /// `DM_*_FLAG` bits.
    pub flags: u32,
    /// Targets in the payload (`DM_TABLE_LOAD`).
    pub target_count: u32,
    /// Bytes after the header.
    pub payload: Vec<u8>,
    /// Smallest total buffer size, for the answer's room.
    pub min_size: usize,
}

impl Request {
    /// A request about the device `name` (checked by [`Request::encode`]).
    pub fn named(name: &str) -> Request {
        Request {
            name: name.to_owned(),
            ..Request::default()
        }
    }

    /// The ioctl buffer for command `cmd`: the header, the payload, zeros
    /// up to `min_size`, rounded up to 8 bytes; `data_size` is the whole.
    pub fn encode(&self, cmd: u32) -> Result<Vec<u8>> {
        check_string("dm device name", &self.name, DM_NAME_LEN - 1)?;
        if self.name.contains('/') {
            return Err(Error::config(format!(
                "dm device name {:?} contains '/'",
                self.name
            )));
        }
        check_string("dm uuid", &self.uuid, DM_UUID_LEN - 1)?;
        let used = DM_IOCTL_SIZE
            .checked_add(self.payload.len())
            .ok_or_else(too_big)?;
        let len = align8(used.max(self.min_size)).ok_or_else(too_big)?;
        let data_size = u32::try_from(len).map_err(|_| too_big())?;
        let data_start = u32::try_from(DM_IOCTL_SIZE).map_err(|_| too_big())?;

        let mut buf = vec![0u8; len];
        let [major, minor, patch] = version_for(cmd);
        put(&mut buf, OFF_VERSION, &major.to_ne_bytes())?;
        put(&mut buf, OFF_VERSION + 4, &minor.to_ne_bytes())?;
        put(&mut buf, OFF_VERSION + 8, &patch.to_ne_bytes())?;
        put(&mut buf, OFF_DATA_SIZE, &data_size.to_ne_bytes())?;
        put(&mut buf, OFF_DATA_START, &data_start.to_ne_bytes())?;
        put(&mut buf, OFF_TARGET_COUNT, &self.target_count.to_ne_bytes())?;
        put(&mut buf, OFF_FLAGS, &self.flags.to_ne_bytes())?;
        // open_count, event_nr (no udev cookie), padding and dev stay 0.
        put(&mut buf, OFF_NAME, self.name.as_bytes())?;
        put(&mut buf, OFF_UUID, self.uuid.as_bytes())?;
        put(&mut buf, DM_IOCTL_SIZE, &self.payload)?;
        Ok(buf)
    }
}

/// [`Request::encode`] as a function.
pub fn encode_request(cmd: u32, request: &Request) -> Result<Vec<u8>> {
    request.encode(cmd)
}

/// The `DM_TABLE_LOAD` payload of `table` and its target count: one
/// `struct dm_target_spec` per target, its NUL-terminated parameters, zero
/// padding to 8 bytes; `next` is the distance to the next spec.
pub fn encode_targets(table: &[Target]) -> Result<(u32, Vec<u8>)> {
    if table.is_empty() {
        return Err(Error::config("a dm table needs at least one target"));
    }
    let count = u32::try_from(table.len()).map_err(|_| too_big())?;
    let mut payload = Vec::new();
    for target in table {
        if target.kind.is_empty() {
            return Err(Error::config(format!(
                "dm target {target}: empty target type"
            )));
        }
        check_string("dm target type", &target.kind, DM_MAX_TYPE_NAME - 1)?;
        check_string("dm target parameters", &target.params, usize::MAX)?;
        let spec_len = DM_TARGET_SPEC_SIZE
            .checked_add(target.params.len())
            .and_then(|n| n.checked_add(1))
            .and_then(align8)
            .ok_or_else(too_big)?;
        let next = u32::try_from(spec_len).map_err(|_| too_big())?;
        let at = payload.len();
        payload.resize(at.checked_add(spec_len).ok_or_else(too_big)?, 0);
        put(
            &mut payload,
            at + SPEC_SECTOR_START,
            &target.start.to_ne_bytes(),
        )?;
        put(&mut payload, at + SPEC_LENGTH, &target.length.to_ne_bytes())?;
        // status stays 0 (only the kernel writes it).
        put(&mut payload, at + SPEC_NEXT, &next.to_ne_bytes())?;
        put(&mut payload, at + SPEC_TARGET_TYPE, target.kind.as_bytes())?;
        put(
            &mut payload,
            at + DM_TARGET_SPEC_SIZE,
            target.params.as_bytes(),
        )?;
        // The NUL and the padding are the zeros of resize.
    }
    Ok((count, payload))
}

/// The `DM_TARGET_MSG` payload: the sector, then the NUL-terminated message.
pub fn encode_message(sector: u64, message: &str) -> Result<Vec<u8>> {
    if message.trim().is_empty() {
        return Err(Error::config("a dm target message cannot be empty"));
    }
    check_string("dm target message", message, usize::MAX)?;
    let mut payload = Vec::with_capacity(DM_TARGET_MSG_SIZE + message.len() + 1);
    payload.extend_from_slice(&sector.to_ne_bytes());
    payload.extend_from_slice(message.as_bytes());
    payload.push(0);
    Ok(payload)
}

/// Refuse a string with a NUL or longer than `max` bytes.
fn check_string(what: &str, value: &str, max: usize) -> Result<()> {
    if value.as_bytes().contains(&0) {
        return Err(Error::config(format!(
            "{what} {value:?} contains a NUL byte"
        )));
    }
    if value.len() > max {
        return Err(Error::config(format!(
            "{what} {value:?} is {} bytes long, at most {max} fit",
            value.len()
        )));
    }
    Ok(())
}

/// Refuse an empty device name (the rest is checked by encode).
fn device_name(name: &str) -> Result<()> {
    if name.is_empty() {
        Err(Error::config("a dm device name cannot be empty"))
    } else {
        Ok(())
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) -> Result<()> {
    at.checked_add(bytes.len())
        .and_then(|end| buf.get_mut(at..end))
        .ok_or_else(too_big)?
        .copy_from_slice(bytes);
    Ok(())
}

fn align8(n: usize) -> Option<usize> {
    Some(n.checked_add(7)? & !7)
}

fn too_big() -> Error {
    Error::config("dm ioctl request too large")
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

/// The header of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    version: [u32; 3],
    data_size: u32,
    data_start: u32,
    target_count: u32,
    open_count: i32,
    flags: u32,
    event_nr: u32,
    dev: u64,
    name: String,
    uuid: String,
}

fn malformed(what: impl fmt::Display) -> Error {
    Error::new(ErrorKind::Io, format!("malformed dm ioctl answer: {what}"))
}

fn bytes_at<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N]> {
    at.checked_add(N)
        .and_then(|end| buf.get(at..end))
        .and_then(|bytes| <[u8; N]>::try_from(bytes).ok())
        .ok_or_else(|| {
            malformed(format!(
                "{N} bytes at offset {at} past its end ({})",
                buf.len()
            ))
        })
}

fn u32_at(buf: &[u8], at: usize) -> Result<u32> {
    bytes_at(buf, at).map(u32::from_ne_bytes)
}

fn i32_at(buf: &[u8], at: usize) -> Result<i32> {
    bytes_at(buf, at).map(i32::from_ne_bytes)
}

fn u64_at(buf: &[u8], at: usize) -> Result<u64> {
    bytes_at(buf, at).map(u64::from_ne_bytes)
}

fn usize_from(value: u32) -> Result<usize> {
    usize::try_from(value).map_err(|_| malformed(format!("offset {value} does not fit")))
}

/// The NUL-terminated string at `at`, whose NUL must lie within `max`
/// bytes and within `buf`.
fn cstr_at<'a>(buf: &'a [u8], at: usize, max: usize, what: &str) -> Result<&'a [u8]> {
    let end = at.saturating_add(max).min(buf.len());
    let field = buf.get(at..end).ok_or_else(|| {
        malformed(format!(
            "{what} at offset {at} past its end ({})",
            buf.len()
        ))
    })?;
    let nul = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| malformed(format!("{what} at offset {at} is not NUL-terminated")))?;
    Ok(field.get(..nul).unwrap_or_default())
}

/// The fixed-size `char[size]` at `at`: up to its first NUL, or all of it.
fn fixed_str_at<'a>(buf: &'a [u8], at: usize, size: usize, what: &str) -> Result<&'a [u8]> {
    let field = at
        .checked_add(size)
        .and_then(|end| buf.get(at..end))
        .ok_or_else(|| {
            malformed(format!(
                "{what} at offset {at} past its end ({})",
                buf.len()
            ))
        })?;
    let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    Ok(field.get(..len).unwrap_or_default())
}

fn utf8(bytes: &[u8], what: &str) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| malformed(format!("{what} is not UTF-8")))
}

fn decode_header(buf: &[u8]) -> Result<Header> {
    if buf.len() < DM_IOCTL_SIZE {
        return Err(malformed(format!(
            "{} bytes, shorter than struct dm_ioctl ({DM_IOCTL_SIZE})",
            buf.len()
        )));
    }
    let version = [
        u32_at(buf, OFF_VERSION)?,
        u32_at(buf, OFF_VERSION + 4)?,
        u32_at(buf, OFF_VERSION + 8)?,
    ];
    if version[0] != DM_VERSION_MAJOR {
        return Err(malformed(format!(
            "interface version {}.{}.{}, expected {DM_VERSION_MAJOR}.x",
            version[0], version[1], version[2]
        )));
    }
    let name = cstr_at(buf, OFF_NAME, DM_NAME_LEN, "device name")?;
    let uuid = cstr_at(buf, OFF_UUID, DM_UUID_LEN, "device uuid")?;
    Ok(Header {
        version,
        data_size: u32_at(buf, OFF_DATA_SIZE)?,
        data_start: u32_at(buf, OFF_DATA_START)?,
        target_count: u32_at(buf, OFF_TARGET_COUNT)?,
        open_count: i32_at(buf, OFF_OPEN_COUNT)?,
        flags: u32_at(buf, OFF_FLAGS)?,
        event_nr: u32_at(buf, OFF_EVENT_NR)?,
        dev: u64_at(buf, OFF_DEV)?,
        name: String::from_utf8_lossy(name).into_owned(),
        uuid: String::from_utf8_lossy(uuid).into_owned(),
    })
}

/// The answer's payload, `buf[data_start..data_size]`, after checking that
/// it lies within the buffer and the answer is complete.
fn data_of<'a>(buf: &'a [u8], header: &Header) -> Result<&'a [u8]> {
    if header.flags & DM_BUFFER_FULL_FLAG != 0 {
        return Err(malformed("the answer did not fit (DM_BUFFER_FULL_FLAG)"));
    }
    let start = usize_from(header.data_start)?;
    let end = usize_from(header.data_size)?;
    if start < DM_IOCTL_MIN_SIZE || start > end || end > buf.len() {
        return Err(malformed(format!(
            "data_start {start} and data_size {end} do not fit a {}-byte buffer",
            buf.len()
        )));
    }
    buf.get(start..end)
        .ok_or_else(|| malformed("payload out of bounds"))
}

/// The device described by an answer's header (`DM_DEV_STATUS`,
/// `DM_DEV_CREATE`, `DM_DEV_SUSPEND`, ...).
pub fn decode_info(buf: &[u8]) -> Result<DeviceInfo> {
    let header = decode_header(buf)?;
    let (major, minor) = decode_dev(header.dev);
    Ok(DeviceInfo {
        name: header.name,
        uuid: (!header.uuid.is_empty()).then_some(header.uuid),
        major,
        minor,
        open_count: header.open_count,
        suspended: header.flags & DM_SUSPEND_FLAG != 0,
        read_only: header.flags & DM_READONLY_FLAG != 0,
        live_table: header.flags & DM_ACTIVE_PRESENT_FLAG != 0,
        inactive_table: header.flags & DM_INACTIVE_PRESENT_FLAG != 0,
        target_count: header.target_count,
        event_nr: header.event_nr,
    })
}

/// The interface version the kernel wrote into an answer.
fn decode_version(buf: &[u8]) -> Result<(u32, u32, u32)> {
    let [major, minor, patch] = decode_header(buf)?.version;
    Ok((major, minor, patch))
}

/// The targets of a `DM_TABLE_STATUS` answer: `target_count` specs, the
/// first at `data_start`, each `next` counting from the first spec.
pub fn decode_targets(buf: &[u8]) -> Result<Vec<Target>> {
    let header = decode_header(buf)?;
    let data = data_of(buf, &header)?;
    let count = usize_from(header.target_count)?;
    // A garbled count must not reserve memory: each spec takes 41 bytes.
    let mut targets = Vec::with_capacity(count.min(data.len() / (DM_TARGET_SPEC_SIZE + 1)));
    let mut at = 0usize;
    for i in 0..count {
        let params_at = at
            .checked_add(DM_TARGET_SPEC_SIZE)
            .filter(|&end| end <= data.len())
            .ok_or_else(|| {
                malformed(format!(
                    "target {i} at offset {at} runs past the {}-byte payload",
                    data.len()
                ))
            })?;
        let start = u64_at(data, at + SPEC_SECTOR_START)?;
        let length = u64_at(data, at + SPEC_LENGTH)?;
        let next = u32_at(data, at + SPEC_NEXT)?;
        let kind = fixed_str_at(data, at + SPEC_TARGET_TYPE, DM_MAX_TYPE_NAME, "target type")?;
        let params = cstr_at(data, params_at, usize::MAX, "target parameters")?;
        targets.push(Target {
            start,
            length,
            kind: utf8(kind, "target type")?,
            params: utf8(params, "target parameters")?,
        });
        if i + 1 < count {
            // The last spec's next points past the payload; the others must
            // move forward past this spec's parameters.
            let next = usize_from(next)?;
            let params_end = params_at + params.len() + 1;
            if next < params_end {
                return Err(malformed(format!(
                    "target {i}: next spec at {next} overlaps it (it ends at {params_end})"
                )));
            }
            at = next;
        }
    }
    Ok(targets)
}

/// The devices of a `DM_LIST_DEVICES` answer.
pub fn decode_names(buf: &[u8]) -> Result<Vec<ListedDevice>> {
    let header = decode_header(buf)?;
    let data = data_of(buf, &header)?;
    let mut devices = Vec::new();
    // No devices: an empty payload, or a first record with dev 0.
    if data.len() < 8 || u64_at(data, NAME_LIST_DEV)? == 0 {
        return Ok(devices);
    }
    let mut at = 0usize;
    loop {
        let dev = u64_at(data, at + NAME_LIST_DEV)?;
        let next = usize_from(u32_at(data, at + NAME_LIST_NEXT)?)?;
        let name = cstr_at(
            data,
            at + DM_NAME_LIST_NAME_OFFSET,
            usize::MAX,
            "device name",
        )?;
        let (major, minor) = decode_dev(dev);
        devices.push(ListedDevice {
            name: String::from_utf8_lossy(name).into_owned(),
            major,
            minor,
        });
        if next == 0 {
            return Ok(devices);
        }
        let record_end = DM_NAME_LIST_NAME_OFFSET + name.len() + 1;
        if next < record_end {
            return Err(malformed(format!(
                "device list record at {at}: next {next} overlaps its name"
            )));
        }
        at = at
            .checked_add(next)
            .filter(|&at| at < data.len())
            .ok_or_else(|| {
                malformed(format!(
                    "device list record at {at}: next {next} points past the {}-byte payload",
                    data.len()
                ))
            })?;
    }
}

// ---------------------------------------------------------------------------
// The ioctl
// ---------------------------------------------------------------------------

/// An 8-byte aligned ioctl buffer: `struct dm_ioctl` has a u64 field and
/// the kernel lays out 8-byte aligned records in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Buffer {
    words: Vec<u64>,
}

impl Buffer {
    /// `bytes`, zero-padded to a multiple of 8.
    fn from_bytes(bytes: &[u8]) -> Buffer {
        let words = bytes
            .chunks(8)
            .map(|chunk| {
                let mut word = [0u8; 8];
                for (to, from) in word.iter_mut().zip(chunk) {
                    *to = *from;
                }
                u64::from_ne_bytes(word)
            })
            .collect();
        Buffer { words }
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn byte_len(&self) -> usize {
        self.words.len().saturating_mul(8)
    }
}

/// Where requests go: the kernel ([`Control`]), or a fake in tests.
trait Transport {
    /// Run dm command `cmd` on `buffer`, which the kernel reads and
    /// rewrites in place.
    fn call(&self, cmd: u32, buffer: &mut Buffer) -> io::Result<()>;
}

/// An open `/dev/mapper/control`: the dm commands ferry uses. Every call
/// needs CAP_SYS_ADMIN.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Transport for Control {
    fn call(&self, cmd: u32, buffer: &mut Buffer) -> io::Result<()> {
        // The kernel reads and writes data_size bytes at the pointer: it
        // must not exceed the buffer. Encode guarantees it; check anyway,
        // as the unsafe call relies on it.
        let head: Vec<u8> = buffer
            .words
            .iter()
            .take(2)
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let data_size = u32_at(&head, OFF_DATA_SIZE)
            .ok()
            .and_then(|size| usize::try_from(size).ok());
        match data_size {
            Some(size) if (DM_IOCTL_MIN_SIZE..=buffer.byte_len()).contains(&size) => {}
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "dm ioctl buffer shorter than its data_size",
                ))
            }
        }
        // SAFETY: the pointer is to a live, 8-byte aligned allocation of
        // buffer.byte_len() bytes, exclusively borrowed for the call; the
        // kernel reads at most data_size bytes from it and writes back at
        // most data_size (DM_VERSION: only the version words), and
        // data_size was checked above to lie within the buffer. The
        // descriptor is the open control node.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                ioctl_number(cmd),
                buffer.words.as_mut_ptr(),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

fn ioctl_error(source: io::Error, cmd: u32, name: &str) -> Error {
    let hint = match source.raw_os_error() {
        Some(libc::EACCES | libc::EPERM) => " (device-mapper needs root: CAP_SYS_ADMIN)",
        Some(libc::ENXIO) => " (no such dm device)",
        Some(libc::EBUSY) if cmd == DM_DEV_CREATE_CMD => {
            " (a dm device with this name or uuid exists)"
        }
        Some(libc::EBUSY) if cmd == DM_DEV_REMOVE_CMD => " (the device is open or in use)",
        Some(libc::ENOTTY) => " (the kernel does not know this dm command)",
        Some(libc::EINVAL) => " (the kernel log says why: dmesg)",
        _ => "",
    };
    let operation = if name.is_empty() {
        format!("dm ioctl {}{hint}", command_name(cmd))
    } else {
        format!("dm ioctl {} {name}{hint}", command_name(cmd))
    };
    Error::io(source, &operation)
}

/// Encode `request`, run it, return the answer's bytes.
fn exchange(t: &dyn Transport, cmd: u32, request: &Request) -> Result<Vec<u8>> {
    let mut buffer = Buffer::from_bytes(&request.encode(cmd)?);
    t.call(cmd, &mut buffer)
        .map_err(|e| ioctl_error(e, cmd, &request.name))?;
    Ok(buffer.to_bytes())
}

/// Run `request` with a buffer of [`MIN_BUFFER`], doubled while the answer
/// does not fit, and decode it.
fn exchange_growing<T>(
    t: &dyn Transport,
    cmd: u32,
    mut request: Request,
    decode: impl Fn(&[u8]) -> Result<T>,
) -> Result<T> {
    let mut size = MIN_BUFFER;
    loop {
        request.min_size = size;
        let answer = exchange(t, cmd, &request)?;
        if decode_header(&answer)?.flags & DM_BUFFER_FULL_FLAG == 0 {
            return decode(&answer);
        }
        if size >= MAX_BUFFER {
            return Err(Error::new(
                ErrorKind::Io,
                format!(
                    "dm ioctl {} {}: the answer does not fit {MAX_BUFFER} bytes",
                    command_name(cmd),
                    request.name
                ),
            ));
        }
        size = size.saturating_mul(2).min(MAX_BUFFER);
    }
}

fn version(t: &dyn Transport) -> Result<(u32, u32, u32)> {
    decode_version(&exchange(t, DM_VERSION_CMD, &Request::default())?)
}

fn create(t: &dyn Transport, name: &str, uuid: Option<&str>) -> Result<DeviceInfo> {
    device_name(name)?;
    let mut request = Request::named(name);
    if let Some(uuid) = uuid {
        if uuid.is_empty() {
            return Err(Error::config("a dm uuid cannot be empty"));
        }
        uuid.clone_into(&mut request.uuid);
    }
    decode_info(&exchange(t, DM_DEV_CREATE_CMD, &request)?)
}

/// Remove `name`, retrying `EBUSY` `retries` times `delay` apart.
fn remove(t: &dyn Transport, name: &str, retries: u32, delay: Duration) -> Result<()> {
    device_name(name)?;
    let request = Request::named(name);
    let mut left = retries;
    loop {
        match exchange(t, DM_DEV_REMOVE_CMD, &request) {
            Err(e) if left > 0 && os_error(&e) == Some(libc::EBUSY) => {
                left -= 1;
                std::thread::sleep(delay);
            }
            other => return other.map(|_| ()),
        }
    }
}

fn remove_deferred(t: &dyn Transport, name: &str) -> Result<bool> {
    device_name(name)?;
    let request = Request {
        flags: DM_DEFERRED_REMOVE,
        ..Request::named(name)
    };
    let answer = exchange(t, DM_DEV_REMOVE_CMD, &request)?;
    // The kernel answers with the flag still set when it only scheduled
    // the removal.
    Ok(u32_at(&answer, OFF_FLAGS).map_or(true, |flags| flags & DM_DEFERRED_REMOVE == 0))
}

fn os_error(err: &Error) -> Option<i32> {
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<io::Error>())
        .and_then(io::Error::raw_os_error)
}

fn load(t: &dyn Transport, name: &str, table: &[Target]) -> Result<()> {
    device_name(name)?;
    table_size(table)?;
    let (target_count, payload) = encode_targets(table)?;
    let request = Request {
        flags: DM_SECURE_DATA_FLAG,
        target_count,
        payload,
        min_size: MIN_BUFFER,
        ..Request::named(name)
    };
    exchange(t, DM_TABLE_LOAD_CMD, &request).map(|_| ())
}

fn clear(t: &dyn Transport, name: &str) -> Result<()> {
    device_name(name)?;
    exchange(t, DM_TABLE_CLEAR_CMD, &Request::named(name)).map(|_| ())
}

fn suspend(t: &dyn Transport, name: &str) -> Result<()> {
    device_name(name)?;
    let request = Request {
        flags: DM_SUSPEND_FLAG,
        ..Request::named(name)
    };
    exchange(t, DM_DEV_SUSPEND_CMD, &request).map(|_| ())
}

fn resume(t: &dyn Transport, name: &str) -> Result<DeviceInfo> {
    device_name(name)?;
    decode_info(&exchange(t, DM_DEV_SUSPEND_CMD, &Request::named(name))?)
}

fn info(t: &dyn Transport, name: &str) -> Result<DeviceInfo> {
    device_name(name)?;
    decode_info(&exchange(t, DM_DEV_STATUS_CMD, &Request::named(name))?)
}

fn table(t: &dyn Transport, name: &str) -> Result<Vec<Target>> {
    device_name(name)?;
    let request = Request {
        flags: DM_STATUS_TABLE_FLAG | DM_SECURE_DATA_FLAG,
        ..Request::named(name)
    };
    exchange_growing(t, DM_TABLE_STATUS_CMD, request, decode_targets)
}

fn message(t: &dyn Transport, name: &str, sector: u64, text: &str) -> Result<()> {
    device_name(name)?;
    let request = Request {
        payload: encode_message(sector, text)?,
        min_size: MIN_BUFFER,
        ..Request::named(name)
    };
    exchange(t, DM_TARGET_MSG_CMD, &request).map(|_| ())
}

fn list(t: &dyn Transport) -> Result<Vec<ListedDevice>> {
    // An empty name: newer kernels filter the list by name and uuid.
    exchange_growing(t, DM_LIST_DEVICES_CMD, Request::default(), decode_names)
}

/// Attempts and spacing of [`Control::remove`]'s `EBUSY` retries.
const REMOVE_RETRIES: u32 = 20;
const REMOVE_RETRY_DELAY: Duration = Duration::from_millis(100);

impl Control {
    /// Open [`DM_CONTROL_PATH`] read-write, close-on-exec.
    pub fn open() -> Result<Control> {
        Control::open_path(Path::new(DM_CONTROL_PATH))
    }

    fn open_path(path: &Path) -> Result<Control> {
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path);
        match opened {
            Ok(file) => Ok(Control { file }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::io(
                e,
                "open the device-mapper control node: device-mapper is not loaded \
                 (load dm_mod: modprobe dm_mod)",
            )
            .with_path(path)),
            Err(e) => Err(Error::io(e, "open the device-mapper control node").with_path(path)),
        }
    }

    /// The kernel's dm interface version (major, minor, patch).
    pub fn version(&self) -> Result<(u32, u32, u32)> {
        version(self)
    }

    /// Create dm device `name` (and `uuid`) with no table, suspended.
    pub fn create(&self, name: &str, uuid: Option<&str>) -> Result<DeviceInfo> {
        create(self, name, uuid)
    }

    /// Remove dm device `name` and its tables. `EBUSY` (still open, or
    /// briefly probed by udev) is retried for up to two seconds.
    pub fn remove(&self, name: &str) -> Result<()> {
        remove(self, name, REMOVE_RETRIES, REMOVE_RETRY_DELAY)
    }

    /// Remove `name` now if nothing holds it open, else as soon as its last
    /// opener closes it (`DM_DEFERRED_REMOVE`, interface 4.27+). Returns
    /// whether the device is already gone.
    pub fn remove_deferred(&self, name: &str) -> Result<bool> {
        remove_deferred(self, name)
    }

    /// Stage `table` as the inactive table of `name` (read-write); the live
    /// table is untouched until [`Control::resume`]. The table must be
    /// contiguous from sector 0 ([`table_size`]).
    pub fn load(&self, name: &str, table: &[Target]) -> Result<()> {
        load(self, name, table)
    }

    /// Drop the inactive table of `name`, if any.
    pub fn clear(&self, name: &str) -> Result<()> {
        clear(self, name)
    }

    /// Suspend `name`, flushing: the file system on it is frozen and
    /// in-flight I/O drained; new I/O waits for the resume. Suspending a
    /// suspended device is a no-op.
    pub fn suspend(&self, name: &str) -> Result<()> {
        suspend(self, name)
    }

    /// Resume `name`: swap in the inactive table if one is staged, then let
    /// I/O through and thaw. No udev cookie is passed nor waited for.
    pub fn resume(&self, name: &str) -> Result<DeviceInfo> {
        resume(self, name)
    }

    /// The state of `name` (`DM_DEV_STATUS`).
    pub fn info(&self, name: &str) -> Result<DeviceInfo> {
        info(self, name)
    }

    /// The live table of `name` (empty if it has none).
    pub fn table(&self, name: &str) -> Result<Vec<Target>> {
        table(self, name)
    }

    /// Send `message` to the target of `name` covering `sector`, e.g.
    /// `mark NAME` to a log-writes target.
    pub fn message(&self, name: &str, sector: u64, message: &str) -> Result<()> {
        self::message(self, name, sector, message)
    }

    /// All dm devices.
    pub fn list(&self) -> Result<Vec<ListedDevice>> {
        list(self)
    }
}

// ---------------------------------------------------------------------------
// Paths to names
// ---------------------------------------------------------------------------

/// The dm name of the block device at `path` (`/dev/mapper/NAME`, an LVM
/// `/dev/VG/LV`, `/dev/dm-N`; symlinks are followed): its device number,
/// then `/sys/dev/block/MAJ:MIN/dm/name`. `Ok(None)` for a block device
/// that is not a dm device (a disk, a partition).
pub fn name_of(path: &Path) -> Result<Option<String>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(e, "stat").with_path(path))?;
    if !meta.file_type().is_block_device() {
        return Err(Error::config(format!(
            "{} is not a block device",
            path.display()
        )));
    }
    let rdev = meta.rdev();
    dm_name_in(
        Path::new("/sys/dev/block"),
        libc::major(rdev),
        libc::minor(rdev),
    )
    .map_err(|e| e.with_path(path))
}

/// `ROOT/MAJ:MIN/dm/name`, `None` when the device has no `dm` directory.
fn dm_name_in(root: &Path, major: u32, minor: u32) -> Result<Option<String>> {
    let device = root.join(format!("{major}:{minor}"));
    let file = device.join("dm").join("name");
    match std::fs::read(&file) {
        Ok(bytes) => {
            let name = bytes.strip_suffix(b"\n").unwrap_or(&bytes);
            let name = String::from_utf8(name.to_vec()).map_err(|_| {
                Error::config(format!("dm name in {} is not UTF-8", file.display()))
            })?;
            if name.is_empty() {
                return Err(Error::config(format!("{} is empty", file.display())));
            }
            Ok(Some(name))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if device.exists() {
                Ok(None)
            } else {
                Err(Error::io(
                    e,
                    &format!(
                        "cannot tell whether block device {major}:{minor} is a dm device \
                         ({} is missing: is sysfs mounted?)",
                        device.display()
                    ),
                ))
            }
        }
        Err(e) => Err(Error::io(e, "read the dm name").with_path(&file)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;

    // ---- helpers: a kernel's view of our buffers --------------------------

    fn u32_of(n: usize) -> u32 {
        u32::try_from(n).unwrap()
    }

    fn ne32(buf: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap())
    }

    fn ne64(buf: &[u8], at: usize) -> u64 {
        u64::from_ne_bytes(buf[at..at + 8].try_into().unwrap())
    }

    fn set32(buf: &mut [u8], at: usize, v: u32) {
        buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
    }

    fn set64(buf: &mut [u8], at: usize, v: u64) {
        buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
    }

    fn cstr(buf: &[u8], at: usize) -> String {
        let end = at + buf[at..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8(buf[at..end].to_vec()).unwrap()
    }

    /// The kernel's populate_table (drivers/md/dm-ioctl.c, current): every
    /// check it makes on a DM_TABLE_LOAD buffer, then the targets.
    fn kernel_populate_table(buf: &[u8]) -> std::result::Result<Vec<Target>, String> {
        let end = ne32(buf, OFF_DATA_SIZE) as usize;
        if end > buf.len() {
            return Err("data_size past the buffer".into());
        }
        let count = ne32(buf, OFF_TARGET_COUNT);
        if count == 0 {
            return Err("no targets specified".into());
        }
        let mut spec = 0usize; // "last", starting at the header
        let mut next = ne32(buf, OFF_DATA_START) as usize;
        let mut min_size = DM_IOCTL_SIZE;
        let mut targets = Vec::new();
        for _ in 0..count {
            if next < min_size {
                return Err(format!("next {next} overlaps previous"));
            }
            let remaining = end - spec;
            if remaining - DM_TARGET_SPEC_SIZE <= next {
                return Err("target spec extends beyond end of parameters".into());
            }
            if !next.is_multiple_of(8) {
                return Err(format!("next {next} not 8-byte aligned"));
            }
            spec += next;
            let params = spec + DM_TARGET_SPEC_SIZE;
            let nul = params
                + buf[params..end]
                    .iter()
                    .position(|&b| b == 0)
                    .ok_or("params not NUL-terminated")?;
            min_size = nul - spec + 1;
            targets.push(Target {
                start: ne64(buf, spec),
                length: ne64(buf, spec + 8),
                kind: cstr(&buf[spec + 24..spec + 40], 0),
                params: cstr(buf, params),
            });
            next = ne32(buf, spec + SPEC_NEXT) as usize;
        }
        Ok(targets)
    }

    /// An answer header as the kernel writes it.
    fn answer_header(len: usize, name: &str, flags: u32) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        set32(&mut buf, 0, 4);
        set32(&mut buf, 4, 47);
        set32(&mut buf, 8, 0);
        set32(&mut buf, OFF_DATA_SIZE, u32_of(DM_IOCTL_SIZE));
        set32(&mut buf, OFF_DATA_START, u32_of(DM_IOCTL_SIZE));
        set32(&mut buf, OFF_FLAGS, flags);
        buf[OFF_NAME..OFF_NAME + name.len()].copy_from_slice(name.as_bytes());
        buf
    }

    /// The kernel's retrieve_status into a `len`-byte buffer: specs from
    /// data_start, next from the first spec, data_size = bytes used
    /// (unaligned), the last next past it.
    fn status_answer(len: usize, name: &str, targets: &[Target]) -> Vec<u8> {
        let mut buf = answer_header(len, name, DM_ACTIVE_PRESENT_FLAG);
        let base = DM_IOCTL_SIZE;
        let mut out = base;
        let mut used = base;
        for t in targets {
            if len - out <= DM_TARGET_SPEC_SIZE {
                let flags = ne32(&buf, OFF_FLAGS) | DM_BUFFER_FULL_FLAG;
                set32(&mut buf, OFF_FLAGS, flags);
                break;
            }
            let spec = out;
            set64(&mut buf, spec, t.start);
            set64(&mut buf, spec + 8, t.length);
            buf[spec + 24..spec + 24 + t.kind.len()].copy_from_slice(t.kind.as_bytes());
            out += DM_TARGET_SPEC_SIZE;
            let remaining = len - out;
            if t.params.len() + 1 >= remaining {
                let flags = ne32(&buf, OFF_FLAGS) | DM_BUFFER_FULL_FLAG;
                set32(&mut buf, OFF_FLAGS, flags);
                break;
            }
            buf[out..out + t.params.len()].copy_from_slice(t.params.as_bytes());
            out += t.params.len() + 1;
            used = out;
            out = (out + 7) & !7;
            set32(&mut buf, spec + SPEC_NEXT, u32_of(out - base));
        }
        set32(&mut buf, OFF_DATA_SIZE, u32_of(used));
        set32(&mut buf, OFF_TARGET_COUNT, u32_of(targets.len()));
        buf
    }

    /// The kernel's list_devices (current: event_nr and flags after each
    /// name).
    fn names_answer(devices: &[(&str, u32, u32)]) -> Vec<u8> {
        let mut buf = answer_header(MIN_BUFFER, "", 0);
        let base = DM_IOCTL_SIZE;
        let mut at = base;
        let mut previous: Option<usize> = None;
        for (name, major, minor) in devices {
            if let Some(p) = previous {
                set32(&mut buf, p + 8, u32_of(at - p));
            }
            set64(&mut buf, at, encode_dev(*major, *minor));
            set32(&mut buf, at + 8, 0);
            buf[at + 12..at + 12 + name.len()].copy_from_slice(name.as_bytes());
            previous = Some(at);
            let event_nr = (at + 12 + name.len() + 1 + 7) & !7;
            set32(&mut buf, event_nr, 3);
            set32(&mut buf, event_nr + 4, 0);
            at = event_nr + 8;
        }
        set32(&mut buf, OFF_DATA_SIZE, u32_of(at));
        buf
    }

    fn two_targets() -> Vec<Target> {
        vec![
            Target::linear(0, 2048, 8, 16, 2048),
            Target::new(2048, 4096, "log-writes", "8:32 8:48"),
        ]
    }

    // ---- layout and numbers -----------------------------------------------

    #[test]
    fn layout_matches_the_header() {
        assert_eq!(size_of::<DmIoctl>(), 312);
        assert_eq!(offset_of!(DmIoctl, data_size), 12);
        assert_eq!(offset_of!(DmIoctl, data_start), 16);
        assert_eq!(offset_of!(DmIoctl, target_count), 20);
        assert_eq!(offset_of!(DmIoctl, open_count), 24);
        assert_eq!(offset_of!(DmIoctl, flags), 28);
        assert_eq!(offset_of!(DmIoctl, event_nr), 32);
        assert_eq!(offset_of!(DmIoctl, dev), 40);
        assert_eq!(offset_of!(DmIoctl, name), 48);
        assert_eq!(offset_of!(DmIoctl, uuid), 176);
        assert_eq!(offset_of!(DmIoctl, data), 305);
        assert_eq!(size_of::<DmTargetSpec>(), 40);
        assert_eq!(offset_of!(DmTargetSpec, next), 20);
        assert_eq!(offset_of!(DmTargetSpec, target_type), 24);
        assert_eq!(size_of::<DmTargetMsg>(), 8);
    }

    #[test]
    fn flags_and_commands_match_the_header() {
        let flags = [
            (DM_READONLY_FLAG, 0x1),
            (DM_SUSPEND_FLAG, 0x2),
            (DM_PERSISTENT_DEV_FLAG, 0x8),
            (DM_STATUS_TABLE_FLAG, 0x10),
            (DM_ACTIVE_PRESENT_FLAG, 0x20),
            (DM_INACTIVE_PRESENT_FLAG, 0x40),
            (DM_BUFFER_FULL_FLAG, 0x100),
            (DM_SKIP_BDGET_FLAG, 0x200),
            (DM_SKIP_LOCKFS_FLAG, 0x400),
            (DM_NOFLUSH_FLAG, 0x800),
            (DM_QUERY_INACTIVE_TABLE_FLAG, 0x1000),
            (DM_UEVENT_GENERATED_FLAG, 0x2000),
            (DM_UUID_FLAG, 0x4000),
            (DM_SECURE_DATA_FLAG, 0x8000),
            (DM_DATA_OUT_FLAG, 0x1_0000),
            (DM_DEFERRED_REMOVE, 0x2_0000),
            (DM_INTERNAL_SUSPEND_FLAG, 0x4_0000),
            (DM_IMA_MEASUREMENT_FLAG, 0x8_0000),
        ];
        for (flag, value) in flags {
            assert_eq!(flag, value);
        }
        let commands = [
            DM_VERSION_CMD,
            DM_REMOVE_ALL_CMD,
            DM_LIST_DEVICES_CMD,
            DM_DEV_CREATE_CMD,
            DM_DEV_REMOVE_CMD,
            DM_DEV_RENAME_CMD,
            DM_DEV_SUSPEND_CMD,
            DM_DEV_STATUS_CMD,
            DM_DEV_WAIT_CMD,
            DM_TABLE_LOAD_CMD,
            DM_TABLE_CLEAR_CMD,
            DM_TABLE_DEPS_CMD,
            DM_TABLE_STATUS_CMD,
            DM_LIST_VERSIONS_CMD,
            DM_TARGET_MSG_CMD,
            DM_DEV_SET_GEOMETRY_CMD,
            DM_DEV_ARM_POLL_CMD,
            DM_GET_TARGET_VERSION_CMD,
        ];
        for (i, cmd) in commands.into_iter().enumerate() {
            assert_eq!(cmd as usize, i, "{}", command_name(cmd));
        }
    }

    /// The generic `_IOC` encoding: dir 3 (read|write) << 30, size << 16,
    /// type << 8, nr: 0xc138fdNN.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    #[test]
    fn ioctl_numbers() {
        assert_eq!(ioctl_number(DM_VERSION_CMD) as u64, 0xc138_fd00);
        assert_eq!(ioctl_number(DM_DEV_CREATE_CMD) as u64, 0xc138_fd03);
        assert_eq!(ioctl_number(DM_DEV_SUSPEND_CMD) as u64, 0xc138_fd06);
        assert_eq!(ioctl_number(DM_TABLE_LOAD_CMD) as u64, 0xc138_fd09);
        assert_eq!(ioctl_number(DM_TABLE_STATUS_CMD) as u64, 0xc138_fd0c);
        assert_eq!(ioctl_number(DM_TARGET_MSG_CMD) as u64, 0xc138_fd0e);
    }

    #[test]
    fn device_numbers() {
        assert_eq!(encode_dev(253, 0), 0xfd00);
        assert_eq!(encode_dev(253, 3), 0xfd03);
        assert_eq!(encode_dev(43, 0), 0x2b00);
        // minor bits 8.. go to 20..
        assert_eq!(encode_dev(253, 256), 0x10_fd00);
        assert_eq!(encode_dev(259, 0x1_2345), 0x1231_0345);
        for (major, minor) in [(0, 0), (253, 0), (253, 300), (4095, 0xf_ffff), (43, 17)] {
            assert_eq!(decode_dev(encode_dev(major, minor)), (major, minor));
        }
    }

    // ---- encoding ---------------------------------------------------------

    #[test]
    fn header_golden_bytes() {
        let request = Request {
            flags: DM_SUSPEND_FLAG | DM_SECURE_DATA_FLAG,
            target_count: 7,
            ..Request::named("vg-data")
        };
        let buf = request.encode(DM_DEV_SUSPEND_CMD).unwrap();
        assert_eq!(buf.len(), DM_IOCTL_SIZE);
        assert_eq!(ne32(&buf, 0), 4);
        assert_eq!(ne32(&buf, 4), 0);
        assert_eq!(ne32(&buf, 8), 0);
        assert_eq!(ne32(&buf, 12), 312, "data_size");
        assert_eq!(ne32(&buf, 16), 312, "data_start");
        assert_eq!(ne32(&buf, 20), 7, "target_count");
        assert_eq!(ne32(&buf, 24), 0, "open_count");
        assert_eq!(ne32(&buf, 28), 0x8002, "flags");
        assert_eq!(ne32(&buf, 32), 0, "event_nr: no udev cookie");
        assert_eq!(ne32(&buf, 36), 0, "padding");
        assert_eq!(ne64(&buf, 40), 0, "dev");
        assert_eq!(&buf[48..56], b"vg-data\0");
        assert!(buf[56..176].iter().all(|&b| b == 0));
        assert!(buf[176..].iter().all(|&b| b == 0), "uuid and data");

        let created = Request {
            uuid: "FERRY-base-1".into(),
            min_size: 1000,
            ..Request::named("base")
        }
        .encode(DM_DEV_CREATE_CMD)
        .unwrap();
        assert_eq!(created.len(), 1000);
        assert_eq!(ne32(&created, 12), 1000);
        assert_eq!(&created[176..189], b"FERRY-base-1\0");

        let message = Request::named("lw").encode(DM_TARGET_MSG_CMD).unwrap();
        assert_eq!([ne32(&message, 0), ne32(&message, 4)], [4, 2]);

        // Buffers are padded to 8 bytes and data_size covers the padding.
        let odd = Request {
            payload: vec![1, 2, 3],
            ..Request::named("x")
        }
        .encode(DM_TABLE_LOAD_CMD)
        .unwrap();
        assert_eq!(odd.len(), 320);
        assert_eq!(ne32(&odd, 12), 320);
        assert_eq!(&odd[312..320], &[1, 2, 3, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn names_and_uuids_are_checked() {
        let longest = "n".repeat(127);
        assert!(Request::named(&longest).encode(DM_DEV_STATUS_CMD).is_ok());
        let buf = Request::named(&longest).encode(DM_DEV_STATUS_CMD).unwrap();
        assert_eq!(buf[48 + 127], 0, "the NUL fits");
        let e = Request::named(&"n".repeat(128))
            .encode(DM_DEV_STATUS_CMD)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("at most 127"), "{e}");
        assert!(Request::named("a\0b").encode(DM_DEV_STATUS_CMD).is_err());
        assert!(Request::named("a/b").encode(DM_DEV_STATUS_CMD).is_err());
        let uuid = |u: String| Request {
            uuid: u,
            ..Request::named("x")
        };
        assert!(uuid("u".repeat(128)).encode(DM_DEV_CREATE_CMD).is_ok());
        assert!(uuid("u".repeat(129)).encode(DM_DEV_CREATE_CMD).is_err());
        assert!(uuid("u\0".into()).encode(DM_DEV_CREATE_CMD).is_err());
    }

    #[test]
    fn target_specs_golden_bytes() {
        let (count, payload) = encode_targets(&two_targets()).unwrap();
        assert_eq!(count, 2);
        // Spec 0: 40 + "8:16 2048\0" (10) = 50 -> next 56.
        assert_eq!(ne64(&payload, 0), 0);
        assert_eq!(ne64(&payload, 8), 2048);
        assert_eq!(ne32(&payload, 16), 0, "status");
        assert_eq!(ne32(&payload, 20), 56, "next, from this spec");
        assert_eq!(&payload[24..40], b"linear\0\0\0\0\0\0\0\0\0\0");
        assert_eq!(&payload[40..50], b"8:16 2048\0");
        assert!(payload[50..56].iter().all(|&b| b == 0), "padding");
        // Spec 1 at 56: 40 + "8:32 8:48\0" (10) -> next 56 again.
        assert_eq!(ne64(&payload, 56), 2048);
        assert_eq!(ne64(&payload, 64), 4096);
        assert_eq!(ne32(&payload, 56 + 20), 56);
        assert_eq!(&payload[56 + 24..56 + 35], b"log-writes\0");
        assert_eq!(&payload[96..106], b"8:32 8:48\0");
        assert_eq!(payload.len(), 112);
        // Parameters of exactly 7 bytes end on the boundary: 40 + 8 = 48.
        let (_, exact) = encode_targets(&[Target::new(0, 1, "zero", "1234567")]).unwrap();
        assert_eq!(ne32(&exact, 20), 48);
        assert_eq!(exact.len(), 48);
    }

    #[test]
    fn loads_pass_the_kernels_checks() {
        let tables = [
            two_targets(),
            vec![Target::new(0, 8, "error", "")],
            vec![Target::linear(0, 1 << 40, 43, 0, 0)],
            (0..50)
                .map(|i| Target::linear(i * 100, 100, 8, u32::try_from(i).unwrap(), i * 7))
                .collect(),
        ];
        for table in tables {
            let (count, payload) = encode_targets(&table).unwrap();
            let request = Request {
                target_count: count,
                payload,
                min_size: MIN_BUFFER,
                ..Request::named("vol")
            };
            let buf = request.encode(DM_TABLE_LOAD_CMD).unwrap();
            assert_eq!(kernel_populate_table(&buf).unwrap(), table);
            // Without the slack of min_size, too.
            let tight = Request {
                min_size: 0,
                ..request
            }
            .encode(DM_TABLE_LOAD_CMD)
            .unwrap();
            assert_eq!(kernel_populate_table(&tight).unwrap(), table);
        }
    }

    #[test]
    fn bad_targets_are_refused() {
        assert!(encode_targets(&[]).is_err());
        let nul = encode_targets(&[Target::new(0, 8, "linear", "8:0\0 0")]).unwrap_err();
        assert_eq!(nul.kind(), ErrorKind::Config);
        assert!(nul.to_string().contains("NUL"), "{nul}");
        assert!(encode_targets(&[Target::new(0, 8, "", "x")]).is_err());
        assert!(encode_targets(&[Target::new(0, 8, "a-sixteen-chars!", "x")]).is_err());
        assert!(encode_targets(&[Target::new(0, 8, "fifteen-chars!!", "x")]).is_ok());
        assert!(encode_targets(&[Target::new(0, 8, "li\0near", "x")]).is_err());
    }

    #[test]
    fn message_payload() {
        let payload = encode_message(4096, "mark ferry-1").unwrap();
        assert_eq!(ne64(&payload, 0), 4096);
        assert_eq!(&payload[8..], b"mark ferry-1\0");
        assert!(encode_message(0, "").is_err());
        assert!(encode_message(0, "  ").is_err());
        assert!(encode_message(0, "mark\0x").is_err());
    }

    #[test]
    fn table_sizes() {
        assert_eq!(table_size(&two_targets()).unwrap(), 6144);
        assert_eq!(table_size(&[Target::linear(0, 7, 1, 2, 0)]).unwrap(), 7);
        assert!(table_size(&[]).is_err());
        let gap = [Target::linear(0, 8, 1, 2, 0), Target::linear(9, 8, 1, 2, 0)];
        assert!(table_size(&gap)
            .unwrap_err()
            .to_string()
            .contains("contiguous"));
        let overlap = [Target::linear(0, 8, 1, 2, 0), Target::linear(4, 8, 1, 2, 0)];
        assert!(table_size(&overlap).is_err());
        assert!(table_size(&[Target::linear(1, 8, 1, 2, 0)]).is_err());
        assert!(table_size(&[Target::linear(0, 0, 1, 2, 0)]).is_err());
        let huge = [
            Target::linear(0, u64::MAX, 1, 2, 0),
            Target::linear(u64::MAX, 1, 1, 2, 0),
        ];
        assert!(table_size(&huge).is_err());
    }

    #[test]
    fn targets_display_as_table_lines() {
        assert_eq!(
            Target::linear(0, 2097152, 43, 0, 0).to_string(),
            "0 2097152 linear 43:0 0"
        );
        assert_eq!(Target::new(0, 8, "error", "").to_string(), "0 8 error");
    }

    // ---- decoding ---------------------------------------------------------

    #[test]
    fn decodes_a_table_status_answer() {
        let buf = status_answer(MIN_BUFFER, "vg-data", &two_targets());
        // The kernel's layout: next from the first spec, data_size unaligned.
        assert_eq!(ne32(&buf, DM_IOCTL_SIZE + SPEC_NEXT), 56);
        assert_eq!(ne32(&buf, OFF_DATA_SIZE) as usize, DM_IOCTL_SIZE + 56 + 50);
        assert_eq!(decode_targets(&buf).unwrap(), two_targets());
    }

    #[test]
    fn decodes_an_empty_table() {
        let buf = answer_header(MIN_BUFFER, "new", 0);
        assert_eq!(decode_targets(&buf).unwrap(), vec![]);
    }

    #[test]
    fn a_sixteen_byte_target_type_without_nul_is_read() {
        // Old kernels strncpy'd all 16 bytes.
        let mut buf = status_answer(MIN_BUFFER, "v", &[Target::new(0, 8, "x", "p")]);
        buf[DM_IOCTL_SIZE + 24..DM_IOCTL_SIZE + 40].copy_from_slice(b"abcdefghijklmnop");
        assert_eq!(decode_targets(&buf).unwrap()[0].kind, "abcdefghijklmnop");
    }

    #[test]
    fn garbled_table_answers_are_errors() {
        let good = status_answer(MIN_BUFFER, "vg-data", &two_targets());
        let first_next = DM_IOCTL_SIZE + SPEC_NEXT;
        let data_size = ne32(&good, OFF_DATA_SIZE);

        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut b = good.clone();
        set32(&mut b, first_next, 10_000);
        cases.push(("next past the payload", b));
        let mut b = good.clone();
        set32(&mut b, first_next, 0);
        cases.push(("next pointing back", b));
        let mut b = good.clone();
        set32(&mut b, first_next, 20);
        cases.push(("next inside the spec", b));
        let mut b = good.clone();
        set32(&mut b, OFF_DATA_SIZE, data_size - 1);
        cases.push(("last NUL cut off", b));
        let mut b = good.clone();
        set32(&mut b, OFF_DATA_SIZE, u32_of(DM_IOCTL_SIZE) + 30);
        cases.push(("spec cut off", b));
        let mut b = good.clone();
        set32(&mut b, OFF_TARGET_COUNT, 3);
        cases.push(("more targets than sent", b));
        let mut b = good.clone();
        set32(&mut b, OFF_TARGET_COUNT, u32::MAX);
        cases.push(("huge count", b));
        let mut b = good.clone();
        set32(&mut b, OFF_DATA_SIZE, u32_of(MIN_BUFFER) + 8);
        cases.push(("data_size past the buffer", b));
        let mut b = good.clone();
        set32(&mut b, OFF_DATA_START, data_size + 1);
        cases.push(("data_start past data_size", b));
        let mut b = good.clone();
        set32(&mut b, OFF_DATA_START, 8);
        cases.push(("data_start inside the header", b));
        let mut b = good.clone();
        set32(&mut b, OFF_FLAGS, DM_BUFFER_FULL_FLAG);
        cases.push(("buffer full", b));
        let mut b = good.clone();
        set32(&mut b, 0, 5);
        cases.push(("version 5", b));
        let mut b = good.clone();
        b[DM_IOCTL_SIZE + 40] = 0xff;
        cases.push(("params not UTF-8", b));
        let mut b = good.clone();
        b[OFF_NAME..OFF_NAME + DM_NAME_LEN].fill(b'a');
        cases.push(("name not NUL-terminated", b));
        cases.push(("shorter than the header", good[..300].to_vec()));
        cases.push(("empty", Vec::new()));
        for (what, buf) in cases {
            let e = decode_targets(&buf).expect_err(what);
            assert_eq!(e.kind(), ErrorKind::Io, "{what}");
            assert!(
                e.to_string().starts_with("malformed dm ioctl answer"),
                "{what}: {e}"
            );
        }
    }

    #[test]
    fn decodes_device_info() {
        let mut buf = answer_header(DM_IOCTL_SIZE, "vg-data", 0);
        set32(
            &mut buf,
            OFF_FLAGS,
            DM_SUSPEND_FLAG
                | DM_ACTIVE_PRESENT_FLAG
                | DM_INACTIVE_PRESENT_FLAG
                | DM_UEVENT_GENERATED_FLAG,
        );
        set32(&mut buf, OFF_OPEN_COUNT, 1);
        set32(&mut buf, OFF_TARGET_COUNT, 2);
        set32(&mut buf, OFF_EVENT_NR, 9);
        set64(&mut buf, OFF_DEV, encode_dev(253, 300));
        buf[OFF_UUID..OFF_UUID + 8].copy_from_slice(b"LVM-abcd");
        assert_eq!(
            decode_info(&buf).unwrap(),
            DeviceInfo {
                name: "vg-data".into(),
                uuid: Some("LVM-abcd".into()),
                major: 253,
                minor: 300,
                open_count: 1,
                suspended: true,
                read_only: false,
                live_table: true,
                inactive_table: true,
                target_count: 2,
                event_nr: 9,
            }
        );
        set32(&mut buf, OFF_FLAGS, DM_READONLY_FLAG);
        buf[OFF_UUID] = 0;
        let info = decode_info(&buf).unwrap();
        assert!(info.read_only && !info.suspended && !info.live_table && !info.inactive_table);
        assert_eq!(info.uuid, None);
        assert!(decode_info(&buf[..311]).is_err());
    }

    #[test]
    fn decodes_device_lists() {
        let devices = [
            ("vg-root", 253, 0),
            ("a", 253, 1),
            ("base-vg-data", 253, 300),
        ];
        let buf = names_answer(&devices);
        let listed = decode_names(&buf).unwrap();
        let got: Vec<_> = listed
            .iter()
            .map(|d| (d.name.as_str(), d.major, d.minor))
            .collect();
        assert_eq!(got, devices);

        // No devices: the kernel leaves data_size at data_start.
        let empty = names_answer(&[]);
        assert_eq!(ne32(&empty, OFF_DATA_SIZE), ne32(&empty, OFF_DATA_START));
        assert_eq!(decode_names(&empty).unwrap(), vec![]);
        // Or a first record with dev 0.
        let mut zero = answer_header(MIN_BUFFER, "", 0);
        set32(&mut zero, OFF_DATA_SIZE, u32_of(DM_IOCTL_SIZE) + 16);
        assert_eq!(decode_names(&zero).unwrap(), vec![]);
    }

    #[test]
    fn garbled_device_lists_are_errors() {
        let good = names_answer(&[("vg-root", 253, 0), ("a", 253, 1)]);
        let first_next = DM_IOCTL_SIZE + NAME_LIST_NEXT;
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut b = good.clone();
        set32(&mut b, first_next, 4);
        cases.push(("next inside the record", b));
        let mut b = good.clone();
        set32(&mut b, first_next, 9_000);
        cases.push(("next past the payload", b));
        let mut b = good.clone();
        set32(&mut b, OFF_DATA_SIZE, u32_of(DM_IOCTL_SIZE) + 16);
        cases.push(("name cut off", b));
        let mut b = good.clone();
        set32(&mut b, OFF_FLAGS, DM_BUFFER_FULL_FLAG);
        cases.push(("buffer full", b));
        let mut b = good.clone();
        let name_at = DM_IOCTL_SIZE + 12;
        let end = ne32(&b, OFF_DATA_SIZE) as usize;
        b[name_at..end].fill(b'x');
        cases.push(("no NUL", b));
        for (what, buf) in cases {
            assert!(decode_names(&buf).is_err(), "{what}");
        }
    }

    fn mutated(base: &[u8], edits: &[(usize, u8)], keep: usize) -> Vec<u8> {
        let mut buf = base.to_vec();
        for &(at, byte) in edits {
            if let Some(b) = buf.get_mut(at) {
                *b = byte;
            }
        }
        buf.truncate(keep);
        buf
    }

    proptest! {
        /// Flipped bytes (mostly in the header and the first records) and
        /// truncation: decoding answers or refuses, never panics.
        #[test]
        fn decoding_never_panics(
            edits in proptest::collection::vec((0usize..520, any::<u8>()), 0..12),
            keep in 0usize..600,
        ) {
            let status = status_answer(512, "vg-data", &two_targets());
            let _ = decode_targets(&mutated(&status, &edits, keep));
            let _ = decode_targets(&mutated(&status, &edits, usize::MAX));
            let names = names_answer(&[("vg-root", 253, 0), ("a", 253, 1)]);
            let _ = decode_names(&mutated(&names, &edits, keep));
            let _ = decode_names(&mutated(&names, &edits, usize::MAX));
            let _ = decode_info(&mutated(&status, &edits, keep));
        }

        #[test]
        fn encoded_tables_decode_back(
            lengths in proptest::collection::vec(1u64..1 << 40, 1..20),
            params in proptest::collection::vec("[ -~]{0,40}", 20),
        ) {
            let mut start = 0;
            let table: Vec<Target> = lengths
                .iter()
                .zip(&params)
                .map(|(&length, p)| {
                    let t = Target::new(start, length, "linear", p.clone());
                    start += length;
                    t
                })
                .collect();
            let (count, payload) = encode_targets(&table).unwrap();
            let buf = Request { target_count: count, payload, ..Request::named("p") }
                .encode(DM_TABLE_LOAD_CMD)
                .unwrap();
            prop_assert_eq!(kernel_populate_table(&buf).unwrap(), table.clone());
            let answer = status_answer(MIN_BUFFER, "p", &table);
            prop_assert_eq!(decode_targets(&answer).unwrap(), table);
        }
    }

    // ---- the commands, against a fake kernel -------------------------------

    type Reply = Box<dyn Fn(u32, &[u8]) -> io::Result<Vec<u8>>>;

    /// Records each request's bytes and answers with `reply`, as the kernel
    /// would: the answer is copied back over the request buffer.
    struct FakeKernel {
        calls: RefCell<Vec<(u32, Vec<u8>)>>,
        reply: Reply,
    }

    impl FakeKernel {
        fn new(reply: impl Fn(u32, &[u8]) -> io::Result<Vec<u8>> + 'static) -> FakeKernel {
            FakeKernel {
                calls: RefCell::new(Vec::new()),
                reply: Box::new(reply),
            }
        }

        /// Answers every command with a status header for `name`.
        fn ok(name: &'static str) -> FakeKernel {
            FakeKernel::new(move |_, request| {
                let mut answer = answer_header(request.len(), name, DM_ACTIVE_PRESENT_FLAG);
                set64(&mut answer, OFF_DEV, encode_dev(253, 4));
                Ok(answer)
            })
        }

        fn calls(&self) -> Vec<(u32, Vec<u8>)> {
            self.calls.borrow().clone()
        }
    }

    impl Transport for FakeKernel {
        fn call(&self, cmd: u32, buffer: &mut Buffer) -> io::Result<()> {
            let request = buffer.to_bytes();
            assert_eq!(buffer.words.as_ptr() as usize % 8, 0, "8-byte aligned");
            let data_size = ne32(&request, OFF_DATA_SIZE) as usize;
            assert!(data_size >= DM_IOCTL_MIN_SIZE && data_size <= request.len());
            self.calls.borrow_mut().push((cmd, request.clone()));
            let mut answer = (self.reply)(cmd, &request)?;
            assert!(
                answer.len() <= request.len(),
                "the kernel writes within data_size"
            );
            answer.resize(request.len(), 0);
            *buffer = Buffer::from_bytes(&answer);
            Ok(())
        }
    }

    #[test]
    fn simple_commands_send_the_right_requests() {
        let kernel = FakeKernel::ok("vol");
        let created = create(&kernel, "vol", Some("FERRY-1")).unwrap();
        assert_eq!(
            (created.name.as_str(), created.major, created.minor),
            ("vol", 253, 4)
        );
        suspend(&kernel, "vol").unwrap();
        let resumed = resume(&kernel, "vol").unwrap();
        assert!(resumed.live_table);
        info(&kernel, "vol").unwrap();
        clear(&kernel, "vol").unwrap();
        remove(&kernel, "vol", 0, Duration::ZERO).unwrap();
        let calls = kernel.calls();
        let cmds: Vec<u32> = calls.iter().map(|(cmd, _)| *cmd).collect();
        assert_eq!(
            cmds,
            [
                DM_DEV_CREATE_CMD,
                DM_DEV_SUSPEND_CMD,
                DM_DEV_SUSPEND_CMD,
                DM_DEV_STATUS_CMD,
                DM_TABLE_CLEAR_CMD,
                DM_DEV_REMOVE_CMD
            ]
        );
        for (_, request) in &calls {
            assert_eq!(cstr(request, OFF_NAME), "vol");
            assert_eq!(ne32(request, OFF_EVENT_NR), 0, "no udev cookie");
            assert_eq!(ne32(request, 0), 4);
        }
        assert_eq!(cstr(&calls[0].1, OFF_UUID), "FERRY-1");
        assert_eq!(cstr(&calls[1].1, OFF_UUID), "", "lookups by name only");
        // Suspend flushes and freezes: no NOFLUSH, no SKIP_LOCKFS.
        assert_eq!(ne32(&calls[1].1, OFF_FLAGS), DM_SUSPEND_FLAG);
        // Resume: no flags at all.
        assert_eq!(ne32(&calls[2].1, OFF_FLAGS), 0);
        assert!(create(&kernel, "", None).is_err());
        assert!(create(&kernel, "vol", Some("")).is_err());
        assert!(suspend(&kernel, "").is_err());
    }

    #[test]
    fn load_sends_a_table_the_kernel_accepts() {
        let kernel = FakeKernel::ok("vol");
        let table = [Target::linear(0, 2_097_152, 43, 0, 0)];
        load(&kernel, "vol", &table).unwrap();
        let (cmd, request) = kernel.calls().remove(0);
        assert_eq!(cmd, DM_TABLE_LOAD_CMD);
        assert_eq!(
            ne32(&request, OFF_FLAGS),
            DM_SECURE_DATA_FLAG,
            "read-write, wiped"
        );
        assert_eq!(request.len(), MIN_BUFFER);
        assert_eq!(kernel_populate_table(&request).unwrap(), table);
        // A gap is refused before any ioctl.
        let gap = [
            Target::linear(0, 8, 43, 0, 0),
            Target::linear(16, 8, 43, 0, 0),
        ];
        assert!(load(&kernel, "vol", &gap).is_err());
        assert_eq!(kernel.calls().len(), 1);
    }

    #[test]
    fn table_reads_the_live_table_and_grows_the_buffer() {
        // 300 targets with long parameters need more than 16 KiB.
        let table: Vec<Target> = (0..300u64)
            .map(|i| Target::new(i * 8, 8, "linear", format!("{}:{} {:040}", 8, i, i)))
            .collect();
        let expected = table.clone();
        let kernel = FakeKernel::new(move |cmd, request| {
            assert_eq!(cmd, DM_TABLE_STATUS_CMD);
            Ok(status_answer(request.len(), "vol", &table))
        });
        assert_eq!(self::table(&kernel, "vol").unwrap(), expected);
        let calls = kernel.calls();
        let sizes: Vec<usize> = calls.iter().map(|(_, r)| r.len()).collect();
        assert_eq!(sizes, [MIN_BUFFER, 2 * MIN_BUFFER]);
        for (_, request) in &calls {
            let flags = ne32(request, OFF_FLAGS);
            assert_eq!(flags, DM_STATUS_TABLE_FLAG | DM_SECURE_DATA_FLAG);
            assert_eq!(flags & DM_QUERY_INACTIVE_TABLE_FLAG, 0, "the live table");
        }
    }

    #[test]
    fn table_gives_up_on_an_ever_full_answer() {
        let kernel = FakeKernel::new(|_, request| {
            Ok(answer_header(request.len(), "vol", DM_BUFFER_FULL_FLAG))
        });
        let e = table(&kernel, "vol").unwrap_err();
        assert!(e.to_string().contains("does not fit"), "{e}");
        let last = kernel.calls().last().unwrap().1.len();
        assert_eq!(last, MAX_BUFFER);
    }

    #[test]
    fn message_and_list_requests() {
        let kernel = FakeKernel::ok("lw");
        message(&kernel, "lw", 0, "mark ferry-7").unwrap();
        let (cmd, request) = kernel.calls().remove(0);
        assert_eq!(cmd, DM_TARGET_MSG_CMD);
        assert_eq!([ne32(&request, 0), ne32(&request, 4)], [4, 2]);
        assert_eq!(ne32(&request, OFF_DATA_START) as usize, DM_IOCTL_SIZE);
        assert_eq!(ne64(&request, DM_IOCTL_SIZE), 0);
        assert_eq!(cstr(&request, DM_IOCTL_SIZE + 8), "mark ferry-7");
        assert!(message(&kernel, "lw", 0, "").is_err());

        let lister = FakeKernel::new(|_, _| Ok(names_answer(&[("vg-root", 253, 0)])));
        let listed = list(&lister).unwrap();
        assert_eq!(listed[0].name, "vg-root");
        let (cmd, request) = lister.calls().remove(0);
        assert_eq!(cmd, DM_LIST_DEVICES_CMD);
        assert_eq!(request[OFF_NAME], 0, "no name: newer kernels filter by it");

        let versions = FakeKernel::ok("");
        assert_eq!(version(&versions).unwrap(), (4, 47, 0));
    }

    #[test]
    fn kernel_errors_carry_the_command_and_the_errno() {
        let kernel = FakeKernel::new(|_, _| Err(io::Error::from_raw_os_error(libc::ENXIO)));
        let e = info(&kernel, "gone").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(is_no_such_device(&e));
        let text = e.to_string();
        assert!(text.contains("DM_DEV_STATUS gone"), "{text}");
        assert!(text.contains("no such dm device"), "{text}");
        assert!(!is_no_such_device(&Error::config("x")));

        let denied = FakeKernel::new(|_, _| Err(io::Error::from_raw_os_error(libc::EACCES)));
        assert!(version(&denied)
            .unwrap_err()
            .to_string()
            .contains("CAP_SYS_ADMIN"));
    }

    #[test]
    fn remove_retries_busy() {
        let busy_left = RefCell::new(2);
        let kernel = FakeKernel::new(move |_, request| {
            let mut left = busy_left.borrow_mut();
            if *left > 0 {
                *left -= 1;
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            Ok(answer_header(request.len(), "base", 0))
        });
        remove(&kernel, "base", 5, Duration::ZERO).unwrap();
        assert_eq!(kernel.calls().len(), 3);

        let always = FakeKernel::new(|_, _| Err(io::Error::from_raw_os_error(libc::EBUSY)));
        let e = remove(&always, "base", 3, Duration::ZERO).unwrap_err();
        assert!(e.to_string().contains("open or in use"), "{e}");
        assert_eq!(always.calls().len(), 4);
    }

    // ---- the real control node, paths -------------------------------------

    #[test]
    fn a_missing_control_node_says_to_load_dm_mod() {
        let e = Control::open_path(Path::new("/nonexistent/ferry/mapper/control")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io);
        assert!(e.to_string().contains("modprobe dm_mod"), "{e}");
    }

    #[test]
    fn buffers_round_trip_and_pad() {
        let bytes: Vec<u8> = (0..13).collect();
        let buffer = Buffer::from_bytes(&bytes);
        assert_eq!(buffer.byte_len(), 16);
        let back = buffer.to_bytes();
        assert_eq!(&back[..13], &bytes[..]);
        assert_eq!(&back[13..], &[0, 0, 0]);
    }

    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("ferry-dm-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn dm_names_from_sysfs() {
        let sys = TempDir::new("sysfs");
        std::fs::create_dir_all(sys.0.join("253:3/dm")).unwrap();
        std::fs::write(sys.0.join("253:3/dm/name"), "vg-data\n").unwrap();
        std::fs::create_dir_all(sys.0.join("8:1")).unwrap();
        assert_eq!(
            dm_name_in(&sys.0, 253, 3).unwrap().as_deref(),
            Some("vg-data")
        );
        assert_eq!(dm_name_in(&sys.0, 8, 1).unwrap(), None, "a partition");
        assert!(dm_name_in(&sys.0, 9, 9).is_err(), "no sysfs entry at all");
    }

    #[test]
    fn name_of_refuses_what_is_not_a_block_device() {
        assert!(name_of(Path::new("/nonexistent/ferry-dm")).is_err());
        let e = name_of(Path::new("/")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("not a block device"), "{e}");
    }

    #[test]
    fn name_of_a_plain_block_device_is_none() {
        // Loop devices are block devices but never dm; skip where absent.
        let loop0 = Path::new("/dev/loop0");
        let is_block = std::fs::metadata(loop0).is_ok_and(|m| m.file_type().is_block_device());
        if is_block && Path::new("/sys/dev/block").exists() {
            assert_eq!(name_of(loop0).unwrap(), None);
        }
    }
}
