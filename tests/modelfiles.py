"""Model files for the tests, written by the formats' own reference writers where they exist: GGUF by the `gguf`
package's GGUFWriter (llama.cpp's gguf-py), safetensors by the documented layout (json + struct: the format is
an 8-byte length and a JSON header). Tensor data is never written: each file is extended to its full size
without writing (a sparse file), so a 5 GB model costs a few KiB of disk and milliseconds.

Every size expected from a file is computed here independently of safegate, from gguf.GGML_QUANT_SIZES.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

MiB = 1 << 20
LLAMA = {"blocks": 32, "embedding": 4096, "heads": 32, "kv_heads": 8}


def ggml_bytes(shape: Sequence[int], kind: T) -> int:
    block, size = GGML_QUANT_SIZES[kind]
    elements = 1
    for dim in shape:
        elements *= dim
    return elements // block * size


class Written:
    def __init__(self, paths: list[Path], tensors: dict[str, int]) -> None:
        self.paths = paths
        self.tensors = tensors  # name -> bytes, computed from GGML_QUANT_SIZES

    @property
    def total(self) -> int:
        return sum(self.tensors.values())


def write_llama_gguf(path: Path, *, blocks: int = 32, embedding: int = 4096, heads: int = 32, kv_heads: int = 8,
                     ff: int = 14336, vocab: int = 128256, tokens: int = 1000, context: int = 8192,
                     tied: bool = False, parts: int = 1, merges: int | None = None,
                     more: Callable[[gguf.GGUFWriter], None] | None = None) -> Written:
    """A llama-architecture GGUF with a Q4_K_M-like mix of types, its header written by GGUFWriter and its data
    left sparse. *tokens* strings (and as many merges) stand in for the tokenizer; *parts* > 1 splits it as
    gguf-split does (name-00001-of-0000N.gguf); *more* adds metadata."""
    per_block = 9
    total_tensors = 1 + blocks * per_block + 1 + (0 if tied else 1)
    split = -(-total_tensors // parts) if parts > 1 else 0
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split)
    writer.add_block_count(blocks)
    writer.add_embedding_length(embedding)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if more is not None:
        more(writer)
    writer.add_context_length(context)
    writer.add_feed_forward_length(ff)
    writer.add_rope_freq_base(500000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(tokens)])
    writer.add_token_merges([f"a{i} b{i}" for i in range(tokens if merges is None else merges)])
    writer.add_token_types([1] * tokens)
    writer.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
    tensors: dict[str, int] = {}

    def tensor(name: str, shape: list[int], kind: T) -> None:  # shape in ggml order: ne[0] (a row) first
        nbytes = ggml_bytes(shape, kind)
        tensors[name] = nbytes
        writer.add_tensor_info(name, list(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=kind)

    head = embedding // heads
    tensor("token_embd.weight", [embedding, vocab], T.Q4_K)
    for i in range(blocks):
        tensor(f"blk.{i}.attn_norm.weight", [embedding], T.F32)
        tensor(f"blk.{i}.attn_q.weight", [embedding, embedding], T.Q4_K)
        tensor(f"blk.{i}.attn_k.weight", [embedding, head * kv_heads], T.Q4_K)
        tensor(f"blk.{i}.attn_v.weight", [embedding, head * kv_heads], T.Q6_K)
        tensor(f"blk.{i}.attn_output.weight", [embedding, embedding], T.Q4_K)
        tensor(f"blk.{i}.ffn_gate.weight", [embedding, ff], T.Q4_K)
        tensor(f"blk.{i}.ffn_up.weight", [embedding, ff], T.Q4_K)
        tensor(f"blk.{i}.ffn_down.weight", [ff, embedding], T.Q6_K)
        tensor(f"blk.{i}.ffn_norm.weight", [embedding], T.F32)
    tensor("output_norm.weight", [embedding], T.F32)
    if not tied:
        tensor("output.weight", [embedding, vocab], T.Q6_K)
    return Written(_header_only(writer), tensors)


def _header_only(writer: gguf.GGUFWriter) -> list[Path]:
    """Write what GGUFWriter writes before the tensor data, then extend each file to its full size unwritten."""
    assert writer.path is not None
    names = writer.format_shard_names(Path(writer.path))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    for fout, infos in zip(writer.fout, writer.tensors, strict=True):
        writer.write_padding(fout, fout.tell())
        fout.truncate(fout.tell() + sum(writer.ggml_pad(ti.nbytes, writer.data_alignment) for ti in infos.values()))
    writer.close()
    return [Path(n) for n in names]


def header_end(path: Path) -> int:
    """Where the tensor data of a GGUF starts (the header's end, aligned), by the reference reader's own numbers."""
    reader = gguf.GGUFReader(path)
    return int(reader.data_offset)


# --- safetensors ----------------------------------------------------------------------------------------------

SAFETENSORS_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
                    "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], *, sparse: bool = True) -> int:
    """A .safetensors file of the documented layout with these tensors (name -> (dtype, shape)); returns the sum
    of their bytes. The data region is left unwritten (sparse) unless *sparse* is False (zeros)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        elements = 1
        for dim in shape:
            elements *= dim
        nbytes = elements * SAFETENSORS_BITS[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = json.dumps(header).encode()
    data += b" " * (-len(data) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(data)) + data)
        if sparse:
            fh.truncate(8 + len(data) + offset)
        else:
            fh.write(bytes(offset))
    return offset


def llama_safetensors_tensors(blocks: int, embedding: int, heads: int, kv_heads: int, ff: int, vocab: int,
                              first: int = 0, last: int | None = None) -> dict[str, tuple[str, list[int]]]:
    """A transformers Llama's tensors (bf16, torch order), blocks first..last-1 (all by default)."""
    head = embedding // heads
    found: dict[str, tuple[str, list[int]]] = {}
    if first == 0:
        found["model.embed_tokens.weight"] = ("BF16", [vocab, embedding])
    for i in range(first, blocks if last is None else last):
        prefix = f"model.layers.{i}"
        found[f"{prefix}.input_layernorm.weight"] = ("BF16", [embedding])
        found[f"{prefix}.self_attn.q_proj.weight"] = ("BF16", [embedding, embedding])
        found[f"{prefix}.self_attn.k_proj.weight"] = ("BF16", [head * kv_heads, embedding])
        found[f"{prefix}.self_attn.v_proj.weight"] = ("BF16", [head * kv_heads, embedding])
        found[f"{prefix}.self_attn.o_proj.weight"] = ("BF16", [embedding, embedding])
        found[f"{prefix}.mlp.gate_proj.weight"] = ("BF16", [ff, embedding])
        found[f"{prefix}.mlp.up_proj.weight"] = ("BF16", [ff, embedding])
        found[f"{prefix}.mlp.down_proj.weight"] = ("BF16", [embedding, ff])
        found[f"{prefix}.post_attention_layernorm.weight"] = ("BF16", [embedding])
    if last is None or last == blocks:
        found["model.norm.weight"] = ("BF16", [embedding])
        found["lm_head.weight"] = ("BF16", [vocab, embedding])
    return found


def llama_config(blocks: int, embedding: int, heads: int, kv_heads: int, context: int = 8192) -> dict[str, object]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": blocks,
            "hidden_size": embedding, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": context, "torch_dtype": "bfloat16", "vocab_size": 128256}
