//! Byte layout of a ring file, format version 1.
//!
//! Every multi-byte integer is little-endian. Offsets named `H_*` are from
//! the start of the file (the header page), `P_*` and `C_*` are the
//! producer's and the consumer's cache lines (also absolute file offsets),
//! `R_*` are offsets inside one 64-byte record slot.
//!
//! The static header (`H_MAGIC` .. `H_HEADER_CRC`) is written once by the
//! producer that creates the ring, before the file appears under its name,
//! and never changes afterwards; `H_HEADER_CRC` covers it. The two cache
//! lines change all the time and are accessed only as atomics.

/// File magic, at [`H_MAGIC`].
pub const MAGIC: [u8; 8] = *b"FERRYRNG";
/// The format version this code writes and reads, at [`H_VERSION`].
pub const VERSION: u32 = 1;
/// Size of the header page; the record slots start right after it.
pub const HEADER_SIZE: usize = 4096;
/// Size of one record slot.
pub const RECORD_SIZE: usize = 64;
/// Alignment (and granularity) of payload reservations in the payload area:
/// every payload starts on a page boundary of the file, so the filter can
/// hand it to `O_DIRECT` writes and io_uring registered buffers as is.
pub const PAYLOAD_ALIGN: u64 = 4096;
/// Smallest number of record slots.
pub const MIN_SLOTS: u32 = 16;
/// Largest number of record slots (1 GiB of slots).
pub const MAX_SLOTS: u32 = 1 << 24;
/// Smallest payload area.
pub const MIN_PAYLOAD_BYTES: u64 = PAYLOAD_ALIGN;
/// Largest payload area (64 GiB).
pub const MAX_PAYLOAD_BYTES: u64 = 1 << 36;
/// Longest disk name in bytes (UTF-8, NUL padded).
pub const MAX_DISK_NAME: usize = 64;
/// `payload_pos` of a record without payload.
pub const NO_PAYLOAD: u64 = u64::MAX;
/// Record indexes and payload positions stay below this (2^62: at 10^9
/// records or bytes per second, 146 years); larger counters are corrupt.
/// It keeps every index and position computation far from overflow.
pub const MAX_POSITION: u64 = 1 << 62;

// ---- static header -------------------------------------------------------

/// `[u8; 8]` magic, [`MAGIC`].
pub const H_MAGIC: usize = 0;
/// `u32` format version, [`VERSION`].
pub const H_VERSION: usize = 8;
/// `u32` header size, [`HEADER_SIZE`].
pub const H_HEADER_SIZE: usize = 12;
/// `u32` record slot size, [`RECORD_SIZE`].
pub const H_RECORD_SIZE: usize = 16;
/// `u32` number of record slots (power of two, [`MIN_SLOTS`]..=[`MAX_SLOTS`]).
pub const H_SLOTS: usize = 20;
/// `u64` payload area bytes (multiple of [`PAYLOAD_ALIGN`],
/// [`MIN_PAYLOAD_BYTES`]..=[`MAX_PAYLOAD_BYTES`]).
pub const H_PAYLOAD_BYTES: usize = 24;
/// `u64` size of the protected disk in bytes.
pub const H_DISK_SIZE: usize = 32;
/// `u64` generation: new (random) every time a producer creates the ring;
/// kept by `Producer::reopen`. A consumer whose generation differs from the
/// file now at the ring's path holds a stale ring.
pub const H_GENERATION: usize = 40;
/// `u64` creation time, nanoseconds since the Unix epoch.
pub const H_CREATED_NS: usize = 48;
/// `u64` file offset of record slot 0 (= [`HEADER_SIZE`]).
pub const H_SLOTS_OFFSET: usize = 56;
/// `u64` file offset of the payload area (see [`payload_offset`]).
pub const H_PAYLOAD_OFFSET: usize = 64;
/// `u32` payload alignment, [`PAYLOAD_ALIGN`].
pub const H_PAYLOAD_ALIGN: usize = 72;
/// `u32` header flags; none defined in version 1, must be zero.
pub const H_FLAGS: usize = 76;
/// `[u8; 64]` disk name, UTF-8, NUL padded (no NUL inside the name).
pub const H_DISK_NAME: usize = 80;
/// `u32` crc32c of bytes `0..H_HEADER_CRC`.
pub const H_HEADER_CRC: usize = 144;
/// End of the static header; bytes from here to [`P_PUBLISHED`] are zero.
pub const H_STATIC_END: usize = 148;

// ---- producer cache line (written by the producer only) ------------------

/// `u64` (atomic) index one past the last published record. Release-stored
/// after the record slot is written; consumers load it with acquire.
pub const P_PUBLISHED: usize = 256;
/// `u64` (atomic) monotonic byte position where the next payload
/// reservation starts (never wraps; `% payload bytes` gives the place).
pub const P_PAYLOAD_HEAD: usize = 264;
/// `u32` (atomic) futex word: bumped and woken on publish while the
/// consumer says it is waiting ([`C_WAITING`]).
pub const P_WAKE: usize = 272;
/// `u32` (atomic) process id of the producer that last created/reopened the ring.
pub const P_PID: usize = 276;

// ---- consumer cache line (written by the consumer only) ------------------

/// `u64` (atomic) index one past the last committed record. Release-stored
/// by the consumer; the producer loads it with acquire before it reuses a
/// slot or payload bytes.
pub const C_COMMITTED: usize = 512;
/// `u64` (atomic) consumer heartbeat: Unix-epoch nanoseconds of its last
/// open, commit or wait.
pub const C_HEARTBEAT_NS: usize = 520;
/// `u32` (atomic) process id of the consumer that last opened the ring.
pub const C_PID: usize = 528;
/// `u32` (atomic) nonzero while the consumer sleeps on [`P_WAKE`].
pub const C_WAITING: usize = 532;

// ---- record slot ----------------------------------------------------------

/// `u64` host-wide sequence number, strictly increasing within a ring.
pub const R_SEQ: usize = 0;
/// `u64` timestamp, nanoseconds since the Unix epoch (by convention).
pub const R_TIMESTAMP_NS: usize = 8;
/// `u64` byte offset on the disk.
pub const R_OFFSET: usize = 16;
/// `u64` length in bytes (on the disk; equals the payload length with payload).
pub const R_LENGTH: usize = 24;
/// `u64` monotonic payload byte position, or [`NO_PAYLOAD`].
pub const R_PAYLOAD_POS: usize = 32;
/// `u64` auxiliary value: tag id, state-change reason code, ...
pub const R_AUX: usize = 40;
/// `u32` crc32c of the data written (supplied by the producer's caller).
pub const R_CHECKSUM: usize = 48;
/// `u8` record kind (`RecordKind`).
pub const R_KIND: usize = 52;
/// `u8` flags: [`FLAG_FUA`], [`FLAG_HAS_PAYLOAD`].
pub const R_FLAGS: usize = 53;
/// `[u8; 2]` reserved, zero.
pub const R_RESERVED: usize = 54;
/// `u32` crc32c of the record bytes `0..R_CRC`.
pub const R_CRC: usize = 56;
/// `[u8; 4]` reserved, zero.
pub const R_RESERVED2: usize = 60;

/// Record flag: the write was FUA (forced unit access).
pub const FLAG_FUA: u8 = 1;
/// Record flag: the record has a payload in the payload area.
pub const FLAG_HAS_PAYLOAD: u8 = 2;
/// All flags defined in version 1.
pub const KNOWN_FLAGS: u8 = FLAG_FUA | FLAG_HAS_PAYLOAD;

/// File offset of the payload area for `slots` record slots: the end of the
/// slots rounded up to a page.
pub const fn payload_offset(slots: u32) -> u64 {
    let end = HEADER_SIZE as u64 + slots as u64 * RECORD_SIZE as u64;
    end.div_ceil(PAYLOAD_ALIGN) * PAYLOAD_ALIGN
}

/// Total file length for a geometry.
pub const fn file_len(slots: u32, payload_bytes: u64) -> u64 {
    payload_offset(slots) + payload_bytes
}

const _: () = {
    assert!(P_PUBLISHED.is_multiple_of(64) && C_COMMITTED.is_multiple_of(64));
    // Producer and consumer lines 256 bytes apart: separate cache lines,
    // also for the adjacent-line prefetcher.
    assert!(C_COMMITTED - P_PUBLISHED >= 128);
    assert!(H_STATIC_END <= P_PUBLISHED);
    assert!(H_DISK_NAME + MAX_DISK_NAME == H_HEADER_CRC);
    assert!(R_RESERVED2 + 4 == RECORD_SIZE);
};
