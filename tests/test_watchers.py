"""The watchers' decisions, one limit at a time, over plain values: every boundary, the warn-once and rearm
rules, the thermal hysteresis, the GPU card floor and job VRAM; and the pure sampling helpers of limits.py."""

from __future__ import annotations

from msgspec.structs import replace

from safegate.config.model import ThermalConfig
from safegate.exitcodes import ExitCode
from safegate.probes.gpu import GpuInfo, GpuProcess
from safegate.probes.snapshots import SensorReading
from safegate.run.limits import (
    CEILING,
    FILL_RATE_DECAY,
    FillRate,
    GpuLimits,
    Level,
    Pace,
    WatchLimits,
    next_interval,
)
from safegate.run.watchers import (
    NOTHING,
    Action,
    FloorWatch,
    GpuWatch,
    JobMemoryWatch,
    Kind,
    Reading,
    ThermalWatch,
    breach,
    memory_warning,
    to_take,
)
from safegate.units import Size

MiB = 1024**2
GiB = 1024**3


def limits(**changes: object) -> WatchLimits:
    base = WatchLimits(max_mem=None, min_available=None, max_temp=80.0, resume_temp=70.0, on_hot="pause",
                       grace=2.0, interval=0.01, warn_signal=None, thermal=ThermalConfig())
    return replace(base, **changes)  # type: ignore[arg-type]


# --- job memory (--max-mem) ------------------------------------------------------------------------------


def test_job_memory_levels_at_the_boundaries() -> None:
    watch = JobMemoryWatch(limits(max_mem=1000 * MiB))
    assert watch.level(900 * MiB - 1) is Level.OK
    assert watch.level(900 * MiB) is Level.WARN  # exactly 90%
    assert watch.level(1000 * MiB - 1) is Level.WARN
    assert watch.level(1000 * MiB) is Level.BREACH  # exactly the limit
    assert watch.level(1000 * MiB + 1) is Level.BREACH


def test_job_memory_breach_at_the_limit_says_what_and_why() -> None:
    watch = JobMemoryWatch(limits(max_mem=1000 * MiB))
    assert watch.check(1000 * MiB - 1).kind is Kind.WARN
    action = watch.check(1000 * MiB)
    assert action == Action(Kind.BREACH, "job memory 1000.0 MiB >= --max-mem 1000.0 MiB",
                            {"job_memory": 1000 * MiB, "max_mem": 1000 * MiB}, code=ExitCode.KILLED_MEMORY,
                            reason="memory")


def test_job_memory_warns_once_and_again_only_below_the_rearm_level() -> None:
    watch = JobMemoryWatch(limits(max_mem=1000 * MiB))
    assert watch.check(900 * MiB - 1) is NOTHING
    first = watch.check(900 * MiB)
    assert first == memory_warning("job memory 900.0 MiB is 90% of --max-mem 1000.0 MiB",
                                   {"job_memory": 900 * MiB, "max_mem": 1000 * MiB})
    assert first.warn_signal
    assert watch.check(990 * MiB) is NOTHING  # still warned
    assert watch.check(850 * MiB) is NOTHING  # 85% exactly: not yet rearmed
    assert watch.check(900 * MiB) is NOTHING
    assert watch.check(850 * MiB - 1) is NOTHING  # rearmed now, and quiet
    assert watch.check(900 * MiB).kind is Kind.WARN


def test_job_memory_without_a_limit_says_nothing() -> None:
    watch = JobMemoryWatch(limits(max_mem=None))
    assert watch.level(100 * GiB) is Level.OK
    assert watch.check(100 * GiB) is NOTHING


# --- the machine's floor (--min-available) ---------------------------------------------------------------


def test_floor_levels_at_the_boundaries() -> None:
    watch = FloorWatch(limits(min_available=900))
    assert watch.level(901) is Level.WARN
    assert watch.level(900) is Level.BREACH  # at the floor
    assert watch.level(899) is Level.BREACH
    assert watch.level(1000) is Level.WARN  # 90% of what is available is the floor
    assert watch.level(1001) is Level.OK


def test_floor_breach_names_the_job_memory_too() -> None:
    action = FloorWatch(limits(min_available=1000 * MiB)).check(1000 * MiB, job_mem=5 * MiB)
    assert action == breach(ExitCode.KILLED_MEMORY, "memory", "MemAvailable 1000.0 MiB <= --min-available 1000.0 MiB",
                            {"available": 1000 * MiB, "min_available": 1000 * MiB, "job_memory": 5 * MiB})


def test_floor_warns_once_and_rearms_above_the_rearm_level() -> None:
    watch = FloorWatch(limits(min_available=900))
    assert watch.check(1001, 0) is NOTHING
    first = watch.check(1000, 0)
    assert first == memory_warning("MemAvailable 1000 B is near --min-available 900 B",
                                   {"available": 1000, "min_available": 900})
    assert watch.check(950, 0) is NOTHING
    assert watch.check(1058, 0) is NOTHING  # 1058 * 0.85 < 900: not rearmed
    assert watch.check(1000, 0) is NOTHING
    assert watch.check(1059, 0) is NOTHING  # 1059 * 0.85 > 900: rearmed
    assert watch.check(1000, 0).kind is Kind.WARN


def test_one_sample_breach_alone_is_taken() -> None:
    warn = JobMemoryWatch(limits(max_mem=1000)).check(950)
    floor_breach = FloorWatch(limits(min_available=900)).check(900, 950)
    job_breach = JobMemoryWatch(limits(max_mem=1000)).check(1000)
    assert to_take([warn, floor_breach]) == [floor_breach]
    assert to_take([job_breach, floor_breach]) == [job_breach]
    floor_warn = FloorWatch(limits(min_available=900)).check(1000, 950)
    assert to_take([warn, NOTHING, floor_warn]) == [warn, floor_warn]
    assert to_take([NOTHING, NOTHING]) == []


# --- GPUs ------------------------------------------------------------------------------------------------


def gpu_limits(**changes: object) -> GpuLimits:
    base = GpuLimits(backend="nvml", indexes=(0, 1), max_job=None, min_free=Size(percent=5.0),
                     warn_free=Size(percent=20.0))
    return replace(base, **changes)  # type: ignore[arg-type]


def card(index: int, free: int, total: int = 10000 * MiB, **changes: object) -> GpuInfo:
    info = GpuInfo(index, "card", f"uuid-{index}", total=total, used=total - free, free=free)
    return replace(info, **changes)  # type: ignore[arg-type]


def test_gpu_card_floor_at_the_boundaries() -> None:
    watch = GpuWatch(gpu_limits())
    five = 500 * MiB  # 5% of 10000 MiB
    assert watch.check([card(0, 5000 * MiB), card(1, five + 1)], 0).kind is Kind.WARN
    assert watch.check([card(0, 5000 * MiB), card(1, five)], 0) == breach(
        ExitCode.KILLED_GPU_MEMORY, "gpu", "GPU 1 free memory 500.0 MiB <= 500.0 MiB",
        {"gpu": 1, "free": five, "min_gpu_free": five})


def test_gpu_card_warning_level_and_reset() -> None:
    watch = GpuWatch(gpu_limits())
    twenty = 2000 * MiB
    assert watch.check([card(0, twenty + 1)], 7) is NOTHING
    first = watch.check([card(0, twenty)], 7)
    assert first == memory_warning("GPU 0: 2.0 GiB free of 9.8 GiB", {"job_gpu_memory": 7})
    assert watch.check([card(0, twenty - MiB)], 7) is NOTHING  # warned already
    assert watch.check([card(0, twenty + 1)], 7) is NOTHING  # reset at once: no rearm margin for GPUs
    assert watch.check([card(0, twenty)], 7).kind is Kind.WARN


def test_gpu_job_vram_limit_at_the_boundaries() -> None:
    watch = GpuWatch(gpu_limits(max_job=1000 * MiB, min_free=None, warn_free=None))
    cards = [card(0, 5000 * MiB)]
    assert watch.check(cards, 900 * MiB - 1) is NOTHING
    assert watch.check(cards, 900 * MiB) == memory_warning(
        "job GPU memory 900.0 MiB is 90% of --max-gpu-mem 1000.0 MiB", {"job_gpu_memory": 900 * MiB})
    assert watch.check(cards, 1000 * MiB - 1) is NOTHING
    assert watch.check(cards, 1000 * MiB) == breach(
        ExitCode.KILLED_GPU_MEMORY, "gpu", "job GPU memory 1000.0 MiB >= --max-gpu-mem 1000.0 MiB",
        {"job_gpu_memory": 1000 * MiB, "max_gpu_mem": 1000 * MiB})


def test_gpu_failed_card_is_a_breach_before_anything_else() -> None:
    watch = GpuWatch(gpu_limits(max_job=1000 * MiB))
    lost = GpuInfo(1, "card", "uuid-1", error="GPU is lost")
    assert watch.check([card(0, 0), lost], 2000 * MiB) == breach(
        ExitCode.KILLED_GPU_MEMORY, "gpu", "GPU 1 failed: GPU is lost", {"gpu": 1})


def test_gpu_job_vram_from_per_process_usage_of_the_jobs_pids() -> None:
    watch = GpuWatch(gpu_limits())
    procs = (GpuProcess(5001, 300 * MiB, "compute"), GpuProcess(7, 900 * MiB, "compute"),
             GpuProcess(5002, 100 * MiB, "graphics"))
    cards = [card(0, 1000 * MiB, processes=procs)]
    # NVML's host pids 5001 and 5002 are our 101 and 102; 7 is someone else's.
    assert watch.job_vram(cards, {101, 102}, {5001: 101, 5002: 102}) == 400 * MiB
    assert watch.job_vram(cards, {5001}, {}) == 300 * MiB  # no namespace: pids agree


def test_gpu_job_vram_falls_back_to_card_growth_since_the_first_sample() -> None:
    watch = GpuWatch(gpu_limits())
    unknown = (GpuProcess(101, None, "compute"),)  # no per-process accounting
    assert watch.job_vram([card(0, 8000 * MiB), card(1, 9000 * MiB)], {101}, {}) == 0  # the baseline
    assert watch.baseline == {0: 2000 * MiB, 1: 1000 * MiB}
    grown = [card(0, 7000 * MiB, processes=unknown), card(1, 9500 * MiB)]  # card 1 shrank: counts 0, not -500
    assert watch.job_vram(grown, {101}, {}) == 1000 * MiB
    # Known for some of the job's processes but not all: growth, not a partial sum.
    mixed = (GpuProcess(101, 50 * MiB, "compute"), GpuProcess(102, None, "compute"))
    assert watch.job_vram([card(0, 6000 * MiB, processes=mixed)], {101, 102}, {}) == 2000 * MiB
    # A card without memory figures (failed) counts for neither the baseline nor the growth.
    lost = GpuInfo(0, "card", "uuid-0", error="GPU is lost")
    assert watch.job_vram([lost, card(1, 9000 * MiB)], {101}, {}) == 0


def test_gpu_baseline_is_taken_once() -> None:
    watch = GpuWatch(gpu_limits())
    watch.job_vram([card(0, 8000 * MiB)], set(), {})
    watch.job_vram([card(0, 1000 * MiB)], set(), {})
    assert watch.baseline == {0: 2000 * MiB}


# --- temperatures ----------------------------------------------------------------------------------------


def sensors(*temps: float) -> list[SensorReading]:
    return [SensorReading("chip", f"t{i}", t, "psutil") for i, t in enumerate(temps)]


def thermal(on_hot: str = "pause") -> ThermalWatch:
    return ThermalWatch(limits(on_hot=on_hot))


def test_thermal_pauses_at_max_temp_not_below() -> None:
    watch = thermal()
    assert watch.check(watch.readings(sensors(79.9), ()), paused=False) is NOTHING
    action = watch.check(watch.readings(sensors(60, 80), ()), paused=False)
    assert action == Action(Kind.PAUSE, "chip:t1 at 80 C >= max_temp 80 C; pausing the job until below 70 C",
                            {"sensor": "chip:t1", "temp": 80, "max_temp": 80, "resume_temp": 70})


def test_thermal_stays_paused_between_resume_and_max_and_resumes_below_resume() -> None:
    watch = thermal()
    assert watch.check(watch.readings(sensors(90), ()), paused=True) is NOTHING  # no second pause
    assert watch.check(watch.readings(sensors(79.9), ()), paused=True) is NOTHING
    assert watch.check(watch.readings(sensors(70), ()), paused=True) is NOTHING  # at resume_temp: still hot
    assert watch.check(watch.readings(sensors(60, 70), ()), paused=True) is NOTHING  # every sensor must be cool
    action = watch.check(watch.readings(sensors(60, 69.9), ()), paused=True)
    # Named: the sensor closest to its resume_temp.
    assert action == Action(Kind.RESUME, "chip:t1 at 69.9 C < resume_temp 70 C; resuming the job",
                            {"sensor": "chip:t1", "temp": 69.9, "max_temp": 80, "resume_temp": 70})
    assert watch.check(watch.readings(sensors(60), ()), paused=False) is NOTHING  # cool and running


def test_thermal_kill_is_a_breach_at_max_temp() -> None:
    watch = thermal("kill")
    assert watch.check(watch.readings(sensors(79.9), ()), paused=False) is NOTHING
    assert watch.check(watch.readings(sensors(80), ()), paused=False) == breach(
        ExitCode.KILLED_HOT, "thermal", "chip:t0 at 80 C >= max_temp 80 C",
        {"sensor": "chip:t0", "temp": 80, "max_temp": 80, "resume_temp": 70})


def test_thermal_warn_once_rearmed_only_below_resume_temp() -> None:
    watch = thermal("warn")
    first = watch.check(watch.readings(sensors(80), ()), paused=False)
    assert first == Action(Kind.WARN, "chip:t0 at 80 C >= max_temp 80 C",
                           {"sensor": "chip:t0", "temp": 80, "max_temp": 80, "resume_temp": 70})
    assert not first.warn_signal  # --warn-signal is for memory the job could shed
    assert watch.check(watch.readings(sensors(85), ()), paused=False) is NOTHING
    assert watch.check(watch.readings(sensors(75), ()), paused=False) is NOTHING
    assert watch.check(watch.readings(sensors(81), ()), paused=False) is NOTHING  # not cooled down in between
    assert watch.check(watch.readings(sensors(69), ()), paused=False) is NOTHING
    assert watch.check(watch.readings(sensors(80), ()), paused=False).kind is Kind.WARN


def test_thermal_gpu_limits_come_from_the_slowdown_threshold() -> None:
    watch = thermal()
    gpu = GpuInfo(0, "card", "uuid-0", temp=78, slowdown=83)  # blocks 5 C below slowdown, resumes 10 C below
    readings = watch.readings(sensors(50), (gpu, GpuInfo(1, "card", "uuid-1")))  # GPU 1 reports no temperature
    assert readings == [Reading("chip:t0", 50, 80, 70), Reading("GPU 0", 78, 78, 70)]
    action = watch.check(readings, paused=False)
    assert action.kind is Kind.PAUSE and action.data == {"sensor": "GPU 0", "temp": 78, "max_temp": 78,
                                                         "resume_temp": 70}
    assert watch.check(watch.readings((), (replace(gpu, temp=77.9),)), paused=False) is NOTHING


def test_thermal_without_readings_decides_nothing() -> None:
    watch = thermal("warn")
    assert watch.check([], paused=True) is NOTHING
    assert watch.check(watch.readings(sensors(90), ()), paused=False).kind is Kind.WARN
    assert watch.check([], paused=False) is NOTHING
    assert watch.warned  # no readings is not "cooled down"


# --- sampling pace ---------------------------------------------------------------------------------------


def test_fill_rate_is_the_fastest_growth_decaying_per_sample() -> None:
    fill = FillRate()
    assert fill.update(10.0, 0, 8 * GiB) == 0.0  # one sample: no rate yet
    assert fill.update(10.5, 512 * MiB, 8 * GiB) == GiB  # the job grew 512 MiB in 0.5 s
    assert fill.update(11.0, 512 * MiB, 7 * GiB) == 2 * GiB  # MemAvailable fell faster than the job grew
    assert fill.update(12.0, 512 * MiB, 7 * GiB) == 2 * GiB * FILL_RATE_DECAY  # quiet: half
    assert fill.update(12.0, 4 * GiB, 7 * GiB) == GiB  # no time passed: no rate from it


def test_pace_is_due_at_once_then_once_per_period() -> None:
    pace = Pace(1.0)
    assert pace.due(100.0)
    assert not pace.due(100.999)
    assert pace.due(101.0)
    assert not pace.due(101.5)


def test_next_interval_between_floor_and_ceiling() -> None:
    lim = limits(max_mem=1000 * MiB)
    assert next_interval(0, 100 * GiB, limits(max_mem=100 * GiB), 0.0) == CEILING  # far: once a second
    assert next_interval(1000 * MiB - 1, 100 * GiB, lim, 0.0) == 0.01  # a byte short: the floor
    assert next_interval(2000 * MiB, 100 * GiB, lim, 0.0) == 0.01  # past it: still the floor, never negative


def test_next_interval_is_half_the_time_to_the_nearest_limit() -> None:
    lim = limits(max_mem=4 * GiB, min_available=GiB)
    # 2 GiB to the job limit, 1 GiB to the floor, at the assumed 2 GiB/s: 0.25 s.
    assert next_interval(2 * GiB, 2 * GiB, lim, 0.0) == 0.25
    assert next_interval(2 * GiB, 2 * GiB, lim, 4 * GiB) == 0.125  # a faster rate seen counts
    assert next_interval(0, 0, limits(), 0.0) == CEILING  # no memory limit at all


def test_the_kernel_cap_is_max_mem_and_the_headroom_above_the_floor() -> None:
    G = 1 << 30
    assert limits().kernel_cap(1 * G, 10 * G) is None  # nothing to hold
    assert limits(max_mem=4 * G).kernel_cap(1 * G, 10 * G) == 4 * G
    # With a floor: what the job uses plus what it may still take before MemAvailable reaches the floor.
    assert limits(min_available=8 * G).kernel_cap(1 * G, 10 * G) == 3 * G
    assert limits(max_mem=2 * G, min_available=8 * G).kernel_cap(1 * G, 10 * G) == 2 * G
    assert limits(min_available=8 * G).kernel_cap(1 * G, 7 * G) == 1 * G  # below the floor: not a byte more


def test_a_cap_stands_for_one_limit() -> None:
    G = 1 << 30
    both = limits(max_mem=2 * G, min_available=8 * G)
    assert both.capped_by(both.kernel_cap(1 * G, 20 * G)) == ("max_mem",)
    assert both.capped_by(both.kernel_cap(1 * G, 8 * G + 1)) == ("min_available",)  # the headroom was lower
    assert limits(min_available=8 * G).capped_by(3 * G) == ("min_available",)
    assert limits(max_mem=2 * G).capped_by(2 * G) == ("max_mem",)
    assert both.capped_by(None) == ("max_mem", "min_available")  # not known: both, as before
