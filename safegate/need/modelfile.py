"""A model file's need: its header read (`read_model`), then RAM and GPU memory predicted from it (`file_need`).

The arithmetic follows llama.cpp (src/llama-model.cpp, llama-context.cpp, llama-kv-cache.cpp, common/common.h):

* -ngl N offloads the last N of the block_count + 1 "layers": the repeating blocks, then the output layer (so -ngl 1
  offloads the output layer alone, and -ngl >= block_count + 1 everything offloadable). The input layer (token
  embeddings) always stays on the CPU. A model without output.weight reuses token_embd as its output, and llama.cpp
  copies it to the output layer's device. (For safetensors, transformers' device_map fills the GPU in the model's
  order: gpu_layers counts the embeddings with the first block, then the blocks, the output layer last.)
* The KV cache of a layer lives where the layer lives (unless --no-kv-offload): per layer and token, K holds
  key_length x head_count_kv elements and V value_length x head_count_kv (key_length defaults to
  embedding_length / head_count), in the cache type (-ctk/-ctv, f16 by default). The context is padded up to a
  multiple of 256.
* Weights on the CPU are memory-mapped from the file and counted in RAM; weights on the GPU in GPU memory.

The overhead is an estimate, documented with each constant below and calibrated by bench/.
"""

from __future__ import annotations

import os

import msgspec

from safegate.errors import BadModelFile
from safegate.need.gguf import TYPE_BY_NAME, read_gguf
from safegate.need.header import ModelFile, open_regular, quoted
from safegate.need.safetensors import read_safetensors
from safegate.units import format_bytes

__all__ = ["FileNeed", "ModelFile", "file_need", "read_model"]

MiB = 1 << 20
# Context: 0 (or None) means the context the model was trained with, as llama.cpp's -c 0.
TRAINED_CONTEXT = 0
LLAMA_CPP_CONTEXT = 0  # common.h: n_ctx = 0 (releases before late 2025: 4096)
LLAMA_CPP_GPU_LAYERS = -1  # common.h: -1 is "auto", as many as fit; here negative is all of them, the bound
LLAMA_CPP_PYTHON_CONTEXT = 512  # llama_cpp.Llama(n_ctx=512, n_gpu_layers=0, flash_attn=False)
LLAMA_CPP_PYTHON_GPU_LAYERS = 0
DEFAULT_CONTEXT = TRAINED_CONTEXT
DEFAULT_GPU_LAYERS = 0  # nothing offloaded: llama-cpp-python's default, and what any CPU-only build does
FALLBACK_CONTEXT = 4096  # the trained context unknown: llama.cpp's smallest context when fitting to free memory
CONTEXT_PAD = 256  # llama-context.cpp: n_ctx = GGML_PAD(n_ctx, 256)
DEFAULT_UBATCH = 512  # llama.cpp's -ub: the compute graph is reserved for a batch of this many tokens
# The compute buffer: ggml's allocator reuses memory along the graph, so it is the larger of two moments. At the
# end, the logits (vocab x batch, f32) and two embedding-wide tensors; without flash attention, in each layer, the
# attention scores (heads x context x batch, f32), six embedding-wide tensors and K and V cast for the product
# (context x KV width x 2 x 2 bytes). Fitted to llama.cpp's own figures for the bench's model (vocab 32000,
# embedding 2048, 16 heads, 4 KV heads): 70.5 MiB with flash attention at any context; without, 90.0, 158.0 and
# 294.0 MiB at 2048, 4096 and 8192 tokens; this gives 70.5, and 92, 160 and 296. Beside that buffer, the product
# of the scores with V converts them to f16 (SCORE_COPY bytes each: the CPU backend's work buffer, ggml-cuda's
# pool): measured in the peaks, not in llama.cpp's figure.
LOGITS_ACTIVATIONS = 2
ATTENTION_ACTIVATIONS = 6
SCORE_COPY = 2
# GPU memory a llama.cpp process takes beyond its buffers: the CUDA context, cuBLAS's workspace, and ggml-cuda's
# pool (weights dequantised for large batches). 150-500 MiB by card and driver: the upper end, to be safe.
GPU_RUNTIME = 512 * MiB
# RAM of the process itself: program or interpreter, libraries, vocabulary, graphs. Measured with
# bench/bench_model_need.py (llama-cpp-python 0.3.36 on the CPU, a 1 GB F16 model, its context filled): peaks
# 20-40 MiB above weights + KV cache + compute buffer (Python with llama_cpp imported: 41 MiB before loading);
# with this constant the predictions were 2-3% above the peaks at 1024-4096 tokens, flash attention on and off ...
PROCESS_RAM = 64 * MiB
# ... and with a GPU, the CUDA runtime's host side (driver state, pinned staging buffers).
GPU_HOST_RAM = 256 * MiB
# A PyTorch process (safetensors read by transformers): torch and its CUDA libraries resident, and its CUDA context.
TORCH_RAM = 1024 * MiB
TORCH_GPU_RUNTIME = 512 * MiB


class FileNeed(msgspec.Struct, frozen=True):
    """Bytes predicted in RAM and in GPU memory, the parts they are made of, and what was assumed."""

    ram: int
    gpu: int
    weights: int
    kv_cache: int
    overhead: int
    context: int  # the context assumed (0: none, for a safetensors model without one given)
    gpu_layers: int  # of the block_count + 1 offloadable layers, how many were put on the GPU
    notes: tuple[str, ...] = ()  # how each figure was made, one line each
    gpu_weights: int = 0  # the parts of `gpu` (the rest of each part is in RAM)
    gpu_kv_cache: int = 0
    gpu_overhead: int = 0


def read_model(path: str) -> ModelFile | str:
    """The header of a .gguf (the first part of a split model: all parts found and summed), a .safetensors file, a
    *.safetensors.index.json with its shards, or a folder holding them; or the ONE-line note why there is no
    prediction (missing, truncated, hostile, not a model). Never raises; reads headers only, bounded."""
    try:
        return _read_any(path)
    except BadModelFile as exc:
        return str(exc)
    except OSError as exc:
        return f"{quoted(path)}: unreadable ({exc.strerror or exc})"


def _read_any(path: str) -> ModelFile:
    lower = path.lower()
    if lower.endswith(".gguf"):
        return read_gguf(path)
    if lower.endswith((".safetensors", ".index.json")) or os.path.isdir(path):
        return read_safetensors(path)
    with open_regular(path) as fh:
        start = fh.read(9)
    if start[:4] == b"GGUF":
        return read_gguf(path)
    if len(start) == 9 and start[8:9] == b"{":
        return read_safetensors(path)
    raise BadModelFile(f"{quoted(path)}: not a model file (neither GGUF nor safetensors)")


def _row_bytes(elements: int, cache_type: str) -> int | None:
    """Bytes of *elements* of a cache type ("f16", "q8_0", ...), as ggml_row_size; None if the type is unknown."""
    found = TYPE_BY_NAME.get(cache_type.lower())
    if found is None:
        return None
    block, size = found
    return -(-elements // block) * size


def file_need(model: ModelFile, *, context: int | None = None, gpu_layers: int | None = None,
              cache_type: str = "f16", cache_type_v: str | None = None, flash_attention: bool = True,
              kv_offload: bool = True, ubatch: int = DEFAULT_UBATCH) -> FileNeed:
    """The need of running *model* at *context* tokens (None or 0: the trained context; for safetensors, where
    transformers grows its cache with the text, None means no KV cache) with *gpu_layers* offloaded (None:
    DEFAULT_GPU_LAYERS; negative: all). Never raises: what cannot be predicted is left at 0 with a note."""
    notes: list[str] = []
    gguf = model.format == "gguf"
    layers = model.layer_weights
    blocks = len(layers) or model.block_count or 0
    slots = blocks + 1  # the blocks, then the output layer
    offloaded = DEFAULT_GPU_LAYERS if gpu_layers is None else gpu_layers
    offloaded = slots if offloaded < 0 else min(offloaded, slots)
    # llama.cpp offloads the output layer first, then blocks from the last; transformers' device_map fills the GPU
    # in the model's order: embeddings, blocks from the first, the output layer last.
    output_on_gpu = offloaded >= 1 if gguf else offloaded == slots
    on_gpu_blocks = min(blocks, max(0, offloaded - 1)) if gguf else min(blocks, offloaded)
    gpu_blocks = range(blocks - on_gpu_blocks, blocks) if gguf else range(on_gpu_blocks)
    if layers:
        moved = sum(layers[i] for i in gpu_blocks) + (model.output_weights if output_on_gpu else 0)
        if not gguf and offloaded:
            moved += model.input_weights
    else:  # no block structure known: all or nothing
        on_gpu_blocks = blocks if offloaded else 0
        gpu_blocks = range(on_gpu_blocks)
        moved = model.weights if offloaded else 0
    # A GGUF without output.weight: token_embd stays in RAM as the input and is copied to the GPU as the output.
    copied = model.input_weights if gguf and model.tied_output and output_on_gpu else 0
    gpu_weights = moved + copied
    ram_weights = max(0, model.weights - moved)  # never below 0, even for a record not made by the readers
    notes.append(f"weights {format_bytes(model.weights)}: every tensor's type and shape in {len(model.paths)} "
                 f"file(s); {format_bytes(gpu_weights)} on the GPU ({offloaded} of {slots} layers offloaded: "
                 f"{on_gpu_blocks} of {blocks} blocks{', and the output' if output_on_gpu else ''}), "
                 f"{format_bytes(ram_weights)} in RAM{' (mapped from the file)' if gguf else ''}")

    # Context and KV cache.
    if context is not None and context > 0:
        ctx = context
        notes.append(f"context {ctx} tokens, as asked" + (f" (llama.cpp pads it to {CONTEXT_PAD})"
                                                         if gguf and ctx % CONTEXT_PAD else ""))
    elif not gguf and context is None:
        ctx = 0
        notes.append("KV cache not predicted: transformers grows it with the text; give a context to size it")
    elif model.context_length:
        ctx = model.context_length
        notes.append(f"context {ctx}: the model's trained context (llama.cpp's -c 0, its default; its --fit may "
                     "lower it to fit free memory)")
    else:
        ctx = FALLBACK_CONTEXT
        notes.append(f"context {ctx}: the file does not say its trained context")
    if gguf and ctx:
        ctx = -(-ctx // CONTEXT_PAD) * CONTEXT_PAD
    kv_layers = _kv(model, ctx, cache_type, cache_type_v or cache_type, notes)
    kv_cache = sum(kv_layers)
    gpu_kv = sum(kv_layers[i] for i in gpu_blocks if i < len(kv_layers)) if kv_offload else 0

    # Overhead.
    vocab = model.vocab_size or 0
    embedding = model.embedding_length or 0
    batch = max(1, min(ubatch, ctx) if ctx else ubatch)
    compute = 4 * batch * (vocab + LOGITS_ACTIVATIONS * embedding)
    if not flash_attention:
        kv_width = (model.head_count_kv or model.head_count or 0) * (model.key_length or (
            embedding // model.head_count if model.head_count else 0))
        attention = (4 + SCORE_COPY) * batch * (model.head_count or 0) * ctx
        attention += 4 * batch * ATTENTION_ACTIVATIONS * embedding
        compute = max(compute, attention + 4 * ctx * kv_width)
    if gguf:
        gpu_runtime, process = (GPU_RUNTIME, PROCESS_RAM + GPU_HOST_RAM) if offloaded else (0, PROCESS_RAM)
    else:
        gpu_runtime, process = (TORCH_GPU_RUNTIME, TORCH_RAM) if offloaded else (0, TORCH_RAM)
    gpu_overhead = gpu_runtime + compute if offloaded else 0
    ram_overhead = process + (0 if offloaded else compute)
    notes.append(f"overhead {format_bytes(gpu_overhead + ram_overhead)} (an estimate): compute buffer "
                 f"{format_bytes(compute)} for a {batch}-token batch "
                 f"({'in GPU memory' if offloaded else 'in RAM'}), process {format_bytes(process)} in RAM"
                 + (f", GPU runtime {format_bytes(gpu_runtime)}" if offloaded else ""))
    notes.extend(model.notes)
    return FileNeed(
        ram=ram_weights + (kv_cache - gpu_kv) + ram_overhead, gpu=gpu_weights + gpu_kv + gpu_overhead,
        weights=model.weights, kv_cache=kv_cache, overhead=gpu_overhead + ram_overhead, context=ctx,
        gpu_layers=offloaded, notes=tuple(notes), gpu_weights=gpu_weights, gpu_kv_cache=gpu_kv,
        gpu_overhead=gpu_overhead)


def _kv(model: ModelFile, ctx: int, type_k: str, type_v: str, notes: list[str]) -> list[int]:
    """Each block's KV cache in bytes at *ctx* tokens; none, with a note, where the file cannot size it."""
    blocks = model.block_count
    heads = model.head_count
    kv_heads = model.head_count_kv or heads
    key = model.key_length or (model.embedding_length // heads if model.embedding_length and heads else None)
    value = model.value_length or key
    if not ctx:
        return []
    if not (blocks and kv_heads and key and value):
        notes.append("KV cache not predicted: the file does not say its layers, heads and head size")
        return []
    per_layer = model.head_count_kv_per_layer or (kv_heads,) * blocks
    layers = [_layer_kv(n, key, value, ctx, model.cache_element_bytes, type_k, type_v) for n in per_layer]
    if None in layers:
        unknown = type_k if _row_bytes(1, type_k) is None else type_v
        notes.append(f"KV cache type {quoted(unknown)} is unknown here: f16 assumed")
        type_k = type_v = "f16"
        layers = [_layer_kv(n, key, value, ctx, model.cache_element_bytes, "f16", "f16") for n in per_layer]
    if model.cache_element_bytes is not None:
        described = f"{model.cache_element_bytes:g} bytes each (the model's dtype)"
    else:
        described = f"cache type {type_k}" + ("" if type_v == type_k else f"/{type_v}")
    heads_said = f"{kv_heads} KV heads" if not model.head_count_kv_per_layer else \
        f"{min(per_layer)}-{max(per_layer)} KV heads (per layer, {sum(per_layer)} in all)"
    found = [n or 0 for n in layers]
    notes.append(f"KV cache {format_bytes(sum(found))}: {blocks} layers x {ctx} tokens x {heads_said} x "
                 f"({key} + {value}) for K and V, {described}")
    if model.sliding_window and model.sliding_window < ctx:
        notes.append(f"some layers attend to {model.sliding_window} tokens only and keep a smaller cache: the KV "
                     "figure, for the whole context in every layer, is a bound")
    return found


def _layer_kv(kv_heads: int, key: int, value: int, ctx: int, element: float | None, type_k: str,
              type_v: str) -> int | None:
    """One layer's K and V bytes; None where a cache type is unknown."""
    if element is not None:  # safetensors: the model's own dtype
        return int((key + value) * kv_heads * ctx * element)
    k_bytes = _row_bytes(key * kv_heads * ctx, type_k)
    v_bytes = _row_bytes(value * kv_heads * ctx, type_v)
    return None if k_bytes is None or v_bytes is None else k_bytes + v_bytes
