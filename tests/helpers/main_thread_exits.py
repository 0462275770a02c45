"""A process whose main thread exits while another thread runs on and allocates: the kernel then shows it as a
zombie (state Z, statm all 0) although it lives and holds memory. argv: MB SECONDS READY_FILE."""

import ctypes
import sys
import threading
import time

size, seconds, ready = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]


def allocate() -> None:
    time.sleep(0.2)  # until the main thread is gone
    blocks = []
    for _ in range(size):
        block = bytearray(1 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        blocks.append(block)
        time.sleep(0.002)
    with open(ready, "w") as out:
        out.write("allocated")
    time.sleep(seconds)


threading.Thread(target=allocate).start()
ctypes.CDLL(None).pthread_exit(None)  # the main thread alone ends; ctypes lets the GIL go first
