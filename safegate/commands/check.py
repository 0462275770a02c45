"""check and slots: evaluate the gate once, or until it passes."""

from __future__ import annotations

from collections.abc import Callable

from safegate.config.file import load_config
from safegate.config.model import DEFAULT_PROFILE, Overrides
from safegate.exitcodes import ExitCode
from safegate.gate.admission import grant_check, wait_until_clear
from safegate.gate.grant import grant_owner
from safegate.gate.preflight import clean_and_evaluate, count_slots, evaluate, reserves, resolve
from safegate.gate.results import Verdict


def check(config: str | None, profile: str | None, overrides: Overrides, *, wait: bool, timeout: float | None,
          on_blocked: Callable[[Verdict], None] | None = None, grant: bool = True,
          grant_to: int | None = None) -> tuple[Verdict, str]:
    """The verdict, and a note on the grant: what a pass reserved for the caller's next job (safegate.gate.grant), or
    why nothing was ("" when there is nothing to reserve, or with *grant* False: asking only)."""
    settings = resolve(load_config(config), DEFAULT_PROFILE if profile is None else profile, overrides)
    owner, note = grant_owner(grant_to) if grant and reserves(settings) else (None, "")
    if owner is not None:
        return grant_check(settings, owner, wait=wait, timeout=timeout, on_blocked=on_blocked)
    # check is the step that cleans up stale lock files (and says so); slots only reads.
    if wait:
        return wait_until_clear(settings, timeout, on_blocked=on_blocked), note
    return clean_and_evaluate(settings), note


def slots(config: str | None, profile: str | None, overrides: Overrides, cap: int | None) -> tuple[int, ExitCode]:
    """(how many jobs can start now, the exit code: 0, or when none can, the code of what blocks).

    0 with exit 0 would be a lie to its callers: to `xargs -P` and `parallel -j`, 0 means "no limit".
    """

    settings = resolve(load_config(config), DEFAULT_PROFILE if profile is None else profile, overrides)
    verdict = evaluate(settings)
    count = count_slots(settings, verdict, cap)
    return count, (ExitCode.OK if count > 0 else verdict.exit_code or ExitCode.MEMORY)
