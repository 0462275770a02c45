"""The fake NVML (tests/fake_nvml) seen through the real pynvml, each check in a fresh subprocess.

LD_LIBRARY_PATH is read by the dynamic linker when a process starts, so every check runs a small pynvml snippet
in a child Python started with nvml_env() and reads back the JSON it prints.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fake_nvml import (
    DRIVER_NOT_LOADED,
    GPU_IS_LOST,
    NOT_SUPPORTED,
    STATE_ENV,
    UNKNOWN,
    FakeGpu,
    FakeNvmlUnavailable,
    FakeProc,
    build_fake_nvml,
    find_nvml_include_dir,
    nvml_env,
    omittable_symbols,
    state_text,
    write_state,
)

GiB = 1 << 30
MiB = 1 << 20
INCLUDE = find_nvml_include_dir()

A100 = FakeGpu("NVIDIA A100-SXM4-80GB", "GPU-aaaaaaaa-1111-2222-3333-444444444444", total=80 * GiB, used=10 * GiB,
               reserved=512 * MiB, temp=61, slowdown=87, shutdown=92)
RTX = FakeGpu("NVIDIA GeForce RTX 4090", "GPU-bbbbbbbb-1111-2222-3333-444444444444", total=24 * GiB, used=0,
              reserved=300 * MiB, temp=35, slowdown=-1, shutdown=-1, mig=-1)

# Runs before every snippet: out() prints the result, error() names the exception a call raises (or None).
PRELUDE = '''
import ctypes, json, os, sys
import pynvml

def out(value):
    print(json.dumps(value))

def error(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except Exception as exc:
        return type(exc).__name__
    return None

def procs(entries):
    return [[p.pid, p.usedGpuMemory, p.gpuInstanceId, p.computeInstanceId] for p in entries]
'''


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: Any) -> Path:
    try:
        return build_fake_nvml(tmp_path_factory.mktemp(name), **kwargs)
    except FakeNvmlUnavailable as exc:
        pytest.skip(f"fake NVML cannot be built: {exc}")


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "fake-nvml")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "nvml-state"


def run_snippet(code: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def run_nvml(code: str, lib: Path, state: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """Run *code* against the fake library and return what it out()s."""
    proc = run_snippet(code, env if env is not None else nvml_env(lib, state), *args)
    assert proc.returncode == 0, f"snippet failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


# Everything the GPU probe reads, for every device.
SURVEY = '''
pynvml.nvmlInit()
gpus = []
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
    v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
    def threshold(kind):
        try:
            return pynvml.nvmlDeviceGetTemperatureThreshold(h, kind)
        except pynvml.NVMLError as exc:
            return type(exc).__name__
    try:
        mig = pynvml.nvmlDeviceGetMigMode(h)
    except pynvml.NVMLError as exc:
        mig = type(exc).__name__
    gpus.append({
        "index": pynvml.nvmlDeviceGetIndex(h),
        "name": pynvml.nvmlDeviceGetName(h),
        "uuid": pynvml.nvmlDeviceGetUUID(h),
        "v1": [v1.total, v1.free, v1.used],
        "v2": [v2.version, v2.total, v2.reserved, v2.free, v2.used],
        "temp": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
        "tempV": pynvml.nvmlDeviceGetTemperatureV(h, pynvml.NVML_TEMPERATURE_GPU),
        "slowdown": threshold(pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
        "shutdown": threshold(pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN),
        "compute": procs(pynvml.nvmlDeviceGetComputeRunningProcesses(h)),
        "graphics": procs(pynvml.nvmlDeviceGetGraphicsRunningProcesses(h)),
        "mig": mig,
    })
out({"driver": pynvml.nvmlSystemGetDriverVersion(), "gpus": gpus})
pynvml.nvmlShutdown()
'''
SURVEY_PROCS = (FakeProc(0, 4242, 3 * GiB), FakeProc(0, 4243, None), FakeProc(1, 77, 200 * MiB, kind="graphics"))


# --------------------------------------------------------------------------------------------------------------
# The build


@pytest.mark.parametrize("include", [INCLUDE], ids=[f"header={INCLUDE / 'nvml.h' if INCLUDE else 'own-types'}"])
def test_build_uses_the_real_header_when_installed(lib: Path, state: Path, include: Path | None) -> None:
    """With nvidia-nvml-dev-cu12 installed the library is compiled against its nvml.h; every symbol is there."""
    got = run_nvml('''
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        lib.fakeNvmlBuildInfo.restype = ctypes.c_char_p
        out({"info": lib.fakeNvmlBuildInfo().decode(),
             "missing": [name for name in sys.argv[1:] if not hasattr(lib, name)]})
    ''', lib, state, *omittable_symbols())
    assert got["missing"] == []
    if include is None:
        assert got["info"] == "header=own-types"
    else:
        assert got["info"].startswith("header=nvml.h api=")


def test_own_types_build_behaves_like_the_real_header_build(
        tmp_path_factory: pytest.TempPathFactory, lib: Path, state: Path) -> None:
    own = _build(tmp_path_factory, "fake-nvml-own", own_types=True)
    write_state(state, [A100, RTX], SURVEY_PROCS)
    assert run_nvml(SURVEY, own, state) == run_nvml(SURVEY, lib, state)
    info = run_nvml('''
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        lib.fakeNvmlBuildInfo.restype = ctypes.c_char_p
        out(lib.fakeNvmlBuildInfo().decode())
    ''', own, state)
    assert info == "header=own-types"


def test_build_refuses_unknown_omit_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nvmlDeviceGetTemperatureW"):
        build_fake_nvml(tmp_path, omit=["nvmlDeviceGetTemperatureW"])
    with pytest.raises(TypeError):
        build_fake_nvml(tmp_path, omit="nvmlDeviceGetTemperatureV")


def test_build_without_gcc_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FakeNvmlUnavailable, match="gcc not found"):
        build_fake_nvml(tmp_path / "lib")


# --------------------------------------------------------------------------------------------------------------
# Devices


@pytest.mark.parametrize("how", ["missing file", "variable unset"])
def test_no_state_means_zero_gpus(lib: Path, state: Path, how: str) -> None:
    env = nvml_env(lib, state)
    if how == "variable unset":
        del env[STATE_ENV]
    got = run_nvml('''
        pynvml.nvmlInit()
        out([pynvml.nvmlDeviceGetCount(), pynvml.nvmlSystemGetDriverVersion(),
             error(pynvml.nvmlDeviceGetHandleByIndex, 0)])
    ''', lib, state, env=env)
    assert got == [0, "550.54.15", "NVMLError_InvalidArgument"]


@pytest.mark.parametrize("count", [0, 1, 4])
def test_device_count_names_and_uuids(lib: Path, state: Path, count: int) -> None:
    gpus = [FakeGpu(f"NVIDIA Test GPU {i}", f"GPU-{i:08x}-0000", total=(i + 1) * GiB, used=0) for i in range(count)]
    write_state(state, gpus, driver="535.183.01")
    got = run_nvml('''
        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        out({"driver": pynvml.nvmlSystemGetDriverVersion(),
             "devices": [[pynvml.nvmlDeviceGetIndex(h), pynvml.nvmlDeviceGetName(h), pynvml.nvmlDeviceGetUUID(h)]
                         for h in handles],
             "past_end": error(pynvml.nvmlDeviceGetHandleByIndex, n)})
    ''', lib, state)
    assert got == {
        "driver": "535.183.01",
        "devices": [[i, f"NVIDIA Test GPU {i}", f"GPU-{i:08x}-0000"] for i in range(count)],
        "past_end": "NVMLError_InvalidArgument",
    }


def test_survey_of_two_gpus(lib: Path, state: Path) -> None:
    write_state(state, [A100, RTX], SURVEY_PROCS)
    got = run_nvml(SURVEY, lib, state)
    a100, rtx = got["gpus"]
    assert (a100["name"], a100["uuid"], rtx["index"]) == (A100.name, A100.uuid, 1)
    assert (a100["temp"], a100["tempV"], a100["slowdown"], a100["shutdown"]) == (61, 61, 87, 92)
    assert (rtx["slowdown"], rtx["shutdown"], rtx["mig"]) == ("NVMLError_NotSupported",) * 3
    assert a100["mig"] == [0, 0]
    assert a100["compute"] == [[4242, 3 * GiB, 0xFFFFFFFF, 0xFFFFFFFF], [4243, None, 0xFFFFFFFF, 0xFFFFFFFF]]
    assert (a100["graphics"], rtx["compute"]) == ([], [])
    assert rtx["graphics"] == [[77, 200 * MiB, 0xFFFFFFFF, 0xFFFFFFFF]]


# --------------------------------------------------------------------------------------------------------------
# Memory


def test_memory_v1_used_includes_reserved_and_v2_does_not(lib: Path, state: Path) -> None:
    write_state(state, [A100])
    got = run_nvml('''
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        v1 = pynvml.nvmlDeviceGetMemoryInfo(h)
        v2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
        out({"v1": [v1.total, v1.free, v1.used], "v2": [v2.version, v2.total, v2.reserved, v2.free, v2.used],
             "v2_version": pynvml.nvmlMemory_v2,
             "wrong_version": error(pynvml.nvmlDeviceGetMemoryInfo, h, version=pynvml.nvmlMemory_v2 + 1)})
    ''', lib, state)
    free = A100.total - A100.used - A100.reserved
    assert got["v1"] == [A100.total, free, A100.used + A100.reserved]
    assert got["v2"] == [got["v2_version"], A100.total, A100.reserved, free, A100.used]
    assert got["v2_version"] == 0x02000028
    assert got["wrong_version"] == "NVMLError_ArgumentVersionMismatch"


@pytest.mark.parametrize(("mem_ret", "mem_v2_ret", "v1", "v2"), [
    (NOT_SUPPORTED, None, "NVMLError_NotSupported", "NVMLError_NotSupported"),
    (GPU_IS_LOST, None, "NVMLError_GpuIsLost", "NVMLError_GpuIsLost"),
    (0, NOT_SUPPORTED, None, "NVMLError_NotSupported"),
    (UNKNOWN, 0, "NVMLError_Unknown", None),
])
def test_memory_errors(lib: Path, state: Path, mem_ret: int, mem_v2_ret: int | None, v1: str | None,
                       v2: str | None) -> None:
    write_state(state, [replace(A100, mem_ret=mem_ret, mem_v2_ret=mem_v2_ret)])
    got = run_nvml('''
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out([error(pynvml.nvmlDeviceGetMemoryInfo, h),
             error(pynvml.nvmlDeviceGetMemoryInfo, h, version=pynvml.nvmlMemory_v2),
             error(pynvml.nvmlDeviceGetTemperature, h, pynvml.NVML_TEMPERATURE_GPU)])
    ''', lib, state)
    assert got == [v1, v2, None]


# --------------------------------------------------------------------------------------------------------------
# Temperature


def test_temperature_both_ways_and_its_errors(lib: Path, state: Path) -> None:
    write_state(state, [A100, replace(RTX, temp_ret=NOT_SUPPORTED), replace(RTX, temp_ret=GPU_IS_LOST)])
    got = run_nvml('''
        pynvml.nvmlInit()
        rows = []
        for i in range(3):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            row = []
            for call in (pynvml.nvmlDeviceGetTemperature, pynvml.nvmlDeviceGetTemperatureV):
                try:
                    row.append(call(h, pynvml.NVML_TEMPERATURE_GPU))
                except pynvml.NVMLError as exc:
                    row.append(type(exc).__name__)
            rows.append(row)
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out({"rows": rows, "other_sensor": error(pynvml.nvmlDeviceGetTemperature, h, 1)})
    ''', lib, state)
    assert got["rows"] == [[61, 61], ["NVMLError_NotSupported"] * 2, ["NVMLError_GpuIsLost"] * 2]
    # pynvml 13 knows a sensor 1 (NVML_TEMPERATURE_GPU_MAX); the CUDA 12 nvml.h has only NVML_TEMPERATURE_GPU.
    assert got["other_sensor"] == "NVMLError_InvalidArgument"


def test_temperature_v_checks_the_struct_version(lib: Path, state: Path) -> None:
    write_state(state, [A100])
    got = run_nvml('''
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        fn = pynvml.nvmlLib.nvmlDeviceGetTemperatureV
        results = []
        for version in (pynvml.nvmlTemperature_v1, pynvml.nvmlTemperature_v1 + 1):
            t = pynvml.c_nvmlTemperature_v1_t()
            t.version, t.sensorType = version, 0
            results.append([fn(h, ctypes.byref(t)), t.temperature])
        out(results)
    ''', lib, state)
    assert got == [[0, 61], [25, 0]]


def test_thresholds(lib: Path, state: Path) -> None:
    write_state(state, [A100, RTX])
    got = run_nvml('''
        pynvml.nvmlInit()
        rows = []
        for i in range(2):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            row = []
            for kind in (pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN, pynvml.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
                         pynvml.NVML_TEMPERATURE_THRESHOLD_GPU_MAX, pynvml.NVML_TEMPERATURE_THRESHOLD_COUNT):
                try:
                    row.append(pynvml.nvmlDeviceGetTemperatureThreshold(h, kind))
                except pynvml.NVMLError as exc:
                    row.append(type(exc).__name__)
            rows.append(row)
        out(rows)
    ''', lib, state)
    assert got == [
        [87, 92, "NVMLError_NotSupported", "NVMLError_InvalidArgument"],
        ["NVMLError_NotSupported", "NVMLError_NotSupported", "NVMLError_NotSupported", "NVMLError_InvalidArgument"],
    ]


# --------------------------------------------------------------------------------------------------------------
# Processes and MIG


def test_process_lists(lib: Path, state: Path) -> None:
    many = [FakeProc(2, 1000 + i, i * MiB) for i in range(40)]
    write_state(state, [A100, RTX, A100, replace(RTX, procs_ret=NOT_SUPPORTED)], [
        FakeProc(0, 100, GiB), FakeProc(0, 101, None), FakeProc(0, 200, 256 * MiB, kind="graphics"),
        FakeProc(0, 100, GiB, kind="graphics"), *many])
    got = run_nvml('''
        pynvml.nvmlInit()
        rows = []
        for i in range(4):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            row = []
            for call in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses,
                         pynvml.nvmlDeviceGetComputeRunningProcesses_v2,
                         pynvml.nvmlDeviceGetGraphicsRunningProcesses_v2):
                try:
                    row.append(procs(call(h)))
                except pynvml.NVMLError as exc:
                    row.append(type(exc).__name__)
            rows.append(row)
        out(rows)
    ''', lib, state)
    none = 0xFFFFFFFF
    compute0 = [[100, GiB, none, none], [101, None, none, none]]
    graphics0 = [[200, 256 * MiB, none, none], [100, GiB, none, none]]
    compute2 = [[1000 + i, i * MiB, none, none] for i in range(40)]
    assert got[0] == [compute0, graphics0, compute0, graphics0]
    assert got[1] == [[], [], [], []]
    assert got[2] == [compute2, [], compute2, []]
    assert got[3] == ["NVMLError_NotSupported"] * 4


def test_process_list_protocol_at_the_c_level(lib: Path, state: Path) -> None:
    """The two-call protocol of nvmlDeviceGet*RunningProcesses, and the legacy unversioned symbols."""
    write_state(state, [A100, RTX], [FakeProc(0, 10, MiB), FakeProc(0, 11, None), FakeProc(0, 12, 3 * MiB)])
    got = run_nvml('''
        lib = ctypes.CDLL("libnvidia-ml.so.1")
        res = {"before_init": lib.nvmlDeviceGetCount_v2(ctypes.byref(ctypes.c_uint()))}
        res["init_v1"], res["init_v2"] = lib.nvmlInit(), lib.nvmlInit_v2()
        count = ctypes.c_uint()
        res["count_v1"] = [lib.nvmlDeviceGetCount(ctypes.byref(count)), count.value]
        h = ctypes.c_void_p()
        res["handle_v1"] = lib.nvmlDeviceGetHandleByIndex(0, ctypes.byref(h))
        fn = lib.nvmlDeviceGetComputeRunningProcesses_v3
        n = ctypes.c_uint(0)
        res["probe"] = [fn(h, ctypes.byref(n), None), n.value]
        n = ctypes.c_uint(2)
        buf = (pynvml.c_nvmlProcessInfo_v2_t * 2)()
        res["too_small"] = [fn(h, ctypes.byref(n), buf), n.value]
        n = ctypes.c_uint(8)
        res["null_infos"] = fn(h, ctypes.byref(n), None)
        res["null_count"] = fn(h, None, None)
        buf = (pynvml.c_nvmlProcessInfo_v2_t * 8)()
        n = ctypes.c_uint(8)
        res["fill"] = [fn(h, ctypes.byref(n), buf), n.value, [buf[i].pid for i in range(n.value)]]

        class V1(ctypes.Structure):
            _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong)]
        buf = (V1 * 4)()
        n = ctypes.c_uint(4)
        res["v1"] = [lib.nvmlDeviceGetComputeRunningProcesses(h, ctypes.byref(n), buf), n.value,
                     [[buf[i].pid, buf[i].usedGpuMemory] for i in range(n.value)]]
        h1 = ctypes.c_void_p()
        lib.nvmlDeviceGetHandleByIndex_v2(1, ctypes.byref(h1))
        n = ctypes.c_uint(0)
        res["empty"] = [lib.nvmlDeviceGetGraphicsRunningProcesses_v3(h1, ctypes.byref(n), None), n.value]
        res["bad_handle"] = lib.nvmlDeviceGetIndex(ctypes.c_void_p(id(res)), ctypes.byref(n))
        res["null_handle"] = lib.nvmlDeviceGetIndex(None, ctypes.byref(n))
        out(res)
    ''', lib, state)
    assert got == {
        "before_init": 1,  # NVML_ERROR_UNINITIALIZED
        "init_v1": 0, "init_v2": 0, "count_v1": [0, 2], "handle_v1": 0,
        "probe": [7, 3],  # NVML_ERROR_INSUFFICIENT_SIZE, and the size needed
        "too_small": [7, 3],
        "null_infos": 2, "null_count": 2,  # NVML_ERROR_INVALID_ARGUMENT
        "fill": [0, 3, [10, 11, 12]],
        "v1": [0, 3, [[10, MiB], [11, 0xFFFFFFFFFFFFFFFF], [12, 3 * MiB]]],
        "empty": [0, 0],
        "bad_handle": 2, "null_handle": 2,
    }


def test_mig_mode(lib: Path, state: Path) -> None:
    write_state(state, [replace(A100, mig=1), A100, RTX])
    got = run_nvml('''
        pynvml.nvmlInit()
        rows = []
        for i in range(3):
            try:
                rows.append(pynvml.nvmlDeviceGetMigMode(pynvml.nvmlDeviceGetHandleByIndex(i)))
            except pynvml.NVMLError as exc:
                rows.append(type(exc).__name__)
        out(rows)
    ''', lib, state)
    assert got == [[1, 1], [0, 0], "NVMLError_NotSupported"]


# --------------------------------------------------------------------------------------------------------------
# Clock-event reasons


def test_clock_event_reasons_under_the_new_and_the_old_name(lib: Path, state: Path) -> None:
    hw = 0x8 | 0x40 | 1 << 63  # HW slowdown, HW thermal slowdown and a bit no pynvml names: the whole 64-bit word
    write_state(state, [A100, replace(RTX, clocks=hw), replace(A100, clocks=0x20, clocks_ret=NOT_SUPPORTED)])
    got = run_nvml('''
        pynvml.nvmlInit()
        rows = []
        for i in range(3):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            row = []
            for call in (pynvml.nvmlDeviceGetCurrentClocksEventReasons,
                         pynvml.nvmlDeviceGetCurrentClocksThrottleReasons):
                try:
                    row.append(call(h))
                except pynvml.NVMLError as exc:
                    row.append(type(exc).__name__)
            rows.append(row)
        out(rows)
    ''', lib, state)
    assert got == [[0, 0], [hw, hw], ["NVMLError_NotSupported", "NVMLError_NotSupported"]]


def test_a_driver_without_the_clock_event_reasons(tmp_path_factory: pytest.TempPathFactory, state: Path) -> None:
    lib = _build(tmp_path_factory, "fake-nvml-no-clocks", omit=["nvmlDeviceGetCurrentClocksEventReasons",
                                                                 "nvmlDeviceGetCurrentClocksThrottleReasons"])
    write_state(state, [replace(A100, clocks=0x8)])
    got = run_nvml('''
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out([error(pynvml.nvmlDeviceGetCurrentClocksEventReasons, h),
             error(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons, h)])
    ''', lib, state)
    assert got == ["NVMLError_FunctionNotFound", "NVMLError_FunctionNotFound"]


@pytest.mark.parametrize(("token", "message"), [
    ("clocks=-1", "clocks=-1"),
    ("clocks=0xZZ", "clocks=0xZZ"),
    ("clocks=0x10000000000000000", "clocks=0x10000000000000000"),
    ("clocks_ret=-3", "clocks_ret=-3"),
])
def test_a_bad_clocks_value_fails_loudly(lib: Path, state: Path, token: str, message: str) -> None:
    state.write_text(f"device name=x uuid=y total=10 used=0 {token}\n", encoding="utf-8")
    proc = run_snippet('''
        out(error(pynvml.nvmlInit))
    ''', nvml_env(lib, state))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "NVMLError_Unknown" and message in proc.stderr


@pytest.mark.parametrize("clocks", [-1, 1 << 64])
def test_write_state_refuses_a_mask_past_64_bits(tmp_path: Path, clocks: int) -> None:
    with pytest.raises(ValueError, match="64-bit"):
        write_state(tmp_path / "state", [replace(A100, clocks=clocks)])
    assert state_text([replace(A100, clocks=0x48)]).count(" clocks=0x48 clocks_ret=0") == 1


# --------------------------------------------------------------------------------------------------------------
# Initialisation, handles, errors


def test_init_error_driver_not_loaded(lib: Path, state: Path) -> None:
    write_state(state, [A100], init_error=DRIVER_NOT_LOADED)
    got = run_nvml('''
        try:
            pynvml.nvmlInit()
            out("initialised")
        except pynvml.NVMLError as exc:
            out([type(exc).__name__, exc.value, str(exc)])
    ''', lib, state)
    assert got == ["NVMLError_DriverNotLoaded", 9, "Driver Not Loaded"]


def test_init_is_reference_counted(lib: Path, state: Path) -> None:
    write_state(state, [A100])
    got = run_nvml('''
        pynvml.nvmlInit()
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        res = [pynvml.nvmlDeviceGetCount()]
        pynvml.nvmlShutdown()
        res += [error(pynvml.nvmlDeviceGetCount), error(pynvml.nvmlShutdown)]
        out(res)
    ''', lib, state)
    assert got == [1, "NVMLError_Uninitialized", "NVMLError_Uninitialized"]


def test_handle_errors(lib: Path, state: Path) -> None:
    write_state(state, [A100, replace(RTX, handle_ret=GPU_IS_LOST)])
    got = run_nvml('''
        pynvml.nvmlInit()
        out([pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0)),
             error(pynvml.nvmlDeviceGetHandleByIndex, 1), error(pynvml.nvmlDeviceGetHandleByIndex, 2)])
    ''', lib, state)
    assert got == [A100.name, "NVMLError_GpuIsLost", "NVMLError_InvalidArgument"]


def test_error_strings(lib: Path, state: Path) -> None:
    got = run_nvml('''
        pynvml._LoadNvmlLibrary()  # nvmlErrorString needs the library loaded, not initialised
        out([pynvml.nvmlErrorString(code) for code in (0, 2, 3, 9, 13, 15, 999, 12345)])
    ''', lib, state)
    assert got == ["Success", "Invalid Argument", "Not Supported", "Driver Not Loaded", "Function Not Found",
                   "GPU is lost", "Unknown Error", "Unknown Error"]


# --------------------------------------------------------------------------------------------------------------
# Missing functions and library


@pytest.fixture(scope="module")
def lib_without_temperature_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "fake-nvml-no-tempv", omit=["nvmlDeviceGetTemperatureV"])


def test_omitted_function_is_function_not_found(lib_without_temperature_v: Path, state: Path) -> None:
    write_state(state, [A100])
    got = run_nvml('''
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out([hasattr(pynvml.nvmlLib, "nvmlDeviceGetTemperatureV"),
             error(pynvml.nvmlDeviceGetTemperatureV, h, pynvml.NVML_TEMPERATURE_GPU),
             pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)])
    ''', lib_without_temperature_v, state)
    assert got == [False, "NVMLError_FunctionNotFound", 61]


def test_missing_v3_process_lists_raise_a_library_mismatch_not_an_nvml_error(
        tmp_path_factory: pytest.TempPathFactory, state: Path) -> None:
    """pynvml's unversioned nvmlDevice*RunningProcesses turn FunctionNotFound into NVMLLibraryMismatchError,
    which is not an NVMLError: `except NVMLError_FunctionNotFound` does not catch it."""
    lib = _build(tmp_path_factory, "fake-nvml-no-v3",
                 omit=["nvmlDeviceGetComputeRunningProcesses_v3", "nvmlDeviceGetGraphicsRunningProcesses_v3"])
    write_state(state, [A100], [FakeProc(0, 5, MiB)])
    got = run_nvml('''
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out([error(pynvml.nvmlDeviceGetComputeRunningProcesses, h),
             error(pynvml.nvmlDeviceGetGraphicsRunningProcesses, h),
             issubclass(pynvml.NVMLLibraryMismatchError, pynvml.NVMLError),
             error(pynvml.nvmlDeviceGetComputeRunningProcesses_v3, h),
             procs(pynvml.nvmlDeviceGetComputeRunningProcesses_v2(h))])
    ''', lib, state)
    assert got == ["NVMLLibraryMismatchError", "NVMLLibraryMismatchError", False, "NVMLError_FunctionNotFound",
                   [[5, MiB, 0xFFFFFFFF, 0xFFFFFFFF]]]


def test_no_library_is_library_not_found(tmp_path: Path, state: Path) -> None:
    if ctypes.util.find_library("nvidia-ml"):
        pytest.skip(f"a real NVML is installed ({ctypes.util.find_library('nvidia-ml')}): it would be found")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = nvml_env(empty, state)
    got = run_nvml('''
        try:
            found = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            found = None
        out([found and found._name, error(pynvml.nvmlInit)])
    ''', empty, state, env=env)
    if got[0] is not None:
        pytest.skip("libnvidia-ml.so.1 is loadable here without the fake (LD_LIBRARY_PATH or default paths)")
    assert got == [None, "NVMLError_LibraryNotFound"]


# --------------------------------------------------------------------------------------------------------------
# The state file


def test_state_is_reread_on_every_call(lib: Path, state: Path, tmp_path: Path) -> None:
    write_state(state, [A100])
    grown = tmp_path / "grown"
    write_state(grown, [replace(A100, used=20 * GiB), RTX], [FakeProc(1, 9, None)])
    gone = tmp_path / "gone"
    write_state(gone, [], init_error=DRIVER_NOT_LOADED)
    got = run_nvml('''
        state, grown, gone = sys.argv[1:]
        pynvml.nvmlInit()
        h0 = pynvml.nvmlDeviceGetHandleByIndex(0)
        res = [pynvml.nvmlDeviceGetCount(), pynvml.nvmlDeviceGetMemoryInfo(h0).used]
        os.replace(grown, state)
        h1 = pynvml.nvmlDeviceGetHandleByIndex(1)
        res += [pynvml.nvmlDeviceGetCount(), pynvml.nvmlDeviceGetMemoryInfo(h0).used, pynvml.nvmlDeviceGetName(h1),
                procs(pynvml.nvmlDeviceGetComputeRunningProcesses(h1))]
        os.replace(gone, state)  # init_error no longer matters once initialised
        res += [pynvml.nvmlDeviceGetCount(), error(pynvml.nvmlDeviceGetName, h1)]
        out(res)
    ''', lib, state, str(state), str(grown), str(gone))
    assert got == [1, A100.used + A100.reserved,
                   2, 20 * GiB + A100.reserved, RTX.name, [[9, None, 0xFFFFFFFF, 0xFFFFFFFF]],
                   0, "NVMLError_InvalidArgument"]


@pytest.mark.parametrize(("text", "message"), [
    ("colour=red\n", "unknown setting 'colour'"),
    ("gpu name=x\n", "unknown directive 'gpu'"),
    ("device name=x uuid=y total=10\n", "name, uuid, total and used are required"),
    ("device name=x uuid=y total=10 used=8 reserved=4\n", "used + reserved exceeds total"),
    ("device name=x uuid=y total=ten used=0\n", "total=ten"),
    ("device name=x uuid=y total=10 used=0 color=red\n", "unknown key 'color'"),
    ("device name=x uuid=y total=10 used=0\nproc gpu=1 pid=5 used=0\n", "no device 1"),
    ("device name=x uuid=y total=10 used=0\n" * 17, "more than 16 devices"),
    (f"device name={'x' * 96} uuid=y total=10 used=0\n", "longer than 95"),
    ("init_error=-3\n", "init_error=-3"),
])
def test_a_bad_state_file_fails_loudly(lib: Path, state: Path, text: str, message: str) -> None:
    state.write_text(text, encoding="utf-8")
    proc = run_snippet('''
        out(error(pynvml.nvmlInit))
    ''', nvml_env(lib, state))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == "NVMLError_Unknown"
    assert f"{state}:" in proc.stderr and message in proc.stderr


def test_state_file_format(tmp_path: Path) -> None:
    text = state_text([replace(A100, mem_v2_ret=NOT_SUPPORTED)], [FakeProc(0, 7, None, kind="graphics")],
                      init_error=UNKNOWN, driver="560.35.03")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[:2] == ["init_error=999", "driver=560.35.03"]
    assert lines[2].startswith("device name=NVIDIA_A100-SXM4-80GB uuid=GPU-aaaaaaaa-")
    assert " mem_ret=0 mem_v2_ret=3 " in lines[2]
    assert lines[3] == "proc gpu=0 pid=7 used=-1 kind=graphics"
    path = tmp_path / "state"
    write_state(path, [A100])
    write_state(path, [A100, RTX])
    assert path.read_text(encoding="utf-8").count("\ndevice ") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]  # no temporary file left behind


@pytest.mark.parametrize(("gpus", "procs"), [
    ([replace(A100, name="under_score")], []),
    ([replace(A100, uuid="GPU-1#2")], []),
    ([replace(A100, used=80 * GiB)], []),
    ([A100], [FakeProc(1, 5, 0)]),
    ([A100], [FakeProc(0, 5, 0, kind="both")]),
])
def test_write_state_refuses_what_the_file_cannot_say(tmp_path: Path, gpus: list[FakeGpu],
                                                      procs: list[FakeProc]) -> None:
    with pytest.raises(ValueError):
        write_state(tmp_path / "state", gpus, procs)
    assert list(tmp_path.iterdir()) == []


def test_nvml_env(tmp_path: Path) -> None:
    env = nvml_env(tmp_path / "lib", tmp_path / "state", {"PATH": "/bin"})
    assert env == {"PATH": "/bin", "LD_LIBRARY_PATH": str(tmp_path / "lib"), STATE_ENV: str(tmp_path / "state")}
    env = nvml_env(tmp_path / "lib", tmp_path / "state", {"LD_LIBRARY_PATH": "/opt/x"})
    assert env["LD_LIBRARY_PATH"] == f"{tmp_path / 'lib'}{os.pathsep}/opt/x"
    assert nvml_env(tmp_path, tmp_path / "s", {"LD_LIBRARY_PATH": ""})["LD_LIBRARY_PATH"] == str(tmp_path)
