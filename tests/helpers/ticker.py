"""Writes an increasing counter to FILE every 20 ms, for COUNT ticks or until STOPFILE exists.

usage: ticker.py FILE COUNT [STOPFILE]
"""

import os
import sys
import time

path, count = sys.argv[1], int(sys.argv[2])
stop = sys.argv[3] if len(sys.argv) > 3 else None
for i in range(1, count + 1):
    if stop is not None and os.path.exists(stop):
        break
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(i))
    os.replace(tmp, path)
    time.sleep(0.02)
