"""A memory hog: touches STEP_MB more every DELAY seconds up to CAP_MB, then idles.

usage: hog.py CAP_MB STEP_MB DELAY [ignore-term] [usr1-exit=PATH]
"""

import signal
import sys
import time

cap, step, delay = int(sys.argv[1]) << 20, int(sys.argv[2]) << 20, float(sys.argv[3])
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
chunks = []
total = 0
while total < cap:
    chunks.append(b"\x01" * step)  # bytes * n writes every byte: the pages are really touched
    total += step
    time.sleep(delay)
while True:
    time.sleep(1)
