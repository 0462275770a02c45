"""A command line's need predicted from what safegate knows (knowledge.toml) and what its model file's header
says (safegate.need.modelfile): RAM and GPU memory, where they come from, and the command's signature, under which
exec records its runs (config.history) so that they can refine the prediction."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import msgspec

from safegate.need.command import SIGNATURE_MAX, Invocation, recognise
from safegate.need.knowledge import Family, Knowledge, knowledge, size
from safegate.units import format_bytes, printable

MAX_CONTEXT = 1 << 24  # tokens: past any model; a larger -c is a typo, read as absent
MAX_LAYERS = 1 << 16


class Prediction(msgspec.Struct, frozen=True):
    """The predicted need: *source* "table" (knowledge.toml) or "file" (the model file's header); *detail* says how
    it was reached, *cites* the sources' addresses; *lock* the model family's lock where the table has one."""

    ram: int
    gpu: int
    source: str
    detail: str
    cites: tuple[str, ...] = ()
    lock: str | None = None


class Known(msgspec.Struct, frozen=True):
    """What the command line says: the tool, its signature (None: no tool safegate knows), the prediction (None:
    none could be made; the notes say why)."""

    tool: str | None
    program: str
    signature: str | None
    prediction: Prediction | None
    notes: tuple[str, ...] = ()


def predict(argv: Sequence[str], gpu_present: Callable[[], bool]) -> Known:
    """*gpu_present* is asked only when the command leaves the device to the machine."""
    known = knowledge()
    inv = recognise(argv, known)
    if not inv.family:
        return Known(None, inv.program, None, None, (*inv.notes, "no tool safegate knows (safegate need lists them)"))
    family = known.families[inv.family]
    signature: str | None
    if family.engine is not None:
        device_gpu = _device_gpu(inv, family, gpu_present)
        signature = _signature(inv, family, device="cuda" if device_gpu else "cpu",
                               compute=inv.options.get(family.compute_options[0]) if family.compute_options else None)
        prediction, notes = (_whisper if family.engine == "pytorch" else _ctranslate2)(inv, family, known, device_gpu)
    else:
        prediction, notes, signature = _model_file(inv, family, known, gpu_present)
    return Known(family.tool, inv.program, signature, prediction, (*inv.notes, *notes))


def _device_gpu(inv: Invocation, family: Family, gpu_present: Callable[[], bool]) -> bool:
    device = inv.options.get(family.device_options[0], "") if family.device_options else ""
    device = device.lower()
    if device.startswith("cpu"):
        return False
    if device.startswith("cuda") or device.startswith("gpu"):
        return True
    return gpu_present()  # absent or auto: the tools use CUDA when they see a GPU


def _signature(inv: Invocation, family: Family, **parts: str | int | None) -> str:
    model = os.path.basename(inv.model.rstrip("/")) if inv.model else "-"
    fields = [f"program={inv.program}", f"model={model}"] + [f"{k}={v}" for k, v in parts.items() if v is not None]
    return printable(" ".join(fields))[:SIGNATURE_MAX]


def _whisper(inv: Invocation, family: Family, known: Knowledge, gpu: bool) -> tuple[Prediction | None, list[str]]:
    name = (inv.model or "").lower()
    entry = family.models.get(family.aliases.get(name, name))
    if entry is None:
        return None, [f"{family.tool} model {printable(name)[:80]!r} is not in the table"]
    canonical = family.aliases.get(name, name)
    weights = entry.params * 1_000_000 * family.ram_bytes_per_param
    ram = weights + size(family.ram_overhead)
    vram = size(entry.gpu) if gpu else 0
    detail = (f"{family.tool} {name} ({canonical}, {entry.params} M parameters) on "
              + (f"GPU: GPU memory {entry.gpu} (the README's Required VRAM); " if gpu else "CPU: ")
              + f"RAM {entry.params} M x {family.ram_bytes_per_param} bytes (fp16 checkpoint and fp32 model while "
              f"loading) + {family.ram_overhead}")
    return Prediction(ram, vram, "table", detail, known.cite(family), entry.lock), []


def _ctranslate2(inv: Invocation, family: Family, known: Knowledge, gpu: bool) -> tuple[Prediction | None, list[str]]:
    ct = known.ctranslate2
    name = _ct2_name((inv.model or "").lower())
    entry = ct.models.get(ct.aliases.get(name, name))
    if entry is None:
        return None, [f"{family.tool} model {printable(inv.model or '')[:80]!r} is not in the table"]
    notes = []
    given = inv.options.get(family.compute_options[0], "").lower() if family.compute_options else ""
    compute = given if given in ct.bytes_per_param else ("float16" if gpu else "float32")
    if given and given not in ("auto", "default") and given not in ct.bytes_per_param:
        notes.append(f"compute type {printable(given)[:40]!r} is not in the table: predicted as {compute}")
    weights = entry.params * 1_000_000 * ct.bytes_per_param[compute]
    extra = size(family.extra)
    if gpu:
        ram, vram = size(family.ram_on_gpu), weights + size(family.gpu_overhead) + extra
        how = (f"GPU memory {entry.params} M x {ct.bytes_per_param[compute]} bytes + {family.gpu_overhead}"
               f"{' + ' + family.extra if extra else ''}; RAM {family.ram_on_gpu}")
    else:
        ram, vram = weights + size(family.cpu_overhead) + extra, 0
        how = (f"RAM {entry.params} M x {ct.bytes_per_param[compute]} bytes + {family.cpu_overhead}"
               f"{' + ' + family.extra if extra else ''}")
    detail = f"{family.tool} {name} ({compute}) on {'GPU' if gpu else 'CPU'}: {how}"
    return Prediction(ram, vram, "table", detail, known.cite(family), entry.lock), notes


def _ct2_name(model: str) -> str:
    """A CTranslate2 model's size from its name or Hugging Face repo (Systran/faster-whisper-large-v3)."""
    base = model.rstrip("/").rsplit("/", 1)[-1]
    for prefix in ("faster-whisper-", "faster-", "whisper-"):
        base = base.removeprefix(prefix)
    return base.removesuffix("-ct2")


def _number(text: str | None, low: int, high: int) -> int | None:
    if text is None:
        return None
    text = text.split(",")[-1].strip()  # llama-bench takes lists (-ngl 0,99): the last
    if not (text.lstrip("-").isascii() and text.lstrip("-").isdigit()) or len(text) > 12:
        return None
    value = int(text)
    return value if low <= value <= high else None


def _model_file(inv: Invocation, family: Family, known: Knowledge,
                gpu_present: Callable[[], bool]) -> tuple[Prediction | None, list[str], str | None]:
    from safegate.need.modelfile import file_need, read_model

    if not inv.model:
        return None, [f"{family.tool}: no model file on the command line"], None
    notes: list[str] = []
    ctx_given = inv.options.get(family.context_options[0]) if family.context_options else None
    context = _number(ctx_given, 0, MAX_CONTEXT)
    if ctx_given is not None and context is None:
        notes.append(f"context {printable(ctx_given)[:40]!r} is not a number of tokens: read as absent")
    if context is None and family.default_context not in (None, "trained"):
        context = int(str(family.default_context))
    # None or 0: the model's trained context (llama.cpp's -c 0); for safetensors None is no KV cache.
    layers_given = inv.options.get(family.gpu_layers_options[0]) if family.gpu_layers_options else None
    layers = _number(layers_given, -MAX_LAYERS, MAX_LAYERS)
    if layers_given is not None and layers is None:
        notes.append(f"GPU layers {printable(layers_given)[:40]!r} is not a number: read as absent")
    device = inv.options.get(family.device_options[0], "").lower() if family.device_options else ""
    if family.gpu_layers_options == ():  # safetensors: the whole model where the device is
        layers = 0 if device.startswith("cpu") else -1 if device.startswith("cuda") or gpu_present() else 0
    elif layers is None or layers == -1:  # absent, or llama.cpp's -1 (auto: as many as fit)
        default = family.default_gpu_layers or "auto"
        if layers == -1 or default == "auto":
            layers = -1 if gpu_present() else 0
        else:
            layers = -1 if default == "all" else int(default)
    if layers != 0 and family.gpu_layers_options and not gpu_present():
        # llama.cpp without a GPU (or a CPU-only build) ignores -ngl: every layer stays in RAM.
        notes.append(f"no GPU here: {printable(layers_given or str(layers))[:20]} GPU layers read as 0, all in RAM")
        layers = 0
    cache = inv.options.get(family.cache_options[0], "f16") if family.cache_options else "f16"
    model = read_model(inv.model)
    if isinstance(model, str):
        return None, [*notes, f"{model}; no prediction"], None
    need = file_need(model, context=context, gpu_layers=layers, cache_type=cache)
    signature = _signature(inv, family, ctx=need.context or None, ngl=need.gpu_layers,
                           cache=cache if cache != "f16" else None)
    where = os.path.basename(inv.model.rstrip("/"))
    detail = (f"{printable(where)[:120]} ({model.format} header): weights {format_bytes(need.weights)}, KV cache "
              f"{format_bytes(need.kv_cache)} at a context of {need.context} ({printable(cache)[:16]}), overhead "
              f"{format_bytes(need.overhead)}; {need.gpu_layers} of {(model.block_count or 0) + 1} layers on the "
              f"GPU ({family.tool}'s defaults where the command gives none)")
    return (Prediction(need.ram, need.gpu, "file", detail, known.cite(family)), [*notes, *need.notes], signature)
