"""Appends 'START END' (CLOCK_MONOTONIC, shared by all processes) of a short run to FILE.

usage: record.py FILE SECONDS
"""

import os
import sys
import time

start = time.monotonic()
time.sleep(float(sys.argv[2]))
end = time.monotonic()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, f"{start} {end}\n".encode())
os.close(fd)
