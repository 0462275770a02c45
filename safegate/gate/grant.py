"""A passing check is a grant: what it promised (the lock, the need) stays reserved for the job that follows it.

`safegate check` decides under the admission lock, as exec's admission does, and on a pass leaves a keeper: a
process of its own (forked, in its own session, stdio on /dev/null, none of the caller's descriptors, so
`x=$(safegate check --json)` and cron's mail never wait on it) that takes the flock and writes a holder record
naming the owner. The owner is check's parent (or `--grant-to PID`); the job is the first process the owner
creates after check exits (/proc/<owner>/task/*/children), or the owner itself when it execs in place (bash
does for the last command of `-c`). The grant ends when the bound job exits, when the owner exits before a job
is bound, or when GRANT_LEASE passes without one: nothing stays held after an interactive `check && job`.

Only the bound job and its descendants run inside the grant (the lock is re-entrant for the job that holds it,
policy.encloses): `check && safegate exec ...` works, every other caller sees the lock held, naming the grant.
A job that takes the flock itself (`check && flock LOCK job`) is let through: the keeper sees it waiting in
/proc/locks and steps aside, keeping the record (which then names that job) and the reservation.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Collection, Sequence

from safegate.locks.files import lock_path as lock_file_path
from safegate.locks.files import waiting_on
from safegate.locks.store import HeldLock, LockStore
from safegate.probes.pids import Identity, age, children, cmdline, identity
from safegate.probes.snapshots import HolderRecord

GRANT_LEASE = 1.5  # seconds the owner has, after check exits, to start its job
BIND_POLL = 0.002  # while binding: a shell forks its next command within a millisecond or two
WATCH_POLL = 0.05  # while the job runs: a flock(1) of its waiting, its memory (its end wakes the keeper at once)
WATCH_CAP = 1.0
# Owners that take no job after a check: a service manager (PID 1, or the user's systemd), whose
# ExecStartPre= check is followed by ExecStart= in another process it starts much later.
_MANAGERS = frozenset({"systemd", "init"})


def grant_owner(grant_to: int | None) -> tuple[Identity | None, str]:
    """The process a passing check grants to, or None with the note why there is no grant."""
    pid = os.getppid() if grant_to is None else grant_to
    who = identity(pid)
    if who is None:
        return None, f"no grant: pid {pid} is not running"
    if pid == 1:
        return None, ("no grant: check was started by PID 1 (a service manager starts the job in another "
                      "process); run the job with safegate exec instead")
    if who.uid != os.geteuid():
        return None, f"no grant: pid {pid} runs as another user"
    comm = cmdline(pid).split(b"\0", 1)[0].rsplit(b"/", 1)[-1].decode(errors="replace")
    if comm in _MANAGERS:
        return None, (f"no grant: check was started by {comm} (pid {pid}), which starts the job in another process;"
                      " run the job with safegate exec instead")
    return who, ""


def spawn_keeper(store: LockStore, name: str, profile: str, argv: Sequence[str], *, need: int,
                 gpu_index: int | None, gpu_need: int, owner: Identity) -> int | None:
    """Fork the keeper, which takes lock *name* and records the grant; its pid once it holds the lock, None
    when the lock was taken meanwhile (by flock(1): the admission lock keeps safegates out). The caller holds
    the admission lock, so no one is admitted between this check and the keeper's claim."""
    check_pid = os.getpid()
    ready_r, ready_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the keeper
        code = 0
        try:
            os.close(ready_r)
            _detach(ready_w)
            held = store.try_acquire(name, profile, list(argv), need=need, gpu_index=gpu_index, gpu_need=gpu_need,
                                     owner=owner.pid, owner_start=owner.start_time)
            os.write(ready_w, b"1" if held is not None else b"0")
            os.close(ready_w)
            if held is not None:
                held.unlink_after = name.startswith("job-")
                try:
                    keep(held, owner, check_pid)
                finally:
                    held.release()
        except BaseException:  # nothing of the keeper's may reach check's caller: it has no terminal
            code = 1
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        said = os.read(ready_r, 1)
    finally:
        os.close(ready_r)
    return pid if said == b"1" else None


def _detach(keep_fd: int) -> None:
    """Its own session, stdio on /dev/null, no descriptor of the caller's but *keep_fd*."""
    os.setsid()
    os.closerange(3, keep_fd)
    os.closerange(keep_fd + 1, 1 << 16)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def keep(held: HeldLock, owner: Identity, check_pid: int, lease: float = GRANT_LEASE) -> None:
    """Bind the grant to the owner's next process, then hold it for that job's lifetime."""
    job = bind(owner, check_pid, lease)
    if job is None:
        return
    held.update_holder(job_pid=job.pid, job_start_time=job.start_time)
    lock_path = lock_file_path(held.store.directory, held.name)
    need = held.holder.need if held.holder is not None else 0
    try:
        ended: int | None = os.pidfd_open(job.pid)  # readable once the job exits: its end wakes the keeper at once
    except (OSError, AttributeError):
        ended = None
    pause = WATCH_POLL
    try:
        while _same(job):
            if held.fd >= 0 and waiting_on(lock_path) & _tree(job.pid):
                held.step_aside()  # the job takes the lock itself: the record now names its holder
            if need and held.holder is not None and held.holder.used < need:
                used = min(need, _rss(_tree(job.pid)))
                if used > held.holder.used:
                    held.update_holder(used=used)
            if ended is not None:
                select.select([ended], [], [], pause)
            else:
                time.sleep(pause)
            # A job takes its lock or its memory mostly at its start: look often then, rarely later.
            pause = min(pause * 1.5, WATCH_CAP)
    finally:
        if ended is not None:
            os.close(ended)


def bind(owner: Identity, check_pid: int, lease: float = GRANT_LEASE) -> Identity | None:
    """The owner's first new process after check exits that is not itself a safegate check (GNU parallel asks
    its --limit command again between a pass and the job: a second question, not the job), or the owner itself
    once it has exec'd something else; None when the owner is gone or the lease passes first."""
    skipped = children(owner.pid) | {check_pid}
    program = cmdline(owner.pid)
    parallel = _is_parallel(program)
    deadline = time.monotonic() + lease
    while time.monotonic() < deadline:
        if not _same(owner):
            return None
        if os.getppid() != check_pid:  # check has exited: what the owner starts now is the job
            for who in sorted(filter(None, map(identity, children(owner.pid) - skipped)),
                              key=lambda w: (w.start, w.pid)):
                argv = _exec_line(who, program)
                if argv is None:
                    continue  # forked, not yet exec'd: look again
                if _is_check(argv) or (parallel and not _parallel_job(who.pid)):
                    skipped.add(who.pid)
                    continue
                return who
            now = cmdline(owner.pid)
            if now and now != program and _same(owner):
                return identity(owner.pid)
        time.sleep(BIND_POLL)
    return None


# A child still running the owner's program is forked and not yet exec'd; after this long it is the job as is
# (a shell's subshell, a Python multiprocessing worker).
EXEC_WAIT = 0.05


def _exec_line(who: Identity, program: bytes) -> bytes | None:
    """*who*'s command line once it has exec'd (or run its owner's program past EXEC_WAIT), None before."""
    argv = cmdline(who.pid)
    if not argv:
        return None  # ended already (a zombie's command line is empty): never the job
    if argv != program:
        return argv
    return argv if age(who) > EXEC_WAIT else None


def _is_parallel(argv: bytes) -> bool:
    return any(a.rsplit(b"/", 1)[-1] == b"parallel" for a in argv.split(b"\0")[:2])


def _parallel_job(pid: int) -> bool:
    """GNU parallel starts helpers of its own (a shell testing function export, sleepers, --limit probes)
    besides its jobs; a job is the leader of a process group of its own (parallel's open3_setpgrp) and carries
    PARALLEL_SEQ in its environment."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read(1 << 20)
        leader = int(stat[stat.rfind(b")") + 2:].split()[2]) == pid
    except (OSError, ValueError, IndexError):
        return False
    return leader and b"\0PARALLEL_SEQ=" in b"\0" + environ


def _is_check(argv: bytes) -> bool:
    """A command line that asks safegate, not a job: `safegate check ...`, or the GNU parallel adapter."""
    args = argv.split(b"\0")
    names = [a.rsplit(b"/", 1)[-1] for a in args[:4]]
    safegate = any(n == b"safegate" or a.endswith(b"safegate/__main__.py") for n, a in zip(names, args, strict=False))
    return any(n.startswith(b"safegate-parallel-limit") for n in names) or (b"check" in args and safegate)


def owner_idle(holder: HolderRecord | None, family: Collection[int]) -> bool:
    """For a grant not yet bound whose owner is among *family* (the caller and its ancestors): the owner has
    started no process since the grant but the caller's own line (policy.encloses). Its next one is the job the
    grant waits for: once there is one, a caller beside it is not inside the grant, it is a second job."""
    if holder is None or holder.owner is None or holder.job_pid is not None or holder.owner not in family:
        return False
    keeper = identity(holder.pid)
    if keeper is None:
        return False
    return not [pid for pid in children(holder.owner) - set(family)
                if (who := identity(pid)) is not None and who.start >= keeper.start]


def _same(who: Identity) -> bool:
    now = identity(who.pid)
    return now is not None and now.start == who.start


def _tree(pid: int) -> set[int]:
    found, todo = {pid}, [pid]
    while todo:
        for child in children(todo.pop()) - found:
            found.add(child)
            todo.append(child)
    return found


def _rss(pids: set[int]) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/{pid}/statm", "rb") as fh:
            total += int(fh.read().split()[1]) * page
    return total
