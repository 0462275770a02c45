"""RAM and memory pressure."""

from __future__ import annotations

import psutil

from safegate.snapshots import MemorySnapshot

PSI_MEMORY = "/proc/pressure/memory"


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


def read_memory(psi_path: str = PSI_MEMORY) -> MemorySnapshot:
    vm = psutil.virtual_memory()
    return MemorySnapshot(total=int(vm.total), available=int(vm.available), pressure_some_avg10=read_pressure(psi_path))
