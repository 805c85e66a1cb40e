//! NBD (Network Block Device) server protocol layer.
//!
//! Implements the server side of the NBD protocol as specified in
//! NetworkBlockDevice/nbd `doc/proto.md` ("the spec" below): the fixed newstyle handshake
//! (oldstyle is not supported) and the transmission phase, with simple and structured replies
//! and the `base:allocation` / `qemu:dirty-bitmap:ferry` metadata contexts.
//!
//! The layer is generic over the stream (`Read + Write`: the daemon passes a `UnixStream`, or a
//! `TcpStream` with `TCP_NODELAY`) and over the storage: the daemon implements [`Backend`] (the
//! export table) and [`Export`] (one opened export per connection). It is blocking std I/O; the
//! daemon runs [`serve`] on one thread per connection.
//!
//! Requests are handled sequentially, in arrival order, on the calling thread. Every reply is
//! encoded into one buffer and written with a single `write_all` (see `transmission.rs`), so a
//! later version can move request execution to worker threads by putting the write half behind
//! a `Mutex` without changing the wire code.
//!
//! What the layer guarantees to the export (so the daemon needs no re-validation):
//! - every `read`/`write`/`trim`/`write_zeroes`/`cache`/`block_status` range lies within the
//!   export size, is aligned to the advertised minimum block size (the last partial block of
//!   an export whose size is not a multiple of it excepted) and, for read/write/zeroes/cache,
//!   is at most the advertised maximum block size;
//! - a zero-length read, write, trim, write-zeroes or cache is answered without calling the
//!   export;
//! - nothing is written through an export whose [`ExportInfo::read_only`] is set, and trim /
//!   write-zeroes / cache are only called when the matching `can_*` flag is set.

mod handshake;
mod transmission;
pub mod wire;

#[cfg(test)]
mod tests;

use std::any::Any;
use std::fmt;
use std::io::{self, Read, Write};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The export table: what a client can list and open. Implemented by the daemon.
pub trait Backend: Send + Sync {
    /// Names listed in reply to `NBD_OPT_LIST`.
    fn export_names(&self) -> Vec<String>;
    /// Size, flags and limits of an export; `None` if there is no export of that name. The
    /// empty name is the spec's "default export": return `Some` for it only if there is one.
    fn export(&self, name: &str) -> Option<ExportInfo>;
    /// Opens an export for one connection (called once the client enters transmission).
    fn open(&self, name: &str) -> Option<Arc<dyn Export>>;
}

/// One opened export, used by one connection. All ranges are pre-validated (see module docs).
pub trait Export: Send + Sync {
    /// Fills `buf` with the contents at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError>;
    /// Provides the buffer the payload of a `len`-byte `NBD_CMD_WRITE` is read into, straight
    /// from the socket (so the daemon can hand out a slot of its shared-memory ring). The
    /// buffer must be exactly `len` bytes long; it comes back in [`Export::write`]. If this
    /// fails the payload is drained and the error is the reply.
    fn write_buffer(&self, len: usize) -> Result<WriteBuffer, NbdError>;
    /// Writes `data` (a buffer from [`Export::write_buffer`], filled) at `offset`. With `fua`
    /// the data must be durable before this returns.
    fn write(&self, offset: u64, data: WriteBuffer, fua: bool) -> Result<(), NbdError>;
    /// Makes every write completed (replied to) before this call durable.
    fn flush(&self) -> Result<(), NbdError>;
    /// Discards a range (a hint; the contents become unspecified).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError>;
    /// Zeroes a range; with `no_hole` the range must stay allocated.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool)
        -> Result<(), NbdError>;
    /// Prefetch hint.
    fn cache(&self, offset: u64, len: u64) -> Result<(), NbdError>;
    /// Extents `(length, flags)` for `context`, consecutive from `offset`, covering at most
    /// `len` bytes (more is allowed for the last one; the protocol layer trims). Must return at
    /// least one extent of nonzero length. Flags: [`wire::NBD_STATE_HOLE`] /
    /// [`wire::NBD_STATE_ZERO`] for [`MetaContext::BaseAllocation`], [`wire::NBD_STATE_DIRTY`]
    /// for [`MetaContext::DirtyBitmap`]. Reporting 0 is always safe.
    fn block_status(
        &self,
        context: MetaContext,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u32, u32)>, NbdError>;
}

/// Memory a write payload is received into. `Heap` is a plain vector; `Custom` lets the daemon
/// hand out memory it owns (a ring slot) and get it back, downcast via
/// [`WriteTarget::into_any`], in [`Export::write`].
pub enum WriteBuffer {
    /// Heap memory.
    Heap(Vec<u8>),
    /// Memory owned by the export.
    Custom(Box<dyn WriteTarget>),
}

/// Export-provided memory for a write payload (see [`WriteBuffer::Custom`]).
pub trait WriteTarget: Send {
    /// The payload bytes (exactly the requested length).
    fn as_slice(&self) -> &[u8];
    /// The payload bytes, to be filled from the socket.
    fn as_mut_slice(&mut self) -> &mut [u8];
    /// Gives the concrete type back (`Box<dyn Any>::downcast`).
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl WriteBuffer {
    /// A zeroed heap buffer of `len` bytes.
    pub fn heap(len: usize) -> Self {
        WriteBuffer::Heap(vec![0; len])
    }

    /// The payload bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            WriteBuffer::Heap(v) => v,
            WriteBuffer::Custom(c) => c.as_slice(),
        }
    }

    /// The payload bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            WriteBuffer::Heap(v) => v,
            WriteBuffer::Custom(c) => c.as_mut_slice(),
        }
    }

    /// Payload length.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for WriteBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteBuffer::Heap(v) => write!(f, "WriteBuffer::Heap({} bytes)", v.len()),
            WriteBuffer::Custom(c) => {
                write!(f, "WriteBuffer::Custom({} bytes)", c.as_slice().len())
            }
        }
    }
}

/// A metadata context a client can select with `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation` (spec, "The `base:` metadata namespace").
    BaseAllocation,
    /// `qemu:dirty-bitmap:ferry`: ferry's dirty map, in qemu's dirty-bitmap convention
    /// (flag bit 0 = `NBD_STATE_DIRTY`), readable with `nbdinfo --map=qemu:dirty-bitmap:ferry`.
    DirtyBitmap,
}

impl MetaContext {
    /// The context's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => wire::CONTEXT_BASE_ALLOCATION,
            MetaContext::DirtyBitmap => wire::CONTEXT_DIRTY_BITMAP,
        }
    }

    /// The context id this server assigns (stable; ids are opaque to clients).
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::DirtyBitmap => 2,
        }
    }
}

/// Block size constraints (spec, "Block size constraints"). Sent as `NBD_INFO_BLOCK_SIZE` and
/// enforced on every request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockSizes {
    /// Power of two, 1..=65536 (1 for a file, 512 or 4096 for a block device).
    pub min: u32,
    /// Power of two, at least max(min, 512).
    pub preferred: u32,
    /// Largest read/write/zeroes/cache request; multiple of `min`.
    pub max: u32,
}

/// 32 MiB: the default maximum request size (the Linux client's limit, and the size the spec
/// says clients should stay under for interoperability).
pub const DEFAULT_MAX_BLOCK: u32 = 32 << 20;

impl Default for BlockSizes {
    fn default() -> Self {
        BlockSizes {
            min: 1,
            preferred: 4096,
            max: DEFAULT_MAX_BLOCK,
        }
    }
}

impl BlockSizes {
    /// Returns constraints satisfying the spec's rules: `min` a power of two <= 64 KiB (else
    /// 1), `preferred` a power of two >= max(min, 512) (else max(min, 4096)), `max` at least
    /// `preferred`, capped at `cap` (the largest payload the server accepts), rounded down to a
    /// multiple of `min`.
    pub fn sanitized(self, cap: u32) -> BlockSizes {
        let min = if self.min.is_power_of_two() && self.min <= 65536 {
            self.min
        } else {
            1
        };
        let floor = min.max(512);
        let preferred = if self.preferred.is_power_of_two() && self.preferred >= floor {
            self.preferred
        } else {
            floor.max(4096)
        };
        // "MUST be at least as large as the smaller of the preferred block size or export
        // size".
        let mut max = self.max.max(preferred).min(cap);
        max -= max % min;
        if max < min {
            max = min;
        }
        BlockSizes {
            min,
            preferred,
            max,
        }
    }
}

/// What the server tells a client about an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Advertise `NBD_FLAG_READ_ONLY` and refuse writes, trims and zeroes with `NBD_EPERM`.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_SEND_TRIM` (else `NBD_CMD_TRIM` gets `NBD_EINVAL`).
    pub can_trim: bool,
    /// Advertise `NBD_FLAG_SEND_WRITE_ZEROES` (else `NBD_CMD_WRITE_ZEROES` gets `NBD_EINVAL`).
    pub can_zero: bool,
    /// Advertise `NBD_FLAG_SEND_CACHE` (else `NBD_CMD_CACHE` gets `NBD_EINVAL`).
    pub can_cache: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: only if FLUSH and FUA on one connection cover
    /// writes completed on every connection to this export.
    pub can_multi_conn: bool,
    /// Advertise `NBD_FLAG_ROTATIONAL`.
    pub rotational: bool,
    /// Offer the `qemu:dirty-bitmap:ferry` metadata context.
    pub dirty_bitmap: bool,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, and after the name in
    /// `NBD_REP_SERVER`).
    pub description: Option<String>,
}

impl ExportInfo {
    /// A writable export of `size` bytes with trim, zeroes and cache, default block sizes.
    pub fn new(size: u64) -> Self {
        ExportInfo {
            size,
            read_only: false,
            can_trim: true,
            can_zero: true,
            can_cache: true,
            can_multi_conn: false,
            rotational: false,
            dirty_bitmap: false,
            block_sizes: BlockSizes::default(),
            description: None,
        }
    }
}

/// Errors an export reports; each maps to one NBD error value ([`NbdError::code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NbdError {
    /// `NBD_EPERM` (1).
    #[error("operation not permitted")]
    Perm,
    /// `NBD_EIO` (5).
    #[error("input/output error")]
    Io,
    /// `NBD_ENOMEM` (12); the spec says to avoid it if at all possible.
    #[error("cannot allocate memory")]
    NoMem,
    /// `NBD_EINVAL` (22).
    #[error("invalid argument")]
    Inval,
    /// `NBD_ENOSPC` (28).
    #[error("no space left on device")]
    NoSpc,
    /// `NBD_EOVERFLOW` (75).
    #[error("value too large")]
    Overflow,
    /// `NBD_ENOTSUP` (95).
    #[error("operation not supported")]
    NotSup,
    /// `NBD_ESHUTDOWN` (108): the client must then disconnect.
    #[error("server is shutting down")]
    Shutdown,
}

impl NbdError {
    /// The error value sent on the wire (spec, "Error values"). The only place that mapping
    /// lives.
    pub fn code(self) -> u32 {
        match self {
            NbdError::Perm => 1,
            NbdError::Io => 5,
            NbdError::NoMem => 12,
            NbdError::Inval => 22,
            NbdError::NoSpc => 28,
            NbdError::Overflow => 75,
            NbdError::NotSup => 95,
            NbdError::Shutdown => 108,
        }
    }

    /// Maps an OS error to an NBD error (the spec asks for `EDQUOT`/`EFBIG` -> `NBD_ENOSPC`).
    pub fn from_io(err: &io::Error) -> NbdError {
        match err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES | libc::EROFS) => NbdError::Perm,
            Some(libc::ENOMEM) => NbdError::NoMem,
            Some(libc::EINVAL) => NbdError::Inval,
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => NbdError::NoSpc,
            Some(libc::EOVERFLOW) => NbdError::Overflow,
            Some(libc::ENOTSUP) => NbdError::NotSup,
            Some(libc::ESHUTDOWN) => NbdError::Shutdown,
            _ => NbdError::Io,
        }
    }
}

impl From<io::Error> for NbdError {
    fn from(err: io::Error) -> Self {
        NbdError::from_io(&err)
    }
}

/// Per-connection server settings.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Largest option payload accepted during the handshake; larger ones are read, discarded
    /// and answered `NBD_REP_ERR_TOO_BIG` (`NBD_OPT_EXPORT_NAME`, which cannot fail, drops the
    /// connection instead). Strings are at most 4096 bytes per the spec.
    pub max_option_len: u32,
    /// Largest `NBD_CMD_WRITE` payload that is drained when the request is refused (a write
    /// above the maximum block size gets `NBD_EINVAL`); above this the connection is dropped
    /// as a denial of service (allowed by the spec, "Block size constraints"). Also caps the
    /// advertised maximum block size.
    pub max_payload: u32,
    /// When set, further options get `NBD_REP_ERR_SHUTDOWN` and further requests
    /// `NBD_ESHUTDOWN` (spec, "Terminating the transmission phase").
    pub shutdown: Option<Arc<AtomicBool>>,
    /// Worker threads per connection executing requests concurrently (the client's queue
    /// depth is served in parallel up to this many).
    pub workers: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            max_option_len: 64 << 10,
            max_payload: 64 << 20,
            shutdown: None,
            workers: 8,
        }
    }
}

/// Why a connection ended other than by `NBD_OPT_ABORT` or `NBD_CMD_DISC`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Socket error (including a timeout, or EOF in the middle of a message).
    #[error("NBD socket: {0}")]
    Io(#[from] io::Error),
    /// The client closed the connection between two messages without `NBD_OPT_ABORT` /
    /// `NBD_CMD_DISC`.
    #[error("NBD client hung up without disconnecting")]
    ClientHangup,
    /// The client set client flags this server does not know (spec: the server MUST drop).
    #[error("NBD client sent unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// Wrong magic number in an option or a request.
    #[error("NBD protocol violation: bad magic {0:#x}")]
    BadMagic(u64),
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (no way to reply an error).
    #[error("NBD client asked for unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` with an oversized name.
    #[error("NBD option {option} of {len} bytes is too large")]
    OptionTooLarge {
        /// Option number.
        option: u32,
        /// Announced length.
        len: u32,
    },
    /// The server is shutting down ([`ServeOptions::shutdown`]) and the client used
    /// `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error.
    #[error("NBD server shutting down")]
    Shutdown,
    /// A write payload above [`ServeOptions::max_payload`].
    #[error("NBD write payload of {0} bytes is too large")]
    PayloadTooLarge(u32),
}

/// A connected socket whose write half can be handed to another thread, so requests can be
/// read on one thread while workers send replies.
pub trait Connection: Read + Write {
    /// A second handle on the same socket, for writing replies.
    fn reply_half(&self) -> io::Result<Box<dyn Write + Send>>;
}

impl Connection for std::os::unix::net::UnixStream {
    fn reply_half(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
}

impl Connection for std::net::TcpStream {
    fn reply_half(&self) -> io::Result<Box<dyn Write + Send>> {
        Ok(Box::new(self.try_clone()?))
    }
}

/// Read buffer of a connection in transmission.
const READ_BUFFER: usize = 128 << 10;

/// Serves one NBD connection: handshake, then requests until `NBD_CMD_DISC`.
///
/// Returns `Ok(())` after `NBD_OPT_ABORT` or `NBD_CMD_DISC`. Never panics on client input.
pub fn serve<S: Connection>(
    mut stream: S,
    backend: &dyn Backend,
    options: ServeOptions,
) -> Result<(), ServeError> {
    match handshake::negotiate(&mut stream, backend, &options)? {
        handshake::Outcome::Aborted => Ok(()),
        handshake::Outcome::Transmission(session) => {
            let writer = stream.reply_half()?;
            // Buffered: a request header and a small payload usually arrive in one read.
            let mut reader = io::BufReader::with_capacity(READ_BUFFER, stream);
            transmission::run(&mut reader, writer, session, &options)
        }
    }
}

/// Serves the transmission phase only, on a socket whose handshake happened elsewhere: the
/// Linux kernel client never negotiates (the daemon configures it over netlink with
/// `NBD_ATTR_SIZE_BYTES`, `NBD_ATTR_BLOCK_SIZE_BYTES` and `NBD_ATTR_SERVER_FLAGS` =
/// [`transmission_flags`]`(&info, false)`, then hands it one end of a socket). Simple replies
/// only, no metadata contexts. `info` gives size, flags and the enforced block sizes.
///
/// Returns `Ok(())` after `NBD_CMD_DISC`. Never panics on client input.
pub fn serve_transmission<S: Connection>(
    stream: S,
    export: Arc<dyn Export>,
    mut info: ExportInfo,
    options: ServeOptions,
) -> Result<(), ServeError> {
    info.block_sizes = info.block_sizes.sanitized(handshake::block_cap(&options));
    let session = handshake::Session {
        export,
        flags: transmission_flags(&info, false),
        info,
        name: String::new(),
        structured: false,
        contexts: Vec::new(),
    };
    let writer = stream.reply_half()?;
    let mut reader = io::BufReader::with_capacity(READ_BUFFER, stream);
    transmission::run(&mut reader, writer, session, &options)
}

/// The transmission flags this server advertises for an export (spec, "Transmission flags"):
/// `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA` always; `READ_ONLY`, `ROTATIONAL`, `CAN_MULTI_CONN`,
/// `SEND_CACHE` from the export; `SEND_TRIM` / `SEND_WRITE_ZEROES` if supported and writable;
/// `SEND_DF` only with structured replies; never `SEND_FAST_ZERO` or `SEND_RESIZE`.
pub fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    handshake::transmission_flags(info, structured)
}

fn shutting_down(options: &ServeOptions) -> bool {
    options
        .shutdown
        .as_ref()
        .is_some_and(|s| s.load(std::sync::atomic::Ordering::Acquire))
}
