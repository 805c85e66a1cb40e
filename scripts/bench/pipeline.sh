#!/usr/bin/env bash
# End-to-end replication throughput: write SIZE_MB through `ferry filter` with
# a sidecar shipping to a `ferry target` on loopback (TLS, zstd, AES-256-GCM,
# durable journal, VHD replica), for three kinds of data:
#   incompressible  (urandom)
#   2:1             (each 4 KiB block: 2 KiB random, 2 KiB zeros)
#   mostly-zero     (one 4 KiB random block in every 16, the rest zeros)
# Each kind is written with nbdcopy (its default connections and request
# size, zero detection off so every byte is a WRITE, one flush at the end) from a prepared file into a blank protected
# disk, and timed from the start of the write until the target has received
# (durable journal) and applied (replica) every record, and the filter has no
# lag and nothing dirty. CPU is the utime+stime delta of filter + sidecar +
# target (/proc/PID/stat) over that interval.
#
# Side by side, in the same run, on the same files:
#   - the same write through the filter with no sidecar (the ring drained by
#     `ferry filter drain --follow`): the cost without replication;
#   - `zstd -1 -T1 -c FILE > /dev/null` (MiB/s and ratio);
#   - `openssl speed -evp aes-256-gcm -bytes 1048576 -seconds 3` (GB/s).
# The replica is compared with the source file at the end of every run.
# Figures are printed, never asserted.
#
# Usage: scripts/bench/pipeline.sh [WORKDIR] [SIZE_MB]
#   WORKDIR  default /tmp/ferry-bench-pipeline (data files are kept and
#            reused; everything else is recreated on each run; logs in
#            WORKDIR/logs)
#   SIZE_MB  default 1024
# Environment: FERRY_BIN (use this ferry binary instead of building
#   target/release/ferry with cargo), RING_SIZE (filter --ring-size, default: the filter's default),
#   KINDS (default "incompressible 2:1 mostly-zero"), TIMEOUT_S (per run, 600).
# Needs python3 and nbdcopy (or qemu-img); zstd, openssl and qemu-img are
# optional (their columns say n/a). Installs nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=${1:-/tmp/ferry-bench-pipeline}
size_mb=${2:-1024}
ring=${RING_SIZE:-}
kinds=${KINDS:-incompressible 2:1 mostly-zero}
timeout_s=${TIMEOUT_S:-600}
case $size_mb in '' | *[!0-9]*) echo "SIZE_MB must be a whole number of MiB" >&2; exit 2 ;; esac

# --- tools -------------------------------------------------------------------
missing=()
for t in python3 nbdcopy qemu-img zstd openssl; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
have() { command -v "$1" >/dev/null 2>&1; }
if ((${#missing[@]})); then echo "missing tools: ${missing[*]}" >&2; fi
have python3 || { echo "python3 is required" >&2; exit 1; }
have nbdcopy || have qemu-img || { echo "nbdcopy or qemu-img is required to write through NBD" >&2; exit 1; }
[ -n "${FERRY_BIN:-}" ] || have cargo || { echo "cargo is required (or set FERRY_BIN)" >&2; exit 1; }

mkdir -p "$work"
work=$(cd "$work" && pwd)
. "$root/scripts/bench/lib.sh"
bench_ferry
cleanup() { stop_all; }
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# --- helper (status polling, CPU accounting, data generation) ---------------
helper="$work/helper.py"
cat >"$helper" <<'PY'
import json, os, subprocess, sys, time

sys.path.insert(0, os.environ["BENCH_DIR"])
from ferry_status import status  # noqa: E402

def filter_status(state):
    s = status("filter", "status", "--state", state)
    if not s:
        return None
    d = s["disks"][0]
    return s["seq"], d

def target_disk(data):
    s = status("target", "status", "--data", data)
    if not s or not s.get("disks"):
        return None
    return s["disks"][0]

def cpu(pids):
    tck = os.sysconf("SC_CLK_TCK")
    out = []
    for p in pids:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / tck)
    print(" ".join(f"{c:.2f}" for c in out))

def gen(kind, mb, path):
    if os.path.exists(path) and os.path.getsize(path) == mb << 20:
        return
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for _ in range(mb):  # one MiB at a time
            if kind == "incompressible":
                f.write(os.urandom(1 << 20))
            elif kind == "2:1":
                r = os.urandom(512 << 10)
                f.write(b"".join(r[i * 2048:(i + 1) * 2048] + bytes(2048) for i in range(256)))
            elif kind == "mostly-zero":
                r = os.urandom(64 << 10)
                f.write(b"".join(r[i * 4096:(i + 1) * 4096] + bytes(60 << 10) for i in range(16)))
            else:
                sys.exit(f"unknown kind {kind}")
    os.replace(tmp, path)

def wait_ready(state, data, timeout):
    """Sidecar connected, target consistent and caught up with the filter."""
    end = time.time() + timeout
    while time.time() < end:
        f = filter_status(state)
        t = target_disk(data)
        if f and t:
            seq, d = f
            if (t.get("connected") and t["consistency"]["state"] == "consistent"
                    and (t.get("received_seq") or 0) >= seq and d["lag_records"] == 0
                    and d["dirty_bytes"] == 0 and d["claimed_bytes"] == 0):
                return
        time.sleep(0.1)
    sys.exit("timed out waiting for the sidecar to connect and the target to be consistent")

def settled(d):
    return d["lag_records"] == 0 and d["dirty_bytes"] == 0 and d["claimed_bytes"] == 0

def wait_done(state, data, t0, timeout):
    """Print 'RECEIVED APPLIED' seconds since t0: the target holds (then has
    applied) everything the filter recorded, and the filter is settled."""
    end = time.time() + timeout
    t_recv = None
    target_seq = None
    while time.time() < end:
        f = filter_status(state)
        if f is None:
            time.sleep(0.05)
            continue
        seq, d = f
        if t_recv is None:
            t = target_disk(data)
            if t and settled(d) and (t.get("received_seq") or 0) >= seq:
                t_recv = time.time() - t0
                target_seq = t["received_seq"]
        if t_recv is not None:
            t = target_disk(data)
            if t and (t.get("applied_seq") or 0) >= target_seq and t["apply_backlog_sets"] == 0:
                print(f"{t_recv:.3f} {time.time() - t0:.3f}")
                return
        time.sleep(0.05)
    sys.exit("timed out waiting for the target to receive and apply everything")

def wait_drained(state, t0, timeout):
    end = time.time() + timeout
    while time.time() < end:
        f = filter_status(state)
        if f and settled(f[1]):
            print(f"{time.time() - t0:.3f}")
            return
        time.sleep(0.05)
    sys.exit("timed out waiting for the drain to empty the ring")

def get(path_expr):
    """Read JSON on stdin, print space-separated values of dotted paths."""
    d = json.load(sys.stdin)
    vals = []
    for p in path_expr.split(","):
        v = d
        for k in p.split("."):
            v = v[int(k)] if k.isdigit() else v.get(k) if isinstance(v, dict) else None
            if v is None:
                break
        vals.append("null" if v is None else str(v))
    print(" ".join(vals))

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "cpu":
    cpu(args)
elif cmd == "gen":
    gen(args[0], int(args[1]), args[2])
elif cmd == "wait-ready":
    wait_ready(args[0], args[1], float(args[2]))
elif cmd == "wait-done":
    wait_done(args[0], args[1], float(args[2]), float(args[3]))
elif cmd == "wait-drained":
    wait_drained(args[0], float(args[1]), float(args[2]))
elif cmd == "get":
    get(args[0])
elif cmd == "free-port":
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
else:
    sys.exit(f"unknown helper command {cmd}")
PY
py() { python3 "$helper" "$@"; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }

# --- data files --------------------------------------------------------------
mkdir -p "$work/data" "$work/logs"
rm -f "$work"/logs/*.log
declare -A file
for k in $kinds; do
    f="$work/data/${k/:/to}-${size_mb}M.bin"
    if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" != $((size_mb << 20)) ]; then
        echo "making $f ($size_mb MiB, $k)..." >&2
    fi
    py gen "$k" "$size_mb" "$f"
    file[$k]=$f
done
sync # no writeback of freshly made data files during the timed runs

# --- references: zstd and openssl ------------------------------------------
declare -A zstd_mbps zstd_ratio
for k in $kinds; do
    if have zstd; then
        cat "${file[$k]}" >/dev/null # same page-cache state as the ferry runs
        t0=$(date +%s.%N)
        zstd -q -1 -T1 -c "${file[$k]}" >/dev/null
        t1=$(date +%s.%N)
        zstd_mbps[$k]=$(calc "$size_mb / ($t1 - $t0)" 0)
        zbytes=$(zstd -q -1 -T1 -c "${file[$k]}" | wc -c)
        zstd_ratio[$k]=$(calc "($size_mb * 1048576) / $zbytes" 2)
    else
        zstd_mbps[$k]=n/a; zstd_ratio[$k]=n/a
    fi
done
aes=n/a
if have openssl; then
    aes=$(openssl speed -evp aes-256-gcm -bytes 1048576 -seconds 3 2>/dev/null |
        awk 'toupper($1) == "AES-256-GCM" { v = $NF; sub(/k$/, "", v); printf "%.2f", v / 1e6 }')
    [ -n "$aes" ] || aes=n/a
fi

# --- one run -----------------------------------------------------------------
ring_args=()
[ -z "$ring" ] || ring_args=(--ring-size "$ring")
port=$(py free-port)

write_through() { # SRC SOCKET
    local uri="nbd+unix:///data?socket=$2"
    if have nbdcopy; then
        timeout "$timeout_s" nbdcopy --sparse=0 --flush "$1" "$uri"
    else
        timeout "$timeout_s" qemu-img convert -n -S 0 -t writeback -f raw -O raw "$1" "$uri"
    fi
}

# run KIND MODE: MODE "replicate" (filter+sidecar+target) or "drain" (filter
# + drain). Sets r_write r_recv r_applied r_cpu and r_cpu_split (CPU seconds
# of filter/target/sidecar, or filter/drain).
run() {
    local kind=$1 mode=$2 tag
    tag="${kind/:/to}-$mode"
    local run="$work/run" log="$work/logs/$tag"
    rm -rf "$run"
    mkdir -p "$run/state"
    truncate -s "${size_mb}M" "$run/disk.img"
    local mypids=()
    "$ferry" filter --disk "data=$run/disk.img" --listen "unix:$run/state/nbd.sock" --state "$run/state" \
        --no-initial-copy "${ring_args[@]}" >"$log-filter.log" 2>&1 &
    pids+=("$!"); mypids+=("$!")
    wait_sock "$run/state/nbd.sock"
    if [ "$mode" = replicate ]; then
        "$ferry" target --data "$run/site-b" --listen "127.0.0.1:$port" --credentials "$work/creds" \
            >"$log-target.log" 2>&1 &
        pids+=("$!"); mypids+=("$!")
        "$ferry" sidecar --state "$run/state" --target "127.0.0.1:$port" --credentials "$work/creds" \
            >"$log-sidecar.log" 2>&1 &
        pids+=("$!"); mypids+=("$!")
        export WATCH_PIDS="${mypids[*]}"
        py wait-ready "$run/state" "$run/site-b" 60
    else
        "$ferry" filter drain --follow --state "$run/state" >"$log-drain.log" 2>&1 &
        pids+=("$!"); mypids+=("$!")
        export WATCH_PIDS="${mypids[*]}"
    fi
    local c0 c1 t0 t1
    c0=$(py cpu "${mypids[@]}")
    t0=$(date +%s.%N)
    write_through "${file[$kind]}" "$run/state/nbd.sock" >"$log-write.log" 2>&1 ||
        { echo "the write through the filter failed ($kind, $mode):" >&2; cat "$log-write.log" >&2; exit 1; }
    t1=$(date +%s.%N)
    r_write=$(calc "$t1 - $t0" 3)
    if [ "$mode" = replicate ]; then
        read -r r_recv r_applied < <(py wait-done "$run/state" "$run/site-b" "$t0" "$timeout_s")
    else
        r_recv=$(py wait-drained "$run/state" "$t0" "$timeout_s")
        r_applied=$r_recv
    fi
    c1=$(py cpu "${mypids[@]}")
    r_cpu_split=$(awk -v a="$c0" -v b="$c1" 'BEGIN { n = split(a, x); split(b, y); for (i = 1; i <= n; i++) printf "%s%.1f", (i > 1 ? "/" : ""), y[i] - x[i] }')
    r_cpu=$(awk -v a="$c0" -v b="$c1" 'BEGIN { n = split(a, x); split(b, y); for (i = 1; i <= n; i++) s += y[i] - x[i]; printf "%.2f", s }')
    "$ferry" filter status --state "$run/state" --json >"$log-filter-status.json"
    if [ "$mode" = replicate ]; then
        sleep 1.2 # one metrics/progress period, so the counters below are final
        "$ferry" sidecar status --state "$run/state" --json >"$log-sidecar-status.json"
        "$ferry" target status --data "$run/site-b" --json >"$log-target-status.json"
    fi
    export WATCH_PIDS=
    local i # stop in reverse start order: sidecar/drain, target, filter
    for ((i = ${#mypids[@]} - 1; i >= 0; i--)); do stop_pid "${mypids[$i]}"; done
    pids=()
    if [ "$mode" = replicate ]; then
        # The figures mean nothing unless the replica holds the data.
        local replica="$run/site-b/hosts/web01/data/replica.vhd"
        if have qemu-img; then
            qemu-img compare -q -f raw -F vpc "${file[$kind]}" "$replica" ||
                { echo "replica differs from the source ($kind)" >&2; exit 1; }
        else
            "$ferry" image compare "${file[$kind]}" "$replica" >/dev/null ||
                { echo "replica differs from the source ($kind)" >&2; exit 1; }
        fi
    fi
}

rm -rf "$work/creds"
"$ferry" credentials init "$work/creds" --host web01 >"$work/logs/credentials.log" 2>&1

declare -A b_write b_done b_cpu w_write w_recv w_applied w_cpu w_split w_ratio w_extra
for k in $kinds; do
    echo "== $k: filter + drain (no replication)" >&2
    run "$k" drain
    b_write[$k]=$r_write; b_done[$k]=$r_recv; b_cpu[$k]=$r_cpu
    echo "== $k: filter + sidecar -> target" >&2
    run "$k" replicate
    w_write[$k]=$r_write; w_recv[$k]=$r_recv; w_applied[$k]=$r_applied; w_cpu[$k]=$r_cpu; w_split[$k]=$r_cpu_split
    tag="$work/logs/${k/:/to}-replicate"
    read -r raw shipped resync zero sets rsets < <(py get \
        disks.0.raw_bytes,disks.0.shipped_bytes,disks.0.resync_raw_bytes,disks.0.zero_bytes,disks.0.change_sets,disks.0.resync_sets \
        <"$tag-sidecar-status.json")
    w_ratio[$k]=$(calc "$raw / ($shipped > 0 ? $shipped : 1)" 2)
    read -r transitions mdrec < <(py get disks.0.transitions,disks.0.counters.metadata_records <"$tag-filter-status.json")
    w_extra[$k]="raw $(calc "$raw / 1048576" 0) MiB (resync $(calc "$resync / 1048576" 0), zero $(calc "$zero / 1048576" 0)) -> $(calc "$shipped / 1048576" 0) MiB sealed; $sets sets ($rsets resync); filter: $transitions state changes, $mdrec metadata records"
done

# --- report ------------------------------------------------------------------
writer=nbdcopy; have nbdcopy || writer="qemu-img convert"
cat <<EOT

ferry pipeline, $size_mb MiB per data kind, written with $writer into a blank protected disk,
filter ring ${ring:-default}; sidecar -> target over TLS on loopback; replica vhd-dynamic
($(nproc) cores, $(date -u +%F); MiB/s = MiB per wall second; "per core" = MiB per CPU second
of the ferry processes: filter+drain for the baseline, filter+sidecar+target replicated;
"CPU s f/t/s" = CPU seconds of filter / target / sidecar)
openssl speed -evp aes-256-gcm, 1 MiB blocks, 1 thread: $aes GB/s

| data           | zstd -1 -T1 | zstd  | baseline: filter+drain | replicated: write | received (durable) | applied (replica) | CPU s f/t/s   | per core | ferry |
|                | MiB/s       | ratio | MiB/s | per core       | MiB/s             | MiB/s              | MiB/s             |               | MiB/s    | ratio |
|----------------|-------------|-------|-------|----------------|-------------------|--------------------|-------------------|---------------|----------|-------|
EOT
for k in $kinds; do
    printf '| %-14s | %11s | %5s | %5s | %14s | %17s | %18s | %17s | %13s | %8s | %5s |\n' "$k" \
        "${zstd_mbps[$k]}" "${zstd_ratio[$k]}" \
        "$(calc "$size_mb / ${b_done[$k]}" 0)" "$(calc "$size_mb / (${b_cpu[$k]} > 0 ? ${b_cpu[$k]} : 0.01)" 0)" \
        "$(calc "$size_mb / ${w_write[$k]}" 0)" "$(calc "$size_mb / ${w_recv[$k]}" 0)" \
        "$(calc "$size_mb / ${w_applied[$k]}" 0)" "${w_split[$k]}" \
        "$(calc "$size_mb / (${w_cpu[$k]} > 0 ? ${w_cpu[$k]} : 0.01)" 0)" "${w_ratio[$k]}"
done
echo
echo "seconds from the start of the write: baseline written/drained; replicated written/received/applied"
for k in $kinds; do
    printf '  %-14s baseline %6.2f / %6.2f   replicated %6.2f / %6.2f / %6.2f   CPU baseline %.1f s, replicated %.1f s\n' \
        "$k" "${b_write[$k]}" "${b_done[$k]}" "${w_write[$k]}" "${w_recv[$k]}" "${w_applied[$k]}" "${b_cpu[$k]}" "${w_cpu[$k]}"
done
echo "sidecar counters:"
for k in $kinds; do printf '  %-14s %s\n' "$k" "${w_extra[$k]}"; done
echo "every replica compared equal to its source file; logs in $work/logs"
echo "WARN/ERROR lines in the daemon logs (none listed = none):"
for f in "$work"/logs/*.log; do
    n=$(sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -c -E ' (WARN|ERROR) ' || true)
    [ "$n" = 0 ] || echo "  $(basename "$f"): $n WARN/ERROR lines, first: $(sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -m1 -E ' (WARN|ERROR) ' | cut -c1-220)"
done
