"""The command line: parse, call a command, render. Every failure becomes its exit code in cli.plain.exit_status."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from safegate import __version__
from safegate.cli.options import (
    REPORT_DEFAULT,
    ConfigOpt,
    JobOpt,
    JsonOpt,
    PlainUsage,
    ProfileOpt,
    SettingsCommand,
    TimeoutOpt,
    WaitOpt,
    complete_locks,
    event_printer,
    units_epilog,
    version_text,
    with_settings,
)
from safegate.cli.plain import (
    COMPLETE_VAR,
    check_command,
    echo,
    exit_status,
    fill_closed_stdio,
    parsed,
    progress,
    safe_lines,
    wait_timeout,
)
from safegate.cli.render import (
    check_line,
    lock_json,
    profile_json,
    profile_line,
    queue_json,
    queue_text,
    render_lock,
    status_json,
    status_text,
)
from safegate.commands.slurm import DEFAULT_PREFIX
from safegate.config.model import parse_overrides
from safegate.errors import UsageError
from safegate.exitcodes import table_plain
from safegate.gate.results import Verdict
from safegate.units import printable, validate_lock_name

# "\b" keeps click from re-wrapping the table into one paragraph.
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
        echo(version_text(__version__))
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help=(
        "Print the version and where this install's man page and completions are, and exit."))] = False) -> None:
    """Gate heavy ML jobs on memory, temperature, locks and competing processes."""


@app.command(cls=SettingsCommand, epilog=units_epilog("check") + EXIT_CODES_EPILOG,
             context_settings={"allow_interspersed_args": False})
@with_settings("check")
def check(
    command: JobOpt = None,
    profile: ProfileOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object with every check.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print nothing on success; on a block, one line per failing check "
                           "on stderr, and no waiting lines.")
    ] = False,
    config: ConfigOpt = None,
    no_grant: Annotated[bool, typer.Option("--no-grant", help="Only ask: reserve nothing for a job that follows "
                                           "(for monitoring, `watch safegate check` and dashboards).")] = False,
    grant_to: Annotated[str | None, typer.Option(metavar="PID", help="Grant a pass to this process's next job "
                                                 "instead of check's parent's (e.g. GNU parallel's pid).")] = None,
    **given: str | None,
) -> None:
    """Is it safe to start this job now? Answer with the exit code.

    Runs five checks: memory margin (and memory pressure), temperature, the profile's lock,
    competing processes, and stale lock cleanup (and GPU memory where there are GPUs). With
    -- CMD, the profile and the need are the job's, as exec decides them (see safegate need).

    \b
    Examples:
      safegate check -p whisper-large-v3 -q && whisper --model large-v3 talk.mp3
      safegate check --mem 6G --margin 10% --wait --timeout 30m --json
      safegate check -q -- llama-server -m model.gguf -c 8192 -ngl 99
    """
    raise typer.Exit(check_command(profile=profile, wait=wait, timeout=timeout, json_output=json_output, quiet=quiet,
                                   config=config, no_grant=no_grant, grant_to=grant_to, given=_given(given),
                                   command=command or ()))


@app.command("exec", cls=SettingsCommand, short_help="Run a job under the gate, and watch it.",
             epilog=units_epilog("exec") + EXIT_CODES_EPILOG, context_settings={"allow_interspersed_args": False})
@with_settings("exec")
def exec_(
    command: Annotated[
        list[str] | None,
        typer.Argument(metavar="-- CMD [ARGS]...", help="The job to run, after --.", show_default=False),
    ] = None,
    profile: ProfileOpt = None,
    wait: WaitOpt = False,
    timeout: TimeoutOpt = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only warnings, breaches and errors: no waiting, start, "
                           "exit or summary lines.")
    ] = False,
    config: ConfigOpt = None,
    **given: str | None,
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
    from safegate.commands.execute import execute

    if not command:
        raise UsageError("exec: no command given; usage: safegate exec [OPTIONS] -- CMD [ARGS]...")
    overrides = parse_overrides(given, command="exec")
    wait_for = wait_timeout(wait, timeout)
    shown = progress(quiet)
    result = execute(command, config=config, profile=profile, overrides=overrides, wait=wait, timeout=wait_for,
                     on_event=event_printer(quiet, shown), on_blocked=shown,
                     on_log_error=lambda msg: echo(f"safegate: warning: {printable(msg)}", err=True))
    if isinstance(result, Verdict):
        shown.finish(result, wait_for if wait else None)
        for failure in result.failures:
            echo(f"safegate: not started: {check_line(failure)}", err=True)
        raise typer.Exit(int(result.exit_code))
    raise typer.Exit(result.exit_code)


@app.command(cls=SettingsCommand, short_help="Print how many jobs of this size can start now.",
             epilog=units_epilog("slots") + "Example: n=$(safegate slots -p small-model --max 8) && "
             "xargs -P \"$n\" -n 1 small-model < list", context_settings={"allow_interspersed_args": False})
@with_settings("slots")
def slots(
    command: JobOpt = None,
    profile: ProfileOpt = None,
    max_slots: Annotated[int | None, typer.Option("--max", min=1, metavar="N", help="Never print more than N.")] = None,
    config: ConfigOpt = None,
    **given: str | None,
) -> None:
    """Print how many jobs of this size can start now: floor((available - reserved - margin) / need).

    At most 1 for a profile with a lock (a mutex). When none can start it prints 0 and exits with the code of
    what blocks (10-14), never 0: to xargs -P and parallel -j, 0 means no limit. With -- CMD, the profile and
    the need are that job's, as exec decides them.
    """
    from safegate.commands.check import slots as count_slots

    found = count_slots(config, profile, parse_overrides(given, command="slots"), max_slots, command or ())
    echo(str(found.count))
    # 0 is an answer a script acts on (starts nothing); why, for the person reading the log, as check -q says it.
    for failure in found.failures:
        echo(f"safegate: {check_line(failure)}", err=True)
    if found.shortfall:
        echo(f"safegate: {found.shortfall}", err=True)
    if found.exit_code:
        raise typer.Exit(int(found.exit_code))


@app.command(cls=SettingsCommand, short_help="Print what a command will need, and where each figure comes from.",
             epilog="Example: safegate need --json -- llama-server -m model.gguf -c 8192 -ngl 99",
             context_settings={"allow_interspersed_args": False})
@with_settings("need")
def need(
    command: JobOpt = None,
    profile: ProfileOpt = None,
    json_output: JsonOpt = False,
    config: ConfigOpt = None,
    **given: str | None,
) -> None:
    """Print what a command will need (RAM and GPU memory) and its lock, decided exactly as exec, check -- CMD
    and slots -- CMD decide them, and where each figure comes from: an option, the profile, recorded runs of
    the same command, the built-in table or the model file's header. The command is not run.

    Exit 0 with the figures (0 and a note where nothing predicts them, e.g. an unreadable model file).
    """
    from safegate.cli.render import need_text
    from safegate.commands.need import need as decide

    found = decide(config, profile, parse_overrides(given, command="need"), command or [])
    echo(json.dumps(found, indent=2) if json_output else need_text(found))


@app.command(epilog="Example: safegate locks --json")
def locks(json_output: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List the locks in the lock dir, with their holders."""
    from safegate.commands.inspect import locks as list_locks

    directory, found = list_locks(config)
    if json_output:
        echo(json.dumps([lock_json(lock) for lock in found], indent=2))
        return
    if not found:
        echo(f"no locks in {printable(str(directory))}")
    for lock in found:
        echo(render_lock(lock))


@app.command(short_help="List the waiters in the order they are served.", epilog="Example: safegate queue --json")
def queue(json_output: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List the waiters (exec --wait, check --wait) in the order they are served, and what each waits for."""
    from safegate.commands.inspect import queue as list_queue

    tickets, now = list_queue(config)
    if json_output:
        echo(json.dumps(queue_json(tickets, now), indent=2))
        return
    for line in queue_text(tickets, now) or ["nobody is waiting"]:
        echo(line)


@app.command(cls=PlainUsage, short_help="Remove a free lock's stale leftovers.",
             epilog="Example: safegate unlock whisper-large")
def unlock(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The lock to clean up.", autocompletion=complete_locks)],
    config: ConfigOpt = None,
) -> None:
    """Remove a free lock's stale leftovers; refuses, naming the holder, while a live process holds it."""
    from safegate.commands.inspect import unlock as unlock_lock

    checked = parsed("NAME", validate_lock_name, name)
    assert isinstance(checked, str)
    removed = unlock_lock(config, checked)
    for what in removed:
        echo(f"removed {printable(what)}")
    if not removed:
        echo(f"lock {checked!r} is free; nothing to remove")


@app.command(short_help="List built-in and configured profiles.", epilog="Example: safegate profiles --json")
def profiles(json_output: JsonOpt = False, config: ConfigOpt = None) -> None:
    """List built-in and configured profiles: where each comes from, and declared vs recorded memory."""
    from safegate.commands.inspect import profiles as list_profiles

    data = [profile_json(p, runs) for p, runs in list_profiles(config)]
    if json_output:
        echo(json.dumps(data, indent=2))
        return
    for p in data:
        echo(profile_line(p))


@app.command(short_help="One screen: RAM, heat, GPUs, locks, waiters.", epilog="Example: safegate status --watch")
def status(
    json_output: JsonOpt = False,
    watch: Annotated[bool, typer.Option("--watch", help="Refresh every 2 s until Ctrl-C.")] = False,
    config: ConfigOpt = None,
) -> None:
    """One screen: RAM, pressure, swap, temperatures, GPUs, locks and their holders, the waiters, the largest
    processes."""
    from safegate.commands.inspect import status as reports

    interactive = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    for report in reports(config, watch):
        text = status_json(report) if json_output else status_text(report)
        if watch and interactive:
            echo("\x1b[H\x1b[2J" + safe_lines(text), controls=True)  # home + clear: redraw in place
        else:
            echo(text)


@app.command(short_help="Prometheus metrics: memory, heat, GPUs, locks, last runs.",
             epilog="Example (cron, every minute): safegate metrics --textfile /var/lib/prometheus/node-exporter")
def metrics(textfile: Annotated[str | None, typer.Option("--textfile", metavar="DIR", help=(
        "Write DIR/safegate.prom whole (for node_exporter's textfile collector) instead of printing."))] = None,
        config: ConfigOpt = None) -> None:
    """Memory, pressure, heat, GPUs, locks and each profile's last run, in the Prometheus text format."""
    from safegate.commands.metrics import metrics as collect
    from safegate.commands.metrics import write_textfile

    text = collect(config)
    echo(text.rstrip("\n")) if textfile is None else write_textfile(textfile, text)


@app.command(short_help="Turn exec --log files into one HTML report.",
             epilog="Example: safegate report ~/night.jsonl ~/gpu-night.jsonl -o night.html")
def report(
    logs: Annotated[list[str] | None, typer.Argument(metavar="LOG...", show_default=False, help=(
        "safegate exec --log files: one or more, each with one or more jobs."))] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FILE", help=(
        f"Write the report here (default {REPORT_DEFAULT} in the current directory; - for stdout); written "
        "whole or not at all."))] = None,
) -> None:
    """The morning after: one self-contained HTML file (no script, font or URL; it opens from a file:// path
    offline) with a timeline of every job, charts of job memory, MemAvailable, temperature and VRAM against their
    limits with the warnings, pauses, resumes and breaches marked, and a table of the jobs. Times are UTC."""
    from safegate.commands.report import report as make_report

    written = make_report(logs or [], output or REPORT_DEFAULT)
    echo(written.html.rstrip("\n") if written.path == "-" else f"wrote {written.path}: {written.summary}")


slurm_app = typer.Typer(help="Safegate inside Slurm.", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")


@slurm_app.command("health", short_help="Drain the node when unsafe, resume it when safe again.",
                   epilog=EXIT_CODES_EPILOG)
def slurm_health(
    node: Annotated[str | None, typer.Option(metavar="NAME", help="Node to drain or resume (default: "
                                             "$SLURMD_NODENAME, else the short hostname).")] = None,
    reason_prefix: Annotated[str, typer.Option("--reason-prefix", metavar="TEXT", help="Drain reasons start with "
                                               "this; only such drains are ever resumed.")] = DEFAULT_PREFIX,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the scontrol command instead of running it.")]
    = False,
    config: ConfigOpt = None,
) -> None:
    """Node health check for HealthCheckProgram= or NHC: drain the node when it is unsafe (too hot, memory
    pressure or margin, a failed GPU, a blocking competing process), resume it when safe again if the drain
    is safegate's own. Never touches running jobs. Exit 0 healthy, else the blocking code.

    Example: HealthCheckProgram=/usr/local/bin/safegate-health (a wrapper running: safegate slurm health)
    """
    from safegate.commands.slurm import apply_health, health

    result = health(config, node, reason_prefix, dry_run)
    for note in result.notes:
        echo(f"safegate: {printable(note)}", err=True)
    command = apply_health(result)
    if command is not None:
        echo(command)
    raise typer.Exit(int(result.exit_code))


def _given(given: dict[str, str | None]) -> dict[str, str]:
    """The setting options given, as the plain check's parser hands them over (None: not given)."""
    return {name: value for name, value in given.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    """Run the typer app; failures become exit codes in cli.plain.exit_status, as for the plain check."""
    args = sys.argv[1:] if argv is None else argv
    fill_closed_stdio()
    if os.environ.get(COMPLETE_VAR):
        # A shell asking for completions (completions/*): register typer's shell classes only then.
        from typer import completion as typer_completion

        # completion_init is how typer registers its bash/zsh/fish classes; it is not re-exported.
        getattr(typer_completion, "completion_init")()  # noqa: B009
    return exit_status(lambda: app(args=args, prog_name="safegate", standalone_mode=False))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
