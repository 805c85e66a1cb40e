#!/usr/bin/env bash
# Failover cost: materialize a SIZE disk at a point taken before CHURN of it
# was rewritten ("10 minutes back after 10 % churn"), side by side with
# `qemu-img convert` of the whole replica, in the same run on the same files.
#
#   1. A blank SIZE disk protected by `ferry filter`, shipped by `ferry
#      sidecar` to `ferry target` on loopback; filled with random data
#      through NBD (nbdcopy); point "before-churn" once all is applied.
#   2. CHURN percent of the disk rewritten with random 1 MiB writes at random
#      offsets; point "now" once all is applied.
#   3. Timed, each from a cold page cache of the outputs (the replica stays
#      cached, as on a target that just applied it):
#        ferry failover --point before-churn --format vhd-dynamic   (copy + rewind)
#        ferry failover ... --format raw                             (copy + rewind + convert)
#        ferry failover ... (vhd-dynamic) with the manifest's SHA-256
#        qemu-img convert -O vpc  replica.vhd   (default cache: never syncs)
#        qemu-img convert -O vpc -t writeback   (syncs at the end, as ferry does)
#        qemu-img convert -O raw  replica.vhd
#      The ferry images are checked against the disk as it was at the point
#      (a copy taken then) with qemu-img compare.
# Figures are printed, never asserted.
#
# Usage: scripts/bench/failover.sh [WORKDIR] [SIZE] [CHURN_PERCENT]
#   defaults: /tmp/ferry-bench-failover 4G 10. Needs about 7 x SIZE of free
#   space in WORKDIR. FERRY_BIN: use this ferry binary instead of building
#   target/release/ferry. BENCH_FS=xfs: run everything on an XFS file system
#   with reflinks (a sparse image loop-mounted at WORKDIR), where a failover
#   shares the replica's blocks instead of copying them.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=${1:-/tmp/ferry-bench-failover}
size=${2:-4G}
churn=${3:-10}
for t in nbdcopy qemu-img qemu-io python3 jq; do
    command -v "$t" >/dev/null || { echo "$t is required" >&2; exit 1; }
done
. "$root/scripts/bench/lib.sh"
bench_ferry
umount "$work" 2>/dev/null || true
rm -rf "$work" "$work.xfs"
mkdir -p "$work"
work=$(cd "$work" && pwd)
if [ "${BENCH_FS:-}" = xfs ]; then
    truncate -s "$(( $(numfmt --from=iec "$size") * 8 ))" "$work.xfs"
    mkfs.xfs -q -m reflink=1 "$work.xfs"
    mount -o loop "$work.xfs" "$work"
fi
bytes=$(numfmt --from=iec "$size")
mib=$((bytes >> 20))

cleanup() {
    stop_all
    if [ "${BENCH_FS:-}" = xfs ]; then umount "$work" 2>/dev/null || true; rm -f "$work.xfs"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }
wait_for() { # SECONDS DESCRIPTION TEST...
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || { echo "timed out: $what" >&2; tail -5 "$work"/*.log >&2; exit 1; }
        sleep 0.2
    done
}
status() { "$ferry" target status --data "$work/site" --json 2>/dev/null | jq -c '.disks[0] // empty'; }
caught_up() { # the filter has nothing unshipped and the target applied all it received
    local f t
    f=$("$ferry" filter status --state "$work/filter" --json 2>/dev/null | jq -c '.disks[0]') || return 1
    t=$(status) || return 1
    [ -n "$t" ] || return 1
    [ "$(jq -r '.lag_records' <<<"$f")" = 0 ] && [ "$(jq -r '.dirty_bytes' <<<"$f")" = 0 ] &&
        [ "$(jq -r '.tracking' <<<"$f")" = data ] &&
        [ "$(jq -r '.apply_backlog_sets' <<<"$t")" = 0 ] &&
        [ "$(jq -r '.applied_seq == .received_seq' <<<"$t")" = true ] &&
        [ "$(jq -r '.consistency.state' <<<"$t")" = consistent ]
}
has_point() { "$ferry" points web01 --data "$work/site" --json | jq -e --arg n "$1" 'any(.[]; .name == $n)' >/dev/null; }

echo "== setup: $size disk, $churn % churn, in $work ($(stat -f -c %T "$work"))"
"$ferry" credentials init "$work/creds" --host web01 >/dev/null
truncate -s "$size" "$work/disk.img"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$ferry" target --data "$work/site" --listen "127.0.0.1:$port" --credentials "$work/creds" >"$work/target.log" 2>&1 &
pids+=($!)
"$ferry" filter --disk "data=$work/disk.img" --listen "unix:$work/nbd.sock" --state "$work/filter" >"$work/filter.log" 2>&1 &
pids+=($!)
wait_for 30 "filter socket" test -S "$work/nbd.sock"
"$ferry" sidecar --state "$work/filter" --target "127.0.0.1:$port" --credentials "$work/creds" >"$work/sidecar.log" 2>&1 &
pids+=($!)
uri="nbd+unix:///data?socket=$work/nbd.sock"

echo "== fill: $size of random data through the filter"
head -c "$bytes" /dev/urandom >"$work/fill.bin"
t0=$(now)
nbdcopy --flush "$work/fill.bin" "$uri"
rm -f "$work/fill.bin"
wait_for 1800 "initial replication" caught_up
echo "   replicated in $(secs "$t0" "$(now)") s"
"$ferry" filter tag before-churn --state "$work/filter" >/dev/null
wait_for 120 "point before-churn" has_point before-churn
cp --sparse=always "$work/disk.img" "$work/at-point.raw"

echo "== churn: $churn % of the disk in random 1 MiB writes"
writes=$((mib * churn / 100))
head -c $((1 << 20)) /dev/urandom >"$work/chunk.bin"
python3 - "$mib" "$writes" "$work/chunk.bin" >"$work/churn.cmds" <<'PY'
import random, sys
mib, n, src = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = random.Random(7)
for off in rng.sample(range(mib), n):
    # a different byte pattern per write: rotate the source by the offset
    print(f"write -s {src} {off}M 1M" if off % 2 else f"write -P {off % 251 + 1} {off}M 1M")
PY
t0=$(now)
args=()
while read -r c; do args+=(-c "$c"); done <"$work/churn.cmds"
qemu-io -f raw "$uri" "${args[@]}" >/dev/null
wait_for 1800 "churn replication" caught_up
echo "   $writes MiB rewritten and replicated in $(secs "$t0" "$(now)") s"
"$ferry" filter tag now --state "$work/filter" >/dev/null
wait_for 120 "point now" has_point now
st=$(status)
replica=$(jq -r '.replica_path' <<<"$st")
echo "   history kept: $(jq -r '.undo_bytes' <<<"$st") undo bytes, $(jq -r '.journal_bytes' <<<"$st") journal bytes"

drop_outputs() { rm -rf "$work/out" "$work/q.vhd" "$work/q.raw"; sync; echo 1 >/proc/sys/vm/drop_caches 2>/dev/null || true; cat "$replica" >/dev/null; }
run_timed() { # NAME COMMAND...: prints the seconds
    local name=$1 t0 t1
    shift
    t0=$(now)
    "$@" >"$work/$name.out" 2>&1 || { echo "$name failed:" >&2; cat "$work/$name.out" >&2; exit 1; }
    t1=$(now)
    secs "$t0" "$t1"
}
fo() { "$ferry" failover web01 --data "$work/site" --point before-churn --out "$work/out" "$@"; }

echo "== failover at before-churn (replication of web01 stops here)"
drop_outputs
t_vhd=$(run_timed fo-vhd fo --format vhd-dynamic --no-checksum)
qemu-img compare -q -f raw -F vpc "$work/at-point.raw" "$work/out/data.vhd" && ok_vhd=identical || ok_vhd=DIFFERENT
rewound=$(jq -r '.disks[0].rewound_bytes' "$work/out/manifest.json")
method=$(jq -r '.disks[0].copy' "$work/out/manifest.json")
drop_outputs
t_vhd_sum=$(run_timed fo-vhd-sum fo --format vhd-dynamic --change-point)
drop_outputs
t_raw=$(run_timed fo-raw fo --format raw --no-checksum --change-point)
qemu-img compare -q -f raw -F raw "$work/at-point.raw" "$work/out/data.img" && ok_raw=identical || ok_raw=DIFFERENT
drop_outputs
t_q=$(run_timed q-vhd qemu-img convert -f vpc -O vpc -o subformat=dynamic "$replica" "$work/q.vhd")
drop_outputs
t_qwb=$(run_timed q-vhd-wb qemu-img convert -t writeback -f vpc -O vpc -o subformat=dynamic "$replica" "$work/q.vhd")
drop_outputs
t_qraw=$(run_timed q-raw qemu-img convert -f vpc -O raw "$replica" "$work/q.raw")
drop_outputs

ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }
echo
echo "materialize a $size disk at a point before $churn % churn ($rewound bytes rewound, replica $method)"
printf '%-52s %8s %8s\n' "what" "seconds" "vs qemu"
printf '%-52s %8s %8s\n' "ferry failover --format vhd-dynamic ($ok_vhd)" "$t_vhd" "$(ratio "$t_vhd" "$t_q")"
printf '%-52s %8s %8s\n' "ferry failover --format vhd-dynamic + sha256" "$t_vhd_sum" "$(ratio "$t_vhd_sum" "$t_q")"
printf '%-52s %8s %8s\n' "ferry failover --format raw ($ok_raw)" "$t_raw" "$(ratio "$t_raw" "$t_qraw")"
printf '%-52s %8s %8s\n' "qemu-img convert -O vpc (whole replica, no sync)" "$t_q" "1.00"
printf '%-52s %8s %8s\n' "qemu-img convert -O vpc -t writeback (synced)" "$t_qwb" "$(ratio "$t_qwb" "$t_q")"
printf '%-52s %8s %8s\n' "qemu-img convert -O raw (whole replica, no sync)" "$t_qraw" "1.00"
