#!/bin/sh
# Uninstall what scripts/install.sh installed, as its manifest
# (/var/lib/ferry/.install-manifest) lists it. POSIX sh (busybox too).
#
# Usage: scripts/uninstall.sh [--root DIR] [--purge]
#   --root DIR   the root install.sh was given (default /)
#   --purge      also remove /etc/ferry (configuration, credentials) and
#                /var/lib/ferry (filter state, target replicas, the server's
#                database): not undoable
#
# With root / and systemd as PID 1 it first takes protected volumes out
# (ferry unprotect-volume), then stops and disables the ferry units. It
# refuses, and removes nothing, while a device the ferry filter serves is
# still in use (a file system mounted on /dev/nbdN): stopping the filter
# would fail that file system's I/O. Idempotent: a second run, or a run with
# nothing installed, exits 0.
set -eu
# Byte order for sort (children before their parents, whatever the locale).
LC_ALL=C
export LC_ALL

say() { printf '%s\n' "$*"; }
# A list, one item a line, on one line.
joined() { printf '%s\n' "$1" | tr '\n' ' ' | sed 's/  */ /g; s/^ //; s/ $//'; }
die() { printf 'uninstall.sh: %s\n' "$*" >&2; exit 1; }
usage() {
    sed -n '5,9s/^# \{0,1\}//p' "$0"
}

root=/
purge=no
while [ $# -gt 0 ]; do
    case $1 in
    --root) [ $# -ge 2 ] || die "--root needs a directory"; root=$2; shift 2 ;;
    --root=*) root=${1#*=}; shift ;;
    --purge) purge=yes; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[ -n "$root" ] || die "--root: empty directory name"
[ -d "$root" ] || die "--root $root: no such directory"
root=$(cd "$root" && pwd)
[ "$root" = / ] && root=
live=no
[ -z "$root" ] && [ -d /run/systemd/system ] && live=yes

manifest=/var/lib/ferry/.install-manifest
work=$(mktemp -d "${TMPDIR:-/tmp}/ferry-uninstall.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 141' PIPE
trap 'exit 143' TERM
: >"$work/manifest"
if [ -f "$root$manifest" ]; then
    cp "$root$manifest" "$work/manifest"
else
    say "no install manifest at $manifest: nothing recorded to remove"
fi

# Manifest paths of one kind. Files and the configuration and state
# directories (removed with rm) only where install.sh writes them: an edited
# or corrupted manifest must not make this remove anything else.
# Directories it made are only ever rmdir'ed (empty ones).
entries() {
    awk -v k="$1" '$1 == k { print $2 }' "$work/manifest" | while read -r path; do
        case $path in
        /*..* | *[!A-Za-z0-9/@._-]*) ;;
        *)
            case $1:$path in
            dir:/*) printf '%s\n' "$path"; continue ;;
            file:*/bin/ferry | file:/etc/systemd/system/ferry-*.service | \
                file:/etc/modules-load.d/ferry.conf | file:/etc/modprobe.d/ferry.conf | \
                file:/etc/ferry/* | confdir:/etc/ferry | statedir:/var/lib/ferry)
                printf '%s\n' "$path"; continue ;;
            esac ;;
        esac
        say "ignored    $path (not a path install.sh writes)" >&2
    done
}

# The unit files installed, by name.
unit_names=$(entries file | sed -n 's|^/etc/systemd/system/\([^/]*\.service\)$|\1|p')

# /dev/nbdN devices a ferry filter serves that something uses (a mounted
# file system, a dm table, a partition).
ferry_devices_in_use() {
    for dir in /sys/block/nbd*; do
        [ -r "$dir/backend" ] || continue
        case $(cat "$dir/backend" 2>/dev/null) in
        ferry:*) ;;
        *) continue ;;
        esac
        dev=$(cat "$dir/dev" 2>/dev/null) || continue
        if [ -n "$(ls -A "$dir/holders" 2>/dev/null)" ] ||
            awk -v d="$dev" '$3 == d { found = 1 } END { exit !found }' /proc/self/mountinfo; then
            printf '/dev/%s ' "${dir##*/}"
        fi
    done
}

# Names of the loaded units matching pattern $1 (in states $2, if given).
# The awk skips the status glyph some versions print before a failed unit.
units_in() {
    systemctl list-units --all ${2:+--state="$2"} --no-legend --plain --full "$1" 2>/dev/null |
        awk '{ print ($1 ~ /^ferry-/) ? $1 : $2 }'
}
running=active,activating,deactivating,reloading

if [ "$live" = yes ] && [ -n "$unit_names" ]; then
    bin=$(entries file | sed -n '\|/bin/ferry$|{p;q;}')
    # Protected volumes first: slide each back onto its own table (the
    # filter then exits cleanly and its unit is not restarted).
    for unit in $(units_in 'ferry-volume@*.service' "$running"); do
        name=${unit#ferry-volume@}
        name=${name%.service}
        if [ -n "$bin" ] && [ -x "$bin" ] &&
            "$bin" unprotect-volume "/dev/mapper/$name" --state "/var/lib/ferry/volume/$name"; then
            say "unprotected /dev/mapper/$name (its writes are no longer recorded)"
        else
            say "could not unprotect /dev/mapper/$name (see above)"
        fi
    done
fi
if [ -z "$root" ]; then
    # Also when no unit runs (or no systemd): a volume whose filter was
    # stopped waits on /dev/nbdN for the next one, which removing ferry
    # would never start.
    busy=$(ferry_devices_in_use)
    if [ -n "$busy" ]; then
        die "still in use through ferry: ${busy}(a file system mounted on it, or a protected volume). Unmount it, or take the volume out (ferry unprotect-volume /dev/mapper/NAME --state /var/lib/ferry/volume/NAME), then run this again. Nothing was removed."
    fi
fi
if [ "$live" = yes ] && [ -n "$unit_names" ]; then
    # Stop and disable every ferry unit, instances of the templates too;
    # systemd stops the sidecars before the filters (their After= order).
    loaded=$(units_in 'ferry-*')
    if [ -n "$loaded" ]; then
        # shellcheck disable=SC2086 # one unit name a word
        if systemctl stop $loaded; then
            say "stopped    $(joined "$loaded")"
        else
            say "WARNING: systemctl stop $(joined "$loaded") failed (see above)"
        fi
    fi
    # shellcheck disable=SC2086 # one unit name a word
    if systemctl disable --quiet $unit_names 2>/dev/null; then
        say "disabled   $(joined "$unit_names")"
    fi
fi

# Enablement symlinks (.wants/, .requires/, .upholds/) of the installed
# units and their instances: systemctl disable, by hand, which also works
# in a --root and without systemd.
for link in "$root"/etc/systemd/system/*.wants/ferry-*.service \
    "$root"/etc/systemd/system/*.requires/ferry-*.service \
    "$root"/etc/systemd/system/*.upholds/ferry-*.service; do
    [ -L "$link" ] || continue
    base=${link##*/}
    case $base in
    *@*.service) template=${base%%@*}@.service ;;
    *) template=$base ;;
    esac
    echo "$unit_names" | grep -qxF "$template" || continue
    rm -f "$link"
    say "disabled   ${link#"$root"}"
    rmdir "${link%/*}" 2>/dev/null || true
done

# The installed files.
for path in $(entries file); do
    if [ -e "$root$path" ] || [ -L "$root$path" ]; then
        rm -f "$root$path"
        say "removed    $path"
    else
        say "absent     $path"
    fi
done

# Configuration and state: kept unless --purge.
confdirs=$(entries confdir)
statedirs=$(entries statedir)
if [ "$purge" = yes ]; then
    # Without a manifest: the places install.sh uses.
    [ -s "$work/manifest" ] || { confdirs=/etc/ferry; statedirs=/var/lib/ferry; }
    for path in $confdirs $statedirs; do
        if [ -e "$root$path" ]; then
            rm -rf "$root$path"
            say "purged     $path"
        fi
    done
else
    for path in $confdirs; do
        if [ -e "$root$path" ]; then
            say "kept       $path (configuration; --purge removes it)"
        fi
    done
    for path in $statedirs; do
        if [ -e "$root$path" ]; then
            say "kept       $path (state: filter tracking, replicas, server database; --purge removes it)"
        fi
    done
fi

# Directories install.sh made, deepest first, where now empty (but the
# configuration and state directories, when kept).
for path in $(entries dir | sort -r); do
    # shellcheck disable=SC2086 # one path a word
    if [ "$purge" = no ] && printf '%s\n' $confdirs $statedirs | grep -qxF "$path"; then
        continue
    fi
    if [ -d "$root$path" ] && rmdir "$root$path" 2>/dev/null; then
        say "removed    $path/"
    fi
done

# What is left for a later run (--purge) to remove: the kept entries.
if [ -d "$root/var/lib/ferry" ] && [ -s "$work/manifest" ]; then
    : >"$work/left"
    while read -r kind path; do
        case $kind in
        file) continue ;;
        esac
        if [ -e "$root$path" ]; then
            printf '%s %s\n' "$kind" "$path" >>"$work/left"
        fi
    done <"$work/manifest"
    mv -f "$work/left" "$root$manifest"
    chmod 0600 "$root$manifest"
fi

if [ "$live" = yes ]; then
    systemctl daemon-reload
    say "reloaded   systemd (systemctl daemon-reload)"
fi
if [ -z "$root" ]; then
    busy=$(ferry_devices_in_use)
    if [ -n "$busy" ]; then
        say "WARNING: ferry still serves ${busy}(a filter not run by these units?)"
    fi
fi
