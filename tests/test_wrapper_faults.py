"""safegate exec's own outputs failing under it (issue 12, item 13): a full disk under --log never fails the job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from support import HELPERS, PY, TIMEOUT, Procs, alive, job_pid, pids_with, stderr_of, wait_until

from safegate.exitcodes import ExitCode


def _private_mount() -> list[str]:
    """A mount namespace of our own, so a tiny tmpfs can be mounted without touching the machine's mounts."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    prefix = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")  # a user namespace may mount a tmpfs of its own
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=TIMEOUT)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    return prefix


def _exec_on_full_disk(config: Path, env: dict[str, str], disk: Path, size: str, *job: str,
                       fill: bool) -> subprocess.CompletedProcess[str]:
    disk.mkdir()
    # A full disk: a one-page tmpfs, filled to the last byte before the job starts (or left with one page).
    script = (f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99; '
              + ('head -c 1048576 /dev/zero > "$1/filler" 2>/dev/null; ' if fill else "")
              + 'shift; exec "$@"')
    cmd = [*_private_mount(), "sh", "-c", script, "sh", str(disk),
           PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--log", str(disk / "night.log"),
           "--", *job]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("job", [
    ["sh", "-c", "exit 3"],
    # A job that ignores SIGTERM: a failed event write must not leave it running unwatched, nor kill it.
    ["sh", "-c", "trap '' TERM; sleep 0.3; exit 3"],
], ids=["plain", "ignores-term"])
def test_a_full_disk_under_the_log_keeps_the_jobs_status(config: Path, env: dict[str, str], tmp_path: Path,
                                                         job: list[str]) -> None:
    result = _exec_on_full_disk(config, env, tmp_path / "disk", "4k", *job, fill=True)
    assert result.returncode != 99, result.stderr
    assert result.returncode == 3, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "cannot write --log" in line]
    assert len(warnings) == 1, result.stderr  # said once, not per event
    assert "No space left on device" in warnings[0]
    assert "job exited 3" in result.stderr


def test_the_log_on_a_full_disk_holds_only_whole_lines(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    copy = tmp_path / "copy.log"
    # One page of disk: the first event, with the job's long command line, fits; a later one only in part.
    long_arg = "x" * 3500  # the admitted line is then about 4.0 KiB (its limits, max_temp and max_gpu_mem too)
    script = ('mount -t tmpfs -o size=4k tmpfs "$1" || exit 99; d=$1; c=$2; shift 2; '
              '"$@"; rc=$?; cp "$d/night.log" "$c"; exit $rc')
    cmd = [*_private_mount(), "sh", "-c", script, "sh", str(disk), str(copy),
           PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--log", str(disk / "night.log"),
           "--", "sh", "-c", "exit 4", "sh", long_arg]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 4, result.stderr
    assert "cannot write --log" in result.stderr  # the disk did run full
    text = copy.read_text()
    assert text.endswith("\n")
    events = [json.loads(line)["event"] for line in text.splitlines()]  # every line whole JSON
    assert events[0] == "admitted" and "summary" not in events


# --- item 4: safegate's own SIGTERM reaches each process once ---------------------------------------------------

COUNTER = str(HELPERS / "term_counter.py")


def test_leftovers_get_one_sigterm_each(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    # The main process ends and leaves two processes in the job's group: cleanup stops them with one SIGTERM each.
    outs = [tmp_path / f"left{i}" for i in range(2)]
    ready = " && ".join(f'[ -s "{out}" ]' for out in outs)
    script = (f'{PY} {COUNTER} "$1" & {PY} {COUNTER} "$2" & '
              f'until {ready}; do sleep 0.01; done; exit 0')
    for _ in range(4):  # the double delivery was a race: seen in 6 of 8 runs
        for out in outs:
            out.unlink(missing_ok=True)
        result = subprocess.run([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--",
                                 "sh", "-c", script, "sh", *map(str, outs)],
                                env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr
        assert [out.read_text() for out in outs] == ["1", "1"], result.stderr


def test_a_breach_sends_one_sigterm(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    # A small process of the job, then a big one that breaches --max-mem: each gets one SIGTERM, also when the
    # shell that started them ends in the grace period (the cleanup of leftovers must not ask again).
    small, big = tmp_path / "small", tmp_path / "big"
    script = (f'{PY} {COUNTER} "$1" & until [ -s "$1" ]; do sleep 0.01; done; '
              f'{PY} {COUNTER} "$2" 150 & wait')
    for _ in range(4):
        for out in (small, big):
            out.unlink(missing_ok=True)
        result = subprocess.run([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                                 "--max-mem", "100M", "--", "sh", "-c", script, "sh", str(small), str(big)],
                                env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert result.returncode == ExitCode.KILLED_MEMORY, result.stderr
        assert (small.read_text(), big.read_text()) == ("1", "1"), result.stderr


LOGGER = str(HELPERS / "sig_logger.py")


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_a_running_leftover_gets_sigterm_and_no_sigcont(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    # A program that logs its signals, left running by the main process: a SIGCONT sent with the SIGTERM would show
    # in its log (first, even: with both pending, the kernel runs SIGCONT's handler first). It does not end on
    # SIGTERM, so what it logs is all it got until the SIGKILL after --grace.
    log = tmp_path / "log"
    script = f'{PY} {LOGGER} "$1" TERM,CONT & until [ -s "$1" ]; do sleep 0.01; done; exit 3'
    result = subprocess.run([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--grace", "1s",
                             "--", "sh", "-c", script, "sh", str(log)],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 3, result.stderr
    assert "stopping 1 leftover process(es)" in result.stderr and "sending SIGKILL" in result.stderr
    assert _lines(log) == ["ready", "TERM"], result.stderr


def test_a_stopped_leftover_is_continued_to_act_on_its_sigterm(config: Path, env: dict[str, str],
                                                              tmp_path: Path) -> None:
    # Stopped, it could not act on SIGTERM until SIGKILL at the end of --grace: it gets SIGCONT, logs the SIGTERM
    # and ends by itself.
    log = tmp_path / "log"
    script = (f'{PY} {LOGGER} "$1" TERM stop exit=TERM & pid=$!; '
              'until [ "$(cut -d " " -f 3 /proc/$pid/stat)" = T ]; do sleep 0.01; done; exit 3')
    result = subprocess.run([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--grace", "60s",
                             "--", "sh", "-c", script, "sh", str(log)],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 3, result.stderr
    assert "stopping 1 leftover process(es)" in result.stderr and "SIGKILL" not in result.stderr
    assert _lines(log) == ["ready", "TERM"], result.stderr


# --- item 5: a signal blocked in the inherited mask ----------------------------------------------------------

BLOCKED_JOB = """
import sys, time
def status(key):
    return int([l for l in open('/proc/self/status') if l.startswith(key)][0].split()[1], 16)
term = 1 << 14
print('blocked' if status('SigBlk:') & term else 'unblocked', flush=True)
while not (status('SigPnd:') | status('ShdPnd:')) & term:  # blocked here too, so it waits pending
    time.sleep(0.01)
"""


def test_a_signal_blocked_in_the_callers_mask_is_still_forwarded(config: Path, env: dict[str, str],
                                                                 lock_dir: Path, procs: Procs) -> None:
    # As tini's tests do: the caller blocks SIGTERM and execs the wrapper.
    launcher = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    gate = procs.spawn([PY, "-c", launcher, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "-q",
                        "--", PY, "-c", BLOCKED_JOB], env=env, stdout=subprocess.PIPE)
    assert gate.stdout is not None
    assert gate.stdout.readline() == b"blocked\n"  # the job inherits the caller's mask, as it would directly
    os.kill(gate.pid, signal.SIGTERM)
    assert gate.wait(timeout=TIMEOUT) == 0  # safegate got it and forwarded it: pending in the job, which saw it


SIGBLK_OF_JOB = "print(int([l for l in open('/proc/self/status') if l.startswith('SigBlk')][0].split()[1], 16))"


def test_the_job_starts_with_exactly_the_callers_mask(config: Path, env: dict[str, str]) -> None:
    # safegate blocks what it takes (the forwarded signals and the faults); the job must not inherit that.
    launcher = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGSEGV}); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    result = subprocess.run([PY, "-c", launcher, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                             "-q", "--", PY, "-c", SIGBLK_OF_JOB], env=env, capture_output=True, text=True,
                            timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 1 << (signal.SIGUSR1 - 1) | 1 << (signal.SIGSEGV - 1), result.stdout


def test_a_job_with_sigterm_blocked_does_not_outlive_a_killed_safegate(config: Path, env: dict[str, str],
                                                                      lock_dir: Path, procs: Procs) -> None:
    # The parent-death signal would wait, pending, in a job that inherited SIGTERM blocked: it is SIGKILL there.
    launcher = ("import os, signal, sys; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    gate = procs.spawn([PY, "-c", launcher, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "-q",
                        "--", "sleep", "600"], env=env)
    job = wait_until(lambda: job_pid(lock_dir), what="the job")
    os.kill(gate.pid, signal.SIGKILL)
    gate.wait(timeout=TIMEOUT)
    wait_until(lambda: not alive(job), what="the job to die with safegate")


# --- issue 23: the synchronous faults, sent by another process ------------------------------------------------

FAULTS = ["ILL", "TRAP", "ABRT", "BUS", "FPE", "SEGV", "SYS"]


def test_faults_sent_by_another_process_are_forwarded(config: Path, env: dict[str, str], tmp_path: Path,
                                                      procs: Procs) -> None:
    # kill -ILL <safegate>, as dumb-init's and tini's tests send it: the job gets it, safegate goes on watching.
    log = tmp_path / "log"
    gate = procs.spawn([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--", PY, LOGGER,
                        str(log), ",".join([*FAULTS, "TERM"]), "exit=TERM"], env=env, stderr=subprocess.PIPE)
    wait_until(lambda: _lines(log) == ["ready"], what="the job's handlers")
    for n, name in enumerate(FAULTS, start=2):
        os.kill(gate.pid, getattr(signal, f"SIG{name}"))
        wait_until(lambda n=n: len(_lines(log)) >= n or gate.poll() is not None,
                   what=f"the job to log SIG{name}")
        assert gate.poll() is None, f"safegate ended on SIG{name}: {gate.returncode}"
    assert _lines(log) == ["ready", *FAULTS]
    os.kill(gate.pid, signal.SIGTERM)
    assert gate.wait(timeout=TIMEOUT) == 0  # the job's own exit, reported
    assert gate.stderr is not None
    err = gate.stderr.read().decode()
    assert all(f"forwarded SIG{name} to the job" in err for name in FAULTS), err


OWN_FAULT = """
import ctypes, resource, signal, sys
from safegate.run.inbox import SignalInbox
from safegate.run.procctl import FAULTS
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
inbox = SignalInbox()
inbox.open([signal.SIGCHLD], FAULTS)
if sys.argv[1] == "segv":
    ctypes.string_at(0)  # a real fault, with SIGSEGV blocked
else:
    signal.raise_signal(signal.SIGABRT)  # raised by safegate itself, as a C library may
    inbox.wait(60)
print("survived", inbox.pop())
"""


@pytest.mark.parametrize("how", ["segv", "raise"])
def test_a_fault_of_safegates_own_still_ends_it(how: str) -> None:
    # With the faults blocked: the kernel forces a real SIGSEGV through the mask (with its default action), and
    # one safegate raised itself is not passed on, but ends it as it would have.
    result = subprocess.run([PY, "-c", OWN_FAULT, how], capture_output=True, text=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == -(signal.SIGSEGV if how == "segv" else signal.SIGABRT), result.stderr
    assert "survived" not in result.stdout


FOREIGN_THREAD = """
import os, signal, threading, time
from safegate.run.inbox import SignalInbox
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()  # as a C library's, before the inbox
inbox = SignalInbox()
inbox.open([signal.SIGTERM, signal.SIGCHLD])
os.kill(os.getpid(), signal.SIGTERM)  # the main thread blocks it now: the kernel hands it to the other thread
deadline = time.monotonic() + 60
while not inbox.pending and time.monotonic() < deadline:
    inbox.wait(0.05)
print("got", inbox.pop())
"""


def test_a_signal_taken_by_a_thread_safegate_did_not_start_is_still_queued() -> None:
    # Blocking is per thread: one started before the inbox opened (NVML's, say) may be the one the kernel hands
    # a SIGTERM to. It must be queued there (the handler), not end safegate by its default action.
    result = subprocess.run([PY, "-c", FOREIGN_THREAD], capture_output=True, text=True, timeout=TIMEOUT,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and result.stdout.split() == ["got", str(int(signal.SIGTERM))], result


# --- item 11: fork-and-exit chains --------------------------------------------------------------------------

def _kill_marked(marker: Path) -> None:
    """Cleanup: SIGKILL every process carrying *marker* until none is left (a chain forks on while it runs)."""
    wait_until(lambda: not [os.kill(pid, signal.SIGKILL) for pid in pids_with(str(marker))], what="no chain left")


def _chain_pids(marker: Path) -> list[int]:
    return [int(line) for line in marker.read_text().split()] if marker.exists() else []


CHAIN_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    FILE *out = fopen(argv[1], "a"); fprintf(out, "%d\n", getpid()); fclose(out);
    for (;;) { if (fork()) _exit(0); setsid(); }
}
"""


def _chain_command(kind: str, marker: Path, tmp_path: Path) -> str:
    if kind != "c":
        return f'{PY} {HELPERS / "fork_chain.py"} "$1" {kind}'
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the tight C chain")
    source, binary = tmp_path / "chain.c", tmp_path / "chain-bin"
    source.write_text(CHAIN_C)
    subprocess.run([cc, "-O2", "-o", str(binary), str(source)], check=True, timeout=TIMEOUT)
    return f'{binary} "$1"'  # the marker in its command line, for the cleanup's search


@pytest.mark.parametrize("kind", ["0.05", "0", "c"], ids=["paced", "tight", "tight-c"])
def _private_pids() -> list[str]:
    """A pid namespace of our own, with its own /proc: when its first process ends, the kernel kills all the
    rest, so a chain that escapes the safegate under test cannot run on on the machine (as one once did here,
    under the old code, for an hour)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    prefix = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=TIMEOUT)
    if probe.returncode != 0:
        pytest.skip(f"no private pid namespace here: {probe.stderr.decode().strip()}")
    return prefix


LIVE_MARKED = ("import os, sys\n"
               "def live(p):\n"
               "    try:\n"
               "        return open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z' and \\\n"
               "            sys.argv[1].encode() in open(f'/proc/{p}/cmdline', 'rb').read()\n"
               "    except OSError:\n"
               "        return False\n"
               "others = {1, os.getpid()}  # the namespace's first process (sh) and this count\n"
               "print('left', sum(live(p) for p in os.listdir('/proc') if p.isdigit() and int(p) not in others))\n")


@pytest.mark.parametrize("kind", ["0.05", "0", "c"], ids=["paced", "tight", "tight-c"])
def test_a_fork_and_exit_chain_left_behind_is_stopped(config: Path, env: dict[str, str], tmp_path: Path,
                                                      kind: str) -> None:
    marker = tmp_path / "chain"
    chain = f'{_chain_command(kind, marker, tmp_path)} & until [ -s "$1" ]; do sleep 0.01; done; exit 3'
    # The namespace's first process runs safegate, then counts what of the chain still lives in the namespace
    # (the chain's orphans would be re-parented to it once safegate is gone), then ends, taking any rest along.
    script = ('"$@"; rc=$?; ' + f'{PY} -c "$LIVE_MARKED" {marker} >&2; exit $rc')
    gate = subprocess.Popen([*_private_pids(), "sh", "-c", script, "sh", PY, "-m", "safegate", "exec", "--config",
                             str(config), "--mem", "0", "--grace", "1s", "--", "sh", "-c", chain, "sh", str(marker)],
                            env=env | {"LIVE_MARKED": LIVE_MARKED}, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = stderr_of(gate)
    assert gate.returncode == 3, err
    assert "stopping" in err and "leftover" in err
    assert _chain_pids(marker)
    assert "left 0" in err  # nothing of the chain outlived safegate


# --- item 12: a process whose main thread exited ------------------------------------------------------------

THREADED = str(HELPERS / "main_thread_exits.py")


def test_memory_of_a_process_whose_main_thread_exited_counts(config: Path, env: dict[str, str],
                                                             tmp_path: Path) -> None:
    result = subprocess.run([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0",
                             "--max-mem", "200M", "--", PY, THREADED, "600", "600", str(tmp_path / "ready")],
                            env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert result.returncode == ExitCode.KILLED_MEMORY, result.stderr
    assert not (tmp_path / "ready").exists()  # stopped on the way, not after reaching 600 MB


def test_a_leftover_whose_main_thread_exited_is_stopped(config: Path, env: dict[str, str], tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = f'{PY} {THREADED} 20 600 "$1" & until [ -s "$1" ]; do sleep 0.01; done; exit 3'
    gate = subprocess.Popen([PY, "-m", "safegate", "exec", "--config", str(config), "--mem", "0", "--grace", "1s",
                             "--", "sh", "-c", script, "sh", str(ready)], env=env, stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        err = stderr_of(gate)
    finally:
        _kill_marked(ready)
    assert gate.returncode == 3, err
    assert "stopping 1 leftover process(es)" in err
