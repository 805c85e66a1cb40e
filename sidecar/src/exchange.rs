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

/// Blocks (in [`blocks`] order) that some other extent of the set also
/// touches: they are always sent.
fn overlapped(p: &Pending, block_size: u32) -> Vec<bool> {
    // Every extent as (start, end, index); a block overlaps if any extent
    // other than its own intersects it.
    let mut spans: Vec<(u64, u64, usize)> = p
        .header
        .extents
        .iter()
        .enumerate()
        .map(|(i, x)| (x.offset, x.offset.saturating_add(x.length), i))
        .collect();
    spans.sort_unstable();
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
            // Spans starting before `end`; any of another extent ending after `start`.
            let upto = spans.partition_point(|s| s.0 < end);
            let hit = spans[..upto].iter().any(|s| s.2 != i && s.1 > start);
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
    fn blocks_touched_twice_in_the_set_are_always_sent() {
        // Two writes of the same 16 bytes, and a zero extent over another.
        let data = vec![1u8; 48];
        let zero = Extent {
            seq: 3,
            offset: 100,
            length: 16,
            op: ExtentOp::Zero,
        };
        let mut p = pending(vec![w(1, 0, 16), w(2, 0, 16), zero, w(4, 96, 16)], data);
        // The target holds all three blocks, yet all overlap another extent.
        let dropped = keep_differing(&mut p, 16, &[false, false, false]);
        assert_eq!(dropped, 0);
        assert_eq!(p.header.extents.len(), 4);
        assert_eq!(p.data.len(), 48);
    }

    #[test]
    fn a_malformed_answer_sends_everything() {
        let mut p = pending(vec![w(1, 0, 32)], vec![5; 32]);
        assert_eq!(keep_differing(&mut p, 16, &[false]), 0);
        assert_eq!(p.data.len(), 32);
    }
}
