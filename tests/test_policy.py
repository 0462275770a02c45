"""Pure policy over synthetic snapshots: every boundary, and the order of exit codes."""

from __future__ import annotations

from pathlib import Path

from safegate.config.model import CompetingRule
from safegate.exitcodes import ExitCode
from safegate.gate.policy import (
    CheckResult,
    Status,
    Verdict,
    check_competing,
    check_lock,
    check_memory,
    check_pressure,
    check_stale,
    check_thermal,
    match_competing,
)
from safegate.gate.results import StaleValues
from safegate.locks.holders import Holder
from safegate.probes.snapshots import (
    LegacyState,
    LockState,
    MemorySnapshot,
    ProcessInfo,
    ProcessSnapshot,
    Removal,
    SensorReading,
    ThermalSnapshot,
)
from safegate.units import parse_size

GiB = 1024**3


def mem(available: int, total: int = 16 * GiB, pressure: float | None = None) -> MemorySnapshot:
    return MemorySnapshot(total=total, available=available, pressure_some_avg10=pressure)


def test_memory_exactly_at_margin_passes() -> None:
    result = check_memory(mem(14 * GiB), need=10 * GiB, margin=4 * GiB)
    assert result.status is Status.PASS
    assert result.values.left_after_start == 4 * GiB


def test_memory_one_byte_short_blocks_with_10() -> None:
    result = check_memory(mem(14 * GiB - 1), need=10 * GiB, margin=4 * GiB)
    assert result.status is Status.FAIL
    assert result.code is ExitCode.MEMORY
    assert "< margin 4.0 GiB" in result.reason


def test_memory_need_above_available_blocks_even_without_margin() -> None:
    assert check_memory(mem(GiB), need=2 * GiB, margin=0).status is Status.FAIL


def test_percent_margin_resolves_against_total() -> None:
    margin = parse_size("10%").resolve(16 * GiB)
    assert check_memory(mem(int(1.6 * GiB) + 1), need=0, margin=margin).status is Status.PASS
    assert check_memory(mem(int(1.6 * GiB) - 2), need=0, margin=margin).status is Status.FAIL


def test_pressure_boundary() -> None:
    assert check_pressure(mem(GiB, pressure=20.0), 20).status is Status.PASS
    blocked = check_pressure(mem(GiB, pressure=20.01), 20)
    assert blocked.status is Status.FAIL and blocked.code is ExitCode.MEMORY


def test_pressure_unknown_without_psi() -> None:
    assert check_pressure(mem(GiB, pressure=None), 20).status is Status.UNKNOWN


def therm(*values: float, notes: tuple[str, ...] = ()) -> ThermalSnapshot:
    return ThermalSnapshot(
        readings=tuple(SensorReading("coretemp", f"Core {i}", v, "psutil") for i, v in enumerate(values)), notes=notes
    )


def test_thermal_exactly_at_limit_blocks() -> None:
    result = check_thermal(therm(50, 80.0), 80, require=False)
    assert result.status is Status.FAIL and result.code is ExitCode.THERMAL
    assert result.values.hottest == 80.0 and result.values.sensor == "coretemp:Core 1"


def test_thermal_just_below_passes() -> None:
    assert check_thermal(therm(79.99), 80, require=False).status is Status.PASS


def test_thermal_resume_threshold_used_while_resuming() -> None:
    result = check_thermal(therm(77), 75, require=False, resuming=True)
    assert result.status is Status.FAIL and "resume_temp" in result.reason
    assert check_thermal(therm(74.9), 75, require=False, resuming=True).status is Status.PASS


def test_no_sensor_is_unknown_and_passes_unless_required() -> None:
    unknown = check_thermal(therm(notes=("x: unreadable",)), 80, require=False)
    assert unknown.status is Status.UNKNOWN and not unknown.blocks and "x: unreadable" in unknown.reason
    assert check_thermal(therm(), 80, require=True).status is Status.FAIL


def state(held: bool, holder: Holder | None = None, alive: bool = False) -> LockState:
    return LockState(name="heavy", path=Path("/x/heavy.lock"), held=held, holder=holder, holder_alive=alive)


HOLDER = Holder(pid=4242, start_time=1.0, user="ana", host="box", cmdline=["whisper", "a.mp3"],
                started_at=1000.0, profile="whisper-large-v3", lock="heavy")


def test_lock_held_names_holder_and_duration() -> None:
    result = check_lock(state(True, HOLDER, alive=True), [], now=1000.0 + 3725)
    assert result.status is Status.FAIL and result.code is ExitCode.LOCKED
    assert "pid 4242" in result.reason and "ana@box" in result.reason and "1h02m" in result.reason


def test_lock_held_without_metadata() -> None:
    result = check_lock(state(True), [])
    assert result.status is Status.FAIL and result.reason.startswith("lock 'heavy' is held, with no holder")


def test_lock_free_passes() -> None:
    assert check_lock(state(False), []).status is Status.PASS


def test_live_legacy_lock_blocks() -> None:
    legacy = [LegacyState(Path("/tmp/j5a_locks/whisper_large.lock"), pid=77, alive=True)]
    result = check_lock(state(False), legacy)
    assert result.status is Status.FAIL and "pid 77" in result.reason


def proc(pid: int, cmdline: str, rss: int = 0) -> ProcessInfo:
    return ProcessInfo(pid=pid, ppid=1, cmdline=cmdline, rss=rss)


RULES = (
    CompetingRule("whisper.*large", "block"),
    CompetingRule("claude", "warn", parse_size("500M")),
)


def test_competing_block_and_warn() -> None:
    snapshot = ProcessSnapshot(
        processes=(proc(1, "python whisper --model large-v3 x.mp3", GiB), proc(2, "claude", 600 * 1024**2),
                   proc(3, "claude", 100 * 1024**2), proc(4, "bash")),
        excluded=frozenset(),
    )
    matches = match_competing(snapshot, RULES, 16 * GiB)
    assert [(m.process.pid, m.rule.action) for m in matches] == [(1, "block"), (2, "warn")]
    result = check_competing(matches, RULES)
    assert result.status is Status.FAIL and result.code is ExitCode.COMPETING and "pid 1" in result.reason


def test_competing_min_rss_boundary_and_percent() -> None:
    rule = (CompetingRule(".", "warn", parse_size("25%")),)
    at = ProcessSnapshot((proc(1, "big", 4 * GiB),), frozenset())
    below = ProcessSnapshot((proc(1, "big", 4 * GiB - 1),), frozenset())
    assert len(match_competing(at, rule, 16 * GiB)) == 1
    assert match_competing(below, rule, 16 * GiB) == []
    assert check_competing(match_competing(at, rule, 16 * GiB), rule).status is Status.WARN


def test_verdict_exit_code_is_lowest_failing_code() -> None:
    def result(name: str, code: ExitCode, status: Status) -> CheckResult:
        return CheckResult(name, status, "", code)

    verdict = Verdict("p", (result("competing", ExitCode.COMPETING, Status.FAIL),
                            result("thermal", ExitCode.THERMAL, Status.FAIL),
                            result("lock", ExitCode.LOCKED, Status.FAIL),
                            result("memory", ExitCode.MEMORY, Status.WARN)))
    assert verdict.exit_code is ExitCode.THERMAL
    assert not verdict.ok
    assert Verdict("p", (result("memory", ExitCode.MEMORY, Status.UNKNOWN),)).exit_code is ExitCode.OK


def test_stale_report() -> None:
    assert check_stale([]).reason == "no stale locks"
    done = check_stale([Removal(Path("/l/x.holder.json"), "stale holder of lock 'x'", removed=True)])
    assert done.status is Status.PASS and "stale holder" in done.reason
    failed = check_stale([Removal(Path("/l/x"), "stale", removed=False, error="Operation not permitted")])
    assert failed.status is Status.WARN and not failed.blocks


def test_stale_report_of_a_read_only_evaluation_claims_nothing() -> None:
    # No cleanup ran (slots, slurm health, Gate): neither "no stale locks" nor a removal may be reported.
    unchecked = check_stale(None)
    assert unchecked.status is Status.PASS and unchecked.values == StaleValues(())
    assert "read-only" in unchecked.reason and unchecked.reason != check_stale([]).reason
