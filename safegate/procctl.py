"""Linux process controls safegate needs as a supervisor: subreaper, parent-death signal, I/O priority."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable, Iterable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# The signals safegate forwards to the job: every catchable one but SIGCHLD, the job-control ones (TSTP, TTIN,
# TTOU, CONT), SIGPIPE and SIGXFSZ (Python ignores those two), SIGURG, and the synchronous faults (SEGV, BUS,
# ILL, FPE, ABRT, TRAP, SYS), which mean safegate itself failed and must end it, as tini leaves them.
FORWARDED: tuple[int, ...] = (
    *(getattr(signal, name) for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM",
                                          "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGSTKFLT", "SIGXCPU",
                                          "SIGWINCH") if hasattr(signal, name)),
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)

# Job control: stopping (Ctrl-Z, a background read or write) and continuing. safegate passes them through: the
# job stops, then safegate stops, so the shell sees its job stopped; SIGCONT continues both.
JOB_CONTROL: tuple[int, ...] = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCONT)

_libc: ctypes.CDLL | None = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - a Linux without a loadable libc is not one we run on
        _libc = None


def _prctl(option: int, value: int) -> bool:
    if _libc is None:
        return False
    return int(_libc.prctl(option, value, 0, 0, 0)) == 0


def become_subreaper() -> bool:
    """Orphaned descendants (double-forked, setsid) are re-parented to us, so we can find and reap them."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def stop_self() -> None:
    """Stop as a job-control stop would (SIGSTOP cannot be caught): the shell sees us stopped until SIGCONT."""
    os.kill(os.getpid(), signal.SIGSTOP)


def child_setup(parent: int, nice: int | None, ignored: tuple[int, ...] = (), mask: Iterable[int] | None = None,
                claim_terminal: Callable[[], None] | None = None, enter_cgroup: Callable[[], None] | None = None
                ) -> None:
    """Runs in the job between fork and exec (keep it async-signal-safe in spirit: no locks, no imports).

    *ignored*: signals the caller ignored; they stay ignored across exec, as in the caller's own children.
    *mask*: the caller's signal mask, which the job inherits as it would without safegate (safegate itself
    unblocks what it forwards). *claim_terminal*: takes the terminal's foreground for the job's new group.
    *enter_cgroup*: moves the child into the job's cgroup, before it can start anything."""
    if enter_cgroup is not None:
        enter_cgroup()
    # safegate's own Python handlers were inherited by the fork: until exec they would swallow the
    # parent-death SIGTERM (or the one below) instead of ending this child.
    for signum in (*FORWARDED, *JOB_CONTROL, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
    os.setpgid(0, 0)
    if claim_terminal is not None:
        claim_terminal()
    # If safegate dies, the job must not run on unwatched: SIGTERM, or SIGKILL for a job told to ignore SIGTERM.
    death = signal.SIGKILL if signal.SIGTERM in ignored else signal.SIGTERM
    _prctl(PR_SET_PDEATHSIG, death)
    if os.getppid() != parent:  # safegate died before prctl took effect
        os.kill(os.getpid(), death)
    if nice:
        os.nice(nice)
        _set_ioprio(idle=nice >= 19)
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


# ioprio_set(IOPRIO_WHO_PROCESS, 0, class << 13 | level): best-effort level 7, or idle.
_IOPRIO_CLASS_BE = 2
_IOPRIO_CLASS_IDLE = 3
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "i686": 289, "armv7l": 314, "ppc64le": 273, "riscv64": 30}


def _set_ioprio(*, idle: bool) -> None:
    number = _SYS_IOPRIO_SET.get(os.uname().machine)
    if _libc is None or number is None:
        return
    value = (_IOPRIO_CLASS_IDLE << 13) if idle else (_IOPRIO_CLASS_BE << 13 | 7)
    _libc.syscall(number, 1, 0, value)
