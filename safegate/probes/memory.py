"""RAM and memory pressure."""

from __future__ import annotations

from safegate.probes.snapshots import MemorySnapshot

PSI_MEMORY = "/proc/pressure/memory"
MEMINFO = "/proc/meminfo"


def read_pressure(path: str = PSI_MEMORY) -> float | None:
    """PSI 'some avg10' in percent, or None where the kernel has no PSI (file absent or disabled)."""
    try:
        with open(path, encoding="ascii") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError):
        # Absent (old kernel, macOS) or EOPNOTSUPP (psi=0 on the kernel command line): not known.
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for item in fields[1:]:
                key, _, value = item.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def read_memory(psi_path: str = PSI_MEMORY, meminfo: str = MEMINFO) -> MemorySnapshot:
    total, available = _meminfo(meminfo) or _psutil_memory()
    return MemorySnapshot(total=total, available=available, pressure_some_avg10=read_pressure(psi_path))


def _meminfo(path: str) -> tuple[int, int] | None:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo, as psutil reports them on Linux (it reads the same two
    lines), without importing psutil; None where either is missing (not Linux, or a kernel before 3.14)."""
    try:
        with open(path, "rb") as fh:
            text = fh.read()
    except OSError:
        return None
    found: dict[bytes, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(b":")
        if key in (b"MemTotal", b"MemAvailable"):
            try:
                found[key] = int(rest.split()[0]) * 1024
            except (IndexError, ValueError):
                return None
    if len(found) < 2:
        return None
    return found[b"MemTotal"], found[b"MemAvailable"]


def _psutil_memory() -> tuple[int, int]:
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.total), int(vm.available)
