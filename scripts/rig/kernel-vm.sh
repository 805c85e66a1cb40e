#!/usr/bin/env bash
# Boot a real Linux kernel (Debian bookworm's linux-image-amd64, 6.1) under qemu
# TCG with a tiny busybox initramfs, and run a test script inside it as root.
#
# Usage:
#   scripts/rig/kernel-vm.sh run --script FILE [--out DIR] [--disk NAME=SIZE]...
#       [--file SRC[:DST]]... [--bin PROG]... [--module NAME]... [--timeout SECS]
#       [--mem MIB] [--smp N] [--no-strip]
#   scripts/rig/kernel-vm.sh kernel   # fetch/extract the kernel into the cache, print its version
#
# run:
#   --script FILE    becomes /test.sh, run by `sh /test.sh` (cwd /, stdin /dev/null);
#                    scripts/rig/vm-tests/lib.sh is /test-lib.sh beside it
#   --out DIR        work dir (default: a new /tmp/ferry-vm.XXXXXX, printed): holds
#                    console.log, qemu.log, initramfs.cpio and the disk images
#   --disk NAME=SIZE OUT/NAME.img (raw, sparse; kept if it exists) as a virtio-blk
#                    disk with serial NAME, in the order given (/dev/vda, vdb...),
#                    also /dev/disk/by-id/virtio-NAME in the guest; read it back
#                    after the run
#   --file SRC[:DST] copy a file or directory to DST (default: SRC's absolute path)
#   --bin PROG       a program from PATH (or a path) and its shared libraries, at
#                    /usr/bin/NAME (ahead of busybox in the guest's PATH)
#   --module NAME    load a kernel module (and what it depends on) besides the
#                    defaults: virtio_pci virtio_blk crc32c_generic nbd (nbds_max=4)
#                    dm-mod dm-log-writes dm-era dm-flakey ext4
#   --timeout SECS   kill the VM after SECS (default 600)
#   --mem MIB        guest memory (default 1024)
#   --smp N          guest CPUs (default 1)
#   --no-strip       keep the ferry binary's debug info (default: objcopy
#                    --strip-debug when objcopy exists; the debug build is ~140 MB
#                    and would cost seconds to pack and unpack each boot)
# The guest has /bin/ferry ($FERRY_BIN, default target/debug/ferry; FERRY_BIN=none
# leaves it out), busybox, /dev/shm, /dev/mapper/control, lo up and
# DM_DISABLE_UDEV=1 (no udev). Exit status: the test script's, from the console
# line "FERRY-VM: exit N"; 125 if a module failed to load; 124 on timeout; 1 if
# the VM stopped without that line (panic, boot failure).
#
# The kernel is cached (apt-get download + dpkg-deb -x, never installed; plus a
# modules.dep from busybox depmod and the unpacked vmlinux) in
# ${FERRY_VM_CACHE:-/var/cache/ferry-vm}, once: later runs use $cache/current
# without apt (rm -rf the cache to move to a newer kernel). FERRY_VM_KERNEL_PKG
# pins the package (e.g. linux-image-6.1.0-56-amd64). Modules the kernel has
# built in (modules.builtin, i.e. =y in its config) are skipped, not loaded.
#
# Needs root (device nodes in the initramfs) and the Debian packages:
#   apt-get install --no-install-recommends qemu-system-x86 busybox-static xz-utils e2fsprogs dmsetup
# qemu-system-x86 depends on qemu-system-data (linuxboot_dma.bin, pvh.bin),
# seabios (bios-256k.bin) and ipxe-qemu, so no recommends are needed. xz-utils
# unpacks vmlinux for the fast PVH boot (without it: the bzImage, ~3 s slower).
# Besides: apt-get, dpkg-deb, ldd, timeout, flock (all in a base Debian) and,
# optional, objcopy (binutils). No KVM: always TCG.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
here=$root/scripts/rig
cache=${FERRY_VM_CACHE:-/var/cache/ferry-vm}
# crc32c_generic: ext4, jbd2 and libcrc32c only soft-depend on it ("crypto-crc32c"),
# which modules.dep does not list and busybox insmod does not follow.
default_modules=(virtio_pci virtio_blk crc32c_generic nbd dm-mod dm-log-writes dm-era dm-flakey ext4)
declare -A module_params=([nbd]="nbds_max=4")

say() { echo "kernel-vm: $*" >&2; }
die() { say "$*"; exit 1; }
now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# --- kernel -------------------------------------------------------------------

# The concrete kernel package behind linux-image-amd64 (e.g. linux-image-6.1.0-56-amd64).
kernel_pkg() {
    if [ -n "${FERRY_VM_KERNEL_PKG:-}" ]; then echo "$FERRY_VM_KERNEL_PKG"; return; fi
    local pkg
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }')
    [ -n "$pkg" ] || pkg=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$' 2>/dev/null |
        awk '{ print $1 }' | sort -V | tail -n 1)
    echo "$pkg"
}

download_kernel() { # download_kernel PKG: into $cache/debs
    mkdir -p "$cache/debs"
    (cd "$cache/debs" && apt-get download -q -o APT::Sandbox::User=root "$1" 2>&1) >&2
}

# Sets kdir (the extracted package), kver, moddir and kernel (the image to boot).
# Downloads and extracts once; later runs re-use $cache/current without apt.
fetch_kernel() {
    mkdir -p "$cache"
    exec 9>"$cache/.lock"
    flock 9
    local pkg=${FERRY_VM_KERNEL_PKG:-}
    if [ -z "$pkg" ] && [ -e "$cache/current/.done" ]; then
        pkg=$(readlink "$cache/current")
    fi
    [ -n "$pkg" ] || pkg=$(kernel_pkg)
    if [ -z "$pkg" ] || { [ ! -e "$cache/$pkg/.done" ] && ! download_kernel "$pkg"; }; then
        say "no kernel package found or download failed; running apt-get update"
        apt-get update -qq >&2
        pkg=$(kernel_pkg)
        [ -n "$pkg" ] || die "cannot resolve linux-image-amd64"
        [ -e "$cache/$pkg/.done" ] || download_kernel "$pkg" || die "apt-get download $pkg failed"
    fi
    kdir=$cache/$pkg
    [ -e "$kdir/.done" ] || extract_kernel "$pkg"
    [ -n "${FERRY_VM_KERNEL_PKG:-}" ] || ln -sfn "$pkg" "$cache/current"
    flock -u 9
    kernel_paths
    [ -f "$moddir/modules.dep" ] || die "no modules.dep in $moddir"
    kernel=$kdir/boot/vmlinuz-$kver
    [ ! -f "$kdir/vmlinux" ] || kernel=$kdir/vmlinux
}

extract_kernel() { # extract_kernel PKG: the downloaded .deb into $kdir
    say "extracting $1"
    rm -rf "$kdir"
    local debs=("$cache/debs/$1"_*.deb)
    dpkg-deb -x "${debs[-1]}" "$kdir"
    kernel_paths
    # The package ships no modules.dep (its postinst runs depmod): make one.
    busybox depmod -b "$kdir" "$kver" || die "depmod failed in $moddir"
    unpack_vmlinux || say "booting the compressed kernel (slower): no PVH vmlinux"
    touch "$kdir/.done"
    rm -f "$cache/debs/$1"_*.deb
}

# Under TCG the bzImage's own xz decompressor costs ~3 s per boot. With
# CONFIG_PVH, qemu boots the uncompressed ELF vmlinux directly, so unpack it
# once. busybox unxz lacks the x86 BCJ filter the kernel uses: needs xz-utils.
unpack_vmlinux() {
    local config=$kdir/boot/config-$kver off
    grep -qx 'CONFIG_PVH=y' "$config" && grep -qx 'CONFIG_KERNEL_XZ=y' "$config" || return 1
    command -v xz >/dev/null || return 1
    off=$(LC_ALL=C grep -obUaP '\xFD7zXZ\x00' "$kdir/boot/vmlinuz-$kver" | head -n 1 | cut -d: -f1)
    [ -n "$off" ] || return 1
    # (not a pipe: xz stops at the stream's end and tail would die of SIGPIPE)
    tail -c +"$((off + 1))" "$kdir/boot/vmlinuz-$kver" >"$kdir/vmlinux.xz"
    xz -dc --single-stream "$kdir/vmlinux.xz" >"$kdir/vmlinux.tmp" || return 1
    rm "$kdir/vmlinux.xz"
    mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"
}

kernel_paths() { # sets kver and moddir from the extracted tree $kdir
    local images=("$kdir"/boot/vmlinuz-*)
    [ -f "${images[0]}" ] || die "no boot/vmlinuz-* in $kdir"
    kver=${images[0]##*/vmlinuz-}
    moddir=$kdir/lib/modules/$kver
    [ -d "$moddir" ] || moddir=$kdir/usr/lib/modules/$kver
    [ -d "$moddir" ] || die "no modules for $kver in $kdir"
}

# --- modules ------------------------------------------------------------------

declare -A mod_path mod_deps mod_builtin mod_added
mod_order=()

modname() { # modname PATH-OR-NAME: sets name to the canonical name (dm_mod for kernel/.../dm-mod.ko.xz)
    name=${1##*/}
    name=${name%%.ko*}
    name=${name//-/_}
}

read_module_index() {
    local key deps line name
    while IFS= read -r line; do
        key=${line%%:*}
        deps=${line#*:}
        modname "$key"
        mod_path[$name]=$key
        mod_deps[$key]=$deps
    done <"$moddir/modules.dep"
    while IFS= read -r line; do
        modname "$line"
        mod_builtin[$name]=1
    done <"$moddir/modules.builtin"
}

# Depth first: a module's dependencies go into mod_order before it.
add_module() { # add_module NAME
    local name; modname "$1"
    [ -z "${mod_builtin[$name]:-}" ] || return 0
    local path=${mod_path[$name]:-}
    [ -n "$path" ] || die "kernel $kver has no module $1"
    [ -z "${mod_added[$path]:-}" ] || return 0
    mod_added[$path]=1
    local dep
    for dep in ${mod_deps[$path]}; do add_module "$dep"; done
    mod_order+=("$path")
}

unxz_to() { # unxz_to SRC DST: xz-utils if there, else busybox's (enough for modules)
    if command -v xz >/dev/null; then xz -dc "$1" >"$2"; else busybox xz -dc "$1" >"$2"; fi
}

# Copies the modules in mod_order (decompressed) and writes etc/ferry-vm/modules.
install_modules() { # install_modules STAGE
    local stage=$1 path ko name
    local dst=$stage/lib/modules/$kver
    mkdir -p "$dst" "$stage/etc/ferry-vm"
    : >"$stage/etc/ferry-vm/modules"
    for path in "${mod_order[@]}"; do
        ko=${path%.ko*}.ko
        mkdir -p "$dst/$(dirname "$ko")"
        case "$path" in
            *.ko) cp "$moddir/$path" "$dst/$ko" ;;
            *.ko.xz) unxz_to "$moddir/$path" "$dst/$ko" ;;
            *.ko.gz) gzip -dc "$moddir/$path" >"$dst/$ko" ;;
            *.ko.zst) zstd -qdc "$moddir/$path" >"$dst/$ko" ;;
            *) die "unknown module file $path" ;;
        esac
        modname "$path"
        echo "$ko ${module_params[$name]:-}" >>"$stage/etc/ferry-vm/modules"
        echo "$ko:$(for d in ${mod_deps[$path]}; do printf ' %s' "${d%.ko*}.ko"; done)" >>"$dst/modules.dep"
    done
}

# --- initramfs ----------------------------------------------------------------

copy_libs() { # copy_libs STAGE PROG: the shared libraries and loader PROG needs, at their paths
    local stage=$1 prog=$2 lib
    ldd "$prog" >/dev/null 2>&1 || return 0 # static
    for lib in $(ldd "$prog" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        [ -e "$stage$lib" ] && continue
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
}

copy_prog() { # copy_prog STAGE PROG DST
    local stage=$1 prog=$2 dst=$3 src
    src=$(command -v "$prog") || die "program $prog not found"
    mkdir -p "$stage$(dirname "$dst")"
    cp -L "$src" "$stage$dst"
    copy_libs "$stage" "$src"
}

copy_ferry() { # copy_ferry STAGE STRIP
    local stage=$1 strip=$2 ferry=${FERRY_BIN:-$root/target/debug/ferry}
    [ "$ferry" != none ] || return 0
    [ -x "$ferry" ] || die "ferry binary $ferry missing: cargo build -p ferry, or set FERRY_BIN (FERRY_BIN=none to leave it out)"
    if [ "$strip" = 1 ] && command -v objcopy >/dev/null; then
        objcopy --strip-debug "$ferry" "$stage/bin/ferry"
    else
        cp -L "$ferry" "$stage/bin/ferry"
    fi
    copy_libs "$stage" "$ferry"
}

# build_initramfs OUT SCRIPT STRIP: writes OUT/initramfs.cpio (staged in OUT/initramfs/).
# Not compressed: under TCG the kernel's gunzip costs more than it saves
# (measured ~0.4 s in the guest plus ~0.5 s of gzip on the host per boot).
build_initramfs() {
    local out=$1 script=$2 strip=$3 stage=$1/initramfs spec prog src dst
    rm -rf "$stage"
    mkdir -p "$stage"/{bin,dev,etc,lib,proc,root,run,sys,tmp,usr/bin}
    ln -s bin "$stage/sbin"
    ln -s bin "$stage/usr/sbin"
    mknod "$stage/dev/console" c 5 1
    mknod "$stage/dev/null" c 1 3
    echo 'root:x:0:0:root:/root:/bin/sh' >"$stage/etc/passwd"
    echo 'root:x:0:' >"$stage/etc/group"
    [ ! -f /etc/mke2fs.conf ] || cp /etc/mke2fs.conf "$stage/etc/"
    # /init links the other applets (busybox --install, faster than here)
    cp -L "$(command -v busybox)" "$stage/bin/busybox"
    ln -s busybox "$stage/bin/sh"
    copy_ferry "$stage" "$strip"
    for prog in "${bins[@]}"; do copy_prog "$stage" "$prog" "/usr/bin/${prog##*/}"; done
    for spec in "${files[@]}"; do
        src=${spec%%:*}
        if [ "$src" = "$spec" ]; then dst=$(realpath -m "$src"); else dst=/${spec#*:}; fi
        [ -e "$src" ] || die "file $src not found"
        mkdir -p "$stage$(dirname "$dst")"
        cp -a "$src" "$stage$dst"
    done
    install_modules "$stage"
    cp "$here/vm-init.sh" "$stage/init"
    cp "$script" "$stage/test.sh"
    cp "$here/vm-tests/lib.sh" "$stage/test-lib.sh"
    chmod 755 "$stage/init" "$stage/test.sh"
    (cd "$stage" && find . | busybox cpio -o -H newc -R 0:0 2>/dev/null) >"$out/initramfs.cpio"
}

# --- run ----------------------------------------------------------------------

qemu_pid=
stop_qemu() {
    [ -n "$qemu_pid" ] || return 0
    kill -TERM "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=
}

interrupted() { # interrupted CODE
    stop_qemu
    say "interrupted; VM stopped (log: $out/console.log)"
    exit "$1"
}

show_log() { # show_log FILE [LINES]: the console log without the serial line's CRs
    if [ -n "${2:-}" ]; then tail -n "$2" "$1"; else cat "$1"; fi | tr -d '\r'
}

# Sets drives (qemu arguments) from disks, creating the missing images in $out.
make_disks() {
    local spec name size i=0
    drives=()
    for spec in "${disks[@]}"; do
        name=${spec%%=*}
        size=${spec#*=}
        [[ "$name" =~ ^[A-Za-z0-9_.-]{1,20}$ && "$size" != "$spec" ]] ||
            die "bad --disk $spec (NAME=SIZE, NAME up to 20 of [A-Za-z0-9_.-])"
        [ -e "$out/$name.img" ] || truncate -s "$size" "$out/$name.img"
        drives+=(-drive "file=$out/$name.img,format=raw,if=none,id=d$i,cache=unsafe,discard=unmap"
            -device "virtio-blk-pci,drive=d$i,serial=$name")
        i=$((i + 1))
    done
}

# Runs the VM in the background (so the traps can stop it); sets qemu_rc.
run_qemu() {
    : >"$out/console.log"
    trap 'stop_qemu' EXIT
    trap 'interrupted 130' INT
    trap 'interrupted 143' TERM
    timeout --kill-after=10 "$timeout" qemu-system-x86_64 \
        -accel tcg -machine pc -cpu max -smp "$smp" -m "$mem" \
        -nodefaults -no-user-config -display none -no-reboot \
        -serial "file:$out/console.log" \
        -kernel "$kernel" -initrd "$out/initramfs.cpio" \
        -append "console=ttyS0 panic=-1 quiet loglevel=5 mitigations=off" \
        "${drives[@]}" </dev/null >"$out/qemu.log" 2>&1 &
    qemu_pid=$!
    qemu_rc=0
    wait "$qemu_pid" || qemu_rc=$?
    qemu_pid=
}

# Prints the log and exits with the test's status (see the top of this file).
report() {
    local code timed_out=0
    [ "$qemu_rc" -ne 124 ] && [ "$qemu_rc" -ne 137 ] || timed_out=1
    code=$(tr -d '\r' <"$out/console.log" | sed -n 's/^FERRY-VM: exit \([0-9]*\)$/\1/p' | tail -n 1)
    if [ -z "$code" ]; then
        [ ! -s "$out/qemu.log" ] || { say "qemu said:"; cat "$out/qemu.log" >&2; }
        show_log "$out/console.log" 60
        if [ "$timed_out" = 1 ]; then
            say "timed out after ${timeout}s; no 'FERRY-VM: exit' line (full log: $out/console.log)"
            exit 124
        fi
        say "the VM stopped without a 'FERRY-VM: exit' line (panic or boot failure; full log: $out/console.log)"
        exit 1
    fi
    if [ "$code" -ne 0 ]; then
        show_log "$out/console.log" 60
        say "test script failed with exit $code (full log: $out/console.log)"
        exit "$code"
    fi
    show_log "$out/console.log"
    if [ "$timed_out" = 1 ]; then
        say "the test passed but the VM did not power off within ${timeout}s (sync hung?); disks may be incomplete"
        exit 124
    fi
}

run() {
    local script='' strip=1 extra_modules=() m t0
    out='' timeout=600 mem=1024 smp=1 disks=() bins=() files=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --script) script=$2; shift 2 ;;
            --out) out=$2; shift 2 ;;
            --disk) disks+=("$2"); shift 2 ;;
            --file) files+=("$2"); shift 2 ;;
            --bin) bins+=("$2"); shift 2 ;;
            --module) extra_modules+=("$2"); shift 2 ;;
            --timeout) timeout=$2; shift 2 ;;
            --mem) mem=$2; shift 2 ;;
            --smp) smp=$2; shift 2 ;;
            --no-strip) strip=0; shift ;;
            *) die "unknown option $1" ;;
        esac
    done
    [ -n "$script" ] || die "--script FILE is required"
    [ -f "$script" ] || die "script $script not found"
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 missing: apt-get install --no-install-recommends qemu-system-x86"
    command -v busybox >/dev/null || die "busybox missing: apt-get install busybox-static"
    if [ -z "$out" ]; then out=$(mktemp -d /tmp/ferry-vm.XXXXXX); say "out: $out"; fi
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    [[ "$out" != *,* ]] || die "--out $out: qemu options cannot take a path with a comma"
    make_disks

    fetch_kernel
    read_module_index
    for m in "${default_modules[@]}" "${extra_modules[@]}"; do add_module "$m"; done
    t0=$(now)
    build_initramfs "$out" "$script" "$strip"
    say "initramfs: $(du -h "$out/initramfs.cpio" | cut -f1) in $(elapsed "$t0")s"

    t0=$(now)
    run_qemu
    say "qemu ran $(elapsed "$t0")s (exit $qemu_rc)"
    report
}

case "${1:-}" in
    run) shift; run "$@" ;;
    kernel) fetch_kernel; echo "$kver" ;;
    *) echo "usage: $0 run --script FILE [options] | $0 kernel" >&2; exit 2 ;;
esac
