"""The built-in knowledge (knowledge.toml), read once into typed records: a mistake in the file fails the tests,
never a user's command."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import msgspec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from safegate.units import parse_size


class Source(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    url: str
    says: str


class Size(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One model size: its parameters (millions), the published GPU memory where there is one, its lock."""

    params: int
    gpu: str | None = None
    lock: str | None = None


class Family(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One tool: the programs and modules that are it, the options it reads, its defaults and its figures."""

    tool: str
    sources: tuple[str, ...]
    programs: tuple[str, ...] = ()
    modules: tuple[str, ...] = ()
    model_options: tuple[str, ...] = ()
    device_options: tuple[str, ...] = ()
    compute_options: tuple[str, ...] = ()
    context_options: tuple[str, ...] = ()
    gpu_layers_options: tuple[str, ...] = ()
    cache_options: tuple[str, ...] = ()
    default_model: str | None = None
    default_context: str | None = None  # a number, or "trained": the model's own context length
    default_gpu_layers: str | None = None  # a number, "auto" (all with a GPU, else none) or "all"
    engine: str | None = None  # "pytorch" (openai-whisper) or "ctranslate2"
    ram_bytes_per_param: int = 0
    ram_overhead: str = "0"
    gpu_overhead: str = "0"
    ram_on_gpu: str = "0"
    cpu_overhead: str = "0"
    extra: str = "0"
    models: dict[str, Size] = {}
    aliases: dict[str, str] = {}


class CTranslate2(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    models: dict[str, Size]
    aliases: dict[str, str]
    bytes_per_param: dict[str, int]


class Knowledge(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sources: dict[str, Source]
    families: dict[str, Family]
    ctranslate2: CTranslate2

    def cite(self, family: Family) -> tuple[str, ...]:
        return tuple(self.sources[name].url for name in family.sources)


PATH = Path(__file__).parent / "knowledge.toml"


@functools.cache
def knowledge() -> Knowledge:
    data = msgspec.convert(tomllib.loads(PATH.read_text(encoding="utf-8")), Knowledge)
    for family in data.families.values():
        for name in family.sources:
            if name not in data.sources:
                raise ValueError(f"knowledge.toml: {family.tool} cites no such source {name!r}")
        for text in (family.ram_overhead, family.gpu_overhead, family.ram_on_gpu, family.cpu_overhead, family.extra):
            parse_size(text, allow_percent=False)
    return data


def size(text: str | None) -> int:
    return 0 if text is None else parse_size(text, allow_percent=False).bytes or 0
