#!/usr/bin/env bash
# Benchmark `ferry filter` (tracking on, a consumer draining and committing)
# against `nbdkit file` and `qemu-nbd` on the same backing file, in one run,
# with fio's nbd engine: 4 KiB random writes at QD16 and 1 MiB sequential
# writes. Prints a table with IOPS, MB/s, the ratio to qemu-nbd, and the
# filter's peak RSS.
#
# Usage: scripts/bench/filter.sh [WORKDIR] [SECONDS] [RING_SIZE]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=${1:-$(mktemp -d /tmp/ferry-bench-filter.XXXXXX)}
seconds=${2:-15}
ring=${3:-64M}
mkdir -p "$work"
work=$(cd "$work" && pwd)
cargo build --release --locked -p ferry >/dev/null 2>&1 || cargo build --release --locked -p ferry
ferry="$root/target/release/ferry"
disk="$work/disk.img"
rm -f "$disk" "$work"/*.sock
fallocate -l 2G "$disk"

pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# fio_run URI RW BS QD -> "IOPS MBPS"
fio_run() {
    local out="$work/fio.json"
    if ! fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --size=1G --time_based --runtime="$seconds" --ramp_time=2 --output-format=json >"$out" 2>"$work/fio.err"; then
        echo "fio failed against $1:" >&2; cat "$work/fio.err" >&2; exit 1
    fi
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); w=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print(round(w["iops"]), round(w["bw_bytes"]/1e6, 1))' "$out"
}

declare -A iops mbps
run_server() { # NAME URI
    read -r i m < <(fio_run "$2" randwrite 4k 16)
    iops[$1.rand]=$i; mbps[$1.rand]=$m
    read -r i m < <(fio_run "$2" write 1M 4)
    iops[$1.seq]=$i; mbps[$1.seq]=$m
}

# ferry filter + a draining consumer
rm -rf "$work/state" "$work/ferry.sock"
"$ferry" filter --disk "data=$disk" --listen "unix:$work/ferry.sock" --state "$work/state" \
    --ring-size "$ring" 2>"$work/filter.log" &
filter_pid=$!; pids+=("$filter_pid")
wait_sock "$work/ferry.sock"
"$ferry" filter drain --follow --state "$work/state" 2>"$work/drain.log" &
pids+=("$!")
run_server ferry "nbd+unix:///data?socket=$work/ferry.sock"
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$filter_pid/status")
status_json=$("$ferry" filter status --json --state "$work/state")
kill "$filter_pid"; wait "$filter_pid" 2>/dev/null || true

# nbdkit file
nbdkit -f -U "$work/nbdkit.sock" file "$disk" &
pids+=("$!")
wait_sock "$work/nbdkit.sock"
run_server nbdkit "nbd+unix:///?socket=$work/nbdkit.sock"
kill "${pids[-1]}"

# qemu-nbd
qemu-nbd -t -f raw -k "$work/qemu.sock" -x data "$disk" &
pids+=("$!")
wait_sock "$work/qemu.sock"
run_server qemu-nbd "nbd+unix:///data?socket=$work/qemu.sock"
kill "${pids[-1]}"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
cat <<EOT
fio nbd engine, ${seconds}s per row after 2s ramp, 2 GiB backing file ($(nproc) cores, $(date -u +%F))
ferry filter: ring ${ring}, tracking on, \`ferry filter drain --follow\` committing

| workload              | ferry IOPS | ferry MB/s | nbdkit IOPS | nbdkit MB/s | qemu-nbd IOPS | qemu-nbd MB/s | ferry/qemu-nbd |
|-----------------------|------------|------------|-------------|-------------|---------------|---------------|----------------|
| 4k randwrite QD16     | ${iops[ferry.rand]} | ${mbps[ferry.rand]} | ${iops[nbdkit.rand]} | ${mbps[nbdkit.rand]} | ${iops[qemu-nbd.rand]} | ${mbps[qemu-nbd.rand]} | $(ratio "${iops[ferry.rand]}" "${iops[qemu-nbd.rand]}") |
| 1M write QD4          | ${iops[ferry.seq]} | ${mbps[ferry.seq]} | ${iops[nbdkit.seq]} | ${mbps[nbdkit.seq]} | ${iops[qemu-nbd.seq]} | ${mbps[qemu-nbd.seq]} | $(ratio "${mbps[ferry.seq]}" "${mbps[qemu-nbd.seq]}") |

ferry filter peak RSS: $((rss_kb / 1024)) MiB (ring payload ${ring} + record slots)
EOT
echo "$status_json" | python3 -c '
import json, sys
d = json.load(sys.stdin)["disks"][0]
c = d["counters"]
print("ferry tracking at the end:", d["tracking"], "|", c["data_records"], "data records,",
      c["metadata_records"], "metadata records,", c["bitmap_writes"], "bitmap writes,", c["al_syncs"], "AL syncs")'
