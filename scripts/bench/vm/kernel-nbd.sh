#!/bin/sh
# Inside the real-kernel VM (run by scripts/bench/kernel-nbd.sh): fio on the
# raw virtio disk, then the same jobs on /dev/nbd0 served by ferry filter
# from that disk (the kernel's own NBD client, attached over netlink).
set -eu
# shellcheck source=scripts/rig/vm-tests/lib.sh # the guest has it at /test-lib.sh
. /test-lib.sh
runtime=${FERRY_BENCH_RUNTIME:-10}

job() { # job DEVICE NAME RW BS DEPTH: one fio job, prints "NAME IOPS MiB/s"
    # terse v3: read bandwidth (KiB/s) and IOPS are fields 7 and 8, write 48 and 49
    fio --name="$2" --filename="$1" --rw="$3" --bs="$4" --iodepth="$5" \
        --ioengine=libaio --direct=1 --size=48M --runtime="$runtime" --time_based \
        --output-format=terse --terse-version=3 2>/dev/null |
        awk -F';' -v name="$2" '{ printf "%s %d %.1f\n", name, $8 + $49, ($7 + $48) / 1024 }'
}
jobs() { # jobs DEVICE LABEL
    for spec in "randwrite-4k randwrite 4k 16" "write-1M write 1M 4" "randread-4k randread 4k 16"; do
        # shellcheck disable=SC2086 # the spec's words are job arguments
        set -- "$1" "$2" $spec
        printf '%s ' "$2"
        job "$1" "$3" "$4" "$5" "$6"
    done
}

jobs /dev/vda virtio-raw
ferry filter --disk data=/dev/vda --nbd-device data=/dev/nbd0 --state /run/ferry/bench \
    --ring-size 64M >/tmp/filter.log 2>&1 &
attached() { grep -q '"nbd_device"' /run/ferry/bench/filter.json 2>/dev/null; }
wait_for 60 attached || { cat /tmp/filter.log; exit 1; }
jobs /dev/nbd0 ferry-kernel-nbd
kill -TERM %1
wait
