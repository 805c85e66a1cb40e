#!/usr/bin/env bash
# Install the Debian packages ferry's build, demo and tests use. Idempotent;
# needs root (CI and the build machines run as root).
#
# qemu: the machines come with qemu-utils 10 from bookworm-backports;
# bookworm's own qemu-system-x86 (7.2) would replace it with 7.2, so on
# bookworm both come from bookworm-backports, at the same version.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(libnbd-bin nbdkit fio xfsprogs e2fsprogs util-linux python3-libnbd
    # the real-kernel rig (scripts/rig/kernel-vm.sh) and the install tests
    busybox-static xz-utils dmsetup systemd)
qemu=(qemu-utils qemu-system-x86)
qemu_release=()
# shellcheck source=/dev/null
if [ "$(. /etc/os-release && echo "${VERSION_CODENAME:-}")" = bookworm ]; then
    list=/etc/apt/sources.list.d/ferry-bookworm-backports.list
    grep -qs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/* ||
        echo "deb http://deb.debian.org/debian bookworm-backports main" >"$list"
    qemu_release=(-t bookworm-backports)
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
apt-get install -y -qq --no-install-recommends "${qemu_release[@]}" "${qemu[@]}" >/dev/null
command -v cargo >/dev/null || { echo "cargo (Rust toolchain) is required" >&2; exit 1; }
