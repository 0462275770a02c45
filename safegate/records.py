"""Where safegate's value classes come from: `from safegate.records import dataclass, field` instead of the stdlib.

mypy sees the stdlib's dataclasses, so every class is typed and checked exactly as a dataclass is (fields,
frozen assignment, replace() keywords). At runtime the same names come from safegate.valueclass, which builds
the same classes without dataclasses' import-time cost (its docstring says why that matters for `check`).
"""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dataclasses import asdict, dataclass, field, fields, replace
else:
    from safegate.valueclass import asdict, dataclass, field, fields, replace

__all__ = ["asdict", "dataclass", "field", "fields", "replace"]
