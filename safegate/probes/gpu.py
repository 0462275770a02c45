"""NVIDIA GPUs through NVML (nvidia-ml-py's pynvml), behind one thin layer with an explicit error policy.

- NVML is imported and initialised once per process, lazily, and only when the backend asks for it.
- backend "none" never touches it; "auto" uses it when libnvidia-ml.so.1 can be loaded (LD_LIBRARY_PATH
  included) and otherwise reports no GPUs, silently; "nvml" always uses it and says why it cannot.
- A device that errors (GPU is lost, unknown error) is reported as failed: the policy blocks on it.
- A function the driver lacks is noted once per process and its older sibling used instead
  (nvmlDeviceGetMemoryInfo_v2 -> v1, nvmlDeviceGetTemperatureV -> nvmlDeviceGetTemperature, the v3 process
  lists -> v2, nvmlDeviceGetCurrentClocksEventReasons -> its old name ...ThrottleReasons), all through one
  funnel (_newest).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import msgspec

from safegate.errors import UsageError
from safegate.probes import drm
from safegate.probes.snapshots import GpuInfo, GpuProcess, GpuSnapshot
from safegate.units import BACKENDS

LIBRARY = "libnvidia-ml.so.1"
T = TypeVar("T")
# The snapshot types live in safegate.probes.snapshots (policy.py reads them without importing a probe); they are
# re-exported because read_gpus returns them and its callers name them.
__all__ = ["LIBRARY", "GpuInfo", "GpuProcess", "GpuSnapshot", "gpu_backend", "gpu_indexes", "host_pid_map", "read_gpus"]


def gpu_backend(configured: str, env: Mapping[str, str]) -> str:
    """The GPU backend in effect: SAFEGATE_GPU beats [gpu] backend; its bad values are usage errors."""
    value = (env.get("SAFEGATE_GPU") or configured).strip().lower()
    if value not in BACKENDS:
        raise UsageError(f"SAFEGATE_GPU: invalid GPU backend {value!r}: expected auto, nvml, drm or none")
    return value


class _Nvml:
    """The process's one NVML session."""

    def __init__(self) -> None:
        self.module: Any = None
        self.failure: str | None = None  # why NVML is unusable, once tried
        self.library_missing = False
        self.missing: set[str] = set()  # functions the driver lacks, noted once
        self.notes: list[str] = []
        self.driver: str | None = None
        self.reason_bits: dict[int, str] | None = None  # pynvml's clock-event reason names by bit, once read

    def start(self) -> bool:
        if self.module is not None:
            return True
        if self.failure is not None:
            return False
        import ctypes

        try:
            # Cheap probe first: when the library cannot be loaded, do not even import pynvml.
            ctypes.CDLL(LIBRARY)
        except OSError as exc:
            self.library_missing = True
            self.failure = f"{LIBRARY} cannot be loaded ({exc})"
            return False
        import pynvml

        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            self.failure = f"NVML initialisation failed: {_message(exc)}"
            return False
        except pynvml.NVMLLibraryMismatchError as exc:  # not an NVMLError
            self.failure = f"NVML library mismatch: {exc}"
            return False
        self.module = pynvml
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            self.driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        except pynvml.NVMLError:
            self.driver = None
        return True

    def note_missing(self, function: str, *, older: bool = True) -> None:
        if function not in self.missing:
            self.missing.add(function)
            self.notes.append(f"NVML has no {function}; " + ("using its older form" if older else "not read"))


_session = _Nvml()


def _message(exc: BaseException) -> str:
    text = str(exc)
    return text.decode() if isinstance(text, bytes) else text


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_gpus(backend: str, drm_root: str = drm.SYSFS_ROOT) -> GpuSnapshot:
    """Every GPU, or why there are none: NVML's (backend auto or nvml), then the AMD and Intel cards of the
    kernel's DRM sysfs (backend auto or drm), numbered after NVIDIA's in card order (the documented --gpu order)."""
    if backend == "none":
        return GpuSnapshot(backend, "none", notes=("GPU backend is none",))
    nvidia = _read_nvml(backend) if backend != "drm" else GpuSnapshot(backend, "none")
    if backend == "nvml" or nvidia.status == "error":
        return nvidia
    cards, notes = drm.read_cards(drm_root, first_index=len(nvidia.gpus))
    if not cards:
        return msgspec.structs.replace(nvidia, notes=nvidia.notes + notes)
    return GpuSnapshot(backend, "ok", nvidia.gpus + cards, nvidia.driver, nvidia.notes + notes)


def _read_nvml(backend: str) -> GpuSnapshot:
    """Every GPU NVML reports, or why there are none."""
    session = _session
    if not session.start():
        assert session.failure is not None
        if backend == "nvml":
            return GpuSnapshot(backend, "error", notes=(session.failure,))
        quiet = () if session.library_missing else (session.failure,)
        return GpuSnapshot(backend, "none", notes=quiet)
    nvml = session.module
    try:
        count = int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        return GpuSnapshot(backend, "error", driver=session.driver, notes=(f"cannot count GPUs: {_message(exc)}",))
    gpus = tuple(_read_device(nvml, session, i) for i in range(count))
    status = "ok" if gpus else "none"
    return GpuSnapshot(backend, status, gpus, session.driver, tuple(session.notes))


def _read_device(nvml: Any, session: _Nvml, index: int) -> GpuInfo:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = _text(nvml.nvmlDeviceGetName(handle))
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    except nvml.NVMLError as exc:
        return GpuInfo(index, "?", "?", error=_message(exc))
    info: dict[str, Any] = {}
    try:
        info.update(_memory(nvml, session, handle))
        info["temp"] = _temperature(nvml, session, handle)
        info["slowdown"] = _optional(nvml, lambda: float(nvml.nvmlDeviceGetTemperatureThreshold(
            handle, nvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)))
        info["processes"] = _processes(nvml, session, handle)
        mig = _optional(nvml, lambda: nvml.nvmlDeviceGetMigMode(handle))
        info["mig_mode"] = int(mig[0]) if mig is not None else None
        info["clock_reasons"] = _clock_reasons(nvml, session, handle)
    except (nvml.NVMLError, nvml.NVMLLibraryMismatchError) as exc:
        return GpuInfo(index, name, uuid, error=_message(exc))
    return GpuInfo(index, name, uuid, **info)


def _optional(nvml: Any, call: Callable[[], Any]) -> Any:
    """A value the device may not support: None for NotSupported or a missing function."""
    try:
        return call()
    except (nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):
        return None


def _newest(nvml: Any, session: _Nvml, forms: Sequence[tuple[str, Callable[[], T]]], unsupported: T, *,
            none_is_unsupported: bool = False) -> T:
    """The first of *forms* (an NVML function's name, its call), newest first, that the driver has.

    A function the driver (or the installed pynvml) lacks is noted once per process and skipped from then on,
    however it shows: NVMLError_FunctionNotFound, NVMLLibraryMismatchError (what pynvml's unversioned wrappers raise
    for a missing symbol, and not an NVMLError) or a pynvml without the binding (AttributeError). NotSupported
    gives *unsupported*. A driver with none of the forms gives *unsupported* too where *none_is_unsupported*,
    else the last form's error (its oldest form is one every driver has: lacking it, the device fails).
    """
    missing = (nvml.NVMLError_FunctionNotFound, nvml.NVMLLibraryMismatchError, AttributeError)
    for position, (name, call) in enumerate(forms, 1):
        if name in session.missing:
            continue
        try:
            return call()
        except nvml.NVMLError_NotSupported:
            return unsupported
        except missing:
            if position == len(forms) and not none_is_unsupported:
                raise
            session.note_missing(name, older=position < len(forms))
    return unsupported


def _memory(nvml: Any, session: _Nvml, handle: Any) -> dict[str, int | None]:
    mem = _newest(nvml, session, [
        # v2 reports driver-reserved memory apart; v1's `used` includes it on R510+ drivers.
        ("nvmlDeviceGetMemoryInfo_v2", lambda: nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)),
        ("nvmlDeviceGetMemoryInfo", lambda: nvml.nvmlDeviceGetMemoryInfo(handle)),
    ], None)  # NotSupported: unified memory (e.g. Jetson)
    if mem is None:
        return {"total": None, "used": None, "free": None}
    return {"total": int(mem.total), "used": int(mem.used), "free": int(mem.free)}


def _temperature(nvml: Any, session: _Nvml, handle: Any) -> float | None:
    celsius = _newest(nvml, session, [
        ("nvmlDeviceGetTemperatureV", lambda: nvml.nvmlDeviceGetTemperatureV(handle, nvml.NVML_TEMPERATURE_GPU)),
        ("nvmlDeviceGetTemperature", lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
    ], None)
    return float(celsius) if celsius is not None else None


def _clock_reasons(nvml: Any, session: _Nvml, handle: Any) -> tuple[str, ...] | None:
    """Why the card holds its clocks down now, by name; None where it cannot say (NotSupported, or a driver with
    neither the call nor its pre-R535 name)."""
    mask = _newest(nvml, session, [
        ("nvmlDeviceGetCurrentClocksEventReasons", lambda: nvml.nvmlDeviceGetCurrentClocksEventReasons(handle)),
        ("nvmlDeviceGetCurrentClocksThrottleReasons",
         lambda: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)),
    ], None, none_is_unsupported=True)
    if mask is None:
        return None
    if session.reason_bits is None:
        session.reason_bits = reason_bits(nvml)
    return decode_clock_reasons(int(mask), session.reason_bits)


REASON_PREFIXES = ("nvmlClocksEventReason", "nvmlClocksThrottleReason")  # the new names first


def reason_bits(nvml: Any) -> dict[int, str]:
    """Each clock-event reason bit pynvml names, by its name less the prefix (0x40: "HwThermalSlowdown").

    Taken from the module, not written out here: a newer pynvml's reasons are named without a change here. The
    new names win over the old; of two names for one bit the first in sorted order ("ApplicationsClocksSetting",
    not its deprecated alias "UserDefinedClocks"); None (0) and All (many bits) are not reasons."""
    bits: dict[int, str] = {}
    for prefix in REASON_PREFIXES:
        for attr in sorted(a for a in dir(nvml) if a.startswith(prefix)):
            value = getattr(nvml, attr)
            if isinstance(value, int) and value > 0 and value & (value - 1) == 0:
                bits.setdefault(value, attr[len(prefix):])
    return bits


def decode_clock_reasons(mask: int, bits: Mapping[int, str]) -> tuple[str, ...]:
    """The reasons a mask (an unsigned 64-bit word) holds, lowest bit first; a bit *bits* does not name is kept,
    as its hex value ("0x800"), so a reason newer than the installed pynvml still shows."""
    mask &= (1 << 64) - 1
    return tuple(bits.get(1 << b, f"0x{1 << b:x}") for b in range(64) if mask >> b & 1)


def _process_list(nvml: Any, session: _Nvml, kind: str, handle: Any) -> list[Any]:
    """One process list, from the newest form the driver has (v3, else v2); none if it has neither."""
    name = "Compute" if kind == "compute" else "Graphics"
    v3, v2 = f"nvmlDeviceGet{name}RunningProcesses_v3", f"nvmlDeviceGet{name}RunningProcesses_v2"
    return _newest(nvml, session, [(v3, lambda: list(getattr(nvml, v3)(handle))),
                                   (v2, lambda: list(getattr(nvml, v2)(handle)))], [], none_is_unsupported=True)


def _processes(nvml: Any, session: _Nvml, handle: Any) -> tuple[GpuProcess, ...]:
    merged: dict[int, GpuProcess] = {}
    for kind in ("compute", "graphics"):
        for entry in _process_list(nvml, session, kind, handle):
            pid = int(entry.pid)
            used = entry.usedGpuMemory
            used = int(used) if used is not None else None
            if pid in merged:
                # A process in both lists reports the same memory twice: count it once.
                old = merged[pid]
                both = max((u for u in (old.used, used) if u is not None), default=None)
                merged[pid] = GpuProcess(pid, both, "both")
            else:
                merged[pid] = GpuProcess(pid, used, kind)
    return tuple(merged[p] for p in sorted(merged))


def gpu_indexes(proc_root: str = "/proc", drm_root: str = drm.SYSFS_ROOT) -> tuple[int, ...]:
    """The GPUs' indexes for shell completion: NVIDIA's as the driver lists them (one directory per card), without
    loading NVML, whose start can take seconds (NVML numbers the same cards 0..n-1), then the AMD and Intel cards."""
    from itertools import islice

    try:
        with os.scandir(os.path.join(proc_root, "driver", "nvidia", "gpus")) as entries:
            count = sum(1 for _ in islice(entries, 64))  # a machine has a handful; a bound, whatever is there
    except OSError:
        count = 0
    return tuple(range(count + len(drm.read_cards(drm_root)[0])))  # the AMD and Intel cards come after NVIDIA's


def host_pid_map(proc_root: str = "/proc") -> dict[int, int]:
    """NVML reports host pids; inside a PID namespace map them to ours through NSpid, where visible."""
    mapping: dict[int, int] = {}
    try:
        with open(f"{proc_root}/self/status", encoding="ascii", errors="replace") as fh:
            own = next((line.split()[1:] for line in fh if line.startswith("NSpid:")), [])
    except OSError:
        return mapping
    if len(own) < 2:
        return mapping  # not in a nested PID namespace (or the kernel does not say): pids agree
    for name in os.listdir(proc_root):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc_root}/{name}/status", encoding="ascii", errors="replace") as fh:
                ns = next((line.split()[1:] for line in fh if line.startswith("NSpid:")), [])
        except OSError:
            continue
        if len(ns) >= 2:
            mapping[int(ns[0])] = int(ns[-1])
    return mapping
