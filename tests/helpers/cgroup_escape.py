"""A root job that leaves the cgroup safegate made for it, then fills memory and holds it until killed.

usage: cgroup_escape.py MARKER MB [stay|fork]

For each hierarchy of /proc/self/cgroup whose path has a safegate-made cgroup in it (v1: memory, freezer, pids;
v2: the unified line), writes its own pid into the cgroup.procs of that cgroup's parent (v2: the nearest ancestor
that takes it), through the hierarchy's mount point from /proc/self/mountinfo. Then it writes MARKER (JSON: its
pid, its cgroup lines before and after), touches MB MiB, writes MARKER.full, and sleeps until killed. With "stay"
it moves nowhere, and exits once it is full. With "fork", once out, it forks a child that does all that (its
output to /dev/null), and exits as soon as the child wrote MARKER.
"""

import json
import os
import sys
import time

PREFIX = "safegate-"


def mounts() -> dict[str, tuple[str, str]]:
    """Hierarchy (a v1 controller or name=..., or "" for v2) -> (the mount's root, its mount point)."""
    found: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            before, _, after = line.partition(" - ")
            fstype, _source, options = after.split()[:3]
            fields = before.split()
            root, point = fields[3], fields[4]
            if fstype == "cgroup2":
                found.setdefault("", (root, point))
            elif fstype == "cgroup":
                for option in options.split(","):
                    found.setdefault(option, (root, point))
    return found


def cgroup_lines() -> list[str]:
    with open("/proc/self/cgroup") as fh:
        return fh.read().splitlines()


def escape() -> None:
    where = mounts()
    for line in cgroup_lines():
        _, names, path = line.split(":", 2)
        parts = path.split("/")
        ours = [i for i, part in enumerate(parts) if part.startswith(PREFIX)]
        if not ours:
            continue
        root, point = where[names.split(",")[0] if names else ""]
        # v2 takes no process into a cgroup that hands controllers down (a slice): up to one that takes it.
        for end in range(ours[0], 0, -1):
            parent = "/".join(parts[:end]) or "/"
            relative = parent[len(root.rstrip("/")):] if parent.startswith(root.rstrip("/") + "/") else parent
            try:
                with open(f"{point}{relative.rstrip('/')}/cgroup.procs", "w") as fh:
                    fh.write(str(os.getpid()))
                break
            except OSError:
                if end == 1:
                    raise


marker, size = sys.argv[1], int(sys.argv[2]) << 20
mode = sys.argv[3] if len(sys.argv) > 3 else ""
before = cgroup_lines()
if mode != "stay":
    escape()
if mode == "fork":
    if os.fork() != 0:
        while not os.path.exists(marker):
            time.sleep(0.01)
        os._exit(0)
    devnull = os.open(os.devnull, os.O_WRONLY)  # whoever reads safegate's output is not kept waiting by the child
    for fd in (1, 2):
        os.dup2(devnull, fd)
with open(marker + ".tmp", "w") as fh:
    json.dump({"pid": os.getpid(), "before": before, "after": cgroup_lines()}, fh)
os.replace(marker + ".tmp", marker)
block = bytearray(size)
block[::4096] = b"x" * (size // 4096)  # every page touched: resident
open(marker + ".full", "w").close()
while mode != "stay":
    time.sleep(1)
