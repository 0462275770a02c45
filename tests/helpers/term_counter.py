"""A job that counts the SIGTERMs it gets, as a program that treats a second one as "force quit" would.

argv: OUT [MB]. Writes "ready" to OUT once its handler is in place (after allocating MB, if given); on the
first SIGTERM it takes a graceful half second, long enough for a second one to arrive, then writes the count
to OUT and exits 0.
"""

import signal
import sys
import time

terms: list[int] = []
signal.signal(signal.SIGTERM, lambda signum, _frame: terms.append(signum))
ballast = bytearray(int(sys.argv[2]) << 20) if len(sys.argv) > 2 else b""
for i in range(0, len(ballast), 4096):
    ballast[i] = 1
with open(sys.argv[1], "w") as out:
    out.write("ready")
while not terms:
    time.sleep(0.01)
end = time.monotonic() + 0.5
while time.monotonic() < end:
    time.sleep(0.01)
with open(sys.argv[1], "w") as out:
    out.write(str(len(terms)))
