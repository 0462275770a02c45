"""need: what a command will need (RAM, GPU memory, its lock), decided exactly as exec decides it, and where each
figure comes from; the command is never run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from safegate.config.file import load_config
from safegate.config.model import Overrides
from safegate.errors import UsageError
from safegate.gate.preflight import resolve, total_ram
from safegate.units import printable


def need(config: str | None, profile: str | None, overrides: Overrides, command: Sequence[str]) -> dict[str, Any]:
    """The need as `need --json` prints it (docs/json.md)."""
    if not command:
        raise UsageError("need: no command given; usage: safegate need [OPTIONS] -- CMD [ARGS]...")
    settings = resolve(load_config(config), profile, overrides, command=command)
    found = settings.need
    assert found is not None  # resolve decides the need of every command it is given
    total = total_ram()
    known, predicted, learned = found.known, found.prediction, found.learned

    def figure(key: str) -> dict[str, Any]:
        f = getattr(found, key)
        return {"bytes": f.size.resolve(total), "source": f.source, "detail": printable(f.detail)}

    return {
        "profile": settings.profile.name,
        "tool": known.tool if known is not None else None,
        "program": printable(known.program) if known is not None else "",
        "signature": found.signature,
        "memory": figure("memory"),
        "gpu_memory": figure("gpu_memory"),
        "lock": {"name": settings.profile.lock, "source": found.lock_source},
        "predicted": None if predicted is None else {
            "memory": predicted.ram, "gpu_memory": predicted.gpu, "source": predicted.source,
            "detail": printable(predicted.detail), "cites": list(predicted.cites),
        },
        "learned": None if learned is None else {
            "runs": learned.runs, "peak_memory_p95": learned.peak_memory_p95,
            "peak_gpu_memory_p95": learned.peak_gpu_memory_p95, "memory": learned.memory,
            "gpu_memory": learned.gpu_memory,
        },
        "notes": [printable(n) for n in found.notes],
    }
