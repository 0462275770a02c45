"""Issue 27: the openai-whisper CLI on CPU, large-v3, under `safegate exec`: its measured peak memory against the
RAM `safegate need` predicts from the built-in table.

usage: python bench/bench_need_whisper.py --bench-python /work/benchenv/bin/python [--runs 3] [--cache cold,warm]
                                          [--audio-seconds 5] [--work DIR] [--keep] [--out FILE] [--raw FILE]

Run it with the Python that has safegate installed (the project's venv). --bench-python is a Python with
openai-whisper and torch (CPU) installed, and ffmpeg must be on PATH (the whisper CLI decodes audio with it):
    python3 -m venv /work/benchenv && /work/benchenv/bin/pip install torch openai-whisper   # + apt-get install ffmpeg
No weights are downloaded: need_whisper_make.py builds a random-weight checkpoint of large-v3's real architecture
with openai-whisper's own classes (fp16, 2.9 GB, as OpenAI's large-v3.pt), kept in --work for the next run.

Each run: `safegate exec --log LOG -- whisper AUDIO --model CHECKPOINT --device cpu --language en --fp16 False
--temperature_increment_on_fallback None --no_speech_threshold 0 --logprob_threshold 0 --verbose False` on a few
seconds of generated audio (a tone and noise): the real CLI, load_model() and transcribe(), beam search 5 as by
default, one 30-second window decoded in full (up to 224 tokens). The other options only bound the work a random
model makes: no fallback to higher temperatures (a random model's garbage would decode six times), and the window
is then skipped as silence (a random model's timestamp tokens would otherwise move the window a few frames at a
time, decoding the same seconds over and over: a first try ran 10 minutes on 2 busy cores). The checkpoint is either
evicted from the page cache first (cold: the job's reads fill the page cache, charged to the job's cgroup, as at a
first run after a reboot) or read by the bench first (warm: its pages are cached and charged elsewhere).

Measured: the `summary` event's peak_job_memory (what safegate records and learns from: the highest of its samples
and of the kernel's own peak of the job's cgroup, page cache included) and, polled by the bench, the whisper
process's VmHWM (its peak resident set: anonymous memory plus mapped file pages, page cache it only read not
included). Predicted: `safegate need --json -- whisper --model large-v3 --device cpu AUDIO`'s predicted RAM. The
target (issue 27): the median peak within 25% of the prediction.
"""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

from common import (
    REPO,
    BenchError,
    bench_env,
    bench_parser,
    evict,
    exec_with_peak,
    file_cached,
    find_safegate,
    interrupt_on_signals,
    loadavg,
    log,
    machine_facts,
    machine_section,
    md_table,
    median,
    need_json,
    predicted_ram,
    publish,
    stamp,
    warm,
    workdir,
)

GiB = 1024**3
TARGET = 0.25
CHECKPOINT = "large-v3-random.pt"


def write_audio(path: Path, seconds: float, rate: int = 16000) -> None:
    """*seconds* of 16 kHz mono 16-bit PCM: a warbling tone and a little noise, something for ffmpeg to decode."""
    rng = random.Random(1)
    frames = bytearray()
    for i in range(int(seconds * rate)):
        t = i / rate
        value = 0.3 * math.sin(2 * math.pi * (200 + 80 * math.sin(2 * math.pi * 3 * t)) * t) + 0.05 * rng.uniform(-1, 1)
        frames += struct.pack("<h", int(value * 32767))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(bytes(frames))


def checkpoint(bench_python: str, work: Path) -> Path:
    path = work / CHECKPOINT
    if path.is_file() and path.stat().st_size > 2 * GiB:
        log(f"reusing {path} ({path.stat().st_size / GiB:.2f} GiB)")
        return path
    log(f"building {path} with {bench_python} (random weights, about a minute and 6 GB of RAM)")
    done = subprocess.run([bench_python, str(REPO / "bench" / "need_whisper_make.py"), str(path)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"need_whisper_make.py exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return path


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def main() -> int:
    parser = bench_parser(__doc__, runs=3, raw=True)
    parser.add_argument("--bench-python", required=True, help="a Python with openai-whisper and torch installed")
    parser.add_argument("--cache", default="cold,warm", help="cold, warm or both (default cold,warm)")
    parser.add_argument("--audio-seconds", type=float, default=5.0)
    parser.add_argument("--work", default="/var/tmp/safegate-bench-need",
                        help="where the checkpoint is built and kept (3 GB; default /var/tmp/safegate-bench-need)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    parser.add_argument("--beam-size", type=int, default=5,
                        help="the CLI's --beam_size (default 5, the CLI's own; the peak is at load_model(), and a "
                             "smaller beam only shortens the random model's decode)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take (default 1800)")
    parser.add_argument("--safegate", help="the safegate executable (default: beside this Python)")
    args = parser.parse_args()
    modes = [m for m in args.cache.split(",") if m]
    if not modes or any(m not in ("cold", "warm") for m in modes):
        raise BenchError(f"--cache {args.cache!r}: expected cold, warm or cold,warm")
    interrupt_on_signals()
    safegate = find_safegate(args.safegate)
    whisper = Path(args.bench_python).parent / "whisper"
    if not whisper.is_file():
        raise BenchError(f"no whisper CLI beside {args.bench_python} (pip install openai-whisper there)")
    load_start = loadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(args.bench_python, work)
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    try:
        with workdir("safegate-bench-need-whisper-") as tmp:
            audio = tmp / "talk.wav"
            write_audio(audio, args.audio_seconds)
            env = bench_env(pycache=tmp / "pycache", SAFEGATE_LOCK_DIR=str(tmp / "locks"),
                            XDG_STATE_HOME=str(tmp / "state"), PATH=f"{whisper.parent}{os.pathsep}{os.environ['PATH']}")
            named = ["whisper", "--model", "large-v3", "--device", "cpu", str(audio)]
            ram, how = predicted_ram(need_json(safegate, named, env), detail=True)
            job = [str(whisper), str(audio), "--model", str(ckpt), "--device", "cpu", "--language", "en",
                   "--fp16", "False", "--temperature_increment_on_fallback", "None", "--no_speech_threshold", "0",
                   "--logprob_threshold", "0", "--beam_size", str(args.beam_size), "--verbose", "False",
                   "--output_dir", str(tmp / "out"), "--output_format", "txt"]
            ram_path, how_path = predicted_ram(need_json(safegate, job, env), detail=True)
            log(f"predicted: {gib(ram)} GiB ({how}); for the command as run: {gib(ram_path)} GiB ({how_path})")
            for i in range(args.runs):
                for mode in modes if i % 2 == 0 else modes[::-1]:  # alternate, so drift hits both alike
                    cache = mode
                    if mode == "cold":
                        evict(ckpt)
                    else:
                        warm(ckpt)
                    cached = file_cached(ckpt)
                    if cache == "cold" and cached > ckpt.stat().st_size // 100:
                        raise BenchError(f"{ckpt}: {cached >> 20} MiB stayed in the page cache after "
                                         "eviction (another process maps it?): a cold run would not be cold")
                    time.sleep(1)
                    r = exec_with_peak(safegate, job, env, tmp, f"run{i}-{mode}", timeout=args.timeout)
                    r["cached_before"] = cached
                    if r["status"] != 0:
                        raise BenchError(f"run {i} ({mode}): safegate exec exited {r['status']}: "
                                         f"{Path(r['stderr']).read_text(errors='replace')[-800:]}")
                    results[mode].append(r)
                    if args.raw:  # each run as it ends: a bench stopped halfway keeps what it measured
                        with open(f"{args.raw}.runs.jsonl", "a", encoding="utf-8") as fh:
                            fh.write(json.dumps({"run": i, "mode": mode, **r}) + "\n")
                    log(f"run {i} {mode}: safegate peak {gib(r['peak_job_memory'])} GiB, VmHWM "
                        f"{gib(r['polled'].get('VmHWM'))} GiB, {r['wall_s']:.0f} s")
    finally:
        if not args.keep:
            ckpt.unlink(missing_ok=True)

    head = ["page cache", "runs", "safegate peak, median GiB (min-max)", "ratio to prediction",
            "VmHWM, median GiB", "ratio", "wall s, median"]
    rows = []
    verdicts = []
    for mode, runs in results.items():
        peaks = [float(r["peak_job_memory"]) for r in runs]
        hwms = [float(r["polled"].get("VmHWM", 0)) for r in runs]
        ratio = median(peaks) / ram if ram else None
        ratio_hwm = median(hwms) / ram if ram else None
        rows.append([mode, len(runs), f"{gib(median(peaks))} ({gib(min(peaks))}-{gib(max(peaks))})",
                     "-" if ratio is None else f"{ratio:.2f}", gib(median(hwms)),
                     "-" if ratio_hwm is None else f"{ratio_hwm:.2f}", f"{median([r['wall_s'] for r in runs]):.0f}"])
        if ratio is not None:
            verdicts.append(f"{mode} cache: safegate's peak is {ratio - 1:+.0%} of the prediction "
                            f"({'within' if abs(ratio - 1) <= TARGET else 'NOT within'} ±{TARGET:.0%}); "
                            f"the process's own peak (VmHWM) {ratio_hwm - 1:+.0%}.")
    facts = [*machine_facts(), ("RAM", f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.1f} GiB"),
             ("whisper", f"{whisper} (torch from {args.bench_python})"),
             ("checkpoint", f"random weights, large-v3 dims, fp16, {ckpt.name}")]
    lines = [
        stamp(),
        "",
        f"Prediction: `safegate need --json -- {' '.join(named[:-1])} AUDIO`: **{gib(ram)} GiB** of RAM ({how}).",
        f"For the command as run (the checkpoint's path as --model): {gib(ram_path)} GiB ({how_path}).",
        "",
        f"Job: `whisper AUDIO --model {CHECKPOINT} --device cpu --language en --fp16 False "
        f"--beam_size {args.beam_size} "
        "--temperature_increment_on_fallback None --no_speech_threshold 0 --logprob_threshold 0` on "
        f"{args.audio_seconds:g} s of generated audio.",
        "",
        *md_table(head, rows),
        "",
        *verdicts,
        *machine_section(facts, (load_start, loadavg())),
    ]
    raw = {"predicted": ram, "predicted_how": how, "predicted_as_run": ram_path, "runs": results}
    publish("\n".join(lines), args.out, args.raw, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
