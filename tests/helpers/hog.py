"""A memory hog: touches STEP_MB more every DELAY seconds up to CAP_MB, then idles.

usage: hog.py CAP_MB STEP_MB DELAY [ignore-term] [usr1-exit=PATH] [until-available=BYTES]

until-available: stop growing early, once the machine's MemAvailable is at or below BYTES.
"""

import signal
import sys
import time

cap, step, delay = int(sys.argv[1]) << 20, int(sys.argv[2]) << 20, float(sys.argv[3])
until_available = -1


def available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


for flag in sys.argv[4:]:
    if flag == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif flag.startswith("usr1-exit="):
        marker = flag.split("=", 1)[1]

        def on_usr1(signum, frame, marker=marker):
            with open(marker, "w") as fh:
                fh.write("usr1\n")
            sys.exit(0)

        signal.signal(signal.SIGUSR1, on_usr1)
    elif flag.startswith("until-available="):
        until_available = int(flag.split("=", 1)[1])
chunks = []
total = 0
while total < cap and (until_available < 0 or available() > until_available):
    chunks.append(b"\x01" * step)  # bytes * n writes every byte: the pages are really touched
    total += step
    time.sleep(delay)
while True:
    time.sleep(1)
