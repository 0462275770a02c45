"""NVIDIA's own reasons for holding its clocks down (NVML's clock-event reasons): HW slowdown, HW thermal slowdown
and the HW power brake block like heat (12) in check and are heat in exec's watch (--on-hot); SW thermal slowdown
only warns; a driver that cannot say is passed over quietly. End to end against the tests' fake
libnvidia-ml.so.1, and the pure parts (decoding a mask, the policy, the watcher) over synthetic values."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pynvml
import pytest
from fake_nvml import NOT_SUPPORTED, FakeGpu, FakeNvmlUnavailable, build_fake_nvml, nvml_env, write_state
from hypothesis import given
from hypothesis import strategies as st
from support import HELPERS, PY, TIMEOUT, OpenWatch, Procs, Run, job_pid, proc_state, wait_until

from safegate.exitcodes import ExitCode
from safegate.gate.policy import CLOCKS_BLOCK, CLOCKS_WARN, clock_trouble, with_clock_reasons
from safegate.gate.results import CheckResult, Status
from safegate.probes.gpu import decode_clock_reasons, reason_bits
from safegate.probes.snapshots import GpuInfo
from safegate.run.watchers import Kind, Reading, ThermalWatch

GiB = 1024**3
HW_SLOWDOWN = pynvml.nvmlClocksEventReasonHwSlowdown
HW_THERMAL = pynvml.nvmlClocksEventReasonHwThermalSlowdown
HW_POWER_BRAKE = pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown
SW_THERMAL = pynvml.nvmlClocksEventReasonSwThermalSlowdown
NEW, OLD = "nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, omit: tuple[str, ...] = ()) -> Path:
    try:
        return build_fake_nvml(tmp_path_factory.mktemp(name), omit)
    except FakeNvmlUnavailable as exc:
        pytest.skip(f"the fake NVML cannot be built here: {exc}")


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "nvml")


@pytest.fixture(scope="module")
def pre_r535_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driver from before the call's rename: only nvmlDeviceGetCurrentClocksThrottleReasons."""
    return _build(tmp_path_factory, "nvml-pre-r535", (NEW,))


@pytest.fixture(scope="module")
def no_reasons_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driver with neither name (older than 4.304, or a stripped-down one)."""
    return _build(tmp_path_factory, "nvml-no-reasons", (NEW, OLD))


def card(i: int, clocks: int = 0, **kw: object) -> FakeGpu:
    return FakeGpu(name=f"Fake GPU {i}", uuid=f"GPU-{i:04d}-0000", total=24 * GiB, used=4 * GiB, clocks=clocks,
                   **kw)  # type: ignore[arg-type]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "nvml-state"


@pytest.fixture
def gpu_env(env: dict[str, str], fake_lib: Path, state: Path) -> Callable[..., dict[str, str]]:
    def make(gpus: list[FakeGpu], lib: Path | None = None) -> dict[str, str]:
        write_state(state, gpus)
        return nvml_env(lib or fake_lib, state, base=env)

    return make


def check_json(run: Run, config: Path, env: dict[str, str], *args: str) -> tuple[int, dict, dict]:
    """check --json's exit code, its thermal check and its first GPU."""
    result = run("check", "--config", str(config), "--mem", "0", "--json", *args, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    data = json.loads(result.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    return result.returncode, checks["thermal"], checks["gpu"]["values"]["gpus"][0]


# --- check --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mask", "name", "words"), [
    (HW_SLOWDOWN, "HwSlowdown", "HW slowdown"),
    (HW_THERMAL, "HwThermalSlowdown", "HW thermal slowdown"),
    (HW_POWER_BRAKE, "HwPowerBrakeSlowdown", "HW power brake"),
])
def test_a_hw_reason_blocks_check_with_12_naming_it(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]],
                                                    mask: int, name: str, words: str) -> None:
    # A cool card (40 C, far below --max-temp) that holds its clocks down in hardware; the card idles too.
    code, thermal, gpu = check_json(run, config, gpu_env([card(0, mask | pynvml.nvmlClocksEventReasonGpuIdle)]))
    assert code == ExitCode.THERMAL
    assert thermal["status"] == "fail"
    assert thermal["reason"] == f"GPU 0 (Fake GPU 0): {words} (the card is throttling itself)"
    assert gpu["clock_reasons"] == ["GpuIdle", name] and gpu["temp"] == 40
    text = run("check", "--config", str(config), "--mem", "0", env=gpu_env([card(0, mask)]))
    assert text.returncode == ExitCode.THERMAL and f"GPU 0 (Fake GPU 0): {words}" in text.stdout


def test_sw_thermal_slowdown_passes_with_a_warning(run: Run, config: Path,
                                                   gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0, SW_THERMAL)])
    code, thermal, gpu = check_json(run, config, env)
    assert code == 0 and thermal["status"] == "warn" and gpu["clock_reasons"] == ["SwThermalSlowdown"]
    assert "GPU 0 (Fake GPU 0): SW thermal slowdown" in thermal["reason"] and "not blocking" in thermal["reason"]
    text = run("check", "--config", str(config), "--mem", "0", env=env)
    assert text.returncode == 0, text.stdout + text.stderr
    line = next(x for x in text.stdout.splitlines() if " thermal " in x)
    assert line.startswith("WARN") and "SW thermal slowdown" in line


def test_harmless_reasons_and_an_unknown_bit_pass(run: Run, config: Path,
                                                  gpu_env: Callable[..., dict[str, str]]) -> None:
    # Idle, the power cap, application clocks: how a card runs. A bit no pynvml names is shown, not judged.
    mask = pynvml.nvmlClocksEventReasonGpuIdle | pynvml.nvmlClocksEventReasonSwPowerCap | 1 << 40
    code, thermal, gpu = check_json(run, config, gpu_env([card(0, mask)]))
    assert code == 0 and thermal["status"] == "pass"
    assert gpu["clock_reasons"] == ["GpuIdle", "SwPowerCap", "0x10000000000"]


def test_a_reason_on_a_gpu_the_job_will_not_use_does_not_block(run: Run, config: Path,
                                                               gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0), card(1, HW_SLOWDOWN)])
    assert check_json(run, config, env, "--gpu", "0")[0] == 0
    assert check_json(run, config, env, "--gpu", "1")[0] == ExitCode.THERMAL
    assert check_json(run, config, env)[0] == ExitCode.THERMAL  # auto: the job may use either


def test_a_driver_before_the_rename_is_read_through_the_old_name(
        run: Run, config: Path, gpu_env: Callable[..., dict[str, str]], pre_r535_lib: Path) -> None:
    code, thermal, gpu = check_json(run, config, gpu_env([card(0, HW_THERMAL)], lib=pre_r535_lib))
    assert code == ExitCode.THERMAL and "HW thermal slowdown" in thermal["reason"]
    assert gpu["clock_reasons"] == ["HwThermalSlowdown"]


def test_a_driver_without_either_call_passes_quietly(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]],
                                                     no_reasons_lib: Path) -> None:
    # The state says HW slowdown, but this driver has no way to tell: unknown, never a failure.
    env = gpu_env([card(0, HW_SLOWDOWN)], lib=no_reasons_lib)
    result = run("check", "--config", str(config), "--mem", "0", "--json", env=env)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["thermal"]["status"] == "pass" and checks["gpu"]["status"] == "pass"
    gpu = checks["gpu"]["values"]
    assert gpu["gpus"][0]["clock_reasons"] is None and gpu["gpus"][0]["temp"] == 40
    assert f"NVML has no {NEW}; using its older form" in gpu["notes"]
    assert f"NVML has no {OLD}; not read" in gpu["notes"]


def test_a_card_that_does_not_support_the_call_passes(run: Run, config: Path,
                                                      gpu_env: Callable[..., dict[str, str]]) -> None:
    code, thermal, gpu = check_json(run, config, gpu_env([card(0, HW_SLOWDOWN, clocks_ret=NOT_SUPPORTED)]))
    assert code == 0 and thermal["status"] == "pass" and gpu["clock_reasons"] is None


def test_status_shows_the_reasons(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0, HW_POWER_BRAKE | pynvml.nvmlClocksEventReasonGpuIdle)])
    text = run("status", "--config", str(config), env=env)
    assert text.returncode == 0, text.stderr
    assert "clocks held down: HwPowerBrakeSlowdown" in text.stdout and "GpuIdle" not in text.stdout
    data = json.loads(run("status", "--config", str(config), "--json", env=env).stdout)
    assert data["gpus"]["devices"][0]["clock_reasons"] == ["GpuIdle", "HwPowerBrakeSlowdown"]


# --- exec's watch ---------------------------------------------------------------------------------------------


def exec_cmd(config: Path, *args: str) -> list[str]:
    return [PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--gpu", "0", "--grace", "2s",
            *args]


def test_hw_thermal_slowdown_mid_job_pauses_it_until_it_clears(
        run: Run, config: Path, sensor: Path, tmp_path: Path, lock_dir: Path, procs: Procs, state: Path,
        gpu_env: Callable[..., dict[str, str]]) -> None:
    ticks, stop, log = tmp_path / "ticks", tmp_path / "stop", tmp_path / "events.jsonl"
    env = gpu_env([card(0)])
    gate = procs.spawn(exec_cmd(config, "--on-hot", "pause", "--log", str(log), "--", PY,
                                str(HELPERS / "ticker.py"), str(ticks), "1000000", str(stop)),
                       env=env, stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir), what="the job to start")
    wait_until(ticks.exists, what="the first tick")
    write_state(state, [card(0, HW_THERMAL)])
    wait_until(lambda: proc_state(pid) == "T", what="the job to be paused")
    frozen = ticks.read_text()
    with OpenWatch(sensor) as reads:
        reads.wait_for(2, "two thermal samples while the card still throttles")  # one after the pause, at least
    assert proc_state(pid) == "T" and ticks.read_text() == frozen
    write_state(state, [card(0, pynvml.nvmlClocksEventReasonGpuIdle)])  # cleared; a stopped job leaves it idle
    wait_until(lambda: ticks.read_text() != frozen, what="the job to tick again")
    stop.touch()
    assert gate.wait(timeout=TIMEOUT) == 0
    assert gate.stderr is not None
    err = gate.stderr.read().decode()
    assert ("GPU 0 (Fake GPU 0): HW thermal slowdown (the card is throttling itself); pausing the job until the "
            "card clears it") in err
    assert "GPU 0: its clocks are no longer held down" in err and "resuming the job" in err
    events = [json.loads(line) for line in log.read_text().splitlines()]
    paused = next(e for e in events if e["event"] == "paused")
    assert paused["clock_reasons"] == ["HwThermalSlowdown"] and paused["sensor"] == "GPU 0" and paused["gpu"] == 0
    assert any(e["event"] == "resumed" for e in events)
    page = run("report", str(log), "-o", "-")  # the morning after: the pause is marked, its reason told
    assert page.returncode == 0 and "HW thermal slowdown" in page.stdout, page.stderr


def test_hw_slowdown_mid_job_with_on_hot_kill_stops_it_with_22(
        config: Path, lock_dir: Path, procs: Procs, state: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0)])
    gate = procs.spawn(exec_cmd(config, "--on-hot", "kill", "--", "sleep", "600"), env=env, stderr=subprocess.PIPE)
    wait_until(lambda: job_pid(lock_dir), what="the job to start")
    write_state(state, [card(0, HW_SLOWDOWN)])
    assert gate.wait(timeout=TIMEOUT) == ExitCode.KILLED_HOT
    assert gate.stderr is not None
    assert "GPU 0 (Fake GPU 0): HW slowdown (the card is throttling itself)" in gate.stderr.read().decode()


def test_hw_power_brake_mid_job_with_on_hot_warn_warns_once_and_runs_on(
        config: Path, sensor: Path, tmp_path: Path, lock_dir: Path, procs: Procs, state: Path,
        gpu_env: Callable[..., dict[str, str]]) -> None:
    log = tmp_path / "events.jsonl"
    env = gpu_env([card(0)])
    gate = procs.spawn(exec_cmd(config, "--on-hot", "warn", "--log", str(log), "--", "sleep", "600"), env=env,
                       stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir), what="the job to start")
    write_state(state, [card(0, HW_POWER_BRAKE)])
    wait_until(lambda: "HW power brake" in log.read_text(), what="the warning")
    with OpenWatch(sensor) as reads:
        reads.wait_for(2, "two more thermal samples with the brake on")
    assert proc_state(pid) in "RS" and gate.poll() is None
    warnings = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["clock_reasons"] == ["HwPowerBrakeSlowdown"]
    assert "GPU 0 (Fake GPU 0): HW power brake (the card is throttling itself)" in warnings[0]["message"]


def test_sw_thermal_slowdown_mid_job_warns_once(
        config: Path, sensor: Path, tmp_path: Path, lock_dir: Path, procs: Procs, state: Path,
        gpu_env: Callable[..., dict[str, str]]) -> None:
    log = tmp_path / "events.jsonl"
    env = gpu_env([card(0)])
    gate = procs.spawn(exec_cmd(config, "--on-hot", "kill", "--log", str(log), "--", "sleep", "600"), env=env,
                       stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir), what="the job to start")
    write_state(state, [card(0, SW_THERMAL)])
    wait_until(lambda: "SW thermal slowdown" in log.read_text(), what="the warning")
    with OpenWatch(sensor) as reads:
        reads.wait_for(3, "more thermal samples at the temperature target")
    assert proc_state(pid) in "RS" and gate.poll() is None  # even --on-hot kill lets it run
    warnings = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["clock_reasons"] == ["SwThermalSlowdown"]
    assert warnings[0]["message"].startswith("GPU 0 (Fake GPU 0): SW thermal slowdown")


# --- the pure parts -------------------------------------------------------------------------------------------


def test_reason_bits_come_from_pynvml() -> None:
    bits = reason_bits(pynvml)
    assert bits[HW_SLOWDOWN] == "HwSlowdown" and bits[HW_THERMAL] == "HwThermalSlowdown"
    assert bits[HW_POWER_BRAKE] == "HwPowerBrakeSlowdown" and bits[SW_THERMAL] == "SwThermalSlowdown"
    # The alias of a bit is not its name; the old prefix names bits the new one lacks.
    assert bits[pynvml.nvmlClocksEventReasonApplicationsClocksSetting] == "ApplicationsClocksSetting"
    if hasattr(pynvml, "nvmlClocksThrottleReasonBoardLimit"):
        assert bits[pynvml.nvmlClocksThrottleReasonBoardLimit] == "BoardLimit"
    assert all(value > 0 and value & (value - 1) == 0 for value in bits)  # no None (0), no All


def test_decoding_a_mask() -> None:
    bits = reason_bits(pynvml)
    assert decode_clock_reasons(0, bits) == ()
    assert decode_clock_reasons(HW_THERMAL | pynvml.nvmlClocksEventReasonGpuIdle, bits) == ("GpuIdle",
                                                                                             "HwThermalSlowdown")
    assert decode_clock_reasons(1 << 63 | HW_SLOWDOWN, bits) == ("HwSlowdown", "0x8000000000000000")
    assert decode_clock_reasons(1 << 70 | 1, {}) == ("0x1",)  # past 64 bits: not NVML's word


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_decoding_any_mask_names_each_bit_once(mask: int) -> None:
    bits = reason_bits(pynvml)
    names = decode_clock_reasons(mask, bits)
    assert len(names) == bin(mask).count("1") == len(set(names))
    back = {value for value, name in bits.items() if name in names}
    back |= {int(name, 16) for name in names if name.startswith("0x")}
    assert sum(back) == mask


def gpu(index: int, *reasons: str, temp: float | None = 40) -> GpuInfo:
    return GpuInfo(index, f"card {index}", f"GPU-{index}", temp=temp, clock_reasons=reasons)


PASS = CheckResult("thermal", Status.PASS, "hottest chip:t0 at 40 C < 80 C", ExitCode.THERMAL)


def test_policy_hw_reasons_block_sw_warns_others_pass() -> None:
    blocked = with_clock_reasons(PASS, [gpu(0), gpu(1, "GpuIdle", "HwSlowdown", "HwPowerBrakeSlowdown")])
    assert blocked.status is Status.FAIL and blocked.code is ExitCode.THERMAL
    assert blocked.reason == "GPU 1 (card 1): HW slowdown, HW power brake (the card is throttling itself)"
    warned = with_clock_reasons(PASS, [gpu(0, "SwThermalSlowdown")])
    assert warned.status is Status.WARN and warned.reason.startswith(PASS.reason + "; GPU 0 (card 0): SW thermal")
    for harmless in (gpu(0, "GpuIdle", "SwPowerCap", "0x800"), gpu(0), GpuInfo(0, "c", "u")):
        assert with_clock_reasons(PASS, [harmless]) == PASS
    assert with_clock_reasons(PASS, []) == PASS


def test_policy_keeps_a_heat_failure_first_and_an_unknown_unknown() -> None:
    hot = CheckResult("thermal", Status.FAIL, "GPU 0 (card 0) at 85 C >= 80 C", ExitCode.THERMAL)
    both = with_clock_reasons(hot, [gpu(0, "HwThermalSlowdown")])
    assert both.status is Status.FAIL and both.reason.startswith(hot.reason + "; GPU 0 (card 0): HW thermal")
    unknown = CheckResult("thermal", Status.UNKNOWN, "no readable temperature sensor; not blocking", ExitCode.THERMAL)
    soft = with_clock_reasons(unknown, [gpu(0, "SwThermalSlowdown")])
    assert soft.status is Status.UNKNOWN and "SW thermal slowdown" in soft.reason
    assert with_clock_reasons(unknown, [gpu(0, "HwSlowdown")]).status is Status.FAIL


def test_policy_tables_name_the_four_reasons() -> None:
    assert set(CLOCKS_BLOCK) == {"HwSlowdown", "HwThermalSlowdown", "HwPowerBrakeSlowdown"}
    assert set(CLOCKS_WARN) == {"SwThermalSlowdown"}
    assert clock_trouble(gpu(3, "SwThermalSlowdown"), CLOCKS_BLOCK) is None


def _watch(on_hot: str) -> ThermalWatch:
    from safegate.config.model import ThermalConfig
    from safegate.run.limits import WatchLimits

    return ThermalWatch(WatchLimits(max_mem=None, min_available=None, max_temp=80.0, resume_temp=70.0,
                                    on_hot=on_hot, grace=2.0, interval=0.01, warn_signal=None,
                                    thermal=ThermalConfig()))


COOL = [Reading("chip:t0", 40, 80, 70)]


def test_watch_pauses_on_a_hw_reason_and_resumes_when_it_clears() -> None:
    watch = _watch("pause")
    throttled = [gpu(0, "HwThermalSlowdown", temp=60)]
    action = watch.check(COOL, paused=False, gpus=throttled)
    assert action.kind is Kind.PAUSE and action.data == {"sensor": "GPU 0", "gpu": 0,
                                                         "clock_reasons": ["HwThermalSlowdown"], "temp": 60}
    assert watch.check(COOL, paused=True, gpus=throttled).kind is Kind.NONE  # no second pause
    resumed = watch.check(COOL, paused=True, gpus=[gpu(0, "GpuIdle")])
    assert resumed.kind is Kind.RESUME and resumed.message.startswith("GPU 0: its clocks are no longer held down")
    # Without any temperature reading, the reason's clearing still resumes the job it paused.
    watch.check([], paused=False, gpus=[gpu(0, "HwSlowdown", temp=None)])
    assert watch.check([], paused=True, gpus=[gpu(0, temp=None)]).kind is Kind.RESUME
    # And with the reason gone but a sensor still above resume_temp, it stays paused.
    watch.check(COOL, paused=False, gpus=throttled)
    assert watch.check([Reading("chip:t0", 75, 80, 70)], paused=True, gpus=[gpu(0)]).kind is Kind.NONE


def test_watch_kill_and_warn_on_a_hw_reason() -> None:
    action = _watch("kill").check(COOL, paused=False, gpus=[gpu(2, "HwPowerBrakeSlowdown")])
    assert action.kind is Kind.BREACH and action.code is ExitCode.KILLED_HOT and action.reason == "thermal"
    assert action.message == "GPU 2 (card 2): HW power brake (the card is throttling itself)"
    watch = _watch("warn")
    assert watch.check(COOL, paused=False, gpus=[gpu(0, "HwSlowdown")]).kind is Kind.WARN
    assert watch.check(COOL, paused=False, gpus=[gpu(0, "HwSlowdown")]).kind is Kind.NONE  # once
    assert watch.check(COOL, paused=False, gpus=[gpu(0)]).kind is Kind.NONE  # cleared: rearmed
    assert watch.check(COOL, paused=False, gpus=[gpu(0, "HwSlowdown")]).kind is Kind.WARN


def test_watch_sw_thermal_warns_once_while_it_lasts() -> None:
    watch = _watch("kill")
    soft = [gpu(0, "SwThermalSlowdown")]
    first = watch.check(COOL, paused=False, gpus=soft)
    assert first.kind is Kind.WARN and not first.warn_signal and "SW thermal slowdown" in first.message
    assert [watch.check(COOL, paused=False, gpus=soft).kind for _ in range(5)] == [Kind.NONE] * 5
    assert watch.check(COOL, paused=False, gpus=[gpu(0)]).kind is Kind.NONE
    assert watch.check(COOL, paused=False, gpus=soft).kind is Kind.WARN  # a new episode
    # A breach in the same sample goes first; the warning waits for a sample with nothing else to say.
    watch = _watch("kill")
    both = [gpu(0, "SwThermalSlowdown"), gpu(1, "HwSlowdown")]
    assert watch.check(COOL, paused=False, gpus=both).kind is Kind.BREACH
