"""The command line's shared typer options: part of the CLI layer (cli.app declares the commands). The setting
options of check, exec and slots are not written out: with_settings() adds one per setting of the settings table
(config.model.SETTINGS) that the command takes, its name, metavar, help and completion from there."""

from __future__ import annotations

import inspect
import os
import re
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand

from safegate.cli.plain import echo
from safegate.config.file import load_config
from safegate.config.model import BY_KEY, SETTINGS
from safegate.errors import SafegateError, UsageError, ValueParseError
from safegate.settings import LIMIT_FLOOR, Setting
from safegate.units import format_bytes, parse_duration, parse_size, printable


class PlainUsage(TyperCommand):
    """A command whose usage line names a required argument plainly (`NAME`, not typer's `{NAME}`)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [re.sub(r"^\{(.*)\}$", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


# A value that is only a number, and the options whose values take a unit: sizes and durations, by their parser.
_NUMBER = re.compile(r"\s*(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*")
_UNIT_PARSERS: dict[str, Callable[[str], object]] = {"memory": parse_size, "size": parse_size, "limit": parse_size,
                                                     "duration": parse_duration, "interval": parse_duration}


class SettingsCommand(TyperCommand):
    """check, exec and slots. A size or duration whose unit is a word of its own (`--max-mem 12 GB`) is refused
    before click parses it, with the spelling that works: click would take `GB` for exec's command and run it."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        refuse_split_unit(self, args)
        return list(super().parse_args(ctx, args))


def refuse_split_unit(command: Any, args: list[str]) -> None:
    """UsageError when the word after a number given to a size or duration option is a unit alone (GB, G, %, m),
    where exec's command or an extra argument would begin. Options are read as click reads them, up to `--` or
    the first word that is no option's."""
    takes_value = {name for p in command.params if p.param_type_name == "option" and not p.is_flag and not p.count
                   for name in (*p.opts, *p.secondary_opts)}
    units = {s.option: _UNIT_PARSERS[s.kind] for s in SETTINGS if s.kind in _UNIT_PARSERS and s.option is not None}
    units["--timeout"] = parse_duration
    i = 0
    while i < len(args) and args[i] != "--":
        option, value, i = _option_at(args, i, takes_value)
        if option is None:
            if value is None:
                continue  # a flag
            return  # the first word that is no option's: the command (exec), or an extra argument
        parse = units.get(option)
        if parse is None or value is None or not _NUMBER.fullmatch(value) or i >= len(args):
            continue
        unit = args[i]
        if unit[:1].isalpha() or unit == "%":
            try:
                parse(f"1{unit}")
            except ValueParseError:
                continue
            given = printable(f"{option} {value} {unit}")
            raise UsageError(f"{given}: the unit must be written with the number: "
                             f"{printable(f'{option} {value.strip()}{unit.strip()}')}")


def _option_at(args: list[str], i: int, takes_value: set[str]) -> tuple[str | None, str | None, int]:
    """(option, its value, the index after them) for the word at *i*; (None, None, i+1) for a flag or an option
    whose value is attached (-pNAME); (None, word, i) for a word that is no option's."""
    arg = args[i]
    if arg.startswith("--") and "=" in arg:
        option, _, value = arg.partition("=")
        return option, value, i + 1
    if arg in takes_value:
        return arg, args[i + 1] if i + 1 < len(args) else None, i + 2
    if arg.startswith("-") and arg != "-":
        return None, None, i + 1
    return None, arg, i


def units_text(command: str | None = None) -> str:
    """How sizes and durations are written, said once: README's units block and the man page's section (every
    option), and the --help of check, exec and slots (*command*: only the options it takes)."""
    twelve = parse_size("12GB").bytes or 0
    options = [s for s in SETTINGS if s.option is not None and (command is None or command in s.commands)]
    limits = ", ".join(s.option for s in options if s.kind == "limit" and s.option is not None)
    zero = ", ".join(s.option for s in options if s.kind in ("memory", "size") and s.option is not None)
    limit = (f"A memory limit ({limits}, and the same keys in a profile) is at least {format_bytes(LIMIT_FLOOR)}, "
             "or a percentage above 0%; needs, margins and floors" if limits else "Needs and margins")
    return (
        "Sizes: 512M, 1.5G, 10G and 10GiB count in powers of 1024 (K, M, G, T, P, alone or with i or iB); 10GB "
        f"counts in powers of 1000 (kB, MB, GB, TB, PB), so 12GB is {twelve:,} bytes, {format_bytes(twelve)}. "
        "Case does not matter (12gb is 12GB, 12g is 12G). A bare number is bytes; 10% is of total RAM (of the card "
        "for the GPU options). The unit is part of the value: 12GB, or \"12 GB\" quoted as one argument, is the "
        f"same size; --mem 12 GB, the unit a word of its own, is refused. {limit} ({zero}) may be 0. "
        "Durations: 30 (seconds), 250ms, 90s, 5m, 2h, 1d."
    )


def units_epilog(command: str) -> str:
    """units_text for *command*'s --help, wrapped here and marked for click to leave as it is: click would break
    an option's name at its hyphens."""
    import textwrap

    lines = textwrap.wrap(units_text(command), 78, break_on_hyphens=False, break_long_words=False)
    return "\b\n" + "\n".join(lines) + "\n\n"


REPORT_DEFAULT = "safegate-report.html"  # `report` without -o writes this, in the current directory

# Where pip, a venv or pipx put the man page and completions (pyproject's data-files), under a prefix.
INSTALLED_DOCS = (("man page", "share/man/man1/safegate.1"),
                  ("bash completion", "share/bash-completion/completions/safegate.bash"),
                  ("zsh completion", "share/zsh/site-functions/_safegate"),
                  ("fish completion", "share/fish/vendor_completions.d/safegate.fish"))


def version_text(version: str) -> str:
    """The version, and where this installation's man page and completions are (or that it has none: an
    editable or an old pipx install; README, "Completions and man page", says what to do then)."""
    import site

    prefixes = dict.fromkeys([sys.prefix, site.getuserbase()])
    lines = [f"safegate {version}"]
    for what, rel in INSTALLED_DOCS:
        found = next((os.path.join(p, rel) for p in prefixes if os.path.isfile(os.path.join(p, rel))), None)
        lines.append(f"{what}: {found or 'not installed with this package'}")
    man = next((p for p in prefixes if os.path.isfile(os.path.join(p, INSTALLED_DOCS[0][1]))), None)
    if man is not None and os.path.join(man, "bin") not in os.environ.get("PATH", "").split(os.pathsep):
        # man finds <prefix>/share/man only for a <prefix>/bin on PATH.
        lines.append(f"read it with: man -M {os.path.join(man, 'share', 'man')} safegate")
    return "\n".join(lines)


def complete_profiles(incomplete: str) -> list[str]:
    """Profile names for shell completion (from the config in effect; nothing when it is broken)."""
    try:
        names = load_config().profiles
    except SafegateError:
        return []
    return [n for n in names if n.startswith(incomplete)]


def complete_locks(incomplete: str) -> list[str]:
    from safegate.locks.files import lock_names, resolve_lock_dir

    try:
        lock_dir = resolve_lock_dir(load_config().lock_dir, os.environ)
    except SafegateError:
        return []
    return [n for n in lock_names(lock_dir) if n.startswith(incomplete)]


Command = TypeVar("Command", bound=Callable[..., Any])


def with_settings(command: str) -> Callable[[Command], Command]:
    """Give a typer command function one option per setting *command* takes, after its --profile: typer reads
    the signature, and hands their values (None: not given) to the function's `**given` by the options' Python
    names."""

    def wrap(func: Command) -> Command:
        own = inspect.signature(func, eval_str=True)
        params: list[inspect.Parameter] = []
        for param in own.parameters.values():
            if param.kind is not inspect.Parameter.VAR_KEYWORD:
                params.append(param.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD))
            if param.name == "profile":
                params += [_parameter(s) for s in SETTINGS if command in s.commands]
        func.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        return func

    return wrap


def complete_gpus(incomplete: str) -> list[str]:
    """auto, and the machine's GPU indexes (cheaply, from the driver's /proc listing); after "0," the rest."""
    from safegate.probes.gpu import gpu_indexes

    head, comma, _ = incomplete.rpartition(",")
    given = set(head.split(",")) if comma else set()
    values = [f"{head}{comma}{i}" for i in gpu_indexes() if str(i) not in given]
    if not comma:
        values = [*BY_KEY["gpu"].choices(), *values]
    return [v for v in values if v.startswith(incomplete)]


def _completion(setting: Setting) -> Callable[[str], list[str]] | None:
    """How a shell completes the setting's value: lock names and GPUs from the machine, a fixed set of values
    from the kind's own choices (settings.CHOICES), anything else (sizes, durations, paths) not at all."""
    if setting.kind == "lock":
        return complete_locks
    if setting.kind == "gpu":
        return complete_gpus
    if not setting.choices():
        return None
    return lambda incomplete: [c for c in setting.choices() if c.lower().startswith(incomplete.lower())]


def _parameter(setting: Setting) -> inspect.Parameter:
    assert setting.option is not None
    option = typer.Option(setting.option, metavar=setting.metavar, help=setting.help_text,
                          autocompletion=_completion(setting))
    return inspect.Parameter(setting.param, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                             annotation=Annotated[str | None, option])


ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", envvar="SAFEGATE_PROFILE", metavar="PROFILE", autocompletion=complete_profiles,
                 help="Profile to use (default: default; exec, and a command after --: the profile whose match fits "
                 "the command)."),
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
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
JobOpt = Annotated[list[str] | None, typer.Argument(
    metavar="[-- CMD [ARGS]...]", show_default=False,
    help="The job, after --: its profile and need are decided as exec decides them; it is not run.")]


def event_printer(quiet: bool, shown: Any) -> Callable[[Any], None]:
    """exec's events as stderr lines: not the timeline's samples (those are for --log), and with -q only warnings,
    breaches and errors."""
    chatty = {"admitted", "exit", "summary", "cleanup", "notice"}

    def on_event(event: Any) -> None:
        if event.kind == "sample":
            return
        shown.end_line()
        if not (quiet and event.kind in chatty):
            prefix = f"{event.kind}: " if event.kind in ("summary", "warning", "breach") else ""
            # A closed terminal or pipe must not be what stops the watch: the job goes on, still watched.
            echo(f"safegate: {prefix}{printable(event.message)}", err=True)

    return on_event
