"""safegate: stop heavy ML jobs from freezing the machine.

The Python API (check, hold, slots, Gate, Blocked) lives in safegate.api and is re-exported here lazily,
so the command line does not pay for importing it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = ("Blocked", "Gate", "check", "hold", "slots")
__all__ = ["Blocked", "Gate", "__version__", "check", "hold", "slots"]


def __getattr__(name: str) -> Any:
    if name in _API:
        from safegate import api

        return getattr(api, name)
    raise AttributeError(f"module 'safegate' has no attribute {name!r}")
