//! Transmission phase: the request loop (NetworkBlockDevice/nbd `doc/proto.md`,
//! "Transmission", "Request types", "Error values", "Block size constraints").
//!
//! The calling thread reads requests (and write payloads) in order and hands them to a few
//! worker threads of the connection, which execute them and reply; replies may therefore go
//! out of order, as the spec allows. Each reply is built and written while holding the
//! connection's writer lock, so replies never interleave. `NBD_CMD_DISC` is answered by
//! closing once every earlier request has been answered.
//!
//! Validation, in this order, each failure answered and the connection kept:
//! 1. command flags not valid for the command (unknown bits, `NO_HOLE` outside
//!    `WRITE_ZEROES`, `DF` without structured replies, `REQ_ONE` outside `BLOCK_STATUS`,
//!    `FAST_ZERO` which is not advertised): `NBD_EINVAL`; unknown command: `NBD_EINVAL`;
//! 2. command not advertised (trim / zeroes / cache disabled; block status without a selected
//!    metadata context): `NBD_EINVAL`; FLUSH with nonzero offset or length: `NBD_EINVAL`;
//! 3. write, trim or zeroes on a read-only export: `NBD_EPERM`;
//! 4. length above the maximum block size (read, write, cache): `NBD_EINVAL`;
//! 5. beyond the end of the export: `NBD_ENOSPC` for write and zeroes, `NBD_EINVAL` otherwise;
//! 6. offset or length not a multiple of the minimum block size: `NBD_EINVAL`.
//!
//! A refused `NBD_CMD_WRITE` still has its payload read and discarded, unless the payload is
//! larger than [`ServeOptions::max_payload`]: then the connection is dropped (denial of
//! service). A bad request magic drops the connection (it cannot be resynchronised).

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

use tracing::{debug, trace, warn};

use super::WriteBuffer;

use super::handshake::{discard, read_message, Session};
use super::wire;
use super::{shutting_down, MetaContext, NbdError, ServeError, ServeOptions};

/// Cap on descriptors per `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (the spec lets a server return
/// fewer than the whole range).
const MAX_EXTENTS: usize = 65536;

/// One context's extents `(length, flags)` for a block status reply.
type StatusChunk = (MetaContext, Vec<(u32, u32)>);

#[derive(Clone, Copy, Debug)]
struct Request {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

/// A refused or failed request: error value and a message for structured error chunks.
#[derive(Debug)]
struct Refusal {
    err: NbdError,
    msg: &'static str,
}

fn refuse(err: NbdError, msg: &'static str) -> Refusal {
    Refusal { err, msg }
}

impl From<NbdError> for Refusal {
    fn from(err: NbdError) -> Self {
        Refusal {
            err,
            msg: "export error",
        }
    }
}

/// Encodes replies; one `write_all` per reply.
struct Replier {
    structured: bool,
}

impl Replier {
    fn simple_header(buf: &mut [u8], error: u32, handle: u64) {
        buf[..4].copy_from_slice(&wire::NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        buf[4..8].copy_from_slice(&error.to_be_bytes());
        buf[8..16].copy_from_slice(&handle.to_be_bytes());
    }

    fn chunk_header(buf: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
        buf.extend_from_slice(&wire::NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        buf.extend_from_slice(&flags.to_be_bytes());
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(&handle.to_be_bytes());
        buf.extend_from_slice(&len.to_be_bytes());
    }

    /// Success without payload: a simple reply (allowed for every command but READ even with
    /// structured replies).
    fn ok<W: Write + ?Sized>(&self, w: &mut W, handle: u64) -> io::Result<()> {
        let mut buf = [0u8; wire::SIMPLE_REPLY_LEN];
        Self::simple_header(&mut buf, 0, handle);
        w.write_all(&buf)?;
        w.flush()
    }

    /// Error: a structured `NBD_REPLY_TYPE_ERROR` chunk with a message once negotiated (the
    /// spec prefers it, and READ must not get a simple reply then), else a simple reply.
    fn error<W: Write + ?Sized>(&self, w: &mut W, req: &Request, r: &Refusal) -> io::Result<()> {
        debug!(
            kind = req.kind,
            offset = req.offset,
            len = req.len,
            flags = req.flags,
            error = %r.err,
            msg = r.msg,
            "NBD request failed"
        );
        if self.structured {
            let msg = wire::bounded_str(r.msg).as_bytes();
            let mut buf = Vec::with_capacity(wire::CHUNK_HEADER_LEN + 6 + msg.len());
            let msg_len = u16::try_from(msg.len()).unwrap_or(0);
            let msg = &msg[..usize::from(msg_len)];
            Self::chunk_header(
                &mut buf,
                wire::NBD_REPLY_FLAG_DONE,
                wire::NBD_REPLY_TYPE_ERROR,
                req.handle,
                wire::len32(6 + msg.len()),
            );
            buf.extend_from_slice(&r.err.code().to_be_bytes());
            buf.extend_from_slice(&msg_len.to_be_bytes());
            buf.extend_from_slice(msg);
            w.write_all(&buf)?;
        } else {
            let mut buf = [0u8; wire::SIMPLE_REPLY_LEN];
            Self::simple_header(&mut buf, r.err.code(), req.handle);
            w.write_all(&buf)?;
        }
        w.flush()
    }

    /// Room to leave in front of read data for the reply header.
    fn read_prefix(&self) -> usize {
        if self.structured {
            wire::CHUNK_HEADER_LEN + 8
        } else {
            wire::SIMPLE_REPLY_LEN
        }
    }

    /// Sends `buf` = prefix + data as one simple reply or one final `OFFSET_DATA` chunk (the
    /// data is fully read before sending, so no error can follow: `DONE` is allowed on it, and
    /// `NBD_CMD_FLAG_DF` is always honoured).
    fn read_data<W: Write + ?Sized>(
        &self,
        w: &mut W,
        req: &Request,
        buf: &mut [u8],
    ) -> io::Result<()> {
        if self.structured {
            let data_len = buf.len() - self.read_prefix();
            if data_len == 0 {
                let mut hdr = Vec::with_capacity(wire::CHUNK_HEADER_LEN);
                Self::chunk_header(
                    &mut hdr,
                    wire::NBD_REPLY_FLAG_DONE,
                    wire::NBD_REPLY_TYPE_NONE,
                    req.handle,
                    0,
                );
                w.write_all(&hdr)?;
            } else {
                let mut hdr = Vec::with_capacity(wire::CHUNK_HEADER_LEN + 8);
                Self::chunk_header(
                    &mut hdr,
                    wire::NBD_REPLY_FLAG_DONE,
                    wire::NBD_REPLY_TYPE_OFFSET_DATA,
                    req.handle,
                    wire::len32(8 + data_len),
                );
                hdr.extend_from_slice(&req.offset.to_be_bytes());
                buf[..hdr.len()].copy_from_slice(&hdr);
                w.write_all(buf)?;
            }
        } else {
            Self::simple_header(buf, 0, req.handle);
            w.write_all(buf)?;
        }
        w.flush()
    }

    /// One `NBD_REPLY_TYPE_BLOCK_STATUS` chunk per context, `DONE` on the last.
    fn block_status<W: Write + ?Sized>(
        &self,
        w: &mut W,
        req: &Request,
        chunks: &[StatusChunk],
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        for (i, (ctx, extents)) in chunks.iter().enumerate() {
            let flags = if i + 1 == chunks.len() {
                wire::NBD_REPLY_FLAG_DONE
            } else {
                0
            };
            Self::chunk_header(
                &mut buf,
                flags,
                wire::NBD_REPLY_TYPE_BLOCK_STATUS,
                req.handle,
                wire::len32(4 + 8 * extents.len()),
            );
            buf.extend_from_slice(&ctx.id().to_be_bytes());
            for &(len, fl) in extents {
                buf.extend_from_slice(&len.to_be_bytes());
                buf.extend_from_slice(&fl.to_be_bytes());
            }
        }
        w.write_all(&buf)?;
        w.flush()
    }
}

/// The shared half of a connection: session, reply writer, encoders. Workers use it through
/// `&self`.
struct Conn<'a> {
    out: &'a Mutex<Box<dyn Write + Send>>,
    session: &'a Session,
    options: &'a ServeOptions,
    replier: Replier,
    /// Set when a reply could not be written: the reader stops.
    broken: &'a AtomicBool,
}

/// A request handed to a worker (writes come with their payload, already read).
enum Job {
    Write(Request, WriteBuffer),
    Other(Request),
}

pub(crate) fn run<R: Read>(
    reader: &mut R,
    writer: Box<dyn Write + Send>,
    session: Session,
    options: &ServeOptions,
) -> Result<(), ServeError> {
    let out = Mutex::new(writer);
    let broken = AtomicBool::new(false);
    let conn = Conn {
        out: &out,
        session: &session,
        options,
        replier: Replier {
            structured: session.structured,
        },
        broken: &broken,
    };
    let workers = options.workers.clamp(1, 64);
    let (tx, rx) = mpsc::sync_channel::<Job>(workers);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let (conn, rx) = (&conn, &rx);
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(scope, move || conn.work(rx));
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) if handles.is_empty() => return Err(ServeError::Io(e)),
                Err(e) => warn!(error = %e, "fewer NBD workers than asked"),
            }
        }
        let result = conn.read_requests(reader, &tx);
        // Closing the queue lets the workers finish what they hold and stop: every request
        // read before a DISC is answered before the connection is dropped.
        drop(tx);
        let mut result = result;
        for h in handles {
            let worker = h
                .join()
                .unwrap_or_else(|_| Err(ServeError::Io(io::Error::other("NBD worker panicked"))));
            if result.is_ok() {
                result = worker;
            }
        }
        if let Ok(mut w) = out.lock() {
            let _ = w.flush();
        }
        result
    })
}

fn parse_request(hdr: &[u8; wire::REQUEST_LEN]) -> Result<Request, ServeError> {
    let be32 = |i: usize| u32::from_be_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
    let magic = be32(0);
    if magic != wire::NBD_REQUEST_MAGIC {
        return Err(ServeError::BadMagic(u64::from(magic)));
    }
    Ok(Request {
        flags: u16::from_be_bytes([hdr[4], hdr[5]]),
        kind: u16::from_be_bytes([hdr[6], hdr[7]]),
        handle: be64(8),
        offset: be64(16),
        len: be32(24),
    })
}

impl Conn<'_> {
    /// Hold the writer for one whole reply.
    fn reply(
        &self,
        encode: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<(), ServeError> {
        let mut out = self
            .out
            .lock()
            .map_err(|_| ServeError::Io(io::Error::other("reply writer poisoned")))?;
        encode(&mut *out).map_err(|e| {
            self.broken.store(true, Ordering::Relaxed);
            ServeError::Io(e)
        })
    }

    /// The reader: requests in order; write payloads are read here, execution is the workers'.
    fn read_requests<R: Read>(
        &self,
        reader: &mut R,
        jobs: &mpsc::SyncSender<Job>,
    ) -> Result<(), ServeError> {
        loop {
            if self.broken.load(Ordering::Relaxed) {
                return Err(ServeError::Io(io::Error::from(io::ErrorKind::BrokenPipe)));
            }
            let mut hdr = [0u8; wire::REQUEST_LEN];
            read_message(reader, &mut hdr)?;
            let req = parse_request(&hdr)?;
            trace!(?req, "NBD request");
            let job = match req.kind {
                wire::NBD_CMD_DISC => {
                    debug!(export = self.session.name, "NBD_CMD_DISC");
                    return Ok(());
                }
                wire::NBD_CMD_WRITE => match self.receive_write(reader, &req)? {
                    Some(buf) => Job::Write(req, buf),
                    None => continue,
                },
                _ => Job::Other(req),
            };
            if jobs.send(job).is_err() {
                return Err(ServeError::Io(io::Error::other("NBD workers stopped")));
            }
        }
    }

    /// A worker: execute jobs until the queue closes. After a reply could not be sent the
    /// connection is dead: the worker keeps taking jobs (so the reader never blocks on a full
    /// queue) but drops them, which releases their buffers (ring slots).
    fn work(&self, jobs: &Mutex<mpsc::Receiver<Job>>) -> Result<(), ServeError> {
        let mut first_error = None;
        loop {
            let job = match jobs.lock() {
                Ok(rx) => rx.recv(),
                Err(_) => break,
            };
            let Ok(job) = job else { break };
            if self.broken.load(Ordering::Relaxed) {
                continue;
            }
            let done = match job {
                Job::Write(req, buf) => self.execute_write(&req, buf),
                Job::Other(req) => self.handle(&req),
            };
            if let Err(e) = done {
                self.broken.store(true, Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn handle(&self, req: &Request) -> Result<(), ServeError> {
        let result = if shutting_down(self.options) {
            Err(refuse(NbdError::Shutdown, "server shutting down"))
        } else {
            match req.kind {
                wire::NBD_CMD_READ => return self.read(req),
                wire::NBD_CMD_FLUSH => self.flush(req),
                wire::NBD_CMD_TRIM => self.trim(req),
                wire::NBD_CMD_CACHE => self.cache(req),
                wire::NBD_CMD_WRITE_ZEROES => self.write_zeroes(req),
                wire::NBD_CMD_BLOCK_STATUS => return self.block_status(req),
                _ => Err(refuse(NbdError::Inval, "unknown command")),
            }
        };
        match result {
            Ok(()) => self.reply(|w| self.replier.ok(w, req.handle)),
            Err(r) => self.reply(|w| self.replier.error(w, req, &r)),
        }
    }

    fn check_flags(&self, req: &Request, allowed: u16) -> Result<(), Refusal> {
        if req.flags & !allowed != 0 {
            return Err(refuse(
                NbdError::Inval,
                "command flag not valid for this command",
            ));
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), Refusal> {
        if self.session.info.read_only {
            return Err(refuse(NbdError::Perm, "export is read-only"));
        }
        Ok(())
    }

    fn check_max(&self, req: &Request) -> Result<(), Refusal> {
        if req.len > self.session.info.block_sizes.max {
            return Err(refuse(
                NbdError::Inval,
                "request larger than the maximum block size",
            ));
        }
        Ok(())
    }

    /// Range within the export (`beyond` if not), aligned to the minimum block size (the final
    /// partial block of an export whose size is not a multiple of it excepted).
    fn check_range(&self, req: &Request, beyond: NbdError) -> Result<(), Refusal> {
        let size = self.session.info.size;
        let Some(end) = req
            .offset
            .checked_add(u64::from(req.len))
            .filter(|&e| e <= size)
        else {
            return Err(refuse(beyond, "request beyond the end of the export"));
        };
        // `min` is a power of two (BlockSizes::sanitized).
        let mask = u64::from(self.session.info.block_sizes.min) - 1;
        let len = u64::from(req.len);
        if req.offset & mask != 0 || (len & mask != 0 && end != size) {
            return Err(refuse(
                NbdError::Inval,
                "request not aligned to the minimum block size",
            ));
        }
        Ok(())
    }

    fn fua(req: &Request) -> bool {
        req.flags & wire::NBD_CMD_FLAG_FUA != 0
    }

    fn read(&self, req: &Request) -> Result<(), ServeError> {
        let mut allowed = wire::NBD_CMD_FLAG_FUA;
        if self.session.flags & wire::NBD_FLAG_SEND_DF != 0 {
            allowed |= wire::NBD_CMD_FLAG_DF;
        }
        let checked = if shutting_down(self.options) {
            Err(refuse(NbdError::Shutdown, "server shutting down"))
        } else {
            self.check_flags(req, allowed)
                .and_then(|()| self.check_max(req))
                .and_then(|()| self.check_range(req, NbdError::Inval))
        };
        if let Err(r) = checked {
            return self.reply(|w| self.replier.error(w, req, &r));
        }
        // check_max bounds len by the advertised maximum (<= 1 GiB).
        let len = usize::try_from(req.len).unwrap_or(usize::MAX);
        let prefix = self.replier.read_prefix();
        let total = prefix.saturating_add(len);
        let mut buf = vec![0u8; total];
        let result = if len == 0 {
            Ok(())
        } else {
            self.session
                .export
                .read(req.offset, &mut buf[prefix..total])
        };
        match result {
            Ok(()) => self.reply(|w| self.replier.read_data(w, req, &mut buf)),
            Err(e) => self.reply(|w| self.replier.error(w, req, &e.into())),
        }
    }

    /// Validate a WRITE and read its payload (on the reader thread, keeping the stream in
    /// sync). `None`: the request was refused and answered.
    fn receive_write<R: Read>(
        &self,
        reader: &mut R,
        req: &Request,
    ) -> Result<Option<WriteBuffer>, ServeError> {
        if req.len > self.options.max_payload {
            warn!(
                len = req.len,
                "NBD write payload too large: dropping the connection"
            );
            return Err(ServeError::PayloadTooLarge(req.len));
        }
        let checked = if shutting_down(self.options) {
            Err(refuse(NbdError::Shutdown, "server shutting down"))
        } else {
            self.check_flags(req, wire::NBD_CMD_FLAG_FUA)
                .and_then(|()| self.check_writable())
                .and_then(|()| self.check_max(req))
                .and_then(|()| self.check_range(req, NbdError::NoSpc))
        };
        let len = usize::try_from(req.len).unwrap_or(usize::MAX);
        let buffer = match checked {
            Ok(()) if len == 0 => {
                self.reply(|w| self.replier.ok(w, req.handle))?;
                return Ok(None);
            }
            Ok(()) => match self.session.export.write_buffer(len) {
                Ok(b) if b.len() == len => Ok(b),
                Ok(b) => {
                    warn!(
                        wanted = len,
                        got = b.len(),
                        "NBD export gave a wrong-sized write buffer"
                    );
                    Err(refuse(NbdError::Io, "internal error: write buffer size"))
                }
                Err(e) => Err(Refusal::from(e)),
            },
            Err(r) => Err(r),
        };
        match buffer {
            Err(r) => {
                // Keep the stream in sync: the payload follows the header regardless.
                discard(reader, u64::from(req.len)).map_err(eof_in_message)?;
                self.reply(|w| self.replier.error(w, req, &r))?;
                Ok(None)
            }
            Ok(mut buf) => {
                read_message(reader, buf.as_mut_slice()).map_err(eof_in_message)?;
                Ok(Some(buf))
            }
        }
    }

    fn execute_write(&self, req: &Request, buf: WriteBuffer) -> Result<(), ServeError> {
        match self.session.export.write(req.offset, buf, Self::fua(req)) {
            Ok(()) => self.reply(|w| self.replier.ok(w, req.handle)),
            Err(e) => self.reply(|w| self.replier.error(w, req, &e.into())),
        }
    }

    fn flush(&self, req: &Request) -> Result<(), Refusal> {
        self.check_flags(req, wire::NBD_CMD_FLAG_FUA)?;
        // "For a flush request, *length* and *offset* are reserved, and MUST be set to
        // all-zero."
        if req.offset != 0 || req.len != 0 {
            return Err(refuse(
                NbdError::Inval,
                "flush with nonzero offset or length",
            ));
        }
        Ok(self.session.export.flush()?)
    }

    fn trim(&self, req: &Request) -> Result<(), Refusal> {
        self.check_flags(req, wire::NBD_CMD_FLAG_FUA)?;
        if !self.session.info.can_trim {
            return Err(refuse(NbdError::Inval, "trim not supported"));
        }
        self.check_writable()?;
        // No maximum block size for trim (its length is not a payload).
        self.check_range(req, NbdError::Inval)?;
        if req.len == 0 {
            return Ok(());
        }
        let len = u64::from(req.len);
        Ok(self.session.export.trim(req.offset, len, Self::fua(req))?)
    }

    fn cache(&self, req: &Request) -> Result<(), Refusal> {
        self.check_flags(req, wire::NBD_CMD_FLAG_FUA)?;
        if !self.session.info.can_cache {
            return Err(refuse(NbdError::Inval, "cache not supported"));
        }
        self.check_max(req)?;
        self.check_range(req, NbdError::Inval)?;
        if req.len == 0 {
            return Ok(());
        }
        Ok(self.session.export.cache(req.offset, u64::from(req.len))?)
    }

    fn write_zeroes(&self, req: &Request) -> Result<(), Refusal> {
        // NBD_CMD_FLAG_FAST_ZERO is refused: NBD_FLAG_SEND_FAST_ZERO is not advertised, and
        // the spec says to fail the flag with NBD_EINVAL then.
        self.check_flags(req, wire::NBD_CMD_FLAG_FUA | wire::NBD_CMD_FLAG_NO_HOLE)?;
        if !self.session.info.can_zero {
            return Err(refuse(NbdError::Inval, "write zeroes not supported"));
        }
        self.check_writable()?;
        // No maximum block size for zeroes: the length is not a payload (spec, "Block size
        // constraints": the maximum applies to payload-carrying requests; nbdcopy and the
        // kernel send zero requests of many MiB).
        self.check_range(req, NbdError::NoSpc)?;
        if req.len == 0 {
            return Ok(());
        }
        let no_hole = req.flags & wire::NBD_CMD_FLAG_NO_HOLE != 0;
        let len = u64::from(req.len);
        Ok(self
            .session
            .export
            .write_zeroes(req.offset, len, Self::fua(req), no_hole)?)
    }

    fn block_status(&self, req: &Request) -> Result<(), ServeError> {
        match self.block_status_extents(req) {
            Ok(chunks) => self.reply(|w| self.replier.block_status(w, req, &chunks)),
            Err(r) => self.reply(|w| self.replier.error(w, req, &r)),
        }
    }

    fn block_status_extents(&self, req: &Request) -> Result<Vec<StatusChunk>, Refusal> {
        self.check_flags(req, wire::NBD_CMD_FLAG_FUA | wire::NBD_CMD_FLAG_REQ_ONE)?;
        if !self.session.structured || self.session.contexts.is_empty() {
            return Err(refuse(NbdError::Inval, "no metadata context negotiated"));
        }
        if req.len == 0 {
            return Err(refuse(NbdError::Inval, "zero-length block status"));
        }
        // The length is a hint: no maximum block size applies.
        self.check_range(req, NbdError::Inval)?;
        let req_one = req.flags & wire::NBD_CMD_FLAG_REQ_ONE != 0;
        let remaining = self.session.info.size - req.offset; // check_range: offset <= size
        let want = u64::from(req.len);
        let mut chunks = Vec::with_capacity(self.session.contexts.len());
        for &ctx in &self.session.contexts {
            let raw = self.session.export.block_status(ctx, req.offset, want)?;
            let extents = clean_extents(raw, want, remaining, req_one);
            if extents.is_empty() {
                warn!(?ctx, "NBD export returned no block status extents");
                return Err(refuse(NbdError::Io, "no extents"));
            }
            chunks.push((ctx, extents));
        }
        Ok(chunks)
    }
}

/// Makes an export's extents conform to the spec: nonzero lengths, adjacent equal flags merged,
/// stop once `want` bytes are covered (the last extent may go past `want` but not past the end
/// of the export, `remaining` bytes away); with `req_one`, exactly one extent of at most
/// `want` bytes.
fn clean_extents(
    raw: Vec<(u32, u32)>,
    want: u64,
    remaining: u64,
    req_one: bool,
) -> Vec<(u32, u32)> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut total: u64 = 0;
    let limit = if req_one { want } else { remaining };
    for (len, flags) in raw {
        if total >= want || out.len() >= MAX_EXTENTS {
            break;
        }
        let room = limit.saturating_sub(total);
        let len = u32::try_from(u64::from(len).min(room)).unwrap_or(u32::MAX);
        if len == 0 {
            continue;
        }
        total += u64::from(len);
        match out.last_mut() {
            Some(last) if last.1 == flags && last.0.checked_add(len).is_some() => last.0 += len,
            _ => out.push((len, flags)),
        }
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// EOF inside a write payload is a truncated message, not a clean hang-up.
fn eof_in_message(e: ServeError) -> ServeError {
    match e {
        ServeError::ClientHangup => io::Error::from(io::ErrorKind::UnexpectedEof).into(),
        e => e,
    }
}

#[cfg(test)]
mod unit {
    use super::clean_extents;

    #[test]
    fn extents_are_clamped_and_merged() {
        assert_eq!(
            clean_extents(vec![(0, 1), (10, 1), (10, 1)], 15, 100, false),
            vec![(20, 1)]
        );
        assert_eq!(
            clean_extents(vec![(10, 0), (10, 1), (10, 0)], 15, 100, false),
            vec![(10, 0), (10, 1)]
        );
        assert_eq!(clean_extents(vec![(100, 3)], 15, 100, true), vec![(15, 3)]);
        assert_eq!(clean_extents(vec![(100, 3)], 15, 40, false), vec![(40, 3)]);
        assert_eq!(
            clean_extents(vec![(5, 0), (5, 1)], 15, 100, true),
            vec![(5, 0)]
        );
        assert!(clean_extents(vec![(0, 0)], 15, 100, false).is_empty());
    }
}
