"""--notify CMD: run a command on a breach, a pause and the end of a job, with the facts in its environment.

A hanging or failing notifier must never delay the job or the lock, and its processes must not count as the
job's: safegate is the job's subreaper and waits until it has no child left. So the commands are started by a
small runner process that is not safegate's child (double-forked before the job starts, re-parented away). It
reads one request per line from a pipe, runs each through `sh -c` in a session of its own with stdin from
/dev/null, kills it after NOTIFY_TIMEOUT, and answers one line per request ("ok", or what failed, which safegate
turns into a warning). When safegate's end of the pipe closes, the runner finishes what it has and exits; the end
notifier's failure is told only if it comes within CLOSE_WAIT, which is all safegate waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
from collections.abc import Callable, Mapping

from safegate.run.outcome import Event
from safegate.units import printable

NOTIFY_EVERY = 60.0  # seconds: at most one run per event kind (breach, paused) in this time; the end always
NOTIFY_TIMEOUT = 30.0  # seconds a notifier may run before its process group is killed
CLOSE_WAIT = 1.0  # seconds safegate waits, after the job, for the end notifier's result before it exits
KINDS = {"breach": "breach", "paused": "paused", "summary": "end"}


class Notifier:
    def __init__(self, command: str, on_warning: Callable[[str], None], *, clock: Callable[[], float]) -> None:
        self.command = command
        self.on_warning = on_warning
        self.clock = clock
        self.facts: dict[str, str] = {}
        self._last: dict[str, float] = {}
        self._sent = self._answered = 0
        self._pending = ""
        self._to_runner, self._from_runner = _start_runner()

    def notify(self, event: Event) -> None:
        self._read_failures()
        data = event.data
        if event.kind == "admitted":
            self.facts.update(SAFEGATE_PROFILE=str(data.get("profile", "")), SAFEGATE_LOCK=str(data.get("lock", "")),
                              SAFEGATE_PID=str(data.get("pid", "")))
            return
        kind = KINDS.get(event.kind)
        if kind is None:
            return
        now = self.clock()
        if kind != "end" and now - self._last.get(kind, float("-inf")) < NOTIFY_EVERY:
            return
        self._last[kind] = now
        env = {**self.facts, "SAFEGATE_EVENT": kind, "SAFEGATE_MESSAGE": event.message,
               "SAFEGATE_REASON": str(data.get("reason", ""))}
        if kind == "end":
            env.update(SAFEGATE_EXIT_CODE=str(data.get("exit_code", "")),
                       SAFEGATE_PEAK_MEMORY=str(data.get("peak_job_memory", "")))
        self._send({"command": self.command, "env": env})

    def _send(self, request: Mapping[str, object]) -> None:
        try:
            os.write(self._to_runner, (json.dumps(request) + "\n").encode())
            self._sent += 1
        except OSError as exc:  # the runner is gone (killed): say so once, the job goes on
            self.on_warning(f"--notify: cannot reach the notifier runner: {exc.strerror}")

    def _read_failures(self) -> None:
        """The runner's answers so far, one line per request: "ok", or what went wrong (a warning)."""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(self._from_runner, 65536):
                *lines, self._pending = (self._pending + chunk.decode(errors="replace")).split("\n")
                for line in lines:
                    self._answered += 1
                    if line != "ok":
                        self.on_warning(f"--notify: {line}")

    def close(self) -> None:
        """Wait a moment (CLOSE_WAIT at most) for the last answers, so a failed end notifier is still told."""
        deadline = self.clock() + CLOSE_WAIT
        while self._answered < self._sent and self.clock() < deadline:
            select.select([self._from_runner], [], [], max(0.0, deadline - self.clock()))
            self._read_failures()
        for fd in (self._to_runner, self._from_runner):
            with contextlib.suppress(OSError):
                os.close(fd)


def _start_runner() -> tuple[int, int]:
    """The runner, double-forked so that it is nobody's child here; the ends of its two pipes that we keep."""
    req_r, req_w = os.pipe2(os.O_CLOEXEC)
    res_r, res_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the intermediate and the runner run in children
        try:
            os.close(req_w)
            os.close(res_r)
            if os.fork() == 0:
                os.setsid()
                _runner(req_r, res_w)
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(res_w)
    os.waitpid(pid, 0)  # the intermediate exits at once
    os.set_blocking(res_r, False)
    return req_w, res_r


def _runner(requests: int, results: int) -> None:  # pragma: no cover - runs in the double-forked child
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the job, not for the message about it
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # never keep the caller's pipes open (cron mails, $(...) returns, only at their EOF)
        os.dup2(devnull, fd)
    with os.fdopen(requests, "rb") as feed:
        for line in feed:
            request = json.loads(line)
            try:
                proc = subprocess.Popen(["sh", "-c", request["command"]], env={**os.environ, **request["env"]},
                                        stdin=devnull, stdout=devnull, stderr=devnull, start_new_session=True)
            except OSError as exc:
                _tell(results, f"cannot run {request['command']!r}: {exc.strerror}")
                continue
            try:
                code = proc.wait(timeout=NOTIFY_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _tell(results, f"{request['command']!r} still ran after {NOTIFY_TIMEOUT:g} s; killed")
                continue
            _tell(results, f"{request['command']!r} exited {code}" if code else "ok")


def _tell(fd: int, text: str) -> None:  # pragma: no cover - runs in the double-forked child
    with contextlib.suppress(OSError):  # safegate has ended: nobody to tell
        os.write(fd, (printable(text) + "\n").encode())
