#!/usr/bin/env bash
# fio through ferry filter as a real kernel block device (/dev/nbd0 over
# netlink), next to the same jobs on the raw virtio disk under it, in one
# VM run (scripts/rig/kernel-vm.sh: Debian's Linux 6.1 under qemu TCG, so
# absolute figures are an emulator's; the ratio is the point).
#
# Usage: scripts/bench/kernel-nbd.sh [OUTDIR]   (FERRY_BENCH_RUNTIME=SECS per job, default 10)
# Prints one line per job: "DEVICE JOB IOPS MiB/s".
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=scripts/bench/lib.sh
. "$root/scripts/bench/lib.sh"
bench_ferry
out=${1:-$(mktemp -d /tmp/ferry-bench-knbd.XXXXXX)}
mkdir -p "$out"
FERRY_BIN=$ferry "$root/scripts/rig/kernel-vm.sh" run --script "$root/scripts/bench/vm/kernel-nbd.sh" \
    --out "$out" --disk data=64M --bin fio --timeout 900 >"$out/run.log" 2>&1 ||
    { tail -n 40 "$out/run.log"; exit 1; }
echo "device job IOPS MiB/s  (qemu TCG, 1 vCPU; $(date -u +%F))"
grep -aE '^(virtio-raw|ferry-kernel-nbd) ' "$out/console.log"
