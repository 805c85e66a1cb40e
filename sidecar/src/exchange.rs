//! The checksum exchange: before a resync set travels, the sidecar sends
//! the hashes of its blocks and the target answers which differ from the
//! replica; blocks the target already holds are dropped from the set, so a
//! resync after a short outage (or a full resync of a disk the target
//! mostly has) moves only what differs.
//!
//! Correctness: the target answers after applying everything it received
//! before, so "equal" means equal to the replica state the set will be
//! applied on. Within one set, a block that another extent of the same set
//! also touches is always sent: the set applies its extents in order, and
//! dropping a later copy could let an earlier one win.

use ferry_protocol::message::{BlockHashes, Extent, ExtentOp, HASH_LEN};
use ferry_protocol::payload::block_hash;

use crate::batch::Pending;

/// Block size of the exchange: 64 KiB, the filter's usual dirty granule.
pub const BLOCK_SIZE: u32 = 64 << 10;

fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// The blocks of the set's Write extents, in order: (offset, length,
/// position of the data in `p.data`).
fn blocks(p: &Pending, block_size: u32) -> Vec<(u64, u64, usize)> {
    let bs = u64::from(block_size.max(1));
    let mut out = Vec::new();
    let mut at = 0usize;
    for x in p.header.extents.iter().filter(|x| x.op == ExtentOp::Write) {
        let mut done = 0u64;
        while done < x.length {
            let len = bs.min(x.length - done);
            out.push((x.offset + done, len, at + usize_of(done)));
            done += len;
        }
        at += usize_of(x.length);
    }
    out
}

/// The hashes message for the set's Write extents.
pub fn hashes_of(p: &Pending, block_size: u32) -> BlockHashes {
    let ranges = p
        .header
        .extents
        .iter()
        .filter(|x| x.op == ExtentOp::Write)
        .map(|x| (x.offset, x.length))
        .collect();
    let hashes: Vec<[u8; HASH_LEN]> = blocks(p, block_size)
        .into_iter()
        .map(|(_, len, at)| block_hash(&p.data[at..at + usize_of(len)]))
        .collect();
    BlockHashes {
        disk: p.header.disk.clone(),
        block_size,
        ranges,
        hashes,
    }
}

/// Blocks (in [`blocks`] order) that must be sent whatever the target
/// holds: another extent of the set touches them with other content (a
/// Zero or Trim extent, or a write whose bytes there differ). The set
/// applies its extents in order, and dropping one copy could let another
/// win. Copies with the same bytes (a region claimed twice, read at the
/// same state) give the same result in any order: they are left to the
/// exchange, so a block the target holds is not sent just for being
/// claimed twice.
fn overlapped(p: &Pending, block_size: u32) -> Vec<bool> {
    // Every extent as (start, end, index), and where a write's data starts.
    let mut spans: Vec<(u64, u64, usize)> = p
        .header
        .extents
        .iter()
        .enumerate()
        .map(|(i, x)| (x.offset, x.offset.saturating_add(x.length), i))
        .collect();
    spans.sort_unstable();
    let mut data_at = Vec::with_capacity(p.header.extents.len());
    let mut at = 0usize;
    for x in &p.header.extents {
        data_at.push(at);
        if x.op == ExtentOp::Write {
            at += usize_of(x.length);
        }
    }
    // The bytes extent `i` writes over [lo, hi), if within the data.
    let bytes = |i: usize, lo: u64, hi: u64| {
        let x = &p.header.extents[i];
        let from = data_at[i] + usize_of(lo - x.offset);
        p.data.get(from..from + usize_of(hi - lo))
    };
    let mut out = Vec::new();
    for (i, x) in p.header.extents.iter().enumerate() {
        if x.op != ExtentOp::Write {
            continue;
        }
        let bs = u64::from(block_size.max(1));
        let mut done = 0u64;
        while done < x.length {
            let len = bs.min(x.length - done);
            let (start, end) = (x.offset + done, x.offset + done + len);
            // Spans starting before `end`; those of another extent ending
            // after `start` touch the block.
            let upto = spans.partition_point(|s| s.0 < end);
            let hit = spans[..upto]
                .iter()
                .filter(|s| s.2 != i && s.1 > start)
                .any(|&(_, s_end, j)| {
                    let (lo, hi) = (start.max(p.header.extents[j].offset), end.min(s_end));
                    p.header.extents[j].op != ExtentOp::Write
                        || bytes(i, lo, hi).is_none()
                        || bytes(i, lo, hi) != bytes(j, lo, hi)
                });
            out.push(hit);
            done += len;
        }
    }
    out
}

/// Drop from the set the blocks the target holds (`differs[i]` false) and no
/// other extent touches; returns the bytes dropped. Write extents become
/// the runs of kept blocks (same sequence); other extents stay in place.
pub fn keep_differing(p: &mut Pending, block_size: u32, differs: &[bool]) -> u64 {
    let all = blocks(p, block_size);
    if differs.len() != all.len() {
        return 0; // a malformed answer: send everything
    }
    let forced = overlapped(p, block_size);
    let keep: Vec<bool> = differs.iter().zip(&forced).map(|(&d, &f)| d || f).collect();
    let mut extents = Vec::with_capacity(p.header.extents.len());
    let mut data = Vec::with_capacity(p.data.len());
    let mut dropped = 0u64;
    let mut b = 0usize;
    for x in &p.header.extents {
        if x.op != ExtentOp::Write {
            extents.push(*x);
            continue;
        }
        let mut run: Option<Extent> = None;
        let mut done = 0u64;
        while done < x.length {
            let (offset, len, at) = all[b];
            if keep[b] {
                data.extend_from_slice(&p.data[at..at + usize_of(len)]);
                match run.as_mut() {
                    Some(r) => r.length += len,
                    None => {
                        run = Some(Extent {
                            seq: x.seq,
                            offset,
                            length: len,
                            op: ExtentOp::Write,
                        })
                    }
                }
            } else {
                dropped += len;
                extents.extend(run.take());
            }
            done += len;
            b += 1;
        }
        extents.extend(run.take());
    }
    p.header.extents = extents;
    p.data = data;
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::message::{ChangeKind, ChangeSetHeader};
    use proptest::prelude::Strategy;

    fn pending(extents: Vec<Extent>, data: Vec<u8>) -> Pending {
        Pending {
            header: ChangeSetHeader {
                host: "h".into(),
                disk: "d".into(),
                epoch: 1,
                kind: ChangeKind::Resync,
                first_seq: 1,
                last_seq: 9,
                prev_end_seq: 0,
                nonce_stream: 0,
                nonce_counter: 0,
                key_salt: [0; 16],
                consistent_from: 0,
                tags: Vec::new(),
                extents,
                chunks: Vec::new(),
            },
            data,
            commit_to: 1,
            records: 1,
            flushes: 0,
            dropped_tags: 0,
            state_changes: 0,
            zero_bytes: 0,
        }
    }

    fn w(seq: u64, offset: u64, length: u64) -> Extent {
        Extent {
            seq,
            offset,
            length,
            op: ExtentOp::Write,
        }
    }

    #[test]
    fn equal_blocks_are_dropped_and_runs_merged() {
        // One 5-block extent (last block short) and one 1-block extent.
        let data: Vec<u8> = (0..(4 * 16 + 8 + 16))
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let mut p = pending(vec![w(1, 0, 4 * 16 + 8), w(2, 1000, 16)], data.clone());
        let h = hashes_of(&p, 16);
        assert_eq!(h.ranges, vec![(0, 72), (1000, 16)]);
        assert_eq!(h.hashes.len(), 6);
        assert_eq!(h.hashes[0], block_hash(&data[..16]));
        // Blocks 1, 2 and 5 differ.
        let dropped = keep_differing(&mut p, 16, &[false, true, true, false, false, true]);
        assert_eq!(dropped, 16 + 16 + 8);
        assert_eq!(p.header.extents, vec![w(1, 16, 32), w(2, 1000, 16)]);
        assert_eq!(p.data, [&data[16..48], &data[72..88]].concat());
        p.header.validate().unwrap_or(()); // chunks are filled at sealing
    }

    #[test]
    fn blocks_touched_twice_with_other_content_are_always_sent() {
        // Two writes of other bytes at 0, and a zero extent over the block
        // at 96.
        let data = [vec![1u8; 16], vec![2u8; 16], vec![3u8; 16]].concat();
        let zero = Extent {
            seq: 3,
            offset: 100,
            length: 16,
            op: ExtentOp::Zero,
        };
        let mut p = pending(vec![w(1, 0, 16), w(2, 0, 16), zero, w(4, 96, 16)], data);
        // The target holds all three blocks, yet each meets other content.
        let dropped = keep_differing(&mut p, 16, &[false, false, false]);
        assert_eq!(dropped, 0);
        assert_eq!(p.header.extents.len(), 4);
        assert_eq!(p.data.len(), 48);
    }

    #[test]
    fn a_region_claimed_twice_with_the_same_bytes_is_left_to_the_exchange() {
        // The same 24 bytes read twice (a region claimed by the initial copy
        // and again by a resync of the whole disk), overlapping by half.
        let disk: Vec<u8> = (0..64u8).collect();
        let data = [&disk[0..24], &disk[12..36]].concat();
        let mut p = pending(vec![w(1, 0, 24), w(2, 12, 24)], data);
        // Blocks: [0,16) [16,24) of the first, [12,28) [28,36) of the second.
        let dropped = keep_differing(&mut p, 16, &[false, false, false, true]);
        assert_eq!(dropped, 16 + 8 + 16);
        assert_eq!(p.header.extents, vec![w(2, 28, 8)]);
        assert_eq!(p.data, &disk[28..36]);
    }

    /// A set of overlapping writes and zeros over a small disk, and a
    /// replica: applying what the exchange keeps gives what applying the
    /// whole set gives.
    /// An extent to build: (op: 0-2 write, 3 zero; offset; length; fill).
    type Op = (u8, u64, u64, u8);

    fn set_and_replica() -> impl Strategy<Value = (Vec<Op>, Vec<u8>)> {
        (
            proptest::collection::vec((0u8..4, 0u64..120, 1u64..40, 0u8..3), 1..8),
            proptest::collection::vec(0u8..3, 160),
        )
    }

    fn apply(disk: &mut [u8], p: &Pending) {
        let mut at = 0usize;
        for x in &p.header.extents {
            let (o, n) = (usize_of(x.offset), usize_of(x.length));
            match x.op {
                ExtentOp::Write => {
                    disk[o..o + n].copy_from_slice(&p.data[at..at + n]);
                    at += n;
                }
                _ => disk[o..o + n].fill(0),
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn dropping_what_the_target_holds_never_changes_the_result((ops, replica) in set_and_replica()) {
            // Writes fill with a pattern byte (so copies often agree); op 3 is
            // a zero extent.
            let mut extents = Vec::new();
            let mut data = Vec::new();
            for (i, &(op, offset, length, fill)) in ops.iter().enumerate() {
                let seq = u64::try_from(i).unwrap() + 1;
                if op == 3 {
                    extents.push(Extent { seq, offset, length, op: ExtentOp::Zero });
                } else {
                    extents.push(w(seq, offset, length));
                    data.extend(std::iter::repeat_n(fill, usize_of(length)));
                }
            }
            let full = pending(extents, data);
            let mut want = replica.clone();
            apply(&mut want, &full);
            // The target's answer: does the replica hold the block?
            let differs: Vec<bool> = blocks(&full, 16)
                .iter()
                .map(|&(o, n, at)| replica[usize_of(o)..usize_of(o + n)] != full.data[at..at + usize_of(n)])
                .collect();
            let mut kept = pending(full.header.extents.clone(), full.data.clone());
            keep_differing(&mut kept, 16, &differs);
            let mut got = replica.clone();
            apply(&mut got, &kept);
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_malformed_answer_sends_everything() {
        let mut p = pending(vec![w(1, 0, 32)], vec![5; 32]);
        assert_eq!(keep_differing(&mut p, 16, &[false]), 0);
        assert_eq!(p.data.len(), 32);
    }
}
