"""What `status`, `locks`, `unlock` and `profiles` report: the machine and the lock store, read, not judged."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from safegate.config import Config, Profile
from safegate.errors import LockBusy
from safegate.history import Run, learned_need, percentile
from safegate.locks.store import LockStore
from safegate.probes.gpu import read_gpus
from safegate.probes.memory import read_memory
from safegate.probes.processes import read_processes
from safegate.probes.thermal import read_thermal
from safegate.snapshots import GpuSnapshot, HolderRecord, MemorySnapshot, ProcessInfo, ThermalSnapshot


@dataclass(frozen=True)
class LockInfo:
    name: str
    held: bool
    holder: HolderRecord | None
    alive: bool
    note: str

    def as_json(self) -> dict[str, Any]:
        h = self.holder
        return {
            "name": self.name, "held": self.held, "alive": self.alive, "note": self.note,
            "holder": None if h is None else {
                "pid": h.pid, "job_pid": h.job_pid, "user": h.user, "host": h.host, "cmdline": h.cmdline,
                "started_at": h.started_at, "profile": h.profile, "need": h.need, "used": h.used,
            },
        }


def list_locks(store: LockStore) -> list[LockInfo]:
    out = []
    for name in store.names():
        try:
            state = store.state(name)
        except ValueError:
            continue  # a file whose name is not a valid lock name: not ours
        out.append(LockInfo(name, state.held, state.holder, state.holder_alive, state.note))
    return out


def unlock(store: LockStore, name: str) -> list[str]:
    """Remove a free lock's stale leftovers (holder metadata); refuse while a live process holds it.

    The lock file itself stays: unlinking it would split waiters across two inodes.
    """
    store.ensure_directory()
    state = store.state(name)
    if state.held:
        h = state.holder
        who = f"pid {h.job_pid or h.pid} ({h.user}: {' '.join(h.cmdline)[:80]})" if h else "a process without metadata"
        raise LockBusy(f"lock {name!r} is held by {who}; stop that job instead (there is no force)")
    removed = [r.what for r in store.cleanup() if r.removed and r.path == store.holder_path(name)]
    leftover = store.remove_metadata_if_free(name)
    if leftover:
        removed.append(f"holder metadata of lock {name!r} (its process no longer holds the lock)")
    return removed


@dataclass(frozen=True)
class StatusReport:
    time: float
    memory: MemorySnapshot
    swap_total: int
    swap_used: int
    thermal: ThermalSnapshot
    gpus: GpuSnapshot
    locks: list[LockInfo]
    top: list[ProcessInfo]
    lock_dir: Path


def collect_status(config: Config, lock_dir: Path, gpu_backend: str, top: int = 5) -> StatusReport:
    store = LockStore(lock_dir)
    swap = psutil.swap_memory()
    procs = sorted(read_processes().processes, key=lambda p: -p.rss)[:top]
    return StatusReport(
        time=time.time(), memory=read_memory(), swap_total=int(swap.total), swap_used=int(swap.used),
        thermal=read_thermal(config.thermal), gpus=read_gpus(gpu_backend),
        locks=list_locks(store) if lock_dir.is_dir() else [], top=procs, lock_dir=lock_dir,
    )


def profile_json(p: Profile, runs: list[Run] | None = None) -> dict[str, Any]:
    runs = runs or []
    peaks = [r.peak_memory for r in runs]
    return {
        "name": p.name, "source": p.source, "description": p.description, "match": list(p.match),
        "memory": "auto" if p.memory_auto else str(p.memory), "lock": p.lock,
        "recorded": {
            "runs": len(runs),
            "peak_memory_p95": percentile(peaks, 95) if peaks else None,
            "peak_memory_max": max(peaks) if peaks else None,
            "learned_need": learned_need(runs),
            "peak_gpu_memory_max": max((r.peak_gpu_memory for r in runs if r.peak_gpu_memory), default=None),
        }, "memory_margin": str(p.memory_margin), "max_temp": p.max_temp,
        "gpu_memory": str(p.gpu_memory), "max_mem": str(p.max_mem) if p.max_mem else None,
        "competing": [{"pattern": r.pattern, "action": r.action, "min_rss": str(r.min_rss) if r.min_rss else None}
                      for r in p.competing],
    }
