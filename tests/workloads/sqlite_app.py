#!/usr/bin/env python3
"""SQLite workload for the failover rig: continuous transactions with
increasing ids on a file system under test.

Usage: sqlite_app.py DB CTL
  CTL/committed  the last committed id (replaced after every commit)
  CTL/pause      when present, the workload finishes its transaction, writes
                 CTL/paused (the last committed id) and waits until pause is
                 removed: what an application's freeze hook does
  CTL/stop       ends the workload; CTL/final holds the last committed id
Each row carries a random payload and its SHA-256, checked by sqlite_check.py.
"""
import hashlib
import os
import random
import sqlite3
import sys
import time

db, ctl = sys.argv[1], sys.argv[2]


def put(name, text):
    tmp = os.path.join(ctl, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(ctl, name))


con = sqlite3.connect(db, isolation_level=None)
con.execute("PRAGMA journal_mode=DELETE")
con.execute("PRAGMA synchronous=FULL")
con.execute(
    "CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, payload BLOB NOT NULL, digest TEXT NOT NULL)"
)
con.execute("CREATE TABLE IF NOT EXISTS summary (k INTEGER PRIMARY KEY, n INTEGER NOT NULL)")
last = con.execute("SELECT coalesce(max(id), 0) FROM t").fetchone()[0]
put("committed", str(last))
rng = random.Random(last)
while not os.path.exists(os.path.join(ctl, "stop")):
    if os.path.exists(os.path.join(ctl, "pause")):
        put("paused", str(last))
        while os.path.exists(os.path.join(ctl, "pause")):
            time.sleep(0.005)
        os.remove(os.path.join(ctl, "paused"))
        continue
    i = last + 1
    payload = rng.randbytes(rng.randint(100, 12000))
    con.execute("BEGIN")
    con.execute(
        "INSERT INTO t VALUES (?, ?, ?)", (i, payload, hashlib.sha256(payload).hexdigest())
    )
    con.execute("INSERT OR REPLACE INTO summary VALUES (?, ?)", (i % 97, i))
    if i % 50 == 0:
        con.execute("DELETE FROM t WHERE id = ?", (i - 25,))
        con.execute("INSERT INTO t VALUES (?, ?, ?)", (i - 25, b"x", hashlib.sha256(b"x").hexdigest()))
    con.execute("COMMIT")
    last = i
    put("committed", str(last))
con.close()
put("final", str(last))
