"""AMD cards end to end, at the real paths: a fake sysfs of a real Radeon's layout mounted over /sys/class/drm,
/sys/class/hwmon and the PCI devices in a private mount namespace (this machine has no GPU), and safegate run
in it as users run it. The mounts and every process end with the namespace."""

from __future__ import annotations

import ctypes
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_drm import FakeCard, GiB, build_sysfs, namespace_argv, require_namespace
from support import PY, TIMEOUT

from safegate.exitcodes import ExitCode


@pytest.fixture(autouse=True)
def _namespaces() -> Iterator[None]:
    require_namespace()
    no_nvml()
    yield


def no_nvml() -> None:
    """auto (the default backend, used here) reads NVML too: these tests need a machine without NVIDIA's
    library, or its real GPUs would come first in the numbering."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return
    pytest.skip("libnvidia-ml.so.1 loads here: backend auto would add this machine's NVIDIA GPUs")


def safegate(tmp_path: Path, cards: list[FakeCard], env: dict[str, str], *args: str,
             backend: str = "auto") -> subprocess.CompletedProcess[str]:
    sysfs = build_sysfs(tmp_path / "sys", cards)
    result = subprocess.run(namespace_argv(sysfs, [PY, "-m", "safegate", *args]),
                            env={**env, "SAFEGATE_GPU": backend}, capture_output=True, text=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def check(tmp_path: Path, config: Path, env: dict[str, str], cards: list[FakeCard], *args: str,
          backend: str = "auto") -> tuple[int, dict[str, dict]]:
    result = safegate(tmp_path, cards, env, "check", "--config", str(config), "--mem", "0", "--json", *args,
                      backend=backend)
    data = json.loads(result.stdout)
    return result.returncode, {c["name"]: c for c in data["checks"]}


def test_a_full_amd_card_blocks_the_gpu_memory_check_with_11(tmp_path: Path, config: Path,
                                                             env: dict[str, str]) -> None:
    code, checks = check(tmp_path, config, env, [FakeCard(total=24 * GiB, used=20 * GiB)], "--gpu-mem", "8G")
    assert code == ExitCode.GPU_MEMORY, checks["gpu"]
    assert "GPU 0 (amdgpu 1002:744C) has 4.0 GiB free" in checks["gpu"]["reason"]
    card = checks["gpu"]["values"]["gpus"][0]
    assert (card["vendor"], card["bus_id"], card["total"], card["free"]) == ("amd", "0000:03:00.0", 24 * GiB, 4 * GiB)


def test_an_amd_card_with_room_passes_and_is_chosen(tmp_path: Path, config: Path, env: dict[str, str]) -> None:
    code, checks = check(tmp_path, config, env, [FakeCard(used=4 * GiB)], "--gpu-mem", "8G", backend="drm")
    assert code == 0 and checks["gpu"]["values"]["chosen"] == 0


def test_an_amd_edge_sensor_at_85_blocks_with_12(tmp_path: Path, config: Path, env: dict[str, str]) -> None:
    hot = FakeCard(sensors=[("edge", 85.0, 100.0), ("junction", 90.0, 110.0), ("mem", 70.0, 105.0)], used=0)
    code, checks = check(tmp_path, config, env, [hot])
    assert code == ExitCode.THERMAL and "GPU 0 (amdgpu 1002:744C) at 85 C >= 80 C" in checks["thermal"]["reason"]


def test_an_amd_junction_at_its_critical_limit_blocks_with_12(tmp_path: Path, config: Path,
                                                               env: dict[str, str]) -> None:
    card = FakeCard(sensors=[("edge", 60.0, 100.0), ("junction", 99.0, 100.0), ("mem", 70.0, 105.0)], used=0)
    code, checks = check(tmp_path, config, env, [card])
    assert code == ExitCode.THERMAL, checks["thermal"]
    assert checks["thermal"]["reason"] == ("GPU 0 (amdgpu 1002:744C) junction at 99 C >= 95 C (its critical 100 C "
                                           "minus 5 C)")
    assert checks["thermal"]["values"]["sensor"] == "gpu0:junction"


def test_a_busy_junction_below_its_critical_limit_passes(tmp_path: Path, config: Path, env: dict[str, str]) -> None:
    card = FakeCard(sensors=[("edge", 60.0, 100.0), ("junction", 95.0, 110.0), ("mem", 90.0, 105.0)], used=0)
    code, checks = check(tmp_path, config, env, [card])
    assert code == 0 and checks["thermal"]["status"] == "pass", checks["thermal"]
    # the card was seen, with its hot spots, and judged: not passed for want of a GPU
    assert checks["thermal"]["values"]["gpus"] == {"gpu0": {"temp": 60.0, "limit": 80.0}}
    assert checks["gpu"]["values"]["gpus"][0]["hotspots"] == [{"label": "junction", "temp": 95.0, "crit": 110.0},
                                                              {"label": "mem", "temp": 90.0, "crit": 105.0}]


def test_exec_gives_an_amd_pick_rocr_and_hip_visible_devices(tmp_path: Path, config: Path,
                                                              env: dict[str, str]) -> None:
    cards = [FakeCard(number=0, bus="0000:03:00.0", used=20 * GiB, hwmon=3),
             FakeCard(number=1, bus="0000:0c:00.0", used=2 * GiB, hwmon=4)]
    out = tmp_path / "visible"
    script = (f'echo "${{ROCR_VISIBLE_DEVICES-unset}} ${{HIP_VISIBLE_DEVICES-unset}} '
              f'${{CUDA_VISIBLE_DEVICES-unset}}" > {out}')
    result = safegate(tmp_path, cards, env, "exec", "--config", str(config), "--mem", "0", "--gpu-mem", "8G",
                      "--", "sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert out.read_text().split() == ["1", "0", "unset"]  # the second AMD card; HIP counts what ROCR leaves
    assert "on GPU 1" in result.stderr


def test_exec_respects_a_preset_hip_visible_devices(tmp_path: Path, config: Path, env: dict[str, str]) -> None:
    cards = [FakeCard(number=0, bus="0000:03:00.0", used=2 * GiB, hwmon=3),
             FakeCard(number=1, bus="0000:0c:00.0", used=22 * GiB, hwmon=4)]
    out = tmp_path / "visible"
    # HIP_VISIBLE_DEVICES=1 leaves only the full card: the check blocks, as a preset CUDA_VISIBLE_DEVICES would
    code, _ = check(tmp_path, config, {**env, "HIP_VISIBLE_DEVICES": "1"}, cards, "--gpu-mem", "8G")
    assert code == ExitCode.GPU_MEMORY
    result = safegate(tmp_path / "2", cards, {**env, "HIP_VISIBLE_DEVICES": "0"}, "exec", "--config", str(config),
                      "--mem", "0", "--gpu-mem", "8G", "--", "sh", "-c",
                      f'echo "${{ROCR_VISIBLE_DEVICES-unset}} $HIP_VISIBLE_DEVICES" > {out}')
    assert result.returncode == 0, result.stderr
    assert out.read_text().split() == ["unset", "0"]


def test_status_lists_the_amd_card(tmp_path: Path, config: Path, env: dict[str, str]) -> None:
    result = safegate(tmp_path, [FakeCard()], env, "status", "--json", "--config", str(config))
    assert result.returncode == 0, result.stderr
    (card,) = json.loads(result.stdout)["gpus"]["devices"]
    assert card["vendor"] == "amd" and card["vendor_index"] == 0 and card["temp"] == 45.0
    text = safegate(tmp_path / "2", [FakeCard()], env, "status", "--config", str(config)).stdout
    assert "GPU 0    amdgpu 1002:744C: 20.0 GiB used of 24.0 GiB, 45 C, junction 60 C (crit 110), mem 50 C" in text
