"""A fork-and-exit chain: each generation forks, exits, and its child calls setsid, so no pid, group or session
of it lasts. argv: MARKER_FILE PAUSE; each generation appends its pid to MARKER_FILE. It never ends by itself."""

import os
import sys
import time

marker, pause = sys.argv[1], float(sys.argv[2])
while True:
    if os.fork():
        os._exit(0)
    os.setsid()
    with open(marker, "a") as out:
        out.write(f"{os.getpid()}\n")
    time.sleep(pause)
