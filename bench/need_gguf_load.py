"""The job bench_need_gguf.py runs under `safegate exec`: a Python program that loads a GGUF through
llama-cpp-python, as a chat program does, and evaluates one prompt, so that the KV cache and the compute buffers
are allocated and used.

usage: python bench/need_gguf_load.py MODEL.gguf [-c N_CTX] [-ngl N_GPU_LAYERS] [--prompt-tokens N] [--no-mmap] [-fa]

Its options are spelled as llama.cpp's (-c, -ngl), so that `safegate need -- python bench/need_gguf_load.py
MODEL.gguf -c 8192 -ngl 0` reads the same context and offload as the job uses. The prompt is N random token ids
(default 512: one full micro-batch, the largest graph llama.cpp computes at once; 0: fill the context, so that the
attention's buffers are used at the full context's size). At the end it prints one JSON
line starting with `need_gguf_load ` on stdout: the process's own memory (/proc/self/status VmHWM, VmRSS, RssAnon,
RssFile, in bytes) after the load and after the prompt. llama.cpp's own log (the buffer sizes it allocated) goes
to stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from llama_cpp import Llama

FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def status() -> dict[str, int]:
    """The fields of /proc/self/status in FIELDS, in bytes."""
    found: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                found[name] = int(rest.split()[0]) * 1024
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("-c", "--ctx-size", dest="n_ctx", type=int, default=512)
    parser.add_argument("-ngl", "--n-gpu-layers", dest="n_gpu_layers", type=int, default=0)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--no-mmap", action="store_true", help="read the weights into memory (use_mmap=False)")
    parser.add_argument("-fa", "--flash-attn", action="store_true",
                        help="flash attention (llama-cpp-python's default is off; llama.cpp's programs' is auto)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    start = time.monotonic()
    llm = Llama(model_path=args.model, n_ctx=args.n_ctx, n_gpu_layers=args.n_gpu_layers,
                use_mmap=not args.no_mmap, n_threads=args.threads, flash_attn=args.flash_attn, verbose=True)
    loaded = status()
    load_s = time.monotonic() - start
    rng = random.Random(1)
    # Ids past the control and byte tokens: plain pieces, whatever the vocabulary holds.
    size = args.prompt_tokens if args.prompt_tokens > 0 else llm.n_ctx() - 1
    prompt = [llm.token_bos()] + [rng.randrange(259, llm.n_vocab()) for _ in range(size - 1)]
    llm.eval(prompt)
    evaluated = status()
    print("need_gguf_load " + json.dumps({
        "n_ctx": llm.n_ctx(), "n_batch": llm.n_batch, "prompt_tokens": len(prompt), "use_mmap": not args.no_mmap,
        "flash_attn": args.flash_attn,
        "load_s": round(load_s, 2), "eval_s": round(time.monotonic() - start - load_s, 2),
        "after_load": loaded, "after_eval": evaluated,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
