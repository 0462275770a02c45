#!/usr/bin/env python3
"""Benchmark reading a model file's header (safegate.need.modelfile.read_model) on a file of a real model's size.

Run it with the Python that has safegate and its test extras installed (the file is written by the gguf package's
GGUFWriter, through tests/modelfiles.py):

    python bench/bench_model_header.py [--runs N] [--dir DIR]

It writes a Llama 3 70B-shaped GGUF (80 blocks, embedding 8192, Q4_K/Q6_K tensors: ~40 GB) whose tokenizer has
Llama 3's sizes (128,256 tokens, 280,147 merges), as a sparse file (the data is never written), then measures:
wall time of read_model warm (the header in the page cache) and cold (its pages dropped with
POSIX_FADV_DONTNEED first), the bytes the process read (/proc/self/io rchar), Python's peak allocation
(tracemalloc), and, for the same file, the gguf package's GGUFReader (time, and peak RSS of a fresh process).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from modelfiles import write_llama_gguf  # noqa: E402

from safegate.need.modelfile import ModelFile, read_model  # noqa: E402


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--dir", default=None, help="where to write the sparse file (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        started = time.perf_counter()
        written = write_llama_gguf(Path(tmp) / "llama-70b.gguf", blocks=80, embedding=8192, heads=64, kv_heads=8,
                                   ff=28672, vocab=128256, tokens=128256, merges=280147, context=131072)
        path = written.paths[0]
        print(f"file: {path.stat().st_size / 1e9:.1f} GB ({path.stat().st_blocks * 512 / 2**20:.1f} MiB on disk), "
              f"{len(written.tensors)} tensors; written in {time.perf_counter() - started:.1f} s")
        model = read_model(str(path))
        assert isinstance(model, ModelFile) and model.weights == written.total, model
        for label, cold in (("warm", False), ("cold", True)):
            times = []
            for _ in range(args.runs):
                if cold:
                    _drop(path)
                before = time.perf_counter()
                read_model(str(path))
                times.append(time.perf_counter() - before)
            print(f"read_model {label}: median {statistics.median(times) * 1000:.1f} ms, "
                  f"min {min(times) * 1000:.1f} ms, max {max(times) * 1000:.1f} ms over {args.runs} runs")
        before = _rchar()
        read_model(str(path))
        print(f"bytes read: {(_rchar() - before) / 2**20:.1f} MiB")
        tracemalloc.start()
        read_model(str(path))
        print(f"peak Python allocation: {tracemalloc.get_traced_memory()[1] / 2**20:.1f} MiB")
        tracemalloc.stop()
        code = ("import resource, time, gguf, sys; t = time.perf_counter(); r = gguf.GGUFReader(sys.argv[1]); "
                "print(f'{time.perf_counter() - t:.3f} {len(r.tensors)} "
                "{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}')")
        base = subprocess.run([sys.executable, "-c", "import resource, gguf; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, check=True).stdout.split()
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                             check=True).stdout.split()
        print(f"gguf.GGUFReader: {float(out[0]) * 1000:.0f} ms, {out[1]} tensors, peak RSS "
              f"{int(out[2]) / 1024:.0f} MiB ({(int(out[2]) - int(base[0])) / 1024:.0f} MiB above `import gguf`)")


if __name__ == "__main__":
    main()
