"""check and slots: evaluate the gate once, or until it passes."""

from __future__ import annotations

from collections.abc import Callable

from safegate.config import DEFAULT_PROFILE, load_config
from safegate.preflight import Overrides, clean_and_evaluate, evaluate, resolve, wait_until_clear
from safegate.results import Verdict


def check(config: str | None, profile: str | None, overrides: Overrides, *, wait: bool, timeout: float | None,
          on_blocked: Callable[[Verdict], None] | None = None) -> Verdict:
    settings = resolve(load_config(config), DEFAULT_PROFILE if profile is None else profile, overrides)
    # check is the step that cleans up stale lock files (and says so); slots only reads.
    if wait:
        return wait_until_clear(settings, timeout, on_blocked=on_blocked)
    return clean_and_evaluate(settings)


def slots(config: str | None, profile: str | None, overrides: Overrides, cap: int | None) -> int:
    from safegate.api import count_slots

    settings = resolve(load_config(config), DEFAULT_PROFILE if profile is None else profile, overrides)
    return count_slots(settings, evaluate(settings), cap)
