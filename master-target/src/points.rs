//! Recovery points: the tags of applied change sets at which the replica
//! was a consistent prefix of the source's write order.
//!
//! The applier appends each such tag to `DATA/hosts/HOST/DISK/points.jsonl`
//! (one JSON object a line, synced) once the change set carrying it is
//! applied. A tag covers every disk of a host at one sequence, so a host's
//! points are the sequences present for all of its disks ([`host_points`]).
//!
//! A crash between applying a set and recording its points replays the set
//! and records them again; readers keep the first line of each sequence. A
//! torn last line (a crash mid-append) is skipped.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

use ferry_protocol::message::{ChangeSetHeader, Tag};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of a disk's point log.
pub const POINTS_FILE: &str = "points.jsonl";

/// One recovery point of one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    /// Sequence of the tag.
    pub seq: u64,
    /// Tag name.
    pub name: String,
    /// Application consistent (file systems frozen) rather than crash consistent.
    pub app: bool,
    /// When the filter recorded the tag (source clock, UNIX ns).
    pub time_ns: u64,
}

/// Whether `tag` of a set with header `h` is a consistent point: the set
/// claims consistency from a sequence at or before the tag.
pub fn is_consistent_point(h: &ChangeSetHeader, tag: &Tag) -> bool {
    h.consistent_from != 0 && h.consistent_from <= tag.seq && tag.seq <= h.last_seq
}

/// The consistent points a set carries.
pub fn points_of(h: &ChangeSetHeader) -> Vec<Point> {
    h.tags
        .iter()
        .filter(|t| is_consistent_point(h, t))
        .map(|t| Point {
            seq: t.seq,
            name: t.name.clone(),
            app: t.app,
            time_ns: t.time_ns,
        })
        .collect()
}

/// Append `points` to the log at `path` and sync it.
pub fn append(path: &Path, points: &[Point]) -> Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let mut text = Vec::new();
    for p in points {
        serde_json::to_writer(&mut text, p)
            .map_err(|e| Error::io("record points", path, std::io::Error::other(e)))?;
        text.push(b'\n');
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io("record points", path, e))?;
    f.write_all(&text)
        .and_then(|()| f.sync_data())
        .map_err(|e| Error::io("record points", path, e))
}

/// Replace the log at `path` by `points` atomically (temp file, sync,
/// rename, sync of the directory): retention and commit drop points.
pub fn rewrite(path: &Path, points: &[Point]) -> Result<()> {
    let mut text = Vec::new();
    for p in points {
        serde_json::to_writer(&mut text, p)
            .map_err(|e| Error::io("rewrite points", path, std::io::Error::other(e)))?;
        text.push(b'\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    let written = fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(&text)?;
        f.sync_data()
    });
    written
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| Error::io("rewrite points", path, e))?;
    crate::materialize::sync_parent(path)
}

/// The points of one disk, by sequence (first record of each wins;
/// unreadable lines, a torn tail, are skipped).
pub fn read(path: &Path) -> Result<Vec<Point>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("read points", path, e)),
    };
    let mut by_seq = BTreeMap::new();
    for line in text.lines() {
        if let Ok(p) = serde_json::from_str::<Point>(line) {
            by_seq.entry(p.seq).or_insert(p);
        }
    }
    Ok(by_seq.into_values().collect())
}

/// The points of a host: sequences every disk has, oldest first.
pub fn host_points(disks: &[Vec<Point>]) -> Vec<Point> {
    let Some((first, rest)) = disks.split_first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter(|p| {
            rest.iter()
                .all(|d| d.binary_search_by_key(&p.seq, |q| q.seq).is_ok())
        })
        .cloned()
        .collect()
}

/// The points of `host` in the data directory `data`.
pub fn of_host(data: &Path, host: &str) -> Result<Vec<Point>> {
    let dir = data.join(crate::site::HOSTS_DIR).join(host);
    let entries = fs::read_dir(&dir).map_err(|e| Error::io("list disks", &dir, e))?;
    let mut disks = Vec::new();
    for e in entries.flatten() {
        if e.path().is_dir() {
            disks.push(read(&e.path().join(POINTS_FILE))?);
        }
    }
    Ok(host_points(&disks))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::message::ChangeKind;

    fn header(consistent_from: u64, tags: &[(u64, bool)]) -> ChangeSetHeader {
        ChangeSetHeader {
            host: "h".into(),
            disk: "d".into(),
            epoch: 1,
            kind: ChangeKind::WriteOrder,
            first_seq: 10,
            last_seq: 20,
            prev_end_seq: 9,
            nonce_stream: 0,
            nonce_counter: 0,
            key_salt: [0; 16],
            consistent_from,
            tags: tags
                .iter()
                .map(|&(seq, app)| Tag {
                    seq,
                    name: format!("t{seq}"),
                    app,
                    time_ns: seq * 10,
                })
                .collect(),
            extents: Vec::new(),
            chunks: Vec::new(),
        }
    }

    #[test]
    fn only_tags_inside_the_claim_are_points() {
        assert!(
            points_of(&header(0, &[(12, false)])).is_empty(),
            "inconsistent set"
        );
        let p = points_of(&header(15, &[(12, false), (15, true), (20, false)]));
        assert_eq!(
            p.iter().map(|p| (p.seq, p.app)).collect::<Vec<_>>(),
            vec![(15, true), (20, false)]
        );
    }

    #[test]
    fn log_round_trip_dedupes_and_skips_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("ferry-points-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(POINTS_FILE);
        let a = points_of(&header(10, &[(12, false), (15, true)]));
        append(&path, &a).unwrap();
        append(&path, &a[1..]).unwrap(); // a replay after a crash
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"seq\":19,\"na").unwrap(); // torn
        assert_eq!(read(&path).unwrap(), a);
        assert!(read(&dir.join("none")).unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_points_are_on_every_disk() {
        let p = |seq| Point {
            seq,
            name: format!("t{seq}"),
            app: false,
            time_ns: 0,
        };
        let disks = vec![vec![p(1), p(5), p(9)], vec![p(5), p(9)], vec![p(1), p(9)]];
        assert_eq!(host_points(&disks), vec![p(9)]);
        assert!(host_points(&[]).is_empty());
    }
}
