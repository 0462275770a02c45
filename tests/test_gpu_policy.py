"""GPU policy over synthetic snapshots: selection, fitting with margin and reservations, temperatures."""

from __future__ import annotations

from safegate.exitcodes import ExitCode
from safegate.gate.policy import (
    Status,
    check_gpu,
    check_thermal,
    choose_gpu,
    gpu_temp_limit,
    select_gpus,
    visible_to_cuda,
)
from safegate.probes.snapshots import GpuInfo, GpuSnapshot, ThermalSnapshot
from safegate.units import Size, parse_size

GiB = 1024**3
MARGIN = Size(percent=10.0)


def gpu(index: int, free_gib: float, total_gib: float = 24, **kw: object) -> GpuInfo:
    total = int(total_gib * GiB)
    free = int(free_gib * GiB)
    return GpuInfo(index=index, name=f"GPU{index}", uuid=f"GPU-{index:04d}-aaaa", total=total, used=total - free,
                   free=free, **kw)  # type: ignore[arg-type]


def snap(*gpus: GpuInfo, status: str = "ok") -> GpuSnapshot:
    return GpuSnapshot("auto", status, gpus)


def test_auto_passes_when_one_gpu_fits_and_chooses_the_freest() -> None:
    s = snap(gpu(0, 5), gpu(1, 20), gpu(2, 12))
    sel = select_gpus(s, None, None)
    result = check_gpu(s, sel, 8 * GiB, MARGIN)
    assert result.status is Status.PASS and result.values.chosen == 1
    assert choose_gpu(sel, 8 * GiB, MARGIN, {}) == s.gpus[1]


def test_margin_boundary_is_inclusive() -> None:
    # 24 GiB card: margin 2.4 GiB; free exactly need + margin passes, a byte less blocks.
    exact = GpuInfo(0, "g", "u", total=24 * GiB, used=0, free=8 * GiB + int(2.4 * GiB))
    assert check_gpu(snap(exact), select_gpus(snap(exact), None, None), 8 * GiB, MARGIN).status is Status.PASS
    short = GpuInfo(0, "g", "u", total=24 * GiB, used=0, free=8 * GiB + int(2.4 * GiB) - 1)
    result = check_gpu(snap(short), select_gpus(snap(short), None, None), 8 * GiB, MARGIN)
    assert result.status is Status.FAIL and result.code is ExitCode.GPU_MEMORY


def test_explicit_list_needs_every_gpu_to_fit() -> None:
    s = snap(gpu(0, 20), gpu(1, 3))
    assert check_gpu(s, select_gpus(s, (0, 1), None), 8 * GiB, MARGIN).status is Status.FAIL
    assert check_gpu(s, select_gpus(s, (0,), None), 8 * GiB, MARGIN).status is Status.PASS
    missing = check_gpu(s, select_gpus(s, (0, 7), None), 8 * GiB, MARGIN)
    assert missing.status is Status.FAIL and "GPU 7 is not available" in missing.reason


def test_reservations_count_against_a_card() -> None:
    s = snap(gpu(0, 20))
    sel = select_gpus(s, None, None)
    assert check_gpu(s, sel, 8 * GiB, MARGIN).status is Status.PASS
    held = check_gpu(s, sel, 8 * GiB, MARGIN, {0: 10 * GiB})
    assert held.status is Status.FAIL and "reserved" in held.reason


def test_no_gpu_is_none_and_passes() -> None:
    result = check_gpu(snap(status="none"), select_gpus(snap(status="none"), None, None), 8 * GiB, MARGIN)
    assert result.status is Status.NONE and not result.blocks


def test_nvml_demanded_but_unusable_blocks() -> None:
    s = GpuSnapshot("nvml", "error", notes=("libnvidia-ml.so.1 cannot be loaded",))
    result = check_gpu(s, select_gpus(s, None, None), 0, MARGIN)
    assert result.status is Status.FAIL and "cannot be loaded" in result.reason


def test_failed_gpu_blocks() -> None:
    s = snap(gpu(0, 20), GpuInfo(1, "g", "u", error="GPU is lost"))
    result = check_gpu(s, select_gpus(s, None, None), 0, MARGIN)
    assert result.status is Status.FAIL and "GPU is lost" in result.reason


def test_unified_memory_need_goes_to_ram() -> None:
    jetson = GpuInfo(0, "Orin", "u")
    assert jetson.unified_memory
    result = check_gpu(snap(jetson), select_gpus(snap(jetson), None, None), 4 * GiB, MARGIN)
    assert result.status is Status.PASS and "counted against RAM" in result.reason


def test_cuda_visible_devices_limits_the_candidates() -> None:
    s = snap(gpu(0, 20), gpu(1, 20), gpu(2, 20))
    assert [g.index for g in visible_to_cuda(s.gpus, "2,0")] == [2, 0]
    assert [g.index for g in visible_to_cuda(s.gpus, "GPU-0001")] == [1]
    assert visible_to_cuda(s.gpus, "") == ()
    assert [g.index for g in select_gpus(s, None, "1").gpus] == [1]


def test_gpu_temperature_limits() -> None:
    assert gpu_temp_limit(GpuInfo(0, "g", "u", temp=70, slowdown=None), 80, resuming=False) == 80
    assert gpu_temp_limit(GpuInfo(0, "g", "u", temp=70, slowdown=83), 80, resuming=False) == 78
    no_cpu = ThermalSnapshot(readings=())
    at_max = GpuInfo(0, "g", "u", temp=80, slowdown=None)
    assert check_thermal(no_cpu, 80, require=False, gpus=[at_max]).status is Status.FAIL
    near_slowdown = GpuInfo(0, "g", "u", temp=78, slowdown=83)
    result = check_thermal(no_cpu, 80, require=False, gpus=[near_slowdown])
    assert result.status is Status.FAIL and "slowdown" in result.reason
    cool = GpuInfo(0, "g", "u", temp=60, slowdown=83)
    ok = check_thermal(no_cpu, 80, require=False, gpus=[cool])
    assert ok.status is Status.PASS and ok.values.hottest == 60


def test_percent_gpu_margin_is_of_the_card() -> None:
    assert parse_size("10%").resolve(24 * GiB) == int(2.4 * GiB)


def test_a_need_larger_than_every_allowed_card_less_its_margin_can_never_fit() -> None:
    s = snap(gpu(0, 24), gpu(1, 24, total_gib=48))
    auto = check_gpu(s, select_gpus(s, None, None), 40 * GiB, MARGIN)  # fits the 48 GiB card once it is free
    assert auto.status is Status.FAIL and not auto.never
    result = check_gpu(s, select_gpus(s, None, None), 44 * GiB, MARGIN)  # 44 + 4.8 > 48: no card, ever
    assert result.status is Status.FAIL and result.never and "can never fit" in result.reason
    # Explicit: every named card must fit; one that never can makes the need hopeless.
    explicit = check_gpu(s, select_gpus(s, (0, 1), None), 30 * GiB, MARGIN)
    assert explicit.never and "GPU 0" in explicit.reason
    busy = check_gpu(snap(gpu(0, 2)), select_gpus(snap(gpu(0, 2)), None, None), 8 * GiB, MARGIN)
    assert busy.status is Status.FAIL and not busy.never
