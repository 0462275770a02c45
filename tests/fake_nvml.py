"""A fake NVIDIA NVML (libnvidia-ml.so.1) for tests: GPU code runs end to end on a machine without a GPU.

Build the library from ``tests/fake_nvml/fake_nvml.c`` with :func:`build_fake_nvml`, describe the GPUs with
:func:`write_state`, and run the code under test in a subprocess with :func:`nvml_env` (pynvml loads
``libnvidia-ml.so.1`` through the dynamic linker, which reads LD_LIBRARY_PATH only when a process starts, so
setting it inside pytest has no effect)::

    lib = build_fake_nvml(tmp_path / "lib")
    write_state(tmp_path / "state", [FakeGpu("NVIDIA A100", "GPU-aaaa", total=80 << 30, used=1 << 30)])
    subprocess.run([sys.executable, "-c", code], env=nvml_env(lib, tmp_path / "state"))

The library re-reads the state file on every call, so a test may rewrite it (write_state is atomic) while a
process is using the library. The file format is described at the top of fake_nvml.c.

Header: the build compiles against the real ``nvml.h`` from the PyPI wheel ``nvidia-nvml-dev-cu12`` (found
through the ``nvidia`` namespace package: ``<site-packages>/nvidia/nvml_dev/include``), so struct layouts and
prototypes are NVIDIA's. Without that wheel it falls back to ``-DFAKE_NVML_OWN_TYPES``: fake_nvml.c then
defines the few types it needs itself, copied from pynvml's ctypes Structures. Both builds check the struct
sizes and version words pynvml relies on at compile time. The library's ``fakeNvmlBuildInfo()`` says which
was used ("header=nvml.h api=12" or "header=own-types").
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "fake_nvml" / "fake_nvml.c"
LIBRARY = "libnvidia-ml.so.1"
STATE_ENV = "FAKE_NVML_STATE"
DEFAULT_DRIVER = "550.54.15"

# nvmlReturn_t values (nvml.h; the same numbers as pynvml's NVML_SUCCESS / NVML_ERROR_*).
SUCCESS = 0
UNINITIALIZED = 1
INVALID_ARGUMENT = 2
NOT_SUPPORTED = 3
NO_PERMISSION = 4
INSUFFICIENT_SIZE = 7
DRIVER_NOT_LOADED = 9
LIBRARY_NOT_FOUND = 12  # pynvml's own, when libnvidia-ml.so.1 cannot be loaded; never returned by the library
FUNCTION_NOT_FOUND = 13  # pynvml's own, when the library lacks a symbol; never returned by the library
GPU_IS_LOST = 15
ARGUMENT_VERSION_MISMATCH = 25
UNKNOWN = 999

# NVML_VALUE_NOT_AVAILABLE as an unsigned long long: what a process's usedGpuMemory reads when unknown.
VALUE_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFF


class FakeNvmlUnavailable(Exception):
    """The fake library cannot be built here (no compiler, or it failed); str() is the reason."""


@dataclass(frozen=True)
class FakeGpu:
    """One ``device`` line; devices get indexes 0, 1, ... in the order given to write_state."""

    name: str
    uuid: str
    total: int  # bytes
    used: int  # bytes allocated by processes; nvmlDeviceGetMemoryInfo (v1) reports used + reserved
    reserved: int = 0  # bytes the driver keeps for itself
    temp: int = 40  # degrees C
    slowdown: int = 90  # NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, -1: NVML_ERROR_NOT_SUPPORTED
    shutdown: int = 95  # NVML_TEMPERATURE_THRESHOLD_SHUTDOWN, -1: NVML_ERROR_NOT_SUPPORTED
    mem_ret: int = 0  # nvmlDeviceGetMemoryInfo returns this instead of the memory, when not 0
    mem_v2_ret: int | None = None  # the same for nvmlDeviceGetMemoryInfo_v2; None: mem_ret
    temp_ret: int = 0  # nvmlDeviceGetTemperature and nvmlDeviceGetTemperatureV
    handle_ret: int = 0  # nvmlDeviceGetHandleByIndex(_v2) for this index
    mig: int = 0  # nvmlDeviceGetMigMode current and pending; -1: NVML_ERROR_NOT_SUPPORTED (no MIG support)
    procs_ret: int = 0  # the compute and graphics process lists (every version)
    clocks: int = 0  # the clock-event reasons mask (nvmlClocksEventReason* bits), under the new and the old call
    clocks_ret: int = 0  # both clock-event reasons calls return this instead, when not 0


@dataclass(frozen=True)
class FakeProc:
    """One ``proc`` line: a process NVML lists on GPU index *gpu*."""

    gpu: int
    pid: int
    used: int | None  # bytes; None: NVML_VALUE_NOT_AVAILABLE, which pynvml turns into usedGpuMemory=None
    kind: str = "compute"  # or "graphics"; a process in both lists needs two FakeProcs


def find_nvml_include_dir() -> Path | None:
    """The include directory of an installed nvidia-nvml-dev-cu12 wheel that holds nvml.h, or None."""
    candidates: list[Path] = []
    for name, sub in (("nvidia.nvml_dev", "include"), ("nvidia", "nvml_dev/include")):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(location) / sub for location in spec.submodule_search_locations]
    return next((path for path in candidates if (path / "nvml.h").is_file()), None)


def omittable_symbols() -> tuple[str, ...]:
    """Every function fake_nvml.c exports, each of which build_fake_nvml(omit=...) can leave out."""
    return tuple(re.findall(r"^#ifndef OMIT_(\w+)$", SOURCE.read_text(encoding="utf-8"), re.MULTILINE))


def build_fake_nvml(dest: Path, omit: Sequence[str] = (), *, own_types: bool = False) -> Path:
    """Compile ``dest/libnvidia-ml.so.1`` and return *dest* (the directory to put on LD_LIBRARY_PATH).

    *omit* names functions to leave out, as an older driver would: pynvml then raises
    NVMLError_FunctionNotFound for them. *own_types* skips the real nvml.h even where it is installed.
    Raises FakeNvmlUnavailable when there is no gcc or the compilation fails, ValueError for an unknown *omit*.
    """
    if isinstance(omit, str):
        raise TypeError("omit takes a sequence of function names, not one string")
    unknown = sorted(set(omit) - set(omittable_symbols()))
    if unknown:
        raise ValueError(f"fake_nvml.c exports no {', '.join(unknown)}")
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FakeNvmlUnavailable("gcc not found")
    dest.mkdir(parents=True, exist_ok=True)
    include = None if own_types else find_nvml_include_dir()
    cmd = [gcc, "-shared", "-fPIC", "-Wall", "-Wextra", "-O2", f"-Wl,-soname,{LIBRARY}",
           "-o", str(dest / LIBRARY), str(SOURCE)]
    cmd += [f"-I{include}"] if include is not None else ["-DFAKE_NVML_OWN_TYPES"]
    cmd += [f"-DOMIT_{name}" for name in omit]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FakeNvmlUnavailable(f"cannot run gcc: {exc}") from exc
    if proc.returncode != 0:
        raise FakeNvmlUnavailable(f"gcc failed ({' '.join(cmd)}):\n{proc.stderr.strip()}")
    return dest


def _text(value: str, what: str) -> str:
    """A string value as the state file spells it: '_' for each space."""
    bad = set(value) & {"_", "#", "=", "\t", "\n", "\r", "\v", "\f"}
    if bad:
        raise ValueError(f"{what} {value!r}: the state file cannot hold {''.join(sorted(bad))!r}")
    return value.replace(" ", "_")


def _ret(value: int, what: str) -> int:
    if value < 0:
        raise ValueError(f"{what}={value}: NVML return codes are not negative")
    return value


def _mask(value: int) -> str:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"clocks={value}: the clock-event reasons are an unsigned 64-bit mask")
    return hex(value)


def state_text(gpus: Iterable[FakeGpu], procs: Iterable[FakeProc] = (), init_error: int = 0,
               driver: str = DEFAULT_DRIVER) -> str:
    """The state file's contents for these GPUs and processes."""
    gpus = list(gpus)
    lines = ["# fake NVML state (tests/fake_nvml.py)",
             f"init_error={_ret(init_error, 'init_error')}",
             f"driver={_text(driver, 'driver')}"]
    for gpu in gpus:
        if min(gpu.total, gpu.used, gpu.reserved) < 0 or gpu.used + gpu.reserved > gpu.total:
            raise ValueError(f"GPU {gpu.uuid}: need 0 <= used + reserved <= total, have {gpu}")
        mem_v2_ret = gpu.mem_ret if gpu.mem_v2_ret is None else gpu.mem_v2_ret
        lines.append(
            f"device name={_text(gpu.name, 'name')} uuid={_text(gpu.uuid, 'uuid')} total={gpu.total} "
            f"used={gpu.used} reserved={gpu.reserved} temp={gpu.temp} slowdown={gpu.slowdown} "
            f"shutdown={gpu.shutdown} mem_ret={_ret(gpu.mem_ret, 'mem_ret')} "
            f"mem_v2_ret={_ret(mem_v2_ret, 'mem_v2_ret')} temp_ret={_ret(gpu.temp_ret, 'temp_ret')} "
            f"handle_ret={_ret(gpu.handle_ret, 'handle_ret')} procs_ret={_ret(gpu.procs_ret, 'procs_ret')} "
            f"mig={gpu.mig} clocks={_mask(gpu.clocks)} clocks_ret={_ret(gpu.clocks_ret, 'clocks_ret')}")
    for proc in procs:
        if proc.kind not in ("compute", "graphics"):
            raise ValueError(f"process kind {proc.kind!r}: expected compute or graphics")
        if not 0 <= proc.gpu < len(gpus):
            raise ValueError(f"process {proc.pid} is on GPU {proc.gpu}, and there are {len(gpus)} GPUs")
        used = -1 if proc.used is None else proc.used
        lines.append(f"proc gpu={proc.gpu} pid={proc.pid} used={used} kind={proc.kind}")
    return "\n".join(lines) + "\n"


def write_state(path: Path, gpus: Iterable[FakeGpu], procs: Iterable[FakeProc] = (), init_error: int = 0,
                driver: str = DEFAULT_DRIVER) -> None:
    """Write the state file atomically (a temporary file in the same directory, then os.replace)."""
    text = state_text(gpus, procs, init_error, driver)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def nvml_env(lib_dir: Path, state: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of *base* (default os.environ) with *lib_dir* first on LD_LIBRARY_PATH and FAKE_NVML_STATE set."""
    env = dict(os.environ if base is None else base)
    env.pop("SAFEGATE_GPU", None)  # the suite's hermetic "none" keeps real GPUs out; here the fake is the point
    old = env.get("LD_LIBRARY_PATH")
    # No empty entry: the dynamic linker reads one as the current directory.
    env["LD_LIBRARY_PATH"] = f"{lib_dir}{os.pathsep}{old}" if old else str(lib_dir)
    env[STATE_ENV] = str(state)
    return env
