//! Shared rig for ferry's end-to-end tests: locating the real binary,
//! scratch directories that clean up after themselves, child processes that
//! are killed even when a test fails, and data patterns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

pub mod logwrites;

/// The `ferry` binary under test: `$FERRY_BIN`, else `target/debug/ferry`.
pub fn ferry_bin() -> PathBuf {
    let path = std::env::var_os("FERRY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ferry"));
    assert!(
        path.is_file(),
        "ferry binary not found at {} (run `cargo build -p ferry` or set FERRY_BIN)",
        path.display()
    );
    path
}

/// `ferry ARGS...`, run to completion.
pub fn ferry<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(ferry_bin())
        .args(args)
        .output()
        .expect("run ferry")
}

/// `qemu-img ARGS...`, run to completion.
pub fn qemu_img<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("run qemu-img (apt-get install qemu-utils)")
}

/// Panic with the command's output unless it exited with `code`.
pub fn expect_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory, removed when dropped (also when the test panics).
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ferry-rig-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("FERRY_KEEP_SCRATCH").is_some() {
            eprintln!("FERRY_KEEP_SCRATCH: kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process killed and reaped when dropped.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift64).
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Write a raw disk of `size` bytes that is about half data: pseudo-random
/// runs of odd lengths at odd offsets, a few zero-filled but allocated runs,
/// and holes.
pub fn write_half_full_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).expect("create raw");
    file.set_len(size).expect("size raw");
    let mut pos = 0u64;
    let mut i = seed;
    while pos < size {
        i += 1;
        let step = (1 << 20) | ((i * 7919 % 997) * 512);
        let len = usize::try_from((step / 2 + i % 5000).min(size - pos)).expect("len");
        let data = if i.is_multiple_of(7) {
            vec![0u8; len]
        } else {
            pattern(i, len)
        };
        file.write_all_at(&data, pos).expect("write raw");
        pos += step;
    }
}

/// Map a ferry format name to qemu-img's `-f` name.
pub fn qemu_format(ferry_format: &str) -> &'static str {
    match ferry_format {
        "raw" => "raw",
        f if f.starts_with("vhd") => "vpc",
        f if f.starts_with("vmdk") => "vmdk",
        other => panic!("no qemu format for {other}"),
    }
}

/// qemu-io writes through the NBD `uri`: at each (offset, length) in
/// `unit`s (`K` or `M`) a pattern byte, or zeroes (`write -z`) for byte 0.
pub fn qemu_io_writes(uri: &str, unit: &str, writes: &[(u64, u64, u8)]) {
    let mut args = vec!["-f".to_string(), "raw".to_string(), uri.to_string()];
    for &(off, len, byte) in writes {
        args.push("-c".into());
        if byte == 0 {
            args.push(format!("write -z {off}{unit} {len}{unit}"));
        } else {
            args.push(format!("write -P {byte} {off}{unit} {len}{unit}"));
        }
    }
    let out = run("qemu-io", &args);
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of the raw file `raw` with `image`, an image of the
/// ferry format `format` (the caller judges the output).
pub fn qemu_compare_raw(raw: &Path, image: &Path, format: &str) -> Output {
    qemu_img([
        "compare",
        "-f",
        "raw",
        "-F",
        qemu_format(format),
        raw.to_str().expect("utf-8 path"),
        image.to_str().expect("utf-8 path"),
    ])
}

/// The crash-test writer's (`image-writer`) record layout, shared with the test.
pub mod crash_writer {
    /// Virtual size of the test image.
    pub const SIZE: u64 = 256 << 20;
    /// Bytes per record.
    pub const RECORD: usize = 64 << 10;
    /// Distance between records: a bit over 1 MiB so records straddle VHD
    /// blocks and VMDK grains at unaligned sector offsets.
    pub const STRIDE: u64 = (1 << 20) + 4096 + 512;
    /// Number of records written before the writer finishes.
    pub const RECORDS: u64 = SIZE / STRIDE - 1;

    /// Offset of record `i` (records never overlap).
    pub fn offset(i: u64) -> u64 {
        i * STRIDE
    }

    /// Content of record `i`.
    pub fn data(i: u64) -> Vec<u8> {
        super::pattern(i + 1, RECORD)
    }
}

/// Poll `check` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A running `ferry filter`, stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
pub struct FilterProcess {
    child: Option<Child>,
    /// State directory.
    pub state: PathBuf,
    /// NBD unix socket.
    pub socket: PathBuf,
    /// The filter's stderr log.
    pub log: PathBuf,
}

impl FilterProcess {
    /// Start `ferry filter --disk NAME=PATH... --listen unix:DIR/nbd.sock
    /// --state DIR/state EXTRA...` and wait for its socket.
    pub fn start(dir: &Path, disks: &[(&str, &Path)], extra: &[&str]) -> FilterProcess {
        let state = dir.join("state");
        let socket = dir.join("nbd.sock");
        let log = dir.join("filter.log");
        std::fs::create_dir_all(dir).expect("filter dir");
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("filter");
        for (name, path) in disks {
            cmd.arg("--disk").arg(format!("{name}={}", path.display()));
        }
        cmd.arg("--listen")
            .arg(format!("unix:{}", socket.display()));
        cmd.arg("--state").arg(&state);
        cmd.args(extra);
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        cmd.stdout(std::process::Stdio::null()).stderr(log_file);
        let child = cmd.spawn().expect("spawn ferry filter");
        let mut filter = FilterProcess {
            child: Some(child),
            state,
            socket,
            log,
        };
        let up = wait_until(std::time::Duration::from_secs(20), || {
            filter.socket.exists() && filter.state.join("control.sock").exists()
        });
        if !up {
            let log = std::fs::read_to_string(&filter.log).unwrap_or_default();
            filter.kill9();
            panic!("ferry filter did not start:\n{log}");
        }
        filter
    }

    /// NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// `ferry filter status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = ferry([
            "filter",
            "status",
            "--json",
            "--state",
            self.state.to_str().expect("utf-8"),
        ]);
        expect_code(&out, 0, "ferry filter status");
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// SIGKILL, no cleanup (the crash case).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let mut status = None;
        wait_until(std::time::Duration::from_secs(30), || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        if status.is_none() {
            let _ = child.kill();
            status = child.wait().ok();
        }
        status
    }
}

impl Drop for FilterProcess {
    fn drop(&mut self) {
        self.stop();
        remove_rings(&self.state);
    }
}

/// Remove the shared-memory rings of the filter whose state directory is
/// `state` (a filter killed with -9 leaves them in /dev/shm).
pub fn remove_rings(state: &Path) {
    let Ok(disks) = std::fs::read_dir(state.join("disks")) else {
        return;
    };
    for d in disks.flatten() {
        if let Ok(ring) = std::fs::read_link(d.path().join("ring")) {
            let _ = std::fs::remove_file(&ring);
            if let Some(dir) = ring.parent() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Run a command, returning its output (panics if it cannot start).
pub fn run<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// A protected volume from `scripts/rig/volume.sh` (backing file -> ferry
/// filter -> nbdfuse -> loop -> file system -> mount), torn down on drop.
#[derive(Debug)]
pub struct Volume {
    /// The rig directory.
    pub dir: PathBuf,
}

fn volume_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/rig/volume.sh")
}

impl Volume {
    /// Bring a volume up under `dir` with file system `fs` (ext4, xfs, none).
    pub fn up(dir: &Path, fs: &str, size: &str, filter_args: &[&str]) -> Volume {
        Volume::up_with(dir, &["--fs", fs, "--size", size], filter_args)
    }

    /// Bring a volume up under `dir` with `volume.sh up` options
    /// (`--fs existing`, `--disk FILE`, `--vmdk IMAGE`...).
    pub fn up_with(dir: &Path, options: &[&str], filter_args: &[&str]) -> Volume {
        let volume = Volume {
            dir: dir.to_path_buf(),
        };
        let mut cmd = Command::new(volume_script());
        cmd.args(["up", dir.to_str().expect("utf-8")]);
        cmd.args(options);
        if !filter_args.is_empty() {
            cmd.arg("--").args(filter_args);
        }
        cmd.env("FERRY_BIN", ferry_bin());
        let out = cmd.output().expect("run volume.sh up");
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.join("filter.log")).unwrap_or_default();
            panic!(
                "volume.sh up failed:\n{}\n{}\nfilter log:\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        volume
    }

    /// The mounted file system.
    pub fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }

    /// The filter's state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The loop device.
    pub fn loop_device(&self) -> String {
        std::fs::read_to_string(self.dir.join("loop"))
            .expect("loop device")
            .trim()
            .to_string()
    }

    /// Unmount the file system (the loop device and filter stay up). A
    /// workload process that just exited may hold the mount busy for a
    /// moment while its files are released: retried for up to 20 s.
    pub fn unmount(&self) {
        umount_retrying(&self.mnt());
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        let _ = Command::new(volume_script())
            .args(["down", self.dir.to_str().unwrap_or_default()])
            .output();
        remove_rings(&self.state());
    }
}

/// A ferry daemon (`ferry target`, `ferry sidecar`) started with a log
/// file; SIGTERM then SIGKILL when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    args: Vec<String>,
    /// Its stderr log (appended across restarts).
    pub log: PathBuf,
}

impl Daemon {
    /// Start `ferry ARGS...`, logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> Daemon {
        let mut d = Daemon {
            child: None,
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            log: log.to_path_buf(),
        };
        d.restart();
        d
    }

    /// Start it again with the same arguments (after a kill or stop).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(ferry_bin())
            .args(&self.args)
            .env("FERRY_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn ferry daemon");
        self.child = Some(child);
    }

    /// SIGKILL, no cleanup (the crash case).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (SIGKILL after 30 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let exited = wait_until(std::time::Duration::from_secs(30), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A recovery site on loopback: credentials for host `web01`, a running
/// `ferry target` on a free port.
#[derive(Debug)]
pub struct Site {
    /// Credentials directory.
    pub creds: PathBuf,
    /// Target data directory.
    pub data: PathBuf,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The target process.
    pub target: Daemon,
}

impl Site {
    /// `ferry credentials init DIR/creds --host web01`, then `ferry target`
    /// on `127.0.0.1:0` (the bound port is read from its log).
    pub fn start(dir: &Path) -> Site {
        Site::start_with(dir, &[])
    }

    /// [`Site::start`] with more `ferry target` arguments.
    pub fn start_with(dir: &Path, target_args: &[&str]) -> Site {
        let creds = dir.join("creds");
        let out = ferry([
            "credentials",
            "init",
            creds.to_str().expect("utf-8"),
            "--host",
            "web01",
        ]);
        expect_code(&out, 0, "ferry credentials init");
        Site::start_on(dir, &creds, target_args)
    }

    /// A second site with the credentials of another (the same hosts and
    /// target certificate): `ferry target` with its data under `dir`.
    pub fn start_on(dir: &Path, creds: &Path, target_args: &[&str]) -> Site {
        std::fs::create_dir_all(dir).expect("site dir");
        let creds = creds.to_path_buf();
        let data = dir.join("site-b");
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut args = vec![
            "target",
            "--data",
            data.to_str().expect("utf-8"),
            "--listen",
            &addr,
            "--credentials",
            creds.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(target_args);
        let target = Daemon::start(&args, &dir.join("target.log"));
        let site = Site {
            creds,
            data,
            addr,
            target,
        };
        site.wait_listening();
        site
    }

    /// Wait until the target accepts connections.
    pub fn wait_listening(&self) {
        let up = wait_until(std::time::Duration::from_secs(20), || {
            std::net::TcpStream::connect(&self.addr).is_ok()
        });
        assert!(
            up,
            "ferry target did not listen:\n{}",
            self.target.log_text()
        );
    }

    /// `ferry sidecar --state STATE --target ADDR --credentials CREDS EXTRA...`.
    pub fn sidecar(&self, state: &Path, log: &Path, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "sidecar",
            "--state",
            state.to_str().expect("utf-8"),
            "--target",
            &self.addr,
            "--credentials",
            self.creds.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args, log)
    }

    /// `ferry target status --json`: the entry of `web01/DISK`, if any.
    pub fn disk_status(&self, disk: &str) -> Option<serde_json::Value> {
        let out = ferry([
            "target",
            "status",
            "--json",
            "--data",
            self.data.to_str().expect("utf-8"),
        ]);
        expect_code(&out, 0, "ferry target status");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
        v["disks"]
            .as_array()?
            .iter()
            .find(|d| d["host"] == "web01" && d["disk"] == disk)
            .cloned()
    }

    /// The replica image of `web01/DISK`.
    pub fn replica(&self, disk: &str) -> PathBuf {
        self.data.join("hosts/web01").join(disk).join("replica.vhd")
    }

    /// Wait until everything the filter recorded for `disk` is applied at
    /// the target: the filter's ring is empty and nothing is dirty, and the
    /// target applied all it received. Panics with both logs on timeout.
    pub fn wait_replicated(
        &self,
        filter_state: &Path,
        disk: &str,
        timeout: std::time::Duration,
        sidecar: &Daemon,
    ) {
        let mut last = String::new();
        let ok = wait_until(timeout, || {
            // Read in pipeline order: the sidecar (connected, spool empty:
            // it published that after any resync it asked the filter for),
            // then the filter (nothing unshipped or dirty: all acked), then
            // the target (everything received is applied).
            let state = filter_state.to_str().expect("utf-8");
            let out = ferry(["sidecar", "status", "--json", "--state", state]);
            let sc = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default();
            let Some(sd) = sc["disks"]
                .as_array()
                .and_then(|a| a.iter().find(|d| d["disk"] == disk))
                .cloned()
            else {
                return false;
            };
            let out = ferry(["filter", "status", "--json", "--state", state]);
            let Ok(f) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                return false;
            };
            let Some(fd) = f["disks"]
                .as_array()
                .and_then(|a| a.iter().find(|d| d["name"] == disk))
                .cloned()
            else {
                return false;
            };
            let Some(t) = self.disk_status(disk) else {
                return false;
            };
            last = format!("filter: {fd}\nsidecar: {sd}\ntarget: {t}");
            sd["connected"] == true
                && sd["spool_sets"] == 0
                && fd["lag_records"] == 0
                && fd["dirty_bytes"] == 0
                && fd["tracking"] == "data"
                && t["apply_backlog_sets"] == 0
                && t["applied_seq"] == t["received_seq"]
        });
        if ok && std::env::var_os("FERRY_DEBUG_WAIT").is_some() {
            eprintln!("replicated:\n{last}");
        }
        assert!(
            ok,
            "not replicated within {timeout:?}\n{last}\nsidecar log:\n{}\ntarget log:\n{}",
            sidecar.log_text(),
            self.target.log_text()
        );
    }
}

/// A TCP port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// Longest a control-plane CLI call of a test may run.
pub const CLI_DEADLINE: std::time::Duration = std::time::Duration::from_secs(300);

/// A control-plane server on loopback: `ferry server init` in DIR/server,
/// then `ferry server run` on a free port, with the admin's environment.
#[derive(Debug)]
pub struct ControlServer {
    /// The data directory.
    pub data: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// The admin token.
    pub admin_token: String,
    /// The CA certificate.
    pub ca: PathBuf,
    /// The server process.
    pub daemon: Daemon,
}

impl ControlServer {
    /// Initializes and starts a server under `dir`.
    pub fn start(dir: &Path) -> ControlServer {
        ControlServer::start_with(dir, &[])
    }

    /// [`ControlServer::start`] with more `ferry server run` arguments.
    pub fn start_with(dir: &Path, run_args: &[&str]) -> ControlServer {
        let data = dir.join("server");
        let out = ferry(["server", "init", "--data", data.to_str().expect("utf-8")]);
        expect_code(&out, 0, "ferry server init");
        let admin_token = std::fs::read_to_string(data.join("admin.token"))
            .expect("admin token")
            .trim()
            .to_owned();
        let addr = format!("127.0.0.1:{}", free_port());
        let mut args = vec![
            "server",
            "run",
            "--data",
            data.to_str().expect("utf-8"),
            "--listen",
            &addr,
        ];
        args.extend_from_slice(run_args);
        let daemon = Daemon::start(&args, &dir.join("server.log"));
        let server = ControlServer {
            ca: data.join("credentials/ca.crt"),
            data,
            url: format!("https://{addr}"),
            admin_token,
            daemon,
        };
        server.wait_up();
        server
    }

    /// Waits until the server answers `GET /v1/health`.
    pub fn wait_up(&self) {
        let up = wait_until(std::time::Duration::from_secs(20), || {
            self.cli(&["host", "list", "--json"]).status.success()
        });
        assert!(
            up,
            "ferry server did not come up:\n{}",
            self.daemon.log_text()
        );
    }

    /// `ferry ARGS...` with the admin's FERRY_SERVER, FERRY_TOKEN, FERRY_CA.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.admin_token, args)
    }

    /// `ferry ARGS...` with `token` instead of the admin's; killed (and
    /// the test failed) if it runs past [`CLI_DEADLINE`].
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        let child = Command::new(ferry_bin())
            .args(args)
            .env("FERRY_SERVER", &self.url)
            .env("FERRY_TOKEN", token)
            .env("FERRY_CA", &self.ca)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run ferry");
        // Output is read while it runs (a full pipe must not stall it).
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(CLI_DEADLINE) {
            Ok(out) => out.expect("ferry output"),
            Err(_) => {
                if let Ok(pid) = libc::pid_t::try_from(pid) {
                    // SAFETY: signalling our own child, not yet reaped (its
                    // reaper is still waiting).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                panic!("ferry {} ran past {CLI_DEADLINE:?}: killed", args.join(" "));
            }
        }
    }

    /// `ferry ARGS... --json` as the admin, exit 0 expected, stdout parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        expect_code(&out, 0, &format!("ferry {}", args.join(" ")));
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }

    /// Registers host or target `name` (`role` = "host" | "target") with a
    /// fresh one-time token, writing its credentials under `dir`; returns
    /// its API token.
    pub fn register(&self, role: &str, name: &str, dir: &Path, address: Option<&str>) -> String {
        let t = self.json(&[role, "token", "--name", name]);
        let token = t["token"].as_str().expect("token");
        let fp = t["ca_fingerprint"].as_str().expect("fingerprint");
        let dir_flag = if role == "host" { "--state" } else { "--data" };
        let mut args = vec![
            role,
            "register",
            "--server",
            &self.url,
            "--token",
            token,
            "--ca-fingerprint",
            fp,
            "--name",
            name,
            dir_flag,
            dir.to_str().expect("utf-8"),
        ];
        if let Some(a) = address {
            args.extend_from_slice(&["--address", a]);
        }
        let out = ferry(&args);
        expect_code(&out, 0, &format!("ferry {role} register {name}"));
        std::fs::read_to_string(dir.join("server.token"))
            .expect("server.token")
            .trim()
            .to_owned()
    }
}

/// `cross_disk.py` writing records through `uri_b` and index entries
/// through `uri_a`; `CTL/done` appears when it finished.
pub fn start_cross_disk(scratch: &Scratch, uri_a: &str, uri_b: &str) -> (PathBuf, ChildGuard) {
    let ctl = scratch.path("ctl");
    std::fs::create_dir_all(&ctl).unwrap();
    let workload = std::process::Command::new("/usr/bin/python3")
        .args([
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("workloads/cross_disk.py")
                .to_str()
                .expect("utf-8"),
            uri_a,
            uri_b,
            ctl.to_str().expect("utf-8"),
            "3000",
        ])
        .stderr(std::fs::File::create(scratch.path("workload.log")).unwrap())
        .spawn()
        .expect("start the workload");
    (ctl, ChildGuard(workload))
}

/// Index entries on disk A (as `cross_disk.py` writes them) whose record is
/// missing on disk B, and the number of entries.
pub fn dangling_entries(a: &[u8], b: &[u8]) -> (usize, u64) {
    let word = |buf: &[u8], at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
    let mut dangling = 0;
    let mut entries = 0;
    for k in 1..(a.len() / 16) {
        let (id, check) = (word(a, k * 16), word(a, k * 16 + 8));
        if id == 0 {
            continue;
        }
        assert_eq!(
            (id, check),
            (k as u64, k as u64 * 7919),
            "index entry {k} intact"
        );
        entries += 1;
        let rec = &b[k * 4096..(k + 1) * 4096];
        let whole = rec
            .chunks(16)
            .all(|c| word(c, 0) == id && word(c, 8) == check);
        if !whole {
            dangling += 1;
        }
    }
    (dangling, entries)
}

/// `ferry points HOST --data DATA --json`: the host's points at the target
/// (empty while it has none or the command fails).
pub fn points_at(data: &Path, host: &str) -> Vec<serde_json::Value> {
    let out = ferry([
        "points",
        host,
        "--data",
        data.to_str().expect("utf-8"),
        "--json",
    ]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Files of assorted sizes under `root/name`; returns (path, crc32c).
pub fn write_tree(root: &Path, name: &str, seed: u64) -> Vec<(PathBuf, u32)> {
    let dir = root.join(name);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    let mut out = Vec::new();
    for i in 0..16u64 {
        let path = if i % 4 == 0 {
            dir.join(format!("sub/f{i}"))
        } else {
            dir.join(format!("f{i}"))
        };
        let data = pattern(
            seed * 1000 + i,
            usize::try_from((i % 6 + 1) * 190_000 + i).unwrap(),
        );
        std::fs::write(&path, &data).unwrap();
        out.push((path, crc32c::crc32c(&data)));
    }
    out
}

/// Check every file of `tree` (paths relative to `root`, or absolute)
/// against its crc32c.
pub fn check_tree(root: &Path, tree: &[(PathBuf, u32)]) {
    for (rel, crc) in tree {
        let path = root.join(rel);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(crc32c::crc32c(&data), *crc, "{} changed", path.display());
    }
}

/// Unmount `mnt`, retrying for up to 20 s while it is busy (a process
/// that just wrote there may hold it a moment while its files are released).
pub fn umount_retrying(mnt: &Path) {
    let mut last = None;
    let done = wait_until(std::time::Duration::from_secs(20), || {
        let out = run("umount", [mnt.to_str().expect("utf-8")]);
        let ok = out.status.success();
        last = Some(out);
        ok
    });
    if !done {
        if let Some(out) = last {
            expect_code(&out, 0, "umount");
        }
    }
}

/// The JSON a command printed; it must have exited 0.
pub fn json_of(out: &std::process::Output, what: &str) -> serde_json::Value {
    expect_code(out, 0, what);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `qemu-img compare` of the raw file `raw` with `image` (of the ferry
/// format `format`), which must be equal; `what` names the step.
pub fn assert_same_as_raw(raw: &Path, image: &Path, format: &str, what: &str) {
    let out = qemu_compare_raw(raw, image, format);
    assert!(
        out.status.success(),
        "{what}: {} differs from {}: {}{}",
        image.display(),
        raw.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
