"""Write a llama-architecture GGUF with random weights, as llama.cpp loads it: real tensor headers and shapes, the
hyper-parameters that size the KV cache, and a minimal SentencePiece ("llama") vocabulary.

usage: python bench/need_gguf_make.py OUT.gguf [--type f16|q8_0|q4_0] [--layers 16] [--embd 2048] [--heads 32]
                                      [--kv-heads 8] [--ff 8192] [--vocab 32000] [--trained-context 32768] [--seed 1]

Run it with a Python that has `gguf` and `numpy` (bench_need_gguf.py runs it with --bench-python). The defaults are
Llama-3.2-1B's shape with a 32000-token vocabulary: about 1.1 G parameters, 2.2 GB in f16. Prints one JSON line:
the file, its size and its tensor data's bytes (the weights).

The vocabulary is what llama.cpp's SPM tokenizer requires and no more: <unk>, <s>, </s>, the 256 byte tokens
<0x00>..<0xFF> (it looks up <0x0A> for the newline) and placeholder pieces up to --vocab. Quantized tensors are
random blocks written directly (a finite f16 scale and random quants), not quantized from floats: what matters here
is each tensor's type and size, and that every value is finite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType
from gguf.quants import quant_shape_to_byte_shape

TYPES = {
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}


def vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, *([TokenType.BYTE] * 256)]
    if n_vocab < len(tokens) + 1:
        raise SystemExit(f"--vocab {n_vocab}: at least {len(tokens) + 1} tokens are needed")
    pieces = [f"\u2581w{i}" for i in range(n_vocab - len(tokens))]
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def random_tensor(rng: np.random.Generator, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> np.ndarray:
    """Random data of *shape* (numpy order: rows last) in *qtype*'s bytes: f32/f16 values ~ N(0, 0.02); a quantized
    type's blocks are an f16 scale of ~0.002 followed by random quants (Q8_0: 32 int8; Q4_0: 16 bytes of nibbles)."""
    if qtype == GGMLQuantizationType.F32:
        return np.ones(shape, dtype=np.float32)  # the norms: 1, as a trained model's are near
    if qtype == GGMLQuantizationType.F16:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    byte_shape = quant_shape_to_byte_shape(shape, qtype)
    n_blocks = int(np.prod(shape)) // block_size
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scales = np.full(n_blocks, 0.002, dtype=np.float16)
    blocks[:, :2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(byte_shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--type", choices=sorted(TYPES), default="f16")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--embd", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--ff", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--trained-context", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    qtype, ftype = TYPES[args.type]
    head_dim = args.embd // args.heads
    kv_dim = head_dim * args.kv_heads
    rng = np.random.default_rng(args.seed)

    # numpy order (rows, columns): gguf writes the dimensions reversed, as ggml's ne (ne0 = columns).
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]] = [
        ("token_embd.weight", (args.vocab, args.embd), qtype),
        ("output_norm.weight", (args.embd,), GGMLQuantizationType.F32),
        ("output.weight", (args.vocab, args.embd), qtype),
    ]
    for i in range(args.layers):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (args.embd,), GGMLQuantizationType.F32),
            (f"blk.{i}.attn_q.weight", (args.embd, args.embd), qtype),
            (f"blk.{i}.attn_k.weight", (kv_dim, args.embd), qtype),
            (f"blk.{i}.attn_v.weight", (kv_dim, args.embd), qtype),
            (f"blk.{i}.attn_output.weight", (args.embd, args.embd), qtype),
            (f"blk.{i}.ffn_norm.weight", (args.embd,), GGMLQuantizationType.F32),
            (f"blk.{i}.ffn_gate.weight", (args.ff, args.embd), qtype),
            (f"blk.{i}.ffn_up.weight", (args.ff, args.embd), qtype),
            (f"blk.{i}.ffn_down.weight", (args.embd, args.ff), qtype),
        ]

    out = Path(args.out)
    writer = GGUFWriter(out, "llama")
    writer.add_name(f"safegate bench random llama {args.type}")
    writer.add_context_length(args.trained_context)
    writer.add_embedding_length(args.embd)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.ff)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(args.vocab)
    writer.add_file_type(int(ftype))
    tokens, scores, types = vocabulary(args.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)

    weights = 0
    for name, shape, tt in tensors:
        if tt in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            nbytes = int(np.prod(shape)) * (4 if tt == GGMLQuantizationType.F32 else 2)
            writer.add_tensor_info(name, shape, np.dtype(np.float32 if tt == GGMLQuantizationType.F32 else np.float16),
                                   nbytes)
        else:
            byte_shape = quant_shape_to_byte_shape(shape, tt)
            nbytes = int(np.prod(byte_shape))
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=tt)
        weights += nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, shape, tt in tensors:  # one tensor in memory at a time
        writer.write_tensor_data(random_tensor(rng, shape, tt))
    writer.close()
    params = sum(int(np.prod(shape)) for _n, shape, _t in tensors)
    print(json.dumps({"file": str(out), "file_bytes": out.stat().st_size, "tensor_bytes": weights,
                      "params": params, "type": args.type, "layers": args.layers, "embd": args.embd,
                      "heads": args.heads, "kv_heads": args.kv_heads, "ff": args.ff, "vocab": args.vocab,
                      "trained_context": args.trained_context}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
