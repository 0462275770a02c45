"""Pure policy: (snapshot, thresholds) -> check result. No I/O here, so every boundary is unit-testable."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence

from msgspec.structs import replace

from safegate.exitcodes import ExitCode
from safegate.gate.competing import check_competing, match_competing
from safegate.gate.results import (
    CheckResult,
    CompetingMatch,
    GpuTemp,
    GpuValues,
    LockValues,
    MemoryValues,
    PressureValues,
    StaleValues,
    Status,
    ThermalValues,
    Verdict,
)
from safegate.probes.snapshots import (
    GpuInfo,
    GpuSensor,
    GpuSnapshot,
    HolderRecord,
    LegacyState,
    LockState,
    MemorySnapshot,
    Removal,
    Selection,
    ThermalSnapshot,
)
from safegate.units import Size, format_bytes, format_duration

# The result types and the competing check (a module of its own), re-exported for callers.
__all__ = ["CheckResult", "CompetingMatch", "Status", "Verdict", "check_competing", "match_competing"]


def check_memory(mem: MemorySnapshot, need: int, margin: int, reserved: int = 0) -> CheckResult:
    """available - reserved - need >= margin; *reserved* is what jobs still loading will take."""
    left = mem.available - reserved - need
    values = MemoryValues(available=mem.available, total=mem.total, reserved=reserved, need=need,
                          left_after_start=left)
    thresholds = {"margin": margin}
    held_back = f" - reserved {format_bytes(reserved)}" if reserved else ""
    summary = (
        f"available {format_bytes(mem.available)}{held_back} - need {format_bytes(need)} = {format_bytes(left)}"
    )
    if need + margin > mem.total:
        return CheckResult("memory", Status.FAIL, f"need {format_bytes(need)} + margin {format_bytes(margin)} is "
                           f"more than this machine's {format_bytes(mem.total)}: it can never fit",
                           ExitCode.MEMORY, values, thresholds, never=True)
    if left >= margin:
        return CheckResult("memory", Status.PASS, f"{summary} >= margin {format_bytes(margin)}",
                           ExitCode.MEMORY, values, thresholds)
    return CheckResult("memory", Status.FAIL, f"{summary} < margin {format_bytes(margin)}",
                       ExitCode.MEMORY, values, thresholds)


def check_pressure(mem: MemorySnapshot, max_pressure: float) -> CheckResult:
    thresholds = {"max_some_avg10": max_pressure}
    value = mem.pressure_some_avg10
    if value is None:
        return CheckResult("memory_pressure", Status.UNKNOWN, "no /proc/pressure/memory on this system",
                           ExitCode.MEMORY, PressureValues(None), thresholds)
    values = PressureValues(value)
    if value > max_pressure:
        return CheckResult("memory_pressure", Status.FAIL,
                           f"memory pressure some avg10 {value:g}% > {max_pressure:g}%: the machine is thrashing",
                           ExitCode.MEMORY, values, thresholds)
    return CheckResult("memory_pressure", Status.PASS, f"memory pressure some avg10 {value:g}% <= {max_pressure:g}%",
                       ExitCode.MEMORY, values, thresholds)


# An AMD junction or memory sensor (an Intel vram sensor) blocks this far below the card's own critical limit
# (temp*_crit), 2x that while resuming: junctions run at 90-105 C under normal load, so max_temp does not apply.
GPU_CRIT_MARGIN = 5.0


def hotspot_limit(sensor: GpuSensor, *, resuming: bool) -> float | None:
    """Where a GPU's hot spot blocks: GPU_CRIT_MARGIN below its crit (twice that while resuming); None: no crit."""
    if sensor.crit is None:
        return None
    return sensor.crit - GPU_CRIT_MARGIN * (2 if resuming else 1)


def hot_spot(gpus: Sequence[GpuInfo], *, resuming: bool) -> tuple[GpuInfo, GpuSensor, float] | None:
    """The first GPU sensor at or above its hotspot_limit, with that limit."""
    for g in gpus:
        for sensor in g.hotspots:
            at = hotspot_limit(sensor, resuming=resuming)
            if at is not None and sensor.celsius >= at:
                return g, sensor, at
    return None


def gpu_temp_limit(gpu: GpuInfo, limit: float, *, resuming: bool) -> float:
    """A GPU blocks at *limit* or 5 C below its own slowdown threshold, whichever is lower (10 C while resuming)."""
    if gpu.slowdown is None:
        return limit
    return min(limit, gpu.slowdown - (10 if resuming else 5))


def check_thermal(
    thermal: ThermalSnapshot, limit: float, *, require: bool, resuming: bool = False, gpus: Sequence[GpuInfo] = ()
) -> CheckResult:
    """The hottest sensor must be below *limit* (max_temp, or resume_temp while waiting after a thermal block),
    and every GPU the job may use below its own limit (gpu_temp_limit)."""
    limit_name = "resume_temp" if resuming else "max_temp"
    thresholds = {limit_name: limit, "require": require}
    gpu_values = {g.index: GpuTemp(g.temp, gpu_temp_limit(g, limit, resuming=resuming))
                  for g in gpus if g.temp is not None}
    sensors = {r.key: r.celsius for r in thermal.readings}
    notes = tuple(thermal.notes)
    hot_gpus = [g for g in gpus if g.temp is not None and g.temp >= gpu_temp_limit(g, limit, resuming=resuming)]
    if hot_gpus:
        g = hot_gpus[0]
        assert g.temp is not None
        gl = gpu_temp_limit(g, limit, resuming=resuming)
        why = f"{limit_name} {limit:g} C" if gl == limit else f"its slowdown threshold {g.slowdown:g} C minus margin"
        hottest_cpu = thermal.hottest
        values = ThermalValues(hottest=max(g.temp, hottest_cpu.celsius if hottest_cpu else g.temp),
                               sensor=f"gpu{g.index}", sensors=sensors, gpus=gpu_values, notes=notes)
        return CheckResult("thermal", Status.FAIL, f"GPU {g.index} ({g.name}) at {g.temp:g} C >= {gl:g} C ({why})",
                           ExitCode.THERMAL, values, thresholds)
    spot = hot_spot(gpus, resuming=resuming)
    if spot is not None:
        g, sensor, at = spot
        hottest_cpu = thermal.hottest
        values = ThermalValues(hottest=max(sensor.celsius, hottest_cpu.celsius if hottest_cpu else sensor.celsius),
                               sensor=f"gpu{g.index}:{sensor.label}", sensors=sensors, gpus=gpu_values, notes=notes)
        return CheckResult("thermal", Status.FAIL, f"GPU {g.index} ({g.name}) {sensor.label} at {sensor.celsius:g} C "
                           f">= {at:g} C (its critical {sensor.crit or 0:g} C minus {(sensor.crit or 0) - at:g} C)",
                           ExitCode.THERMAL, values, thresholds)
    hottest = thermal.hottest
    if hottest is None and gpu_values:
        g = max((g for g in gpus if g.temp is not None), key=lambda g: g.temp or 0.0)
        gpu_only = ThermalValues(hottest=g.temp, sensor=f"gpu{g.index}", sensors={}, gpus=gpu_values, notes=notes)
        return CheckResult("thermal", Status.PASS, f"no CPU sensor; hottest GPU {g.index} at {g.temp:g} C",
                           ExitCode.THERMAL, gpu_only, thresholds)
    if hottest is None:
        values = ThermalValues(hottest=None, sensor=None, sensors={}, gpus=gpu_values, notes=notes)
        why = "no readable temperature sensor" + (f" ({'; '.join(notes)})" if notes else "")
        if require:
            return CheckResult("thermal", Status.FAIL, f"{why}, and [thermal] require = true",
                               ExitCode.THERMAL, values, thresholds)
        return CheckResult("thermal", Status.UNKNOWN, f"{why}; not blocking", ExitCode.THERMAL, values, thresholds)
    values = ThermalValues(hottest=hottest.celsius, sensor=hottest.key, sensors=sensors, gpus=gpu_values, notes=notes)
    if hottest.celsius >= limit:
        return CheckResult("thermal", Status.FAIL,
                           f"{hottest.key} at {hottest.celsius:g} C >= {limit_name} {limit:g} C",
                           ExitCode.THERMAL, values, thresholds)
    return CheckResult("thermal", Status.PASS, f"hottest {hottest.key} at {hottest.celsius:g} C < {limit:g} C",
                       ExitCode.THERMAL, values, thresholds)


# NVIDIA's clock-event reasons (GpuInfo.clock_reasons): a card holding its clocks down in hardware is in trouble
# below any fixed temperature (HW slowdown: thermal or power alarm, an external signal; HW thermal slowdown; the
# power brake), so it blocks like heat. SW thermal slowdown is a consumer card at its temperature target, normal
# under load: a warning. The others (idle, power cap, application clocks, ...) are how a card runs.
CLOCKS_BLOCK = {"HwSlowdown": "HW slowdown", "HwThermalSlowdown": "HW thermal slowdown",
                "HwPowerBrakeSlowdown": "HW power brake"}
CLOCKS_WARN = {"SwThermalSlowdown": "SW thermal slowdown"}


def clock_trouble(gpu: GpuInfo, table: Mapping[str, str]) -> str | None:
    """The card's reasons that *table* (CLOCKS_BLOCK or CLOCKS_WARN) names, as words naming the card; None: none."""
    words = [table[r] for r in gpu.clock_reasons or () if r in table]
    return f"GPU {gpu.index} ({gpu.name}): {', '.join(words)}" if words else None


def with_clock_reasons(thermal: CheckResult, gpus: Sequence[GpuInfo]) -> CheckResult:
    """The thermal check, judged also by the clock-event reasons of the GPUs the job may use: a HW reason blocks
    (12), SW thermal slowdown warns."""
    hw = [t for t in (clock_trouble(g, CLOCKS_BLOCK) for g in gpus) if t]
    sw = [t for t in (clock_trouble(g, CLOCKS_WARN) for g in gpus) if t]
    if hw:
        why = "; ".join(f"{t} (the card is throttling itself)" for t in hw)
        if thermal.blocks:
            return replace(thermal, reason=f"{thermal.reason}; {why}")
        return replace(thermal, status=Status.FAIL, reason=why)
    if sw:
        why = "; ".join(f"{t} (at its temperature target: normal under load, not blocking)" for t in sw)
        status = Status.WARN if thermal.status is Status.PASS else thermal.status
        return replace(thermal, status=status, reason=f"{thermal.reason}; {why}")
    return thermal


def gpu_free(g: GpuInfo, reserved: Mapping[int, int]) -> int | None:
    """Free VRAM less what jobs safegate started on this card will still take."""
    return None if g.free is None else g.free - reserved.get(g.index, 0)


def gpu_fits(g: GpuInfo, need: int, margin: Size, reserved: Mapping[int, int]) -> bool:
    free = gpu_free(g, reserved)
    return free is not None and g.total is not None and free - need >= margin.resolve(g.total)


def _visible(gpus: Sequence[GpuInfo], preset: str, number: Callable[[GpuInfo], int]) -> list[GpuInfo]:
    """The *gpus* a preset list (indexes as *number* counts them, or UUIDs or their prefixes) names, in its order."""
    chosen: list[GpuInfo] = []
    for item in (p.strip() for p in preset.split(",")):
        if not item:
            continue
        if item.isascii() and item.isdigit():  # isdigit alone accepts '²', which int() refuses
            chosen += [g for g in gpus if number(g) == int(item)]
        else:
            chosen += [g for g in gpus if g.uuid and (g.uuid == item or g.uuid.startswith(item))]
    return list(dict.fromkeys(chosen))


def visible_to_cuda(gpus: tuple[GpuInfo, ...], cuda_visible: str | None) -> tuple[GpuInfo, ...]:
    """The GPUs a preset CUDA_VISIBLE_DEVICES (indexes or UUIDs, as Slurm and users set it) leaves: of the NVIDIA
    cards; other vendors' cards are left as they are."""
    if cuda_visible is None:
        return gpus
    nvidia = _visible([g for g in gpus if g.vendor == "nvidia"], cuda_visible, lambda g: g.index)
    return (*nvidia, *(g for g in gpus if g.vendor != "nvidia"))  # NVIDIA's in the preset's order, as before


def visible_to_rocm(gpus: tuple[GpuInfo, ...], rocr_visible: str | None, hip_visible: str | None,
                    ) -> tuple[GpuInfo, ...]:
    """The GPUs a preset ROCR_VISIBLE_DEVICES, then HIP_VISIBLE_DEVICES, leaves of the AMD cards (as ROCm applies
    them: ROCR's indexes count the AMD cards, HIP's count what ROCR left); other cards are left as they are."""
    amd = [g for g in gpus if g.vendor == "amd"]
    if rocr_visible is not None:
        amd = _visible(amd, rocr_visible, lambda g: g.vendor_index if g.vendor_index is not None else g.index)
    if hip_visible is not None:
        place = {g.index: i for i, g in enumerate(amd)}
        amd = _visible(amd, hip_visible, lambda g: place[g.index])
    return (*(g for g in gpus if g.vendor != "amd"), *amd)


def select_gpus(snapshot: GpuSnapshot, requested: tuple[int, ...] | None, cuda_visible: str | None,
                rocm_visible: tuple[str | None, str | None] = (None, None)) -> Selection:
    """The GPUs a job may use: those a preset CUDA_VISIBLE_DEVICES (NVIDIA) and ROCR_VISIBLE_DEVICES,
    HIP_VISIBLE_DEVICES (AMD: *rocm_visible*) leave, narrowed by --gpu (indexes across vendors: NVIDIA's in NVML
    order, then the DRM cards in card order)."""
    base = visible_to_rocm(visible_to_cuda(snapshot.gpus, cuda_visible), *rocm_visible)
    if requested is None:
        return Selection(base, explicit=False)
    chosen = tuple(g for g in base if g.index in requested)
    notes = tuple(f"GPU {i} is not available" for i in requested if i not in {g.index for g in chosen})
    return Selection(chosen, explicit=True, notes=notes)


def choose_gpu(selection: Selection, need: int, margin: Size, reserved: Mapping[int, int]) -> GpuInfo | None:
    """auto: the GPU with the most free memory that fits the need."""
    fitting = [g for g in selection.gpus if g.error is None and gpu_fits(g, need, margin, reserved)]
    return max(fitting, key=lambda g: gpu_free(g, reserved) or 0, default=None)


def check_gpu(
    snapshot: GpuSnapshot, selection: Selection, need: int, margin: Size, reserved: Mapping[int, int] | None = None
) -> CheckResult:
    """Free VRAM (less reservations) must cover the job's need plus the GPU margin: on one GPU (auto), or on
    each (explicit)."""
    reserved = reserved or {}
    values = GpuValues(backend=snapshot.backend, driver=snapshot.driver, need=need, gpus=tuple(snapshot.gpus),
                       candidates=tuple(g.index for g in selection.gpus), reserved=dict(reserved), chosen=None,
                       notes=tuple(snapshot.notes) + tuple(selection.notes))
    thresholds = {"margin": str(margin), "selection": "explicit" if selection.explicit else "auto"}
    code = ExitCode.GPU_MEMORY
    if snapshot.status == "error":
        return CheckResult("gpu", Status.FAIL, "; ".join(snapshot.notes) or "NVML unusable", code, values, thresholds)
    if selection.explicit and selection.notes:
        return CheckResult("gpu", Status.FAIL, "; ".join(selection.notes), code, values, thresholds)
    if not selection.gpus:
        why = "no GPU" if snapshot.status == "none" else "no GPU left by the selection"
        return CheckResult("gpu", Status.NONE, why, code, values, thresholds)
    failed = [g for g in selection.gpus if g.error is not None]
    if failed:
        g = failed[0]
        return CheckResult("gpu", Status.FAIL, f"GPU {g.index} ({g.name}) failed: {g.error}", code, values, thresholds)
    if need <= 0:
        return CheckResult("gpu", Status.PASS, _gpu_summary(selection.gpus) + "; no GPU memory need declared",
                           code, values, thresholds)
    unified = [g for g in selection.gpus if g.unified_memory]
    if unified and len(unified) == len(selection.gpus):
        g = unified[0]
        # The kernel reports no VRAM use of an Intel card (i915, xe): its need is counted against RAM too.
        how = "reports no memory use (Intel)" if g.vendor == "intel" else "shares system RAM (unified memory)"
        return CheckResult("gpu", Status.PASS, f"GPU {g.index} {how}: "
                           f"the need of {format_bytes(need)} is counted against RAM", code, values, thresholds)
    sized = [g for g in selection.gpus if g.total is not None]
    could = [g for g in sized if need + margin.resolve(g.total or 0) <= (g.total or 0)]
    if sized and len(sized) == len(selection.gpus) and (len(could) < len(sized) if selection.explicit else not could):
        g = next(g for g in sized if g not in could)
        return CheckResult("gpu", Status.FAIL, f"GPU {g.index} ({g.name}) has {format_bytes(g.total or 0)} in all: "
                           f"{format_bytes(need)} + margin {margin} can never fit", code, values, thresholds,
                           never=True)
    fitting = [g for g in selection.gpus if gpu_fits(g, need, margin, reserved)]
    enough = len(fitting) == len(selection.gpus) if selection.explicit else bool(fitting)
    if enough:
        best = choose_gpu(selection, need, margin, reserved)
        assert best is not None
        return CheckResult("gpu", Status.PASS, f"GPU {best.index} has {format_bytes(gpu_free(best, reserved) or 0)} "
                           f"free for {format_bytes(need)} + margin {margin}", code,
                           replace(values, chosen=best.index), thresholds)
    g = next(g for g in selection.gpus if g not in fitting)
    held = f" ({format_bytes(reserved[g.index])} reserved)" if reserved.get(g.index) else ""
    return CheckResult("gpu", Status.FAIL, f"GPU {g.index} ({g.name}) has {format_bytes(gpu_free(g, reserved) or 0)} "
                       f"free{held}, needs {format_bytes(need)} + margin {margin}", code, values, thresholds)


def _gpu_summary(gpus: Sequence[GpuInfo]) -> str:
    return ", ".join(f"GPU {g.index} {format_bytes(g.free)} free" if g.free is not None else f"GPU {g.index}"
                     for g in gpus)


def _describe_holder(state: LockState, now: float) -> str:
    holder = state.holder
    if holder is None:
        note = f"; {state.note}" if state.note else ""
        return f"lock {state.name!r} is held, with no holder metadata (by flock(1) or another tool?){note}"
    since = format_duration(max(0.0, now - holder.started_at))
    command = " ".join(holder.cmdline)[:100]
    if holder.owner is not None:
        job = f"job pid {holder.job_pid}" if holder.job_pid is not None else "next job"
        who = (f"a grant of `{command}` (keeper pid {holder.pid}, {holder.user}@{holder.host}) to pid {holder.owner}'s "
               f"{job}")
    elif state.holder_alive and holder.job_pid is not None:
        who = f"job pid {holder.job_pid} ({holder.user}@{holder.host}: {command})"
    elif state.holder_alive:
        who = f"pid {holder.pid} ({holder.user}@{holder.host}: {command})"
    else:
        who = f"the job of pid {holder.pid}, which is gone ({command})"
    return f"lock {state.name!r} is held by {who}, profile {holder.profile}, for {since}"


def encloses(holder: HolderRecord | None, family: Collection[int], owner_idle: bool = False) -> bool:
    """*holder* holds its lock for the caller: it is the caller or one of its ancestors (a hold() in this process,
    an exec this runs under), or its job is (a grant's keeper, whose bound job this runs in), or it is a grant not
    yet bound whose owner is an ancestor and has started nothing else since (*owner_idle*: the owner asking
    again, as GNU parallel re-runs its --limit command, or its job starting before the keeper has seen it). A
    caller never waits on a hold it runs inside."""
    if holder is None:
        return False
    if holder.pid in family or (holder.job_pid is not None and holder.job_pid in family):
        return True
    return owner_idle and holder.owner is not None and holder.job_pid is None and holder.owner in family


def check_lock(state: LockState | None, legacy: Sequence[LegacyState], now: float | None = None,
               family: Collection[int] = (), owner_idle: bool = False) -> CheckResult:
    """The lock: free, held by someone else, or held by a hold the caller runs inside (*family*: the caller and
    its ancestors), which passes: the lock is re-entrant for the job that holds it."""
    now = time.time() if now is None else now
    values = LockValues(lock=state.name if state else None, path=str(state.path) if state else None,
                        held=state.held if state else False, holder=state.holder if state else None,
                        holder_alive=state.holder_alive if state else False, legacy=tuple(legacy))
    if state is not None and state.held and encloses(state.holder, family, owner_idle):
        assert state.holder is not None
        who = state.holder.job_pid or state.holder.pid
        return CheckResult("lock", Status.PASS, f"inside the job that holds {state.name!r} (pid {who}): runs within "
                           "its hold", ExitCode.LOCKED, values)
    if state is not None and state.held:
        return CheckResult("lock", Status.FAIL, _describe_holder(state, now), ExitCode.LOCKED, values)
    # A file safegate wrote for the old gates names a job whose flock is judged above (or another lock's).
    live = [s for s in legacy if s.alive and not s.safegate]
    if live:
        first = live[0]
        return CheckResult("lock", Status.FAIL,
                           f"legacy lock file {first.path} names live pid {first.pid}", ExitCode.LOCKED, values)
    notes = [f"legacy lock file {s.path}: {s.note}" for s in legacy if s.note]
    if notes:
        return CheckResult("lock", Status.WARN, f"{_lock_words(state)}; " + "; ".join(notes), ExitCode.LOCKED, values)
    return CheckResult("lock", Status.PASS, _lock_words(state), ExitCode.LOCKED, values)


def _lock_words(state: LockState | None) -> str:
    return "the profile has no lock" if state is None else f"lock {state.name!r} is free"


def check_stale(removals: Sequence[Removal] | None) -> CheckResult:
    """What cleanup removed; None: no cleanup ran (a read-only evaluation), so nothing can be claimed either way."""
    if removals is None:
        return CheckResult("stale_locks", Status.PASS, "not cleaned up here (read-only; check cleans stale locks)",
                           ExitCode.LOCKED, StaleValues(()))
    values = StaleValues(tuple(removals))
    failed = [r for r in removals if not r.removed]
    if failed:
        return CheckResult("stale_locks", Status.WARN,
                           "; ".join(f"could not remove {r.what}: {r.error}" for r in failed),
                           ExitCode.LOCKED, values)
    if removals:
        return CheckResult("stale_locks", Status.PASS, "removed " + "; ".join(r.what for r in removals),
                           ExitCode.LOCKED, values)
    return CheckResult("stale_locks", Status.PASS, "no stale locks", ExitCode.LOCKED, values)


def blame_holder(memory: CheckResult, state: LockState | None, holders: Sequence[HolderRecord],
                  mem: MemorySnapshot, need: int, margin: int) -> CheckResult:
    """Mark a memory failure as caused by the lock when the live job holding the same lock is what takes the
    memory: the previous job of this model still runs, and that (13) is what the caller waits for, not 10."""
    if not memory.blocks or state is None or not state.held or not state.holder_alive or state.holder is None:
        return memory
    holder = state.holder
    others = sum(h.reservation for h in holders if h.lock != state.name)
    # Without the holder, its job's memory (about `used`) is available again and its reservation is gone.
    freed = MemorySnapshot(mem.total, mem.available + holder.used, mem.pressure_some_avg10)
    if not check_memory(freed, need, margin, others).blocks:
        why = f"{memory.reason} (taken by the job holding lock {state.name!r}: the lock decides)"
        return replace(memory, reason=why, caused_by="lock")
    return memory
