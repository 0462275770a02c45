"""safetensors headers, read, never loaded: a file, a `*.safetensors.index.json` with its shards, or a folder; and the
`config.json` beside them, which sizes the KV cache.

The format (huggingface/safetensors): a u64 little-endian length N, N bytes of JSON
{"__metadata__": {...}, "<tensor>": {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, ...}, then the
tensors' bytes. The JSON is decoded by msgspec into typed records (a hostile number, type or nesting is a decode
error, not an exception here); N is capped as the safetensors library caps it.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Any

import msgspec

from safegate.errors import BadModelFile
from safegate.need.header import Cursor, ModelFile, open_regular, quoted

MAX_HEADER = 100_000_000  # the safetensors library's own cap on N
MAX_INDEX = 1 << 26  # bytes of an index file (a real one: tens of KiB)
MAX_CONFIG = 1 << 20  # bytes of config.json
MAX_SHARDS = 1 << 10  # files of one model
MAX_TENSORS = 1 << 18  # tensors over all shards
MAX_LISTED = 1 << 14  # entries of a folder looked at
MAX_LAYERS = 1 << 12
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Bits per element of each dtype the safetensors library knows (F4 and F6 pack below a byte).
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
}
# Where config.json names the model's dtype, the KV cache transformers keeps is of that dtype.
_DTYPE_BYTES = {"float32": 4.0, "float": 4.0, "float16": 2.0, "half": 2.0, "bfloat16": 2.0}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_INPUT = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|tok_embeddings|embed_positions|wpe)\.")
_Count = Annotated[int, msgspec.Meta(ge=0)]


class _Tensor(msgspec.Struct):
    dtype: str
    shape: list[_Count]
    data_offsets: tuple[_Count, _Count]


class _Index(msgspec.Struct):
    weight_map: dict[str, str]


def read_safetensors(path: str) -> ModelFile:
    """A .safetensors file, a *.safetensors.index.json, or a folder holding either. Raises BadModelFile or OSError,
    which modelfile.read_model turns into the one-line note."""
    if os.path.isdir(path):
        folder = path
        if os.path.isfile(os.path.join(path, INDEX)):
            shards = _shards(os.path.join(path, INDEX))
        elif os.path.isfile(os.path.join(path, SINGLE)):
            shards = [os.path.join(path, SINGLE)]
        else:
            shards = _listed(path)
    elif path.endswith(".index.json"):
        folder, shards = os.path.dirname(path), _shards(path)
    else:
        folder, shards = os.path.dirname(path), [path]
    budget = [MAX_TENSORS]
    tensors: dict[str, int] = {}
    for shard in shards:
        tensors.update(_read_file(shard, budget))
    layers: list[int] = []
    input_weights = output_weights = 0
    for name, nbytes in tensors.items():
        match = _LAYER.search(name)
        if match and int(match.group(1)) < MAX_LAYERS:
            index = int(match.group(1))
            layers.extend([0] * (index + 1 - len(layers)))
            layers[index] += nbytes
        elif _INPUT.search(name):
            input_weights += nbytes
        else:
            output_weights += nbytes
    fields, notes = _config(os.path.join(folder, "config.json"))
    return ModelFile(format="safetensors", paths=tuple(shards), weights=sum(tensors.values()),
                     layer_weights=tuple(layers), input_weights=input_weights, output_weights=output_weights,
                     notes=tuple(notes), **fields)


def _listed(folder: str) -> list[str]:
    found: list[str] = []
    with os.scandir(folder) as entries:
        for seen, entry in enumerate(entries):
            if seen >= MAX_LISTED:
                raise BadModelFile(f"{quoted(folder)}: more than {MAX_LISTED} entries")
            if entry.name.endswith(".safetensors"):
                found.append(entry.path)
    if not found:
        raise BadModelFile(f"{quoted(folder)}: no {INDEX}, {SINGLE} or *.safetensors in it")
    if len(found) > MAX_SHARDS:
        raise BadModelFile(f"{quoted(folder)}: {len(found)} .safetensors files (at most {MAX_SHARDS} accepted)")
    return sorted(found)


def _shards(index: str) -> list[str]:
    with open_regular(index) as fh:
        cur = Cursor(fh, index)
        data = cur.read(cur.size, "the index", limit=MAX_INDEX)
    try:
        weight_map = msgspec.json.decode(data, type=_Index).weight_map
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadModelFile(f"{quoted(index)}: not a safetensors index ({quoted(str(exc))})") from None
    names = sorted(set(weight_map.values()))
    if not names:
        raise BadModelFile(f"{quoted(index)}: its weight_map names no file")
    if len(names) > MAX_SHARDS:
        raise BadModelFile(f"{quoted(index)}: {len(names)} files (at most {MAX_SHARDS} accepted)")
    for name in names:
        # Shards sit beside their index; a name that leaves the folder is not a shard.
        if not name or "/" in name or "\0" in name or name in {".", ".."}:
            raise BadModelFile(f"{quoted(index)}: names {quoted(name)} as a shard, not a file beside it")
    folder = os.path.dirname(index)
    return [os.path.join(folder, name) for name in names]


def _read_file(path: str, budget: list[int]) -> dict[str, int]:
    with open_regular(path) as fh:
        cur = Cursor(fh, path)
        length = cur.u64("the header length")
        header = cur.read(length, "the JSON header", limit=MAX_HEADER)
        data_size = cur.size - cur.pos
    try:
        raw = msgspec.json.decode(header, type=dict[str, msgspec.Raw])
    except (msgspec.DecodeError, RecursionError) as exc:
        raise BadModelFile(f"{quoted(path)}: not a safetensors header ({quoted(str(exc))})") from None
    tensors: dict[str, int] = {}
    for name, value in raw.items():
        if name == "__metadata__":
            continue
        budget[0] -= 1
        if budget[0] < 0:
            raise BadModelFile(f"{quoted(path)}: more than {MAX_TENSORS} tensors")
        try:
            info = msgspec.json.decode(value, type=_Tensor)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise BadModelFile(f"{quoted(path)}: tensor {quoted(name)}: {quoted(str(exc))}") from None
        bits = DTYPE_BITS.get(info.dtype)
        if bits is None:
            raise BadModelFile(f"{quoted(path)}: tensor {quoted(name)} has dtype {quoted(info.dtype)}, unknown here")
        elements = 1
        for dim in info.shape:
            elements *= dim
        begin, end = info.data_offsets
        if elements * bits % 8 or end - begin != elements * bits // 8:
            raise BadModelFile(f"{quoted(path)}: tensor {quoted(name)}'s offsets do not fit its dtype and shape")
        if end > data_size:
            raise BadModelFile(f"{quoted(path)}: truncated (tensor {quoted(name)} ends at byte {end} of the data, "
                           f"which has {data_size})")
        tensors[name] = end - begin
    return tensors


def _config(path: str) -> tuple[dict[str, Any], list[str]]:
    """The ModelFile fields config.json gives (the KV cache's shape), and a note where it gives none."""
    try:
        with open_regular(path) as fh:
            cur = Cursor(fh, path)
            config = msgspec.json.decode(cur.read(cur.size, "config.json", limit=MAX_CONFIG))
    except (BadModelFile, OSError, msgspec.DecodeError, RecursionError):
        return {}, [f"no readable config.json in {quoted(os.path.dirname(path) or '.')}: weights only, no KV cache"]
    if not isinstance(config, dict):
        return {}, ["config.json is not an object: weights only, no KV cache"]
    if not isinstance(config.get("num_hidden_layers"), int) and isinstance(config.get("text_config"), dict):
        config = config["text_config"]  # a vision-language model: the language model's shape sizes the cache

    def number(*keys: str) -> int | None:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 31:
                return value
        return None

    heads = number("num_attention_heads", "n_head")
    head_dim = number("head_dim")
    arch = config.get("model_type")
    dtype = config.get("torch_dtype", config.get("dtype"))
    fields: dict[str, Any] = {
        "arch": quoted(arch) if isinstance(arch, str) else None,
        "block_count": number("num_hidden_layers", "n_layer"),
        "embedding_length": number("hidden_size", "n_embd"),
        "head_count": heads,
        "head_count_kv": number("num_key_value_heads") or heads,  # absent: every head has its own K and V
        "key_length": head_dim, "value_length": head_dim,
        "context_length": number("max_position_embeddings", "n_positions"),
        "vocab_size": number("vocab_size"),
        "cache_element_bytes": _DTYPE_BYTES.get(dtype) if isinstance(dtype, str) else None,
    }
    return fields, []
