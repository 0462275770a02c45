"""README, --help and the code must not disagree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import REPO, Procs, Run, hold_with_safegate

from safegate.config.model import PROFILE_KEYS as _PROFILE_KEYS
from safegate.exitcodes import ExitCode, table_markdown, table_plain

README = (REPO / "README.md").read_text()


def test_readme_exit_code_table_is_the_enum() -> None:
    block = README.split("<!-- exit-codes:", 1)[1].split("-->", 1)[1].split("<!-- /exit-codes -->", 1)[0]
    assert block.strip() == table_markdown()


def test_help_epilog_lists_every_exit_code(run: Run) -> None:
    out = run("check", "--help").stdout
    help_lines = [" ".join(line.split()) for line in out.split("Exit codes:", 1)[1].strip().splitlines()]
    assert help_lines == [" ".join(line.split()) for line in table_plain().splitlines()]
    assert [line.split()[0] for line in help_lines] == [
        "128+N" if c is ExitCode.SIGNALLED else str(int(c)) for c in ExitCode
    ]


def _help_options(run: Run, *command: str) -> set[str]:
    out = run(*command, "--help").stdout
    options = out.split("Options:", 1)[1].split("Exit codes")[0]
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", options)) - {"--help"}


@pytest.mark.parametrize("command", ["check", "exec", "report"])
def test_readme_option_table_matches_help(run: Run, command: str) -> None:
    table = README.split(f"<!-- options: {command} -->", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"(--[a-z][a-z-]+)", table))
    assert documented == _help_options(run, command)


@pytest.mark.parametrize("command", ["check", "exec"])
def test_readme_synopsis_matches_help(run: Run, command: str) -> None:
    synopsis = README.split(f"safegate {command} [-p PROFILE]", 1)[1].split("```", 1)[0]
    assert set(re.findall(r"--[a-z-]+", synopsis)) | {"--profile", "--quiet"} == _help_options(run, command)


def test_readme_profile_keys_match_the_config_schema() -> None:
    line = README.split("Profile keys:", 1)[1].split(".", 1)[0]
    assert set(re.findall(r"`(\w+)`", line)) == _PROFILE_KEYS


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    awk = re.search(r"cmd=\$\(awk '(.+)' README.md\)", ci)
    assert awk is not None
    extracted = subprocess.run(["awk", awk.group(1), str(REPO / "README.md")], capture_output=True, text=True,
                               check=True).stdout.strip()
    fenced = README.split("<!-- test-command -->", 1)[1].split("```sh\n", 1)[1].split("\n", 1)[0]
    assert extracted == fenced and "pytest" in extracted and "venv" in extracted


def _all_options(run: Run) -> dict[str, set[str]]:
    commands = ["check", "exec", "slots", "need", "locks", "queue", "unlock", "profiles", "status", "report",
                "metrics", "slurm health"]
    return {c: _help_options(run, *c.split()) for c in commands}


def test_every_command_and_option_is_in_the_readme_and_the_man_page(run: Run) -> None:
    man = (REPO / "man" / "safegate.1").read_text().replace("\\-", "-")
    for command, options in _all_options(run).items():
        assert f"safegate {command}" in README and f"safegate {command}" in man
        for option in options:
            assert option in README, f"{command} {option} missing from README"
            assert option in man, f"{command} {option} missing from the man page"


def test_generated_files_are_up_to_date() -> None:
    result = subprocess.run([sys.executable, "-m", "safegate.cli.docgen", "--check"], capture_output=True, text=True,
                            cwd=REPO)
    assert result.returncode == 0, f"run python -m safegate.cli.docgen: {result.stdout}"


def test_man_page_renders_without_warnings() -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    result = subprocess.run(["groff", "-ww", "-z", "-man", str(REPO / "man" / "safegate.1")], capture_output=True,
                            text=True)
    assert result.returncode == 0 and result.stderr == ""
    if shutil.which("man"):
        page = subprocess.run(["man", "-l", str(REPO / "man" / "safegate.1")], capture_output=True, text=True,
                              env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "100"})
        assert "EXIT STATUS" in page.stdout and "safegate exec" in page.stdout


def test_bash_completion_completes_in_real_bash(env: dict[str, str]) -> None:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    script = (
        f'source {REPO / "completions" / "safegate.bash"}\n'
        "complete -p safegate\n"
        'COMP_WORDS=(safegate check -p whisper); COMP_CWORD=3; _safegate_completion safegate\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
        'COMP_WORDS=(safegate sta); COMP_CWORD=1; _safegate_completion safegate\n'
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    path = f"{Path(sys.executable).parent}:{env['PATH']}"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={**env, "PATH": path})
    lines = out.stdout.splitlines()
    assert lines[0].startswith("complete") and "_safegate_completion" in lines[0]
    assert "whisper-large-v3" in lines and "status" in lines, out.stdout + out.stderr


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_other_shells_load_and_complete(shell: str, env: dict[str, str]) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here")
    name = {"zsh": "_safegate", "fish": "safegate.fish"}[shell]
    script = REPO / "completions" / name
    if shell == "zsh":
        # Load it as zsh does, then run the completion the function would run for "safegate ch<TAB>".
        code = (f"autoload -U compinit; compinit -u; source {script}; whence -w _safegate_completion; "
                "_TYPER_COMPLETE_ARGS='safegate ch' _SAFEGATE_COMPLETE=complete_zsh safegate")
    else:
        code = f"source {script}; complete -C 'safegate ch'"
    path = f"{Path(sys.executable).parent}:{env['PATH']}"
    result = subprocess.run([shell, "-c", code], capture_output=True, text=True, env={**env, "PATH": path})
    assert result.returncode == 0, result.stderr
    assert "check" in result.stdout, result.stdout
    if shell == "zsh":
        assert "_safegate_completion: function" in result.stdout


# What each shell offers for an option's value: the fixed sets come from the settings table (settings.CHOICES),
# profiles from the config, lock names from the lock dir (night-train is held by the test).
VALUE_COMPLETIONS = [
    ("exec --on-hot ", {"pause", "kill", "warn"}),
    ("exec --cgroup ", {"auto", "on", "off"}),
    ("exec --throttle ", {"on", "off"}),
    ("check --gpu ", {"auto"}),  # no NVIDIA driver here: no indexes (tests/test_gpu.py has them)
    ("exec --warn-signal SIGUS", {"SIGUSR1", "SIGUSR2"}),
    ("exec --nice 1", {"1", *(str(n) for n in range(10, 20))}),
    ("check -p whi", {"whisper-large-v3"}),
    ("slots --lock night", {"night-train"}),
]


def _completion_script(shell: str) -> str:
    """One script for *shell* that completes every VALUE_COMPLETIONS line as the shell's own completion would,
    printing "== i" before the values offered for line i."""
    lines = []
    for i, (line, _) in enumerate(VALUE_COMPLETIONS):
        words = ["safegate", *line.split()] + ([""] if line.endswith(" ") else [])
        quoted = " ".join(f"'{w}'" for w in words)
        lines.append(f"echo '== {i}'")
        if shell == "bash":  # the function complete -F calls, with the words bash hands it
            lines.append(f'COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; _safegate_completion safegate; '
                         'printf "%s\\n" "${COMPREPLY[@]}"')
        elif shell == "zsh":  # the function compdef registered, with the words zsh hands it; its _arguments caught
            lines.append(f"words=({quoted}); CURRENT={len(words)}; _safegate_completion")
        else:
            lines.append(f"complete -C 'safegate {line}'")
    name = {"bash": "safegate.bash", "zsh": "_safegate", "fish": "safegate.fish"}[shell]
    setup = {"bash": "", "fish": "",
             "zsh": "autoload -U compinit; compinit -u; _arguments() { print -r -- \"$@\" }\n"}[shell]
    return setup + f"source {REPO / 'completions' / name}\n" + "\n".join(lines) + "\n"


def _offered(shell: str, output: str) -> list[set[str]]:
    blocks = re.split(r"^== \d+\n", output, flags=re.M)[1:]
    if shell == "zsh":  # _arguments '*: :(("pause" "kill" "warn"))': the values are the quoted words
        return [set(re.findall(r'"((?:[^"]|"")*)"', block)) for block in blocks]
    return [{line.split("\t")[0] for line in block.splitlines() if line} for block in blocks]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_option_values_complete_in_real_shells(shell: str, env: dict[str, str], lock_dir: Path,
                                               procs: Procs) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed here")
    hold_with_safegate(procs, lock_dir, "night-train")
    path = f"{Path(sys.executable).parent}:{env['PATH']}"
    result = subprocess.run([shell, "-c", _completion_script(shell)], capture_output=True, text=True,
                            env={**env, "PATH": path}, cwd=lock_dir)
    assert result.returncode == 0, result.stderr
    offered = _offered(shell, result.stdout)
    assert len(offered) == len(VALUE_COMPLETIONS), result.stdout
    for (line, expected), got in zip(VALUE_COMPLETIONS, offered, strict=True):
        assert got == expected, f"{shell}: safegate {line}<TAB> offered {sorted(got)}"


def test_every_command_summary_in_help_is_whole(run: Run) -> None:
    # click cuts a summary that does not fit the 80 columns ("each profile's last..."); each must fit whole.
    import typer.main
    from typer.core import TyperGroup

    from safegate.cli.app import app

    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    for path, cmd in [((), group), (("slurm",), group.commands["slurm"])]:
        assert isinstance(cmd, TyperGroup)
        out = run(*path, "--help", env={**run.env, "COLUMNS": "80"}).stdout
        listed = dict(re.findall(r"^  (\S+) +(.+)$", out.split("Commands:", 1)[1], flags=re.M))
        assert listed.keys() == cmd.commands.keys()
        for name, sub in cmd.commands.items():
            assert listed[name] == sub.get_short_help_str(limit=10_000), f"{' '.join(path)} {name}: {listed[name]}"


def test_every_command_help_has_an_example(run: Run) -> None:
    for command in _all_options(run):
        out = run(*command.split(), "--help").stdout
        assert "Example" in out and "safegate" in out.split("Example", 1)[1], command


def test_readme_signal_section_is_the_generated_text() -> None:
    from safegate.cli.docgen import signal_paragraphs

    block = README.split("<!-- signals:", 1)[1].split("-->\n", 1)[1].split("\n<!-- /signals -->", 1)[0]
    assert block == "\n\n".join(signal_paragraphs())
    man = (REPO / "man" / "safegate.1").read_text()
    assert ".SH SIGNALS AND THE TERMINAL" in man and "SIGRTMIN to SIGRTMAX" in man


def test_readme_api_keywords_are_the_generated_text() -> None:
    from safegate.cli.docgen import api_keywords

    block = README.split("<!-- api-keywords:", 1)[1].split("-->\n", 1)[1].split("\n<!-- /api-keywords -->", 1)[0]
    assert block == api_keywords()


def test_readme_grant_section_is_the_generated_text() -> None:
    from safegate.cli.docgen import grant_paragraphs

    block = README.split("<!-- grants:", 1)[1].split("-->\n", 1)[1].split("\n<!-- /grants -->", 1)[0]
    assert block == "\n\n".join(grant_paragraphs())
    man = (REPO / "man" / "safegate.1").read_text()
    assert ".SH A PASSING CHECK IS A GRANT" in man and "re\\-entrant" in man


def test_man_page_stands_alone() -> None:
    # Installed without the README: the config file, its keys, the files and the environment are in it.
    from safegate.config.model import SETTINGS

    man = (REPO / "man" / "safegate.1").read_text().replace("\\-", "-").replace("\\fB", "").replace("\\fR", "")
    assert "README" not in man
    config = man.split(".SH CONFIGURATION", 1)[1].split(".SH ", 1)[0]
    for setting in SETTINGS:
        assert f"\n{setting.key} (" in config, setting.key
    for word in ("lock_dir", "legacy_lock_files", "[defaults]", "[thermal]", "[gpu]", "program", "args", "Sizes",
                 "Durations"):
        assert word in config, word
    environment = man.split(".SH ENVIRONMENT", 1)[1].split(".SH ", 1)[0]
    for var in ("XDG_STATE_HOME", "NO_COLOR", "SLURM_JOB_ID", "SLURM_MEM_PER_NODE", "SLURM_JOB_LICENSES"):
        assert var in environment, var
    assert "history.json" in man.split(".SH FILES", 1)[1]
    assert '"$(safegate slots' not in man


def test_readme_and_help_say_the_same_of_what_a_memory_limit_measures() -> None:
    # Issue 25: exec --help said --max-mem measures PSS, the README RSS (PSS near the limit). Each row is the
    # option's --help text, as the table writes it (lower case first, no final period).
    import typer

    from safegate.cli.app import app

    exec_command = typer.main.get_command(app).commands["exec"]  # type: ignore[attr-defined]
    helps = {p.opts[0]: p.help for p in exec_command.params if p.opts[0] in ("--max-mem", "--max-gpu-mem")}
    assert set(helps) == {"--max-mem", "--max-gpu-mem"}
    for option, text in helps.items():
        meaning = text.rstrip(".")
        assert f"| `{option} SIZE` | {meaning[:1].lower()}{meaning[1:]} |" in README.splitlines(), option
    # What it measures is what safegate/run measures: the cgroup's figure, else RSS with PSS near the limit.
    assert "PSS of its process tree" not in helps["--max-mem"]
    assert "RSS" in helps["--max-mem"] and "PSS" in helps["--max-mem"] and "cgroup" in helps["--max-mem"]


def test_sizes_and_units_are_documented_once(run: Run) -> None:
    from safegate.cli.options import units_text

    block = README.split("<!-- units:", 1)[1].split("-->\n", 1)[1].split("\n<!-- /units -->", 1)[0]
    assert block == units_text()
    man = (REPO / "man" / "safegate.1").read_text().replace("\\-", "-")
    assert units_text() in man
    for command in ("check", "exec", "slots"):
        shown = " ".join(run(command, "--help").stdout.split())
        assert units_text(command) in shown, command
    assert "12GB is 12,000,000,000 bytes, 11.2 GiB" in units_text() and "at least 1.0 MiB" in units_text()
