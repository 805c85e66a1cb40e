//! The install story: `scripts/install.sh` and `scripts/uninstall.sh` run
//! against a scratch root (never the machine's own /). Installing twice
//! gives the same tree, a user's configuration survives a re-install, every
//! unit passes `systemd-analyze verify` (package `systemd`) inside that
//! root, `systemctl --root` can enable them all, and uninstalling removes
//! exactly what the manifest lists, then `--purge` the rest. The scripts are
//! POSIX sh: they run under dash here, and under busybox alone.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_tests::{expect_code, ferry_bin, Scratch};

/// The units install.sh installs (templates by their file name).
const UNITS: [&str; 6] = [
    "ferry-filter.service",
    "ferry-volume@.service",
    "ferry-sidecar.service",
    "ferry-sidecar@.service",
    "ferry-target.service",
    "ferry-server.service",
];

/// The configuration skeletons under /etc/ferry.
const CONFIGS: [&str; 6] = [
    "filter.toml",
    "filter.env",
    "volume.env",
    "sidecar.env",
    "target.env",
    "server.env",
];

/// Unit names to verify and enable: templates get an instance.
const INSTANCES: [&str; 6] = [
    "ferry-filter.service",
    "ferry-volume@vg0-data.service",
    "ferry-sidecar.service",
    "ferry-sidecar@vg0-data.service",
    "ferry-target.service",
    "ferry-server.service",
];

const MANIFEST: &str = "var/lib/ferry/.install-manifest";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `sh scripts/NAME ARGS...` with `PATH` replaced when `path` is given.
fn script(name: &str, args: &[&str], path: Option<&Path>) -> Output {
    let mut cmd = Command::new(match path {
        Some(dir) => dir.join("sh"),
        None => PathBuf::from("sh"),
    });
    cmd.arg(repo().join("scripts").join(name)).args(args);
    if let Some(dir) = path {
        cmd.env("PATH", dir);
    }
    cmd.output().unwrap_or_else(|e| panic!("run {name}: {e}"))
}

/// install.sh into `root` with the binary under test, and checks it exited 0.
fn install(root: &Path, extra: &[&str]) -> String {
    let bin = ferry_bin();
    let mut args = vec!["--root", s(root), "--bin", s(&bin)];
    args.extend_from_slice(extra);
    let out = script("install.sh", &args, None);
    expect_code(&out, 0, "install.sh");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// uninstall.sh on `root`, and checks it exited 0.
fn uninstall(root: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--root", s(root)];
    args.extend_from_slice(extra);
    let out = script("uninstall.sh", &args, None);
    expect_code(&out, 0, "uninstall.sh");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// One entry of a directory tree.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    File { mode: u32, len: u64, crc: u32 },
    Link { target: PathBuf },
}

/// Everything under `root`, by path relative to it.
fn tree(root: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path.strip_prefix(root).expect("under root").to_path_buf();
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("read link");
                out.insert(rel, Node::Link { target });
            } else if meta.is_dir() {
                out.insert(rel, Node::Dir { mode });
                walk(root, &path, out);
            } else {
                let data = std::fs::read(&path).expect("read file");
                let crc = crc32c::crc32c(&data);
                out.insert(
                    rel,
                    Node::File {
                        mode,
                        len: meta.len(),
                        crc,
                    },
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The manifest's entries: (kind, path as seen from the root).
fn manifest(root: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root.join(MANIFEST)).expect("install manifest");
    text.lines()
        .map(|line| {
            let (kind, path) = line.split_once(' ').expect("KIND PATH");
            (kind.to_string(), path.to_string())
        })
        .collect()
}

/// `root` joined with an absolute path from the manifest.
fn inside(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Symlinks under `root`/etc/systemd/system named ferry-*.
fn ferry_links(root: &Path) -> Vec<PathBuf> {
    let units = root.join("etc/systemd/system");
    if !units.exists() {
        return Vec::new();
    }
    tree(&units)
        .into_iter()
        .filter(|(path, node)| {
            matches!(node, Node::Link { .. })
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("ferry-"))
        })
        .map(|(path, _)| path)
        .collect()
}

#[test]
fn installing_twice_gives_the_same_tree_and_keeps_the_users_config() {
    let dir = Scratch::new("install-twice");
    let root = dir.path("root");
    std::fs::create_dir(&root).expect("root");

    let first_out = install(&root, &[]);
    let first = tree(&root);
    let second_out = install(&root, &[]);
    assert_eq!(tree(&root), first, "a second install changed the tree");
    assert!(
        !second_out.contains("installed "),
        "the second install installed something again:\n{second_out}"
    );
    assert!(
        first_out.contains("installed  /usr/local/bin/ferry"),
        "{first_out}"
    );
    assert!(
        first_out.contains("not /: systemd not reloaded"),
        "{first_out}"
    );

    // The binary: executable, the one under test, and it runs.
    let bin = root.join("usr/local/bin/ferry");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(
        std::fs::read(&bin).expect("installed binary"),
        std::fs::read(ferry_bin()).expect("binary under test"),
        "installed binary differs from FERRY_BIN"
    );
    let version = Command::new(&bin)
        .arg("--version")
        .output()
        .expect("run it");
    expect_code(&version, 0, "installed ferry --version");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("ferry "));

    // The units, with the installed binary's path in every ExecStart=.
    for unit in UNITS {
        let path = root.join("etc/systemd/system").join(unit);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{unit}: {e}"));
        assert_eq!(mode(&path), 0o644, "{unit}");
        assert!(!text.contains("@FERRY_BIN@"), "{unit}: placeholder left");
        let execs: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("ExecStart="))
            .collect();
        assert_eq!(execs.len(), 1, "{unit}: one ExecStart= line");
        assert!(
            execs[0].starts_with("ExecStart=/usr/local/bin/ferry "),
            "{unit}: {}",
            execs[0]
        );
    }
    let modules = std::fs::read_to_string(root.join("etc/modules-load.d/ferry.conf"))
        .expect("modules-load.d/ferry.conf");
    let modules: Vec<&str> = modules.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(modules, ["nbd", "dm_mod"]);
    let modprobe =
        std::fs::read_to_string(root.join("etc/modprobe.d/ferry.conf")).expect("modprobe.d");
    assert!(
        modprobe.lines().any(|l| l == "options nbd nbds_max=16"),
        "{modprobe}"
    );

    // Configuration skeletons, readable by root only; the state directory.
    assert_eq!(mode(&root.join("etc/ferry")), 0o750);
    for name in CONFIGS {
        assert_eq!(mode(&root.join("etc/ferry").join(name)), 0o640, "{name}");
    }
    assert_eq!(mode(&root.join("var/lib/ferry")), 0o700);

    // The filter.toml skeleton is valid TOML the filter reads (it stops at
    // the missing disks, before touching anything).
    let skeleton = std::fs::read_to_string(root.join("etc/ferry/filter.toml")).expect("toml");
    assert!(skeleton.contains("state = \"/var/lib/ferry/filter\""));
    let config = dir.path("filter.toml");
    std::fs::write(
        &config,
        skeleton.replace("/var/lib/ferry/filter", s(&dir.path("state"))),
    )
    .expect("write config");
    let out = ferry_tests::ferry(["filter", "--config", s(&config)]);
    expect_code(&out, 2, "ferry filter --config skeleton");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no disks"),
        "the skeleton did not parse: {stderr}"
    );
    assert!(
        !dir.path("state").exists(),
        "the filter made its state directory"
    );

    // The manifest lists every file installed, and only those.
    let entries = manifest(&root);
    let mut listed: Vec<String> = entries
        .iter()
        .filter(|(kind, _)| kind == "file" || kind == "config")
        .map(|(_, path)| path.clone())
        .collect();
    listed.sort_unstable();
    // (the tree is a BTreeMap: already sorted)
    let on_disk: Vec<String> = first
        .iter()
        .filter(|(path, node)| matches!(node, Node::File { .. }) && *path != Path::new(MANIFEST))
        .map(|(path, _)| format!("/{}", path.display()))
        .collect();
    assert_eq!(listed, on_disk, "manifest vs files installed");

    // A user's edits survive a re-install, which says it kept them.
    let toml = root.join("etc/ferry/filter.toml");
    let env = root.join("etc/ferry/sidecar.env");
    let edited_toml = format!("{skeleton}\n[[disk]]\nname = \"data\"\npath = \"/dev/vdb\"\n");
    let edited_env = "FERRY_SIDECAR_ARGS=--state /var/lib/ferry/filter --target dr:9443\n";
    std::fs::write(&toml, &edited_toml).expect("edit filter.toml");
    std::fs::write(&env, edited_env).expect("edit sidecar.env");
    std::fs::set_permissions(&env, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let third_out = install(&root, &[]);
    assert_eq!(std::fs::read_to_string(&toml).expect("toml"), edited_toml);
    assert_eq!(std::fs::read_to_string(&env).expect("env"), edited_env);
    assert_eq!(mode(&env), 0o600, "a re-install changed the user's mode");
    assert!(
        third_out.contains("kept       /etc/ferry/filter.toml (exists: not overwritten)"),
        "{third_out}"
    );
    assert_eq!(
        manifest(&root),
        entries,
        "the manifest changed with the user's edits"
    );

    // A broken installed unit is put right by a re-install.
    let unit = root.join("etc/systemd/system/ferry-filter.service");
    std::fs::write(&unit, "[Service]\nExecStart=/bin/false\n").expect("break the unit");
    let fourth_out = install(&root, &[]);
    assert!(
        fourth_out.contains("installed  /etc/systemd/system/ferry-filter.service"),
        "{fourth_out}"
    );
    assert_eq!(
        tree(&root).get(Path::new("etc/systemd/system/ferry-filter.service")),
        first.get(Path::new("etc/systemd/system/ferry-filter.service"))
    );
}

/// Where this machine keeps systemd's own units (sysinit.target and the
/// other targets the ferry units name).
fn system_unit_dir() -> PathBuf {
    ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .iter()
        .map(PathBuf::from)
        .find(|dir| dir.join("sysinit.target").exists())
        .expect("systemd's units (sysinit.target) not found: apt-get install systemd")
}

fn systemd_analyze(args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("run systemd-analyze (apt-get install systemd)")
}

/// `systemd-analyze verify --root=ROOT UNIT`: exit status and stderr.
fn verify(root: &Path, unit: &str) -> (Option<i32>, String) {
    let out = systemd_analyze(&["verify", &format!("--root={}", s(root)), unit]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `systemd-analyze verify` of every unit (templates through an instance):
/// it must exit 0 and say nothing about a ferry unit (it reports unknown
/// keys and ordering cycles with exit status 0).
fn verify_all(root: &Path, when: &str) {
    for unit in INSTANCES {
        let (code, stderr) = verify(root, unit);
        // Any line about a ferry unit (the scratch root's own name says
        // "ferry" too: leave it out).
        let stderr = stderr.replace(s(root), "ROOT");
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("ferry")).collect();
        assert!(
            code == Some(0) && ours.is_empty(),
            "systemd-analyze verify {unit} ({when}): exit {code:?}\n{stderr}"
        );
        if !stderr.trim().is_empty() {
            eprintln!("systemd-analyze verify {unit} ({when}), about other units:\n{stderr}");
        }
    }
}

#[test]
fn every_unit_passes_systemd_analyze_verify_and_enables_in_the_root() {
    let dir = Scratch::new("install-verify");
    let root = dir.path("root");
    // verify --root resolves the units' dependencies (sysinit.target,
    // local-fs-pre.target, network-online.target...) and their ExecStart=
    // binaries inside the root: give it systemd's own units there.
    let units = root.join("usr/lib/systemd");
    std::fs::create_dir_all(&units).expect("unit dir");
    let copy = Command::new("cp")
        .arg("-a")
        .arg(system_unit_dir())
        .arg(&units)
        .output()
        .expect("cp");
    expect_code(&copy, 0, "copy systemd's units into the root");
    let before = tree(&root);
    install(&root, &[]);

    // A control: verify does report a broken unit in this root, so a clean
    // result below means something.
    let broken = root.join("etc/systemd/system/ferry-broken.service");
    std::fs::write(
        &broken,
        "[Unit]\nDescription=broken\nNoSuchKey=1\n[Service]\nExecStart=/usr/local/bin/no-such-ferry\n",
    )
    .expect("broken unit");
    let (code, stderr) = verify(&root, "ferry-broken.service");
    assert!(
        code != Some(0) && stderr.contains("NoSuchKey") && stderr.contains("no-such-ferry"),
        "verify missed the broken unit (exit {code:?}):\n{stderr}"
    );
    std::fs::remove_file(&broken).expect("remove broken unit");

    verify_all(&root, "installed");

    // Every [Install] section works: enabling the filter and a volume
    // also enables their sidecars (Also=).
    let out = Command::new("systemctl")
        .arg(format!("--root={}", s(&root)))
        .arg("enable")
        .args(["ferry-filter.service", "ferry-volume@vg0-data.service"])
        .args(["ferry-target.service", "ferry-server.service"])
        .output()
        .expect("run systemctl (apt-get install systemd)");
    expect_code(&out, 0, "systemctl --root enable");
    let mut links: Vec<String> = ferry_links(&root)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    links.sort();
    assert_eq!(
        links,
        [
            "local-fs.target.wants/ferry-filter.service",
            "local-fs.target.wants/ferry-volume@vg0-data.service",
            "multi-user.target.wants/ferry-server.service",
            "multi-user.target.wants/ferry-sidecar.service",
            "multi-user.target.wants/ferry-sidecar@vg0-data.service",
            "multi-user.target.wants/ferry-target.service",
        ]
    );

    // Enabled, the units are part of the boot transaction (local-fs.target
    // wants the filter and the volume): verify again, for ordering cycles.
    verify_all(&root, "enabled");

    // Uninstalling disables them (no dangling links), and the purge leaves
    // the root as the test made it.
    let out = uninstall(&root, &["--purge"]);
    assert!(
        ferry_links(&root).is_empty(),
        "enablement links left:\n{out}"
    );
    assert_eq!(
        tree(&root),
        before,
        "the purge left or removed something:\n{out}"
    );
}

#[test]
fn uninstall_removes_what_the_manifest_lists_then_purge_the_rest() {
    let dir = Scratch::new("install-uninstall");
    let root = dir.path("root");
    std::fs::create_dir(&root).expect("root");

    // Nothing installed: both kinds of uninstall succeed and do nothing.
    let out = uninstall(&root, &[]);
    assert!(out.contains("no install manifest"), "{out}");
    uninstall(&root, &["--purge"]);
    assert!(tree(&root).is_empty());

    install(&root, &[]);
    let entries = manifest(&root);
    let edited = "FERRY_TARGET_ARGS=--data /srv/dr --listen 0.0.0.0:9443\n";
    std::fs::write(root.join("etc/ferry/target.env"), edited).expect("edit target.env");
    std::fs::write(root.join("var/lib/ferry/state-file"), "x").expect("state");

    let first = uninstall(&root, &[]);
    for (kind, path) in &entries {
        let there = inside(&root, path).exists();
        match kind.as_str() {
            "file" => assert!(!there, "{path} left by uninstall:\n{first}"),
            "config" | "confdir" | "statedir" => {
                assert!(there, "{path} removed without --purge:\n{first}")
            }
            _ => {}
        }
    }
    assert_eq!(
        std::fs::read_to_string(root.join("etc/ferry/target.env")).expect("kept config"),
        edited
    );
    assert!(root.join("var/lib/ferry/state-file").exists());
    assert!(first.contains("kept       /etc/ferry"), "{first}");
    assert!(first.contains("kept       /var/lib/ferry"), "{first}");
    // Directories only install.sh made, now empty, are gone.
    for gone in ["usr", "etc/systemd", "etc/modules-load.d", "etc/modprobe.d"] {
        assert!(!root.join(gone).exists(), "{gone} left:\n{first}");
    }

    let after_first = tree(&root);
    let second = uninstall(&root, &[]);
    assert_eq!(
        tree(&root),
        after_first,
        "a second uninstall changed things:\n{second}"
    );

    uninstall(&root, &["--purge"]);
    assert!(
        tree(&root).is_empty(),
        "the purge left {:?}",
        tree(&root).keys()
    );
    uninstall(&root, &["--purge"]);
    assert!(root.is_dir(), "the purge removed the root itself");
}

/// A directory of busybox applet links, to run the scripts with nothing
/// else on PATH (as in the busybox-only VM).
fn busybox_path(dir: &Path) -> PathBuf {
    let list = Command::new("busybox")
        .arg("--list")
        .output()
        .expect("run busybox (apt-get install busybox-static)");
    expect_code(&list, 0, "busybox --list");
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("busybox binary");
    let bin = dir.join("busybox-bin");
    std::fs::create_dir_all(&bin).expect("busybox dir");
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        std::os::unix::fs::symlink(&busybox, bin.join(applet)).expect("applet link");
    }
    bin
}

#[test]
fn the_scripts_run_under_busybox_alone_and_install_the_same_tree() {
    let dir = Scratch::new("install-busybox");
    let path = busybox_path(&dir.path(""));
    let bin = ferry_bin();
    let reference = dir.path("dash");
    let root = dir.path("busybox");
    std::fs::create_dir(&reference).expect("root");
    std::fs::create_dir(&root).expect("root");
    install(&reference, &[]);

    for round in ["first", "second"] {
        let out = script(
            "install.sh",
            &["--root", s(&root), "--bin", s(&bin)],
            Some(&path),
        );
        expect_code(&out, 0, &format!("{round} install.sh under busybox"));
        assert_eq!(tree(&root), tree(&reference), "{round} busybox install");
    }
    let out = script("uninstall.sh", &["--root", s(&root)], Some(&path));
    expect_code(&out, 0, "uninstall.sh under busybox");
    assert!(!root.join("usr/local/bin/ferry").exists());
    let out = script(
        "uninstall.sh",
        &["--root", s(&root), "--purge"],
        Some(&path),
    );
    expect_code(&out, 0, "uninstall.sh --purge under busybox");
    assert!(tree(&root).is_empty(), "left {:?}", tree(&root).keys());
}

#[test]
fn bad_arguments_fail_clearly_and_a_new_prefix_moves_the_binary() {
    let dir = Scratch::new("install-args");
    let root = dir.path("root");
    std::fs::create_dir(&root).expect("root");
    let bin = ferry_bin();
    for (args, says) in [
        (vec!["--bin", "/nonexistent/ferry"], "no such file"),
        (vec!["--prefix", "relative/dir"], "must be an absolute path"),
        (vec!["--prefix", "/opt/with space"], "letters, digits"),
        (vec!["--no-such-flag"], "unknown argument"),
    ] {
        let mut all = vec!["--root", s(&root)];
        all.extend_from_slice(&args);
        if !args.contains(&"--bin") {
            all.extend_from_slice(&["--bin", s(&bin)]);
        }
        let out = script("install.sh", &all, None);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && stderr.contains(says),
            "install.sh {args:?}: exit {:?}, stderr: {stderr}",
            out.status.code()
        );
        assert!(
            tree(&root).is_empty(),
            "install.sh {args:?} changed the root"
        );
    }
    let out = script("install.sh", &["--root", s(&dir.path("missing"))], None);
    assert_eq!(out.status.code(), Some(1), "a missing --root");

    install(&root, &[]);
    let out = install(&root, &["--prefix", "/opt/ferry"]);
    assert!(
        !root.join("usr/local/bin/ferry").exists(),
        "old binary left:\n{out}"
    );
    assert!(out.contains("removed    /usr/local/bin/ferry"), "{out}");
    assert!(root.join("opt/ferry/bin/ferry").is_file());
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/ferry-target.service"))
        .expect("unit");
    assert!(
        unit.contains("ExecStart=/opt/ferry/bin/ferry target "),
        "{unit}"
    );
    uninstall(&root, &["--purge"]);
    assert!(tree(&root).is_empty(), "left {:?}", tree(&root).keys());
}

#[test]
fn at_root_slash_without_systemd_it_says_so_and_a_failed_modprobe_is_not_fatal() {
    // install.sh with root / (its live path: modprobe, systemd) inside a
    // chroot of busybox-static alone: no /sys, no /lib/modules, systemd not
    // PID 1. Needs root (chroot, mknod).
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (chroot)");
    let dir = Scratch::new("install-chroot");
    let root = dir.path("root");
    let bin = busybox_path(&dir.path(""));
    for sub in ["bin", "tmp", "dev", "src"] {
        std::fs::create_dir_all(root.join(sub)).expect("chroot dir");
    }
    let busybox = std::fs::read_link(bin.join("sh")).expect("busybox link");
    std::fs::copy(&busybox, root.join("bin/busybox")).expect("copy busybox");
    for applet in std::fs::read_dir(&bin).expect("applets") {
        let name = applet.expect("applet").file_name();
        if name != "busybox" {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(name)).expect("link");
        }
    }
    let mknod = Command::new("mknod")
        .args(["-m", "666"])
        .arg(root.join("dev/null"))
        .args(["c", "1", "3"])
        .output()
        .expect("mknod");
    expect_code(&mknod, 0, "mknod dev/null");
    let cp = Command::new("cp")
        .arg("-r")
        .arg(repo().join("scripts/install.sh"))
        .arg(repo().join("scripts/uninstall.sh"))
        .arg(repo().join("scripts/systemd"))
        .arg(root.join("src"))
        .output()
        .expect("cp");
    expect_code(&cp, 0, "copy the scripts");
    std::fs::copy(ferry_bin(), root.join("src/ferry")).expect("copy ferry");
    let chroot = |args: &[&str]| {
        Command::new("chroot")
            .arg(&root)
            .args(["/bin/env", "PATH=/bin", "/bin/sh"])
            .args(args)
            .output()
            .expect("run chroot")
    };
    let probe = chroot(&["-c", "true"]);
    expect_code(
        &probe,
        0,
        "busybox in a chroot (apt-get install busybox-static)",
    );
    let before = tree(&root);

    let out = chroot(&["/src/install.sh", "--bin", "/src/ferry"]);
    expect_code(&out, 0, "install.sh with root / in the chroot");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("WARNING: could not load kernel module nbd (modprobe nbd nbds_max=16"),
        "{stdout}"
    );
    assert!(stdout.contains("systemd is not PID 1 here"), "{stdout}");
    assert!(root.join("usr/local/bin/ferry").is_file());
    assert!(root
        .join("etc/systemd/system/ferry-filter.service")
        .is_file());

    let out = chroot(&["/src/uninstall.sh", "--purge"]);
    expect_code(&out, 0, "uninstall.sh --purge with root / in the chroot");
    assert_eq!(
        tree(&root),
        before,
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
