"""check and slots: evaluate the gate once, or until it passes."""

from __future__ import annotations

from collections.abc import Callable

from safegate.admission import wait_until_clear
from safegate.config import DEFAULT_PROFILE, load_config
from safegate.exitcodes import ExitCode
from safegate.preflight import Overrides, clean_and_evaluate, evaluate, resolve
from safegate.results import Verdict


def check(config: str | None, profile: str | None, overrides: Overrides, *, wait: bool, timeout: float | None,
          on_blocked: Callable[[Verdict], None] | None = None) -> Verdict:
    settings = resolve(load_config(config), DEFAULT_PROFILE if profile is None else profile, overrides)
    # check is the step that cleans up stale lock files (and says so); slots only reads.
    if wait:
        return wait_until_clear(settings, timeout, on_blocked=on_blocked)
    return clean_and_evaluate(settings)


def slots(config: str | None, profile: str | None, overrides: Overrides, cap: int | None) -> tuple[int, ExitCode]:
    """(how many jobs can start now, the exit code: 0, or when none can, the code of what blocks).

    0 with exit 0 would be a lie to its callers: to `xargs -P` and `parallel -j`, 0 means "no limit".
    """
    from safegate.api import count_slots

    settings = resolve(load_config(config), DEFAULT_PROFILE if profile is None else profile, overrides)
    verdict = evaluate(settings)
    count = count_slots(settings, verdict, cap)
    return count, (ExitCode.OK if count > 0 else verdict.exit_code or ExitCode.MEMORY)
