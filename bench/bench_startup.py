#!/usr/bin/env python3
"""`safegate check` without a grant, in an empty lock dir, against another safegate side by side: start-up only.

    python bench/bench_startup.py --baseline OTHER/bin/safegate [--safegate PATH] [--runs N] [--out FILE]

bench_check.py times the README's check (a profile with a lock: a pass grants it, and a stale record is planted
every run); this one times what is left when nothing is read or granted: `check --no-grant --mem 0 --margin 0 -q`
and `check --lock bench --mem 0 --margin 0 -q` (a lock, so a pass grants it) in an empty lock dir, with
`[thermal] sensors = []`. The two safegates alternate run by run, each first in turn, every run in its own shell.
"""

from __future__ import annotations

from common import (
    bench_env,
    bench_parser,
    find_safegate,
    loadavg,
    machine_facts,
    machine_section,
    md_table,
    publish,
    stamp,
    summarize,
    timed_run,
    workdir,
)

WARMUP = 3
CASES = {
    "`check --no-grant` (nothing read, nothing granted)": ["--no-grant"],
    "`check --lock bench` (a pass grants the lock)": ["--lock", "bench"],
}


def main() -> None:
    parser = bench_parser(__doc__, runs=30, raw=True)
    parser.add_argument("--safegate", metavar="PATH", help="the safegate executable (default: beside this python)")
    parser.add_argument("--baseline", metavar="PATH", required=True, help="the safegate to compare with")
    args = parser.parse_args()
    gates = {"this": find_safegate(args.safegate), "baseline": args.baseline}
    start_load = loadavg()
    rows, raw = [], {}
    with workdir("sg-startup-") as tmp:
        config = tmp / "config.toml"
        config.write_text("[thermal]\nsensors = []\n")
        for case, extra in CASES.items():
            samples: dict[str, list[float]] = {name: [] for name in gates}
            for i in range(WARMUP + args.runs):
                order = list(gates) if i % 2 else list(gates)[::-1]
                for name in order:
                    env = bench_env(SAFEGATE_LOCK_DIR=str(tmp / f"locks-{name}"))
                    argv = [gates[name], "check", "--config", str(config), *extra, "--mem", "0", "--margin", "0",
                            "-q"]
                    elapsed, _ = timed_run(argv, env)
                    if i >= WARMUP:
                        samples[name].append(elapsed)
            this, base = summarize(samples["this"]), summarize(samples["baseline"])
            rows.append([case, f"{base['median'] * 1000:.1f}", f"{this['median'] * 1000:.1f}",
                         f"**{this['median'] / base['median']:.2f}x**",
                         f"{this['p10'] * 1000:.1f}-{this['p90'] * 1000:.1f}"])
            raw[case] = samples
    lines = [stamp(), "", *machine_section(machine_facts(), (start_load, loadavg())), "",
             f"{args.runs} timed runs per figure after {WARMUP} warm-up runs; baseline `{args.baseline}`.", "",
             *md_table(["case", "baseline median ms", "this median ms", "this/baseline", "this p10-p90 ms"], rows)]
    publish("\n".join(lines), args.out, args.raw, raw)


if __name__ == "__main__":
    main()
