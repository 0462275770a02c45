"""Fair admission's rules at their boundaries (safegate.gate.fairness, pure) and how a waiter's ticket reaches the lock
dir (safegate.gate.queue): only with its first judgement, saying whether memory is all it waits for."""

from __future__ import annotations

import getpass
import itertools
import json
import os
import signal
import subprocess
from pathlib import Path

from support import PY, TIMEOUT, Procs, Run, job_pid, meminfo_available, neutral_config, post_ticket, wait_until

from safegate.exitcodes import ExitCode
from safegate.gate.fairness import QUEUE, blocked_by, in_line, waits_only_for_memory
from safegate.gate.queue import Line, read_tickets, take_ticket
from safegate.gate.results import CheckResult, LockValues, MemoryValues, Status, Verdict
from safegate.probes.snapshots import Ticket

GIB = 1 << 30
TOTAL = 10 * GIB


def memory(available: int, need: int, reserved: int = 0) -> CheckResult:
    left = available - reserved - need
    status = Status.PASS if left >= 0 else Status.FAIL
    return CheckResult("memory", status, "", ExitCode.MEMORY, MemoryValues(available, TOTAL, reserved, need, left),
                       {"margin": 0})


def free_lock(name: str = "night") -> CheckResult:
    return CheckResult("lock", Status.PASS, "", ExitCode.LOCKED, LockValues(name, None, False, None, False, ()))


def ticket(pid: int, arrival: int, need: int, *, lock: str | None = None, memory_only: bool = False,
           blocked: str = "") -> Ticket:
    return Ticket(pid=pid, start_time=1.0, user="u", lock=lock, profile=f"p{pid}", need=need, arrival=arrival,
                  blocked_by=blocked, memory_only=memory_only)


def test_a_waiter_held_back_for_an_earlier_memory_waiter_still_waits_only_for_memory() -> None:
    # The big job (7 GiB) would fit now, but an earlier small waiter waits for memory: the big one is held back.
    small = ticket(1, 10, 2 * GIB, memory_only=True, blocked="memory")
    big = ticket(2, 20, 7 * GIB)
    checks = in_line([memory(8 * GIB, 7 * GIB), free_lock()], big, [small, big])
    assert checks[0].blocks and checks[0].caused_by == QUEUE
    assert blocked_by(checks) == "queue"  # what `safegate queue` shows: its place in line
    assert waits_only_for_memory(checks)  # and what later arrivals must respect: it waits for memory
    # So a small job arriving after it is held back, as it would be for a big one short of memory.
    later = ticket(3, 30, 2 * GIB)
    held = in_line([memory(8 * GIB, 2 * GIB)],
                   later, [small, ticket(2, 20, 7 * GIB, memory_only=True, blocked="queue"), later])
    assert held[0].blocks and held[0].caused_by == QUEUE and "pid 2 " in held[0].reason, held[0].reason
    # (Counted by its label alone, a held-back waiter was let down: each small job arriving then went ahead.)
    assert not in_line([memory(8 * GIB, 2 * GIB)], later, [ticket(2, 20, 7 * GIB, blocked="queue"), later])[0].blocks
    # Both fit: no one is delayed, the small one starts.
    assert not in_line([memory(20 * GIB, 2 * GIB)], later, [ticket(2, 20, 7 * GIB, memory_only=True), later])[0].blocks


def test_waiting_in_line_for_a_lock_or_on_anything_else_is_not_memory_only() -> None:
    first, me = ticket(1, 10, GIB, lock="night"), ticket(2, 20, GIB, lock="night")
    checks = in_line([memory(8 * GIB, GIB), free_lock()], me, [first, me])
    assert checks[1].blocks and checks[1].caused_by == QUEUE and not waits_only_for_memory(checks)
    hot = CheckResult("thermal", Status.FAIL, "hot", ExitCode.THERMAL)
    assert not waits_only_for_memory([memory(GIB, 2 * GIB), hot])
    assert waits_only_for_memory([memory(GIB, 2 * GIB), free_lock()])
    assert not waits_only_for_memory([memory(8 * GIB, GIB)])  # nothing blocks
    # A later arrival is not held back for a waiter that does not wait only for memory.
    later = ticket(3, 30, 2 * GIB)
    hot_waiter = ticket(1, 10, 7 * GIB, blocked="memory,thermal")
    assert not in_line([memory(8 * GIB, 2 * GIB)], later, [hot_waiter, later])[0].blocks


def _blocked_on_memory() -> Verdict:
    return Verdict("p", (memory(GIB, 2 * GIB), free_lock()))


def test_a_ticket_reaches_the_lock_dir_only_with_its_first_judgement(tmp_path: Path) -> None:
    line = Line(take_ticket(tmp_path, None, "big", 2 * GIB))
    taken = line.ticket.arrival
    assert list(tmp_path.iterdir()) == []  # taken, not yet posted: no one can read it half-made
    line.arrive()
    assert line.ticket.arrival >= taken and line.ticket.path is not None
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    assert line.ticket.path.name == f".ticket.{os.getpid()}.{start}.json"
    line.judged(_blocked_on_memory())
    [posted] = read_tickets(tmp_path)
    assert posted.arrival == line.ticket.arrival and posted.blocked_by == "memory" and posted.memory_only
    # Its place is the kernel's time on the file, which its owner cannot set back.
    assert posted.arrival == os.stat(line.ticket.path).st_ctime_ns
    arrival, place = line.ticket.arrival, os.stat(line.ticket.path)
    line.arrive()  # the place in line is taken once
    line.judged(Verdict("p", (memory(GIB, 2 * GIB), CheckResult("thermal", Status.FAIL, "hot", ExitCode.THERMAL))))
    [updated] = read_tickets(tmp_path)
    assert updated.arrival == arrival and updated.blocked_by == "memory,thermal" and not updated.memory_only
    # What changed went to the state file: the place itself was never written again.
    now = os.stat(line.ticket.path)
    assert (now.st_ctime_ns, now.st_ino) == (place.st_ctime_ns, place.st_ino)


def test_a_waiter_admitted_at_its_first_look_posts_no_ticket(tmp_path: Path) -> None:
    line = Line(take_ticket(tmp_path, "night", "small", GIB))
    line.arrive()
    line.judged(Verdict("p", (memory(8 * GIB, GIB), free_lock())))
    assert not line.posted and list(tmp_path.iterdir()) == []


def test_a_later_small_job_waits_for_a_big_waiter_held_back_in_line(run: Run, tmp_path: Path, sensor: Path,
                                                                     lock_dir: Path, procs: Procs) -> None:
    # The race of issue 14, made deterministic. An earlier waiter for memory (a live process of ours in line, whose
    # ticket says memory as a waiter's does until it looks again) holds back a big waiter that would fit alone; the
    # big one then waits only for memory, so a small job arriving after it must not start when both do not fit.
    # Counted by its "queue" label alone, the big waiter was passed by every small job arriving then.
    config = tmp_path / "config.toml"
    config.write_text(neutral_config(sensor, "[profiles.free]\nlock = false\n"))  # no lock: memory alone decides
    avail = meminfo_available()
    earlier, big, small = int(avail * 0.4), int(avail * 0.75), int(avail * 0.4)
    lock_dir.mkdir(parents=True, exist_ok=True)
    sleeper = procs.spawn(["sleep", "600"])
    post_ticket(lock_dir, sleeper.pid, need=earlier, user=getpass.getuser())
    gate = ["--config", str(config), "-p", "free"]
    waiter = procs.spawn([PY, "-m", "safegate", "check", *gate, "--mem", str(big), "--wait", "-q"], env=run.env)
    wait_until(lambda: [t for t in read_tickets(lock_dir) if t.pid == waiter.pid and t.blocked_by == "queue"],
               what="the big waiter held back in line")
    [held] = [t for t in read_tickets(lock_dir) if t.pid == waiter.pid]
    assert held.memory_only and held.need == big
    result = run("check", *gate, "--mem", str(small), "--json")
    memory = next(c for c in json.loads(result.stdout)["checks"] if c["name"] == "memory")
    assert result.returncode == ExitCode.MEMORY, result.stdout
    assert memory["status"] == "fail" and f"pid {waiter.pid} " in memory["reason"], memory
    # Once the earlier waiter is gone, the big one starts (it fits alone), and the small one after it.
    os.kill(sleeper.pid, signal.SIGKILL)
    assert waiter.wait(timeout=TIMEOUT) == 0
    assert run("check", *gate, "--mem", str(small), "-q").returncode == 0


HANDOVER_JOB = """import os, sys, time
spans, index, fifo = sys.argv[-3:]
if index == "0":
    with open(fifo) as fh:  # the first job runs until the test has lined every waiter up
        fh.read()
start = time.monotonic()
time.sleep(0.05)
fd = os.open(spans, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, f"{index} {start} {time.monotonic()}\\n".encode())
"""


def test_waiters_for_a_lock_whose_job_competes_all_run_one_at_a_time_in_arrival_order(
        tmp_path: Path, sensor: Path, lock_dir: Path, procs: Procs, env: dict[str, str]) -> None:
    # Each job's command line matches its profile's own competing rule, so a waiter sees the running job as the
    # lock's holder (and, before issue 23.5, as a competing process too). Woken by each release rather than by
    # its backoff, only the first in line may go: the others keep their places.
    token = f"sgtest{os.getpid()}{tmp_path.name}"
    config = tmp_path / "config.toml"
    config.write_text(neutral_config(sensor, f"[profiles.whisper-large-v3]\nmemory = \"0\"\ncompeting = [{{ program "
                                             f"= 'whisper', args = 'large-v3 {token}' }}]\n"))
    whisper = tmp_path / "whisper"
    whisper.write_text(HANDOVER_JOB)
    fifo, spans = tmp_path / "go", tmp_path / "spans"
    os.mkfifo(fifo)

    def gate(index: int) -> subprocess.Popen[bytes]:
        return procs.spawn([PY, "-m", "safegate", "exec", "--config", str(config), "-p", "whisper-large-v3",
                            "--wait", "--timeout", f"{TIMEOUT:g}s", "-q", "--", PY, str(whisper), "--model",
                            "large-v3", token, str(spans), str(index), str(fifo)], env=env)

    first = gate(0)
    wait_until(lambda: job_pid(lock_dir, "whisper-large"), what="the first job under the lock")
    waiters = []
    for index in range(1, 5):
        waiters.append(gate(index))
        wait_until(lambda n=index: len(read_tickets(lock_dir)) == n, what=f"waiter {index} in line")
    with open(fifo, "w") as fh:
        fh.write("go")
    assert [p.wait(timeout=TIMEOUT) for p in (first, *waiters)] == [0] * 5
    rows = sorted((float(start), float(end), int(index)) for index, start, end in
                  (line.split() for line in spans.read_text().splitlines()))
    assert [index for _, _, index in rows] == [0, 1, 2, 3, 4], rows
    assert all(b[0] >= a[1] for a, b in itertools.pairwise(rows)), rows
