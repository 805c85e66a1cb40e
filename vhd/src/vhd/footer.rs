//! The VHD hard disk footer and dynamic disk header.
//!
//! Source: Microsoft "Virtual Hard Disk Image Format Specification" 1.0
//! (2006), sections "Hard Disk Footer Format" and "Dynamic Disk Header
//! Format". All fields are big-endian. Every field offset is a named
//! constant below; encode and decode go through them only.

use crate::error::{Error, Result};
use crate::fileio::bytes::*;

/// Size of the footer (and of its copy at offset 0 in dynamic disks).
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;

// ---- Hard disk footer fields (byte offsets) ----
/// "conectix".
pub const F_COOKIE: usize = 0;
/// Features: bit 1 ("reserved") must always be set.
pub const F_FEATURES: usize = 8;
/// File format version, 0x00010000.
pub const F_VERSION: usize = 12;
/// Absolute offset of the dynamic header; all ones for fixed disks.
pub const F_DATA_OFFSET: usize = 16;
/// Seconds since 2000-01-01 00:00:00 UTC.
pub const F_TIMESTAMP: usize = 24;
/// Creator application, 4 ASCII bytes.
pub const F_CREATOR_APP: usize = 28;
/// Creator version.
pub const F_CREATOR_VERSION: usize = 32;
/// Creator host OS ("Wi2k" or "Mac ").
pub const F_CREATOR_OS: usize = 36;
/// Size of the disk at creation, bytes.
pub const F_ORIGINAL_SIZE: usize = 40;
/// Current virtual size, bytes.
pub const F_CURRENT_SIZE: usize = 48;
/// Geometry: cylinders (u16).
pub const F_CYLINDERS: usize = 56;
/// Geometry: heads (u8).
pub const F_HEADS: usize = 58;
/// Geometry: sectors per track (u8).
pub const F_SECTORS: usize = 59;
/// Disk type: 2 fixed, 3 dynamic, 4 differencing.
pub const F_DISK_TYPE: usize = 60;
/// One's complement of the byte sum of the footer with this field zeroed.
pub const F_CHECKSUM: usize = 64;
/// 16-byte unique id (a UUID); differencing children name their parent by it.
pub const F_UNIQUE_ID: usize = 68;
/// Saved state flag (1 byte).
pub const F_SAVED_STATE: usize = 84;

/// Footer cookie.
pub const COOKIE: &[u8; 8] = b"conectix";
/// Features field: the "reserved" bit that must be set.
pub const FEATURES_RESERVED: u32 = 0x0000_0002;
/// Version 1.0 of the format (footer and header).
pub const VERSION_1_0: u32 = 0x0001_0000;
/// Data offset of a fixed disk.
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// Our creator application tag.
pub const CREATOR_APP: &[u8; 4] = b"fery";
/// Creator host OS "Wi2k": what Hyper-V and qemu write; Azure expects it.
pub const CREATOR_OS_WI2K: u32 = 0x5769_326B;
/// qemu's `force_size` geometry: the maximum CHS, which tells every reader
/// (qemu included) to trust `current_size` instead of CHS arithmetic.
pub const FORCE_SIZE_GEOMETRY: (u16, u8, u8) = (65535, 16, 255);

/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 UTC).
pub const VHD_EPOCH_UNIX: u64 = 946_684_800;

/// VHD disk types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Type 2.
    Fixed,
    /// Type 3.
    Dynamic,
    /// Type 4.
    Differencing,
}

impl DiskType {
    fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
}

/// Decoded hard disk footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Dynamic header offset (or [`NO_DATA_OFFSET`]).
    pub data_offset: u64,
    /// VHD-epoch timestamp.
    pub timestamp: u32,
    /// Creator application tag.
    pub creator_app: [u8; 4],
    /// Creator application version.
    pub creator_version: u32,
    /// Creator host OS.
    pub creator_os: u32,
    /// Size at creation.
    pub original_size: u64,
    /// Virtual size.
    pub current_size: u64,
    /// Cylinders, heads, sectors per track.
    pub geometry: (u16, u8, u8),
    /// Disk type.
    pub disk_type: DiskType,
    /// Unique id.
    pub unique_id: [u8; 16],
}

/// One's complement of the byte sum, skipping the 4 checksum bytes at `skip`.
pub fn checksum(bytes: &[u8], skip: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(skip..skip + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// Current time as a VHD timestamp.
pub fn now_timestamp() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH_UNIX);
    u32::try_from(unix.saturating_sub(VHD_EPOCH_UNIX)).unwrap_or(u32::MAX)
}

impl Footer {
    /// A new footer for a disk of `size` bytes, with a fresh unique id.
    pub fn new(disk_type: DiskType, size: u64, unique_id: [u8; 16]) -> Self {
        Footer {
            data_offset: if disk_type == DiskType::Fixed {
                NO_DATA_OFFSET
            } else {
                512
            },
            timestamp: now_timestamp(),
            creator_app: *CREATOR_APP,
            creator_version: VERSION_1_0,
            creator_os: CREATOR_OS_WI2K,
            original_size: size,
            current_size: size,
            geometry: FORCE_SIZE_GEOMETRY,
            disk_type,
            unique_id,
        }
    }

    /// Encode with a valid checksum.
    pub fn encode(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[F_COOKIE..F_COOKIE + 8].copy_from_slice(COOKIE);
        put_be_u32(&mut b, F_FEATURES, FEATURES_RESERVED);
        put_be_u32(&mut b, F_VERSION, VERSION_1_0);
        put_be_u64(&mut b, F_DATA_OFFSET, self.data_offset);
        put_be_u32(&mut b, F_TIMESTAMP, self.timestamp);
        b[F_CREATOR_APP..F_CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        put_be_u32(&mut b, F_CREATOR_VERSION, self.creator_version);
        put_be_u32(&mut b, F_CREATOR_OS, self.creator_os);
        put_be_u64(&mut b, F_ORIGINAL_SIZE, self.original_size);
        put_be_u64(&mut b, F_CURRENT_SIZE, self.current_size);
        put_be_u16(&mut b, F_CYLINDERS, self.geometry.0);
        b[F_HEADS] = self.geometry.1;
        b[F_SECTORS] = self.geometry.2;
        put_be_u32(&mut b, F_DISK_TYPE, self.disk_type.code());
        b[F_UNIQUE_ID..F_UNIQUE_ID + 16].copy_from_slice(&self.unique_id);
        b[F_SAVED_STATE] = 0;
        let sum = checksum(&b, F_CHECKSUM);
        put_be_u32(&mut b, F_CHECKSUM, sum);
        b
    }

    /// Decode and validate cookie, checksum, disk type and size.
    pub fn decode(b: &[u8; FOOTER_SIZE]) -> Result<Self> {
        if &b[F_COOKIE..F_COOKIE + 8] != COOKIE {
            return Err(Error::corrupt("VHD footer cookie is not \"conectix\""));
        }
        let stored = be_u32(b, F_CHECKSUM);
        let computed = checksum(b, F_CHECKSUM);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "VHD footer checksum {stored:#010x} does not match computed {computed:#010x}"
            ))
            .at_offset(F_CHECKSUM as u64));
        }
        let code = be_u32(b, F_DISK_TYPE);
        let disk_type = DiskType::from_code(code).ok_or_else(|| {
            Error::unsupported(format!("VHD disk type {code} (only 2, 3, 4 exist)"))
                .at_offset(F_DISK_TYPE as u64)
        })?;
        let current_size = be_u64(b, F_CURRENT_SIZE);
        if !current_size.is_multiple_of(512) {
            return Err(Error::corrupt(format!(
                "VHD virtual size {current_size} is not a whole number of sectors"
            ))
            .at_offset(F_CURRENT_SIZE as u64));
        }
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[F_CREATOR_APP..F_CREATOR_APP + 4]);
        let mut unique_id = [0u8; 16];
        unique_id.copy_from_slice(&b[F_UNIQUE_ID..F_UNIQUE_ID + 16]);
        Ok(Footer {
            data_offset: be_u64(b, F_DATA_OFFSET),
            timestamp: be_u32(b, F_TIMESTAMP),
            creator_app,
            creator_version: be_u32(b, F_CREATOR_VERSION),
            creator_os: be_u32(b, F_CREATOR_OS),
            original_size: be_u64(b, F_ORIGINAL_SIZE),
            current_size,
            geometry: (be_u16(b, F_CYLINDERS), b[F_HEADS], b[F_SECTORS]),
            disk_type,
            unique_id,
        })
    }
}

// ---- Dynamic disk header fields (byte offsets) ----
/// "cxsparse".
pub const H_COOKIE: usize = 0;
/// Unused, all ones.
pub const H_DATA_OFFSET: usize = 8;
/// Absolute offset of the block allocation table.
pub const H_TABLE_OFFSET: usize = 16;
/// Header version, 0x00010000.
pub const H_VERSION: usize = 24;
/// Number of BAT entries (blocks in the disk).
pub const H_MAX_TABLE_ENTRIES: usize = 28;
/// Block size in bytes (default 2 MiB), a power of two.
pub const H_BLOCK_SIZE: usize = 32;
/// Header checksum (one's complement of the byte sum).
pub const H_CHECKSUM: usize = 36;
/// Parent's footer unique id (differencing disks).
pub const H_PARENT_UUID: usize = 40;
/// Parent's footer timestamp (differencing disks).
pub const H_PARENT_TIMESTAMP: usize = 56;
/// Parent file name, UTF-16 big-endian, 512 bytes.
pub const H_PARENT_NAME: usize = 64;
/// Length of the parent name field.
pub const H_PARENT_NAME_LEN: usize = 512;
/// Eight parent locator entries of 24 bytes.
pub const H_PARENT_LOCATORS: usize = 576;
/// Number of parent locator entries.
pub const PARENT_LOCATOR_COUNT: usize = 8;
/// Size of one parent locator entry.
pub const PARENT_LOCATOR_SIZE: usize = 24;
// Within a locator entry:
/// Platform code ("W2ku", "W2ru", "MacX", ...).
pub const L_CODE: usize = 0;
/// Space reserved for the locator data (bytes, rounded to sectors).
pub const L_DATA_SPACE: usize = 4;
/// Length of the locator data in bytes.
pub const L_DATA_LENGTH: usize = 8;
/// Absolute file offset of the locator data.
pub const L_DATA_OFFSET: usize = 16;

/// Header cookie.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Default block size: 2 MiB.
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Platform code: absolute Windows path, UTF-16 little-endian.
pub const PLATFORM_W2KU: u32 = u32::from_be_bytes(*b"W2ku");
/// Platform code: relative Windows path, UTF-16 little-endian.
pub const PLATFORM_W2RU: u32 = u32::from_be_bytes(*b"W2ru");
/// Platform code: Mac OS X file URL, UTF-8.
pub const PLATFORM_MACX: u32 = u32::from_be_bytes(*b"MacX");
/// Bound on a locator's data: a path, not a payload.
pub const MAX_LOCATOR_LEN: u32 = 64 * 1024;

/// One parent locator entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code.
    pub code: u32,
    /// Reserved space in bytes.
    pub data_space: u32,
    /// Data length in bytes.
    pub data_length: u32,
    /// Absolute offset of the data.
    pub data_offset: u64,
}

/// Decoded dynamic disk header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicHeader {
    /// BAT offset.
    pub table_offset: u64,
    /// BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes.
    pub block_size: u32,
    /// Parent's unique id.
    pub parent_uuid: [u8; 16],
    /// Parent's footer timestamp.
    pub parent_timestamp: u32,
    /// Parent file name (decoded from UTF-16BE).
    pub parent_name: String,
    /// The eight locator entries (unused ones have code 0).
    pub locators: [ParentLocator; PARENT_LOCATOR_COUNT],
}

impl DynamicHeader {
    /// Encode with a valid checksum.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[H_COOKIE..H_COOKIE + 8].copy_from_slice(HEADER_COOKIE);
        put_be_u64(&mut b, H_DATA_OFFSET, u64::MAX);
        put_be_u64(&mut b, H_TABLE_OFFSET, self.table_offset);
        put_be_u32(&mut b, H_VERSION, VERSION_1_0);
        put_be_u32(&mut b, H_MAX_TABLE_ENTRIES, self.max_table_entries);
        put_be_u32(&mut b, H_BLOCK_SIZE, self.block_size);
        b[H_PARENT_UUID..H_PARENT_UUID + 16].copy_from_slice(&self.parent_uuid);
        put_be_u32(&mut b, H_PARENT_TIMESTAMP, self.parent_timestamp);
        let name = &mut b[H_PARENT_NAME..H_PARENT_NAME + H_PARENT_NAME_LEN];
        for (i, unit) in self
            .parent_name
            .encode_utf16()
            .take(H_PARENT_NAME_LEN / 2)
            .enumerate()
        {
            name[2 * i..2 * i + 2].copy_from_slice(&unit.to_be_bytes());
        }
        for (i, loc) in self.locators.iter().enumerate() {
            let at = H_PARENT_LOCATORS + i * PARENT_LOCATOR_SIZE;
            put_be_u32(&mut b, at + L_CODE, loc.code);
            put_be_u32(&mut b, at + L_DATA_SPACE, loc.data_space);
            put_be_u32(&mut b, at + L_DATA_LENGTH, loc.data_length);
            put_be_u64(&mut b, at + L_DATA_OFFSET, loc.data_offset);
        }
        let sum = checksum(&b, H_CHECKSUM);
        put_be_u32(&mut b, H_CHECKSUM, sum);
        b
    }

    /// Decode and validate cookie, checksum and block size.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Result<Self> {
        if &b[H_COOKIE..H_COOKIE + 8] != HEADER_COOKIE {
            return Err(Error::corrupt("dynamic header cookie is not \"cxsparse\""));
        }
        let stored = be_u32(b, H_CHECKSUM);
        let computed = checksum(b, H_CHECKSUM);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "dynamic header checksum {stored:#010x} does not match computed {computed:#010x}"
            ))
            .at_offset(H_CHECKSUM as u64));
        }
        let block_size = be_u32(b, H_BLOCK_SIZE);
        if !block_size.is_power_of_two() || !(4096..=(256 << 20)).contains(&block_size) {
            return Err(Error::unsupported(format!(
                "VHD block size {block_size} (a power of two from 4 KiB to 256 MiB is required)"
            ))
            .at_offset(H_BLOCK_SIZE as u64));
        }
        let units: Vec<u16> = b[H_PARENT_NAME..H_PARENT_NAME + H_PARENT_NAME_LEN]
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let mut locators = [ParentLocator::default(); PARENT_LOCATOR_COUNT];
        for (i, loc) in locators.iter_mut().enumerate() {
            let at = H_PARENT_LOCATORS + i * PARENT_LOCATOR_SIZE;
            *loc = ParentLocator {
                code: be_u32(b, at + L_CODE),
                data_space: be_u32(b, at + L_DATA_SPACE),
                data_length: be_u32(b, at + L_DATA_LENGTH),
                data_offset: be_u64(b, at + L_DATA_OFFSET),
            };
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[H_PARENT_UUID..H_PARENT_UUID + 16]);
        Ok(DynamicHeader {
            table_offset: be_u64(b, H_TABLE_OFFSET),
            max_table_entries: be_u32(b, H_MAX_TABLE_ENTRIES),
            block_size,
            parent_uuid,
            parent_timestamp: be_u32(b, H_PARENT_TIMESTAMP),
            parent_name: String::from_utf16_lossy(&units),
            locators,
        })
    }
}

/// Format a 16-byte unique id as a UUID string.
pub fn uuid_string(id: &[u8; 16]) -> String {
    let h: Vec<String> = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn footer_round_trips_and_checksum_detects_flips() {
        let f = Footer::new(DiskType::Dynamic, 64 << 20, [7; 16]);
        let mut b = f.encode();
        assert_eq!(Footer::decode(&b).unwrap(), f);
        b[F_CURRENT_SIZE + 7] ^= 0x02;
        let e = Footer::decode(&b).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn header_round_trips_with_parent_fields() {
        let mut locators = [ParentLocator::default(); PARENT_LOCATOR_COUNT];
        locators[0] = ParentLocator {
            code: PLATFORM_W2RU,
            data_space: 512,
            data_length: 20,
            data_offset: 4096,
        };
        let h = DynamicHeader {
            table_offset: 1536,
            max_table_entries: 32,
            block_size: DEFAULT_BLOCK_SIZE,
            parent_uuid: [9; 16],
            parent_timestamp: 1234,
            parent_name: "base disk ü.vhd".into(),
            locators,
        };
        assert_eq!(DynamicHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn checksum_is_ones_complement_of_byte_sum() {
        let mut b = [0u8; 16];
        b[0] = 1;
        b[1] = 2;
        b[8] = 0xff; // inside the skipped field
        assert_eq!(checksum(&b, 8), !3u32);
    }

    #[test]
    fn uuid_formats_in_groups() {
        let id: [u8; 16] = core::array::from_fn(|i| u8::try_from(i).unwrap());
        assert_eq!(uuid_string(&id), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }
}
