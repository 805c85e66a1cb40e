# shellcheck shell=sh
# Helpers for the scripts under scripts/rig/vm-tests/, sourced from
# /test-lib.sh in the guest (scripts/rig/kernel-vm.sh puts it there).

# wait_for SECONDS COMMAND...: run COMMAND every 50 ms until it succeeds;
# fails after SECONDS. (Uses the globals wait_n and wait_limit: sh has no
# local variables.)
wait_for() {
    wait_limit=$(($1 * 20)); shift
    wait_n=0
    until "$@"; do
        wait_n=$((wait_n + 1))
        [ "$wait_n" -lt "$wait_limit" ] || return 1
        sleep 0.05
    done
}
