#!/usr/bin/env python3
"""Cross-disk dependency workload for the failover rig.

Usage: cross_disk.py URI_A URI_B CTL COUNT
For k = 1..COUNT: write record k (4 KiB: (k, k*7919) repeated) to disk B at
k*4096 and wait for its reply, then write index entry k (k, k*7919) to disk A
at k*16. A database's index never points at a record it has not written:
at every recovery point, each index entry on A must find its record on B.
CTL/done is created at the end.
"""
import os
import struct
import sys

import nbd

uri_a, uri_b, ctl, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
a = nbd.NBD()
a.connect_uri(uri_a)
b = nbd.NBD()
b.connect_uri(uri_b)
for k in range(1, count + 1):
    entry = struct.pack("<QQ", k, k * 7919)
    b.pwrite(entry * 256, k * 4096)
    a.pwrite(entry, k * 16)
a.shutdown()
b.shutdown()
open(os.path.join(ctl, "done"), "w").close()
