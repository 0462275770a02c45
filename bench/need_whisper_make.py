"""Write a random-weight checkpoint of Whisper large-v3's real architecture, built with the openai-whisper package's
own model classes, in the form `whisper --model PATH` loads: {"dims": ..., "model_state_dict": ...}.

usage: python bench/need_whisper_make.py OUT.pt [--seed 1]

Run it with a Python that has openai-whisper and torch (bench_need_whisper.py runs it with --bench-python). The
state dict is stored in float16, as OpenAI's published checkpoints are (large-v3.pt is 2.9 GB): whisper.load_model
then holds the fp16 checkpoint and the fp32 model at once, as with the real file. Prints one JSON line: the file,
its size and the parameter count. Building it holds the fp32 model (about 6.2 GB) for a while.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from whisper.model import ModelDimensions, Whisper

# large-v3: whisper/__init__.py's checkpoint dims (128 mel bins and a 51866-token vocabulary are what set it apart
# from large-v2).
LARGE_V3 = ModelDimensions(n_mels=128, n_audio_ctx=1500, n_audio_state=1280, n_audio_head=20, n_audio_layer=32,
                           n_vocab=51866, n_text_ctx=448, n_text_state=1280, n_text_head=20, n_text_layer=32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = Whisper(LARGE_V3)  # PyTorch's default initialisation: random, finite
    model.half()  # in place, module by module: never two full copies
    params = sum(p.numel() for p in model.parameters())
    out = Path(args.out)
    torch.save({"dims": dataclasses.asdict(LARGE_V3), "model_state_dict": model.state_dict()}, out)
    print(json.dumps({"file": str(out), "file_bytes": out.stat().st_size, "params": params,
                      "dims": dataclasses.asdict(LARGE_V3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
