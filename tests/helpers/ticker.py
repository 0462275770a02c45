"""Writes an increasing counter to FILE every 20 ms, for COUNT ticks.

usage: ticker.py FILE COUNT
"""

import os
import sys
import time

path, count = sys.argv[1], int(sys.argv[2])
for i in range(1, count + 1):
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(i))
    os.replace(tmp, path)
    time.sleep(0.02)
