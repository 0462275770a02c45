"""GPUs end to end without a GPU: safegate runs as a subprocess against the tests' fake libnvidia-ml.so.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_nvml import (
    DRIVER_NOT_LOADED,
    GPU_IS_LOST,
    NOT_SUPPORTED,
    FakeGpu,
    FakeNvmlUnavailable,
    FakeProc,
    build_fake_nvml,
    nvml_env,
    write_state,
)
from support import TIMEOUT, OpenWatch, Procs, Run, alive, job_pid, wait_until

from safegate.exitcodes import ExitCode

GiB = 1024**3


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, omit: tuple[str, ...] = ()) -> Path:
    try:
        return build_fake_nvml(tmp_path_factory.mktemp(name), omit)
    except FakeNvmlUnavailable as exc:
        pytest.skip(f"the fake NVML cannot be built here: {exc}")


@pytest.fixture(scope="session")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "nvml")


@pytest.fixture(scope="session")
def old_driver_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A driver without nvmlDeviceGetTemperatureV, the v2 memory call and the v3 process lists."""
    return _build(tmp_path_factory, "nvml-old", ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetMemoryInfo_v2",
                                                 "nvmlDeviceGetComputeRunningProcesses_v3",
                                                 "nvmlDeviceGetGraphicsRunningProcesses_v3"))


def card(i: int, free_gib: float, total_gib: float = 24, **kw: object) -> FakeGpu:
    total = int(total_gib * GiB)
    return FakeGpu(name=f"Fake GPU {i}", uuid=f"GPU-{i:04d}-0000", total=total, used=total - int(free_gib * GiB),
                   **kw)  # type: ignore[arg-type]


@pytest.fixture
def gpu_env(env: dict[str, str], fake_lib: Path, tmp_path: Path) -> Callable[..., dict[str, str]]:
    state = tmp_path / "nvml-state"

    def make(gpus: list[FakeGpu], procs: list[FakeProc] | None = None, init_error: int = 0,
             lib: Path | None = None, **extra: str) -> dict[str, str]:
        write_state(state, gpus, procs or [], init_error=init_error)
        return {**nvml_env(lib or fake_lib, state, base=env), **extra}

    make.state = state  # type: ignore[attr-defined]
    return make


def gpu_check(run: Run, config: Path, env: dict[str, str], *args: str) -> tuple[int, dict]:
    result = run("check", "--config", str(config), "--mem", "0", "--json", *args, env=env)
    assert "Traceback" not in result.stderr, result.stderr
    data = json.loads(result.stdout)
    return result.returncode, next(c for c in data["checks"] if c["name"] == "gpu") | {"_all": data}


def test_zero_gpus_is_none(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    code, gpu = gpu_check(run, config, gpu_env([]))
    assert code == 0 and gpu["status"] == "none"


def test_one_gpu_fits_or_blocks_with_11(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0, 12)])
    code, gpu = gpu_check(run, config, env, "--gpu-mem", "8G")
    assert code == 0 and gpu["status"] == "pass" and gpu["values"]["chosen"] == 0
    assert gpu["values"]["gpus"][0]["name"] == "Fake GPU 0" and gpu["values"]["gpus"][0]["free"] == 12 * GiB
    code, gpu = gpu_check(run, config, env, "--gpu-mem", "10G")  # 10 + 2.4 margin > 12
    assert code == ExitCode.GPU_MEMORY and "needs 10.0 GiB + margin 10%" in gpu["reason"]


def test_four_gpus_auto_picks_the_freest_and_exec_sets_cuda_visible_devices(
        run: Run, config: Path, gpu_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    env = gpu_env([card(0, 6), card(1, 20), card(2, 14), card(3, 2)])
    code, gpu = gpu_check(run, config, env, "--gpu-mem", "8G")
    assert code == 0 and gpu["values"]["chosen"] == 1 and gpu["values"]["candidates"] == [0, 1, 2, 3]
    out = tmp_path / "cvd"
    result = run("exec", "--config", str(config), "--mem", "0", "--gpu-mem", "8G", "--", "sh", "-c",
                 f'echo "$CUDA_VISIBLE_DEVICES $CUDA_DEVICE_ORDER" > {out}', env=env)
    assert result.returncode == 0, result.stderr
    assert out.read_text().split() == ["1", "PCI_BUS_ID"]
    assert "on GPU 1" in result.stderr and "highest GPU temperature" in result.stderr


def test_preset_cuda_visible_devices_is_respected(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]],
                                                   tmp_path: Path) -> None:
    env = gpu_env([card(0, 4), card(1, 3), card(2, 20)], CUDA_VISIBLE_DEVICES="0,1")
    code, gpu = gpu_check(run, config, env, "--gpu-mem", "8G")
    assert code == ExitCode.GPU_MEMORY and gpu["values"]["candidates"] == [0, 1]
    out = tmp_path / "cvd"
    result = run("exec", "--config", str(config), "--mem", "0", "--", "sh", "-c",
                 f'echo "$CUDA_VISIBLE_DEVICES" > {out}', env={**env, "CUDA_VISIBLE_DEVICES": "GPU-0002"})
    assert result.returncode == 0 and out.read_text().strip() == "GPU-0002"


def test_explicit_gpu_list(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    env = gpu_env([card(0, 20), card(1, 3), card(2, 20)])
    assert gpu_check(run, config, env, "--gpu", "0,1", "--gpu-mem", "8G")[0] == ExitCode.GPU_MEMORY
    assert gpu_check(run, config, env, "--gpu", "0,2", "--gpu-mem", "8G")[0] == 0
    out = tmp_path / "cvd"
    run("exec", "--config", str(config), "--mem", "0", "--gpu", "0,2", "--", "sh", "-c",
        f'echo "$CUDA_VISIBLE_DEVICES" > {out}', env=env)
    assert out.read_text().strip() == "0,2"


def test_gpu_hot_blocks_with_12(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    code, gpu = gpu_check(run, config, gpu_env([card(0, 20, temp=85)]))
    assert code == ExitCode.THERMAL
    thermal = next(c for c in gpu["_all"]["checks"] if c["name"] == "thermal")
    assert "GPU 0" in thermal["reason"]
    # 79 C is below max-temp 80 but within 5 C of this card's slowdown threshold of 84 C.
    code, gpu = gpu_check(run, config, gpu_env([card(0, 20, temp=79, slowdown=84)]))
    assert code == ExitCode.THERMAL
    assert gpu_check(run, config, gpu_env([card(0, 20, temp=78, slowdown=84)]))[0] == 0


def _opens_per_read(env: dict[str, str], state: Path) -> int:
    """How many times one read_gpus opens the fake's state file (the library re-reads it on every NVML call),
    in a fresh process, which also initialises NVML: at least what one of safegate's samples does."""
    with OpenWatch(state) as reads:
        subprocess.run([sys.executable, "-c", "from safegate.probes.gpu import read_gpus; read_gpus('nvml')"],
                       env=env, check=True, timeout=TIMEOUT)
        return reads.opens()


def _full_sample(state: Path, per_read: int, what: str) -> None:
    """Return once safegate has read *state* completely at least once since now, and begun the next sample
    (so it has acted on the complete one): more opens than one sample makes."""
    with OpenWatch(state) as reads:
        reads.wait_for(per_read + 1, what)


def test_job_vram_past_max_gpu_mem_is_stopped_with_21(run: Run, config: Path, lock_dir: Path, procs: Procs,
                                                       gpu_env: Callable[..., dict[str, str]]) -> None:
    gpus = [card(0, 20)]
    env = gpu_env(gpus)
    state = gpu_env.state  # type: ignore[attr-defined]
    per_read = _opens_per_read(env, state)
    gate = procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                        "--gpu", "0", "--max-gpu-mem", "4G", "--grace", "2s", "--", "sleep", "600"],
                       env=env, stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir), what="the job")
    for used in (1, 3):  # growing, still below the limit: seen by safegate, and the job runs on
        write_state(state, gpus, [FakeProc(0, pid, used * GiB)])
        _full_sample(state, per_read, f"a sample at {used} GiB")
        assert alive(pid) and gate.poll() is None
    write_state(state, gpus, [FakeProc(0, pid, 5 * GiB)])
    assert gate.wait(timeout=TIMEOUT) == ExitCode.KILLED_GPU_MEMORY
    assert gate.stderr is not None
    err = gate.stderr.read().decode()
    assert "job GPU memory 5.0 GiB >= --max-gpu-mem 4.0 GiB" in err and "peak job GPU memory 5.0 GiB" in err


def test_unavailable_per_process_usage_falls_back_to_card_growth(
        run: Run, config: Path, lock_dir: Path, procs: Procs, gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0, 20)])
    state = gpu_env.state  # type: ignore[attr-defined]
    per_read = _opens_per_read(env, state)
    gate = procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                        "--gpu", "0", "--max-gpu-mem", "4G", "--grace", "2s", "--", "sleep", "600"],
                       env=env, stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir), what="the job")
    _full_sample(state, per_read, "the baseline sample")  # the card's use when the job began
    # NVML lists the job but cannot say how much it uses; the card's used memory grows: 2 GiB is under
    # the limit, 6 GiB is over it.
    write_state(state, [card(0, 18)], [FakeProc(0, pid, None)])
    _full_sample(state, per_read, "a sample 2 GiB up")
    assert alive(pid) and gate.poll() is None
    write_state(state, [card(0, 14)], [FakeProc(0, pid, None)])
    assert gate.wait(timeout=TIMEOUT) == ExitCode.KILLED_GPU_MEMORY
    assert gate.stderr is not None
    assert "job GPU memory 6.0 GiB >= --max-gpu-mem 4.0 GiB" in gate.stderr.read().decode()


def test_card_floor_default_for_a_gpu_profile(run: Run, tmp_path: Path, sensor: Path, lock_dir: Path,
                                              procs: Procs, gpu_env: Callable[..., dict[str, str]]) -> None:
    from support import neutral_config

    cfg = tmp_path / "g.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.llm]\ngpu_memory = "8G"\nlock = "llm"\n')
    gpus = [card(0, 20)]
    env = gpu_env(gpus)
    gate = procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(cfg), "-p", "llm", "--grace",
                        "2s", "--", "sleep", "600"], env=env, stderr=subprocess.PIPE)
    pid = wait_until(lambda: job_pid(lock_dir, "llm"), what="the job")
    state = gpu_env.state  # type: ignore[attr-defined]
    write_state(state, [card(0, 4)], [FakeProc(0, pid, 8 * GiB)])  # 83% used: a warning
    write_state(state, [card(0, 1)], [FakeProc(0, pid, 9 * GiB)])  # 96% used: past the 95% default
    assert gate.wait(timeout=TIMEOUT) == ExitCode.KILLED_GPU_MEMORY
    assert gate.stderr is not None
    assert "free memory" in gate.stderr.read().decode()


def test_driver_not_loaded(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0, 20)], init_error=DRIVER_NOT_LOADED)
    code, gpu = gpu_check(run, config, env)
    assert code == 0 and gpu["status"] == "none" and "Driver Not Loaded" in " ".join(gpu["values"]["notes"])
    code, gpu = gpu_check(run, config, {**env, "SAFEGATE_GPU": "nvml"})
    assert code == ExitCode.GPU_MEMORY and "Driver Not Loaded" in gpu["reason"]


def test_library_absent(run: Run, config: Path, env: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "no-nvml"
    empty.mkdir()
    quiet = {**{k: v for k, v in env.items() if k != "SAFEGATE_GPU"}, "LD_LIBRARY_PATH": str(empty)}
    result = run("check", "--config", str(config), "--mem", "0", "--json", env=quiet)
    gpu = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "gpu")
    if gpu["values"]["gpus"]:
        pytest.skip("this machine has a real libnvidia-ml.so.1")
    assert result.returncode == 0 and gpu["status"] == "none" and gpu["values"]["notes"] == []
    result = run("check", "--config", str(config), "--mem", "0", "-q", env={**quiet, "SAFEGATE_GPU": "nvml"})
    assert result.returncode == ExitCode.GPU_MEMORY and "libnvidia-ml.so.1 cannot be loaded" in result.stderr


def test_backend_none_never_touches_nvml(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0, 20)], init_error=DRIVER_NOT_LOADED, SAFEGATE_GPU="none")
    code, gpu = gpu_check(run, config, env, "--gpu-mem", "100G")
    assert code == 0 and gpu["status"] == "none" and gpu["values"]["backend"] == "none"


def test_bad_backend_setting(run: Run, config: Path, env: dict[str, str]) -> None:
    result = run("check", "--config", str(config), env={**env, "SAFEGATE_GPU": "cuda"})
    assert result.returncode == ExitCode.USAGE and "invalid GPU backend 'cuda'" in result.stderr


def test_lost_gpu_blocks(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    code, gpu = gpu_check(run, config, gpu_env([card(0, 20), card(1, 20, mem_ret=GPU_IS_LOST)]))
    assert code == ExitCode.GPU_MEMORY and "GPU 1" in gpu["reason"] and "lost" in gpu["reason"].lower()


def test_unified_memory_need_counts_against_ram(run: Run, config: Path,
                                                gpu_env: Callable[..., dict[str, str]]) -> None:
    env = gpu_env([card(0, 20, mem_ret=NOT_SUPPORTED)])
    code, gpu = gpu_check(run, config, env, "--gpu-mem", "1000T")
    assert code == ExitCode.MEMORY and "counted against RAM" in gpu["reason"]
    memory = next(c for c in gpu["_all"]["checks"] if c["name"] == "memory")
    assert memory["values"]["need"] == 1000 * 1024**4
    assert gpu["values"]["gpus"][0]["total"] is None


def test_an_old_driver_missing_functions_still_works(run: Run, config: Path, env: dict[str, str],
                                                     old_driver_lib: Path, tmp_path: Path) -> None:
    state = tmp_path / "old-state"
    gpus = [card(0, 12, temp=55)]
    write_state(state, gpus, [FakeProc(0, 4242, 3 * GiB, "compute")])
    result = run("check", "--config", str(config), "--mem", "0", "--json", "--gpu-mem", "4G",
                 env=nvml_env(old_driver_lib, state, base=env))
    assert result.returncode == 0, result.stderr
    gpu = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "gpu")
    device = gpu["values"]["gpus"][0]
    assert device["temp"] == 55 and device["processes"] == [{"pid": 4242, "used": 3 * GiB, "kind": "compute"}]
    notes = " ".join(gpu["values"]["notes"])
    assert "nvmlDeviceGetTemperatureV" in notes and "nvmlDeviceGetMemoryInfo_v2" in notes
    # v1 memory: used includes the driver-reserved part, so free is the same either way.
    assert device["free"] == 12 * GiB


def test_memory_v2_keeps_reserved_apart(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    total = 24 * GiB
    env = gpu_env([FakeGpu(name="A", uuid="GPU-a", total=total, used=4 * GiB, reserved=1 * GiB)])
    device = gpu_check(run, config, env)[1]["values"]["gpus"][0]
    assert device["used"] == 4 * GiB and device["free"] == 19 * GiB


def test_mig_mode_is_reported(run: Run, config: Path, gpu_env: Callable[..., dict[str, str]]) -> None:
    device = gpu_check(run, config, gpu_env([card(0, 20, mig=1)]))[1]["values"]["gpus"][0]
    assert device["mig_mode"] == 1


def test_two_execs_on_one_card_see_each_others_reservation(
        run: Run, tmp_path: Path, sensor: Path, lock_dir: Path, procs: Procs,
        gpu_env: Callable[..., dict[str, str]]) -> None:
    from support import neutral_config

    cfg = tmp_path / "g.toml"
    cfg.write_text(neutral_config(sensor) + '[profiles.a]\ngpu_memory = "12G"\nlock = "a"\n'
                   '[profiles.b]\ngpu_memory = "12G"\nlock = "b"\n')
    env = gpu_env([card(0, 20)])
    first = procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(cfg), "-p", "a", "--",
                         "sleep", "600"], env=env, stderr=subprocess.PIPE)
    wait_until(lambda: job_pid(lock_dir, "a"), what="the first job")
    second = run("exec", "--config", str(cfg), "-p", "b", "--", "true", env=env)
    assert second.returncode == ExitCode.GPU_MEMORY and "reserved" in second.stderr
    os.kill(first.pid, signal.SIGTERM)
    first.wait(timeout=TIMEOUT)


def test_report_charts_vram_per_gpu_and_the_jobs_own(run: Run, config: Path, lock_dir: Path, procs: Procs,
                                                      gpu_env: Callable[..., dict[str, str]], tmp_path: Path) -> None:
    # A real exec --log against the fake NVML: its samples carry the card's VRAM and the job's own, which
    # `safegate report` charts (per GPU, and against --max-gpu-mem), and the job's peak lands in the table.
    gpus = [card(0, 20)]
    env = gpu_env(gpus)
    state = gpu_env.state  # type: ignore[attr-defined]
    per_read = _opens_per_read(env, state)
    log = tmp_path / "gpu.jsonl"
    gate = procs.spawn([sys.executable, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--log",
                        str(log), "--gpu", "0", "--max-gpu-mem", "4G", "--grace", "2s", "--", "sleep", "600"],
                       env=env)
    pid = wait_until(lambda: job_pid(lock_dir), what="the job")
    write_state(state, gpus, [FakeProc(0, pid, 2 * GiB)])
    _full_sample(state, per_read, "a sample at 2 GiB")
    wait_until(lambda: '"job_gpu_memory": 2147483648' in log.read_text(), what="a sample event at 2 GiB")
    write_state(state, gpus, [FakeProc(0, pid, 5 * GiB)])
    assert gate.wait(timeout=TIMEOUT) == ExitCode.KILLED_GPU_MEMORY
    samples = [json.loads(line) for line in log.read_text().splitlines() if '"sample"' in line]
    assert any(s["gpus"] and s["gpus"][0]["index"] == 0 and s["gpus"][0]["used"] for s in samples)
    result = run("report", str(log), "-o", "-")
    assert result.returncode == 0, result.stderr
    page = result.stdout
    assert 'aria-label="VRAM used on GPU 0 (the whole card, while each job ran)"' in page
    assert "The job&#x27;s own VRAM (dashed: its --max-gpu-mem)" in page
    # The table's VRAM cell: the job's peak against its --max-gpu-mem (one line per job since issue 25).
    assert "stopped for gpu (exit 21)" in page and ">5.0 GiB / 4.0 GiB</td>" in page


def test_a_gpu_need_that_can_never_fit_is_exit_11_at_once(run: Run, config: Path,
                                                           gpu_env: Callable[..., dict[str, str]]) -> None:
    # Issue 22 item 4: 22G + a 10% margin can never fit a 24 GiB card, however free; --wait must not wait for it.
    env = gpu_env([card(0, 24), card(1, 24)])
    result = run("check", "--config", str(config), "--mem", "0", "--gpu-mem", "22G", "--wait", env=env)
    assert result.returncode == ExitCode.GPU_MEMORY, result.stdout + result.stderr
    assert "can never fit" in result.stdout and "waiting" not in result.stderr
    # A need that fits an empty card but not now still waits (and times out): it is not "never".
    busy = gpu_env([card(0, 4)])
    waited = run("check", "--config", str(config), "--mem", "0", "--gpu-mem", "8G", "--wait", "--timeout", "1s",
                 env=busy)
    assert waited.returncode == ExitCode.GPU_MEMORY and "timed out" in waited.stderr


def test_gpu_completion_offers_the_drivers_cards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The driver lists one directory per card under /proc/driver/nvidia/gpus; this machine has none, so a copy
    # of that listing stands in. Completion reads it instead of starting NVML (seconds without persistence mode).
    from safegate.cli import options
    from safegate.probes import gpu

    cards = tmp_path / "driver" / "nvidia" / "gpus"
    assert gpu.gpu_indexes(str(tmp_path)) == ()
    for bus in ("0000:17:00.0", "0000:65:00.0", "0000:ca:00.0"):
        (cards / bus).mkdir(parents=True)
    assert gpu.gpu_indexes(str(tmp_path)) == (0, 1, 2)
    real = gpu.gpu_indexes
    monkeypatch.setattr(gpu, "gpu_indexes", lambda: real(str(tmp_path)))
    assert options.complete_gpus("") == ["auto", "0", "1", "2"]
    assert options.complete_gpus("a") == ["auto"]
    assert options.complete_gpus("0,") == ["0,1", "0,2"]
    assert options.complete_gpus("2,0,") == ["2,0,1"]

