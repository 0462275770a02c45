"""GPU support's cost: NVML init and one GPU sample against the tests' fake libnvidia-ml (a floor, not a GPU
figure), and `safegate check` wall time with no driver, with the backend off, and with the fake's 4 GPUs.

usage: python bench/bench_gpu.py [--runs N] [--out FILE]
Needs gcc (to build the fake). Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fake_nvml import FakeGpu, FakeProc, build_fake_nvml, nvml_env, write_state  # noqa: E402

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


def q(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]


def row(name: str, values: list[float], unit: float = 1000.0) -> str:
    return (f"| {name} | {statistics.median(values) * unit:.2f} | {q(values, 0.1) * unit:.2f} | "
            f"{q(values, 0.9) * unit:.2f} | {len(values)} |")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lib = build_fake_nvml(work / "lib")
        state = work / "state"
        gpus = [FakeGpu(name=f"Fake GPU {i}", uuid=f"GPU-{i:04d}", total=24 * GiB, used=(i + 1) * GiB)
                for i in range(4)]
        write_state(state, gpus, [FakeProc(i, 1000 + i, GiB) for i in range(4)])
        empty = work / "empty"
        empty.mkdir()
        cfg = work / "config.toml"
        cfg.write_text('[defaults]\nmemory_margin = "0"\nmax_memory_pressure = 100\n[thermal]\nsensors = []\n')
        # Bytecode cached as an installed package has it (this sandbox sets PYTHONDONTWRITEBYTECODE).
        inherited = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        base = {**inherited, "SAFEGATE_LOCK_DIR": str(work / "locks"), "XDG_STATE_HOME": str(work / "state-dir"),
                "PYTHONPYCACHEPREFIX": str(work / "pycache")}
        with_fake = nvml_env(lib, state, base=base)
        no_driver = {**base, "LD_LIBRARY_PATH": str(empty)}
        backend_none = {**no_driver, "SAFEGATE_GPU": "none"}

        probe = json.loads(subprocess.run([sys.executable, "-c", INPROC, str(args.runs * 10)], env=with_fake,
                                          capture_output=True, text=True, check=True, cwd=REPO).stdout)
        cmd = [sys.executable, "-m", "safegate", "check", "--config", str(cfg), "--mem", "0", "-q"]
        for env in (no_driver, backend_none, with_fake):  # warm-up (and bytecode cache)
            subprocess.run(cmd, env=env, cwd=REPO, check=False)
        timings: dict[str, list[float]] = {"no driver (auto)": [], "backend none": [], "fake NVML, 4 GPUs": []}
        for _ in range(args.runs):  # alternate, so drift hits all three alike
            for name, env in (("no driver (auto)", no_driver), ("backend none", backend_none),
                              ("fake NVML, 4 GPUs", with_fake)):
                start = time.perf_counter()
                subprocess.run(cmd, env=env, cwd=REPO, check=False)
                timings[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in timings.items()}
    overhead = (med["no driver (auto)"] - med["backend none"]) * 1000
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}: `python bench/bench_gpu.py --runs {args.runs}`"
        f"; nproc {os.cpu_count()}, Python {sys.version.split()[0]}",
        "",
        "In-process, against the fake libnvidia-ml (4 GPUs, 1 process each): a floor for NVML's own cost.",
        "",
        "| what | median ms | p10 | p90 | n |",
        "|---|---|---|---|---|",
        f"| import safegate.probes.gpu | {probe['import'] * 1000:.2f} | | | 1 |",
        f"| NVML init + first read of 4 GPUs | {probe['init_and_first'] * 1000:.2f} | | | 1 |",
        row("one GPU sample (4 GPUs: memory, temperature, threshold, processes, MIG)", probe["samples"]),
        "",
        "`safegate check` wall time, alternating the three set-ups run by run:",
        "",
        "| set-up | median ms | p10 | p90 | n |",
        "|---|---|---|---|---|",
        *(row(name, values) for name, values in timings.items()),
        "",
        f"GPU support on a machine without a driver costs {overhead:+.2f} ms per check (auto vs none; target <= 5 ms):"
        f" {'met' if overhead <= 5 else 'NOT met'}.",
    ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
