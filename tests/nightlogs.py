"""Synthetic `exec --log` files of a long night: what a shared GPU box writes from 20:00 to 06:00 when three
queues feed it whisper jobs. Lines as exec writes them (the same events and fields), made here so that a night
of hours takes no hours; deterministic (a seeded Random), so its screenshot changes only when the page does."""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GiB = 1024**3
START = datetime(2026, 11, 30, 20, 0, tzinfo=timezone.utc).timestamp()


def stamp(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")


class Log:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.lines: list[str] = []

    def add(self, t: float, event: str, message: str, **fields: Any) -> None:
        self.lines.append(json.dumps({"time": stamp(t), "event": event, "message": message,
                                      "safegate_pid": self.pid, **fields}))


def job(log: Log, rng: random.Random, number: int, start: float, length: float, kind: str, waited: float) -> None:
    """One job's lines: admitted, a sample a minute, its pauses or breach, exit and summary."""
    model = rng.choice(("whisper-large-v3", "whisper-medium", "distil-whisper-large-v3", "whisper-small.en"))
    argv = ["python3", "/srv/asr/transcribe.py", "--model", model, "--input",
            f"/data/recordings/2026-11-30/interview-{number:03d}_channel-left_48kHz.flac",
            "--output-dir", "/data/transcripts/2026-11-30"]
    limit = 6 * GiB if model.startswith("whisper-large") else 3 * GiB
    log.add(start, "admitted", f"admitted: {' '.join(argv)}", pid=10_000 + number, profile=model, lock="gpu0",
            argv=argv, max_mem=limit, min_available=2 * GiB, max_temp=85.0, waited=waited)
    base = limit * rng.uniform(0.35, 0.8)
    peak, hottest, t = 0, 0.0, start
    pauses: list[tuple[float, float]] = []
    if kind == "paused":
        at = start + length * rng.uniform(0.2, 0.6)
        pauses.append((at, at + rng.choice((8.0, 40.0, 300.0))))
    end = start + length
    while t < end:
        t = min(end, t + 60.0)
        paused = any(a <= t <= b for a, b in pauses)
        memory = int(base * rng.uniform(0.9, 1.05))
        temp = 86.0 if paused else round(rng.uniform(55, 72), 1)
        peak, hottest = max(peak, memory), max(hottest, temp)
        log.add(t, "sample", "sample", job_memory=memory, available=int(20 * GiB - memory), temp=temp)
    for a, b in pauses:
        log.add(a, "paused", "paused: 87 C >= max-temp 85 C", temp=87.0, max_temp=85.0, resume_temp=75.0)
        log.add(b, "resumed", "resumed: 74 C < resume-temp 75 C", temp=74.0, max_temp=85.0, resume_temp=75.0)
        hottest = max(hottest, 87.0)
    if kind == "memory":
        over = int(limit * 1.02)
        peak = max(peak, over)
        log.add(end, "breach", f"job memory {over / GiB:.1f} GiB >= --max-mem {limit / GiB:.1f} GiB; sending "
                "SIGTERM, SIGKILL after 10s", job_memory=over, max_mem=limit, reason="memory")
        log.add(end + 1, "exit", "job killed for memory", exit_code=20, reason="memory")
        code, reason = 20, "memory"
    elif kind == "thermal":
        log.add(end, "breach", "hottest sensor 90 C >= max-temp 85 C (--on-hot kill); sending SIGTERM, SIGKILL "
                "after 10s", temp=90.0, max_temp=85.0, reason="thermal")
        hottest = 90.0
        log.add(end + 1, "exit", "job killed for heat", exit_code=21, reason="thermal")
        code, reason = 21, "thermal"
    else:
        code = 1 if kind == "failed" else 0
        log.add(end + 1, "exit", f"job exited {code}", exit_code=code, reason="exited")
        reason = "exited"
    log.add(end + 1, "summary", "summary", duration=end + 1 - start, peak_job_memory=peak, highest_temp=hottest,
            reason=reason, exit_code=code)


def write_night(folder: Path, jobs: int = 200, hours: float = 10.0, queues: int = 3) -> list[Path]:
    """*jobs* jobs over *hours* hours from *queues* logs (each queue one job after another), and a few blocked."""
    rng = random.Random(25)
    lengths = [rng.choices((rng.uniform(3, 40), rng.uniform(60, 600), rng.uniform(1200, 3600)), (3, 4, 1))[0]
               for _ in range(jobs)]
    # Scaled to fill the night with gaps between jobs: a queue's jobs take 80% of it.
    scale = min(1.0, 0.8 * hours * 3600 * queues / sum(lengths))
    per_queue = [[length * scale for length in lengths[q::queues]] for q in range(queues)]
    paths = []
    number = 0
    for q, mine in enumerate(per_queue):
        log = Log(4000 + q)
        gap = max(1.0, (hours * 3600 - sum(mine) - 60) / max(1, len(mine)))
        t = START + rng.uniform(0, 120)
        for length in mine:
            number += 1
            kind = rng.choices(("ok", "paused", "memory", "thermal", "failed", "blocked"),
                               (70, 10, 6, 3, 6, 5))[0]
            waited = rng.choice((0.0, 0.0, rng.uniform(5, 60), rng.uniform(60, 2400)))
            if kind == "blocked":
                log.add(t, "blocked", "thermal: hottest sensor 88 C >= max-temp 85 C; the job was not started, "
                        "and exec --wait was not given, so safegate did not wait for the machine to cool down",
                        exit_code=12)
            else:
                job(log, rng, number, t, length, kind, waited)
            t += length + 1 + rng.uniform(0.5, 1.5) * gap
        path = folder / f"queue-{q + 1}.jsonl"
        path.write_text("\n".join(log.lines) + "\n")
        paths.append(path)
    return paths
