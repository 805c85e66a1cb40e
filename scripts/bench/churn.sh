#!/usr/bin/env bash
# Sustainable churn: the highest fio write rate at which replication lag (the
# RPO) stays within LAG_LIMIT seconds at p99. One protected disk (blank, so
# --no-initial-copy), `ferry filter` -> `ferry sidecar` -> `ferry target` on
# loopback. For each rate in RATES (MiB/s), fio writes BS blocks (RW,
# IODEPTH, buffers refilled per I/O and COMPRESS_PCT % compressible) through
# the filter's NBD socket for DURATION_S seconds with --rate; every 0.5 s the
# script samples `ferry sidecar status --json` lag_seconds (what the sidecar
# reports, refreshed about once a second) and, as a cross-check,
# `ferry filter status --json` lag_seconds (the age of the oldest record not
# yet committed by the sidecar, computed when asked). After fio stops the
# script waits until the target holds everything (catch-up time) before the
# next step. A step passes when both p99s are <= LAG_LIMIT and the filter
# never fell back to its dirty bitmap. The ladder stops at the first step that
# fails, or when fio reaches less than 90 % of the asked rate.
# With DURATION_S small (10) p99 is close to the maximum: few samples.
# Figures are printed, never asserted. Logs and samples stay in WORKDIR.
#
# Usage: scripts/bench/churn.sh [WORKDIR] [DURATION_S]
#   WORKDIR     default /tmp/ferry-bench-churn (recreated on each run)
#   DURATION_S  default 60 (seconds of fio per rate)
# Environment: FERRY_BIN (use this ferry binary instead of building
#   target/release/ferry with cargo), RATES (default "25 50 100 200 400"), RW (randwrite; or write),
#   BS (64k), IODEPTH (8), DISK_MB (2048), COMPRESS_PCT (50), LAG_LIMIT (1),
#   RING_SIZE (filter --ring-size; default: the filter's), CATCHUP_S (300).
# Needs fio (with the nbd engine) and python3; qemu-img for the final replica
# check (else `ferry image compare`). Installs nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=${1:-/tmp/ferry-bench-churn}
duration=${2:-60}
rates=${RATES:-25 50 100 200 400}
rw=${RW:-randwrite}
bs=${BS:-64k}
iodepth=${IODEPTH:-8}
disk_mb=${DISK_MB:-2048}
compress_pct=${COMPRESS_PCT:-50}
lag_limit=${LAG_LIMIT:-1}
ring=${RING_SIZE:-}
catchup_s=${CATCHUP_S:-300}

have() { command -v "$1" >/dev/null 2>&1; }
missing=()
for t in fio python3 qemu-img; do have "$t" || missing+=("$t"); done
if ((${#missing[@]})); then echo "missing tools: ${missing[*]}" >&2; fi
have fio || { echo "fio is required" >&2; exit 1; }
have python3 || { echo "python3 is required" >&2; exit 1; }
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "this fio has no nbd engine" >&2; exit 1; }
[ -n "${FERRY_BIN:-}" ] || have cargo || { echo "cargo is required (or set FERRY_BIN)" >&2; exit 1; }

mkdir -p "$work"
work=$(cd "$work" && pwd)
. "$root/scripts/bench/lib.sh"
bench_ferry
cleanup() { stop_all; }
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_sock() { for _ in $(seq 200); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

helper="$work/helper.py"
rm -rf "$work/run" "$work/logs" "$work/creds"
mkdir -p "$work/run/state" "$work/logs"
cat >"$helper" <<'PY'
import json, os, subprocess, sys, time

sys.path.insert(0, os.environ["BENCH_DIR"])
from ferry_status import status  # noqa: E402

def filt(state):
    s = status("filter", "status", "--state", state)
    return (s["seq"], s["disks"][0]) if s else None

def target(data):
    s = status("target", "status", "--data", data)
    return s["disks"][0] if s and s.get("disks") else None

def settled(d):
    return d["lag_records"] == 0 and d["dirty_bytes"] == 0 and d["claimed_bytes"] == 0

def caught_up(state, data, need_consistent=False):
    f = filt(state)
    t = target(data)
    if not (f and t):
        return False
    seq, d = f
    ok = settled(d) and (t.get("received_seq") or 0) >= seq and t.get("connected")
    if need_consistent:
        ok = ok and t["consistency"]["state"] == "consistent"
    return ok

def wait(state, data, timeout, need_consistent):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if caught_up(state, data, need_consistent):
            print(f"{time.time() - t0:.2f}")
            return
        time.sleep(0.1)
    print("timeout")

def sample(state, duration, out):
    """Every 0.5 s for DURATION s: time, sidecar lag_seconds, filter
    lag_seconds, filter tracking state, dirty bytes, lag records."""
    t0 = time.time()
    k = 0
    with open(out, "w") as o:
        while True:
            now = time.time() - t0
            if now > duration:
                break
            sc = status("sidecar", "status", "--state", state)
            f = filt(state)
            sl = sc["disks"][0]["lag_seconds"] if sc and sc.get("disks") else -1
            if f:
                d = f[1]
                o.write(f"{now:.2f} {sl} {d['lag_seconds']} {d['tracking']} {d['dirty_bytes']} {d['lag_records']}\n")
            else:
                o.write(f"{now:.2f} {sl} -1 unknown 0 0\n")
            o.flush()
            k += 1
            time.sleep(max(0.0, t0 + 0.5 * k - time.time()))

def summary(path):
    """p99 (nearest rank) and max of both lag columns, max dirty bytes, states."""
    rows = [l.split() for l in open(path) if l.strip()]
    def p99(xs):
        xs = sorted(xs)
        return xs[max(0, -(-99 * len(xs) // 100) - 1)] if xs else -1
    sc = [float(r[1]) for r in rows]
    fl = [float(r[2]) for r in rows]
    states = sorted({r[3] for r in rows})
    dirty = max((int(r[4]) for r in rows), default=0)
    print(f"{p99(sc):.2f} {max(sc, default=-1):.2f} {p99(fl):.2f} {max(fl, default=-1):.2f} {dirty} {'+'.join(states) or '-'} {len(rows)}")

def fio_bw(path):
    t = open(path).read()
    w = json.loads(t[t.index("{"):])["jobs"][0]["write"]
    print(f"{w['bw_bytes'] / 1048576:.1f} {w['io_bytes']}")

def get(paths):
    d = json.load(sys.stdin)
    vals = []
    for p in paths.split(","):
        v = d
        for k in p.split("."):
            v = v[int(k)] if k.isdigit() else v.get(k) if isinstance(v, dict) else None
            if v is None:
                break
        vals.append("null" if v is None else str(v))
    print(" ".join(vals))

cmd, a = sys.argv[1], sys.argv[2:]
if cmd == "wait":
    wait(a[0], a[1], float(a[2]), a[3] == "consistent")
elif cmd == "sample":
    sample(a[0], float(a[1]), a[2])
elif cmd == "summary":
    summary(a[0])
elif cmd == "fio-bw":
    fio_bw(a[0])
elif cmd == "get":
    get(a[0])
elif cmd == "free-port":
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
PY
py() { python3 "$helper" "$@"; }
calc() { awk "BEGIN { printf \"%.${2:-1}f\", $1 }"; }

# --- the pipeline, once for the whole ladder ---------------------------------
run="$work/run" state="$work/run/state" data="$work/run/site-b" logs="$work/logs"
truncate -s "${disk_mb}M" "$run/disk.img"
"$ferry" credentials init "$work/creds" --host web01 >"$logs/credentials.log" 2>&1
port=$(py free-port)
ring_args=()
[ -z "$ring" ] || ring_args=(--ring-size "$ring")
"$ferry" filter --disk "data=$run/disk.img" --listen "unix:$state/nbd.sock" --state "$state" \
    --no-initial-copy "${ring_args[@]}" >"$logs/filter.log" 2>&1 &
pids+=("$!")
wait_sock "$state/nbd.sock"
"$ferry" target --data "$data" --listen "127.0.0.1:$port" --credentials "$work/creds" >"$logs/target.log" 2>&1 &
pids+=("$!")
"$ferry" sidecar --state "$state" --target "127.0.0.1:$port" --credentials "$work/creds" >"$logs/sidecar.log" 2>&1 &
pids+=("$!")
daemons=("${pids[@]}")
export WATCH_PIDS="${daemons[*]}"
r=$(py wait "$state" "$data" 60 consistent)
[ "$r" != timeout ] || { echo "the sidecar did not connect / the target is not consistent within 60 s" >&2; exit 1; }

uri="nbd+unix:///data?socket=$state/nbd.sock"
sidecar_bytes() { sleep 1.2; "$ferry" sidecar status --state "$state" --json | py get disks.0.raw_bytes,disks.0.shipped_bytes; }
read -r raw0 shipped0 < <(sidecar_bytes)

rows=()
stop_reason="all rates passed"
for rate in $rates; do
    echo "== $rate MiB/s for ${duration}s ($rw $bs QD$iodepth)" >&2
    samples="$logs/samples-${rate}.txt"
    py sample "$state" "$duration" "$samples" &
    sampler=$!; pids+=("$sampler")
    if ! timeout --kill-after=5 $((duration + 60)) fio --name=churn --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$iodepth" \
        --rate="${rate}m" --size="${disk_mb}m" --time_based --runtime="$duration" \
        --refill_buffers --buffer_compress_percentage="$compress_pct" --buffer_compress_chunk=4k \
        --verify_state_save=0 --output-format=json >"$logs/fio-${rate}.json" 2>"$logs/fio-${rate}.err"; then
        echo "fio failed at $rate MiB/s:" >&2; cat "$logs/fio-${rate}.err" >&2; exit 1
    fi
    wait "$sampler" 2>/dev/null || true
    unset 'pids[-1]'
    for p in "${daemons[@]}"; do
        kill -0 "$p" 2>/dev/null || { echo "a ferry daemon (pid $p) exited during the $rate MiB/s step; see $logs" >&2; exit 1; }
    done
    catchup=$(py wait "$state" "$data" "$catchup_s" any)
    read -r raw1 shipped1 < <(sidecar_bytes)
    read -r achieved _ < <(py fio-bw "$logs/fio-${rate}.json")
    read -r sp99 smax fp99 fmax dirty states n < <(py summary "$samples")
    shipped_mb=$(calc "($shipped1 - $shipped0) / 1048576" 0)
    ratio=$(calc "($raw1 - $raw0) / (($shipped1 - $shipped0) > 0 ? ($shipped1 - $shipped0) : 1)" 2)
    raw0=$raw1; shipped0=$shipped1
    verdict=pass
    if [ "$catchup" = timeout ]; then verdict="FAIL (no catch-up in ${catchup_s}s)"
    elif awk -v a="$sp99" -v b="$fp99" -v l="$lag_limit" 'BEGIN { exit !(a > l || b > l || a < 0 || b < 0) }'; then verdict="FAIL (p99 > ${lag_limit}s)"
    elif [ "$dirty" != 0 ]; then verdict="FAIL (ring overflow to bitmap)"
    fi
    fio_short=no
    if awk -v a="$achieved" -v r="$rate" 'BEGIN { exit !(a < 0.9 * r) }'; then fio_short=yes; fi
    rows+=("$(printf '| %8s | %9s | %8s | %8s | %8s | %8s | %9s | %7s | %6s | %-18s | %s' \
        "$rate" "$achieved" "$sp99" "$smax" "$fp99" "$fmax" "$shipped_mb" "$ratio" "$catchup" "$states" "$verdict")")
    if [ "$verdict" != pass ]; then stop_reason="stopped at $rate MiB/s: $verdict"; break; fi
    if [ "$fio_short" = yes ]; then stop_reason="stopped at $rate MiB/s: fio reached only $achieved MiB/s (< 90 %)"; break; fi
done

# --- the replica must equal the protected disk ------------------------------
cleanup
replica="$data/hosts/web01/data/replica.vhd"
if printf '%s\n' "${rows[@]}" | grep -q "no catch-up"; then
    check="replica not compared: the target never caught up"
elif have qemu-img; then
    qemu-img compare -q -f raw -F vpc "$run/disk.img" "$replica" && check="replica == protected disk (qemu-img compare)" ||
        check="REPLICA DIFFERS from the protected disk (qemu-img compare)"
else
    "$ferry" image compare "$run/disk.img" "$replica" >/dev/null && check="replica == protected disk (ferry image compare)" ||
        check="REPLICA DIFFERS from the protected disk (ferry image compare)"
fi

best=none
for row in "${rows[@]}"; do
    case $row in *"| pass") best=$(echo "$row" | awk -F'|' '{ gsub(/ /, "", $2); print $2 }') ;; esac
done
cat <<EOT

ferry churn ladder: fio $rw $bs QD$iodepth --rate, ${duration}s per rate, ${disk_mb} MiB disk,
buffers refilled per I/O, ${compress_pct}% compressible; filter ring ${ring:-default};
sidecar -> target over TLS on loopback ($(nproc) cores, $(date -u +%F)).
Lag sampled every 0.5 s: "sidecar" = \`ferry sidecar status\` lag_seconds, "filter" =
\`ferry filter status\` lag_seconds; p99 by nearest rank; catch-up = seconds after fio
ended until the target held everything. Pass: both p99 <= ${lag_limit}s, no bitmap fallback.

| rate     | fio       | sidecar  | sidecar  | filter   | filter   | shipped   | ratio   | catch- | filter tracking    | verdict
| MiB/s    | MiB/s     | p99 lag  | max lag  | p99 lag  | max lag  | MiB       |         | up s   | states seen        |
|----------|-----------|----------|----------|----------|----------|-----------|---------|--------|--------------------|--------
EOT
printf '%s\n' "${rows[@]}"
echo
echo "highest rate with p99 lag <= ${lag_limit}s: $best MiB/s ($stop_reason)"
echo "$check"
echo "WARN/ERROR lines in the daemon logs (none listed = none):"
for f in "$logs"/*.log; do
    n=$(sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -c -E ' (WARN|ERROR) ' || true)
    [ "$n" = 0 ] || echo "  $(basename "$f"): $n WARN/ERROR lines, first: $(sed 's/\x1b\[[0-9;]*m//g' "$f" | grep -m1 -E ' (WARN|ERROR) ' | cut -c1-220)"
done
echo "logs, fio JSON and lag samples in $logs"
