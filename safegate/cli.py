"""The command line: parse, call the core, render. Every failure becomes its exit code in main()."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, TypeVar

import typer

from safegate import __version__
from safegate.config import DEFAULT_PROFILE, load_config
from safegate.errors import SafegateError, SlurmError, UsageError, ValueParseError
from safegate.exitcodes import ExitCode, table_plain
from safegate.gate import Overrides, clean_and_evaluate, evaluate, gpu_backend, resolve, wait_until_clear
from safegate.policy import Verdict
from safegate.render import (
    blocking_summary,
    check_line,
    render_lock,
    status_json,
    status_text,
    verdict_json,
    verdict_text,
)
from safegate.units import (
    Size,
    parse_duration,
    parse_gpu_option,
    parse_nice,
    parse_on_hot,
    parse_signal,
    parse_size,
    parse_temp,
    validate_lock_name,
)

T = TypeVar("T")

# "\b" keeps click from re-wrapping the table into one paragraph.
COMPLETE_VAR = "_SAFEGATE_COMPLETE"
EXIT_CODES_EPILOG = "\b\nExit codes:\n" + table_plain()

app = typer.Typer(
    name="safegate",
    help="Gate heavy ML jobs on memory, temperature, locks and competing processes.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"safegate {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Gate heavy ML jobs on memory, temperature, locks and competing processes."""


def _parsed(option: str, parse: object, value: str | None) -> object:
    if value is None:
        return None
    try:
        return parse(value)  # type: ignore[operator]
    except ValueParseError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _size_option(option: str, value: str | None) -> Size | None:
    size = _parsed(option, parse_size, value)
    assert size is None or isinstance(size, Size)
    return size


def _overrides(
    mem: str | None, margin: str | None, max_temp: str | None, lock: str | None, gpu: str | None, gpu_mem: str | None
) -> Overrides:
    temp = _parsed("--max-temp", parse_temp, max_temp)
    name = _parsed("--lock", validate_lock_name, lock)
    selection: tuple[int, ...] | None = None
    if gpu is not None:
        try:
            selection = parse_gpu_option(gpu)
        except ValueParseError as exc:
            raise UsageError(f"--gpu: {exc}") from None
    return Overrides(
        mem=_size_option("--mem", mem),
        margin=_size_option("--margin", margin),
        max_temp=temp if isinstance(temp, float) else None,
        lock=name if isinstance(name, str) else None,
        gpu=selection,
        gpu_mem=_size_option("--gpu-mem", gpu_mem),
        explicit_gpu=gpu is not None,
    )


def _wait_timeout(wait: bool, timeout: str | None) -> float | None:
    seconds = _parsed("--timeout", parse_duration, timeout)
    if timeout is not None and not wait:
        raise UsageError("--timeout: only meaningful with --wait")
    return seconds if isinstance(seconds, float) else None


def _progress(silent: bool) -> Callable[[Verdict], None]:
    """While waiting: one line on stderr each time the reason for waiting changes."""
    last_shown: list[str] = []

    def progress(verdict: Verdict) -> None:
        line = blocking_summary(verdict)
        if not silent and line not in last_shown:
            last_shown[:] = [line]
            typer.echo(f"safegate: waiting: {line}", err=True)

    return progress


def _complete_profiles(incomplete: str) -> list[str]:
    """Profile names for shell completion (from the config in effect; nothing when it is broken)."""
    try:
        names = load_config().profiles
    except SafegateError:
        return []
    return [n for n in names if n.startswith(incomplete)]


def _complete_locks(incomplete: str) -> list[str]:
    from safegate.locks.directory import resolve_lock_dir
    from safegate.locks.store import LockStore

    try:
        store = LockStore(resolve_lock_dir(load_config().lock_dir, os.environ))
    except SafegateError:
        return []
    return [n for n in store.names() if n.startswith(incomplete)]


ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", envvar="SAFEGATE_PROFILE", metavar="PROFILE", autocompletion=_complete_profiles,
                 help="Profile to use (default: default; exec: the profile whose match fits the command)."),
]
MemOpt = Annotated[
    str | None, typer.Option(metavar="SIZE", help="Memory the job needs (default: the profile's memory).")
]
MarginOpt = Annotated[
    str | None,
    typer.Option(metavar="SIZE", help="RAM that must stay free after the job's need, e.g. 4G or 10% (default 4G)."),
]
MaxTempOpt = Annotated[
    str | None, typer.Option("--max-temp", metavar="C", help="Block at or above this temperature (default 80).")
]
LockOpt = Annotated[
    str | None, typer.Option(metavar="NAME", autocompletion=_complete_locks,
                             help="Lock that must be free (default: the profile's lock).")
]
GpuOpt = Annotated[
    str | None,
    typer.Option(metavar="auto|INDEX[,INDEX]", help="GPUs the job may use: auto (any one that fits; default) or "
                 "indexes, all of which must fit."),
]
GpuMemOpt = Annotated[
    str | None,
    typer.Option("--gpu-mem", metavar="SIZE", help="GPU memory the job needs (default: the profile's gpu_memory)."),
]
WaitOpt = Annotated[bool, typer.Option("--wait", help="Re-check until every check passes.")]
TimeoutOpt = Annotated[
    str | None,
    typer.Option(metavar="DURATION", help="With --wait: give up after this long, e.g. 90s, 5m (default: never)."),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option(metavar="PATH", help="Config file (default: $SAFEGATE_CONFIG, ~/.config/safegate/config.toml, "
                 "/etc/safegate/config.toml)."),
]


@app.command(epilog=EXIT_CODES_EPILOG)
def check(
    profile: ProfileOpt = None,
    mem: MemOpt = None,
    margin: MarginOpt = None,
    max_temp: MaxTempOpt = None,
    lock: LockOpt = None,
    gpu: GpuOpt = None,
    gpu_mem: GpuMemOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with every check.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing on success; on a block, one line on stderr.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Is it safe to start this job now? Answer with the exit code.

    Runs five checks: memory margin (and memory pressure), temperature, the profile's lock,
    competing processes, and stale lock cleanup (and GPU memory where there are GPUs).

    \b
    Examples:
      safegate check -p whisper-large-v3 -q && whisper --model large-v3 talk.mp3
      safegate check --mem 6G --margin 10% --wait --timeout 30m --json
    """
    overrides = _overrides(mem, margin, max_temp, lock, gpu, gpu_mem)
    wait_for = _wait_timeout(wait, timeout)
    settings = resolve(load_config(config), profile or DEFAULT_PROFILE, overrides)

    if wait:
        verdict = wait_until_clear(settings, wait_for, on_blocked=_progress(quiet or json_output))
    else:
        verdict = clean_and_evaluate(settings)

    if json_output:
        typer.echo(verdict_json(verdict))
    elif quiet:
        for failure in verdict.failures:
            typer.echo(f"safegate: {check_line(failure)}", err=True)
    else:
        typer.echo(verdict_text(verdict))
    raise typer.Exit(int(verdict.exit_code))


@app.command(
    "exec",
    epilog=EXIT_CODES_EPILOG,
    context_settings={"allow_interspersed_args": False},
)
def exec_(
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- CMD [ARGS]...", help="The job to run, after --.", show_default=False),
    ] = None,
    profile: ProfileOpt = None,
    mem: MemOpt = None,
    margin: MarginOpt = None,
    max_temp: MaxTempOpt = None,
    lock: LockOpt = None,
    gpu: GpuOpt = None,
    gpu_mem: GpuMemOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = None,
    max_mem: Annotated[
        str | None, typer.Option("--max-mem", metavar="SIZE", help="Stop the job when its own memory (PSS of its "
                                 "process tree) reaches this.")
    ] = None,
    min_available: Annotated[
        str | None, typer.Option("--min-available", metavar="SIZE", help="Stop the job when MemAvailable falls to "
                                 "this (default: 2G or 10% of RAM, whichever is smaller).")
    ] = None,
    on_hot: Annotated[
        str | None, typer.Option("--on-hot", metavar="pause|kill|warn", help="Above max-temp: pause the job until "
                                 "below resume_temp (default), stop it (exit 22), or only warn.")
    ] = None,
    grace: Annotated[
        str | None, typer.Option(metavar="DURATION", help="SIGKILL this long after SIGTERM (default 10s).")
    ] = None,
    interval: Annotated[
        str | None, typer.Option(metavar="DURATION", help="Shortest sampling interval, used near a limit "
                                 "(default 20ms; far from every limit, 1s).")
    ] = None,
    warn_signal: Annotated[
        str | None, typer.Option("--warn-signal", metavar="SIG", help="Send this signal to the job at 90% of a "
                                 "memory limit, e.g. SIGUSR1.")
    ] = None,
    nice: Annotated[
        str | None, typer.Option(metavar="N", help="Run the job at this niceness (0-19), with idle or best-effort "
                                 "I/O priority.")
    ] = None,
    max_gpu_mem: Annotated[
        str | None, typer.Option("--max-gpu-mem", metavar="SIZE", help="Stop the job (exit 21) when its own GPU "
                                 "memory reaches this.")
    ] = None,
    min_gpu_free: Annotated[
        str | None, typer.Option("--min-gpu-free", metavar="SIZE", help="Stop the job (exit 21) when its GPU's free "
                                 "memory falls to this; a percentage is of the card (default with a gpu_memory "
                                 "profile: 5%, warning at 20%).")
    ] = None,
    log: Annotated[
        str | None, typer.Option(metavar="FILE", help="Append every event as a JSON line to FILE.")
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only warnings, breaches and errors, no start/exit/summary.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Run a job under the gate: preflight checks, the lock for exactly the job's lifetime, and a watch on
    memory and temperature that stops the job before it takes the machine down.

    The exit status is the job's own, 128+N if it died of signal N, or safegate's codes below.

    \b
    Examples:
      safegate exec --wait -- whisper --model large-v3 talk.mp3
      safegate exec --max-mem 12G --log run.jsonl -- python train.py
    """
    # exec's machinery (ctypes, the supervisor) is imported here so `check` does not pay for it.
    from safegate.eventlog import EventLog
    from safegate.runner import ExecOverrides, run_exec
    from safegate.supervisor import Event

    if not command:
        raise UsageError("exec: no command given; usage: safegate exec [OPTIONS] -- CMD [ARGS]...")
    overrides = _overrides(mem, margin, max_temp, lock, gpu, gpu_mem)
    wait_for = _wait_timeout(wait, timeout)
    exec_overrides = ExecOverrides(
        max_mem=_size_option("--max-mem", max_mem),
        min_available=_size_option("--min-available", min_available),
        on_hot=_typed("--on-hot", parse_on_hot, on_hot, str),
        grace=_typed("--grace", parse_duration, grace, float),
        interval=_typed("--interval", parse_duration, interval, float),
        warn_signal=_typed("--warn-signal", parse_signal, warn_signal, int),
        nice=_typed("--nice", parse_nice, nice, int),
        max_gpu_mem=_size_option("--max-gpu-mem", max_gpu_mem),
        min_gpu_free=_size_option("--min-gpu-free", min_gpu_free),
    )
    if exec_overrides.interval is not None and not 0.001 <= exec_overrides.interval <= 1.0:
        raise UsageError(f"--interval: {interval!r} is outside 1ms..1s")
    cfg = load_config(config)
    chosen = profile or cfg.profile_for_command(command).name
    settings = resolve(cfg, chosen, overrides)
    if os.environ.get("SLURM_JOB_ID"):
        from safegate import slurm

        if settings.profile.slurm_license:
            slurm.require_license(settings.profile.slurm_license, os.environ)
        if exec_overrides.max_mem is None and settings.profile.max_mem is None:
            job_limit = slurm.default_max_mem(os.environ)
            if job_limit is not None:
                exec_overrides = replace(exec_overrides, max_mem=Size(bytes=job_limit))
    log_path = log or settings.profile.log
    event_log = EventLog(log_path, lambda msg: typer.echo(f"safegate: warning: {msg}", err=True)) if log_path else None
    chatty = {"admitted", "exit", "summary", "cleanup"}

    def on_event(event: Event) -> None:
        if not (quiet and event.kind in chatty):
            prefix = f"{event.kind}: " if event.kind in ("summary", "warning", "breach") else ""
            # A closed terminal or pipe must not be what stops the watch: the job goes on, still watched.
            with contextlib.suppress(OSError):
                typer.echo(f"safegate: {prefix}{event.message}", err=True)
        if event_log is not None:
            event_log.write(event)

    result = run_exec(
        settings, exec_overrides, command, nice=exec_overrides.nice if exec_overrides.nice is not None
        else settings.profile.nice, wait=wait, timeout=wait_for, on_event=on_event, on_blocked=_progress(quiet),
    )
    if isinstance(result, Verdict):
        for failure in result.failures:
            typer.echo(f"safegate: not started: {check_line(failure)}", err=True)
        if event_log is not None:
            event_log.write(Event("blocked", blocking_summary(result), {"exit_code": int(result.exit_code)}))
        raise typer.Exit(int(result.exit_code))
    raise typer.Exit(result.exit_code)


def _typed(option: str, parse: object, value: str | None, kind: type[T]) -> T | None:
    parsed = _parsed(option, parse, value)
    return parsed if isinstance(parsed, kind) else None


JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


@app.command(epilog="Example: ls *.mp3 | xargs -P \"$(safegate slots -p whisper-large-v3)\" -n 1 whisper")
def slots(
    profile: ProfileOpt = None,
    mem: MemOpt = None,
    margin: MarginOpt = None,
    max_temp: MaxTempOpt = None,
    lock: LockOpt = None,
    gpu: GpuOpt = None,
    gpu_mem: GpuMemOpt = None,
    max_slots: Annotated[int | None, typer.Option("--max", min=0, metavar="N", help="Never print more than N.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Print how many jobs of this size can start now: floor((available - reserved - margin) / need).

    0 when any other check blocks; at most 1 for a profile with a lock (a mutex).
    """
    from safegate.api import count_slots

    settings = resolve(load_config(config), profile or DEFAULT_PROFILE,
                       _overrides(mem, margin, max_temp, lock, gpu, gpu_mem))
    typer.echo(count_slots(settings, evaluate(settings), max_slots))


@app.command(epilog="Example: safegate locks --json")
def locks(json_output: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List the locks in the lock dir, with their holders."""
    from safegate.inventory import list_locks
    from safegate.locks.directory import resolve_lock_dir
    from safegate.locks.store import LockStore

    cfg = load_config(config)
    store = LockStore(resolve_lock_dir(cfg.lock_dir, os.environ))
    found = list_locks(store) if store.directory.is_dir() else []
    if json_output:
        typer.echo(json.dumps([lock.as_json() for lock in found], indent=2))
        return
    if not found:
        typer.echo(f"no locks in {store.directory}")
    for lock in found:
        typer.echo(render_lock(lock))


@app.command(epilog="Example: safegate unlock whisper-large")
def unlock(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The lock to clean up.", autocompletion=_complete_locks)],
    config: ConfigOpt = None,
) -> None:
    """Remove a free lock's stale leftovers; refuses, naming the holder, while a live process holds it."""
    from safegate.inventory import unlock as unlock_lock
    from safegate.locks.directory import resolve_lock_dir
    from safegate.locks.store import LockStore

    checked = _parsed("NAME", validate_lock_name, name)
    assert isinstance(checked, str)
    cfg = load_config(config)
    removed = unlock_lock(LockStore(resolve_lock_dir(cfg.lock_dir, os.environ)), checked)
    for what in removed:
        typer.echo(f"removed {what}")
    if not removed:
        typer.echo(f"lock {checked!r} is free; nothing to remove")


@app.command(epilog="Example: safegate profiles --json")
def profiles(json_output: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List built-in and configured profiles: where each comes from, and declared vs recorded memory."""
    from safegate import history
    from safegate.inventory import profile_json
    from safegate.units import format_bytes

    cfg = load_config(config)
    recorded = history.load(history.history_path())
    data = [profile_json(p, recorded.get(p.name, [])) for p in cfg.profiles.values()]
    if json_output:
        typer.echo(json.dumps(data, indent=2))
        return
    for p in data:
        lock = p["lock"] or "(none)"
        rec = p["recorded"]
        seen = (f"{rec['runs']} runs, p95 peak {format_bytes(rec['peak_memory_p95'])}" if rec["runs"]
                else "no runs recorded")
        typer.echo(f"{p['name']:<20} memory {p['memory']:<10} lock {lock:<16} {seen:<32} {p['source']}")


@app.command(epilog="Example: safegate status --watch")
def status(
    json_output: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every 2 s until Ctrl-C.")] = False,
    config: ConfigOpt = None,
) -> None:
    """One screen: RAM, pressure, swap, temperatures, GPUs, locks and their holders, the largest processes."""
    from safegate.inventory import collect_status
    from safegate.locks.directory import resolve_lock_dir

    cfg = load_config(config)
    backend = gpu_backend(cfg.gpu_backend, os.environ)
    lock_dir = resolve_lock_dir(cfg.lock_dir, os.environ)
    interactive = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    while True:
        report = collect_status(cfg, lock_dir, backend)
        text = status_json(report) if json_output else status_text(report)
        if watch and interactive:
            typer.echo("\x1b[H\x1b[2J" + text)  # home + clear: redraw in place
        else:
            typer.echo(text)
        if not watch:
            return
        time.sleep(2.0)


slurm_app = typer.Typer(help="Safegate inside Slurm.", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")


@slurm_app.command("health", epilog=EXIT_CODES_EPILOG)
def slurm_health(
    node: Annotated[str | None, typer.Option(metavar="NAME", help="Node to drain or resume (default: "
                                             "$SLURMD_NODENAME, else the short hostname).")] = None,
    reason_prefix: Annotated[str, typer.Option("--reason-prefix", metavar="TEXT", help="Drain reasons start with "
                                               "this; only such drains are ever resumed.")] = "safegate:",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the scontrol command instead of running it.")]
    = False,
    config: ConfigOpt = None,
) -> None:
    """Node health check for HealthCheckProgram= or NHC: drain the node when it is unsafe (too hot, memory
    pressure or margin, a failed GPU, a blocking competing process), resume it when safe again if the drain
    is safegate's own. Never touches running jobs. Exit 0 healthy, else the blocking code.

    Example: HealthCheckProgram=/usr/local/bin/safegate-health (a wrapper running: safegate slurm health)
    """
    from safegate import slurm

    cfg = load_config(config)
    settings = resolve(cfg, DEFAULT_PROFILE, Overrides(mem=Size(bytes=0)))
    verdict = evaluate(settings)
    problems = slurm.node_problems(verdict)
    name = slurm.node_name(node, os.environ)
    try:
        state = slurm.read_node(name)
    except SlurmError as exc:
        if not dry_run:
            raise
        # A dry run still says what it would do, from a node state it could not read.
        typer.echo(f"safegate: {exc}; assuming node {name} is not drained", err=True)
        state = slurm.NodeState(name, "", "")
    action = slurm.decide(state, problems, reason_prefix)
    typer.echo(f"safegate: {action.message}", err=True)
    line = slurm.apply(action, dry_run)
    if line is not None:
        typer.echo(line)
    raise typer.Exit(int(slurm.node_code(verdict)))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the one place where failures become exit codes and one-line messages."""
    args = sys.argv[1:] if argv is None else argv
    if os.environ.get(COMPLETE_VAR):
        # A shell asking for completions (completions/*): register typer's shell classes only then.
        from typer import completion as typer_completion

        # completion_init is how typer registers its bash/zsh/fish classes; it is not re-exported.
        getattr(typer_completion, "completion_init")()  # noqa: B009
    try:
        result = app(args=args, prog_name="safegate", standalone_mode=False)
    except SafegateError as exc:
        _say(f"safegate: {exc}")
        return int(exc.exit_code)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("safegate: interrupted", err=True)
        return ExitCode.for_signal(signal.SIGINT)
    except typer.TyperException as exc:
        # click's usage errors (unknown option, missing value, no command): one line, exit 2.
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help(), err=True)
            return int(ExitCode.USAGE)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"safegate: {' '.join(message.split())}{hint}", err=True)
        return int(ExitCode.USAGE)
    except Exception as exc:
        if os.environ.get("SAFEGATE_DEBUG"):
            raise
        _say(f"safegate: internal error: {type(exc).__name__}: {exc}")
        return int(ExitCode.INTERNAL)
    return int(result) if isinstance(result, int) else 0


def _say(line: str) -> None:
    """The last word on stderr; if even that cannot be written, the exit code still tells."""
    with contextlib.suppress(OSError):
        typer.echo(line, err=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
