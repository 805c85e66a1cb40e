//! The applier's side of a disk's point history.
//!
//! * [`capture`]: before a change set touches the replica, what it is
//!   about to overwrite (the union of its extents, read from the replica;
//!   runs the replica does not store are recorded as zeros without
//!   reading) goes to the undo log, durably. A crash after that and before
//!   the watermark moves makes the applier meet the set again: the log
//!   already ends with it, so nothing is captured twice (capturing again
//!   would record bytes the set itself wrote).
//! * [`prune`]: retention. History is kept back to the oldest recovery
//!   point inside the window; older undo sets are dropped a segment at a
//!   time, and points no longer reachable leave the point list.

use std::path::Path;
use std::time::Duration;

use ferry_protocol::message::ChangeSetHeader;

use crate::applier::Replica;
use crate::error::{Error, ErrorKind, Result};
use crate::points::Point;
use crate::undo::{UndoExtent, UndoKind, UndoLog, UndoSetHeader, MAX_PART_DATA};

/// Most extents in one undo part.
pub const MAX_PART_EXTENTS: usize = 65_536;

/// The disjoint, sorted byte ranges the extents of `h` cover.
pub fn touched_ranges(h: &ChangeSetHeader) -> Vec<(u64, u64)> {
    let mut r: Vec<(u64, u64)> = h
        .extents
        .iter()
        .filter(|x| x.length > 0)
        .map(|x| (x.offset, x.offset.saturating_add(x.length)))
        .collect();
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// Parts being filled for one undo set.
struct PartBuilder {
    extents: Vec<UndoExtent>,
    data: Vec<u8>,
}

impl PartBuilder {
    fn full(&self) -> bool {
        self.extents.len() >= MAX_PART_EXTENTS || self.data.len() >= MAX_PART_DATA
    }
}

/// Record in `undo` what the set `h` is about to overwrite in `replica`,
/// unless the log already ends with it. `prev_applied` is the applied
/// watermark before the set. Returns whether anything was recorded.
pub fn capture(
    replica: &mut Replica,
    undo: &mut UndoLog,
    h: &ChangeSetHeader,
    prev_applied: Option<u64>,
) -> Result<bool> {
    if let Some(last) = undo.last_set() {
        let same_set = last.first_seq == h.first_seq
            && last.last_seq == h.last_seq
            && last.epoch == h.epoch
            && last.prev_applied == prev_applied;
        if same_set {
            return Ok(false); // captured before a crash
        }
        if last.last_seq >= h.last_seq || Some(last.last_seq) != prev_applied {
            // The log does not continue where the replica is (written by
            // an older ferry, a journal reset under it, a set recorded and
            // then lost from the journal): history across the hole cannot
            // be rebuilt; start afresh from here.
            tracing::warn!(disk = %h.disk, undo_last = last.last_seq, applied = ?prev_applied, "undo log does not continue the replica: older history dropped");
            undo.clear()?;
        }
    }
    let mut w = undo.begin_set(UndoSetHeader {
        epoch: h.epoch,
        first_seq: h.first_seq,
        last_seq: h.last_seq,
        prev_applied,
        consistent_from: h.consistent_from,
    })?;
    let mut part = PartBuilder {
        extents: Vec::new(),
        data: Vec::new(),
    };
    let read_err =
        |e: crate::applier::ApplyError| Error::new(ErrorKind::Io, "capture undo", e.to_string());
    for (offset, length) in touched_ranges(h) {
        let runs = replica
            .image_mut()
            .map(offset, length)
            .map_err(|e| Error::image("capture undo", e))?;
        for run in runs {
            if !run.allocated {
                part.extents.push(UndoExtent {
                    offset: run.offset,
                    length: run.length,
                    kind: UndoKind::Zeros,
                });
            } else {
                let mut at = run.offset;
                let end = run.offset + run.length;
                while at < end {
                    let room = MAX_PART_DATA - part.data.len();
                    let n = usize::try_from(end - at).unwrap_or(usize::MAX).min(room);
                    let from = part.data.len();
                    part.data.resize(from + n, 0);
                    replica
                        .read_at(&mut part.data[from..], at)
                        .map_err(read_err)?;
                    let n64 = u64::try_from(n).unwrap_or(u64::MAX);
                    part.extents.push(UndoExtent {
                        offset: at,
                        length: n64,
                        kind: UndoKind::Data,
                    });
                    at += n64;
                    if part.full() {
                        w.add_part(&part.extents, &part.data)?;
                        part.extents.clear();
                        part.data.clear();
                    }
                }
            }
            if part.full() {
                w.add_part(&part.extents, &part.data)?;
                part.extents.clear();
                part.data.clear();
            }
        }
    }
    if !part.extents.is_empty() {
        w.add_part(&part.extents, &part.data)?;
    }
    w.finish()?;
    Ok(true)
}

/// What [`prune`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Undo sets dropped.
    pub sets: u64,
    /// Bytes freed.
    pub bytes: u64,
    /// Points no longer reachable, dropped from the list.
    pub points: u64,
}

/// Apply the retention window: keep history back to the oldest point
/// recorded within `retention` of `now_ns` (source times), drop older undo
/// segments, and drop points that can no longer be reached.
pub fn prune(
    undo: &mut UndoLog,
    points_path: &Path,
    applied: Option<u64>,
    retention: Duration,
    now_ns: u64,
) -> Result<Pruned> {
    let Some(applied) = applied else {
        return Ok(Pruned::default());
    };
    let points = crate::points::read(points_path)?;
    let window_start =
        now_ns.saturating_sub(u64::try_from(retention.as_nanos()).unwrap_or(u64::MAX));
    let keep_from = points
        .iter()
        .find(|p| p.time_ns >= window_start && p.seq <= applied)
        .map_or(applied, |p| p.seq);
    let dropped = undo.prune_before(keep_from)?;
    let reachable = |p: &Point| p.seq == applied || undo.reaches(p.seq);
    let kept: Vec<Point> = points.iter().filter(|p| reachable(p)).cloned().collect();
    let lost = points.len() - kept.len();
    if lost > 0 {
        crate::points::rewrite(points_path, &kept)?;
    }
    Ok(Pruned {
        sets: dropped.sets,
        bytes: dropped.bytes,
        points: u64::try_from(lost).unwrap_or(u64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::message::{ChangeKind, Extent, ExtentOp};

    #[test]
    fn touched_ranges_merge_overlaps_and_neighbours() {
        let x = |offset, length| Extent {
            seq: 1,
            op: ExtentOp::Write,
            offset,
            length,
        };
        let h = ChangeSetHeader {
            host: "h".into(),
            disk: "d".into(),
            epoch: 1,
            kind: ChangeKind::WriteOrder,
            first_seq: 1,
            last_seq: 4,
            prev_end_seq: 0,
            nonce_stream: 0,
            nonce_counter: 0,
            key_salt: [0; 16],
            consistent_from: 1,
            tags: Vec::new(),
            extents: vec![x(100, 10), x(0, 10), x(5, 10), x(15, 5), x(50, 0)],
            chunks: Vec::new(),
        };
        assert_eq!(touched_ranges(&h), vec![(0, 20), (100, 10)]);
    }
}
