"""check and slots: evaluate the gate once, or until it passes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import msgspec

from safegate.config.file import load_config
from safegate.config.model import Overrides
from safegate.exitcodes import ExitCode
from safegate.gate.admission import grant_check, wait_until_clear
from safegate.gate.grant import grant_owner
from safegate.gate.preflight import Settings, clean_and_evaluate, count_slots, evaluate, reserves, resolve
from safegate.gate.results import CheckResult, GpuValues, MemoryValues, Verdict
from safegate.units import format_bytes


def check(config: str | None, profile: str | None, overrides: Overrides, *, wait: bool, timeout: float | None,
          on_blocked: Callable[[Verdict], None] | None = None, grant: bool = True,
          grant_to: int | None = None, command: Sequence[str] = ()) -> tuple[Verdict, str]:
    """The verdict, and a note on the grant: what a pass reserved for the caller's next job (safegate.gate.grant), or
    why nothing was ("" when there is nothing to reserve, or with *grant* False: asking only). *command*: the job
    (not run), whose profile and need are decided as exec decides them."""
    settings = resolve(load_config(config), profile, overrides, command=command)
    owner, note = grant_owner(grant_to) if grant and reserves(settings) else (None, "")
    if owner is not None:
        return grant_check(settings, owner, wait=wait, timeout=timeout, on_blocked=on_blocked)
    # check is the step that cleans up stale lock files (and says so); slots only reads.
    if wait:
        return wait_until_clear(settings, timeout, on_blocked=on_blocked), note
    return clean_and_evaluate(settings), note


class SlotCount(msgspec.Struct, frozen=True):
    """What `slots` found: how many jobs can start now, the exit code (0, or when none can, the code of what
    blocks), and when none can, why: the failing checks, or (none failing) the figures a job does not fit in."""

    count: int
    exit_code: ExitCode
    failures: tuple[CheckResult, ...] = ()
    shortfall: str = ""


def slots(config: str | None, profile: str | None, overrides: Overrides, cap: int | None,
          command: Sequence[str] = ()) -> SlotCount:
    """How many jobs can start now, and when none can, the code of what blocks and why. *command*: as check's.

    0 with exit 0 would be a lie to its callers: to `xargs -P` and `parallel -j`, 0 means "no limit".
    """

    settings = resolve(load_config(config), profile, overrides, command=command)
    verdict = evaluate(settings)
    count = count_slots(settings, verdict, cap)
    if count > 0:
        return SlotCount(count, ExitCode.OK)
    failures = verdict.failures
    return SlotCount(0, verdict.exit_code or ExitCode.MEMORY, failures,
                     "" if failures else shortfall(settings, verdict))


def shortfall(settings: Settings, verdict: Verdict) -> str:
    """Why no job of this size fits though no check fails: the memory left for jobs (or each GPU's), against the
    need (count_slots' sums, in words)."""
    memory = verdict.values(MemoryValues)
    if memory is not None and memory.need > 0:
        margin = settings.profile.memory_margin.resolve(memory.total)
        left = memory.available - memory.reserved - margin
        if left < memory.need:
            return (f"a job of this size does not fit: available {format_bytes(memory.available)} - reserved "
                    f"{format_bytes(memory.reserved)} - margin {format_bytes(margin)} = {format_bytes(left)} < need "
                    f"{format_bytes(memory.need)}")
    gpu = verdict.values(GpuValues)
    if gpu is not None and gpu.need > 0:
        return (f"a job of this size does not fit: no GPU it may use has {format_bytes(gpu.need)} free after its "
                "margin and what admitted jobs still take")
    return "a job of this size does not fit"
