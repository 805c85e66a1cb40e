# shellcheck shell=sh
# Helpers for the scripts under scripts/rig/vm-tests/, sourced from
# /test-lib.sh in the guest (scripts/rig/kernel-vm.sh puts it there).

# Seconds since boot (a clock that keeps time under emulation, where a
# loop's own pace says nothing).
uptime_s() { cut -d. -f1 /proc/uptime; }

# wait_for SECONDS COMMAND...: run COMMAND every 50 ms until it succeeds;
# fails once SECONDS have passed. (Uses the global wait_deadline: sh has
# no local variables, so COMMAND must not call wait_for itself.)
wait_for() {
    wait_deadline=$(($(uptime_s) + $1)); shift
    until "$@"; do
        [ "$(uptime_s)" -lt "$wait_deadline" ] || return 1
        sleep 0.05
    done
}
