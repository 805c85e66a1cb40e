#!/bin/sh
# Install ferry: the binary, its systemd units, configuration skeletons and
# the kernel module settings. POSIX sh (runs under busybox too).
#
# Usage: scripts/install.sh [--root DIR] [--prefix /usr/local] [--bin PATH]
#   --root DIR     install into DIR as the file system root (an image, a
#                  chroot; default /). Only with root / does it reload
#                  systemd and load the nbd module.
#   --prefix DIR   the binary goes to PREFIX/bin/ferry (default /usr/local)
#   --bin PATH     the ferry binary to install (default: target/release/ferry
#                  if built, else target/debug/ferry, in this repository)
#
# It installs:
#   PREFIX/bin/ferry                        (0755)
#   /etc/systemd/system/ferry-*.service     units, ExecStart= naming PREFIX/bin/ferry
#   /etc/modules-load.d/ferry.conf          load nbd and dm_mod at boot
#   /etc/modprobe.d/ferry.conf              options nbd nbds_max=16
#   /etc/ferry/ (0750)                      configuration skeletons (0640), only
#                                           where absent: never overwrites a file
#   /var/lib/ferry/ (0700)                  state, and the install manifest
#                                           /var/lib/ferry/.install-manifest, the
#                                           list scripts/uninstall.sh removes
# Idempotent: a second run changes nothing and exits 0. It enables no unit:
# it says which to enable.
set -eu
# Byte order for sort (the manifest is the same whatever the locale).
LC_ALL=C
export LC_ALL

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
units_src=$here/systemd

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }
usage() {
    sed -n '5,11s/^# \{0,1\}//p' "$0"
}

root=/
prefix=/usr/local
bin=
while [ $# -gt 0 ]; do
    case $1 in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
    --root=*) root=${1#*=}; shift ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --bin) [ $# -ge 2 ] || die "--bin needs a path"; bin=$2; shift 2 ;;
    --bin=*) bin=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# The root, absolute and without a trailing slash ("" for /).
[ -n "$root" ] || die "--root: empty directory name"
[ -d "$root" ] || die "--root $root: no such directory"
root=$(cd "$root" && pwd)
[ "$root" = / ] && root=
live=no
[ -z "$root" ] && live=yes

# The prefix ends up in ExecStart= lines: keep it to characters needing no
# quoting there (nor in sed).
case $prefix in
/*) ;;
*) die "--prefix $prefix: must be an absolute path" ;;
esac
case $prefix in
*[!A-Za-z0-9._/+-]*) die "--prefix $prefix: use letters, digits and . _ / + - only" ;;
esac
while :; do
    case $prefix in
    ?*/) prefix=${prefix%/} ;;
    *) break ;;
    esac
done
[ "$prefix" = / ] && prefix=

if [ -z "$bin" ]; then
    for candidate in "$repo/target/release/ferry" "$repo/target/debug/ferry"; do
        if [ -f "$candidate" ]; then
            bin=$candidate
            break
        fi
    done
    [ -n "$bin" ] || die "no ferry binary: build one (cargo build --release -p ferry) or give --bin PATH"
fi
[ -f "$bin" ] || die "--bin $bin: no such file"
[ -x "$bin" ] || die "--bin $bin: not executable"
[ -d "$units_src" ] || die "$units_src: unit files missing"

bin_path=$prefix/bin/ferry
manifest=/var/lib/ferry/.install-manifest
old_manifest=$root$manifest

# Entries of the new manifest ("KIND PATH", PATH as seen from the root):
#   file PATH    installed here, removed by uninstall.sh
#   config PATH  a configuration file, kept by uninstall.sh unless --purge
#   confdir PATH, statedir PATH   /etc/ferry, /var/lib/ferry: likewise
#   dir PATH     a directory this script created (it did not exist), removed
#                by uninstall.sh once empty
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-install.XXXXXX")
entries=$work/manifest
: >"$entries"
partial=
cleanup() {
    rm -rf "$work"
    [ -z "$partial" ] || rm -f "$partial"
}
trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 141' PIPE
trap 'exit 143' TERM
record() { printf '%s %s\n' "$1" "$2" >>"$entries"; }

# Directories created by an earlier run stay "created by us".
if [ -f "$old_manifest" ]; then
    while read -r kind path; do
        if [ "$kind" = dir ] && [ -d "$root$path" ]; then
            record dir "$path"
        fi
    done <"$old_manifest"
fi

# Make directory $1 (as seen from the root) with mode $2, and its missing
# parents (0755), recording each one made. (No recursion: sh has no local
# variables.)
make_dir() {
    md_missing=
    md_path=$1
    while [ ! -d "$root$md_path" ]; do
        md_missing="$md_path $md_missing"
        md_path=$(dirname "$md_path")
    done
    for md_path in $md_missing; do
        if [ "$md_path" = "$1" ]; then
            mkdir -m "$2" "$root$md_path"
        else
            mkdir -m 0755 "$root$md_path"
        fi
        record dir "$md_path"
    done
}

# Copy file $1 to $2 (as seen from the root) with mode $3 through a
# temporary file and a rename: a running ferry keeps its binary, and no
# reader ever sees half a file.
copy_in() {
    partial=$root$2.ferry-new.$$
    cp "$1" "$partial"
    chmod "$3" "$partial"
    mv -f "$partial" "$root$2"
    partial=
}

# Install file $1 at $2 with mode $3 unless it is there already; says what
# it did and records it.
put_file() {
    make_dir "$(dirname "$2")" 0755
    if [ -f "$root$2" ] && cmp -s "$1" "$root$2"; then
        chmod "$3" "$root$2"
        say "unchanged  $2"
    else
        copy_in "$1" "$2" "$3"
        say "installed  $2"
    fi
    record file "$2"
}

# The binary.
put_file "$bin" "$bin_path" 0755

# The units, with the binary's path in ExecStart=.
rendered=$work/unit
for unit in "$units_src"/*.service; do
    [ -f "$unit" ] || die "no unit files in $units_src"
    sed "s|@FERRY_BIN@|$bin_path|g" "$unit" >"$rendered"
    put_file "$rendered" "/etc/systemd/system/$(basename "$unit")" 0644
done

# Kernel modules at boot.
put_file "$units_src/modules-load.conf" /etc/modules-load.d/ferry.conf 0644
put_file "$units_src/modprobe.conf" /etc/modprobe.d/ferry.conf 0644

# Configuration: skeletons where there is no file yet. Readable by root
# only: environment files name credentials.
make_dir /etc/ferry 0750
record confdir /etc/ferry
for name in filter.toml filter.env volume.env sidecar.env target.env server.env; do
    path=/etc/ferry/$name
    if [ -e "$root$path" ] || [ -L "$root$path" ]; then
        say "kept       $path (exists: not overwritten)"
    else
        copy_in "$units_src/$name" "$path" 0640
        say "installed  $path"
    fi
    record config "$path"
done

# State.
if [ -d "$root/var/lib/ferry" ]; then
    say "exists     /var/lib/ferry"
else
    make_dir /var/lib/ferry 0700
    say "created    /var/lib/ferry"
fi
record statedir /var/lib/ferry

# Files an earlier install put where this one did not (another --prefix):
# remove them.
if [ -f "$old_manifest" ]; then
    while read -r kind path; do
        [ "$kind" = file ] || continue
        if grep -qxF "file $path" "$entries"; then
            continue
        fi
        if [ -e "$root$path" ] || [ -L "$root$path" ]; then
            rm -f "$root$path"
            say "removed    $path (installed before, not now)"
        fi
    done <"$old_manifest"
fi

# The manifest, sorted so that the same install writes the same file.
sort -u "$entries" >"$entries.sorted"
mv -f "$entries.sorted" "$old_manifest"
chmod 0600 "$old_manifest"
say "manifest   $manifest"

hint() {
    say "next: edit /etc/ferry, then enable what this machine runs:"
    say "  protected host, disks:   systemctl enable --now ferry-filter.service ferry-sidecar.service"
    say "  protected host, volumes: systemctl enable --now ferry-volume@VG-LV.service ferry-sidecar@VG-LV.service"
    say "  recovery site:           systemctl enable --now ferry-target.service"
    say "  control plane:           ferry server init --data /var/lib/ferry/server"
    say "                           systemctl enable --now ferry-server.service"
}

if [ "$live" = no ]; then
    say "root $root is not /: systemd not reloaded, kernel modules not loaded"
    say "  (to enable units in it: systemctl --root=$root enable UNIT...)"
    hint
    exit 0
fi

# Kernel modules now, for this boot (not fatal: the boot loads them too).
# $1: the module, $2: what needs it, then modprobe's parameters.
load_module() {
    lm_module=$1
    lm_user=$2
    shift 2
    lm_command=$(printf '%s ' modprobe "$lm_module" "$@")
    lm_command=${lm_command% }
    if [ -d "/sys/module/$lm_module" ]; then
        say "loaded     kernel module $lm_module (already)"
    elif lm_error=$($lm_command 2>&1); then
        say "loaded     kernel module $lm_module ($lm_command)"
    else
        lm_error=$(printf '%s' "$lm_error" | tr '\n' ' ')
        lm_error=${lm_error% }
        say "WARNING: could not load kernel module $lm_module ($lm_command:" \
            "${lm_error:-failed}); $lm_user needs it: load it by hand, or reboot" \
            "(/etc/modules-load.d/ferry.conf loads it at boot)"
    fi
}
load_module nbd "the filter (/dev/nbdN)" nbds_max=16
load_module dm_mod "protect-volume"

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "reloaded   systemd (systemctl daemon-reload)"
    # Units running the binary just replaced keep the old one until restarted.
    running=$(systemctl list-units --state=active,activating,reloading --no-legend --plain --full 'ferry-*' 2>/dev/null |
        awk '{ print ($1 ~ /^ferry-/) ? $1 : $2 }') || running=
    if [ -n "$running" ]; then
        # shellcheck disable=SC2086 # one unit name a word
        say "running    $(printf '%s ' $running)(they keep the previous binary until restarted)"
    fi
    hint
else
    say "systemd is not PID 1 here: units installed, not loaded (systemctl daemon-reload once it runs)"
    hint
fi
