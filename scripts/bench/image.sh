#!/usr/bin/env bash
# Benchmark `ferry image convert` against `qemu-img convert`, side by side in
# one run, on a 2 GiB image half full of random data (1 MiB random extents at
# every other MiB, the rest holes).
#
# Usage: scripts/bench/image.sh [WORKDIR] [ROUNDS]
# Prints a table: best-of-ROUNDS wall seconds for each tool and the ratio
# ferry/qemu-img (below 1.0 means ferry is faster). ferry always makes its
# output durable (fdatasync) before it exits; qemu-img convert's default
# destination cache is "unsafe" (no flush at all), so it is run twice: with
# `-t writeback` (flushes on close: the like-for-like column the ratio uses)
# and with its default (shown for reference).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
work=${1:-$(mktemp -d /tmp/ferry-bench-image.XXXXXX)}
rounds=${2:-5}
mkdir -p "$work"
cargo build --release --locked -p ferry >/dev/null 2>&1 || cargo build --release --locked -p ferry
ferry="$root/target/release/ferry"

src="$work/src.raw"
if [ ! -f "$src" ]; then
    echo "making $src (2 GiB, 1 GiB of random data)..." >&2
    truncate -s 2G "$src"
    head -c 1G /dev/urandom > "$work/random.bin"
    for i in $(seq 0 1023); do
        dd if="$work/random.bin" of="$src" bs=1M skip="$i" seek=$((2 * i)) count=1 conv=notrunc status=none
    done
    rm -f "$work/random.bin"
fi

# best_of CMD...: run the command ROUNDS times (removing its output first), print the best time.
best_of() {
    local out=$1; shift
    local best=
    for _ in $(seq "$rounds"); do
        rm -f "$out" "${out%.vmdk}-flat.vmdk"
        local t0 t1 t
        t0=$(date +%s.%N)
        "$@" >/dev/null 2>&1
        t1=$(date +%s.%N)
        t=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
        if [ -z "$best" ] || awk -v t="$t" -v b="$best" 'BEGIN { exit !(t < b) }'; then best=$t; fi
    done
    printf '%.2f' "$best"
}

# row NAME FERRY_OUT QEMU_OUT FERRY_CMD... -- QEMU_CMD...
# (QEMU_CMD is given without -t; the row runs it with -t writeback and without.)
row() {
    local name=$1 ferry_out=$2 qemu_out=$3; shift 3
    local ferry_cmd=() qemu_args=()
    while [ "$1" != "--" ]; do ferry_cmd+=("$1"); shift; done
    shift
    qemu_args=("${@:3}")
    local f q u
    f=$(best_of "$ferry_out" "${ferry_cmd[@]}")
    q=$(best_of "$qemu_out" qemu-img convert -t writeback "${qemu_args[@]}")
    u=$(best_of "$qemu_out" qemu-img convert "${qemu_args[@]}")
    printf '| %-20s | %9s | %12s | %6.2f | %13s |\n' "$name" "$f" "$q" \
        "$(awk -v f="$f" -v q="$q" 'BEGIN { print f / q }')" "$u"
}

cat <<EOT
ferry image convert vs qemu-img convert, 2 GiB source with 1 GiB random data,
best of $rounds rounds, wall seconds ($(nproc) cores, $(date -u +%F))

| conversion           | ferry (s) | qemu-img (s) | ratio | qemu-img (s)  |
|                      | (durable) | -t writeback |       | default: no   |
|                      |           | (durable)    |       | flush at all  |
|----------------------|-----------|--------------|-------|---------------|
EOT
row "raw -> vhd-dynamic" "$work/f.vhd" "$work/q.vhd" \
    "$ferry" image convert --format vhd-dynamic "$src" "$work/f.vhd" -- \
    qemu-img convert -f raw -O vpc "$src" "$work/q.vhd"
row "raw -> vmdk-stream" "$work/f.vmdk" "$work/q.vmdk" \
    "$ferry" image convert --format vmdk-stream "$src" "$work/f.vmdk" -- \
    qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$src" "$work/q.vmdk"
# Source for the last row: a dynamic VHD both tools read (made by qemu-img).
rm -f "$work/in.vhd"
qemu-img convert -f raw -O vpc "$src" "$work/in.vhd"
row "vhd-dynamic -> raw" "$work/f.raw" "$work/q.raw" \
    "$ferry" image convert --format raw "$work/in.vhd" "$work/f.raw" -- \
    qemu-img convert -f vpc -O raw "$work/in.vhd" "$work/q.raw"

# The outputs must agree with the source, or the figures mean nothing.
qemu-img compare -q -f raw -F vpc "$src" "$work/f.vhd"
qemu-img compare -q -f raw -F vmdk "$src" "$work/f.vmdk"
qemu-img compare -q -f raw -F raw "$src" "$work/f.raw"
echo "outputs verified with qemu-img compare; sizes on disk:"
du -h "$work"/f.vhd "$work"/q.vhd "$work"/f.vmdk "$work"/q.vmdk "$work"/f.raw "$work"/q.raw | sed 's/^/  /'
