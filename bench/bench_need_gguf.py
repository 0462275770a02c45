"""Issue 27: a GGUF loaded through llama-cpp-python under `safegate exec`: its measured peak memory against the RAM
`safegate need` predicts from the file's header.

usage: python bench/bench_need_gguf.py --bench-python /work/benchenv/bin/python [--runs 3] [--contexts 2048,8192]
                                       [--type f16] [--layers 16] [--modes mmap-cold,mmap-warm,read-cold]
                                       [--prompt-tokens 512]
                                       [--work DIR] [--keep] [--out FILE] [--raw FILE]

Run it with the Python that has safegate installed (the project's venv). --bench-python is a Python with
llama-cpp-python (built for the CPU), gguf and numpy:
    python3 -m venv /work/benchenv && CMAKE_ARGS="-DGGML_NATIVE=ON" /work/benchenv/bin/pip install llama-cpp-python gguf
No weights are downloaded: need_gguf_make.py writes a llama-architecture GGUF with random weights (default:
Llama-3.2-1B's shape, 16 blocks, embedding 2048, 32 heads, 8 KV heads, feed-forward 8192, a 32000-token vocabulary;
1.1 G parameters, 2.2 GB in f16), kept in --work for the next run with --keep.

Each run: `safegate exec --log LOG -- python bench/need_gguf_load.py MODEL -c N -ngl 0 [--no-mmap]`, which builds
`Llama(model_path, n_ctx=N, n_gpu_layers=0, use_mmap=...)` and evaluates a prompt of --prompt-tokens random tokens
(default 512: one full micro-batch; 0: the whole context, slow on a CPU), so the KV cache and the compute buffer are
allocated and used. Modes:
  mmap-cold  the default use_mmap=True; the file evicted from the page cache first, so the weights the job maps are
             read from disk and charged to the job's cgroup (a first run after a reboot);
  mmap-warm  use_mmap=True; the bench reads the file first, so its pages are cached and charged to the bench's
             cgroup, not the job's (a second run, or a file just downloaded);
  read-cold  use_mmap=False (--no-mmap): the weights read into the process's own memory, file evicted first;
  read-warm  use_mmap=False, file cached.

Measured: the `summary` event's peak_job_memory (what safegate records and learns from: the highest of its samples
and of the kernel's peak of the job's cgroup, page cache charged to it included), and, from the job itself, its
VmHWM (the process's peak resident set: anonymous memory plus the file pages it mapped and touched) and RssAnon and
RssFile after the prompt. llama.cpp's own log gives the buffers it allocated (model, KV cache, compute, output).
Predicted: `safegate need --json -- python bench/need_gguf_load.py MODEL -c N -ngl 0`'s predicted RAM, and the parts
of safegate.need.modelfile.file_need (weights, KV cache, overhead) where that module is there. The target (issue
27): the median peak within 15% of the prediction.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
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
    read_text,
    stamp,
    warm,
    workdir,
)

MiB = 1024**2
GiB = 1024**3
TARGET = 0.15
MODES = {"mmap-cold": (True, "cold"), "mmap-warm": (True, "warm"), "read-cold": (False, "cold"),
         "read-warm": (False, "warm")}
LOAD = REPO / "bench" / "need_gguf_load.py"
# llama.cpp's log of what it allocated, e.g. "load_tensors:   CPU_Mapped model buffer size =  2176.00 MiB",
# "llama_kv_cache:        CPU KV buffer size =   256.00 MiB", "llama_context:        CPU compute buffer size = ...".
BUFFER = re.compile(r"^\w+:\s+(\S+)\s+(model|KV|compute|output)\s+buffer size =\s+([\d.]+) MiB", re.MULTILINE)


def model_file(bench_python: str, work: Path, qtype: str, layers: int) -> tuple[Path, dict[str, Any]]:
    path = work / f"random-llama-1b-{qtype}.gguf" if layers == 16 else work / f"random-llama-{layers}l-{qtype}.gguf"
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file():
        facts = json.loads(meta.read_text())
        if facts.get("file_bytes") == path.stat().st_size:
            log(f"reusing {path} ({path.stat().st_size / GiB:.2f} GiB)")
            return path, facts
    log(f"writing {path} with {bench_python} (random weights)")
    done = subprocess.run([bench_python, str(REPO / "bench" / "need_gguf_make.py"), str(path), "--type", qtype,
                           "--layers", str(layers)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"need_gguf_make.py exited {done.returncode}: {done.stderr.strip()[-800:]}")
    meta.write_text(done.stdout.strip().splitlines()[-1])
    return path, json.loads(meta.read_text())


def buffers(stderr: str) -> dict[str, float]:
    """MiB per kind (model, KV, compute, output) that llama.cpp's log says it allocated, summed over devices."""
    found: dict[str, float] = {}
    for _device, kind, mib in BUFFER.findall(stderr):
        found[kind] = found.get(kind, 0.0) + float(mib)
    return found


def job_report(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("need_gguf_load "):
            report = json.loads(line.split(" ", 1)[1])
            return report if isinstance(report, dict) else {}
    return {}


def file_need_parts(path: Path, context: int) -> dict[str, Any] | str:
    """safegate.need.modelfile.file_need's parts for *path* at *context*, nothing offloaded (flash attention as
    llama-cpp-python's default, off), or why not."""
    try:
        from safegate.need.modelfile import file_need, read_model
    except ImportError as exc:
        return f"safegate.need.modelfile not importable ({exc})"
    model = read_model(str(path))
    if isinstance(model, str):
        return model
    parts = {}
    for flash in (False, True):
        need = file_need(model, context=context, gpu_layers=0, flash_attention=flash)
        parts["flash" if flash else "no_flash"] = {"ram": need.ram, "weights": need.weights,
                                                   "kv_cache": need.kv_cache, "overhead": need.overhead}
    return parts


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def main() -> int:
    parser = bench_parser(__doc__, runs=3, raw=True)
    parser.add_argument("--bench-python", required=True, help="a Python with llama-cpp-python, gguf and numpy")
    parser.add_argument("--contexts", default="2048,8192", help="n_ctx values, comma-separated (default 2048,8192)")
    parser.add_argument("--type", default="f16", choices=("f16", "q8_0", "q4_0"), help="the weights' type")
    parser.add_argument("--flash-attn", action="store_true",
                        help="the job runs with flash attention (-fa; llama-cpp-python's default is off)")
    parser.add_argument("--layers", type=int, default=16,
                        help="blocks (default 16; fewer make a small model whose context fills fast, with the same "
                             "KV cache per layer and the same compute buffer)")
    parser.add_argument("--modes", default="mmap-cold,mmap-warm,read-cold",
                        help=f"comma-separated, of {', '.join(MODES)} (default mmap-cold,mmap-warm,read-cold)")
    parser.add_argument("--prompt-tokens", type=int, default=512,
                        help="tokens evaluated (default 512: one micro-batch; 0: fill the context)")
    parser.add_argument("--work", default="/var/tmp/safegate-bench-need",
                        help="where the model is written and kept (default /var/tmp/safegate-bench-need)")
    parser.add_argument("--keep", action="store_true", help="keep the model file for the next run")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take (default 900)")
    parser.add_argument("--safegate", help="the safegate executable (default: beside this Python)")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    if not contexts or not modes or any(m not in MODES for m in modes):
        raise BenchError(f"--contexts {args.contexts!r} / --modes {args.modes!r}: expected numbers / {list(MODES)}")
    interrupt_on_signals()
    safegate = find_safegate(args.safegate)
    load_start = loadavg()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, facts = model_file(args.bench_python, work, args.type, args.layers)
    results: dict[tuple[int, str], list[dict[str, Any]]] = {(c, m): [] for c in contexts for m in modes}
    predictions: dict[int, tuple[int | None, str]] = {}
    parts: dict[int, dict[str, Any] | str] = {}
    try:
        with workdir("safegate-bench-need-gguf-") as tmp:
            env = bench_env(pycache=tmp / "pycache", SAFEGATE_LOCK_DIR=str(tmp / "locks"),
                            XDG_STATE_HOME=str(tmp / "state"))
            for ctx in contexts:
                job = [args.bench_python, str(LOAD), str(model), "-c", str(ctx), "-ngl", "0",
                       *(["-fa"] if args.flash_attn else [])]
                predictions[ctx] = predicted_ram(need_json(safegate, job, env))
                parts[ctx] = file_need_parts(model, ctx)
                log(f"n_ctx {ctx}: predicted {mib(predictions[ctx][0])} MiB ({predictions[ctx][1]})")
            for i in range(args.runs):
                for ctx in contexts:
                    for mode in modes if i % 2 == 0 else modes[::-1]:  # alternate, so drift hits all alike
                        use_mmap, cache = MODES[mode]
                        if cache == "cold":
                            evict(model)
                        else:
                            warm(model)
                        cached = file_cached(model)
                        if cache == "cold" and cached > model.stat().st_size // 100:
                            raise BenchError(f"{model}: {cached >> 20} MiB stayed in the page cache after "
                                             "eviction (another process maps it?): a cold run would not be cold")
                        job = [args.bench_python, str(LOAD), str(model), "-c", str(ctx), "-ngl", "0",
                               "--prompt-tokens", str(args.prompt_tokens), *([] if use_mmap else ["--no-mmap"]),
                               *(["-fa"] if args.flash_attn else [])]
                        r = exec_with_peak(safegate, job, env, tmp, f"run{i}-{ctx}-{mode}", timeout=args.timeout)
                        if r["status"] != 0:
                            raise BenchError(f"run {i} (n_ctx {ctx}, {mode}): safegate exec exited {r['status']}: "
                                             f"{read_text(r['stderr'])[-800:]}")
                        r["cached_before"] = cached
                        r["buffers"] = buffers(read_text(r["stderr"]))
                        r["job"] = job_report(read_text(r["stdout"]))
                        results[(ctx, mode)].append(r)
                        if args.raw:  # each run as it ends: a bench stopped halfway keeps what it measured
                            with open(f"{args.raw}.runs.jsonl", "a", encoding="utf-8") as fh:
                                fh.write(json.dumps({"run": i, "n_ctx": ctx, "mode": mode, **r}) + "\n")
                        log(f"run {i} n_ctx {ctx} {mode}: safegate peak {mib(r['peak_job_memory'])} MiB, VmHWM "
                            f"{mib(r['job'].get('after_eval', {}).get('VmHWM'))} MiB, {r['wall_s']:.0f} s")
                        time.sleep(1)
    finally:
        if not args.keep:
            model.unlink(missing_ok=True)
            model.with_suffix(".json").unlink(missing_ok=True)

    head = ["n_ctx", "mode", "runs", "predicted MiB", "safegate peak MiB (median)", "ratio", "VmHWM MiB (median)",
            "ratio", "RssAnon / RssFile MiB after the prompt", "llama.cpp's buffers MiB: model + KV + compute + output"]
    rows = []
    verdicts = []
    for (ctx, mode), runs in results.items():
        ram = predictions[ctx][0]
        peaks = [float(r["peak_job_memory"]) for r in runs]
        hwms = [float(r["job"].get("after_eval", {}).get("VmHWM", 0)) for r in runs]
        anon = median([float(r["job"].get("after_eval", {}).get("RssAnon", 0)) for r in runs])
        filed = median([float(r["job"].get("after_eval", {}).get("RssFile", 0)) for r in runs])
        b = runs[-1]["buffers"]
        allocated = " + ".join(f"{b.get(k, 0):,.0f}" for k in ("model", "KV", "compute", "output"))
        ratio = median(peaks) / ram if ram else None
        ratio_hwm = median(hwms) / ram if ram else None
        rows.append([ctx, mode, len(runs), mib(ram), mib(median(peaks)), "-" if ratio is None else f"{ratio:.2f}",
                     mib(median(hwms)), "-" if ratio_hwm is None else f"{ratio_hwm:.2f}",
                     f"{mib(anon)} / {mib(filed)}", allocated])
        if ratio is not None and ratio_hwm is not None:
            verdicts.append(f"- n_ctx {ctx}, {mode}: safegate's peak {ratio - 1:+.0%} of the prediction "
                            f"({'within' if abs(ratio - 1) <= TARGET else 'NOT within'} ±{TARGET:.0%}); the "
                            f"process's own peak (VmHWM) {ratio_hwm - 1:+.0%} "
                            f"({'within' if abs(ratio_hwm - 1) <= TARGET else 'NOT within'}).")
    part_rows = []
    for ctx in contexts:
        p = parts[ctx]
        if isinstance(p, str):
            part_rows.append([ctx, p, "", "", "", ""])
            continue
        for flash, q in p.items():
            part_rows.append([ctx, flash, mib(q["weights"]), mib(q["kv_cache"]), mib(q["overhead"]), mib(q["ram"])])
    facts_rows = [*machine_facts(),
                  ("RAM", f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.1f} GiB"),
                  ("llama-cpp-python", subprocess.run([args.bench_python, "-c", "import llama_cpp; "
                                                       "print(llama_cpp.__version__)"], capture_output=True,
                                                      text=True, check=False).stdout.strip() or "?"),
                  ("model", f"{model.name}: llama, {facts['layers']} blocks, embedding {facts['embd']}, "
                            f"{facts['heads']} heads, {facts['kv_heads']} KV heads, ff {facts['ff']}, vocab "
                            f"{facts['vocab']}, {facts['params'] / 1e9:.2f} G parameters, {args.type}, "
                            f"tensor data {facts['tensor_bytes'] / MiB:,.0f} MiB")]
    lines = [
        stamp(),
        "",
        f"Job: `python bench/need_gguf_load.py MODEL -c N_CTX -ngl 0 --prompt-tokens {args.prompt_tokens}"
        f"{' -fa' if args.flash_attn else ''}` (`--no-mmap` in the read-* modes; --prompt-tokens 0 fills the "
        "context). Predicted: `safegate need --json --` the same command without --prompt-tokens and --no-mmap.",
        "",
        *md_table(head, rows),
        "",
        *verdicts,
        "",
        "The prediction's parts (safegate.need.modelfile.file_need, nothing offloaded; flash attention on and off):",
        "",
        *md_table(["n_ctx", "flash attention", "weights MiB", "KV cache MiB", "overhead MiB", "RAM MiB"], part_rows),
        *machine_section(facts_rows, (load_start, loadavg())),
    ]
    raw = {"model": facts, "predictions": {str(c): p for c, p in predictions.items()},
           "parts": {str(c): p for c, p in parts.items()},
           "runs": {f"{c} {m}": runs for (c, m), runs in results.items()}}
    publish("\n".join(lines), args.out, args.raw, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
