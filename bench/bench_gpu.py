"""GPU support's cost: NVML init and one GPU sample against the tests' fake libnvidia-ml (a floor, not a GPU
figure), and `safegate check` wall time with no driver, with the backend off, and with the fake's 4 GPUs.

usage: python bench/bench_gpu.py [--runs N] [--out FILE]
Needs gcc (to build the fake). Prints a Markdown report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from common import (
    REPO,
    bench_env,
    bench_parser,
    md_row,
    md_table,
    median,
    publish,
    stamp,
    summarize,
    timed_run,
    workdir,
)

sys.path.insert(0, str(REPO / "tests"))

from fake_nvml import FakeGpu, FakeProc, build_fake_nvml, nvml_env, write_state

GiB = 1024**3
INPROC = """
import json, sys, time
t0 = time.perf_counter()
from safegate.probes import gpu
t1 = time.perf_counter()
snap = gpu.read_gpus("auto")
t2 = time.perf_counter()
samples = []
for _ in range(int(sys.argv[1])):
    s = time.perf_counter()
    gpu.read_gpus("auto")
    samples.append(time.perf_counter() - s)
print(json.dumps({"import": t1 - t0, "init_and_first": t2 - t1, "samples": samples, "gpus": len(snap.gpus)}))
"""


def row(name: str, values: list[float]) -> str:
    s = summarize(values)
    return md_row(name, *(f"{s[k] * 1000:.2f}" for k in ("median", "p10", "p90")), len(values))


def main() -> int:
    args = bench_parser(__doc__, runs=30).parse_args()
    setups = ("no driver (auto)", "backend none", "fake NVML, 4 GPUs")
    with workdir("safegate-bench-gpu-") as work:
        lib = build_fake_nvml(work / "lib")
        state = work / "state"
        gpus = [FakeGpu(name=f"Fake GPU {i}", uuid=f"GPU-{i:04d}", total=24 * GiB, used=(i + 1) * GiB)
                for i in range(4)]
        write_state(state, gpus, [FakeProc(i, 1000 + i, GiB) for i in range(4)])
        empty = work / "empty"
        empty.mkdir()
        cfg = work / "config.toml"
        cfg.write_text('[defaults]\nmemory_margin = "0"\nmax_memory_pressure = 100\n[thermal]\nsensors = []\n')
        base = bench_env(pycache=work / "pycache", SAFEGATE_LOCK_DIR=str(work / "locks"),
                         XDG_STATE_HOME=str(work / "state-dir"))
        with_fake = nvml_env(lib, state, base=base)
        no_driver = {**base, "LD_LIBRARY_PATH": str(empty)}
        envs = dict(zip(setups, (no_driver, {**no_driver, "SAFEGATE_GPU": "none"}, with_fake), strict=True))

        probe = json.loads(subprocess.run([sys.executable, "-c", INPROC, str(args.runs * 10)], env=with_fake,
                                          capture_output=True, text=True, check=True, cwd=REPO).stdout)
        cmd = [sys.executable, "-m", "safegate", "check", "--config", str(cfg), "--mem", "0", "-q"]
        for env in envs.values():  # warm-up (and bytecode cache)
            timed_run(cmd, env, cwd=REPO)
        timings: dict[str, list[float]] = {name: [] for name in setups}
        for _ in range(args.runs):  # alternate, so drift hits all three alike
            for name, env in envs.items():
                timings[name].append(timed_run(cmd, env, cwd=REPO)[0])
    overhead = (median(timings["no driver (auto)"]) - median(timings["backend none"])) * 1000
    head = ["what", "median ms", "p10", "p90", "n"]
    lines = [
        f"{stamp()}; nproc {os.cpu_count()}, Python {sys.version.split()[0]}",
        "",
        "In-process, against the fake libnvidia-ml (4 GPUs, 1 process each): a floor for NVML's own cost.",
        "",
        *md_table(head, [["import safegate.probes.gpu", f"{probe['import'] * 1000:.2f}", "", "", 1],
                         ["NVML init + first read of 4 GPUs", f"{probe['init_and_first'] * 1000:.2f}", "", "", 1]]),
        row("one GPU sample (4 GPUs: memory, temperature, threshold, processes, MIG)", probe["samples"]),
        "",
        "`safegate check` wall time, alternating the three set-ups run by run:",
        "",
        *md_table(["set-up", *head[1:]]),
        *(row(name, values) for name, values in timings.items()),
        "",
        f"GPU support on a machine without a driver costs {overhead:+.2f} ms per check (auto vs none; target <= 5 ms):"
        f" {'met' if overhead <= 5 else 'NOT met'}.",
    ]
    publish("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
