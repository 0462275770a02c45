"""GGUF headers, read by a small reader of the documented format (ggml's docs/gguf.md), never loaded.

Why not the official `gguf` package's GGUFReader: it memory-maps the whole file through numpy and builds a numpy
view per metadata value and per tensor, the tokenizer's 100-250 thousand strings included; it was written for files
one trusts (a count of 2**63 makes it loop or raise deep inside numpy); and it would make numpy, requests, tqdm and
PyYAML runtime dependencies of a command that must stay light. The reader here reads the header region only, keeps
the few integer keys a prediction needs, skips every other value by seeking (a string array costs one 8-byte read per
element), and stops at the caps below: its time and memory are bounded whatever the file says. The tests write their
files with the package's own GGUFWriter and check the type table against `gguf.GGML_QUANT_SIZES`.

Layout (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64 key-value count; each
key-value: string key, u32 type, value (a string is a u64 length and bytes; an array a u32 type, u64 count and
elements); each tensor: string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset from the data section,
which starts at the next multiple of `general.alignment` (32 by default) after the header.
"""

from __future__ import annotations

import os
import re
import struct

from safegate.errors import BadModelFile
from safegate.need.header import Cursor, ModelFile, block_of, open_regular, quoted

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 (u32 counts) is gone from llama.cpp since 2023
DEFAULT_ALIGNMENT = 32
# Caps, far above any real model, each bounding work or memory whatever a file says:
MAX_TENSORS = 1 << 16  # tensors over all parts (the largest MoE models have a few thousand)
MAX_KV = 1 << 16  # key-value pairs per file (real files: a few dozen)
MAX_KEY = 1 << 10  # bytes of a key (real keys: < 100)
MAX_KEPT_STRING = 1 << 10  # bytes of a string value kept (general.architecture); longer ones are skipped
MAX_ITEMS = 1 << 22  # array elements walked one by one over all parts (strings: a 256k vocab plus its merges)
MAX_LAYER_ARRAY = 1 << 12  # elements of a per-layer array kept (head counts per layer)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # bytes of a tensor name (GGML_MAX_NAME 64, with its NUL)
MAX_PARTS = 1 << 10  # parts of a split model
MAX_ALIGNMENT = 1 << 16
INT64_MAX = (1 << 63) - 1
_SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")

# ggml type id -> (name, elements per block, bytes per block). Checked against gguf.GGML_QUANT_SIZES in the tests.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
TYPE_BY_NAME = {name.lower(): (block, size) for name, block, size in GGML_TYPES.values()}

# Metadata value types: fixed-size scalars as struct formats; 8 is a string, 9 an array.
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SCALARS = {kind: struct.Struct(fmt) for kind, fmt in _FORMATS.items()}
_INTEGERS = {0, 1, 2, 3, 4, 5, 10, 11}
_STRING, _ARRAY = 8, 9
_START = struct.Struct("<4sIQQ")
# Keys kept: these, and "<arch>.<suffix>" for each suffix (the arch may come after its keys).
_KEYS = {"general.architecture", "general.alignment", "split.no", "split.count", "split.tensors.count"}
_SUFFIXES = {"block_count", "embedding_length", "context_length", "attention.head_count",
             "attention.head_count_kv", "attention.key_length", "attention.value_length", "vocab_size",
             "attention.sliding_window"}


class _Budget:
    """What all parts of one model may still cost together."""

    def __init__(self) -> None:
        self.tensors = MAX_TENSORS
        self.items = MAX_ITEMS


class _Part:
    def __init__(self) -> None:
        self.values: dict[str, int | str | tuple[int, ...]] = {}
        self.tensors: dict[str, int] = {}  # name -> bytes
        self.vocab: int | None = None


def read_gguf(path: str) -> ModelFile:
    """The header of a GGUF file (the first part of a split model: all parts read and summed). Raises BadModelFile
    or OSError, which modelfile.read_model turns into the one-line note."""
    budget = _Budget()
    first = _read_part(path, budget)
    count = _int(first, "split.count", 1)
    paths = [path]
    parts = [first]
    if count > 1:
        if _int(first, "split.no", 0) != 0:
            raise BadModelFile(f"{quoted(path)}: part {_int(first, 'split.no', 0) + 1} of {count}; llama.cpp loads a "
                           "split model from its first part (-00001-of-...)")
        if count > MAX_PARTS:
            raise BadModelFile(f"{quoted(path)}: split into {count} parts (at most {MAX_PARTS} accepted)")
        directory, name = os.path.split(path)
        match = _SPLIT_NAME.match(name)
        if not match or int(match.group(2)) != 1 or int(match.group(3)) != count:
            raise BadModelFile(f"{quoted(path)}: split into {count} parts, but not named <prefix>-00001-of-"
                           f"{count:05d}.gguf, so the other parts cannot be found")
        for number in range(2, count + 1):
            part_path = os.path.join(directory, f"{match.group(1)}-{number:05d}-of-{count:05d}.gguf")
            if not os.path.lexists(part_path):
                raise BadModelFile(f"{quoted(path)}: part {number} of {count} is missing ({quoted(part_path)})")
            part = _read_part(part_path, budget)
            if _int(part, "split.no", -1) != number - 1 or _int(part, "split.count", -1) != count:
                raise BadModelFile(f"{quoted(part_path)}: does not say it is part {number} of {count}")
            paths.append(part_path)
            parts.append(part)
    tensors: dict[str, int] = {}
    for part, part_path in zip(parts, paths, strict=True):
        for name, nbytes in part.tensors.items():
            if name in tensors:
                raise BadModelFile(f"{quoted(part_path)}: tensor {quoted(name)} appears twice")
            tensors[name] = nbytes
    expected = _int(first, "split.tensors.count", len(tensors)) if count > 1 else len(tensors)
    if expected != len(tensors):
        raise BadModelFile(f"{quoted(path)}: the parts hold {len(tensors)} tensors, "
                           f"split.tensors.count says {expected}")
    return _model(first, tuple(paths), tensors)


def _model(first: _Part, paths: tuple[str, ...], tensors: dict[str, int]) -> ModelFile:
    values = first.values
    arch = values.get("general.architecture")
    arch = arch if isinstance(arch, str) else None

    def number(suffix: str) -> int | None:
        value = values.get(f"{arch}.{suffix}") if arch else None
        if isinstance(value, tuple):  # per layer (OpenELM's head counts; 0 for a hybrid's recurrent layers)
            return max(value) if value and min(value) >= 0 and max(value) > 0 else None
        return value if isinstance(value, int) and 0 < value <= INT64_MAX else None

    def per_layer(suffix: str) -> tuple[int, ...]:
        value = values.get(f"{arch}.{suffix}") if arch else None
        return value if isinstance(value, tuple) and len(value) == blocks and number(suffix) else ()

    blocks = number("block_count")
    if blocks is not None and blocks > MAX_LAYER_ARRAY:
        raise BadModelFile(f"{quoted(paths[0])}: {blocks} blocks (at most {MAX_LAYER_ARRAY} accepted)")
    layers = [0] * (blocks or 0)
    input_weights = output_weights = 0
    for name, nbytes in tensors.items():
        block = block_of(name)
        if block is not None and block < len(layers):
            layers[block] += nbytes
        elif name.startswith(("token_embd.", "token_types.", "position_embd.")):
            input_weights += nbytes
        else:
            output_weights += nbytes
    embedding = number("embedding_length")
    vocab = number("vocab_size") or first.vocab
    return ModelFile(
        format="gguf", paths=paths, weights=sum(tensors.values()), arch=arch, block_count=blocks,
        embedding_length=embedding, head_count=number("attention.head_count"),
        head_count_kv=number("attention.head_count_kv"), key_length=number("attention.key_length"),
        value_length=number("attention.value_length"), context_length=number("context_length"), vocab_size=vocab,
        layer_weights=tuple(layers), input_weights=input_weights, output_weights=output_weights,
        tied_output="output.weight" not in tensors and "token_embd.weight" in tensors,
        sliding_window=number("attention.sliding_window"), head_count_kv_per_layer=per_layer(
            "attention.head_count_kv"))


def _int(part: _Part, key: str, default: int) -> int:
    value = part.values.get(key, default)
    return value if isinstance(value, int) else default


def _read_part(path: str, budget: _Budget) -> _Part:
    with open_regular(path) as fh:
        cur = Cursor(fh, path)
        magic, version, n_tensors, n_kv = _START.unpack(cur.read(_START.size, "the GGUF header"))
        if magic != MAGIC:
            raise BadModelFile(f"{quoted(path)}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
        if version not in VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            why = "a big-endian GGUF" if swapped in VERSIONS else f"GGUF version {version}"
            raise BadModelFile(f"{quoted(path)}: {why} "
                               f"(versions {VERSIONS[0]} and {VERSIONS[-1]}, little-endian, read)")
        if n_kv > MAX_KV:
            raise BadModelFile(f"{quoted(path)}: {n_kv} metadata entries (at most {MAX_KV} accepted)")
        if n_tensors > budget.tensors:
            raise BadModelFile(f"{quoted(path)}: {n_tensors} tensors (at most {MAX_TENSORS} accepted over all parts)")
        budget.tensors -= n_tensors
        part = _Part()
        for _ in range(n_kv):
            _read_kv(cur, part, budget)
        alignment = _int(part, "general.alignment", DEFAULT_ALIGNMENT)
        if not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
            raise BadModelFile(f"{quoted(path)}: general.alignment {alignment} is not a power of two up to "
                           f"{MAX_ALIGNMENT}")
        ends = [_read_tensor(cur, part, alignment) for _ in range(n_tensors)]
        data_start = -(-cur.pos // alignment) * alignment
        end = data_start + max(ends, default=0)
        if end > cur.size:
            raise BadModelFile(f"{quoted(path)}: truncated (its tensors end at byte {end}, the file has {cur.size})")
        return part


def _string(cur: Cursor, what: str, keep: int) -> str | None:
    """A GGUF string: kept (decoded) when at most *keep* bytes, else skipped and None."""
    length = cur.u64(what)
    if length > keep:
        cur.skip(length, what)
        return None
    try:
        return cur.read(length, what).decode("utf-8")
    except UnicodeDecodeError:
        raise BadModelFile(f"{quoted(cur.path)}: {what} is not UTF-8") from None


def _read_kv(cur: Cursor, part: _Part, budget: _Budget) -> None:
    key = _string(cur, "a metadata key", MAX_KEY)
    if key is None:
        raise BadModelFile(f"{quoted(cur.path)}: a metadata key longer than {MAX_KEY} bytes")
    kind = cur.u32(f"the type of {key}")
    wanted = key in _KEYS or key.split(".", 1)[-1] in _SUFFIXES
    if kind in _SCALARS:
        (value,) = cur.unpack(_SCALARS[kind], key)
        if wanted and kind in _INTEGERS:
            assert isinstance(value, int)
            part.values[key] = value
    elif kind == _STRING:
        text = _string(cur, key, MAX_KEPT_STRING if wanted else -1)
        if wanted and text is not None:
            part.values[key] = text
    elif kind == _ARRAY:
        _read_array(cur, key, part, budget, wanted)
    else:
        raise BadModelFile(f"{quoted(cur.path)}: metadata {quoted(key)} has unknown type {kind}")


def _read_array(cur: Cursor, key: str, part: _Part, budget: _Budget, wanted: bool) -> None:
    kind = cur.u32(f"the element type of {key}")
    count = cur.u64(f"the length of {key}")
    if key == "tokenizer.ggml.tokens":
        part.vocab = count  # the vocabulary, where no tensor says it
    if kind in _SCALARS:
        size = _SCALARS[kind].size
        if wanted and kind in _INTEGERS and count <= MAX_LAYER_ARRAY:
            items = struct.unpack(f"<{count}{_SCALARS[kind].format[1]}", cur.read(count * size, key))
            part.values[key] = tuple(int(i) for i in items)
        else:
            cur.skip(count * size, key)
    elif kind == _STRING:
        if count > budget.items:
            raise BadModelFile(f"{quoted(cur.path)}: {key} holds {count} strings (at most {MAX_ITEMS} accepted)")
        budget.items -= count
        cur.skip_strings(count, key)
    elif kind == _ARRAY:  # ggml refuses these too: llama.cpp could not load the file
        raise BadModelFile(f"{quoted(cur.path)}: metadata {quoted(key)} is an array of arrays")
    else:
        raise BadModelFile(f"{quoted(cur.path)}: metadata {quoted(key)} is an array of unknown type {kind}")


def _read_tensor(cur: Cursor, part: _Part, alignment: int) -> int:
    """One tensor's info: its bytes recorded in *part*; returns where its data ends, from the data section."""
    name = _string(cur, "a tensor name", MAX_NAME)
    if name is None:
        raise BadModelFile(f"{quoted(cur.path)}: a tensor name longer than {MAX_NAME} bytes")
    n_dims = cur.u32(f"the dimensions of {name}")
    if n_dims > MAX_DIMS:
        raise BadModelFile(f"{quoted(cur.path)}: tensor {quoted(name)} has {n_dims} dimensions (at most {MAX_DIMS})")
    dims = struct.unpack(f"<{n_dims}Q", cur.read(8 * n_dims, f"the shape of {name}"))
    kind = cur.u32(f"the type of {name}")
    offset = cur.u64(f"the offset of {name}")
    if kind not in GGML_TYPES:
        raise BadModelFile(f"{quoted(cur.path)}: tensor {quoted(name)} has ggml type {kind}, unknown here")
    type_name, block, size = GGML_TYPES[kind]
    elements = 1
    for dim in dims:
        elements *= dim
    if any(d > INT64_MAX for d in dims) or elements > INT64_MAX:
        raise BadModelFile(f"{quoted(cur.path)}: tensor {quoted(name)} has a shape of more than 2**63 elements")
    if dims and dims[0] % block:
        raise BadModelFile(f"{quoted(cur.path)}: tensor {quoted(name)}'s rows ({dims[0]}) are not whole {type_name} "
                       f"blocks of {block}")
    if offset % alignment:
        raise BadModelFile(f"{quoted(cur.path)}: tensor {quoted(name)}'s offset {offset} is not aligned to {alignment}")
    if name in part.tensors:
        raise BadModelFile(f"{quoted(cur.path)}: tensor {quoted(name)} appears twice")
    nbytes = elements // block * size
    part.tensors[name] = nbytes
    if name == "token_embd.weight" and n_dims >= 2 and part.vocab is None:
        part.vocab = dims[1]
    return offset + nbytes
