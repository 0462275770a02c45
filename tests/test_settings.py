"""The settings table is the one definition: Profile, the overrides, the config validation and the CLI follow it."""

from __future__ import annotations

from pathlib import Path

import pytest
from msgspec.structs import fields

from safegate.config.file import load_config
from safegate.config.model import Profile
from safegate.errors import ValueParseError
from safegate.gate.preflight import Overrides, Settings
from safegate.settings import BY_KEY, OPTION_KEYS, PROFILE_KEYS, SETTINGS, effective_resume_temp, parse_option


def _fields(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def test_profile_has_exactly_the_table_keys() -> None:
    assert _fields(Profile) - {"name", "source", "memory_auto"} == set(PROFILE_KEYS)


def test_overrides_have_exactly_the_options() -> None:
    assert _fields(Overrides) - {"explicit_gpu"} == set(OPTION_KEYS)


def test_every_exec_setting_reaches_the_resolved_settings() -> None:
    exec_keys = {s.key for s in SETTINGS if s.commands == {"exec"}}
    assert exec_keys <= _fields(Settings)


def test_every_option_is_in_the_help_of_its_commands() -> None:
    from typer.testing import CliRunner

    from safegate.cli.app import app

    runner = CliRunner()
    for command in ("check", "exec", "slots"):
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        declared = {line.split()[0] for line in text.splitlines() if line.startswith("  --")}
        for setting in SETTINGS:
            if setting.option is not None:
                assert (setting.option in declared) == (command in setting.commands), (command, setting.key)


def test_every_key_is_accepted_in_a_profile(tmp_path: Path) -> None:
    samples = {"text": '"x"', "regexes": "['x']", "memory": '"1G"', "size": '"1G"', "lock": '"l"', "temp": "70",
               "percent": "50", "rules": "[]", "duration": '"1s"', "interval": '"50ms"', "signal": '"USR1"',
               "nice": "5", "on_hot": '"warn"', "cgroup": '"off"', "command": '"true"', "switch": "true",
               "path": '"/tmp/log"', "gpu": '"0"', "license": '"w"'}
    body = "\n".join(f"{s.key} = {samples[s.kind]}" for s in SETTINGS)
    path = tmp_path / "all.toml"
    path.write_text(f"[profiles.all]\n{body}\n")
    profile = load_config(str(path)).profile("all")
    assert profile.max_temp == 70 and profile.interval == 0.05 and profile.log == "/tmp/log"


def test_one_parser_per_option_with_one_message() -> None:
    assert parse_option("interval", "20ms") == 0.02
    with pytest.raises(ValueParseError, match=r"'5s' is outside 1ms..1s"):
        parse_option("interval", "5s")
    assert BY_KEY["memory"].option == "--mem" and BY_KEY["memory_margin"].option == "--margin"


def test_resume_temperature_rule() -> None:
    assert effective_resume_temp(80, None) == 75
    assert effective_resume_temp(80, 70) == 70
    assert effective_resume_temp(60, 70) == 55  # a --max-temp below the profile's resume_temp
