"""Generate the man page and the shell completions from the CLI itself, so they cannot drift.

    python -m safegate.cli.docgen            # rewrite man/safegate.1 and completions/*
    python -m safegate.cli.docgen --check    # exit 1 when a committed file is out of date
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
from safegate.cli.app import app
from safegate.cli.options import units_text
from safegate.cli.plain import COMPLETE_VAR
from safegate.config.model import SETTINGS
from safegate.exitcodes import ExitCode
from safegate.run.procctl import FAULTS, FORWARDED


def signal_paragraphs() -> list[str]:
    """How exec handles signals and the terminal: README's signals block and the man page's section, one text."""
    import signal

    named = ", ".join(signal.Signals(s).name for s in FORWARDED if s < signal.SIGRTMIN)
    *faults, last = (signal.Signals(s).name for s in FAULTS)
    return [
        f"Forwarded to the job's process group: {named}, and the real-time signals SIGRTMIN to SIGRTMAX (named "
        f"SIGRTMIN+N in messages); also the synchronous faults {', '.join(faults)} and {last} when another "
        "process sent them (kill -ILL). A real fault in safegate itself ends it; its job then gets SIGTERM from "
        "the kernel (SIGKILL if it ignores or blocks SIGTERM). Not forwarded: SIGCHLD (safegate reaps the job), "
        "SIGPIPE, SIGXFSZ and SIGURG. SIGKILL and SIGSTOP cannot be caught.",
        "A signal the caller ignores (nohup's SIGHUP; SIGINT and SIGQUIT for a script's & job) stays ignored in the "
        "job and is not forwarded. A signal blocked in the caller's mask stays blocked in the job; safegate itself "
        "takes the signals it forwards whatever its mask, so they reach the job (pending, until it unblocks them).",
        "safegate's own SIGTERM (at a breach, or to what the job's main process left running) reaches each process "
        "of the job once, followed by SIGCONT to those that are stopped (a running process sees only SIGTERM); "
        "processes that appear during --grace are asked too; SIGKILL after it. A fork-and-exit chain is followed "
        "and stopped (safegate is the job's subreaper).",
        "The terminal: when stdin, stdout or stderr is safegate's controlling terminal and safegate is in its "
        "foreground, the job's process group gets the foreground (tcsetpgrp, as tini does), so the job reads the "
        "terminal, and Ctrl-C reaches it directly. safegate takes the foreground back when the job's "
        "main process ends, unless the shell has taken it meanwhile.",
        "Job control: Ctrl-Z (or the job stopped by a background read) stops the job, then safegate, so the shell "
        "sees its job stopped. SIGTSTP, SIGTTIN or SIGTTOU sent to safegate goes to the job, and safegate stops "
        "once the job has stopped: safegate never stops while its job runs, so a job that catches SIGTSTP runs on, "
        "watched. SIGCONT (fg, bg) continues both; after fg the job gets the foreground again. A job paused for "
        "heat (--on-hot pause) stays paused until it cools.",
    ]


def api_keywords() -> str:
    """The Python API's setting keywords, from the settings table: README's api-keywords block."""
    from safegate.config.model import SETTINGS

    names = ", ".join(f"`{s.param}`" for s in SETTINGS if "check" in s.commands)
    return (f"`check`, `hold` and `slots` take the settings `safegate check` takes, as keywords named like its "
            f"options: {names}. A value is what the option takes (`\"6G\"`, `\"10%\"`, `\"auto\"`); a size may "
            "also be an int of bytes, a temperature a number. Any other keyword is a `TypeError`.")


# Options whose README row is the setting's help itself, so README and --help cannot disagree on what they do.
README_ROWS = ("max_mem", "max_gpu_mem")


def readme_option_row(key: str) -> str:
    """*key*'s row of README's option table: its option and metavar, and its help as the table writes it."""
    from safegate.config.model import BY_KEY

    setting = BY_KEY[key]
    text = setting.help_text.rstrip(".")
    return f"| `{setting.option} {setting.metavar}` | {text[:1].lower()}{text[1:]} |"


def grant_paragraphs() -> list[str]:
    """What a passing check reserves, for whom and until when: README's grants block and the man page's section."""
    from safegate.gate.grant import GRANT_LEASE

    return [
        "A passing check reserves what it checked (the profile's lock and its memory need; nothing when it has "
        "neither) for the job that follows, decided under the same machine-wide admission lock as exec, so two "
        "checks at once are never both granted what fits once. Four copies of `safegate check -q -p X && job` "
        "started together run one job; with --wait, all four, one at a time.",
        "Who gets it: check's parent, or --grant-to PID. The job is the first process that parent starts after "
        "check exits (not another safegate check), or the parent itself when it execs the job in place (bash does "
        f"for the last command of sh -c). It must start within {GRANT_LEASE:g} s. In a script, `safegate check || "
        "exit` grants to the next command the script runs. Under GNU parallel's --limit (the adapter passes "
        "parallel's pid), the job is parallel's next job process, not its helpers or its next --limit probe.",
        "How it is held: check leaves a keeper process (its own session, stdio on /dev/null, none of the caller's "
        "descriptors: x=$(safegate check --json) and cron's mail never wait for it) that holds the lock and the "
        "need; locks, status and check show it as granted to the parent's job. It ends when the job exits, when "
        f"the parent exits before starting one, or after {GRANT_LEASE:g} s without one: nothing stays held after "
        "an interactive `check && job`.",
        "Who may use it: only the job and its descendants (and the parent asking again before it has started the "
        "job): `check && safegate exec ...` runs exec inside the grant, and `check && flock LOCKFILE job` works "
        "(the keeper sees the job waiting for the lock and hands it over). Everyone else sees the lock held (13). "
        "The need counts for others until the job's own memory has reached it.",
        "No grant, with a note, when the parent is PID 1 or a service manager (a systemd ExecStartPre= check would "
        "grant nothing: run the job with safegate exec), or another user. --no-grant (reserve=False in Python) only "
        "asks, for monitoring and dashboards.",
        "A lock is re-entrant for the job that holds it: a check, exec or hold whose lock is held by a safegate job "
        "or grant among its own ancestors (or, for hold, by the same process) runs inside that hold (\"inside the "
        "job that holds X\"), takes no second lock, and that hold's reservation is not counted against it. Nested "
        "exec and nested hold never wait on themselves.",
    ]


COMPLETIONS = {"bash": "safegate.bash", "zsh": "_safegate", "fish": "safegate.fish"}

ENVIRONMENT = [
    ("SAFEGATE_CONFIG", "Config file to use."),
    ("SAFEGATE_PROFILE", "Profile when -p is not given (for exec, instead of choosing by match)."),
    ("SAFEGATE_LOCK_DIR", "Lock directory, an absolute path; beats lock_dir in the config."),
    ("SAFEGATE_GPU", "GPU backend: auto (NVML and DRM), nvml, drm or none."),
    ("SAFEGATE_DEBUG", "Show a traceback for an internal error (exit 125)."),
    ("XDG_CONFIG_HOME", "Where the per-user config is looked for."),
    ("XDG_STATE_HOME", "Where the history of exec runs is kept (default ~/.local/state)."),
    ("NO_COLOR", "When set, status --watch prints plain successive reports instead of redrawing."),
    ("CUDA_VISIBLE_DEVICES", "When set, exec leaves it alone and only those NVIDIA GPUs are considered."),
    ("ROCR_VISIBLE_DEVICES, HIP_VISIBLE_DEVICES", "When either is set, exec leaves both alone and only those AMD "
     "GPUs are considered (ROCR's indexes count the AMD cards, HIP's what ROCR leaves)."),
    ("SLURM_JOB_ID", "Inside a Slurm job: exec applies the job's memory allocation as max_mem (unless set) and "
                     "requires a profile's slurm_license."),
    ("SLURM_MEM_PER_NODE, SLURM_MEM_PER_CPU, SLURM_CPUS_ON_NODE, SLURM_JOB_CPUS_PER_NODE",
     "The job's memory allocation, per node or per CPU times its CPUs."),
    ("SLURM_JOB_LICENSES", "The licenses the job holds (for slurm_license)."),
]
FILES = [
    ("$XDG_CONFIG_HOME/safegate/config.toml", "Per-user config (default ~/.config/safegate/config.toml)."),
    ("/etc/safegate/config.toml", "System-wide config."),
    ("/run/lock/safegate/NAME.lock", "A lock, locked with flock(2); /tmp/safegate where /run/lock is absent."),
    ("/run/lock/safegate/NAME.holder-TOKEN.json", "Who holds the lock NAME, since when, and the memory it reserves: "
     "one file per holder, trusted only while its writer holds the lock."),
    ("/run/lock/safegate/.ticket.ARRIVAL.PID.json", "A waiter's place in line (safegate queue)."),
    ("$XDG_STATE_HOME/safegate/history.json", "What past exec runs of each profile used, for memory = \"auto\"; "
     "advisory."),
]
# The config file, for the man page: top-level keys and tables (profile keys come from the settings table).
CONFIG_KEYS = [
    ("lock_dir", "Lock directory (absolute path); SAFEGATE_LOCK_DIR beats it."),
    ("legacy_lock_files", "Old shell gates' pid files: a live pid blocks every check; exec of a profile with a "
                          "lock writes its job's pid into them while it runs."),
    ("[defaults]", "Profile keys every profile inherits unless it sets them (not match, lock, memory)."),
    ("[thermal] sensors, ignore, files, require", "chip:label globs of CPU sensors to use and to ignore, raw "
     "sysfs files in millidegrees, and whether no readable sensor blocks."),
    ("[gpu] backend", "auto (NVML where loadable, and the DRM cards), nvml, drm or none (SAFEGATE_GPU beats it)."),
    ("[profiles.NAME]", "A profile: the keys below. A built-in profile's name overrides it key by key."),
]
RULE_KEYS = ("competing rules: a list of tables with program (a regex over the whole program name: argv[0]'s "
             "basename, or an interpreter's script or -m module) and optional args (searched in its arguments), "
             "or pattern (searched in the whole command line); action block (default) or warn; optional min_rss. "
             "Regexes are RE2 syntax, matched in linear time; backreferences and lookaround are refused.")
VALUES = "Temperatures are in degrees Celsius."
EXAMPLES = [
    ("Start a job only when it is safe", "safegate check -p whisper-large-v3 -q && whisper --model large-v3 a.mp3"),
    ("Run a job under the gate, waiting for its turn", "safegate exec --wait -- whisper --model large-v3 a.mp3"),
    ("Stop a training run before it eats the machine",
     "safegate exec --max-mem 12G --log run.jsonl -- python train.py"),
    ("The morning after: one HTML page of the night's jobs", "safegate report run.jsonl -o night.html"),
    ("As many jobs as fit now (nothing when none does)",
     "n=$(safegate slots -p small-model --max 8) && ls *.wav | xargs -P \"$n\" -n 1 small-model"),
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
    # The units paragraph of check's, exec's and slots' epilogs has a section of its own here.
    epilog = [p for p in (cmd.epilog or "").split("\n\n") if p.strip() and not p.startswith("\b\nSizes:")]
    if epilog and "Exit codes" not in cmd.epilog:
        lines += [".PP", _roff(" ".join(epilog).strip())]
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


def _configuration() -> list[str]:
    """The config file's keys, profile keys from the settings table: what README's config section says, here."""
    lines = [".SH CONFIGURATION", _roff("TOML, the first found of: --config PATH, $SAFEGATE_CONFIG, "
                                        "$XDG_CONFIG_HOME/safegate/config.toml, /etc/safegate/config.toml. "
                                        "Command-line option > environment > config file > built-in default.")]
    for key, text in CONFIG_KEYS:
        lines += [".TP", f"\\fB{_roff(key)}\\fR", _roff(text)]
    lines += [".SS Profile keys"]
    for setting in SETTINGS:
        where = f" (option {setting.option})" if setting.option else ""
        lines += [".TP", f"\\fB{_roff(setting.key)}\\fR ({_roff(setting.kind)})", _roff(setting.help_text + where)]
    lines += [".PP", _roff(RULE_KEYS), ".SS Sizes and durations", _roff(units_text()), ".PP", _roff(VALUES)]
    return lines


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
              "and how many jobs fit (status, locks, slots, metrics), turns exec's logs into one HTML report of "
              "the night (report), and drains a Slurm node that is unsafe (slurm health). Waiters are served in "
              "arrival order (queue)."),
        ".SH COMMANDS",
    ]
    for name, cmd in commands:
        lines += _command_section(name, cmd)
    lines.append(".SH A PASSING CHECK IS A GRANT")
    for paragraph in grant_paragraphs():
        lines += [".PP", _roff(paragraph)]
    lines.append(".SH SIGNALS AND THE TERMINAL")
    for paragraph in signal_paragraphs():
        lines += [".PP", _roff(paragraph)]
    lines.append(".SH EXIT STATUS")
    for code in ExitCode:
        label = "128+N" if code is ExitCode.SIGNALLED else str(int(code))
        lines += [".TP", f"\\fB{_roff(label)}\\fR", _roff(code.meaning)]
    lines += _configuration()
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
    root = Path(__file__).resolve().parents[2]
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
