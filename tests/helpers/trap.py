"""Writes the name of each signal it gets to FILE; exits 0 on SIGTERM/SIGINT after LINGER seconds.

usage: trap.py FILE [LINGER]
"""

import signal
import sys
import time

path = sys.argv[1]
linger = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0


def on_signal(signum, frame):
    with open(path, "a") as fh:
        fh.write(signal.Signals(signum).name + "\n")
    if signum in (signal.SIGTERM, signal.SIGINT):
        time.sleep(linger)
        sys.exit(0)


for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(s, on_signal)
with open(path, "a") as fh:
    fh.write("ready\n")
while True:
    time.sleep(0.05)
