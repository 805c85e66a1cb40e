#!/usr/bin/env bash
# A protected volume on a machine without the nbd kernel module:
#   backing file -> ferry filter -> nbdfuse (export as a file) -> losetup -> mkfs -> mount
#
# Usage:
#   scripts/rig/volume.sh up   DIR [--size 512M] [--fs ext4|xfs|none|existing] [--ring-size 16M]
#                              [--disk FILE | --vmdk IMAGE] [-- FILTER FLAGS...]
#   scripts/rig/volume.sh down DIR      # always safe to run, also after a failed `up`
#
# --fs existing mounts the file system the disk holds (no mkfs).
# --disk FILE: the backing file is FILE instead of DIR/disk.img.
# --vmdk IMAGE: the disk is a VMDK (a virtual machine's disk): qemu-nbd
#   serves it, nbdfuse makes it a file (DIR/vmdk/disk), and that file is
#   the filter's backing; `down` stops qemu-nbd, which closes the image.
#
# Layout under DIR: disk.img (backing file), state/ (filter state), nbd.sock,
# filter.log, filter.pid, fuse/disk (nbdfuse file), loop (device name), mnt/.
# Needs root, FUSE, loop devices, nbdfuse (libnbd-bin) and the ferry binary
# ($FERRY_BIN, else target/debug/ferry).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
ferry=${FERRY_BIN:-$root/target/debug/ferry}

wait_for() { # wait_for SECONDS TEST...
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.05
    done
}

up() {
    local dir=$1; shift
    local size=512M fs=ext4 ring=16M extra=() disk="" vmdk=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --size) size=$2; shift 2 ;;
            --fs) fs=$2; shift 2 ;;
            --ring-size) ring=$2; shift 2 ;;
            --disk) disk=$2; shift 2 ;;
            --vmdk) vmdk=$2; shift 2 ;;
            --) shift; extra=("$@"); break ;;
            *) echo "unknown option $1" >&2; exit 2 ;;
        esac
    done
    mkdir -p "$dir/mnt" "$dir/fuse"
    dir=$(cd "$dir" && pwd)
    if [ -n "$vmdk" ]; then
        mkdir -p "$dir/vmdk"
        qemu-nbd --fork --persistent --pid-file="$dir/qemu-nbd.pid" --socket="$dir/qemu.sock" \
            -f vmdk "$vmdk" </dev/null >>"$dir/qemu-nbd.log" 2>&1
        nbdfuse -P "$dir/vmdk-nbdfuse.pid" "$dir/vmdk/disk" "nbd+unix:///?socket=$dir/qemu.sock" \
            </dev/null >>"$dir/nbdfuse.log" 2>&1 &
        wait_for 20 test -s "$dir/vmdk-nbdfuse.pid" || { echo "nbdfuse (vmdk) did not start" >&2; exit 1; }
        wait_for 20 test -f "$dir/vmdk/disk" || { echo "nbdfuse (vmdk) file missing" >&2; exit 1; }
        disk=$dir/vmdk/disk
    fi
    if [ -z "$disk" ]; then
        disk=$dir/disk.img
        [ -f "$disk" ] || truncate -s "$size" "$disk"
    fi
    FERRY_LOG=${FERRY_LOG:-info} "$ferry" filter --disk "data=$disk" --listen "unix:$dir/nbd.sock" \
        --state "$dir/state" --ring-size "$ring" "${extra[@]}" </dev/null >>"$dir/filter.log" 2>&1 &
    echo $! >"$dir/filter.pid"
    wait_for 20 test -S "$dir/nbd.sock" || { echo "filter did not start:" >&2; tail "$dir/filter.log" >&2; exit 1; }
    nbdfuse -P "$dir/nbdfuse.pid" "$dir/fuse/disk" "nbd+unix:///data?socket=$dir/nbd.sock" \
        </dev/null >>"$dir/nbdfuse.log" 2>&1 &
    wait_for 20 test -s "$dir/nbdfuse.pid" || { echo "nbdfuse did not start" >&2; exit 1; }
    wait_for 20 test -f "$dir/fuse/disk" || { echo "nbdfuse file missing" >&2; exit 1; }
    losetup --find --show --direct-io=off "$dir/fuse/disk" >"$dir/loop"
    local loop; loop=$(cat "$dir/loop")
    case "$fs" in
        ext4) mkfs.ext4 -q -F "$loop" ;;
        xfs) mkfs.xfs -q -f "$loop" ;;
        none) return 0 ;;
        existing) ;;
        *) echo "unknown file system $fs" >&2; exit 2 ;;
    esac
    mount "$loop" "$dir/mnt"
}

down() {
    local dir=$1
    [ -d "$dir" ] || return 0
    if mountpoint -q "$dir/mnt" 2>/dev/null; then
        umount "$dir/mnt" || umount -l "$dir/mnt" || true
    fi
    if [ -s "$dir/loop" ]; then
        losetup -d "$(cat "$dir/loop")" 2>/dev/null || true
        rm -f "$dir/loop"
    fi
    drop_fuse "$dir/fuse" "$dir/nbdfuse.pid"
    stop_pid "$dir/filter.pid"
    # The VMDK's layers last: the filter flushed into them on its way out.
    drop_fuse "$dir/vmdk" "$dir/vmdk-nbdfuse.pid"
    stop_pid "$dir/qemu-nbd.pid"
}

drop_fuse() { # drop_fuse MOUNTPOINT PIDFILE: unmount an nbdfuse mount, end its process
    if mountpoint -q "$1" 2>/dev/null; then
        umount "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || true
    fi
    if [ -s "$2" ]; then
        kill "$(cat "$2")" 2>/dev/null || true
        rm -f "$2"
    fi
}

stop_pid() { # stop_pid PIDFILE: SIGTERM, wait up to 30 s, then SIGKILL
    [ -s "$1" ] || return 0
    local pid; pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || true
    wait_for 30 bash -c "! kill -0 $pid 2>/dev/null" || kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    down) shift; down "$@" ;;
    *) echo "usage: $0 up|down DIR [options]" >&2; exit 2 ;;
esac
