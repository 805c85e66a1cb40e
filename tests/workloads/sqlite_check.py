#!/usr/bin/env python3
"""Open a failed-over SQLite database (SQLite recovers a hot journal) and
print JSON: integrity_check result, max id, row count, and rows whose
payload does not match its SHA-256."""
import hashlib
import json
import sqlite3
import sys

con = sqlite3.connect(sys.argv[1])
integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
max_id, count = con.execute("SELECT coalesce(max(id), 0), count(*) FROM t").fetchone()
bad = sum(
    1
    for payload, digest in con.execute("SELECT payload, digest FROM t")
    if hashlib.sha256(payload).hexdigest() != digest
)
print(json.dumps({"integrity": integrity, "max_id": max_id, "rows": count, "bad_rows": bad}))
