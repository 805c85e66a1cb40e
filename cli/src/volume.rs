//! `ferry protect-volume` and `ferry unprotect-volume`: slide the write
//! interceptor under a mounted device-mapper volume (an LVM logical volume
//! or any dm device) and back out, without unmounting and without changing
//! the device the file system sees (`ferry_filter::kernel::volume`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::unix::ffi::OsStrExt;

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_filter::config::DiskConfig;
use ferry_filter::control::{self, Request, ResyncRequest};
use ferry_filter::kernel::dm::Control;
use ferry_filter::kernel::volume::{self, Prepared};
use ferry_filter::kernel::{attach, nbd_netlink};

use crate::filter::{daemon_config, run_daemon, DaemonArgs};

/// Protect a mounted dm volume: run the filter on its blocks and slide
/// /dev/nbdN under it (suspend, reload, resume). Runs until stopped; a
/// stop leaves the volume on /dev/nbdN for the next run to reattach.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    ferry protect-volume /dev/vg0/data --state /var/lib/ferry/data\n  \
    ferry protect-volume /dev/mapper/web-db --state /var/lib/ferry/db --nbd-timeout 30\n  \
    ferry unprotect-volume /dev/vg0/data --state /var/lib/ferry/data\n\n\
    A plain partition cannot be slid under while mounted: use an LVM volume, a dm-linear\n\
    device made at boot (dm-mod.create=), or protect it before mounting with\n\
    `ferry filter --disk NAME=/dev/sdXN --nbd-device NAME=auto`.")]
pub struct ProtectVolumeArgs {
    /// The volume: /dev/mapper/NAME or /dev/VG/LV.
    volume: PathBuf,
    /// The disk's name in ferry (default: the volume's dm name).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    daemon: DaemonArgs,
}

/// Slide the filter back out from under a volume protect-volume runs on,
/// then stop that filter. The volume keeps running, unprotected.
#[derive(Debug, Args)]
pub struct UnprotectVolumeArgs {
    /// The volume: /dev/mapper/NAME or /dev/VG/LV.
    volume: PathBuf,
    /// The state directory protect-volume runs with.
    #[arg(long)]
    state: PathBuf,
    /// How long to wait for the filter to stop, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

pub fn run_protect(args: ProtectVolumeArgs) -> Result<ExitCode> {
    if args.daemon.config.is_some() || !args.daemon.disk.is_empty() {
        bail!("protect-volume protects the volume it is given: --config and --disk do not apply");
    }
    let state = args
        .daemon
        .state
        .clone()
        .context("give --state DIR (the filter's state directory)")?;
    let name = volume::resolve(&args.volume)?;
    let disk = args.name.clone().unwrap_or_else(|| name.clone());
    std::fs::create_dir_all(&state).with_context(|| format!("create {}", state.display()))?;
    // The daemon resolves the state path the same way: the backend
    // identifier must match the one it attaches with.
    let state = state
        .canonicalize()
        .with_context(|| format!("resolve {}", state.display()))?;
    refuse_state_on_volume(&state, &args.volume)?;
    let control = Control::open()?;
    let prepared = volume::prepare(&control, &name, &attach::backend_id(&state, &disk))?;
    let base = volume::device_node(&control, &volume::base_name(&name))?;
    let mut config = daemon_config(&args.daemon)?;
    config
        .disks
        .push(DiskConfig::parse(&format!("{disk}={}", base.display()))?);
    config.nbd_devices.push(attach::Request {
        disk: disk.clone(),
        device: match prepared {
            Prepared::Restart(index) => Some(index),
            Prepared::Fresh => None,
        },
    });
    let shown = args.volume.display().to_string();
    let disk_dir = ferry_filter::disk::state_dir_of(&state, &disk);
    // Set before the slide, cleared once the resync after it is asked for:
    // a run that dies in between leaves it, and the next run (which finds
    // the volume already slid) still asks.
    let pending = disk_dir.join(RESYNC_PENDING);
    let unprotecting = disk_dir.join(UNPROTECTING);
    let lost = Arc::new(AtomicBool::new(false));
    let mut ran = false;
    let outcome = run_daemon(config, &args.daemon, |devices| {
        // Only a run that holds the state gets here: it owns the base.
        ran = true;
        let _ = std::fs::remove_file(&unprotecting);
        let device = devices
            .iter()
            .find(|d| d.disk == disk)
            .ok_or_else(|| ferry_filter::Error::control("the volume's disk was not attached"))?;
        let index = nbd_netlink::parse_device(&device.device.to_string_lossy())
            .ok_or_else(|| ferry_filter::Error::control("attached to a device with no index"))?;
        if prepared == Prepared::Fresh {
            std::fs::write(&pending, b"")
                .map_err(|e| ferry_filter::Error::io(e, "mark the resync").with_path(&pending))?;
            volume::slide_in(&control, &name, index)?;
        }
        if pending.exists() {
            // Writes that reached the volume before the cut went around the
            // filter: mark every region so the sidecar ships what is there
            // now (on first protection this repeats the initial copy). The
            // volume runs through us now: a failure must not stop us.
            spawn_resync(state.clone(), disk.clone(), pending.clone());
        }
        spawn_table_watch(name.clone(), index, unprotecting.clone(), Arc::clone(&lost));
        eprintln!(
            "ferry: {shown} runs through {} (writes recorded in {})",
            device.device.display(),
            state.display()
        );
        Ok(())
    });
    if ran {
        finish_stop(&control, &name);
    }
    if lost.load(Ordering::Acquire) {
        bail!(
            "{shown}'s table was replaced behind the filter (an LVM operation such as lvextend, \
             lvchange --refresh or pvmove?): its writes no longer pass through ferry. Start \
             protect-volume again to slide back in (the whole volume is copied again)"
        );
    }
    outcome
}

/// The state directory must not live on the volume: the slide suspends
/// the volume while the filter writes its state, and afterwards the filter
/// would write its own metadata through itself.
fn refuse_state_on_volume(state: &Path, volume_path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let state_dev = std::fs::metadata(state)?.dev();
    let volume_dev = std::fs::metadata(volume_path)?.rdev();
    if state_dev == volume_dev {
        bail!(
            "the state directory {} is on {} itself: put it on another file system (the root's)",
            state.display(),
            volume_path.display()
        );
    }
    Ok(())
}

/// Asks for the post-slide resync until the filter takes it, then clears
/// the mark.
fn spawn_resync(state: PathBuf, disk: String, pending: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("slide-resync".into())
        .spawn(move || loop {
            match resync(&state, &disk) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&pending);
                    return;
                }
                Err(e) => {
                    tracing::warn!(disk = %disk, error = %e, "resync after the slide not taken yet; retrying");
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the resync thread: the mark stays for the next run");
    }
}

/// Every few seconds, checks that the volume still runs through our
/// device. LVM reloads a logical volume's table from its metadata on
/// lvextend, lvchange --refresh, pvmove...: its writes would then go
/// around the filter. The filter stops with an error (a supervisor
/// restarts it, which slides in again and resyncs) unless an
/// unprotect-volume is under way.
fn spawn_table_watch(name: String, index: u32, unprotecting: PathBuf, lost: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new()
        .name("table-watch".into())
        .spawn(move || {
            let Ok(control) = Control::open() else { return };
            loop {
                std::thread::sleep(TABLE_WATCH);
                let ours = volume::running_on(&control, &name).map(|on| on == Some(index));
                if matches!(ours, Ok(false)) && !unprotecting.exists() {
                    tracing::error!(volume = %name, "the volume no longer runs through the filter");
                    lost.store(true, Ordering::Release);
                    // SAFETY: raise with a constant signal; the daemon's
                    // handler turns it into a clean stop.
                    unsafe { libc::raise(libc::SIGTERM) };
                    return;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch the volume's table");
    }
}

/// File under the disk's state directory while the resync that follows a
/// slide-in is owed.
const RESYNC_PENDING: &str = "slide-resync-pending";
/// File under the disk's state directory while unprotect-volume slides the
/// volume out (the table watch must not take that for a loss).
const UNPROTECTING: &str = "unprotecting";
/// How often the volume's table is checked.
const TABLE_WATCH: Duration = Duration::from_secs(2);

fn resync(state: &Path, disk: &str) -> ferry_filter::Result<()> {
    let request = Request::ResyncAll(ResyncRequest {
        disk: Some(disk.to_string()),
    });
    let response = control::call(state, &request, Duration::from_secs(30))?;
    if !response.ok {
        return Err(ferry_filter::Error::control(format!(
            "resync of {disk} refused: {}",
            response.error.unwrap_or_default()
        )));
    }
    Ok(())
}

/// After the filter stopped: a volume slid back out no longer needs its
/// base device; one still on /dev/nbdN keeps it for the next run.
fn finish_stop(control: &Control, name: &str) {
    let on_nbd = volume::running_on(control, name).map_or(true, |on| on.is_some());
    if on_nbd {
        tracing::warn!(volume = name, "the volume stays on its NBD device: run protect-volume again to resume (its writes wait for it), or unprotect-volume");
    } else {
        remove_base(control, name);
    }
}

pub fn run_unprotect(args: &UnprotectVolumeArgs) -> Result<ExitCode> {
    let name = volume::resolve(&args.volume)?;
    let state = args
        .state
        .canonicalize()
        .with_context(|| format!("resolve {}", args.state.display()))?;
    let control = Control::open()?;
    let Some(index) = volume::running_on(&control, &name)? else {
        bail!(
            "{} is not protected: its table does not point at an NBD device",
            args.volume.display()
        );
    };
    let info = FilterInfo::load(&state)?;
    let device = ferry_filter::kernel::nbd_netlink::device_path(index);
    let Some(disk) = info.disk_on(&device) else {
        bail!(
            "{} runs on {} but the filter of {} does not serve it",
            args.volume.display(),
            device.display(),
            state.display()
        );
    };
    // The pid comes from the live filter, not from filter.json (a dead
    // filter's pid may belong to another process by now).
    let pid = control::call(&state, &Request::Status, Duration::from_secs(10))
        .ok()
        .and_then(|r| r.status)
        .map(|status| status.pid)
        .filter(|&pid| is_ferry(pid));
    let Some(pid) = pid else {
        bail!(
            "the filter of {} is not running, and the volume's I/O waits for it: \
             start `ferry protect-volume {} --state {}` again (it reattaches), then unprotect",
            state.display(),
            args.volume.display(),
            state.display()
        );
    };
    let marker = ferry_filter::disk::state_dir_of(&state, disk).join(UNPROTECTING);
    std::fs::write(&marker, b"").with_context(|| format!("write {}", marker.display()))?;
    if let Err(e) = volume::slide_out(&control, &name) {
        let _ = std::fs::remove_file(&marker);
        return Err(e.into());
    }
    eprintln!(
        "ferry: {} runs on its own table again; stopping the filter (disk {disk})",
        args.volume.display()
    );
    stop_filter(pid, Duration::from_secs(args.timeout))?;
    // protect-volume removes the base device as it exits; make sure.
    remove_base(&control, &name);
    println!(
        "{} is no longer protected: ferry does not record its writes (protect it again with protect-volume; its data is copied again)",
        args.volume.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Removes the base device, or has the kernel remove it when its last
/// user (a sidecar still reading it) closes it.
fn remove_base(control: &Control, name: &str) {
    let base = volume::base_name(name);
    match control.remove_deferred(&base) {
        Ok(true) => {}
        Ok(false) => eprintln!(
            "ferry: {base} is still open (a sidecar reading it?): the kernel removes it when it is closed"
        ),
        Err(e) if ferry_filter::kernel::dm::is_no_such_device(&e) => {}
        Err(e) => tracing::warn!(volume = name, error = %e, "base device not removed"),
    }
}

/// Whether `pid` runs ferry.
fn is_ferry(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            Path::new(std::ffi::OsStr::from_bytes(argv0))
                .file_name()
                .is_some_and(|n| n == "ferry")
        })
        .unwrap_or(false)
}

fn stop_filter(pid: u32, timeout: Duration) -> Result<()> {
    let raw = libc::pid_t::try_from(pid).context("filter pid")?;
    // SAFETY: kill with the pid the filter reported on its control socket
    // and a constant signal.
    if unsafe { libc::kill(raw, libc::SIGTERM) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(e).context("signal the filter");
        }
    }
    let deadline = Instant::now() + timeout;
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            bail!("the filter (pid {pid}) did not stop within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The disks a filter serves to the kernel, from `STATE/filter.json`.
struct FilterInfo {
    /// (disk, its kernel device)
    devices: Vec<(String, PathBuf)>,
}

impl FilterInfo {
    fn load(state: &Path) -> Result<FilterInfo> {
        let path = state.join("filter.json");
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let devices = value["disks"]
            .as_array()
            .map(|disks| {
                disks
                    .iter()
                    .filter_map(|d| {
                        Some((
                            d["name"].as_str()?.to_string(),
                            PathBuf::from(d["nbd_device"].as_str()?),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(FilterInfo { devices })
    }

    fn disk_on(&self, device: &Path) -> Option<&str> {
        self.devices
            .iter()
            .find(|(_, d)| d == device)
            .map(|(name, _)| name.as_str())
    }
}
