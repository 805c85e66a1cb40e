//! NBD wire constants and big-endian encoding helpers.
//!
//! Every value comes from NetworkBlockDevice/nbd `doc/proto.md` (section named in each group);
//! everything on the wire is in network byte order. `NBD_STATE_DIRTY` comes from qemu's
//! `docs/interop/nbd` (the registered `qemu` namespace).

// --- Handshake ("Newstyle negotiation", "Fixed newstyle negotiation") ---

/// `NBDMAGIC`, first 8 bytes sent by the server (also known as `INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, sent by the server and before every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of an option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag bit 0.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag bit 1.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag bit 0.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag bit 1.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// --- Transmission flags ("Transmission flags") ---

/// Bit 0, MUST always be set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Bit 1.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Bit 2.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Bit 3.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Bit 4.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// Bit 5.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Bit 6.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Bit 7; only with structured replies.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Bit 8.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Bit 9 (experimental RESIZE extension; not used).
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
/// Bit 10.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Bit 11 (not advertised: fast zero is not supported).
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// --- Option types ("Option types") ---

/// Choose an export and enter transmission (cannot fail).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Abort negotiation.
pub const NBD_OPT_ABORT: u32 = 2;
/// List exports.
pub const NBD_OPT_LIST: u32 = 3;
/// Withdrawn `PEEK_EXPORT` extension.
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
/// Start TLS (not supported).
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Query an export.
pub const NBD_OPT_INFO: u32 = 6;
/// Query an export and enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Negotiate structured replies.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
/// Extended headers (newer spec revisions; answered `NBD_REP_ERR_UNSUP`).
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// --- Option reply types ("Option reply types") ---

/// Success / end of a list.
pub const NBD_REP_ACK: u32 = 1;
/// One export of a list.
pub const NBD_REP_SERVER: u32 = 2;
/// One information item of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const NBD_REP_INFO: u32 = 3;
/// One metadata context.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Error replies have bit 31 set.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
/// Unknown option.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
/// Refused by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
/// Syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
/// Not supported on this platform.
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
/// TLS required (never sent: this server runs in NOTLS mode).
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
/// Unknown export.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
/// Server shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
/// Block size information must be requested.
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
/// Request or reply too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// --- Information types (under `NBD_REP_INFO`) ---

/// Size and transmission flags (length 12).
pub const NBD_INFO_EXPORT: u16 = 0;
/// Canonical name.
pub const NBD_INFO_NAME: u16 = 1;
/// Description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Block size constraints (length 14).
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// --- Transmission ("Request message", "Simple reply message", "Structured reply chunk") ---

/// Request magic.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk magic.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Request header size: magic 4, flags 2, type 2, handle 8, offset 8, length 4.
pub const REQUEST_LEN: usize = 28;
/// Simple reply header size: magic 4, error 4, handle 8.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured chunk header size: magic 4, flags 2, type 2, handle 8, length 4.
pub const CHUNK_HEADER_LEN: usize = 20;

// --- Command types ("Request types") ---

/// Read.
pub const NBD_CMD_READ: u16 = 0;
/// Write (with payload).
pub const NBD_CMD_WRITE: u16 = 1;
/// Disconnect (no reply).
pub const NBD_CMD_DISC: u16 = 2;
/// Flush.
pub const NBD_CMD_FLUSH: u16 = 3;
/// Trim.
pub const NBD_CMD_TRIM: u16 = 4;
/// Cache.
pub const NBD_CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;

// --- Command flags ("Command flags") ---

/// Bit 0: force unit access; valid on every command once `NBD_FLAG_SEND_FUA` is advertised.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Bit 1: `NBD_CMD_WRITE_ZEROES` only.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Bit 2: `NBD_CMD_READ` only, with `NBD_FLAG_SEND_DF`.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Bit 3: `NBD_CMD_BLOCK_STATUS` only.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Bit 4: `NBD_CMD_WRITE_ZEROES` only, with `NBD_FLAG_SEND_FAST_ZERO`.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// --- Structured replies ("Structured reply flags", "Structured reply types") ---

/// Final chunk of a reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// No payload; final.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Offset + data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Offset + hole size.
pub const NBD_REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Context id + (length, flags) descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Error chunks have bit 15 set.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Error at an offset.
pub const NBD_REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

// --- Metadata contexts ("Metadata querying"; qemu `docs/interop/nbd`) ---

/// The spec's only context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// ferry's dirty map, in qemu's dirty-bitmap namespace.
pub const CONTEXT_DIRTY_BITMAP: &str = "qemu:dirty-bitmap:ferry";
/// `base:allocation` flag: unallocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:*` flag: dirty.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// Spec: strings "MUST be no longer than 4096 bytes" (used for error messages we send).
pub const MAX_STRING: usize = 4096;

/// Reads big-endian integers from an option payload; every read is bounds-checked.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf }
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    }

    /// A `u32` length followed by that many bytes.
    pub(crate) fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Length of a payload as the `u32` the wire carries. Callers only pass payloads bounded far
/// below 4 GiB; saturate rather than panic.
pub(crate) fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `s` truncated to at most `MAX_STRING` bytes on a char boundary.
pub(crate) fn bounded_str(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
