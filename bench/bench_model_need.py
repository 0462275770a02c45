#!/usr/bin/env python3
"""Benchmark the prediction of a GGUF model's RAM (safegate.need.modelfile.file_need) against a real load.

Run it with the Python that has safegate and its test extras (gguf, numpy) installed; the model is loaded by
llama-cpp-python in a child process, by the Python named with --python (default: this one):

    pip install llama-cpp-python          # builds llama.cpp from source: ~20 minutes on one core
    python bench/bench_model_need.py [--python PY] [--contexts 1024,2048] [--dir DIR]

It writes a llama-architecture GGUF with random F16 weights (8 blocks, embedding 2048, 16 heads, 4 KV heads,
feed-forward 5632, a 32,000-token SentencePiece vocabulary: ~1 GB) with the gguf package's GGUFWriter, then for
each context and with flash attention on and off loads it on the CPU (n_gpu_layers=0), evaluates a prompt that
fills the context, and compares the child's peak RSS (VmHWM: the weights are memory-mapped and all touched) with
the prediction. CPU only: the GPU figures need a CUDA build and a GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from safegate.need.modelfile import ModelFile, file_need, read_model  # noqa: E402

CHILD = r"""
import json, sys
import llama_cpp
path, n_ctx, flash = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
before = hwm()
llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_gpu_layers=0, flash_attn=flash, verbose=False)
llm.eval(llm.tokenize(b"t1 t2 t3 " * n_ctx)[: n_ctx - 48])
print(json.dumps({"before": before, "peak": hwm()}))
"""


def write_model(path: Path, blocks: int = 8, embedding: int = 2048, heads: int = 16, kv_heads: int = 4,
                ff: int = 5632, vocab: int = 32000) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(blocks)
    writer.add_embedding_length(embedding)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_context_length(8192)
    writer.add_feed_forward_length(ff)
    writer.add_rope_dimension_count(embedding // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(1)
    # SentencePiece needs its 256 byte tokens (llama.cpp looks up <0x0A> for the newline).
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"t{i}" for i in range(vocab - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int) -> None:  # numpy order: rows, then a row
        data = rng.standard_normal(shape, dtype=np.float32) * 0.02
        writer.add_tensor(name, data.astype(np.float16) if len(shape) > 1 else data)

    head = embedding // heads
    tensor("token_embd.weight", vocab, embedding)
    for i in range(blocks):
        tensor(f"blk.{i}.attn_norm.weight", embedding)
        tensor(f"blk.{i}.attn_q.weight", embedding, embedding)
        tensor(f"blk.{i}.attn_k.weight", head * kv_heads, embedding)
        tensor(f"blk.{i}.attn_v.weight", head * kv_heads, embedding)
        tensor(f"blk.{i}.attn_output.weight", embedding, embedding)
        tensor(f"blk.{i}.ffn_norm.weight", embedding)
        tensor(f"blk.{i}.ffn_gate.weight", ff, embedding)
        tensor(f"blk.{i}.ffn_up.weight", ff, embedding)
        tensor(f"blk.{i}.ffn_down.weight", embedding, ff)
    tensor("output_norm.weight", embedding)
    tensor("output.weight", vocab, embedding)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="a Python with llama_cpp installed")
    parser.add_argument("--contexts", default="1024,2048")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    MB = 1e6
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "random-llama.gguf"
        write_model(path)
        model = read_model(str(path))
        assert isinstance(model, ModelFile), model
        print(f"model: {path.stat().st_size / MB:.0f} MB, weights {model.weights / MB:.0f} MB")
        print("| context | flash attention | predicted RAM (MB) | peak RSS (MB) | prediction - peak |")
        print("|---|---|---|---|---|")
        for context in (int(c) for c in args.contexts.split(",")):
            for flash in (True, False):
                need = file_need(model, context=context, gpu_layers=0, flash_attention=flash)
                out = subprocess.run([args.python, "-c", CHILD, str(path), str(context), "1" if flash else "0"],
                                     capture_output=True, text=True, check=True).stdout
                peak = json.loads(out.strip().splitlines()[-1])["peak"]
                print(f"| {context} | {'on' if flash else 'off'} | {need.ram / MB:.0f} | {peak / MB:.0f} | "
                      f"{(need.ram - peak) / peak * 100:+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
