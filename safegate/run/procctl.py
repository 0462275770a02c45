"""Linux process controls safegate needs as a supervisor: subreaper, parent-death signal, I/O priority, the
kernel's OOM scores (oom_score_adj) of the job and of safegate itself."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import signal
import sys
from collections.abc import Callable, Iterable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# The signals safegate forwards to the job: every catchable one but SIGCHLD, the job-control ones (TSTP, TTIN,
# TTOU, CONT), SIGPIPE and SIGXFSZ (Python ignores those two), SIGURG, and the synchronous faults (FAULTS).
FORWARDED: tuple[int, ...] = (
    *(getattr(signal, name) for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM",
                                          "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGSTKFLT", "SIGXCPU",
                                          "SIGWINCH") if hasattr(signal, name)),
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1),
)

# The synchronous faults. Sent by another process (kill -ILL, as dumb-init's and tini's tests do) they are
# forwarded like the others; the kernel's own, from a fault in safegate, must end it. A Python handler cannot tell
# the two apart (and would return into the faulting instruction), so these are never handled: they stay blocked,
# and the inbox takes them with sigtimedwait, whose siginfo names the sender. A real fault is not held up by the
# mask: the kernel forces a synchronous fault through (force_sig_fault resets a blocked one to SIG_DFL and
# unblocks it), so a real SIGSEGV in safegate still ends it with a core dump.
FAULTS: tuple[int, ...] = (signal.SIGILL, signal.SIGTRAP, signal.SIGABRT, signal.SIGBUS, signal.SIGFPE,
                           signal.SIGSEGV, signal.SIGSYS)

# Job control: stopping (Ctrl-Z, a background read or write) and continuing. safegate passes them through: the
# job stops, then safegate stops, so the shell sees its job stopped; SIGCONT continues both (terminal.JobControl).
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


def die_of(signum: int) -> None:
    """End safegate by *signum*'s default action (a fault of its own that reached the inbox: raised by itself, or
    one the kernel does not force, such as a deferred machine-check SIGBUS), as it would have without the mask."""
    signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
    os.kill(os.getpid(), signum)
    os.abort()  # pragma: no cover - not reached: the signal's default action ends us first


def stop_self() -> None:
    """Stop as a job-control stop would (SIGSTOP cannot be caught): the shell sees us stopped until SIGCONT."""
    os.kill(os.getpid(), signal.SIGSTOP)


def child_setup(parent: int, nice: int | None, ignored: tuple[int, ...] = (), mask: Iterable[int] | None = None,
                claim_terminal: Callable[[], None] | None = None, enter_cgroup: Callable[[], None] | None = None,
                oom: OomScore | None = None) -> None:
    """Runs in the job between fork and exec (keep it async-signal-safe in spirit: no locks, no imports).

    *ignored*: signals the caller ignored; they stay ignored across exec, as in the caller's own children.
    *mask*: the caller's signal mask, which the job inherits as it would without safegate (safegate's own mask,
    inherited by the fork, blocks what its inbox takes). *claim_terminal*: takes the terminal's foreground for
    the job's new group. *enter_cgroup*: moves the child into the job's cgroup, before it can start anything.
    *oom*: the job's oom_score_adj, set first, so no moment of the job runs unraised (its children inherit it)."""
    if oom is not None:
        oom.raise_in_child()
    if enter_cgroup is not None:
        enter_cgroup()
    # safegate's own Python handlers were inherited by the fork: until exec they would swallow the
    # parent-death SIGTERM (or the one below) instead of ending this child.
    for signum in (*FORWARDED, *JOB_CONTROL, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_IGN if signum in ignored else signal.SIG_DFL)
    os.setpgid(0, 0)
    if claim_terminal is not None:
        claim_terminal()
    # If safegate dies, the job must not run on unwatched: SIGTERM, or SIGKILL for a job told to ignore SIGTERM
    # or starting with it blocked (it would wait there, pending). Sent below while safegate's mask still blocks
    # SIGTERM here, it is delivered when the caller's mask is set.
    death = signal.SIGKILL if signal.SIGTERM in ignored or signal.SIGTERM in (mask or ()) else signal.SIGTERM
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


# --- the kernel's OOM choice -------------------------------------------------------------------------------

# The supervisor lowers its own oom_score_adj this far below the caller's where the kernel lets it (with
# CAP_SYS_RESOURCE, or down to the lowest score a privileged ancestor set): the kernel and earlyoom then take the
# job, and the desktop, before its watcher. Never to -1000: that would make safegate unkillable, and a safegate
# that hangs must stay killable by the kernel like any process.
SUPERVISOR_BELOW = 500
SUPERVISOR_FLOOR = -999


def oom_score_adj(pid: int | str = "self") -> int | None:
    """A process's oom_score_adj; None when it cannot be read (gone, no /proc)."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "rb") as fh:
            return int(fh.read(16))
    except (OSError, ValueError):
        return None


def set_oom_score_adj(value: int, pid: int | str = "self") -> None:
    """Raises OSError: EACCES when lowering it is not allowed (no CAP_SYS_RESOURCE)."""
    fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(value).encode())
    finally:
        os.close(fd)


def supervisor_score(caller: int) -> int:
    """What the supervisor lowers its own oom_score_adj to: SUPERVISOR_BELOW under the caller's, never below
    SUPERVISOR_FLOOR (a caller already at -1000 or -999 is left as it is: never raised)."""
    return min(caller, max(caller - SUPERVISOR_BELOW, SUPERVISOR_FLOOR))


class OomScore:
    """The job's oom_score_adj: the setting, or the caller's own when that is higher (never lowered). The child
    writes it before exec; what failed there comes back through a page shared across the fork (the child cannot
    emit events, and the job must run anyway)."""

    def __init__(self, setting: int, caller: int) -> None:
        self.caller = caller
        self.job = max(setting, caller)
        self._failed = mmap.mmap(-1, 4)  # the child's errno, 0: it took

    def raise_in_child(self) -> None:
        code = 0
        try:
            set_oom_score_adj(self.job)
        except OSError as exc:
            code = exc.errno or errno.EIO
        self._failed[:4] = code.to_bytes(4, "little")

    def failure(self) -> str | None:
        """Why the last child could not set it (its strerror), or None."""
        code = int.from_bytes(self._failed[:4], "little")
        return os.strerror(code) if code else None

    def lower_supervisor(self) -> int:
        """Lower this process's own oom_score_adj (supervisor_score) where the kernel allows it, quietly keeping
        the caller's where it does not; the score it has now. Called once the job is started, so the job did not
        inherit the lowered score (it sets its own anyway)."""
        target = supervisor_score(self.caller)
        if target < self.caller:
            try:
                set_oom_score_adj(target)
            except OSError:
                return self.caller  # EACCES without CAP_SYS_RESOURCE: the caller's it stays
            return target
        return self.caller
