//! The reverse direction: reprotect a failed-over machine, and fail it back
//! into its original disk images in place.
//!
//! ```text
//!  site A (primary, now down)            site B (recovery, runs the machine)
//!  ferry reprotect web01 --image           filter + sidecar on the failed-over
//!    data=/vm/web01.vmdk  <-------------   disk, shipping to A's target
//!  (A's target writes the stream straight into web01.vmdk)
//!  ferry failback web01 --point P: web01.vmdk brought to P in place
//!  ferry commit web01
//!                                         ferry reprotect web01 (B keeps its
//!  the machine boots from web01.vmdk;      replica): forward protection again
//!  its filter + sidecar ship to B  ----->  from a checksum delta
//! ```
//!
//! **Reprotect** (`reprotect`) makes a target accept a host's stream again
//! (or for the first time) into replicas that already hold data: images
//! adopted from outside the data directory (`--image DISK=PATH`: VMDK
//! monolithicSparse or monolithicFlat, VHD dynamic or fixed, raw), or the
//! replica the target kept from the forward direction. Each disk's journal,
//! undo log and points are reset, so the sender finds a target that holds
//! no change set and a `seeded` replica: it resyncs the whole disk with the
//! checksum exchange first, and only differing blocks travel. A host that
//! is failed over must be committed first; a host replicating here is
//! refused. Order: the new records are written, then the old ones removed,
//! then `failover.json` (which keeps the sidecar out meanwhile) last; a
//! crash anywhere leaves a state a rerun finishes.
//!
//! **Failback** (`failback`) is a failover whose output is the replica
//! itself: replication stops (`failover.json`, `in_place`), everything
//! received is applied, the point is chosen and recorded, the host's
//! appliers are closed, and each replica is rewound in place with its undo
//! log. Rewinding to one point is idempotent (every restored byte is the
//! point's), so a crash mid-rewind is finished by running failback again,
//! which reuses the recorded point. `ferry commit` then drops the history.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_vhd::{OpenOptions, SyncPolicy};
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::failover::{
    self, Chosen, FailoverState, Manifest, PointSpec, Progress, FAILOVER_FILE, TEST_FAILOVER_FILE,
};
use crate::site::{now_ns, replica_location, AdoptedImage, Site, HOSTS_DIR};

/// One image to adopt: a disk of the host and the image that is its replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adopt {
    /// Disk name (as the host's filter names it).
    pub disk: String,
    /// The image file (a VMDK descriptor for `vmdk-flat`).
    pub path: PathBuf,
}

/// What a reprotect left for one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReprotectedDisk {
    /// Disk name.
    pub disk: String,
    /// The replica the stream is written into.
    pub replica: PathBuf,
    /// Its format.
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Adopted from outside the data directory.
    pub adopted: bool,
    /// Bytes of the disk the replica stores: what the checksum exchange
    /// may find equal.
    pub allocated_bytes: u64,
}

/// The outcome of a reprotect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reprotected {
    /// Host name.
    pub host: String,
    /// Its disks at this target.
    pub disks: Vec<ReprotectedDisk>,
}

fn invalid(op: &'static str, why: String) -> Error {
    Error::new(ErrorKind::InvalidInput, op, why)
}

fn host_dir(site: &Site, host: &str) -> PathBuf {
    site.dir().join(HOSTS_DIR).join(host)
}

/// Accept `host`'s stream into seeded replicas: `images` adopted, the
/// host's other disks keeping the replica this target holds. See the
/// module docs.
pub fn reprotect(site: &Site, host: &str, images: &[Adopt]) -> Result<Reprotected> {
    crate::journal::validate_disk_name(host)?;
    let dir = host_dir(site, host);
    match failover::failover_state(site.dir(), host)? {
        Some(m) if m.state != FailoverState::Committed => {
            return Err(invalid(
                "reprotect",
                format!(
                    "host {host} is failed over but not committed: run `ferry commit {host}` first"
                ),
            ))
        }
        Some(_) => {}
        None if has_change_sets(&dir) => {
            return Err(invalid(
                "reprotect",
                format!("host {host} replicates to this target: reprotect is for a host that was failed over (and committed) or is new here"),
            ))
        }
        None => {}
    }
    if dir.join(TEST_FAILOVER_FILE).exists() {
        return Err(invalid(
            "reprotect",
            format!(
                "host {host} has a test failover: run `ferry test-failover cleanup {host}` first"
            ),
        ));
    }
    let mut adopted = Vec::new();
    for a in images {
        crate::journal::validate_disk_name(&a.disk)?;
        let image = ferry_vhd::open(&a.path, OpenOptions::read_only())
            .map_err(|e| Error::image("open image to adopt", e))?;
        let format = image.format();
        if !AdoptedImage::FORMATS.contains(&format) {
            return Err(invalid(
                "reprotect",
                format!(
                    "{} is {format}: only vmdk-sparse, vmdk-flat, vhd-dynamic, vhd-fixed and raw images are written in place",
                    a.path.display()
                ),
            ));
        }
        let path = a
            .path
            .canonicalize()
            .map_err(|e| Error::io("resolve image", &a.path, e))?;
        crate::qemulock::refuse_if_in_use(&path, "reprotect")?;
        adopted.push((
            a.disk.clone(),
            AdoptedImage {
                path,
                format: format.name().to_owned(),
            },
        ));
    }
    // The appliers of a failed-over host hold its replicas open.
    site.close_host(host);
    fs::create_dir_all(&dir).map_err(|e| Error::io("create host directory", &dir, e))?;
    for (disk, image) in &adopted {
        let disk_dir = dir.join(disk);
        fs::create_dir_all(&disk_dir)
            .map_err(|e| Error::io("create disk directory", &disk_dir, e))?;
        image.write(&disk_dir)?;
    }
    let mut disks = Vec::new();
    for disk_dir in disk_dirs(&dir)? {
        let Some((replica, format)) = replica_location(&disk_dir)? else {
            continue; // never received anything: nothing to keep
        };
        let is_adopted = AdoptedImage::read(&disk_dir)?.is_some();
        reset_disk(&disk_dir, is_adopted)?;
        let mut image = ferry_vhd::open_as(&replica, format, OpenOptions::read_only())
            .map_err(|e| Error::image("open replica", e))?;
        disks.push(ReprotectedDisk {
            disk: file_name(&disk_dir),
            replica,
            format: format.name().to_owned(),
            size: image.size(),
            adopted: is_adopted,
            allocated_bytes: image
                .allocated_bytes()
                .map_err(|e| Error::image("map replica", e))?,
        });
    }
    if disks.is_empty() {
        return Err(invalid(
            "reprotect",
            format!("host {host} has no replica at this target: adopt its images with --image DISK=PATH"),
        ));
    }
    failover::remove_if_present(&dir.join(FAILOVER_FILE))?;
    crate::materialize::sync_parent(&dir.join(FAILOVER_FILE))?;
    Ok(Reprotected {
        host: host.to_owned(),
        disks,
    })
}

/// Whether some disk of the host directory `dir` holds journal segments
/// (a host replicating here). Read from the directory listing only: the
/// journal may be open in this target, appending.
fn has_change_sets(dir: &Path) -> bool {
    disk_dirs(dir).unwrap_or_default().iter().any(|d| {
        fs::read_dir(d.join(crate::journal::JOURNAL_DIR))
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.metadata().is_ok_and(|m| m.is_file() && m.len() > 0))
            })
            .unwrap_or(false)
    })
}

fn disk_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list disks", dir, e)),
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Remove everything of a disk but its replica: journal, watermark, undo
/// log, points, status. With an adopted image the replica file of the
/// data directory goes too (the adopted image is the replica now).
fn reset_disk(disk_dir: &Path, adopted: bool) -> Result<()> {
    let entries =
        fs::read_dir(disk_dir).map_err(|e| Error::io("list disk directory", disk_dir, e))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let keep = name == crate::site::IMAGE_FILE
            || (!adopted && (name == "replica.vhd" || name == "replica.img"));
        if keep {
            continue;
        }
        let path = e.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io("reset disk", &path, e))?;
    }
    crate::materialize::sync_parent(&disk_dir.join(crate::site::IMAGE_FILE))
}

/// Fail `host` back at `point` into its replicas in place (see the module
/// docs). Returns the manifest (state failed-over; `ferry commit` next).
pub fn failback(
    site: &Site,
    host: &str,
    point: &PointSpec,
    progress: Progress<'_>,
) -> Result<Manifest> {
    let dir = host_dir(site, host);
    let state_path = dir.join(FAILOVER_FILE);
    let previous = failover::failover_state(site.dir(), host)?;
    let resumed = match &previous {
        None => None,
        Some(m) if m.state == FailoverState::FailingOver && m.in_place && m.point.seq != 0 => {
            Some(m.point.clone())
        }
        Some(m) if m.state == FailoverState::FailingOver && m.in_place => None,
        Some(m) if !m.in_place => {
            return Err(invalid(
                "failback",
                format!(
                    "host {host} was failed over at this target (into a copy): a failback runs \
                     on the target that receives its stream back, after `ferry reprotect`"
                ),
            ))
        }
        Some(m) => {
            return Err(invalid(
                "failback",
                format!(
                    "host {host} is already {}{}",
                    match m.state {
                        FailoverState::Committing | FailoverState::Committed =>
                            "failed back and committed",
                        _ => "failed back",
                    },
                    if m.state == FailoverState::FailedOver {
                        " (the images are rewound in place: `ferry commit` finalizes it)"
                    } else {
                        ""
                    }
                ),
            ))
        }
    };
    let disks = site.host_disks(host)?;
    // Before anything stops: a machine that runs from its image already
    // (started from the reverse replica) is not to be rewound under it.
    for d in &disks {
        crate::qemulock::refuse_if_in_use(&d.snapshot().replica_path, "failback")?;
    }
    if resumed.is_none() && *point != PointSpec::Latest {
        // A mistyped point must not stop anything.
        failover::resolve(&failover::views_of(&disks)?, point)?;
    }
    let mut manifest = Manifest {
        host: host.to_owned(),
        state: FailoverState::FailingOver,
        point: resumed.clone().unwrap_or_else(Chosen::pending),
        out: dir.clone(),
        disks: Vec::new(),
        planned: Vec::new(),
        in_place: true,
        updated_ns: now_ns(),
    };
    failover::write_state(&state_path, &manifest)?;
    for d in &disks {
        d.stop_replication();
    }
    progress(&format!("replication of {host} stopped"));
    let chosen = match resumed {
        Some(c) => {
            progress(&format!(
                "an interrupted failback is finished at its point {}",
                c.describe()
            ));
            c
        }
        None => {
            // Every received set applied first, whatever the point: the
            // undo log must cover everything the replica holds before the
            // replica is rewound under it.
            match failover::choose_after_stop(&disks, &PointSpec::Latest, progress)
                .and_then(|_| failover::resolve(&failover::views_of(&disks)?, point))
            {
                Ok(c) => c,
                Err(e) => {
                    failover::resume_replication(&state_path, &disks)?;
                    return Err(e);
                }
            }
        }
    };
    if let Some(note) = &chosen.note {
        progress(note);
    }
    progress(&format!("point: {}", chosen.describe()));
    manifest.point = chosen.clone();
    manifest.updated_ns = now_ns();
    failover::write_state(&state_path, &manifest)?;
    // Undo copies and watermarks before the appliers close; then nothing
    // but this verb touches the replicas.
    let mut work = Vec::new();
    for d in &disks {
        let st = d.snapshot();
        work.push((
            d.disk().to_owned(),
            st.size,
            st.applied_seq,
            d.undo_reader()?,
        ));
    }
    drop(disks);
    site.close_host(host);
    let mut images = Vec::new();
    for (disk, size, applied, undo) in work {
        let (path, format) = replica_location(&dir.join(&disk))?
            .ok_or_else(|| invalid("failback", format!("disk {disk} of {host} has no replica")))?;
        // The machine must not run from its image while it is rewound.
        crate::qemulock::refuse_if_in_use(&path, "failback")?;
        let mut image = ferry_vhd::open_as(
            &path,
            format,
            OpenOptions {
                writable: true,
                sync: SyncPolicy::Ordered,
            },
        )
        .map_err(|e| Error::image("open replica", e))?;
        let rewound = crate::materialize::rewind(image.as_mut(), &undo, Some(chosen.seq), applied)?;
        let extra = image.extra_files();
        drop(image);
        progress(&format!(
            "{disk}: {} rewound in place ({} sets, {} bytes restored, {} zeroed)",
            path.display(),
            rewound.sets,
            rewound.bytes_restored,
            rewound.bytes_zeroed
        ));
        let files = crate::materialize::Exported { path, extra };
        let rewound_bytes = rewound.bytes_restored + rewound.bytes_zeroed;
        images.push(failover::disk_image(
            &disk,
            size,
            format,
            &files,
            false,
            rewound_bytes,
        )?);
    }
    manifest.state = FailoverState::FailedOver;
    manifest.disks = images;
    manifest.updated_ns = now_ns();
    failover::write_state(&state_path, &manifest)?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::site::SiteOptions;
    use crate::testutil::TempDir;
    use ferry_protocol::payload::Key;
    use ferry_vhd::Format;

    fn site(dir: &Path) -> Site {
        Site::new(
            dir,
            SiteOptions::default(),
            Box::new(|_, _| Ok(Key::from_bytes([3u8; 32]))),
        )
        .unwrap()
    }

    fn image(path: &Path, format: Format) {
        let mut img = ferry_vhd::create(path, format, 4 << 20, &Default::default()).unwrap();
        img.write_at(&[9u8; 4096], 1 << 20).unwrap();
        img.finish().unwrap();
    }

    fn adopt(disk: &str, path: &Path) -> Vec<Adopt> {
        vec![Adopt {
            disk: disk.into(),
            path: path.to_path_buf(),
        }]
    }

    fn state(site: &Site, host: &str, state: FailoverState) {
        let dir = host_dir(site, host);
        fs::create_dir_all(&dir).unwrap();
        let m = Manifest {
            host: host.into(),
            state,
            point: Chosen {
                seq: 1,
                kind: "crash".into(),
                name: None,
                time_ns: None,
                note: None,
            },
            out: dir.clone(),
            disks: Vec::new(),
            planned: Vec::new(),
            in_place: false,
            updated_ns: 0,
        };
        failover::write_state(&dir.join(FAILOVER_FILE), &m).unwrap();
    }

    #[test]
    fn adopting_records_the_image_and_refusals_say_why() {
        let tmp = TempDir::new("reprotect");
        let site = site(&tmp.path().join("data"));
        let img = tmp.path().join("web01.vhd");
        image(&img, Format::VhdDynamic);

        // Nothing to adopt and nothing kept: refused.
        let e = reprotect(&site, "web01", &[]).unwrap_err();
        assert!(e.to_string().contains("no replica"), "{e}");

        let r = reprotect(&site, "web01", &adopt("data", &img)).unwrap();
        assert_eq!(r.disks.len(), 1);
        let d = &r.disks[0];
        assert!(d.adopted);
        assert_eq!((d.format.as_str(), d.size), ("vhd-dynamic", 4 << 20));
        assert!(d.allocated_bytes > 0, "{d:?}");
        let recorded = AdoptedImage::read(&host_dir(&site, "web01").join("data")).unwrap();
        assert_eq!(recorded.map(|a| a.path), Some(img.canonicalize().unwrap()));

        // A host with journal segments replicates here: refused.
        let jdir = host_dir(&site, "db01")
            .join("data")
            .join(crate::journal::JOURNAL_DIR);
        fs::create_dir_all(&jdir).unwrap();
        fs::write(jdir.join("0000000001.seg"), b"x").unwrap();
        let e = reprotect(&site, "db01", &adopt("data", &img)).unwrap_err();
        assert!(e.to_string().contains("replicates to this target"), "{e}");

        // Failed over but not committed, or with a test failover: refused.
        state(&site, "app01", FailoverState::FailedOver);
        let e = reprotect(&site, "app01", &adopt("data", &img)).unwrap_err();
        assert!(e.to_string().contains("commit"), "{e}");
        state(&site, "app01", FailoverState::Committed);
        fs::write(host_dir(&site, "app01").join(TEST_FAILOVER_FILE), b"{}").unwrap();
        let e = reprotect(&site, "app01", &adopt("data", &img)).unwrap_err();
        assert!(e.to_string().contains("test failover"), "{e}");
        fs::remove_file(host_dir(&site, "app01").join(TEST_FAILOVER_FILE)).unwrap();

        // A format that cannot be written in place: refused.
        let parent = tmp.path().join("base.vhd");
        image(&parent, Format::VhdDynamic);
        let child = tmp.path().join("child.vhd");
        ferry_vhd::create(
            &child,
            Format::VhdDiff,
            4 << 20,
            &ferry_vhd::CreateOptions {
                parent: Some(parent.clone()),
                ..Default::default()
            },
        )
        .unwrap()
        .finish()
        .unwrap();
        let e = reprotect(&site, "app01", &adopt("data", &child)).unwrap_err();
        assert!(e.to_string().contains("written in place"), "{e}");

        // Committed: adopted, and the failover state is gone (the sidecar
        // is accepted again).
        reprotect(&site, "app01", &adopt("data", &img)).unwrap();
        assert!(!failover::is_failed_over(site.dir(), "app01"));
    }
}
