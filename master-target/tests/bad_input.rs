//! Bad input against a real `ferry target` (`daemon::run` on 127.0.0.1:0
//! with real credentials and mutual TLS): every refusal is a `Reject` with
//! the documented code (or, for a client certificate of another CA, a TLS
//! refusal), the connection is closed afterwards, and nothing is corrupted:
//! a well-behaved client then appends the next change set of the same disk,
//! and the journal read back after the daemon stopped holds exactly the
//! valid change sets.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_master_target::daemon::{self, TargetConfig};
use ferry_master_target::journal::Journal;
use ferry_master_target::server::{Refusal, RefusalLog};
use ferry_master_target::site::{read_statuses, HOSTS_DIR};
use ferry_protocol::credentials;
use ferry_protocol::frame::{self, encode_header, HEADER_LEN};
use ferry_protocol::message::{
    encode_header_aad, kind, reject, Ack, ChangeKind, ChangeSet, ChangeSetHeader, DiskHello,
    Extent, ExtentOp, Hello, Message, Reject, Welcome, PROTOCOL_VERSION,
};
use ferry_protocol::payload::{pack_change_set, Key};
use ferry_protocol::tls;

/// Disk size announced in every Hello.
const DISK_SIZE: u64 = 16 << 20;
/// Bound on every blocking client read or write (a hang fails the test
/// instead of stalling it; no test waits for it to pass).
const IO_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- fixtures

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A unique temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let p = std::env::temp_dir().join(format!(
            "ferry-bad-input-{tag}-{}-{n}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn names(n: &[&str]) -> Vec<String> {
    n.iter().map(|s| (*s).to_owned()).collect()
}

/// A running target; stopped and joined on drop (also when a test fails).
struct Target {
    addr: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<ferry_master_target::Result<()>>>,
    // Dropped after the daemon is joined (fields drop after `Drop::drop`).
    tmp: TempDir,
}

impl Target {
    fn start(tag: &str) -> Target {
        Target::start_with(tag, |_| {})
    }

    /// Credentials for web01 and web02 in `TMP/creds`, data in `TMP/data`.
    fn start_with(tag: &str, tune: impl FnOnce(&mut TargetConfig)) -> Target {
        let tmp = TempDir::new(tag);
        let creds = tmp.path().join("creds");
        credentials::init(&creds, &names(&["web01", "web02"]), "target", false).unwrap();
        let mut cfg = TargetConfig::new(
            tmp.path().join("data"),
            "127.0.0.1:0".to_owned(),
            creds.clone(),
        );
        tune(&mut cfg);
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name(format!("target-{tag}"))
                .spawn(move || {
                    daemon::run(cfg, stop, move |a| {
                        let _ = tx.send(a.to_owned());
                    })
                })
                .unwrap()
        };
        let mut t = Target {
            addr: String::new(),
            stop,
            thread: Some(thread),
            tmp,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => t.addr = addr,
            Err(_) => {
                let r = t.stop();
                panic!("the target did not become ready: {r:?}");
            }
        }
        t
    }

    fn creds(&self) -> PathBuf {
        self.tmp.path().join("creds")
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    /// Stop the daemon and wait for it (appliers included).
    fn stop(&mut self) -> ferry_master_target::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().expect("target thread panicked"),
            None => Ok(()),
        }
    }

    fn connect(&self, host: &str) -> Client {
        let cfg = tls::client_config(&self.creds(), host).unwrap();
        Client::connect(&self.addr, cfg)
    }

    /// The data key of `host`/`disk` (from the shared credentials).
    fn key(&self, host: &str, disk: &str) -> Key {
        credentials::data_key(&self.creds(), host, disk).unwrap()
    }

    /// A valid write-order set of `host`/`disk`: epoch 1, sequences
    /// `first..=last` following `prev`, one Write extent of `n` bytes.
    fn set(&self, host: &str, disk: &str, seqs: (u64, u64, u64), n: usize) -> ChangeSet {
        build_set(&self.key(host, disk), host, disk, seqs, n)
    }

    /// A fresh, well-behaved connection of `host` for `disks`: sends
    /// `sets` and expects each to be acknowledged.
    fn ship(&self, host: &str, disks: &[&str], sets: &[&ChangeSet]) {
        let mut c = self.connect(host);
        c.hello(host, disks).expect("Welcome");
        for cs in sets {
            c.expect_ack(cs, cs.header.last_seq);
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let r = self.stop();
        if !std::thread::panicking() {
            r.expect("target run");
        }
    }
}

static NONCE: AtomicU64 = AtomicU64::new(1);

fn build_set(key: &Key, host: &str, disk: &str, seqs: (u64, u64, u64), n: usize) -> ChangeSet {
    build_set_epoch(key, host, disk, 1, seqs, n)
}

fn build_set_epoch(
    key: &Key,
    host: &str,
    disk: &str,
    epoch: u64,
    seqs: (u64, u64, u64),
    n: usize,
) -> ChangeSet {
    let (first, last, prev) = seqs;
    let data: Vec<u8> = (0..n)
        .map(|i| u8::try_from((i as u64 + first * 7) % 251).unwrap())
        .collect();
    let header = ChangeSetHeader {
        host: host.to_owned(),
        disk: disk.to_owned(),
        epoch,
        kind: ChangeKind::WriteOrder,
        first_seq: first,
        last_seq: last,
        prev_end_seq: prev,
        nonce_stream: 1,
        nonce_counter: NONCE.fetch_add(1, Ordering::Relaxed),
        key_salt: [0; 16],
        consistent_from: first,
        tags: Vec::new(),
        extents: vec![Extent {
            seq: first,
            offset: (first * 4096) % (DISK_SIZE / 2),
            length: n as u64,
            op: ExtentOp::Write,
        }],
        chunks: Vec::new(),
    };
    pack_change_set(&data, 1, key, header).unwrap()
}

/// Every change set in the journal of `host`/`disk` (read after the
/// daemon stopped).
fn journal(data: &Path, host: &str, disk: &str) -> Vec<ChangeSet> {
    let (j, _) = Journal::open(&data.join(HOSTS_DIR).join(host), disk).unwrap();
    j.iter_from(0).map(|r| r.unwrap()).collect()
}

fn assert_journal(data: &Path, host: &str, disk: &str, want: &[&ChangeSet]) {
    let got = journal(data, host, disk);
    let seqs = |v: &[&ChangeSet]| {
        v.iter()
            .map(|c| (c.header.first_seq, c.header.last_seq))
            .collect::<Vec<_>>()
    };
    let got_refs: Vec<&ChangeSet> = got.iter().collect();
    assert_eq!(
        seqs(&got_refs),
        seqs(want),
        "journal {host}/{disk}: sequences"
    );
    assert!(
        got.iter().zip(want).all(|(a, b)| a == *b),
        "journal {host}/{disk}: contents differ from the sets sent"
    );
}

fn disk_dir(data: &Path, host: &str, disk: &str) -> PathBuf {
    data.join(HOSTS_DIR).join(host).join(disk)
}

// ---------------------------------------------------------------- client

/// A tiny sidecar: raw frames and typed messages over mutual TLS.
struct Client {
    s: tls::ClientStream,
}

impl Client {
    fn connect(addr: &str, cfg: Arc<rustls::ClientConfig>) -> Client {
        let s = tls::connect(addr, cfg, IO_TIMEOUT).expect("TLS connect");
        Client { s }
    }

    fn send(&mut self, m: &Message) {
        m.write_to(&mut self.s).expect("send a message");
        self.s.flush().expect("flush");
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("send bytes");
        self.s.flush().expect("flush");
    }

    fn recv(&mut self) -> Message {
        Message::read_from(&mut self.s, frame::MAX_FRAME).expect("a message from the target")
    }

    /// Hello as `host` for `disks`; the Welcome or the Reject.
    fn hello_with(&mut self, protocol: u16, host: &str, disks: &[&str]) -> Result<Welcome, Reject> {
        self.send(&Message::Hello(Hello {
            protocol,
            host: host.to_owned(),
            disks: disks
                .iter()
                .map(|d| DiskHello {
                    name: (*d).to_owned(),
                    size: DISK_SIZE,
                    ring_generation: 1,
                })
                .collect(),
            retention_secs: 0,
        }));
        match self.recv() {
            Message::Welcome(w) => Ok(w),
            Message::Reject(r) => Err(r),
            other => panic!("answer to Hello: {other:?}"),
        }
    }

    fn hello(&mut self, host: &str, disks: &[&str]) -> Result<Welcome, Reject> {
        self.hello_with(PROTOCOL_VERSION, host, disks)
    }

    /// Send a change set; the answer.
    fn send_set(&mut self, cs: &ChangeSet) -> Message {
        self.send(&Message::ChangeSet(cs.clone()));
        self.recv()
    }

    fn expect_ack(&mut self, cs: &ChangeSet, last_seq: u64) {
        match self.send_set(cs) {
            Message::Ack(a) => assert_eq!(
                a,
                Ack {
                    disk: cs.header.disk.clone(),
                    epoch: cs.header.epoch,
                    last_seq
                }
            ),
            other => panic!(
                "set [{}, {}]: expected an Ack, got {other:?}",
                cs.header.first_seq, cs.header.last_seq
            ),
        }
    }

    /// The next message is a Reject; returns its code after checking that
    /// the connection is closed behind it.
    fn rejected(&mut self) -> u16 {
        let code = match self.recv() {
            Message::Reject(r) => r.code,
            other => panic!("expected a Reject, got {other:?}"),
        };
        self.assert_closed();
        code
    }

    /// The target closed the connection: the next read gives EOF or an
    /// error, not data and not a timeout.
    fn assert_closed(&mut self) {
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Ok(n) => panic!("{n} more bytes after the refusal"),
            Err(e) => assert!(
                !is_timeout(&e),
                "connection still open after the refusal ({e})"
            ),
        }
    }
}

fn frame_bytes(kind: u16, body: &[u8]) -> Vec<u8> {
    frame::encode_frame(kind, body, frame::MAX_FRAME).unwrap()
}

fn change_set_body(cs: &ChangeSet) -> Vec<u8> {
    Message::ChangeSet(cs.clone()).encode().unwrap()
}

/// Connect as web01, Hello for disk `a`, and hand the connection over.
fn web01_a(t: &Target) -> Client {
    let mut c = t.connect("web01");
    c.hello("web01", &["a"]).expect("Welcome");
    c
}

// ---------------------------------------------------------------- 1. size

#[test]
fn oversized_frame_is_malformed_and_closed() {
    let mut t = Target::start_with("oversize", |c| c.max_frame = 1 << 20);
    let s1 = t.set("web01", "a", (1, 2, 0), 4096);
    let s2 = t.set("web01", "a", (3, 4, 2), 4096);

    // After Hello: a header announcing 2 MiB (only the header is sent: the
    // target must refuse on the header alone).
    let mut c = web01_a(&t);
    c.expect_ack(&s1, 2);
    let header = encode_header(kind::CHANGE_SET, 2 << 20);
    c.send_raw(&header);
    assert_eq!(c.rejected(), reject::MALFORMED);

    // Before Hello: the same.
    let mut c = t.connect("web01");
    c.send_raw(&encode_header(kind::HELLO, 2 << 20));
    assert_eq!(c.rejected(), reject::MALFORMED);

    t.ship("web01", &["a"], &[&s2]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2]);
}

// ---------------------------------------------------------------- 2. truncation

#[test]
fn truncated_frame_appends_nothing_and_target_serves_others() {
    let mut t = Target::start("truncated");
    let s1 = t.set("web01", "a", (1, 1, 0), 8192);
    let s2 = t.set("web01", "a", (2, 5, 1), 8192);
    let w1 = t.set("web02", "a", (1, 1, 0), 100);
    let w2 = t.set("web02", "a", (2, 2, 1), 100);

    // Another host, connected throughout.
    let mut other = t.connect("web02");
    other.hello("web02", &["a"]).expect("Welcome");
    other.expect_ack(&w1, 1);

    let mut c = web01_a(&t);
    c.expect_ack(&s1, 1);
    let bytes = frame_bytes(kind::CHANGE_SET, &change_set_body(&s2));
    let half = HEADER_LEN + (bytes.len() - HEADER_LEN) / 2;
    c.send_raw(&bytes[..half]);
    c.s.sock.shutdown(Shutdown::Write).unwrap();
    // The target may still say why (it reads a truncated frame) or just
    // close; either way nothing more comes and nothing was appended.
    let mut head = [0u8; HEADER_LEN];
    match c.s.read_exact(&mut head) {
        Ok(()) => {
            let rest = frame::decode_header(&head, frame::MAX_FRAME).unwrap();
            let mut body = vec![0u8; rest.payload_len as usize];
            c.s.read_exact(&mut body).unwrap();
            match Message::decode(rest.kind, &body).unwrap() {
                Message::Reject(r) => {
                    eprintln!("truncated frame: {r:?}");
                    assert_eq!(r.code, reject::MALFORMED, "{r:?}");
                }
                m => panic!("after a truncated frame: {m:?}"),
            }
            c.assert_closed();
        }
        Err(e) => {
            eprintln!("truncated frame: closed without a Reject ({e})");
            assert!(
                !is_timeout(&e),
                "connection still open after a truncated frame ({e})"
            );
        }
    }

    // The other host's connection was not disturbed.
    other.expect_ack(&w2, 2);
    drop(other);
    // The same set, whole, on a new connection.
    t.ship("web01", &["a"], &[&s2]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2]);
    assert_journal(&t.data(), "web02", "a", &[&w1, &w2]);
}

// ---------------------------------------------------------------- 3. garbled

#[test]
fn garbled_frames_are_malformed() {
    let mut t = Target::start("garbled");
    let s1 = t.set("web01", "a", (1, 1, 0), 512);
    let s2 = t.set("web01", "a", (2, 2, 1), 512);
    t.ship("web01", &["a"], &[&s1]);
    let good = frame_bytes(kind::CHANGE_SET, &change_set_body(&s2));

    let mut cases: Vec<(&str, bool, Vec<u8>, u16)> = Vec::new();
    for before_hello in [true, false] {
        // Bad magic. Only the 16 header bytes are sent in these header
        // cases: the target refuses on the header, before any payload.
        let mut f = good[..HEADER_LEN].to_vec();
        f[0] = b'X';
        cases.push(("bad magic", before_hello, f, reject::MALFORMED));
        // Bad header checksum.
        let mut f = good[..HEADER_LEN].to_vec();
        f[frame::CRC_OFFSET] ^= 0x01;
        cases.push(("bad header crc", before_hello, f, reject::MALFORMED));
        // Another frame version (valid checksum).
        let mut f = good[..HEADER_LEN].to_vec();
        f[frame::VERSION_OFFSET] = 2;
        let crc = crc32c::crc32c(&f[..frame::CRC_OFFSET]);
        f[frame::CRC_OFFSET..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        cases.push(("frame version 2", before_hello, f, reject::MALFORMED));
        // Valid frames of unknown kinds.
        for k in [0u16, 8, 0xffff] {
            cases.push((
                "unknown kind",
                before_hello,
                frame_bytes(k, &[]),
                reject::MALFORMED,
            ));
        }
        // A known kind with a body that does not decode (trailing bytes).
        cases.push((
            "heartbeat with trailing bytes",
            before_hello,
            frame_bytes(kind::HEARTBEAT, &[0u8; 9]),
            reject::MALFORMED,
        ));
        // A well-formed message the target never accepts from a sidecar.
        let welcome = Message::Welcome(Welcome {
            target: "x".into(),
            resume: Vec::new(),
        });
        cases.push((
            "Welcome from a sidecar",
            before_hello,
            welcome.to_frame_bytes(frame::MAX_FRAME).unwrap(),
            reject::UNEXPECTED,
        ));
    }
    // A second Hello.
    let hello2 = Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        host: "web01".into(),
        disks: Vec::new(),
        retention_secs: 0,
    });
    cases.push((
        "second Hello",
        false,
        hello2.to_frame_bytes(frame::MAX_FRAME).unwrap(),
        reject::UNEXPECTED,
    ));
    // A change set before Hello.
    cases.push((
        "change set before Hello",
        true,
        good.clone(),
        reject::UNEXPECTED,
    ));
    // A flipped byte in the sealed payload.
    let mut f = good.clone();
    let last = f.len() - 1;
    f[last - 20] ^= 0x01;
    cases.push(("flipped payload byte", false, f, reject::BAD_SEAL));

    for (what, before_hello, bytes, want) in &cases {
        let mut c = t.connect("web01");
        if !before_hello {
            c.hello("web01", &["a"]).expect("Welcome");
        }
        c.send_raw(bytes);
        let got = c.rejected();
        assert_eq!(
            got,
            *want,
            "{what} ({}): code",
            if *before_hello {
                "before Hello"
            } else {
                "after Hello"
            }
        );
    }

    // Every single-byte flip in the change set's header (the AEAD
    // associated data) is refused with one of the documented codes.
    let aad_len = encode_header_aad(&s2.header).unwrap().len();
    let mut seen: BTreeMap<u16, usize> = BTreeMap::new();
    for i in 0..aad_len {
        let mut f = good.clone();
        f[HEADER_LEN + i] ^= 0x01;
        let mut c = web01_a(&t);
        c.send_raw(&f);
        let code = c.rejected();
        assert!(
            [reject::MALFORMED, reject::BAD_SEAL, reject::NOT_YOUR_DISK].contains(&code),
            "header byte {i} flipped: code {code}"
        );
        *seen.entry(code).or_default() += 1;
    }
    eprintln!("header byte flips ({aad_len} bytes): codes {seen:?}");
    // E.g. a nonce or epoch byte decodes but fails the seal; a string
    // length byte does not decode.
    assert!(seen.contains_key(&reject::BAD_SEAL));
    assert!(seen.contains_key(&reject::MALFORMED));

    t.ship("web01", &["a"], &[&s2]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2]);
}

// ---------------------------------------------------------------- 4. key

#[test]
fn wrong_key_is_bad_seal() {
    let mut t = Target::start("wrong-key");
    let s1 = t.set("web01", "a", (1, 1, 0), 4096);
    let s2 = t.set("web01", "a", (2, 3, 1), 4096);
    t.ship("web01", &["a"], &[&s1]);

    let keys = [
        ("a random key", Key::from_bytes([7u8; 32])),
        ("the key of web01/b", t.key("web01", "b")),
        ("the key of web02/a", t.key("web02", "a")),
    ];
    for (what, key) in &keys {
        let forged = build_set(key, "web01", "a", (2, 3, 1), 4096);
        let mut c = web01_a(&t);
        match c.send_set(&forged) {
            Message::Reject(r) => assert_eq!(r.code, reject::BAD_SEAL, "{what}: {r:?}"),
            m => panic!("{what}: {m:?}"),
        }
        c.assert_closed();
    }

    t.ship("web01", &["a"], &[&s2]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2]);
}

// ---------------------------------------------------------------- 5. unknown host

/// Whether an error is a read or write timeout (somewhere in its chain).
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// A client configuration that trusts the target's CA but presents
/// `name`'s certificate from the credentials directory `other`.
fn foreign_client(target_creds: &Path, other: &Path, name: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(target_creds.join(credentials::CA_CERT)).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(credentials::cert_path(other, name))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
    let key = PrivateKeyDer::from_pem_file(credentials::key_path(other, name)).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .unwrap();
    Arc::new(cfg)
}

#[test]
fn certificate_of_another_ca_is_refused_by_tls() {
    let mut t = Target::start("other-ca");
    let other = t.tmp.path().join("other-creds");
    credentials::init(&other, &names(&["web03", "web01"]), "target", false).unwrap();
    let s1 = t.set("web01", "a", (1, 1, 0), 4096);

    // web03 (unknown everywhere) and web01 (a known name, wrong CA).
    for host in ["web03", "web01"] {
        let cfg = foreign_client(&t.creds(), &other, host);
        // TLS 1.3: the client finishes its side before the target judged
        // its certificate, so the refusal shows on the first read (or
        // already in the handshake).
        let Ok(mut s) = tls::connect(&t.addr, cfg, IO_TIMEOUT) else {
            continue;
        };
        let hello = Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            host: host.to_owned(),
            disks: vec![DiskHello {
                name: "a".into(),
                size: DISK_SIZE,
                ring_generation: 1,
            }],
            retention_secs: 3600,
        });
        let _ = hello.write_to(&mut s).and_then(|()| Ok(s.flush()?));
        match Message::read_from(&mut s, frame::MAX_FRAME) {
            Ok(m) => panic!("{host} of another CA got an answer: {m:?}"),
            Err(e) => {
                assert!(!is_timeout(&e), "{host}: no refusal, a timeout: {e}");
                eprintln!("{host} of another CA: {e}");
            }
        }
    }

    // Nothing was created for them; the real web01 still works.
    assert!(!t.data().join(HOSTS_DIR).join("web03").exists());
    t.ship("web01", &["a"], &[&s1]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1]);
}

#[test]
fn host_without_data_key_is_unknown_host() {
    let mut t = Target::start("no-datakey");
    let s1 = t.set("web01", "a", (1, 1, 0), 4096);
    std::fs::remove_file(credentials::datakey_path(&t.creds(), "web02")).unwrap();

    let mut c = t.connect("web02");
    let r = c
        .hello("web02", &["a"])
        .expect_err("Hello of a host without key");
    assert_eq!(r.code, reject::UNKNOWN_HOST, "{r:?}");
    c.assert_closed();

    assert!(!t.data().join(HOSTS_DIR).join("web02").exists());
    t.ship("web01", &["a"], &[&s1]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1]);
}

// ---------------------------------------------------------------- 6. host

#[test]
fn hello_as_another_host_is_not_your_host() {
    let mut t = Target::start("not-your-host");
    let s1 = t.set("web01", "a", (1, 1, 0), 4096);
    let w1 = t.set("web02", "a", (1, 1, 0), 4096);

    for claimed in ["web02", "web03", "no such host!"] {
        let mut c = t.connect("web01");
        let r = c.hello(claimed, &["a"]).expect_err(claimed);
        assert_eq!(r.code, reject::NOT_YOUR_HOST, "{claimed}: {r:?}");
        c.assert_closed();
    }
    assert!(!t.data().join(HOSTS_DIR).join("web02").exists());

    t.ship("web01", &["a"], &[&s1]);
    t.ship("web02", &["a"], &[&w1]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1]);
    assert_journal(&t.data(), "web02", "a", &[&w1]);
}

// ---------------------------------------------------------------- 7. disk

#[test]
fn change_set_for_another_disk_or_host_is_not_your_disk() {
    let mut t = Target::start("not-your-disk");
    let s1 = t.set("web01", "a", (1, 1, 0), 4096);
    let s2 = t.set("web01", "a", (2, 2, 1), 4096);
    // Properly sealed, but not this connection's.
    let other_disk = t.set("web01", "b", (2, 2, 1), 4096);
    let other_host = t.set("web02", "a", (2, 2, 1), 4096);
    t.ship("web01", &["a"], &[&s1]);

    for (what, cs) in [("disk b", &other_disk), ("host web02", &other_host)] {
        let mut c = web01_a(&t);
        match c.send_set(cs) {
            Message::Reject(r) => assert_eq!(r.code, reject::NOT_YOUR_DISK, "{what}: {r:?}"),
            m => panic!("{what}: {m:?}"),
        }
        c.assert_closed();
    }
    assert!(!disk_dir(&t.data(), "web01", "b").exists());
    assert!(!t.data().join(HOSTS_DIR).join("web02").exists());

    t.ship("web01", &["a"], &[&s2]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2]);
}

// ---------------------------------------------------------------- 8. replay

#[test]
fn replayed_change_set_is_acknowledged_not_appended() {
    let mut t = Target::start("replay");
    let s1 = t.set("web01", "a", (1, 3, 0), 4096);
    let s2 = t.set("web01", "a", (4, 4, 3), 4096);
    let s3 = t.set("web01", "a", (5, 9, 4), 4096);

    let mut c = web01_a(&t);
    c.expect_ack(&s1, 3);
    // Retransmission of the last set: acknowledged with its last seq.
    c.expect_ack(&s1, 3);
    c.expect_ack(&s2, 4);
    // An older set again: acknowledged with the last durable seq (the
    // journal's rule), the connection stays usable.
    c.expect_ack(&s1, 4);
    c.expect_ack(&s3, 9);
    c.expect_ack(&s3, 9);
    drop(c);

    // Welcome after a reconnect says where to resume.
    let mut c = t.connect("web01");
    let w = c.hello("web01", &["a"]).unwrap();
    assert_eq!(w.resume.len(), 1);
    assert_eq!(w.resume[0].next_seq, 10);
    c.expect_ack(&s2, 9);
    drop(c);

    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2, &s3]);
}

// ---------------------------------------------------------------- 9. gap

#[test]
fn gap_is_refused_and_shows_in_status() {
    let mut t = Target::start("gap");
    let s1 = t.set("web01", "a", (1, 2, 0), 4096);
    let gap = t.set("web01", "a", (10, 10, 9), 4096);
    let s2 = t.set("web01", "a", (3, 3, 2), 4096);

    let mut c = web01_a(&t);
    c.expect_ack(&s1, 2);
    match c.send_set(&gap) {
        Message::Reject(r) => assert_eq!(r.code, reject::GAP, "{r:?}"),
        m => panic!("gap: {m:?}"),
    }
    c.assert_closed();

    t.ship("web01", &["a"], &[&s2]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2]);
    let st = read_statuses(&t.data()).unwrap();
    let st = st
        .iter()
        .find(|s| s.host == "web01" && s.disk == "a")
        .expect("status of web01/a");
    let last_gap = st.last_gap.as_deref().expect("last_gap set");
    assert!(last_gap.contains("10"), "{last_gap}");
    assert_eq!(st.received_seq, Some(3));
}

#[test]
fn stale_epoch_is_refused() {
    let mut t = Target::start("stale-epoch");
    let s1 = t.set("web01", "a", (1, 2, 0), 4096);
    let s2 = t.set("web01", "a", (3, 3, 2), 4096);
    let stale = build_set_epoch(&t.key("web01", "a"), "web01", "a", 0, (3, 3, 2), 4096);

    let mut c = web01_a(&t);
    c.expect_ack(&s1, 2);
    match c.send_set(&stale) {
        Message::Reject(r) => assert_eq!(r.code, reject::STALE_EPOCH, "{r:?}"),
        m => panic!("stale epoch: {m:?}"),
    }
    c.assert_closed();

    t.ship("web01", &["a"], &[&s2]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2]);
}

// ---------------------------------------------------------------- 10. version

#[test]
fn other_protocol_version_is_bad_version() {
    let mut t = Target::start("version");
    let s1 = t.set("web01", "a", (1, 1, 0), 4096);
    for v in [0, PROTOCOL_VERSION + 1, u16::MAX] {
        let mut c = t.connect("web01");
        let r = c.hello_with(v, "web01", &["a"]).expect_err("other version");
        assert_eq!(r.code, reject::BAD_VERSION, "version {v}: {r:?}");
        c.assert_closed();
    }
    assert!(!t.data().join(HOSTS_DIR).join("web01").exists());
    t.ship("web01", &["a"], &[&s1]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1]);
}

// ---------------------------------------------------------------- 11. log

/// Captures `refused a sidecar` events: (code, suppressed) of each.
mod capture {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    #[derive(Default, Clone)]
    pub struct Events(pub Arc<Mutex<Vec<(u64, u64)>>>);

    #[derive(Default)]
    struct Fields {
        code: Option<u64>,
        suppressed: Option<u64>,
    }

    impl Visit for Fields {
        fn record_u64(&mut self, field: &Field, value: u64) {
            match field.name() {
                "code" => self.code = Some(value),
                "suppressed" => self.suppressed = Some(value),
                _ => {}
            }
        }
        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }

    impl Subscriber for Events {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut f = Fields::default();
            event.record(&mut f);
            if let (Some(c), Some(s)) = (f.code, f.suppressed) {
                self.0.lock().unwrap().push((c, s));
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }
}

#[test]
fn refusal_log_is_rate_limited_per_code() {
    let events = capture::Events::default();
    let log = RefusalLog::default();
    let r = |code| Refusal {
        code,
        message: "test".into(),
    };
    tracing::subscriber::with_default(events.clone(), || {
        for _ in 0..5 {
            log.log("peer", &r(reject::MALFORMED));
        }
        log.log("peer", &r(reject::BAD_SEAL));
        log.log("peer", &r(reject::BAD_SEAL));
    });
    let got = events.0.lock().unwrap().clone();
    // One line per code; the repeats are counted, not logged.
    assert_eq!(
        got,
        vec![
            (u64::from(reject::MALFORMED), 0),
            (u64::from(reject::BAD_SEAL), 0)
        ]
    );
}

// ---------------------------------------------------------------- findings

/// A sidecar that sends an oversized frame whole (header and body, as
/// `NetTransport::send` does) should still learn why it was refused.
#[test]
fn oversized_frame_sent_whole_is_still_answered() {
    let t = Target::start_with("oversize-whole", |c| c.max_frame = 1 << 20);
    let mut c = web01_a(&t);
    let mut bytes = encode_header(kind::CHANGE_SET, 2 << 20).to_vec();
    bytes.resize(HEADER_LEN + (2 << 20), 0x5a);
    let w = c.s.write_all(&bytes).and_then(|()| c.s.flush());
    // Read below the stream (which would first retry the failed write):
    // whatever TLS records arrived before the connection went away.
    let mut plain = Vec::new();
    loop {
        match c.s.conn.read_tls(&mut c.s.sock) {
            Ok(0) => break,
            Ok(_) => {
                if c.s.conn.process_new_packets().is_err() {
                    break;
                }
                let _ = c.s.conn.reader().read_to_end(&mut plain);
            }
            Err(e) => {
                eprintln!("read_tls: {e}");
                break;
            }
        }
    }
    let m = Message::read_from(&mut &plain[..], frame::MAX_FRAME);
    eprintln!("write: {w:?}; read: {m:?}");
    match m {
        Ok(Message::Reject(r)) => assert_eq!(r.code, reject::MALFORMED),
        other => panic!("no Reject for a whole oversized frame: {other:?}"),
    }
}

/// An authenticated set whose extent lies beyond the announced disk size
/// must be refused at the door: once journaled, the applier could never
/// apply it, and every later set of the disk would be stuck behind it.
#[test]
fn extent_beyond_the_disk_is_refused() {
    let mut t = Target::start("beyond-end");
    let key = t.key("web01", "a");
    let s1 = t.set("web01", "a", (1, 1, 0), 4096);
    let mut beyond = build_set(&key, "web01", "a", (2, 2, 1), 4096);
    beyond.header.extents[0].offset = DISK_SIZE - 512;
    beyond.header.nonce_counter = NONCE.fetch_add(1, Ordering::Relaxed);
    let data: Vec<u8> = vec![0x33; 4096];
    let beyond = pack_change_set(&data, 1, &key, beyond.header).unwrap();
    let s2 = t.set("web01", "a", (2, 2, 1), 4096);

    let mut c = web01_a(&t);
    c.expect_ack(&s1, 1);
    match c.send_set(&beyond) {
        Message::Reject(r) => {
            assert!(
                [reject::MALFORMED, reject::MISMATCH].contains(&r.code),
                "{r:?}"
            );
            c.assert_closed();
        }
        m => {
            drop(c);
            t.stop().unwrap();
            let st = read_statuses(&t.data()).unwrap();
            panic!(
                "extent beyond the disk end answered with {m:?}; journal {:?}; apply_error {:?}",
                journal(&t.data(), "web01", "a")
                    .iter()
                    .map(|c| c.header.last_seq)
                    .collect::<Vec<_>>(),
                st.first().and_then(|s| s.apply_error.clone())
            );
        }
    }
    t.ship("web01", &["a"], &[&s2]);
    t.stop().unwrap();
    assert_journal(&t.data(), "web01", "a", &[&s1, &s2]);
    let st = read_statuses(&t.data()).unwrap();
    assert_eq!(st[0].apply_error, None);
}
