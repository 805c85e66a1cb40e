"""Shared by the benchmarks' helpers: `ferry ... status --json` with a check
that the daemons being measured are still alive (WATCH_PIDS)."""
import json
import os
import subprocess
import sys

FERRY = os.environ["FERRY"]
WATCH = [int(p) for p in os.environ.get("WATCH_PIDS", "").split()]


def check_alive():
    for p in WATCH:
        try:
            os.kill(p, 0)
        except ProcessLookupError:
            sys.exit(f"a ferry daemon (pid {p}) exited; see the logs")


def status(*args):
    """The JSON of `ferry ARGS --json`, or None if it failed."""
    check_alive()
    out = subprocess.run([FERRY, *args, "--json"], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout)
    except ValueError:
        return None
