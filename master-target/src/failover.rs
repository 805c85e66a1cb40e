//! Failover, test failover and commit: a host's disks materialized at one
//! recovery point.
//!
//! # States (`DATA/hosts/HOST/failover.json`, replaced atomically, synced)
//!
//! ```text
//!  (protected) --failover--> failing-over --images written--> failed-over
//!                                 ^  |                          |   |
//!                                 +--+ (retry after a crash)    |   +--commit--> committing --> committed
//!                                             failover --change-point
//! ```
//!
//! The file's existence stops replication of the host: the target refuses
//! its sidecar's connections and change sets (the refusal says why) and
//! retention leaves its history alone. What was received before the stop
//! is still applied (so `latest` can include it), each set's undo captured
//! first. The replica is never rewound by a failover: images are
//! materialized from a copy or a view of it (see [`crate::materialize`]), so
//! another point can be chosen until the commit, which drops the history.
//! A point is chosen before anything stops (except `latest`, chosen once
//! the backlog is applied); a failover that cannot choose one puts the
//! host back as it was. One verb runs on a host at a time.
//!
//! A test failover (`test-failover.json`) leaves replication running: its
//! images are a read-only base at the point (`DISK.base.vhd`) and a
//! writable differencing VHD over it (`DISK.vhd`); cleanup removes both
//! and the state file, and the target is as it was.

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ferry_vhd::{CreateOptions, Format, SyncPolicy};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::materialize::{self, extension, Exported};
use crate::points::Point;
use crate::site::{now_ns, write_json_atomically, Consistency, DiskHandle, Site, HOSTS_DIR};

/// A host's failover state file.
pub const FAILOVER_FILE: &str = "failover.json";
/// A host's test-failover state file.
pub const TEST_FAILOVER_FILE: &str = "test-failover.json";
/// The manifest written next to failed-over images.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Which point the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointSpec {
    /// Apply everything received, then the newest consistent state.
    Latest,
    /// The newest consistent state already applied.
    LatestProcessed,
    /// The newest app-consistent point.
    LatestApp,
    /// The newest point at or before this time (UNIX ns).
    Time(u64),
    /// A named point (the newest of that name).
    Named(String),
}

impl FromStr for PointSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "" => return Err("empty point".into()),
            "latest" => PointSpec::Latest,
            "latest-processed" => PointSpec::LatestProcessed,
            "latest-app" => PointSpec::LatestApp,
            _ => match crate::clock::parse_utc(s) {
                Some(ns) => PointSpec::Time(ns),
                None => PointSpec::Named(s.to_owned()),
            },
        })
    }
}

impl std::fmt::Display for PointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSpec::Latest => f.write_str("latest"),
            PointSpec::LatestProcessed => f.write_str("latest-processed"),
            PointSpec::LatestApp => f.write_str("latest-app"),
            PointSpec::Time(ns) => f.write_str(&crate::clock::utc(*ns)),
            PointSpec::Named(n) => f.write_str(n),
        }
    }
}

/// The point a request resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chosen {
    /// Sequence: every disk is materialized with every change up to it.
    pub seq: u64,
    /// `app`, `crash` (a recorded point) or `latest` (the applied state).
    pub kind: String,
    /// The point's name, for recorded points.
    pub name: Option<String>,
    /// Source time of the point, for recorded points (UNIX ns).
    pub time_ns: Option<u64>,
    /// Why another point than the asked kind was used, if it was.
    pub note: Option<String>,
}

impl Chosen {
    /// The point of a failover that has not chosen one yet.
    pub(crate) fn pending() -> Chosen {
        Chosen {
            seq: 0,
            kind: "pending".into(),
            name: None,
            time_ns: None,
            note: None,
        }
    }

    fn of_point(p: &Point) -> Chosen {
        Chosen {
            seq: p.seq,
            kind: if p.app { "app" } else { "crash" }.into(),
            name: Some(p.name.clone()),
            time_ns: Some(p.time_ns),
            note: None,
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        let mut s = format!("seq {} ({})", self.seq, self.kind);
        if let Some(n) = &self.name {
            s.push_str(&format!(" {n:?}"));
        }
        if let Some(t) = self.time_ns {
            s.push_str(&format!(" at {} UTC", crate::clock::utc(t)));
        }
        s
    }
}

/// What the resolver needs to know of one disk.
#[derive(Debug, Clone)]
pub struct DiskView {
    /// Disk name.
    pub disk: String,
    /// Applied sequence.
    pub applied: Option<u64>,
    /// Consistency after the applied set.
    pub consistency: Consistency,
    /// Recovery points recorded.
    pub points: Vec<Point>,
    /// Sequences the undo log can rewind to (set boundaries).
    pub reachable: std::collections::BTreeSet<u64>,
}

impl DiskView {
    fn reaches(&self, seq: u64) -> bool {
        self.applied == Some(seq) || self.reachable.contains(&seq)
    }

    fn consistent_at_applied(&self) -> Option<u64> {
        match (&self.consistency, self.applied) {
            (Consistency::Consistent { since }, Some(a)) if *since <= a => Some(a),
            _ => None,
        }
    }
}

/// Choose the point `spec` names among what every disk of the host can
/// reach.
pub fn resolve(disks: &[DiskView], spec: &PointSpec) -> Result<Chosen> {
    let none = |why: String| Error::new(ErrorKind::InvalidInput, "choose point", why);
    if disks.is_empty() {
        return Err(none("the host has no disks at this target".into()));
    }
    let all_points: Vec<Vec<Point>> = disks.iter().map(|d| d.points.clone()).collect();
    let host_points = crate::points::host_points(&all_points);
    let reachable = |seq: u64| disks.iter().all(|d| d.reaches(seq));
    let newest = |pred: &dyn Fn(&Point) -> bool| {
        host_points
            .iter()
            .rev()
            .find(|p| pred(p) && reachable(p.seq))
            .map(Chosen::of_point)
    };
    match spec {
        PointSpec::Latest | PointSpec::LatestProcessed => {
            let applied: Vec<Option<u64>> =
                disks.iter().map(|d| d.consistent_at_applied()).collect();
            let same = applied.windows(2).all(|w| w[0] == w[1]);
            if let (Some(Some(seq)), true) = (applied.first(), same) {
                return Ok(Chosen {
                    seq: *seq,
                    kind: "latest".into(),
                    name: None,
                    time_ns: None,
                    note: None,
                });
            }
            let why = disks
                .iter()
                .find_map(|d| match &d.consistency {
                    Consistency::Inconsistent { reason } => {
                        Some(format!("disk {}: {reason}", d.disk))
                    }
                    Consistency::Consistent { .. } if d.applied.is_none() => {
                        Some(format!("disk {}: nothing applied", d.disk))
                    }
                    Consistency::Consistent { .. } => None,
                })
                .unwrap_or_else(|| "the disks end at different sequences".into());
            let mut c = newest(&|_| true).ok_or_else(|| {
                none(format!("the applied state is not consistent ({why}) and no recovery point is reachable"))
            })?;
            c.note = Some(format!(
                "the applied state is not a consistent point ({why}): the newest recovery point is used"
            ));
            Ok(c)
        }
        PointSpec::LatestApp => {
            newest(&|p| p.app).ok_or_else(|| none("no app-consistent point is reachable".into()))
        }
        PointSpec::Time(t) => newest(&|p| p.time_ns <= *t).ok_or_else(|| {
            none(format!(
                "no reachable point at or before {} UTC",
                crate::clock::utc(*t)
            ))
        }),
        PointSpec::Named(name) => {
            let Some(p) = host_points.iter().rev().find(|p| &p.name == name) else {
                return Err(none(format!(
                    "no point named {name:?} (list them with `ferry points`)"
                )));
            };
            if let Some(d) = disks.iter().find(|d| !d.reaches(p.seq)) {
                let oldest = d
                    .reachable
                    .first()
                    .or(d.applied.as_ref())
                    .map_or_else(|| "nothing".to_owned(), |s| format!("seq {s}"));
                return Err(none(format!(
                    "point {name:?} (seq {}) cannot be reached on disk {}: its history goes back to {oldest} \
                     (retention, a commit, or history lost to a crash of an older version)",
                    p.seq, d.disk
                )));
            }
            Ok(Chosen::of_point(p))
        }
    }
}

/// Where a host's failover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverState {
    /// Replication stopped; images being written.
    FailingOver,
    /// Images written; the point may still change.
    FailedOver,
    /// Dropping the other points (a crash here: commit again).
    Committing,
    /// Finalized at the point; the other points are gone.
    Committed,
}

/// One disk of a failover's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskImage {
    /// Disk name.
    pub disk: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Image format.
    pub format: String,
    /// The image file.
    pub file: PathBuf,
    /// Further files of the image (a flat VMDK's extent).
    #[serde(default)]
    pub extra_files: Vec<PathBuf>,
    /// Bytes of the image file(s).
    pub file_bytes: u64,
    /// SHA-256 of the image file (`sha256sum`), unless skipped.
    pub sha256: Option<String>,
    /// Bytes the rewind wrote back (the data that differed from the replica).
    pub rewound_bytes: u64,
    /// How the replica was copied (a reflink costs no data movement).
    #[serde(default)]
    pub copy: Option<materialize::CopyMethod>,
}

/// The manifest written next to the images, and the failover state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Host name.
    pub host: String,
    /// Where the failover stands.
    pub state: FailoverState,
    /// The point.
    pub point: Chosen,
    /// Output directory.
    pub out: PathBuf,
    /// The images.
    pub disks: Vec<DiskImage>,
    /// Files a failover in progress will write (removed by a retry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub planned: Vec<PathBuf>,
    /// A failback: the images are the replicas, rewound in place
    /// ([`crate::failback`]), not copies in `out`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_place: bool,
    /// When this was written (UNIX ns).
    pub updated_ns: u64,
}

/// A failover request.
#[derive(Debug, Clone)]
pub struct FailoverRequest {
    /// Host.
    pub host: String,
    /// Point.
    pub point: PointSpec,
    /// Image format.
    pub format: Format,
    /// Output directory (created if missing).
    pub out: PathBuf,
    /// Change the point of a failed-over host (before commit).
    pub change_point: bool,
    /// Compute SHA-256 checksums for the manifest.
    pub checksums: bool,
}

/// Progress messages for the operator.
pub type Progress<'a> = &'a mut dyn FnMut(&str);

fn host_dir(site: &Site, host: &str) -> PathBuf {
    site.dir().join(HOSTS_DIR).join(host)
}

fn read_state<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::new(ErrorKind::Corrupt, "read state", e.to_string()).at_path(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read state", path, e)),
    }
}

pub(crate) fn write_state(path: &Path, value: &impl Serialize) -> Result<()> {
    write_json_atomically(path, value, true).map_err(|e| Error::io("write state", path, e))?;
    materialize::sync_parent(path)
}

/// The failover state of `host`, if it was failed over.
pub fn failover_state(data: &Path, host: &str) -> Result<Option<Manifest>> {
    read_state(&data.join(HOSTS_DIR).join(host).join(FAILOVER_FILE))
}

/// Whether replication of `host` is stopped by a failover.
pub fn is_failed_over(data: &Path, host: &str) -> bool {
    data.join(HOSTS_DIR).join(host).join(FAILOVER_FILE).exists()
}

pub(crate) fn views_of(disks: &[Arc<DiskHandle>]) -> Result<Vec<DiskView>> {
    disks.iter().map(|d| d.view()).collect()
}

fn image_name(disk: &str, format: Format) -> String {
    format!("{disk}.{}", extension(format))
}

/// Materialize `disk` at `seq` as `out/NAME` in `format`: a copy of the
/// replica rewound to the point, converted if `format` is not the
/// replica's. With `direct` (the host's replication is stopped), another
/// format is converted straight from a view of the replica at the point
/// instead (one pass; the applier waits meanwhile), and so is a flat VMDK
/// replica always.
#[allow(clippy::too_many_arguments)]
fn materialize_disk(
    d: &DiskHandle,
    seq: u64,
    format: Format,
    out: &Path,
    name: &str,
    checksums: bool,
    direct: bool,
    progress: Progress<'_>,
) -> Result<DiskImage> {
    let image = out.join(name);
    let tmp = out.join(format!(".{name}.materializing"));
    remove_if_present(&tmp)?;
    let replica_format = Format::from_name(&d.snapshot().replica_format);
    // A flat VMDK (an adopted image) is two files: a file copy of the
    // descriptor would share the extent. Read it through a view instead.
    let multi_file = replica_format == Some(Format::VmdkFlat);
    if multi_file || (direct && replica_format.is_some_and(|f| f != format)) {
        return materialize_through_view(d, seq, format, &image, &tmp, checksums, progress);
    }
    let mut size = 0;
    let outcome = (|| {
        let (replica_format, applied, method, undo) = {
            // The applier waits while the replica is copied: the copy is
            // one applied state, and the undo copy holds every set up to
            // it. Replication itself (the journal) goes on.
            let _paused = d.pause_apply();
            let st = d.snapshot();
            size = st.size;
            let format = Format::from_name(&st.replica_format).unwrap_or(Format::VhdDynamic);
            let method = materialize::snapshot(&st.replica_path, format, &tmp)?;
            (format, st.applied_seq, method, d.undo_reader()?)
        };
        let rewound = materialize::rewind_file(&tmp, replica_format, &undo, Some(seq), applied)?;
        progress(&format!(
            "{}: replica {}, rewound {} sets ({} bytes restored, {} zeroed)",
            d.disk(),
            match method {
                materialize::CopyMethod::Reflink => "reflinked",
                materialize::CopyMethod::Copy | materialize::CopyMethod::Converted => "copied",
            },
            rewound.sets,
            rewound.bytes_restored,
            rewound.bytes_zeroed
        ));
        let exported = materialize::export(&tmp, replica_format, format, &image, &mut |_, _| {})?;
        Ok::<_, Error>((rewound, exported, method))
    })();
    let (rewound, exported, method) = match outcome {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let mut img = disk_image(
        d.disk(),
        size,
        format,
        &exported,
        checksums,
        rewound.bytes_restored + rewound.bytes_zeroed,
    )?;
    img.copy = Some(method);
    Ok(img)
}

/// [`materialize_disk`] through a [`materialize::PointView`].
fn materialize_through_view(
    d: &DiskHandle,
    seq: u64,
    format: Format,
    image: &Path,
    overlay: &Path,
    checksums: bool,
    progress: Progress<'_>,
) -> Result<DiskImage> {
    let _paused = d.pause_apply();
    let st = d.snapshot();
    let replica = ferry_vhd::open(&st.replica_path, ferry_vhd::OpenOptions::read_only())
        .map_err(|e| Error::image("open replica", e))?;
    let undo = d.undo_reader()?;
    let (mut view, rewound) =
        materialize::PointView::new(replica, &undo, Some(seq), st.applied_seq, overlay)?;
    progress(&format!(
        "{}: converting the replica as it was at the point ({} sets, {} bytes restored, {} zeroed)",
        d.disk(),
        rewound.sets,
        rewound.bytes_restored,
        rewound.bytes_zeroed
    ));
    let exported = materialize::export_view(&mut view, format, image, &mut |_, _| {})?;
    drop(view);
    let mut img = disk_image(
        d.disk(),
        st.size,
        format,
        &exported,
        checksums,
        rewound.bytes_restored + rewound.bytes_zeroed,
    )?;
    img.copy = Some(materialize::CopyMethod::Converted);
    Ok(img)
}

pub(crate) fn disk_image(
    disk: &str,
    size: u64,
    format: Format,
    exported: &Exported,
    checksums: bool,
    rewound_bytes: u64,
) -> Result<DiskImage> {
    let mut file_bytes = 0;
    for f in exported.files() {
        file_bytes += fs::metadata(&f)
            .map_err(|e| Error::io("stat image", &f, e))?
            .len();
    }
    Ok(DiskImage {
        disk: disk.to_owned(),
        size,
        format: format.name().to_owned(),
        file: exported.path.clone(),
        extra_files: exported.extra.clone(),
        file_bytes,
        sha256: if checksums {
            Some(materialize::sha256_file(&exported.path)?)
        } else {
            None
        },
        rewound_bytes,
        copy: None,
    })
}

/// Undo a stop that replaced nothing: the state file goes, the disks
/// accept their sidecar again.
pub(crate) fn resume_replication(state_path: &Path, disks: &[Arc<DiskHandle>]) -> Result<()> {
    remove_if_present(state_path)?;
    for d in disks {
        d.resume_replication();
    }
    Ok(())
}

pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

fn remove_images(images: &[DiskImage]) -> Result<()> {
    for i in images {
        remove_if_present(&i.file)?;
        for f in &i.extra_files {
            remove_if_present(f)?;
        }
    }
    Ok(())
}

/// Fail `req.host` over: stop its replication, (for `latest`) apply
/// everything received, materialize every disk at one point into
/// `req.out`, and write the manifest. With `change_point`, replace the
/// images of a failed-over host by images at another point.
pub fn failover(site: &Site, req: &FailoverRequest, progress: Progress<'_>) -> Result<Manifest> {
    let state_path = host_dir(site, &req.host).join(FAILOVER_FILE);
    let previous: Option<Manifest> = read_state(&state_path)?;
    let refuse = |why: String| Error::new(ErrorKind::InvalidInput, "failover", why);
    if previous.as_ref().is_some_and(|m| m.in_place) {
        return Err(refuse(format!(
            "host {} was failed back into its replicas in place: `ferry failback` finishes \
             an interrupted one, `ferry commit` finalizes it",
            req.host
        )));
    }
    match (&previous, req.change_point) {
        (Some(m), false) if m.state != FailoverState::FailingOver => {
            return Err(refuse(format!(
                "host {} is already {} (use --change-point to choose another point before commit)",
                req.host,
                state_name(m.state)
            )))
        }
        (Some(m), true)
            if matches!(
                m.state,
                FailoverState::Committed | FailoverState::Committing
            ) =>
        {
            return Err(refuse(format!(
                "host {} is committed at {}: the other points are gone",
                req.host,
                m.point.describe()
            )))
        }
        (None, true) => {
            return Err(refuse(format!(
                "host {} is not failed over: --change-point changes the point of a failover",
                req.host
            )))
        }
        _ => {}
    }
    let disks = site.host_disks(&req.host)?;
    // Choose before stopping anything: a mistyped or unreachable point
    // must not stop a production host. (`latest` is chosen after the
    // backlog is applied; it always has an answer if any point exists.)
    if req.point != PointSpec::Latest {
        resolve(&views_of(&disks)?, &req.point)?;
    }
    let planned: Vec<PathBuf> = disks
        .iter()
        .map(|d| req.out.join(image_name(d.disk(), req.format)))
        .collect();
    if previous.is_none() {
        if let Some(p) = planned.iter().find(|p| p.exists()) {
            return Err(refuse(format!(
                "{} exists; ferry never overwrites an image",
                p.display()
            )));
        }
    }
    fs::create_dir_all(&req.out).map_err(|e| Error::io("create output directory", &req.out, e))?;
    let stopping = Manifest {
        host: req.host.clone(),
        state: FailoverState::FailingOver,
        point: previous
            .as_ref()
            .map_or_else(Chosen::pending, |m| m.point.clone()),
        out: req.out.clone(),
        disks: previous.as_ref().map_or_else(Vec::new, |m| m.disks.clone()),
        in_place: false,
        planned: previous
            .as_ref()
            .map_or_else(Vec::new, |m| m.planned.clone())
            .into_iter()
            .chain(planned)
            .collect(),
        updated_ns: now_ns(),
    };
    // Durable first: from here on the host's sidecar is refused, even
    // after a restart.
    write_state(&state_path, &stopping)?;
    for d in &disks {
        d.stop_replication();
    }
    progress(&format!("replication of {} stopped", req.host));
    let chosen = match choose_after_stop(&disks, &req.point, progress) {
        Ok(c) => c,
        Err(e) => {
            // Nothing was replaced yet: back to where the host was.
            match &previous {
                Some(m) => write_state(&state_path, m)?,
                None => resume_replication(&state_path, &disks)?,
            }
            return Err(e);
        }
    };
    if let Some(note) = &chosen.note {
        progress(note);
    }
    progress(&format!("point: {}", chosen.describe()));
    // A new point replaces the old images (they can be made again), and a
    // retry removes what an interrupted attempt left.
    remove_images(&stopping.disks)?;
    for f in &stopping.planned {
        remove_if_present(f)?;
    }
    let mut images = Vec::new();
    for d in &disks {
        let name = image_name(d.disk(), req.format);
        images.push(materialize_disk(
            d,
            chosen.seq,
            req.format,
            &req.out,
            &name,
            req.checksums,
            true,
            progress,
        )?);
    }
    let manifest = Manifest {
        host: req.host.clone(),
        state: FailoverState::FailedOver,
        point: chosen,
        out: req.out.clone(),
        disks: images,
        planned: Vec::new(),
        in_place: false,
        updated_ns: now_ns(),
    };
    write_state(&req.out.join(MANIFEST_FILE), &manifest)?;
    write_state(&state_path, &manifest)?;
    Ok(manifest)
}

/// With replication stopped: for `latest`, wait until everything received
/// is applied; then choose the point.
pub(crate) fn choose_after_stop(
    disks: &[Arc<DiskHandle>],
    point: &PointSpec,
    progress: Progress<'_>,
) -> Result<Chosen> {
    if *point == PointSpec::Latest {
        for d in disks {
            let Some(seq) = d.last_seq() else { continue };
            progress(&format!(
                "{}: applying everything received (up to seq {seq})",
                d.disk()
            ));
            while !d.wait_applied(seq, Duration::from_secs(5)) {
                let why = if d.is_shutting_down() {
                    Some("the target is stopping".to_owned())
                } else {
                    d.snapshot()
                        .apply_error
                        .map(|e| format!("the applier is stuck: {e}"))
                };
                if let Some(why) = why {
                    return Err(Error::new(
                        ErrorKind::InvalidInput,
                        "failover",
                        format!("disk {}: {why}", d.disk()),
                    ));
                }
            }
        }
    }
    resolve(&views_of(disks)?, point)
}

fn state_name(s: FailoverState) -> &'static str {
    match s {
        FailoverState::FailingOver => "failing over",
        FailoverState::FailedOver => "failed over",
        FailoverState::Committing => "committing",
        FailoverState::Committed => "committed",
    }
}

/// Finalize the failover of `host` at its point: the history behind the
/// points is dropped (undo logs), and so is every point the replica can no
/// longer be brought to (the chosen one stays listed when the replica is
/// at it; the manifest records it either way).
pub fn commit(site: &Site, host: &str) -> Result<Manifest> {
    let state_path = host_dir(site, host).join(FAILOVER_FILE);
    let Some(mut m) = read_state::<Manifest>(&state_path)? else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "commit",
            format!("host {host} is not failed over"),
        ));
    };
    match m.state {
        FailoverState::FailedOver | FailoverState::Committing => {}
        FailoverState::Committed => return Ok(m),
        FailoverState::FailingOver => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "commit",
                format!("the failover of {host} did not finish: run `ferry failover` again"),
            ))
        }
    }
    // Recorded first: a crash while the disks drop their history leaves
    // `committing`, and commit runs again; the point can no longer change.
    m.state = FailoverState::Committing;
    m.updated_ns = now_ns();
    write_state(&state_path, &m)?;
    for d in site.host_disks(host)? {
        d.drop_points_except(m.point.seq)?;
    }
    m.state = FailoverState::Committed;
    m.updated_ns = now_ns();
    if !m.in_place {
        write_state(&m.out.join(MANIFEST_FILE), &m)?;
    }
    write_state(&state_path, &m)?;
    Ok(m)
}

/// A test failover's record (`test-failover.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestFailover {
    /// Host name.
    pub host: String,
    /// The point.
    pub point: Chosen,
    /// Output directory.
    pub out: PathBuf,
    /// Per disk: the read-only base at the point.
    pub bases: Vec<DiskImage>,
    /// Per disk: the writable differencing VHD over its base.
    pub images: Vec<PathBuf>,
    /// Every file the test failover makes (cleanup removes what exists).
    #[serde(default)]
    pub planned: Vec<PathBuf>,
    /// When it was made (UNIX ns).
    pub created_ns: u64,
}

/// Make writable images of `host` at `point` in `out` while replication
/// goes on.
pub fn test_failover(
    site: &Site,
    host: &str,
    point: &PointSpec,
    out: &Path,
    progress: Progress<'_>,
) -> Result<TestFailover> {
    let state_path = host_dir(site, host).join(TEST_FAILOVER_FILE);
    if let Some(t) = read_state::<TestFailover>(&state_path)? {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "test failover",
            format!(
                "host {host} has a test failover at {} in {}: clean it up first (`ferry test-failover cleanup`)",
                t.point.describe(),
                t.out.display()
            ),
        ));
    }
    let disks = site.host_disks(host)?;
    // Retention must not drop the point between choosing it and copying.
    let _pins: Vec<_> = disks.iter().map(|d| d.pin_history()).collect();
    let chosen = resolve(&views_of(&disks)?, point)?;
    if let Some(note) = &chosen.note {
        progress(note);
    }
    progress(&format!("point: {}", chosen.describe()));
    let planned: Vec<PathBuf> = disks
        .iter()
        .flat_map(|d| {
            [
                out.join(format!("{}.base.vhd", d.disk())),
                out.join(format!("{}.vhd", d.disk())),
            ]
        })
        .collect();
    if let Some(p) = planned.iter().find(|p| p.exists()) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "test failover",
            format!("{} exists; ferry never overwrites an image", p.display()),
        ));
    }
    fs::create_dir_all(out).map_err(|e| Error::io("create output directory", out, e))?;
    let mut record = TestFailover {
        host: host.to_owned(),
        point: chosen.clone(),
        out: out.to_path_buf(),
        bases: Vec::new(),
        images: Vec::new(),
        planned,
        created_ns: now_ns(),
    };
    // Recorded before any file is made, so cleanup finds whatever a crash left.
    write_state(&state_path, &record)?;
    for d in &disks {
        let base_name = format!("{}.base.vhd", d.disk());
        let base = materialize_disk(
            d,
            chosen.seq,
            Format::VhdDynamic,
            out,
            &base_name,
            false,
            false,
            progress,
        )?;
        set_read_only(&base.file)?;
        let child = out.join(format!("{}.vhd", d.disk()));
        let opts = CreateOptions {
            parent: Some(base.file.clone()),
            round: false,
            sync: SyncPolicy::Ordered,
        };
        let mut img = ferry_vhd::create(&child, Format::VhdDiff, 0, &opts)
            .map_err(|e| Error::image("create test image", e))?;
        img.flush()
            .map_err(|e| Error::image("create test image", e))?;
        record.bases.push(base);
        record.images.push(child);
        write_state(&state_path, &record)?;
    }
    Ok(record)
}

fn set_read_only(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o444))
        .map_err(|e| Error::io("make base read-only", path, e))
}

/// Remove the test failover of `host`: its images and its record.
pub fn cleanup_test(site: &Site, host: &str) -> Result<TestFailover> {
    let state_path = host_dir(site, host).join(TEST_FAILOVER_FILE);
    let Some(t) = read_state::<TestFailover>(&state_path)? else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "test failover cleanup",
            format!("host {host} has no test failover"),
        ));
    };
    for i in t.images.iter().chain(&t.planned) {
        remove_if_present(i)?;
    }
    remove_images(&t.bases)?;
    // Whatever a crash mid-materialization left behind.
    if let Ok(entries) = fs::read_dir(&t.out) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".materializing") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    remove_if_present(&state_path)?;
    materialize::sync_parent(&state_path)?;
    Ok(t)
}
