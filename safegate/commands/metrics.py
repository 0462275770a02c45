"""`safegate metrics`: the machine, the lock dir and exec's history in Prometheus' text format, for node_exporter's
textfile collector, and that collector's atomic write. One gauge per line; label values (sensor, lock and profile
names come from outside) are made printable and then escaped as the format requires."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from safegate.commands.reports import StatusReport
from safegate.config.file import load_config
from safegate.config.history import Run
from safegate.errors import UsageError
from safegate.probes.gpu import gpu_backend
from safegate.units import printable


def metrics(config: str | None) -> str:
    from safegate.commands.reports import collect_status
    from safegate.config import history
    from safegate.locks.files import resolve_lock_dir

    cfg = load_config(config)
    report = collect_status(cfg, resolve_lock_dir(cfg.lock_dir, os.environ), gpu_backend(cfg.gpu_backend, os.environ))
    return prometheus_text(report, history.load(history.history_path()))


TEXTFILE = "safegate.prom"


def write_textfile(directory: str, text: str) -> Path:
    """Write DIR/safegate.prom as node_exporter wants it: whole or not at all (a temp file, then a rename)."""
    target = Path(directory)
    if not target.is_dir():
        raise UsageError(f"--textfile: {directory!r} is not a directory; expected node_exporter's textfile "
                         "collector directory")
    temp = target / f".{TEXTFILE}.{os.getpid()}"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temp, target / TEXTFILE)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise UsageError(f"--textfile: cannot write {target / TEXTFILE}: {exc.strerror}") from None
    return target / TEXTFILE


_HELP = {
    "safegate_memory_total_bytes": "MemTotal.",
    "safegate_memory_available_bytes": "MemAvailable.",
    "safegate_memory_pressure_some_avg10": "PSI memory some avg10, percent.",
    "safegate_swap_used_bytes": "Swap in use.",
    "safegate_temperature_celsius": "Each temperature sensor safegate reads.",
    "safegate_gpu_memory_used_bytes": "Memory in use on each GPU.",
    "safegate_gpu_memory_total_bytes": "Memory of each GPU.",
    "safegate_gpu_temperature_celsius": "Temperature of each GPU.",
    "safegate_lock_held": "1 while the lock is held, else 0.",
    "safegate_lock_holder_need_bytes": "Memory the lock's holder reserved for its job.",
    "safegate_lock_holder_used_bytes": "Memory the lock holder's job used at its last sample.",
    "safegate_lock_waiters": "Waiters in line for the lock (check --wait, exec --wait); lock \"\" for profiles "
                             "without one.",
    "safegate_lock_oldest_wait_seconds": "How long the earliest waiter in line for the lock has waited (0: none).",
    "safegate_profile_runs": "Runs of the profile in exec's history.",
    "safegate_profile_last_exit_code": "Exit status of the profile's last recorded run.",
    "safegate_profile_last_peak_memory_bytes": "Peak memory of the profile's last recorded run.",
    "safegate_profile_last_run_timestamp_seconds": "When the profile's last recorded run ended.",
    "safegate_scrape_timestamp_seconds": "When these figures were read.",
}


def _label(value: str) -> str:
    return printable(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, value: float, labels: Mapping[str, str] | None = None) -> str:
    text = repr(value) if isinstance(value, float) else str(int(value))
    if not labels:
        return f"{name} {text}"
    inner = ",".join(f'{key}="{_label(val)}"' for key, val in labels.items())
    return f"{name}{{{inner}}} {text}"


def prometheus_text(report: StatusReport, history: Mapping[str, list[Run]]) -> str:
    samples: dict[str, list[str]] = {name: [] for name in _HELP}

    def add(name: str, value: float | None, **labels: str) -> None:
        if value is not None and math.isfinite(value):
            samples[name].append(_sample(name, value, labels))

    m = report.memory
    add("safegate_memory_total_bytes", m.total)
    add("safegate_memory_available_bytes", m.available)
    add("safegate_memory_pressure_some_avg10", m.pressure_some_avg10)
    add("safegate_swap_used_bytes", report.swap_used)
    for reading in report.thermal.readings:
        add("safegate_temperature_celsius", reading.celsius, sensor=reading.key)
    for gpu in report.gpus.gpus:
        index = str(gpu.index)
        add("safegate_gpu_memory_used_bytes", gpu.used, gpu=index)
        add("safegate_gpu_memory_total_bytes", gpu.total, gpu=index)
        add("safegate_gpu_temperature_celsius", gpu.temp, gpu=index)
    for lock in report.locks:
        add("safegate_lock_held", 1 if lock.held else 0, lock=lock.name)
        holder = lock.holder if lock.held else None
        if holder is not None:
            add("safegate_lock_holder_need_bytes", holder.need, lock=lock.name, profile=holder.profile or "")
            add("safegate_lock_holder_used_bytes", holder.used, lock=lock.name, profile=holder.profile or "")
    for lock_name, (count, oldest) in waiters_by_lock(report).items():
        add("safegate_lock_waiters", count, lock=lock_name)
        add("safegate_lock_oldest_wait_seconds", oldest, lock=lock_name)
    for profile, runs in sorted(history.items()):
        add("safegate_profile_runs", len(runs), profile=profile)
        if runs:
            last = max(runs, key=lambda r: r.time)
            add("safegate_profile_last_exit_code", last.exit_code, profile=profile)
            add("safegate_profile_last_peak_memory_bytes", last.peak_memory, profile=profile)
            add("safegate_profile_last_run_timestamp_seconds", last.time, profile=profile)
    add("safegate_scrape_timestamp_seconds", report.time)
    return "".join(_family(name, lines) for name, lines in samples.items() if lines)


def waiters_by_lock(report: StatusReport) -> dict[str, tuple[int, float]]:
    """Per lock, the waiters in line and the oldest one's wait in seconds: every lock of the lock dir (0 waiters
    for a free line), and the lock of every waiter ("" for profiles without a lock)."""
    lines: dict[str, tuple[int, float]] = {lock.name: (0, 0.0) for lock in report.locks
                                           if lock.legacy_pid is None}
    for ticket in report.waiters:
        name = ticket.lock or ""
        count, oldest = lines.get(name, (0, 0.0))
        waited = max(0.0, round(report.time - ticket.arrival / 1e9, 3))
        lines[name] = (count + 1, max(oldest, waited))
    return dict(sorted(lines.items()))


def _family(name: str, lines: Iterable[str]) -> str:
    return f"# HELP {name} {_HELP[name]}\n# TYPE {name} gauge\n" + "".join(f"{line}\n" for line in lines)
