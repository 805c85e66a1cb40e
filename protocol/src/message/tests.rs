use super::*;
use proptest::collection::vec;
use proptest::prelude::*;

fn small_change_set() -> ChangeSet {
    ChangeSet {
        header: ChangeSetHeader {
            host: "h1".into(),
            disk: "d".into(),
            epoch: 7,
            kind: ChangeKind::WriteOrder,
            first_seq: 10,
            last_seq: 11,
            prev_end_seq: 9,
            nonce_stream: 3,
            nonce_counter: 0x0102,
            key_salt: [0x5a; 16],
            consistent_from: 10,
            tags: vec![Tag {
                seq: 11,
                name: "t".into(),
                app: true,
                time_ns: 0x0403_0201,
            }],
            extents: vec![
                Extent {
                    seq: 10,
                    offset: 4096,
                    length: 5,
                    op: ExtentOp::Write,
                },
                Extent {
                    seq: 11,
                    offset: 0,
                    length: 512,
                    op: ExtentOp::Zero,
                },
            ],
            chunks: vec![ChunkInfo {
                raw_len: 5,
                stored_len: 5,
                compressed: false,
            }],
        },
        payload: vec![0xaa; 21],
    }
}

#[rustfmt::skip]
const GOLDEN_CHANGE_SET: &[u8] = &[
    // host: len 2, "h1"
    0x02, b'h', b'1',
    // disk: len 1, "d"
    0x01, b'd',
    // epoch 7 (u64 LE)
    0x07, 0, 0, 0, 0, 0, 0, 0,
    // kind 0 = WriteOrder (u8)
    0x00,
    // first_seq 10
    0x0a, 0, 0, 0, 0, 0, 0, 0,
    // last_seq 11
    0x0b, 0, 0, 0, 0, 0, 0, 0,
    // prev_end_seq 9
    0x09, 0, 0, 0, 0, 0, 0, 0,
    // nonce_stream 3 (u32 LE)
    0x03, 0, 0, 0,
    // nonce_counter 0x0102 (u64 LE)
    0x02, 0x01, 0, 0, 0, 0, 0, 0,
    // key_salt [u8; 16]
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0x5a,
    // consistent_from 10
    0x0a, 0, 0, 0, 0, 0, 0, 0,
    // tags: count 1 (u32 LE)
    0x01, 0, 0, 0,
    //   tag[0]: seq 11, name len 1 "t", app true, time_ns 0x04030201
    0x0b, 0, 0, 0, 0, 0, 0, 0,  0x01, b't',  0x01,
    0x01, 0x02, 0x03, 0x04, 0, 0, 0, 0,
    // extents: count 2
    0x02, 0, 0, 0,
    //   extent[0]: seq 10, offset 4096 (0x1000), length 5, op 0 = Write
    0x0a, 0, 0, 0, 0, 0, 0, 0,
    0x00, 0x10, 0, 0, 0, 0, 0, 0,
    0x05, 0, 0, 0, 0, 0, 0, 0,
    0x00,
    //   extent[1]: seq 11, offset 0, length 512 (0x200), op 1 = Zero
    0x0b, 0, 0, 0, 0, 0, 0, 0,
    0x00, 0, 0, 0, 0, 0, 0, 0,
    0x00, 0x02, 0, 0, 0, 0, 0, 0,
    0x01,
    // chunks: count 1
    0x01, 0, 0, 0,
    //   chunk[0]: raw_len 5, stored_len 5, compressed false
    0x05, 0, 0, 0,  0x05, 0, 0, 0,  0x00,
    // --- end of header (this much is the AES-GCM associated data) ---
    // payload_len 21 = 5 stored bytes + 16-byte tag
    0x15, 0, 0, 0,
    // payload (sealed bytes; content opaque at this layer)
    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
    0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
];

#[test]
fn golden_change_set() {
    let cs = small_change_set();
    let m = Message::ChangeSet(cs.clone());
    assert_eq!(m.kind(), kind::CHANGE_SET);
    let body = m.encode().unwrap();
    assert_eq!(body, GOLDEN_CHANGE_SET);
    assert_eq!(
        Message::decode(kind::CHANGE_SET, GOLDEN_CHANGE_SET).unwrap(),
        m
    );
    // The AAD is exactly the header part: everything before payload_len.
    let aad = encode_header_aad(&cs.header).unwrap();
    assert_eq!(aad, &GOLDEN_CHANGE_SET[..GOLDEN_CHANGE_SET.len() - 4 - 21]);
    assert_eq!(ChangeSetHeader::decode(&aad).unwrap(), cs.header);
}

#[test]
fn golden_small_messages() {
    let hb = Message::Heartbeat(Heartbeat {
        time_ns: 0x0102_0304_0506_0708,
    });
    assert_eq!(hb.encode().unwrap(), [8, 7, 6, 5, 4, 3, 2, 1]);
    let ack = Message::Ack(Ack {
        disk: "sda".into(),
        epoch: 2,
        last_seq: 300,
    });
    #[rustfmt::skip]
    let want = [
        3, b's', b'd', b'a',       // disk
        2, 0, 0, 0, 0, 0, 0, 0,    // epoch 2
        0x2c, 0x01, 0, 0, 0, 0, 0, 0, // last_seq 300 = 0x12c
    ];
    assert_eq!(ack.encode().unwrap(), want);
    let rej = Message::Reject(Reject {
        code: 0x0201,
        message: "no".into(),
    });
    assert_eq!(rej.encode().unwrap(), [0x01, 0x02, 2, b'n', b'o']);
    let p = Message::Progress(Progress {
        disk: "d".into(),
        lag_records: 2,
        lag_bytes: 0x100,
        lag_ns: 3,
        time_ns: 4,
    });
    #[rustfmt::skip]
    let want = [
        1, b'd',                      // disk
        2, 0, 0, 0, 0, 0, 0, 0,       // lag_records 2
        0, 1, 0, 0, 0, 0, 0, 0,       // lag_bytes 256
        3, 0, 0, 0, 0, 0, 0, 0,       // lag_ns 3
        4, 0, 0, 0, 0, 0, 0, 0,       // time_ns 4
    ];
    assert_eq!(p.encode().unwrap(), want);
    assert_eq!(p.kind(), 7);
    // Through a frame.
    let f = hb.to_frame_bytes(frame::MAX_FRAME).unwrap();
    assert_eq!(&f[6..8], &[6, 0]);
    let back = Message::read_from(&mut &f[..], frame::MAX_FRAME).unwrap();
    assert_eq!(back, hb);
}

#[rustfmt::skip]
const GOLDEN_HELLO: &[u8] = &[
    // protocol 3 (u16 LE)
    0x03, 0x00,
    // host: len 2, "h1"
    0x02, b'h', b'1',
    // disks: count 1 (u32 LE)
    0x01, 0, 0, 0,
    //   disk[0]: name len 3 "sda", size 1 GiB (0x4000_0000), ring_generation 3
    0x03, b's', b'd', b'a',
    0x00, 0x00, 0x00, 0x40, 0, 0, 0, 0,
    0x03, 0, 0, 0, 0, 0, 0, 0,
    // retention_secs 86400 = 0x0001_5180 (u64 LE), after the disks
    0x80, 0x51, 0x01, 0x00, 0, 0, 0, 0,
];

#[rustfmt::skip]
const GOLDEN_WELCOME: &[u8] = &[
    // target: len 2, "t1"
    0x02, b't', b'1',
    // resume: count 1 (u32 LE)
    0x01, 0, 0, 0,
    //   resume[0]: name len 1 "d", next_seq 9, epoch 2, consistent_from 7
    0x01, b'd',
    0x09, 0, 0, 0, 0, 0, 0, 0,
    0x02, 0, 0, 0, 0, 0, 0, 0,
    0x07, 0, 0, 0, 0, 0, 0, 0,
    //   seeded: 1 (protocol 3)
    0x01,
];

#[test]
fn golden_welcome_and_its_seeded_byte() {
    let m = Message::Welcome(Welcome {
        target: "t1".into(),
        resume: vec![DiskResume {
            name: "d".into(),
            next_seq: 9,
            epoch: 2,
            consistent_from: 7,
            seeded: true,
        }],
    });
    assert_eq!(m.encode().unwrap(), GOLDEN_WELCOME);
    assert_eq!(Message::decode(kind::WELCOME, GOLDEN_WELCOME).unwrap(), m);
    // Only 0 and 1 are booleans.
    let mut bad = GOLDEN_WELCOME.to_vec();
    *bad.last_mut().unwrap() = 2;
    assert!(Message::decode(kind::WELCOME, &bad).is_err());
    // A version-2 Welcome (no seeded byte) is truncated for this build.
    assert!(Message::decode(kind::WELCOME, &GOLDEN_WELCOME[..GOLDEN_WELCOME.len() - 1]).is_err());
}

#[test]
fn golden_hello() {
    assert_eq!(PROTOCOL_VERSION, 3, "the golden Hello is of version 3");
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        host: "h1".into(),
        disks: vec![DiskHello {
            name: "sda".into(),
            size: 1 << 30,
            ring_generation: 3,
        }],
        retention_secs: 86_400,
    };
    let m = Message::Hello(hello.clone());
    assert_eq!(m.kind(), kind::HELLO);
    assert_eq!(m.encode().unwrap(), GOLDEN_HELLO);
    assert_eq!(Message::decode(kind::HELLO, GOLDEN_HELLO).unwrap(), m);
    // The retention is the last 8 bytes, whatever the disks: none here.
    let empty = Message::Hello(Hello {
        disks: Vec::new(),
        retention_secs: u64::MAX - 1,
        ..hello.clone()
    });
    let body = empty.encode().unwrap();
    assert_eq!(body.len(), 2 + 3 + 4 + 8);
    assert_eq!(&body[body.len() - 8..], &(u64::MAX - 1).to_le_bytes());
    assert_eq!(Message::decode(kind::HELLO, &body).unwrap(), empty);
    // 0 (the target's default) is carried like any other value.
    let mut zero = GOLDEN_HELLO.to_vec();
    let at = zero.len() - 8;
    zero[at..].fill(0);
    assert_eq!(
        Message::decode(kind::HELLO, &zero).unwrap(),
        Message::Hello(Hello {
            retention_secs: 0,
            ..hello
        })
    );
    // A version-1 Hello (no retention) is truncated, not misread.
    let v1 = &GOLDEN_HELLO[..GOLDEN_HELLO.len() - 8];
    assert_eq!(
        Message::decode(kind::HELLO, v1).unwrap_err().kind(),
        ErrorKind::Truncated
    );
}

fn samples() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            host: "host-a".into(),
            disks: vec![
                DiskHello {
                    name: "sda".into(),
                    size: 1 << 30,
                    ring_generation: 3,
                },
                DiskHello {
                    name: "sdb".into(),
                    size: 1 << 33,
                    ring_generation: 1,
                },
            ],
            retention_secs: 7 * 86_400,
        }),
        Message::Welcome(Welcome {
            target: "dr-1".into(),
            resume: vec![DiskResume {
                name: "sda".into(),
                next_seq: 42,
                epoch: 1,
                consistent_from: 40,
                seeded: true,
            }],
        }),
        Message::ChangeSet(small_change_set()),
        Message::Ack(Ack {
            disk: "sda".into(),
            epoch: 1,
            last_seq: 41,
        }),
        Message::Reject(Reject {
            code: 7,
            message: "gap".into(),
        }),
        Message::Heartbeat(Heartbeat { time_ns: 5 }),
        Message::Progress(Progress {
            disk: "sda".into(),
            lag_records: 3,
            lag_bytes: 4096,
            lag_ns: 1_000_000,
            time_ns: 7,
        }),
        Message::BlockHashes(BlockHashes {
            disk: "sda".into(),
            block_size: 65536,
            ranges: vec![(0, 65536), (1 << 20, 100_000)],
            hashes: vec![[1; HASH_LEN], [2; HASH_LEN], [3; HASH_LEN]],
        }),
        Message::HashDiff(HashDiff {
            disk: "sda".into(),
            differs: vec![true, false, true, true, false, false, false, false, true],
        }),
    ]
}

#[test]
fn change_set_frames_without_copies_are_the_same_bytes() {
    let cs = small_change_set();
    let mut a = Vec::new();
    cs.write_frame_to(&mut a, frame::MAX_FRAME).unwrap();
    let b = Message::ChangeSet(cs.clone())
        .to_frame_bytes(frame::MAX_FRAME)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(
        cs.write_frame_to(&mut Vec::new(), 10).unwrap_err().kind(),
        ErrorKind::TooLarge
    );
}

#[test]
fn golden_hash_exchange() {
    let m = Message::BlockHashes(BlockHashes {
        disk: "d".into(),
        block_size: 0x1000,
        ranges: vec![(0x2000, 0x1800)],
        hashes: vec![[0xaa; HASH_LEN], [0xbb; HASH_LEN]],
    });
    // Block sizes: powers of two, 512 ..= 1 MiB; counts that overflow refused.
    for bs in [0, 3, 256, 2 << 20] {
        let bad = Message::BlockHashes(BlockHashes {
            disk: "d".into(),
            block_size: bs,
            ranges: vec![],
            hashes: vec![],
        });
        assert_eq!(
            bad.encode().unwrap_err().kind(),
            ErrorKind::Malformed,
            "{bs}"
        );
    }
    let huge = BlockHashes {
        disk: "d".into(),
        block_size: 512,
        ranges: vec![(0, u64::MAX); 600],
        hashes: vec![],
    };
    assert_eq!(huge.blocks(), None);
    assert_eq!(
        Message::BlockHashes(huge).encode().unwrap_err().kind(),
        ErrorKind::Malformed
    );
    let mut want = vec![
        1, b'd', // disk
        0, 0x10, 0, 0, // block_size 4096
        1, 0, 0, 0, // 1 range
        0, 0x20, 0, 0, 0, 0, 0, 0, // offset 0x2000
        0, 0x18, 0, 0, 0, 0, 0, 0, // length 0x1800: 2 blocks
        2, 0, 0, 0, // 2 hashes
    ];
    want.extend_from_slice(&[0xaa; HASH_LEN]);
    want.extend_from_slice(&[0xbb; HASH_LEN]);
    assert_eq!(m.encode().unwrap(), want);
    assert_eq!(m.kind(), 8);
    assert_eq!(Message::decode(8, &want).unwrap(), m);
    // Hash count must match the blocks.
    let BlockHashes { mut hashes, .. } = match m {
        Message::BlockHashes(b) => b,
        _ => unreachable!(),
    };
    hashes.pop();
    let bad = Message::BlockHashes(BlockHashes {
        disk: "d".into(),
        block_size: 0x1000,
        ranges: vec![(0x2000, 0x1800)],
        hashes,
    });
    assert_eq!(bad.encode().unwrap_err().kind(), ErrorKind::Malformed);
    let d = Message::HashDiff(HashDiff {
        disk: "d".into(),
        differs: vec![true, false, false, true, false, false, false, false, true],
    });
    let want = [1, b'd', 9, 0, 0, 0, 0b0000_1001, 0b0000_0001];
    assert_eq!(d.encode().unwrap(), want);
    assert_eq!(Message::decode(9, &want).unwrap(), d);
    // Padding bits past the last block must be zero (found by fuzzing).
    let padded = [1, b'd', 9, 0, 0, 0, 0b0000_1001, 0b0000_0011];
    assert_eq!(
        Message::decode(9, &padded).unwrap_err().kind(),
        ErrorKind::Malformed
    );
    let fuzz_case = [0, 5, 0, 0, 0, 0x2a];
    assert_eq!(
        Message::decode(9, &fuzz_case).unwrap_err().kind(),
        ErrorKind::Malformed
    );
}

#[test]
fn every_truncation_of_every_message_is_truncated() {
    for m in samples() {
        let body = m.encode().unwrap();
        assert_eq!(Message::decode(m.kind(), &body).unwrap(), m);
        for cut in 0..body.len() {
            let e = Message::decode(m.kind(), &body[..cut]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Truncated, "{m:?} cut {cut}: {e}");
        }
        // And as frames.
        let f = m.to_frame_bytes(frame::MAX_FRAME).unwrap();
        let e = Message::read_from(&mut &f[..0], frame::MAX_FRAME).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "nothing at all is a close");
        for cut in 1..f.len() {
            let e = Message::read_from(&mut &f[..cut], frame::MAX_FRAME).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Truncated, "frame cut {cut}: {e}");
        }
    }
}

#[test]
fn trailing_bytes_and_unknown_kind() {
    for m in samples() {
        let mut body = m.encode().unwrap();
        body.push(0);
        let e = Message::decode(m.kind(), &body).unwrap_err();
        // A change set with an extra byte fails the payload length check or
        // the trailing check; both are Malformed.
        assert_eq!(e.kind(), ErrorKind::Malformed, "{e}");
    }
    assert_eq!(
        Message::decode(99, &[]).unwrap_err().kind(),
        ErrorKind::Malformed
    );
}

#[test]
fn strings_and_counts_bounded() {
    let long = "x".repeat(256);
    let m = Message::Reject(Reject {
        code: 1,
        message: long,
    });
    assert_eq!(m.encode().unwrap_err().kind(), ErrorKind::TooLarge);
    let ok = Message::Reject(Reject {
        code: 1,
        message: "é".repeat(127),
    });
    assert!(ok.encode().is_ok());
    // Invalid UTF-8.
    let e = Message::decode(kind::REJECT, &[1, 0, 2, 0xc3, 0x28]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Malformed);
    // A count of u32::MAX disks is refused before allocating.
    let mut body = vec![1, 0, 1, b'h'];
    body.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = Message::decode(kind::HELLO, &body).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TooLarge);
    // A count within the bound but beyond the bytes left is truncated.
    let mut body = vec![1, 0, 1, b'h'];
    body.extend_from_slice(&1000u32.to_le_bytes());
    let e = Message::decode(kind::HELLO, &body).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Truncated);
}

#[test]
fn header_validation() {
    let base = small_change_set().header;
    let check = |f: &dyn Fn(&mut ChangeSetHeader), want: ErrorKind| {
        let mut h = base.clone();
        f(&mut h);
        assert_eq!(h.validate().unwrap_err().kind(), want, "{h:?}");
        assert_eq!(encode_header_aad(&h).unwrap_err().kind(), want);
        // The decoder applies the same checks: encode by hand.
        let mut e = Enc(Vec::new());
        e.str("", &h.host).unwrap();
        e.str("", &h.disk).unwrap();
        e.u64(h.epoch);
        e.u8(h.kind as u8);
        e.u64(h.first_seq);
        e.u64(h.last_seq);
        e.u64(h.prev_end_seq);
        e.u32(h.nonce_stream);
        e.u64(h.nonce_counter);
        e.0.extend_from_slice(&h.key_salt);
        e.u64(h.consistent_from);
        e.count("", h.tags.len(), usize::MAX).unwrap();
        for t in &h.tags {
            e.u64(t.seq);
            e.str("", &t.name).unwrap();
            e.bool(t.app);
            e.u64(t.time_ns);
        }
        e.count("", h.extents.len(), usize::MAX).unwrap();
        for x in &h.extents {
            e.u64(x.seq);
            e.u64(x.offset);
            e.u64(x.length);
            e.u8(x.op as u8);
        }
        e.count("", h.chunks.len(), usize::MAX).unwrap();
        for c in &h.chunks {
            e.u32(c.raw_len);
            e.u32(c.stored_len);
            e.bool(c.compressed);
        }
        assert_eq!(ChangeSetHeader::decode(&e.0).unwrap_err().kind(), want);
    };
    check(&|h| h.first_seq = 12, ErrorKind::Malformed); // first > last
    check(&|h| h.prev_end_seq = 10, ErrorKind::Malformed); // prev == first
    check(&|h| h.consistent_from = 12, ErrorKind::Malformed); // after last
    check(&|h| h.kind = ChangeKind::Resync, ErrorKind::Malformed); // resync claims
    check(&|h| h.extents[0].seq = 9, ErrorKind::Malformed); // seq before first
    check(&|h| h.extents[1].seq = 12, ErrorKind::Malformed); // seq after last
    check(&|h| h.extents[0].length = 6, ErrorKind::Malformed); // write sum != raw
    check(&|h| h.chunks[0].stored_len = 4, ErrorKind::Malformed); // raw chunk size
    check(
        &|h| {
            h.chunks[0].compressed = true;
            h.chunks[0].stored_len = 6;
        },
        ErrorKind::Malformed,
    ); // compressed larger than raw
    check(
        &|h| {
            h.chunks[0].raw_len = u32::try_from(CHUNK_SIZE + 1).unwrap();
            h.chunks[0].stored_len = u32::try_from(CHUNK_SIZE + 1).unwrap();
            h.extents[0].length = u64::try_from(CHUNK_SIZE).unwrap() + 1;
        },
        ErrorKind::TooLarge,
    );
    check(
        &|h| h.extents[1].offset = u64::MAX - 100,
        ErrorKind::Malformed,
    ); // offset + length overflows
       // Resync sets may carry any seqs in their extents.
    let mut h = base.clone();
    h.kind = ChangeKind::Resync;
    h.consistent_from = 0;
    h.extents[0].seq = 0;
    h.validate().unwrap();
    // The very first set: prev_end_seq == first_seq == 0.
    let mut h = base.clone();
    h.first_seq = 0;
    h.prev_end_seq = 0;
    h.extents[0].seq = 0;
    h.validate().unwrap();
    // Bad enum bytes.
    let mut body = GOLDEN_CHANGE_SET.to_vec();
    body[13] = 2; // kind
    assert_eq!(
        Message::decode(kind::CHANGE_SET, &body).unwrap_err().kind(),
        ErrorKind::Malformed
    );
    let mut body = GOLDEN_CHANGE_SET.to_vec();
    assert_eq!(body[88], 1, "tag.app is true in the golden set");
    body[88] = 2; // tag.app (offset: 3+2+8+1+24 +4+8+16+8 +4+8+2)
    assert_eq!(
        Message::decode(kind::CHANGE_SET, &body).unwrap_err().kind(),
        ErrorKind::Malformed
    );
    // Payload length must match the chunks.
    let mut cs = small_change_set();
    cs.payload.pop();
    assert_eq!(
        Message::ChangeSet(cs).encode().unwrap_err().kind(),
        ErrorKind::Malformed
    );
}

// ---------------------------------------------------------------- proptest

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9é_-]{0,40}"
}

fn header() -> impl Strategy<Value = ChangeSetHeader> {
    (
        name(),
        name(),
        any::<u64>(),
        any::<bool>(),
        0u64..1 << 40,
        0u64..1000,
        vec((0u64..1000, name(), any::<bool>()), 0..4),
        vec(
            (
                0u64..1000,
                0u64..1 << 40,
                0u64..1 << 20,
                prop_oneof![Just(ExtentOp::Zero), Just(ExtentOp::Trim)],
            ),
            0..6,
        ),
        vec((1u32..5000, any::<bool>(), 0u32..5000), 0..5),
    )
        .prop_map(
            |(host, disk, epoch, resync, first, span, tags, others, chunks)| {
                let first_seq = first + 1;
                let last_seq = first_seq + span;
                let chunks: Vec<ChunkInfo> = chunks
                    .into_iter()
                    .map(|(raw, comp, st)| ChunkInfo {
                        raw_len: raw,
                        stored_len: if comp { 1 + st % raw } else { raw },
                        compressed: comp,
                    })
                    .collect();
                let raw: u64 = chunks.iter().map(|c| u64::from(c.raw_len)).sum();
                let mut extents = vec![Extent {
                    seq: first_seq,
                    offset: 0,
                    length: raw,
                    op: ExtentOp::Write,
                }];
                extents.extend(others.into_iter().map(|(s, o, l, op)| Extent {
                    seq: first_seq + s % (span + 1),
                    offset: o,
                    length: l,
                    op,
                }));
                ChangeSetHeader {
                    host,
                    disk,
                    epoch,
                    kind: if resync {
                        ChangeKind::Resync
                    } else {
                        ChangeKind::WriteOrder
                    },
                    first_seq,
                    last_seq,
                    prev_end_seq: first,
                    nonce_stream: u32::try_from(epoch % 7).unwrap(),
                    nonce_counter: first_seq ^ epoch,
                    key_salt: [u8::try_from(epoch % 251).unwrap(); 16],
                    consistent_from: if resync { 0 } else { first_seq },
                    tags: tags
                        .into_iter()
                        .map(|(seq, name, app)| Tag {
                            seq,
                            name,
                            app,
                            time_ns: seq * 1000,
                        })
                        .collect(),
                    extents,
                    chunks,
                }
            },
        )
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u16>(),
            name(),
            vec((name(), any::<u64>(), any::<u64>()), 0..5),
            any::<u64>()
        )
            .prop_map(|(protocol, host, d, retention_secs)| Message::Hello(Hello {
                protocol,
                host,
                disks: d
                    .into_iter()
                    .map(|(name, size, ring_generation)| DiskHello {
                        name,
                        size,
                        ring_generation
                    })
                    .collect(),
                retention_secs,
            })),
        (name(), vec((name(), any::<u64>(), any::<u64>()), 0..5)).prop_map(|(target, r)| {
            Message::Welcome(Welcome {
                target,
                resume: r
                    .into_iter()
                    .map(|(name, next_seq, epoch)| DiskResume {
                        name,
                        next_seq,
                        epoch,
                        consistent_from: next_seq / 2,
                        seeded: epoch % 2 == 1,
                    })
                    .collect(),
            })
        }),
        (header(), any::<u8>()).prop_map(|(header, fill)| {
            let n = usize::try_from(header.stored_len()).unwrap() + TAG_LEN;
            Message::ChangeSet(ChangeSet {
                header,
                payload: vec![fill; n],
            })
        }),
        (name(), any::<u64>(), any::<u64>()).prop_map(|(disk, epoch, last_seq)| {
            Message::Ack(Ack {
                disk,
                epoch,
                last_seq,
            })
        }),
        (any::<u16>(), name())
            .prop_map(|(code, message)| Message::Reject(Reject { code, message })),
        any::<u64>().prop_map(|time_ns| Message::Heartbeat(Heartbeat { time_ns })),
        (name(), any::<[u64; 4]>()).prop_map(|(disk, v)| Message::Progress(Progress {
            disk,
            lag_records: v[0],
            lag_bytes: v[1],
            lag_ns: v[2],
            time_ns: v[3],
        })),
    ]
}

proptest! {
    #[test]
    fn round_trip(m in message()) {
        let body = m.encode().unwrap();
        prop_assert_eq!(Message::decode(m.kind(), &body).unwrap(), m.clone());
        let f = m.to_frame_bytes(frame::MAX_FRAME).unwrap();
        prop_assert_eq!(Message::read_from(&mut &f[..], frame::MAX_FRAME).unwrap(), m);
    }

    #[test]
    fn random_bytes_never_panic(kind in 0u16..8, bytes in vec(any::<u8>(), 0..600)) {
        let _ = Message::decode(kind, &bytes);
        let _ = ChangeSetHeader::decode(&bytes);
    }

    #[test]
    fn mutated_messages_never_panic(m in message(), pos in any::<usize>(), val in any::<u8>()) {
        let mut body = m.encode().unwrap();
        if !body.is_empty() {
            let i = pos % body.len();
            body[i] = val;
        }
        // Any outcome but a panic is fine; a success must re-encode identically.
        if let Ok(d) = Message::decode(m.kind(), &body) {
            prop_assert_eq!(d.encode().unwrap(), body);
        }
    }
}
