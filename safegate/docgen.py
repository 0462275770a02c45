"""Generate the man page and the shell completions from the CLI itself, so they cannot drift.

    python -m safegate.docgen            # rewrite man/safegate.1 and completions/*
    python -m safegate.docgen --check    # exit 1 when a committed file is out of date
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import typer

from safegate import __version__
from safegate.cli import COMPLETE_VAR, app
from safegate.exitcodes import ExitCode

COMPLETIONS = {"bash": "safegate.bash", "zsh": "_safegate", "fish": "safegate.fish"}

ENVIRONMENT = [
    ("SAFEGATE_CONFIG", "Config file to use."),
    ("SAFEGATE_PROFILE", "Profile when -p is not given (for exec, instead of choosing by match)."),
    ("SAFEGATE_LOCK_DIR", "Lock directory, an absolute path; beats lock_dir in the config."),
    ("SAFEGATE_GPU", "GPU backend: auto, nvml or none."),
    ("SAFEGATE_DEBUG", "Show a traceback for an internal error (exit 125)."),
    ("XDG_CONFIG_HOME", "Where the per-user config is looked for."),
    ("CUDA_VISIBLE_DEVICES", "When set, exec leaves it alone and only those GPUs are considered."),
]
FILES = [
    ("$XDG_CONFIG_HOME/safegate/config.toml", "Per-user config (default ~/.config/safegate/config.toml)."),
    ("/etc/safegate/config.toml", "System-wide config."),
    ("/run/lock/safegate/NAME.lock", "A lock, locked with flock(2); /tmp/safegate where /run/lock is absent."),
    ("/run/lock/safegate/NAME.holder-TOKEN.json", "Who holds the lock NAME, since when, and the memory it reserves: "
     "one file per holder, trusted only while its writer holds the lock."),
]
EXAMPLES = [
    ("Start a job only when it is safe", "safegate check -p whisper-large-v3 -q && whisper --model large-v3 a.mp3"),
    ("Run a job under the gate, waiting for its turn", "safegate exec --wait -- whisper --model large-v3 a.mp3"),
    ("Stop a training run before it eats the machine",
     "safegate exec --max-mem 12G --log run.jsonl -- python train.py"),
    ("How many such jobs fit now", "ls *.mp3 | xargs -P \"$(safegate slots -p whisper-large-v3)\" -n 1 whisper"),
]


def _roff(text: str) -> str:
    """Escape for roff: backslashes, leading dots and quotes, hyphens in option names."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines())


def _command_section(name: str, cmd: Any) -> list[str]:
    ctx = typer.Context(cmd, info_name=name)
    lines = [".SS " + _roff(f"safegate {name}")]
    for paragraph in (cmd.help or "").strip().split("\n\n"):
        if paragraph.lstrip().startswith("\b"):
            # click's "\b" marks a block not to be re-wrapped (examples): keep its lines.
            block = [line.strip() for line in paragraph.strip().splitlines()[1:]]
            lines += [".PP", _roff(block[0]), ".RS", ".nf", *(_roff(b) for b in block[1:]), ".fi", ".RE"]
        else:
            lines += [".PP", _roff(" ".join(paragraph.split()))]
    for param in cmd.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        opts, text = record
        lines += [".TP", "\\fB" + _roff(opts) + "\\fR", _roff(" ".join(text.split()))]
    if cmd.epilog and "Exit codes" not in cmd.epilog:
        lines += [".PP", _roff(cmd.epilog.strip())]
    return lines


def _leaf_commands(group: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every runnable command, sub-groups (safegate slurm health) flattened into "slurm health"."""
    out = []
    ctx = typer.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        full = f"{prefix}{name}"
        if hasattr(cmd, "list_commands"):
            out += _leaf_commands(cmd, full + " ")
        else:
            out.append((full, cmd))
    return out


def man_page() -> str:
    root = typer.main.get_command(app)
    assert isinstance(root, typer.core.TyperGroup)
    commands = _leaf_commands(root)
    lines = [
        f'.TH SAFEGATE 1 "{date(2026, 11, 23).isoformat()}" "safegate {__version__}" "User Commands"',
        ".SH NAME",
        "safegate \\- gate heavy ML jobs on memory, temperature, locks and competing processes",
        ".SH SYNOPSIS",
    ]
    for name, cmd in commands:
        pieces = " ".join(cmd.collect_usage_pieces(typer.Context(cmd, info_name=name)))
        lines += [".PP", f"\\fBsafegate {name}\\fR " + _roff(pieces)]
    lines += [
        ".SH DESCRIPTION",
        _roff("safegate answers \"is it safe to start this job now?\" with an exit code (check), runs a job under "
              "the gate and stops it before it takes the machine down (exec), and reports the machine, its locks "
              "and how many jobs fit (status, locks, slots), and drains a Slurm node that is unsafe "
              "(slurm health). See README.md for the full description."),
        ".SH COMMANDS",
    ]
    for name, cmd in commands:
        lines += _command_section(name, cmd)
    lines.append(".SH EXIT STATUS")
    for code in ExitCode:
        label = "128+N" if code is ExitCode.SIGNALLED else str(int(code))
        lines += [".TP", f"\\fB{_roff(label)}\\fR", _roff(code.meaning)]
    lines.append(".SH ENVIRONMENT")
    for var, text in ENVIRONMENT:
        lines += [".TP", f"\\fB{_roff(var)}\\fR", _roff(text)]
    lines.append(".SH FILES")
    for path, text in FILES:
        lines += [".TP", f"\\fI{_roff(path)}\\fR", _roff(text)]
    lines.append(".SH EXAMPLES")
    for title, command in EXAMPLES:
        lines += [".PP", _roff(title) + ":", ".RS", ".nf", _roff(command), ".fi", ".RE"]
    lines += [".SH SEE ALSO", "\\fBflock\\fR(1), \\fBtimeout\\fR(1), \\fBearlyoom\\fR(8)", ""]
    return "\n".join(lines)


def completion(shell: str) -> str:
    """The completion script typer generates for *shell*; it asks safegate itself at TAB time."""
    env = {**os.environ, COMPLETE_VAR: f"source_{shell}"}
    out = subprocess.run([sys.executable, "-m", "safegate"], env=env, capture_output=True, text=True, check=True)
    # The script calls the program by the name the shell completes, safegate, not python -m.
    return out.stdout


def outputs(root: Path) -> dict[Path, str]:
    files = {root / "man" / "safegate.1": man_page()}
    files.update({root / "completions" / name: completion(shell) for shell, name in COMPLETIONS.items()})
    return files


def main(argv: list[str]) -> int:
    root = Path(__file__).resolve().parent.parent
    stale = []
    for path, text in outputs(root).items():
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(path)
            if "--check" not in argv:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for path in stale:
        print(f"{'out of date' if '--check' in argv else 'wrote'}: {path.relative_to(root)}")
    return 1 if stale and "--check" in argv else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
