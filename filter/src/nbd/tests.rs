//! Protocol tests: a hand-written client against [`serve`] over a Unix socket pair, with an
//! in-memory backend. Interop checks with qemu-img / qemu-io / nbdinfo run when the tools are
//! installed and are skipped otherwise.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::wire::*;
use super::*;

const GRAIN: u64 = 4096;
const DISK: u64 = 1 << 20;

/// One in-memory disk plus a dirty map (per 4 KiB) and an operation log.
#[derive(Debug, Default)]
struct MemDisk {
    data: Mutex<Vec<u8>>,
    dirty: Mutex<Vec<bool>>,
    log: Mutex<Vec<String>>,
    fail_reads: AtomicBool,
}

impl MemDisk {
    fn new(size: u64) -> Arc<Self> {
        let size = usize::try_from(size).unwrap();
        let grains = size.div_ceil(4096);
        Arc::new(MemDisk {
            data: Mutex::new(vec![0; size]),
            dirty: Mutex::new(vec![false; grains]),
            ..Default::default()
        })
    }

    fn log(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }

    fn mark(&self, offset: u64, len: u64) {
        let mut d = self.dirty.lock().unwrap();
        let mut g = offset / GRAIN;
        while g * GRAIN < offset + len {
            d[usize::try_from(g).unwrap()] = true;
            g += 1;
        }
    }
}

fn us(v: u64) -> usize {
    usize::try_from(v).unwrap()
}

impl Export for MemDisk {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        if self.fail_reads.load(Ordering::Relaxed) {
            return Err(NbdError::Io);
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[us(offset)..us(offset) + buf.len()]);
        Ok(())
    }

    fn write_buffer(&self, len: usize) -> Result<WriteBuffer, NbdError> {
        Ok(WriteBuffer::heap(len))
    }

    fn write(&self, offset: u64, data: WriteBuffer, fua: bool) -> Result<(), NbdError> {
        self.log(format!("write {offset} {} fua={fua}", data.len()));
        let mut d = self.data.lock().unwrap();
        d[us(offset)..us(offset) + data.len()].copy_from_slice(data.as_slice());
        drop(d);
        self.mark(offset, u64::try_from(data.len()).unwrap());
        Ok(())
    }

    fn flush(&self) -> Result<(), NbdError> {
        self.log("flush".into());
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), NbdError> {
        self.log(format!("trim {offset} {len} fua={fua}"));
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), NbdError> {
        self.log(format!("zero {offset} {len} fua={fua} no_hole={no_hole}"));
        self.data.lock().unwrap()[us(offset)..us(offset + len)].fill(0);
        self.mark(offset, len);
        Ok(())
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), NbdError> {
        self.log(format!("cache {offset} {len}"));
        Ok(())
    }

    fn block_status(
        &self,
        context: MetaContext,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u32, u32)>, NbdError> {
        let data = self.data.lock().unwrap();
        let dirty = self.dirty.lock().unwrap();
        let size = u64::try_from(data.len()).unwrap();
        let end = (offset + len).min(size);
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = ((pos / GRAIN + 1) * GRAIN).min(size);
            let flags = match context {
                MetaContext::BaseAllocation => {
                    if data[us(pos)..us(next)].iter().all(|&b| b == 0) {
                        NBD_STATE_HOLE | NBD_STATE_ZERO
                    } else {
                        0
                    }
                }
                MetaContext::DirtyBitmap => {
                    if dirty[us(pos / GRAIN)] {
                        NBD_STATE_DIRTY
                    } else {
                        0
                    }
                }
            };
            out.push((u32::try_from(next - pos).unwrap(), flags));
            pos = next;
        }
        Ok(out)
    }
}

#[derive(Debug)]
struct MemBackend {
    exports: HashMap<String, (ExportInfo, Arc<MemDisk>)>,
}

impl MemBackend {
    /// "data": 1 MiB, writable, dirty bitmap, max block 64 KiB; "ro": 64 KiB read-only, min
    /// block 512.
    fn new() -> Arc<Self> {
        let mut data = ExportInfo::new(DISK);
        data.dirty_bitmap = true;
        data.description = Some("test disk".into());
        data.block_sizes.max = 64 << 10;
        let mut ro = ExportInfo::new(64 << 10);
        ro.read_only = true;
        ro.block_sizes.min = 512;
        let mut exports = HashMap::new();
        exports.insert("data".to_string(), (data, MemDisk::new(DISK)));
        exports.insert("ro".to_string(), (ro, MemDisk::new(64 << 10)));
        Arc::new(MemBackend { exports })
    }

    fn disk(&self, name: &str) -> Arc<MemDisk> {
        self.exports[name].1.clone()
    }
}

impl Backend for MemBackend {
    fn export_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.exports.keys().cloned().collect();
        v.sort();
        v
    }

    fn export(&self, name: &str) -> Option<ExportInfo> {
        self.exports.get(name).map(|e| e.0.clone())
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports
            .get(name)
            .map(|e| e.1.clone() as Arc<dyn Export>)
    }
}

type Server = JoinHandle<Result<(), ServeError>>;

struct Client {
    s: UnixStream,
    backend: Arc<MemBackend>,
    server: Option<Server>,
}

fn spawn_with(backend: Arc<MemBackend>, options: ServeOptions) -> Client {
    let (c, s) = UnixStream::pair().unwrap();
    for sock in [&c, &s] {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
    }
    let b = backend.clone();
    let server = std::thread::spawn(move || serve(s, &*b, options));
    Client {
        s: c,
        backend,
        server: Some(server),
    }
}

fn spawn() -> Client {
    spawn_with(MemBackend::new(), ServeOptions::default())
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

fn name_data(name: &str) -> Vec<u8> {
    let mut d = (u32::try_from(name.len()).unwrap()).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = name_data(name);
    d.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = name_data(name);
    d.extend_from_slice(&u32::try_from(queries.len()).unwrap().to_be_bytes());
    for q in queries {
        d.extend_from_slice(&name_data(q));
    }
    d
}

#[derive(Debug)]
struct Chunk {
    flags: u16,
    kind: u16,
    handle: u64,
    payload: Vec<u8>,
}

impl Client {
    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn greet(&mut self, cflags: u32) {
        let hello = self.read_n(18);
        assert_eq!(be64(&hello), NBDMAGIC);
        assert_eq!(be64(&hello[8..]), IHAVEOPT);
        assert_eq!(
            be16(&hello[16..]),
            NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES
        );
        self.s.write_all(&cflags.to_be_bytes()).unwrap();
    }

    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// (reply type, data) of one option reply to `opt`.
    fn reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(be64(&h), REPLY_MAGIC);
        assert_eq!(be32(&h[8..]), opt);
        let len = usize::try_from(be32(&h[16..])).unwrap();
        (be32(&h[12..]), self.read_n(len))
    }

    /// Replies until a final one (ACK or error).
    fn replies(&mut self, opt: u32) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.reply(opt);
            let done = r.0 == NBD_REP_ACK || r.0 & NBD_REP_FLAG_ERROR != 0;
            v.push(r);
            if done {
                return v;
            }
        }
    }

    fn go(&mut self, name: &str) -> Vec<(u32, Vec<u8>)> {
        self.opt(NBD_OPT_GO, &go_data(name, &[NBD_INFO_BLOCK_SIZE]));
        let r = self.replies(NBD_OPT_GO);
        assert_eq!(r.last().unwrap().0, NBD_REP_ACK, "{r:?}");
        r
    }

    fn request(
        &mut self,
        flags: u16,
        kind: u16,
        handle: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = NBD_REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Simple reply: (error, handle).
    fn simple(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(be32(&h), NBD_SIMPLE_REPLY_MAGIC, "{h:?}");
        (be32(&h[4..]), be64(&h[8..]))
    }

    fn chunk(&mut self) -> Chunk {
        let h = self.read_n(20);
        assert_eq!(be32(&h), NBD_STRUCTURED_REPLY_MAGIC, "{h:?}");
        let len = usize::try_from(be32(&h[16..])).unwrap();
        Chunk {
            flags: be16(&h[4..]),
            kind: be16(&h[6..]),
            handle: be64(&h[8..]),
            payload: self.read_n(len),
        }
    }

    /// Reply to a non-read request: error value (simple or structured).
    fn status(&mut self, handle: u64) -> u32 {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        let mut rest = vec![0u8; 12];
        self.s.read_exact(&mut rest).unwrap();
        if be32(&magic) == NBD_SIMPLE_REPLY_MAGIC {
            assert_eq!(be64(&rest[4..]), handle);
            return be32(&rest);
        }
        assert_eq!(be32(&magic), NBD_STRUCTURED_REPLY_MAGIC);
        let more = self.read_n(4);
        let len = usize::try_from(be32(&more)).unwrap();
        let payload = self.read_n(len);
        assert_eq!(be64(&rest[4..]), handle);
        assert_eq!(be16(&rest[2..]), NBD_REPLY_TYPE_ERROR);
        assert_eq!(be16(&rest) & NBD_REPLY_FLAG_DONE, NBD_REPLY_FLAG_DONE);
        let msg_len = usize::from(be16(&payload[4..]));
        assert_eq!(payload.len(), 6 + msg_len);
        be32(&payload)
    }

    /// Structured read: the data, from one OFFSET_DATA chunk.
    fn sread(&mut self, handle: u64, offset: u64, len: u32, flags: u16) -> Result<Vec<u8>, u32> {
        self.request(flags, NBD_CMD_READ, handle, offset, len, &[]);
        let c = self.chunk();
        assert_eq!(c.handle, handle);
        assert_eq!(c.flags, NBD_REPLY_FLAG_DONE);
        match c.kind {
            NBD_REPLY_TYPE_OFFSET_DATA => {
                assert_eq!(be64(&c.payload), offset);
                Ok(c.payload[8..].to_vec())
            }
            NBD_REPLY_TYPE_ERROR => Err(be32(&c.payload)),
            k => panic!("unexpected chunk type {k}"),
        }
    }

    fn finish(&mut self) -> Result<(), ServeError> {
        self.server.take().unwrap().join().unwrap()
    }

    fn disc(mut self) {
        self.request(0, NBD_CMD_DISC, 99, 0, 0, &[]);
        self.finish().unwrap();
        let mut b = [0u8; 1];
        assert_eq!(self.s.read(&mut b).unwrap(), 0, "server closes after DISC");
    }
}

/// Handshake with structured replies, both contexts selected, GO on "data".
fn structured_client() -> Client {
    let mut c = spawn();
    c.greet(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply(NBD_OPT_STRUCTURED_REPLY).0, NBD_REP_ACK);
    c.opt(
        NBD_OPT_SET_META_CONTEXT,
        &meta_data("data", &[CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP]),
    );
    let r = c.replies(NBD_OPT_SET_META_CONTEXT);
    assert_eq!(r.len(), 3, "{r:?}");
    c.go("data");
    c
}

/// Handshake with simple replies, GO on `name`.
fn simple_client(name: &str) -> Client {
    let mut c = spawn();
    c.greet(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    c.go(name);
    c
}

#[test]
fn list_exports() {
    let mut c = spawn();
    c.greet(NBD_FLAG_C_FIXED_NEWSTYLE);
    c.opt(NBD_OPT_LIST, &[]);
    let r = c.replies(NBD_OPT_LIST);
    assert_eq!(r.len(), 3);
    assert_eq!(r[0].0, NBD_REP_SERVER);
    assert_eq!(be32(&r[0].1), 4);
    assert_eq!(&r[0].1[4..], b"datatest disk");
    assert_eq!(&r[1].1[4..], b"ro");
    assert_eq!(r[2], (NBD_REP_ACK, vec![]));
    // With data: invalid, and parsing goes on.
    c.opt(NBD_OPT_LIST, b"x");
    assert_eq!(c.reply(NBD_OPT_LIST).0, NBD_REP_ERR_INVALID);
    c.opt(NBD_OPT_ABORT, &[]);
    assert_eq!(c.reply(NBD_OPT_ABORT).0, NBD_REP_ACK);
    c.finish().unwrap();
}

#[test]
fn info_with_block_size_then_go() {
    let mut c = spawn();
    c.greet(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    let infos = [NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, NBD_INFO_DESCRIPTION, 77];
    c.opt(NBD_OPT_INFO, &go_data("ro", &infos));
    let r = c.replies(NBD_OPT_INFO);
    let mut seen = HashMap::new();
    for (t, d) in &r[..r.len() - 1] {
        assert_eq!(*t, NBD_REP_INFO);
        seen.insert(be16(d), d[2..].to_vec());
    }
    assert_eq!(r.last().unwrap().0, NBD_REP_ACK);
    let export = &seen[&NBD_INFO_EXPORT];
    assert_eq!(be64(export), 64 << 10);
    let flags = be16(&export[8..]);
    assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0);
    assert_ne!(flags & NBD_FLAG_READ_ONLY, 0);
    assert_ne!(flags & NBD_FLAG_SEND_FLUSH, 0);
    assert_eq!(
        flags & (NBD_FLAG_SEND_DF | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_TRIM),
        0
    );
    let bs = &seen[&NBD_INFO_BLOCK_SIZE];
    assert_eq!(
        (be32(bs), be32(&bs[4..]), be32(&bs[8..])),
        (512, 4096, DEFAULT_MAX_BLOCK)
    );
    assert_eq!(seen[&NBD_INFO_NAME], b"ro");
    assert!(
        !seen.contains_key(&NBD_INFO_DESCRIPTION),
        "ro has no description"
    );

    c.opt(NBD_OPT_INFO, &go_data("data", &[NBD_INFO_DESCRIPTION]));
    let r = c.replies(NBD_OPT_INFO);
    assert!(r
        .iter()
        .any(|(_, d)| d.len() > 2 && be16(d) == NBD_INFO_DESCRIPTION && &d[2..] == b"test disk"));

    // Unknown export, malformed data.
    c.opt(NBD_OPT_INFO, &go_data("nope", &[]));
    assert_eq!(
        c.replies(NBD_OPT_INFO),
        vec![(NBD_REP_ERR_UNKNOWN, b"unknown export".to_vec())]
    );
    let mut bad = go_data("data", &[1, 2]);
    bad.push(0);
    c.opt(NBD_OPT_GO, &bad);
    assert_eq!(c.reply(NBD_OPT_GO).0, NBD_REP_ERR_INVALID);
    c.opt(NBD_OPT_GO, &[0, 0, 0, 9, b'd']);
    assert_eq!(c.reply(NBD_OPT_GO).0, NBD_REP_ERR_INVALID);

    let r = c.go("data");
    let export = r.iter().find(|(_, d)| be16(d) == NBD_INFO_EXPORT).unwrap();
    assert_eq!(be64(&export.1[2..]), DISK);
    let bs = r
        .iter()
        .find(|(_, d)| be16(d) == NBD_INFO_BLOCK_SIZE)
        .unwrap();
    assert_eq!(be32(&bs.1[10..]), 64 << 10, "export's max block");
    c.request(0, NBD_CMD_READ, 1, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 1));
    assert_eq!(c.read_n(512), vec![0; 512]);
    c.disc();
}

#[test]
fn export_name_with_and_without_zeroes() {
    for no_zeroes in [false, true] {
        let mut c = spawn();
        let cflags = if no_zeroes { 3 } else { 1 };
        c.greet(cflags);
        c.opt(NBD_OPT_EXPORT_NAME, b"data");
        let r = c.read_n(10);
        assert_eq!(be64(&r), DISK);
        let flags = be16(&r[8..]);
        assert_eq!(flags & NBD_FLAG_SEND_DF, 0, "no structured replies");
        assert_ne!(flags & NBD_FLAG_SEND_TRIM, 0);
        if !no_zeroes {
            assert_eq!(c.read_n(124), vec![0; 124]);
        }
        c.request(0, NBD_CMD_READ, 7, 4096, 16, &[]);
        assert_eq!(c.simple(), (0, 7));
        assert_eq!(c.read_n(16), vec![0; 16]);
        c.disc();
    }
}

#[test]
fn export_name_unknown_drops() {
    let mut c = spawn();
    c.greet(1);
    c.opt(NBD_OPT_EXPORT_NAME, b"nope");
    assert!(matches!(c.finish(), Err(ServeError::UnknownExport(n)) if n == "nope"));
}

#[test]
fn abort_acks_and_closes() {
    let mut c = spawn();
    c.greet(1);
    c.opt(NBD_OPT_ABORT, b"ignored");
    assert_eq!(c.reply(NBD_OPT_ABORT), (NBD_REP_ACK, vec![]));
    c.finish().unwrap();
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).unwrap(), 0);
}

#[test]
fn unknown_options_unsup_then_go() {
    let mut c = spawn();
    c.greet(3);
    for opt in [
        99,
        NBD_OPT_STARTTLS,
        NBD_OPT_EXTENDED_HEADERS,
        NBD_OPT_PEEK_EXPORT,
        0,
    ] {
        c.opt(opt, b"some data");
        assert_eq!(c.reply(opt).0, NBD_REP_ERR_UNSUP, "option {opt}");
    }
    c.opt(NBD_OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.reply(NBD_OPT_STRUCTURED_REPLY).0, NBD_REP_ERR_INVALID);
    // Oversized option: drained, TOO_BIG, still in sync.
    c.opt(42, &vec![7u8; 70 << 10]);
    assert_eq!(c.reply(42).0, NBD_REP_ERR_TOO_BIG);
    c.go("data");
    c.request(0, NBD_CMD_FLUSH, 1, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 1));
    c.disc();
}

#[test]
fn meta_contexts_list_and_set() {
    let mut c = spawn();
    c.greet(3);
    // SET before structured replies: invalid.
    c.opt(
        NBD_OPT_SET_META_CONTEXT,
        &meta_data("data", &[CONTEXT_BASE_ALLOCATION]),
    );
    assert_eq!(c.reply(NBD_OPT_SET_META_CONTEXT).0, NBD_REP_ERR_INVALID);
    c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply(NBD_OPT_STRUCTURED_REPLY).0, NBD_REP_ACK);

    let names = |r: &[(u32, Vec<u8>)]| -> Vec<String> {
        r.iter()
            .filter(|(t, _)| *t == NBD_REP_META_CONTEXT)
            .map(|(_, d)| String::from_utf8(d[4..].to_vec()).unwrap())
            .collect()
    };
    let list = |c: &mut Client, export: &str, q: &[&str]| {
        c.opt(NBD_OPT_LIST_META_CONTEXT, &meta_data(export, q));
        let r = c.replies(NBD_OPT_LIST_META_CONTEXT);
        assert_eq!(r.last().unwrap().0, NBD_REP_ACK, "{r:?}");
        for (t, d) in &r {
            if *t == NBD_REP_META_CONTEXT {
                assert_eq!(be32(d), 0, "LIST ids are 0");
            }
        }
        names(&r)
    };
    let both = vec![
        CONTEXT_BASE_ALLOCATION.to_string(),
        CONTEXT_DIRTY_BITMAP.to_string(),
    ];
    assert_eq!(list(&mut c, "data", &[]), both);
    assert_eq!(
        list(&mut c, "ro", &[]),
        vec![CONTEXT_BASE_ALLOCATION.to_string()]
    );
    assert_eq!(
        list(&mut c, "data", &["base:"]),
        vec![CONTEXT_BASE_ALLOCATION.to_string()]
    );
    assert_eq!(
        list(&mut c, "data", &["qemu:dirty-bitmap:"]),
        vec![CONTEXT_DIRTY_BITMAP.to_string()]
    );
    assert_eq!(
        list(&mut c, "data", &["qemu:"]),
        vec![CONTEXT_DIRTY_BITMAP.to_string()]
    );
    assert_eq!(
        list(&mut c, "data", &["x-foo:bar", "nocolon", "base:nope"]),
        Vec::<String>::new()
    );
    assert_eq!(list(&mut c, "data", &["qemu:", "base:allocation"]), both);
    // Unknown export, malformed.
    c.opt(NBD_OPT_LIST_META_CONTEXT, &meta_data("nope", &[]));
    assert_eq!(c.reply(NBD_OPT_LIST_META_CONTEXT).0, NBD_REP_ERR_UNKNOWN);
    let mut bad = meta_data("data", &["base:"]);
    bad.pop();
    c.opt(NBD_OPT_LIST_META_CONTEXT, &bad);
    assert_eq!(c.reply(NBD_OPT_LIST_META_CONTEXT).0, NBD_REP_ERR_INVALID);
    let mut huge = name_data("data");
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    c.opt(NBD_OPT_SET_META_CONTEXT, &huge);
    assert_eq!(c.reply(NBD_OPT_SET_META_CONTEXT).0, NBD_REP_ERR_INVALID);

    // SET: wildcards select nothing; exact names select with distinct nonzero ids.
    c.opt(
        NBD_OPT_SET_META_CONTEXT,
        &meta_data("data", &["base:", "qemu:dirty-bitmap:"]),
    );
    assert_eq!(
        c.replies(NBD_OPT_SET_META_CONTEXT),
        vec![(NBD_REP_ACK, vec![])]
    );
    c.opt(
        NBD_OPT_SET_META_CONTEXT,
        &meta_data(
            "data",
            &[CONTEXT_DIRTY_BITMAP, CONTEXT_BASE_ALLOCATION, "x-a:b"],
        ),
    );
    let r = c.replies(NBD_OPT_SET_META_CONTEXT);
    assert_eq!(names(&r), both);
    let ids: Vec<u32> = r[..2].iter().map(|(_, d)| be32(d)).collect();
    assert!(ids[0] != ids[1] && !ids.contains(&0));
    c.go("data");
    c.disc();
}

#[test]
fn contexts_for_another_export_are_dropped() {
    let mut c = spawn();
    c.greet(3);
    c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
    c.reply(NBD_OPT_STRUCTURED_REPLY);
    c.opt(
        NBD_OPT_SET_META_CONTEXT,
        &meta_data("ro", &[CONTEXT_BASE_ALLOCATION]),
    );
    assert_eq!(c.replies(NBD_OPT_SET_META_CONTEXT).len(), 2);
    c.go("data");
    c.request(0, NBD_CMD_BLOCK_STATUS, 1, 0, 4096, &[]);
    assert_eq!(c.status(1), NbdError::Inval.code());
    c.disc();
}

#[test]
fn structured_read_write_and_fua() {
    let mut c = structured_client();
    let pattern: Vec<u8> = (0..8192u32)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect();
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 1, 8192, 8192, &pattern);
    assert_eq!(c.status(1), 0);
    c.request(0, NBD_CMD_WRITE, 2, 0, 10, &[1; 10]);
    assert_eq!(c.status(2), 0);
    assert_eq!(c.sread(3, 8192, 8192, 0).unwrap(), pattern);
    assert_eq!(
        c.sread(4, 8190, 4, NBD_CMD_FLAG_DF).unwrap(),
        vec![0, 0, 0, 1]
    );
    // Zero-length read: a NONE chunk.
    c.request(0, NBD_CMD_READ, 5, 0, 0, &[]);
    let ch = c.chunk();
    assert_eq!(
        (ch.kind, ch.flags, ch.handle),
        (NBD_REPLY_TYPE_NONE, NBD_REPLY_FLAG_DONE, 5)
    );
    let log = c.backend.disk("data").log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec!["write 8192 8192 fua=true", "write 0 10 fua=false"]
    );
    // Read error: structured error chunk.
    c.backend
        .disk("data")
        .fail_reads
        .store(true, Ordering::Relaxed);
    assert_eq!(c.sread(6, 0, 512, 0), Err(NbdError::Io.code()));
    c.backend
        .disk("data")
        .fail_reads
        .store(false, Ordering::Relaxed);
    // Invalid read under structured replies: error chunk, never a simple reply.
    assert_eq!(c.sread(7, DISK - 1, 2, 0), Err(NbdError::Inval.code()));
    assert_eq!(c.sread(8, 0, 1, 1 << 7), Err(NbdError::Inval.code()));
    c.disc();
}

#[test]
fn simple_write_read_back_and_errors() {
    let mut c = simple_client("data");
    c.request(0, NBD_CMD_WRITE, 1, 100, 5, b"hello");
    assert_eq!(c.simple(), (0, 1));
    c.request(0, NBD_CMD_READ, 2, 98, 9, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.read_n(9), b"\0\0hello\0\0");

    // Flush with a length: EINVAL, connection still usable.
    c.request(0, NBD_CMD_FLUSH, 3, 0, 512, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 3));
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 4));

    // Write past the end: ENOSPC, payload drained.
    c.request(0, NBD_CMD_WRITE, 5, DISK - 4, 8, b"ABCDEFGH");
    assert_eq!(c.simple(), (NbdError::NoSpc.code(), 5));
    c.request(0, NBD_CMD_WRITE, 6, u64::MAX - 2, 8, b"ABCDEFGH");
    assert_eq!(c.simple(), (NbdError::NoSpc.code(), 6));
    // Over the maximum block size (64 KiB here): EINVAL, payload drained.
    c.request(0, NBD_CMD_WRITE, 7, 0, 128 << 10, &vec![0xAA; 128 << 10]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 7));
    // Unknown flag on a write: EINVAL, payload drained.
    c.request(1 << 9, NBD_CMD_WRITE, 8, 0, 3, b"xyz");
    assert_eq!(c.simple(), (NbdError::Inval.code(), 8));

    // Unknown command, unknown/invalid flags.
    c.request(0, 42, 9, 0, 0, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 9));
    c.request(1 << 12, NBD_CMD_READ, 10, 0, 1, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 10));
    c.request(NBD_CMD_FLAG_DF, NBD_CMD_READ, 11, 0, 1, &[]);
    assert_eq!(
        c.simple(),
        (NbdError::Inval.code(), 11),
        "DF needs structured replies"
    );
    c.request(NBD_CMD_FLAG_NO_HOLE, NBD_CMD_TRIM, 12, 0, 1, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 12));
    c.request(NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES, 13, 0, 1, &[]);
    assert_eq!(
        c.simple(),
        (NbdError::Inval.code(), 13),
        "fast zero not advertised"
    );
    // Block status without structured replies / contexts.
    c.request(0, NBD_CMD_BLOCK_STATUS, 14, 0, 512, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 14));
    // Out of range.
    c.request(0, NBD_CMD_READ, 15, DISK, 1, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 15));
    c.request(0, NBD_CMD_TRIM, 16, DISK - 1, 2, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 16));
    c.request(0, NBD_CMD_WRITE_ZEROES, 17, DISK, 1, &[]);
    assert_eq!(c.simple(), (NbdError::NoSpc.code(), 17));
    c.request(0, NBD_CMD_CACHE, 18, DISK, 1, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 18));

    // Trim, zeroes, cache with flags passed through.
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_TRIM, 19, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 19));
    c.request(NBD_CMD_FLAG_NO_HOLE, NBD_CMD_WRITE_ZEROES, 20, 100, 2, &[]);
    assert_eq!(c.simple(), (0, 20));
    c.request(0, NBD_CMD_CACHE, 21, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 21));
    c.request(0, NBD_CMD_READ, 22, 100, 5, &[]);
    assert_eq!(c.simple(), (0, 22));
    assert_eq!(c.read_n(5), b"\0\0llo");

    let log = c.backend.disk("data").log.lock().unwrap().clone();
    assert_eq!(
        log,
        vec![
            "write 100 5 fua=false",
            "flush",
            "trim 0 4096 fua=true",
            "zero 100 2 fua=false no_hole=true",
            "cache 0 4096",
        ]
    );
    c.disc();
}

#[test]
fn read_only_and_alignment() {
    let mut c = simple_client("ro");
    c.request(0, NBD_CMD_WRITE, 1, 0, 512, &[1; 512]);
    assert_eq!(c.simple(), (NbdError::Perm.code(), 1));
    c.request(0, NBD_CMD_WRITE_ZEROES, 2, 0, 512, &[]);
    // Zeroes are not advertised on a read-only export... but can_zero is set: EPERM.
    assert_eq!(c.simple(), (NbdError::Perm.code(), 2));
    c.request(0, NBD_CMD_READ, 3, 1, 512, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 3));
    c.request(0, NBD_CMD_READ, 4, 512, 100, &[]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 4));
    c.request(0, NBD_CMD_READ, 5, 512, 1024, &[]);
    assert_eq!(c.simple(), (0, 5));
    assert_eq!(c.read_n(1024), vec![0; 1024]);
    assert!(c.backend.disk("ro").log.lock().unwrap().is_empty());
    c.disc();
}

#[test]
fn block_status_both_contexts() {
    let mut c = structured_client();
    c.request(0, NBD_CMD_WRITE, 1, 8192, 4096, &[9; 4096]);
    assert_eq!(c.status(1), 0);

    let status = |c: &mut Client, handle: u64, flags: u16, offset: u64, len: u32| {
        c.request(flags, NBD_CMD_BLOCK_STATUS, handle, offset, len, &[]);
        let mut by_id = HashMap::new();
        loop {
            let ch = c.chunk();
            assert_eq!(ch.handle, handle);
            assert_eq!(ch.kind, NBD_REPLY_TYPE_BLOCK_STATUS, "{ch:?}");
            let ext: Vec<(u32, u32)> = ch.payload[4..]
                .chunks(8)
                .map(|e| (be32(e), be32(&e[4..])))
                .collect();
            by_id.insert(be32(&ch.payload), ext);
            if ch.flags & NBD_REPLY_FLAG_DONE != 0 {
                return by_id;
            }
        }
    };
    let base = MetaContext::BaseAllocation.id();
    let dirty = MetaContext::DirtyBitmap.id();
    let hz = NBD_STATE_HOLE | NBD_STATE_ZERO;

    let r = status(&mut c, 2, 0, 0, 65536);
    assert_eq!(r[&base], vec![(8192, hz), (4096, 0), (65536 - 12288, hz)]);
    assert_eq!(
        r[&dirty],
        vec![(8192, 0), (4096, NBD_STATE_DIRTY), (65536 - 12288, 0)]
    );

    let r = status(&mut c, 3, NBD_CMD_FLAG_REQ_ONE, 0, 65536);
    assert_eq!(r[&base], vec![(8192, hz)]);
    assert_eq!(r[&dirty], vec![(8192, 0)]);
    let r = status(&mut c, 4, NBD_CMD_FLAG_REQ_ONE, 8192, 100);
    assert_eq!(r[&base], vec![(100, 0)]);
    assert_eq!(r[&dirty], vec![(100, NBD_STATE_DIRTY)]);
    // Near the end: never past the export.
    let r = status(&mut c, 5, 0, DISK - 4096, 4096);
    assert_eq!(r[&base], vec![(4096, hz)]);

    // Out of range / zero length / bad flag.
    c.request(0, NBD_CMD_BLOCK_STATUS, 6, DISK, 1, &[]);
    assert_eq!(c.status(6), NbdError::Inval.code());
    c.request(0, NBD_CMD_BLOCK_STATUS, 7, 0, 0, &[]);
    assert_eq!(c.status(7), NbdError::Inval.code());
    c.request(NBD_CMD_FLAG_DF, NBD_CMD_BLOCK_STATUS, 8, 0, 1, &[]);
    assert_eq!(c.status(8), NbdError::Inval.code());
    c.disc();
}

#[test]
fn oversized_write_payload_drops_connection() {
    let options = ServeOptions {
        max_payload: 1 << 20,
        ..ServeOptions::default()
    };
    let mut c = spawn_with(MemBackend::new(), options);
    c.greet(3);
    c.go("data");
    c.request(0, NBD_CMD_WRITE, 1, 0, 2 << 20, &[]);
    assert!(matches!(c.finish(), Err(ServeError::PayloadTooLarge(_))));
}

#[test]
fn shutdown_flag_refuses() {
    let flag = Arc::new(AtomicBool::new(false));
    let options = ServeOptions {
        shutdown: Some(flag.clone()),
        ..ServeOptions::default()
    };
    let mut c = spawn_with(MemBackend::new(), options);
    c.greet(3);
    c.go("data");
    flag.store(true, Ordering::Release);
    c.request(0, NBD_CMD_WRITE, 1, 0, 4, b"abcd");
    assert_eq!(c.simple(), (NbdError::Shutdown.code(), 1));
    c.request(0, NBD_CMD_READ, 2, 0, 4, &[]);
    assert_eq!(c.simple(), (NbdError::Shutdown.code(), 2));
    c.disc();
}

#[test]
fn bad_handshakes_error_without_panic() {
    // Unknown client flag.
    let mut c = spawn();
    c.greet(1 << 5);
    assert!(matches!(
        c.finish(),
        Err(ServeError::UnknownClientFlags(32))
    ));
    // Hang-up before client flags, and in the middle of them.
    let mut c = spawn();
    c.read_n(18);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(c.finish(), Err(ServeError::ClientHangup)));
    let mut c = spawn();
    c.read_n(18);
    c.s.write_all(&[0, 0]).unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(c.finish(), Err(ServeError::Io(_))));
    // Garbage option magic.
    let mut c = spawn();
    c.greet(1);
    c.s.write_all(b"GARBAGE!\0\0\0\x07\0\0\0\0").unwrap();
    assert!(matches!(c.finish(), Err(ServeError::BadMagic(_))));
    // Truncated option data.
    let mut c = spawn();
    c.greet(1);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0; 10]);
    c.s.write_all(&b).unwrap();
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(c.finish(), Err(ServeError::Io(_))));
    // Bad request magic in transmission.
    let mut c = simple_client("data");
    c.s.write_all(&[0x55; 28]).unwrap();
    assert!(matches!(c.finish(), Err(ServeError::BadMagic(_))));
    // Truncated write payload.
    let mut c = simple_client("data");
    c.request(0, NBD_CMD_WRITE, 1, 0, 100, &[1; 10]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(c.finish(), Err(ServeError::Io(_))));
    // Hang-up in transmission without DISC.
    let mut c = simple_client("data");
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(matches!(c.finish(), Err(ServeError::ClientHangup)));
}

#[test]
fn transmission_only_like_the_kernel() {
    let backend = MemBackend::new();
    let disk = backend.disk("data");
    let mut info = backend.export("data").unwrap();
    info.block_sizes.min = 512;
    let flags = transmission_flags(&info, false);
    assert_eq!(flags & NBD_FLAG_SEND_DF, 0);
    assert_ne!(flags & NBD_FLAG_SEND_FLUSH, 0);
    let (c, s) = UnixStream::pair().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let export: Arc<dyn Export> = disk.clone();
    let server =
        std::thread::spawn(move || serve_transmission(s, export, info, ServeOptions::default()));
    let mut c = Client {
        s: c,
        backend,
        server: Some(server),
    };
    c.request(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 1, 512, 512, &[3; 512]);
    assert_eq!(c.simple(), (0, 1));
    c.request(0, NBD_CMD_WRITE, 2, 100, 512, &[3; 512]);
    assert_eq!(c.simple(), (NbdError::Inval.code(), 2), "misaligned");
    c.request(0, NBD_CMD_FLUSH, 3, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 3));
    c.request(0, NBD_CMD_READ, 4, 0, 1024, &[]);
    assert_eq!(c.simple(), (0, 4));
    let data = c.read_n(1024);
    assert!(data[..512].iter().all(|&b| b == 0) && data[512..].iter().all(|&b| b == 3));
    assert_eq!(
        *disk.log.lock().unwrap(),
        vec!["write 512 512 fua=true", "flush"]
    );
    c.disc();
}

#[test]
fn block_sizes_are_sanitized() {
    let ok = BlockSizes {
        min: 512,
        preferred: 4096,
        max: 1 << 20,
    };
    assert_eq!(ok.sanitized(64 << 20), ok);
    let bad = BlockSizes {
        min: 3,
        preferred: 100,
        max: 1 << 31,
    };
    assert_eq!(
        bad.sanitized(64 << 20),
        BlockSizes {
            min: 1,
            preferred: 4096,
            max: 64 << 20
        }
    );
    let odd_max = BlockSizes {
        min: 4096,
        preferred: 512,
        max: 10_000,
    };
    assert_eq!(
        odd_max.sanitized(64 << 20),
        BlockSizes {
            min: 4096,
            preferred: 4096,
            max: 8192
        }
    );
}

/// Feeds `bytes` to a server (after a valid handshake if `handshake`), drains everything it
/// sends, and checks it ends without panicking or hanging.
fn feed(bytes: &[u8], handshake: bool) {
    let mut c = spawn();
    if handshake {
        c.greet(3);
        c.opt(NBD_OPT_STRUCTURED_REPLY, &[]);
        c.reply(NBD_OPT_STRUCTURED_REPLY);
        c.opt(
            NBD_OPT_SET_META_CONTEXT,
            &meta_data("data", &[CONTEXT_BASE_ALLOCATION, CONTEXT_DIRTY_BITMAP]),
        );
        c.replies(NBD_OPT_SET_META_CONTEXT);
        c.go("data");
    }
    let mut reader = c.s.try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
    });
    // The server may close early; a failed write is fine.
    let _ = c.s.write_all(bytes);
    let _ = c.s.shutdown(std::net::Shutdown::Write);
    // Must end: on EOF, a protocol error, or DISC; the 10 s socket timeouts bound a hang.
    let result = c.server.take().unwrap().join().expect("server panicked");
    if let Err(ServeError::Io(e)) = &result {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "server hung: {e}"
        );
    }
    drain.join().unwrap();
}

/// Valid request headers with random fields, so the fuzz reaches the command handlers.
fn requests_from(seed: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for w in seed.chunks(8) {
        let pick = |i: usize| w.get(i).copied().unwrap_or(0);
        let kind = u16::from(pick(0) % 10);
        let flags = u16::from(pick(1) & 0x1f);
        let offset = u64::from(pick(2)) * 4096 + u64::from(pick(3));
        let len = u32::from(pick(4)) * 256 + u32::from(pick(5));
        out.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&7u64.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        if kind == NBD_CMD_WRITE {
            out.extend_from_slice(&vec![pick(6); usize::try_from(len).unwrap()]);
        }
    }
    out
}

mod fuzz {
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_after_handshake(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            super::feed(&bytes, true);
        }

        #[test]
        fn random_bytes_as_handshake(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            super::feed(&bytes, false);
        }

        #[test]
        fn random_requests(seed in proptest::collection::vec(any::<u8>(), 0..400)) {
            super::feed(&super::requests_from(&seed), true);
        }
    }
}

// --- Interop with real clients (skipped when the tools are missing) ---

fn tool(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Serves a fresh MemBackend on a Unix socket in a temporary directory; the accept thread
/// lives until the test process exits.
fn unix_server() -> (PathBuf, Arc<MemBackend>) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "ferry-nbd-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("nbd.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let backend = MemBackend::new();
    let b = backend.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let b = b.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                let _ = serve(conn, &*b, ServeOptions::default());
            });
        }
    });
    (path, backend)
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd} {args:?} failed: {text}");
    text
}

fn uri(path: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", path.display())
}

#[test]
fn interop_qemu() {
    if !tool("qemu-img") || !tool("qemu-io") {
        eprintln!("qemu-img / qemu-io not installed: skipped");
        return;
    }
    let (path, backend) = unix_server();
    let u = uri(&path, "data");
    let info = run("qemu-img", &["info", "--output=json", &u]);
    assert!(info.contains("\"virtual-size\": 1048576"), "{info}");
    let io = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            &u,
            "-c",
            "write -P 0x55 0 64k",
            "-c",
            "read -P 0x55 0 64k",
            "-c",
            "write -z 64k 4k",
            "-c",
            "discard 128k 4k",
            "-c",
            "flush",
            "-c",
            "write -P 0x66 -f 200k 4k",
            "-c",
            "read -P 0x66 200k 4k",
        ],
    );
    assert!(!io.contains("failed") && !io.contains("error"), "{io}");
    let data = backend.disk("data").data.lock().unwrap().clone();
    assert!(data[..64 << 10].iter().all(|&b| b == 0x55));
    assert!(data[200 << 10..204 << 10].iter().all(|&b| b == 0x66));
    let log = backend.disk("data").log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l == "flush"), "{log:?}");
    assert!(
        log.iter().any(|l| l.starts_with("zero 65536 4096")),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.starts_with("trim 131072 4096")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("write 204800 4096 fua=true")),
        "{log:?}"
    );
    // qemu's block status client (base:allocation): data at 0..64k, zeroes after 64k.
    let map = run("qemu-img", &["map", "--output=json", &u]);
    assert!(map.contains(r#""start": 0, "length": 65536"#), "{map}");
    // convert into the export (writes, zeroes, flush).
    let src = path.with_file_name("src.raw");
    std::fs::write(&src, vec![0x77u8; 256 << 10]).unwrap();
    let src = src.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &u],
    );
    let data = backend.disk("data").data.lock().unwrap().clone();
    assert!(data[..256 << 10].iter().all(|&b| b == 0x77));
    // Read-only export.
    let ro = run("qemu-img", &["info", &uri(&path, "ro")]);
    assert!(ro.contains("64 KiB"), "{ro}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn interop_nbdinfo() {
    if !tool("nbdinfo") {
        eprintln!("nbdinfo not installed: skipped");
        return;
    }
    let (path, backend) = unix_server();
    let disk = backend.disk("data");
    disk.data.lock().unwrap()[8192..12288].fill(1);
    disk.mark(8192, 4096);
    let u = uri(&path, "data");
    let info = run("nbdinfo", &[&u]);
    assert!(info.contains("export-size: 1048576"), "{info}");
    assert!(info.contains("base:allocation"), "{info}");
    assert!(info.contains(CONTEXT_DIRTY_BITMAP), "{info}");
    assert!(info.contains("block_size_maximum: 65536"), "{info}");
    let list = run(
        "nbdinfo",
        &["--list", &format!("nbd+unix://?socket={}", path.display())],
    );
    assert!(
        list.contains("export=\"data\"") || list.contains("data"),
        "{list}"
    );
    assert!(list.contains("\"ro\"") || list.contains("ro"), "{list}");
    let map = run("nbdinfo", &["--map", &u]);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["0", "8192", "3"], "{map}");
    assert_eq!(rows[1][..3], ["8192", "4096", "0"], "{map}");
    assert_eq!(rows[2][..3], ["12288", "1036288", "3"], "{map}");
    let map = run("nbdinfo", &[&format!("--map={CONTEXT_DIRTY_BITMAP}"), &u]);
    let rows: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[1][..3], ["8192", "4096", "1"], "{map}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// A client that pipelines many writes and vanishes without reading a single
/// reply: the connection must end (workers stop on the broken socket and
/// drop what is queued, so the reader never blocks on a full queue).
#[test]
fn pipelined_writes_from_a_vanished_client_end_the_connection() {
    let mut c = simple_client("data");
    let payload = vec![0x5au8; 4096];
    for handle in 0..64u64 {
        c.request(0, NBD_CMD_WRITE, handle, handle * 4096, 4096, &payload);
    }
    let server = c.server.take().unwrap();
    // Hang up both directions without reading the replies.
    let _ = c.s.shutdown(std::net::Shutdown::Both);
    drop(c);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "connection did not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = server.join().unwrap();
}
