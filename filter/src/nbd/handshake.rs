//! Fixed newstyle handshake and option haggling (NetworkBlockDevice/nbd `doc/proto.md`,
//! "Handshake", "Option types", "Option reply types", "Metadata querying").
//!
//! NOTLS mode: `NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP` (the spec's answer for a server
//! without TLS support). Oldstyle negotiation is not supported; a client that does not set
//! `NBD_FLAG_C_FIXED_NEWSTYLE` is still served as fixed newstyle (the spec allows it).

use std::io::{self, Read, Write};
use std::sync::Arc;

use tracing::debug;

use super::wire::{self, Cursor};
use super::{shutting_down, Backend, Export, ExportInfo, MetaContext, ServeError, ServeOptions};

/// What the client negotiated, handed to the transmission phase.
pub(crate) struct Session {
    pub(crate) export: Arc<dyn Export>,
    /// With sanitized block sizes.
    pub(crate) info: ExportInfo,
    pub(crate) name: String,
    /// Transmission flags as advertised.
    pub(crate) flags: u16,
    pub(crate) structured: bool,
    /// Selected metadata contexts (only if selected for the export that was opened).
    pub(crate) contexts: Vec<MetaContext>,
}

pub(crate) enum Outcome {
    Aborted,
    Transmission(Session),
}

/// Negotiation state carried across options.
#[derive(Default)]
struct State {
    no_zeroes: bool,
    structured: bool,
    /// Contexts from the last `NBD_OPT_SET_META_CONTEXT`, and the export they were set for.
    contexts: Vec<MetaContext>,
    context_export: Option<String>,
}

impl State {
    fn contexts_for(&self, name: &str) -> Vec<MetaContext> {
        if self.context_export.as_deref() == Some(name) {
            self.contexts.clone()
        } else {
            Vec::new()
        }
    }
}

/// Transmission flags for an export (spec, "Transmission flags"). `NBD_FLAG_SEND_DF` only with
/// structured replies; `NBD_FLAG_SEND_FAST_ZERO` never (fast zero is not supported).
pub(crate) fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    let mut f = wire::NBD_FLAG_HAS_FLAGS | wire::NBD_FLAG_SEND_FLUSH | wire::NBD_FLAG_SEND_FUA;
    if info.read_only {
        f |= wire::NBD_FLAG_READ_ONLY;
    } else {
        if info.can_trim {
            f |= wire::NBD_FLAG_SEND_TRIM;
        }
        if info.can_zero {
            f |= wire::NBD_FLAG_SEND_WRITE_ZEROES;
        }
    }
    if info.rotational {
        f |= wire::NBD_FLAG_ROTATIONAL;
    }
    if structured {
        f |= wire::NBD_FLAG_SEND_DF;
    }
    if info.can_multi_conn {
        f |= wire::NBD_FLAG_CAN_MULTI_CONN;
    }
    if info.can_cache {
        f |= wire::NBD_FLAG_SEND_CACHE;
    }
    f
}

/// Reads exactly `buf.len()` bytes; EOF before the first byte is a clean hang-up between
/// messages, EOF later is an I/O error.
pub(crate) fn read_message<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<(), ServeError> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Err(ServeError::ClientHangup),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads and discards `len` bytes.
pub(crate) fn discard<R: Read>(r: &mut R, len: u64) -> Result<(), ServeError> {
    let copied = io::copy(&mut r.by_ref().take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(())
}

fn send_reply<W: Write>(w: &mut W, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&wire::REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&reply.to_be_bytes());
    buf.extend_from_slice(&wire::len32(data.len()).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf)?;
    w.flush()
}

/// An error reply with a human-readable message (the spec allows a message on every error).
fn send_error<W: Write>(w: &mut W, option: u32, reply: u32, msg: &str) -> io::Result<()> {
    debug!(
        option,
        reply = reply & !wire::NBD_REP_FLAG_ERROR,
        msg,
        "NBD option refused"
    );
    send_reply(w, option, reply, wire::bounded_str(msg).as_bytes())
}

fn info_reply<W: Write>(w: &mut W, option: u32, kind: u16, payload: &[u8]) -> io::Result<()> {
    let mut data = Vec::with_capacity(2 + payload.len());
    data.extend_from_slice(&kind.to_be_bytes());
    data.extend_from_slice(payload);
    send_reply(w, option, wire::NBD_REP_INFO, &data)
}

pub(crate) fn negotiate<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    options: &ServeOptions,
) -> Result<Outcome, ServeError> {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&wire::NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&wire::IHAVEOPT.to_be_bytes());
    hello[16..]
        .copy_from_slice(&(wire::NBD_FLAG_FIXED_NEWSTYLE | wire::NBD_FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello)?;
    stream.flush()?;

    let mut cflags = [0u8; 4];
    read_message(stream, &mut cflags)?;
    let cflags = u32::from_be_bytes(cflags);
    // Spec, "Client flags": the server MUST drop the connection on an unknown flag.
    if cflags & !(wire::NBD_FLAG_C_FIXED_NEWSTYLE | wire::NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(ServeError::UnknownClientFlags(cflags));
    }
    if cflags & wire::NBD_FLAG_C_FIXED_NEWSTYLE == 0 {
        debug!("NBD client did not set NBD_FLAG_C_FIXED_NEWSTYLE; serving fixed newstyle");
    }
    let mut state = State {
        no_zeroes: cflags & wire::NBD_FLAG_C_NO_ZEROES != 0,
        ..State::default()
    };

    loop {
        let mut hdr = [0u8; 16];
        read_message(stream, &mut hdr)?;
        let mut c = Cursor::new(&hdr);
        let magic = c
            .take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes);
        let (Some(magic), Some(option), Some(len)) = (magic, c.u32(), c.u32()) else {
            return Err(io::Error::from(io::ErrorKind::InvalidData).into());
        };
        if magic != wire::IHAVEOPT {
            return Err(ServeError::BadMagic(magic));
        }
        debug!(option, len, "NBD option");

        if len > options.max_option_len {
            if option == wire::NBD_OPT_EXPORT_NAME {
                // Cannot be answered with an error: terminate the session.
                return Err(ServeError::OptionTooLarge { option, len });
            }
            discard(stream, u64::from(len))?;
            if option == wire::NBD_OPT_ABORT {
                // "a server SHOULD ignore any data sent by the client".
                let _ = send_reply(stream, option, wire::NBD_REP_ACK, &[]);
                return Ok(Outcome::Aborted);
            }
            send_error(
                stream,
                option,
                wire::NBD_REP_ERR_TOO_BIG,
                "option data too large",
            )?;
            continue;
        }
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        read_message(stream, &mut data).map_err(|e| match e {
            // EOF inside an option is not a clean hang-up.
            ServeError::ClientHangup => io::Error::from(io::ErrorKind::UnexpectedEof).into(),
            e => e,
        })?;

        if shutting_down(options) {
            match option {
                wire::NBD_OPT_ABORT => {}
                wire::NBD_OPT_EXPORT_NAME => return Err(ServeError::Shutdown),
                _ => {
                    send_error(
                        stream,
                        option,
                        wire::NBD_REP_ERR_SHUTDOWN,
                        "server shutting down",
                    )?;
                    continue;
                }
            }
        }

        match option {
            wire::NBD_OPT_EXPORT_NAME => {
                let session = export_name(stream, backend, options, &state, &data)?;
                return Ok(Outcome::Transmission(session));
            }
            wire::NBD_OPT_ABORT => {
                // The client may already have closed: a failed ACK is not an error.
                let _ = send_reply(stream, option, wire::NBD_REP_ACK, &[]);
                debug!("NBD client aborted negotiation");
                return Ok(Outcome::Aborted);
            }
            wire::NBD_OPT_LIST => {
                if !data.is_empty() {
                    send_error(
                        stream,
                        option,
                        wire::NBD_REP_ERR_INVALID,
                        "NBD_OPT_LIST has no data",
                    )?;
                    continue;
                }
                for name in backend.export_names() {
                    let name = wire::bounded_str(&name);
                    let mut d = Vec::new();
                    d.extend_from_slice(&wire::len32(name.len()).to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    if let Some(desc) = backend.export(name).and_then(|i| i.description) {
                        d.extend_from_slice(wire::bounded_str(&desc).as_bytes());
                    }
                    send_reply(stream, option, wire::NBD_REP_SERVER, &d)?;
                }
                send_reply(stream, option, wire::NBD_REP_ACK, &[])?;
            }
            wire::NBD_OPT_INFO | wire::NBD_OPT_GO => {
                if let Some(session) = info_or_go(stream, backend, options, &state, option, &data)?
                {
                    return Ok(Outcome::Transmission(session));
                }
            }
            wire::NBD_OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_error(
                        stream,
                        option,
                        wire::NBD_REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY has no data",
                    )?;
                    continue;
                }
                state.structured = true;
                send_reply(stream, option, wire::NBD_REP_ACK, &[])?;
            }
            wire::NBD_OPT_LIST_META_CONTEXT | wire::NBD_OPT_SET_META_CONTEXT => {
                meta_context(stream, backend, &mut state, option, &data)?;
            }
            wire::NBD_OPT_STARTTLS => {
                send_error(
                    stream,
                    option,
                    wire::NBD_REP_ERR_UNSUP,
                    "TLS is not supported",
                )?;
            }
            _ => {
                // Includes NBD_OPT_PEEK_EXPORT and NBD_OPT_EXTENDED_HEADERS.
                send_error(
                    stream,
                    option,
                    wire::NBD_REP_ERR_UNSUP,
                    "unsupported option",
                )?;
            }
        }
    }
}

fn open_session(
    backend: &dyn Backend,
    options: &ServeOptions,
    state: &State,
    name: &str,
) -> Option<Session> {
    let mut info = backend.export(name)?;
    info.block_sizes = info.block_sizes.sanitized(block_cap(options));
    let export = backend.open(name)?;
    Some(Session {
        export,
        flags: transmission_flags(&info, state.structured),
        info,
        name: name.to_owned(),
        structured: state.structured,
        contexts: state.contexts_for(name),
    })
}

/// The largest maximum block size advertised: at most the drain limit, and small enough that a
/// structured read chunk (8 + length) fits a `u32`.
pub(crate) fn block_cap(options: &ServeOptions) -> u32 {
    options.max_payload.clamp(1, 1 << 30)
}

fn export_name<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    options: &ServeOptions,
    state: &State,
    data: &[u8],
) -> Result<Session, ServeError> {
    let name = std::str::from_utf8(data)
        .map_err(|_| ServeError::UnknownExport(String::from_utf8_lossy(data).into_owned()))?;
    // Spec: an unknown export MUST terminate the session (no error can be sent).
    let session = open_session(backend, options, state, name)
        .ok_or_else(|| ServeError::UnknownExport(name.to_owned()))?;
    let mut reply = Vec::with_capacity(10 + 124);
    reply.extend_from_slice(&session.info.size.to_be_bytes());
    reply.extend_from_slice(&session.flags.to_be_bytes());
    if !state.no_zeroes {
        reply.extend_from_slice(&[0u8; 124]);
    }
    stream.write_all(&reply)?;
    stream.flush()?;
    debug!(
        export = name,
        flags = session.flags,
        "NBD_OPT_EXPORT_NAME: transmission"
    );
    Ok(session)
}

fn info_or_go<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    options: &ServeOptions,
    state: &State,
    option: u32,
    data: &[u8],
) -> Result<Option<Session>, ServeError> {
    // Data: u32 name length, name, u16 count, count x u16 information requests.
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name = c.string()?;
        let count = c.u16()?;
        let mut requests = Vec::new();
        for _ in 0..count {
            requests.push(c.u16()?);
        }
        (c.remaining() == 0).then_some((name, requests))
    })();
    let Some((name, requests)) = parsed else {
        send_error(
            stream,
            option,
            wire::NBD_REP_ERR_INVALID,
            "malformed option data",
        )?;
        return Ok(None);
    };
    let Ok(name) = std::str::from_utf8(name) else {
        send_error(
            stream,
            option,
            wire::NBD_REP_ERR_INVALID,
            "export name is not UTF-8",
        )?;
        return Ok(None);
    };

    let session = if option == wire::NBD_OPT_GO {
        open_session(backend, options, state, name)
    } else {
        None
    };
    let info = match &session {
        Some(s) => Some(s.info.clone()),
        None if option == wire::NBD_OPT_INFO => backend.export(name).map(|mut i| {
            i.block_sizes = i.block_sizes.sanitized(block_cap(options));
            i
        }),
        None => None,
    };
    let Some(info) = info else {
        send_error(stream, option, wire::NBD_REP_ERR_UNKNOWN, "unknown export")?;
        return Ok(None);
    };

    let flags = transmission_flags(&info, state.structured);
    let mut export = [0u8; 10];
    export[..8].copy_from_slice(&info.size.to_be_bytes());
    export[8..].copy_from_slice(&flags.to_be_bytes());
    info_reply(stream, option, wire::NBD_INFO_EXPORT, &export)?;
    // Requests we do not understand are ignored, duplicates answered once.
    if requests.contains(&wire::NBD_INFO_NAME) {
        info_reply(
            stream,
            option,
            wire::NBD_INFO_NAME,
            wire::bounded_str(name).as_bytes(),
        )?;
    }
    if requests.contains(&wire::NBD_INFO_DESCRIPTION) {
        if let Some(desc) = &info.description {
            info_reply(
                stream,
                option,
                wire::NBD_INFO_DESCRIPTION,
                wire::bounded_str(desc).as_bytes(),
            )?;
        }
    }
    if requests.contains(&wire::NBD_INFO_BLOCK_SIZE) {
        let b = info.block_sizes;
        let mut d = [0u8; 12];
        d[..4].copy_from_slice(&b.min.to_be_bytes());
        d[4..8].copy_from_slice(&b.preferred.to_be_bytes());
        d[8..].copy_from_slice(&b.max.to_be_bytes());
        info_reply(stream, option, wire::NBD_INFO_BLOCK_SIZE, &d)?;
    }
    send_reply(stream, option, wire::NBD_REP_ACK, &[])?;
    if let Some(s) = &session {
        debug!(
            export = name,
            flags = s.flags,
            structured = s.structured,
            contexts = ?s.contexts,
            "NBD_OPT_GO: transmission"
        );
    }
    Ok(session)
}

/// Contexts an export offers.
fn available(info: &ExportInfo) -> Vec<MetaContext> {
    let mut v = vec![MetaContext::BaseAllocation];
    if info.dirty_bitmap {
        v.push(MetaContext::DirtyBitmap);
    }
    v
}

/// Whether a `NBD_OPT_LIST_META_CONTEXT` query matches a context: the full name, or a
/// namespace wildcard (`base:`, `qemu:`, `qemu:dirty-bitmap:`; empty leaf = wildcard).
fn list_matches(query: &[u8], ctx: MetaContext) -> bool {
    let name = ctx.name().as_bytes();
    match ctx {
        MetaContext::BaseAllocation => query == b"base:" || query == name,
        MetaContext::DirtyBitmap => {
            query == b"qemu:" || query == b"qemu:dirty-bitmap:" || query == name
        }
    }
}

fn meta_context<S: Read + Write>(
    stream: &mut S,
    backend: &dyn Backend,
    state: &mut State,
    option: u32,
    data: &[u8],
) -> Result<(), ServeError> {
    let set = option == wire::NBD_OPT_SET_META_CONTEXT;
    if set {
        // "replaces all previously-set metadata contexts (including when this command fails)".
        state.contexts.clear();
        state.context_export = None;
        if !state.structured {
            send_error(
                stream,
                option,
                wire::NBD_REP_ERR_INVALID,
                "negotiate structured replies first",
            )?;
            return Ok(());
        }
    }
    // Data: u32 name length, name, u32 query count, count x (u32 length, query).
    let mut c = Cursor::new(data);
    let parsed = (|| {
        let name = c.string()?;
        let count = c.u32()?;
        let mut queries = Vec::new();
        for _ in 0..count {
            queries.push(c.string()?);
        }
        (c.remaining() == 0).then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        send_error(
            stream,
            option,
            wire::NBD_REP_ERR_INVALID,
            "malformed option data",
        )?;
        return Ok(());
    };
    let Some((name, info)) = std::str::from_utf8(name)
        .ok()
        .and_then(|n| backend.export(n).map(|i| (n, i)))
    else {
        send_error(stream, option, wire::NBD_REP_ERR_UNKNOWN, "unknown export")?;
        return Ok(());
    };

    // Queries of unknown namespaces (or without a colon) are ignored, as the spec requires.
    let selected: Vec<MetaContext> = available(&info)
        .into_iter()
        .filter(|&ctx| {
            if set {
                // Only exact names select; wildcards "SHOULD NOT select any contexts".
                queries.iter().any(|q| *q == ctx.name().as_bytes())
            } else {
                queries.is_empty() || queries.iter().any(|q| list_matches(q, ctx))
            }
        })
        .collect();
    debug!(
        export = name,
        set,
        queries = queries.len(),
        selected = ?selected,
        "NBD meta context"
    );
    for ctx in &selected {
        // LIST: "The metadata context ID in these replies is reserved and SHOULD be set to
        // zero".
        let id = if set { ctx.id() } else { 0 };
        let mut d = Vec::new();
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(ctx.name().as_bytes());
        send_reply(stream, option, wire::NBD_REP_META_CONTEXT, &d)?;
    }
    if set {
        state.contexts = selected;
        state.context_export = Some(name.to_owned());
    }
    send_reply(stream, option, wire::NBD_REP_ACK, &[])?;
    Ok(())
}
