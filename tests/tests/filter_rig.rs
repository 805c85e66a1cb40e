//! Rig tier: `ferry filter` against real NBD clients (nbdinfo, nbdcopy,
//! qemu-io, qemu-img, fio, libnbd), its ring read through the consumer API,
//! overflow through the tracking states, and kill -9 recovery.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry_ring::ring::{Consumer, RecordKind};
use ferry_tests::{
    expect_code, ferry, pattern, run, wait_until, ChildGuard, FilterProcess, Scratch,
};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
}

/// qemu-io against an export; returns stdout, panics on failure.
fn qemu_io(uri: &str, commands: &[String]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string(), uri.to_string()];
    for c in commands {
        args.push("-c".into());
        args.push(c.clone());
    }
    let out = run("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !stdout.contains("Pattern verification failed"),
        "qemu-io {commands:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The dirty map of an export as (offset, length) runs.
fn dirty_map(uri: &str) -> Vec<(u64, u64)> {
    let out = run("nbdinfo", ["--map=qemu:dirty-bitmap:ferry", "--json", uri]);
    expect_code(&out, 0, "nbdinfo dirty map");
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    map.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"].as_u64() == Some(1))
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn covered(map: &[(u64, u64)], offset: u64, len: u64) -> bool {
    // Runs are merged and sorted; walk them across the range.
    let mut pos = offset;
    for &(o, l) in map {
        if o <= pos && pos < o + l {
            pos = o + l;
        }
        if pos >= offset + len {
            return true;
        }
    }
    pos >= offset + len
}

#[test]
fn interop_with_nbd_clients() {
    let dir = Scratch::new("filter-interop");
    let disk = dir.path("disk.img");
    sparse_file(&disk, 256 * MIB);
    let filter = FilterProcess::start(&dir.path(""), &[("data", &disk)], &["--ring-size", "64M"]);
    let uri = filter.uri("data");
    let _consumer = drain_follow(&filter);

    // nbdinfo: size, flags, block sizes, both maps.
    let out = run("nbdinfo", ["--json", &uri]);
    expect_code(&out, 0, "nbdinfo");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], 256 * MIB);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
    ] {
        assert_eq!(export[flag], true, "{flag}: {export}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_minimum"], 1);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 32 * MIB);
    let contexts = export["contexts"].to_string();
    assert!(
        contexts.contains("base:allocation") && contexts.contains("qemu:dirty-bitmap:ferry"),
        "{contexts}"
    );
    expect_code(&run("nbdinfo", ["--map", &uri]), 0, "nbdinfo --map");

    // qemu-io patterns, with and without FUA.
    qemu_io(
        &uri,
        &[
            "write -P 0xa5 0 1M".into(),
            "write -f -P 0x5a 1M 64k".into(),
            "write -P 0x3c 3000 5000".into(),
            "read -P 0xa5 0 3000".into(),
            "read -P 0x3c 3000 5000".into(),
            "read -P 0x5a 1M 64k".into(),
            "flush".into(),
            "write -z 2M 1M".into(),
            "read -P 0 2M 1M".into(),
            "discard 4M 1M".into(),
        ],
    );

    // nbdcopy in and out.
    let src = dir.path("src.raw");
    std::fs::write(&src, pattern(11, 24 << 20)).unwrap();
    expect_code(&run("nbdcopy", [s(&src), uri.as_str()]), 0, "nbdcopy in");
    let out_file = dir.path("out.raw");
    expect_code(
        &run("nbdcopy", [uri.as_str(), s(&out_file)]),
        0,
        "nbdcopy out",
    );
    let copied = std::fs::read(&out_file).unwrap();
    assert!(
        copied[..24 << 20] == std::fs::read(&src).unwrap()[..],
        "nbdcopy round trip"
    );

    // qemu-img convert from the export equals the backing file.
    let converted = dir.path("converted.raw");
    expect_code(
        &run(
            "qemu-img",
            ["convert", "-f", "raw", "-O", "raw", &uri, s(&converted)],
        ),
        0,
        "qemu-img convert",
    );
    expect_code(
        &run(
            "qemu-img",
            ["compare", "-f", "raw", "-F", "raw", s(&converted), s(&disk)],
        ),
        0,
        "export equals backing file",
    );

    // fio's nbd engine with verification.
    let out = run(
        "fio",
        [
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--offset=64M",
        ],
    );
    expect_code(&out, 0, "fio nbd verify");

    let status = filter.status();
    let counters = &status["disks"][0]["counters"];
    assert!(counters["writes"].as_u64().unwrap() > 8000, "{counters}");
    assert_eq!(counters["io_errors"], 0);
}

/// A background `ferry filter drain --follow` (the stand-in sidecar).
fn drain_follow(filter: &FilterProcess) -> ChildGuard {
    let child = Command::new(ferry_tests::ferry_bin())
        .args(["filter", "drain", "--follow", "--state", s(&filter.state)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn drain");
    ChildGuard(child)
}

const BAD_REQUESTS: &str = r#"
import errno, socket, struct, sys
import nbd

uri, sock_path, aligned_uri = sys.argv[1], sys.argv[2], sys.argv[3]

def expect(what, fn, codes):
    try:
        fn()
    except nbd.Error as e:
        got = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), None)
        if got not in codes:
            sys.exit(f"{what}: errno {e.errno} ({e}), expected one of {codes}")
        return
    sys.exit(f"{what}: no error")

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
size = h.get_size()
expect("read past the end", lambda: h.pread(512, size), [errno.EINVAL])
expect("write past the end", lambda: h.pwrite(b"x" * 4096, size - 1024), [errno.ENOSPC])
expect("trim past the end", lambda: h.trim(8192, size - 4096), [errno.EINVAL, errno.ENOSPC])
expect("unknown command flag", lambda: h.pread(512, 0, flags=1 << 9), [errno.EINVAL])
expect("oversized read", lambda: h.pread(48 << 20, 0), [errno.EINVAL, errno.EOVERFLOW])
expect("oversized write", lambda: h.pwrite(b"y" * (40 << 20), 0), [errno.EINVAL, errno.EOVERFLOW])
assert h.pread(512, 0) is not None  # the connection is still usable
h.pwrite(b"z" * 512, 0)
assert h.pread(512, 0) == b"z" * 512
h.shutdown()

a = nbd.NBD()
a.set_strict_mode(0)
a.connect_uri(aligned_uri)
expect("misaligned read", lambda: a.pread(512, 100), [errno.EINVAL])
expect("misaligned write", lambda: a.pwrite(b"q" * 100, 4096), [errno.EINVAL])
expect("misaligned trim", lambda: a.trim(1000, 0), [errno.EINVAL])
assert a.pread(4096, 4096) is not None
a.shutdown()

# FLUSH with a length: libnbd cannot send it, so speak the protocol directly.
s = socket.socket(socket.AF_UNIX)
s.connect(sock_path)
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("server closed the connection")
        b += c
    return b
assert recv(16) == b"NBDMAGICIHAVEOPT"
recv(2)
s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
name = b"data"
s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)  # NBD_OPT_EXPORT_NAME
recv(10)
def request(kind, offset, length, handle):
    s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, kind, handle, offset, length))
    magic, error, h = struct.unpack(">IIQ", recv(16))
    assert magic == 0x67446698 and h == handle, (magic, h)
    return error
assert request(3, 0, 512, 1) == 22, "flush with a length must be EINVAL"
assert request(0, 0, 512, 2) == 0
recv(512)
s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 3, 0, 0))  # NBD_CMD_DISC
print("ok")
"#;

#[test]
fn bad_requests_get_the_specifications_errors() {
    let dir = Scratch::new("filter-bad");
    let disk = dir.path("disk.img");
    sparse_file(&disk, 64 * MIB);
    let filter = FilterProcess::start(&dir.path("a"), &[("data", &disk)], &["--ring-size", "8M"]);
    let disk2 = dir.path("disk2.img");
    sparse_file(&disk2, 64 * MIB);
    let aligned = FilterProcess::start(
        &dir.path("b"),
        &[("data", &disk2)],
        &["--ring-size", "8M", "--block-size", "4096"],
    );
    let script = dir.path("bad.py");
    std::fs::write(&script, BAD_REQUESTS).unwrap();
    // Debian's python3 carries the libnbd bindings.
    let out = run(
        "/usr/bin/python3",
        [
            s(&script),
            &filter.uri("data"),
            s(&filter.socket),
            &aligned.uri("data"),
        ],
    );
    expect_code(&out, 0, "bad requests");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn a_known_pattern_comes_back_through_the_consumer_api() {
    let dir = Scratch::new("filter-pattern");
    let disk = dir.path("disk.img");
    sparse_file(&disk, 128 * MIB);
    let filter = FilterProcess::start(&dir.path(""), &[("data", &disk)], &["--ring-size", "32M"]);
    // Distinct patterns at odd offsets and sizes, one qemu-io request each.
    let writes: Vec<(u64, u64, u8)> = (0..40u64)
        .map(|i| {
            (
                (i * 7919 * 4096) % (120 * MIB),
                512 * (1 + (i * 13) % 64),
                u8::try_from(i + 1).unwrap(),
            )
        })
        .collect();
    let commands: Vec<String> = writes
        .iter()
        .map(|(o, l, p)| format!("write -P {p} {o} {l}"))
        .collect();
    qemu_io(&filter.uri("data"), &commands);
    let mut consumer = Consumer::open(&filter.state.join("disks/data/ring")).expect("consumer");
    let mut seen = Vec::new();
    let mut last_seq = 0;
    while let Some(view) = consumer.next().unwrap() {
        assert!(view.record.seq > last_seq, "sequence numbers increase");
        last_seq = view.record.seq;
        if view.record.kind != RecordKind::Write {
            continue;
        }
        let payload = view.payload.expect("data state keeps payloads");
        view.verify_payload().expect("payload checksum");
        seen.push((
            view.record.offset,
            view.record.length,
            payload.to_vec(),
            view.record.checksum,
        ));
    }
    assert_eq!(seen.len(), writes.len(), "one record per write");
    for ((offset, len, byte), (r_offset, r_len, payload, checksum)) in writes.iter().zip(&seen) {
        assert_eq!((offset, len), (r_offset, r_len), "records in write order");
        let expected = vec![*byte; usize::try_from(*len).unwrap()];
        assert!(*payload == expected, "payload of the write at {offset}");
        assert_eq!(*checksum, crc32c::crc32c(&expected));
    }
}

#[test]
fn overflow_goes_data_metadata_bitmap_and_back() {
    let dir = Scratch::new("filter-overflow");
    let disk = dir.path("disk.img");
    sparse_file(&disk, 64 * MIB);
    // 1 MiB of payload (256 pages) and 512 record slots: 4 KiB writes fill
    // the payload first (-> metadata), then the slots (-> bitmap).
    let filter = FilterProcess::start(
        &dir.path(""),
        &[("data", &disk)],
        &["--ring-size", "1M", "--ring-slots", "512"],
    );
    let uri = filter.uri("data");
    let writes: Vec<(u64, u64)> = (0..700u64)
        .map(|i| (((i * 37) % 15000) * 4096, 4096))
        .collect();
    for chunk in writes.chunks(100) {
        let commands: Vec<String> = chunk
            .iter()
            .map(|(o, l)| format!("write -P 0x77 {o} {l}"))
            .collect();
        qemu_io(&uri, &commands);
    }
    let status = filter.status();
    let d = &status["disks"][0];
    assert_eq!(d["tracking"], "bitmap", "{d}");
    assert_eq!(d["transitions"], 2, "data -> metadata -> bitmap: {d}");
    let c = &d["counters"];
    assert!(
        c["data_records"].as_u64().unwrap() > 0 && c["metadata_records"].as_u64().unwrap() > 0,
        "{c}"
    );
    assert!(c["bitmap_writes"].as_u64().unwrap() > 0, "{c}");
    let before_drain = dirty_map(&uri);
    for (o, l) in &writes {
        assert!(
            covered(&before_drain, *o, *l),
            "write at {o} not reported dirty"
        );
    }
    // The consumer drains: records committed, back to data on its own.
    let out = ferry(["filter", "drain", "--print", "--state", s(&filter.state)]);
    expect_code(&out, 0, "drain");
    let drained: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || filter.status()["disks"][0]
            ["tracking"]
            == "data"),
        "back to data"
    );
    let d = &filter.status()["disks"][0];
    assert_eq!(d["transitions"], 3);
    assert!(d["reason"].as_str().unwrap().contains("drained"), "{d}");
    // Every write is either in a drained record or still dirty (bitmap state).
    let after = dirty_map(&uri);
    let records: Vec<(u64, u64)> = drained
        .iter()
        .filter(|r| r["kind"] == "Write")
        .map(|r| (r["offset"].as_u64().unwrap(), r["length"].as_u64().unwrap()))
        .collect();
    for (o, l) in &writes {
        assert!(
            records.contains(&(*o, *l)) || covered(&after, *o, *l),
            "write at {o} lost"
        );
    }
    assert!(
        !after.is_empty(),
        "bitmap-state writes stay dirty until resynced"
    );
}

#[test]
fn kill_9_exposes_every_write_acknowledged_since_the_last_commit() {
    let dir = Scratch::new("filter-kill9");
    let disk = dir.path("disk.img");
    sparse_file(&disk, 512 * MIB);
    let mut filter =
        FilterProcess::start(&dir.path(""), &[("data", &disk)], &["--ring-size", "64M"]);
    let uri = filter.uri("data");
    // Some writes, committed by a consumer: those are shipped.
    qemu_io(
        &uri,
        &["write -P 1 0 64k".into(), "write -P 1 300M 64k".into()],
    );
    expect_code(
        &ferry(["filter", "drain", "--state", s(&filter.state)]),
        0,
        "drain",
    );
    // A workload whose acknowledged writes we log from qemu-io's output.
    let mut commands = Vec::new();
    let mut x = 12345u64;
    for _ in 0..3000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let offset = ((x >> 20) % (500 * MIB / 512)) * 512;
        let len = 512 * (1 + (x >> 50) % 128);
        commands.push("-c".to_string());
        commands.push(format!("write -P 9 {offset} {len}"));
    }
    let mut io = Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .args(&commands)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = io.stdout.take().unwrap();
    let mut io = ChildGuard(io);
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut lines = BufReader::new(stdout).lines();
    // "wrote LEN/LEN bytes at offset OFF" once a write is acknowledged.
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some((len, off)) = parse_wrote(&line) {
            acked.insert(off, len.max(*acked.get(&off).unwrap_or(&0)));
        }
        if acked.len() == 400 {
            break;
        }
    }
    filter.kill9();
    for line in lines.map_while(Result::ok) {
        if let Some((len, off)) = parse_wrote(&line) {
            acked.insert(off, len.max(*acked.get(&off).unwrap_or(&0)));
        }
    }
    let _ = io.0.wait();
    assert!(acked.len() >= 400);
    drop(filter);
    let filter = FilterProcess::start(&dir.path(""), &[("data", &disk)], &["--ring-size", "64M"]);
    let map = dirty_map(&filter.uri("data"));
    for (off, len) in &acked {
        assert!(
            covered(&map, *off, *len),
            "acknowledged write at {off}+{len} not exposed as possibly unshipped"
        );
    }
    // The committed writes from before are not (their extents were released
    // unless the workload touched them again).
    let status = filter.status();
    assert!(status["disks"][0]["dirty_bytes"].as_u64().unwrap() > 0);
}

fn parse_wrote(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("wrote ")?;
    let (len, rest) = rest.split_once('/')?;
    let off = rest.rsplit_once("offset ")?.1;
    Some((len.parse().ok()?, off.trim().parse().ok()?))
}

#[test]
fn one_sequence_space_across_disks_and_tags_at_one_point() {
    let dir = Scratch::new("filter-two-disks");
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    sparse_file(&a, 64 * MIB);
    sparse_file(&b, 64 * MIB);
    let filter = FilterProcess::start(
        &dir.path(""),
        &[("a", &a), ("b", &b)],
        &["--ring-size", "8M"],
    );
    for i in 0..10u64 {
        qemu_io(&filter.uri("a"), &[format!("write -P 1 {} 4k", i * 8192)]);
        qemu_io(&filter.uri("b"), &[format!("write -P 2 {} 4k", i * 8192)]);
    }
    let out = ferry([
        "filter",
        "tag",
        "both",
        "--state",
        s(&filter.state),
        "--json",
    ]);
    expect_code(&out, 0, "tag");
    let tag: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tag_seq = tag["seq"].as_u64().unwrap();
    let mut all = Vec::new();
    for disk in ["a", "b"] {
        let mut consumer =
            Consumer::open(&filter.state.join(format!("disks/{disk}/ring"))).unwrap();
        let mut last = 0;
        let mut tagged = false;
        while let Some(v) = consumer.next().unwrap() {
            assert!(v.record.seq > last, "increasing within a ring");
            last = v.record.seq;
            if v.record.kind == RecordKind::Tag {
                assert_eq!(
                    (v.record.seq, v.record.aux),
                    (tag_seq, tag_seq),
                    "one tag sequence on every disk"
                );
                tagged = true;
            } else {
                all.push((v.record.seq, v.record.timestamp_ns));
            }
        }
        assert!(tagged, "disk {disk} carries the tag");
    }
    // Host-wide: no number is used twice, and ordering by number is
    // ordering by time (the writes alternated between the disks).
    all.sort_unstable();
    assert!(
        all.windows(2).all(|w| w[0].0 < w[1].0),
        "no sequence number used twice"
    );
    assert!(
        all.windows(2).all(|w| w[0].1 <= w[1].1),
        "sequence order is time order"
    );
    let names = std::fs::read_to_string(filter.state.join("tags.jsonl")).unwrap();
    assert!(
        names.contains("\"name\":\"both\"") && names.contains(&format!("\"seq\":{tag_seq}")),
        "{names}"
    );
}

#[test]
fn clean_stop_after_a_drain_leaves_nothing_dirty() {
    let dir = Scratch::new("filter-clean-stop");
    let disk = dir.path("disk.img");
    sparse_file(&disk, 64 * MIB);
    let mut filter =
        FilterProcess::start(&dir.path(""), &[("data", &disk)], &["--ring-size", "8M"]);
    qemu_io(
        &filter.uri("data"),
        &["write -P 3 0 1M".into(), "write -P 4 40M 64k".into()],
    );
    expect_code(
        &ferry(["filter", "drain", "--state", s(&filter.state)]),
        0,
        "drain",
    );
    // Let housekeeping see the commit and release the activity log.
    assert!(wait_until(Duration::from_secs(10), || filter.status()
        ["disks"][0]["lag_records"]
        == 0));
    let status = filter.stop().expect("stopped");
    assert!(status.success(), "clean exit: {status:?}");
    let filter = FilterProcess::start(&dir.path(""), &[("data", &disk)], &["--ring-size", "8M"]);
    assert_eq!(
        dirty_map(&filter.uri("data")),
        Vec::<(u64, u64)>::new(),
        "nothing possibly unshipped"
    );
    // An undrained write before a clean stop stays dirty across it.
    qemu_io(&filter.uri("data"), &["write -P 5 20M 4k".into()]);
    drop(filter);
    let filter = FilterProcess::start(&dir.path(""), &[("data", &disk)], &["--ring-size", "8M"]);
    let map = dirty_map(&filter.uri("data"));
    assert!(covered(&map, 20 * MIB, 4096), "{map:?}");
}
