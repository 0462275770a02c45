"""Each setting is one annotated field of Profile: the settings table, the overrides, the config validation, the CLI's
options, the plain check's parser and the API's keywords all come from it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from msgspec.structs import fields

from safegate import api
from safegate.cli import fastpath
from safegate.config.file import load_config
from safegate.config.model import BY_KEY, BY_PARAM, PROFILE_KEYS, SETTINGS, Profile, initial_values, parse_overrides
from safegate.errors import UsageError
from safegate.gate.preflight import resolve
from safegate.settings import effective_resume_temp
from safegate.units import Size


def test_the_table_is_the_profile_fields() -> None:
    assert {f.name for f in fields(Profile)} - {"name", "source", "memory_auto", "declared"} == set(PROFILE_KEYS)
    assert [s.key for s in SETTINGS] == [f.name for f in fields(Profile)][4:]


def test_a_profile_starts_from_every_initial_value() -> None:
    profile = Profile(name="x", source="test", **initial_values())
    assert profile.memory_margin == Size(bytes=4 << 30) and profile.max_temp == 80 and profile.grace == 10
    assert profile.interval == 0.02 and profile.lock == "heavy" and profile.gpu_margin == Size(percent=10)
    assert profile.on_hot == "pause" and profile.cgroup == "auto" and profile.throttle is False
    assert load_config(None, env={"HOME": "/nonexistent"}).profile("default").max_memory_pressure == 20


def test_a_default_is_written_once_and_shown_in_the_help() -> None:
    assert BY_KEY["memory_margin"].help_text.endswith("(default 4G).")
    assert "(default 20ms;" in BY_KEY["interval"].help_text
    assert all("{default}" not in s.help_text for s in SETTINGS)


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


def test_the_plain_check_knows_the_options_check_takes() -> None:
    assert {s.option: s.param for s in SETTINGS if "check" in s.commands} == fastpath.SETTING_OPTIONS


def test_the_api_takes_the_options_check_takes_and_no_other() -> None:
    assert "options" in inspect.signature(api.check).parameters
    with pytest.raises(TypeError, match="max_mem"):
        api.check(max_mem="1G")  # exec's, not check's
    with pytest.raises(UsageError, match=r"^gpu_mem: invalid size"):
        api.check(gpu_mem="lots")


def test_every_key_is_accepted_in_a_profile(tmp_path: Path) -> None:
    samples = {"text": '"x"', "regexes": "['x']", "memory": '"1G"', "size": '"1G"', "limit": '"1G"', "lock": '"l"',
               "temp": "70", "percent": "50", "rules": "[]", "duration": '"1s"', "interval": '"50ms"',
               "signal": '"USR1"', "nice": "5", "on_hot": '"warn"', "cgroup": '"off"', "command": '"true"',
               "switch": "true", "path": '"/tmp/log"', "gpu": '"0"', "license": '"w"', "oom_score_adj": "300"}
    body = "\n".join(f"{s.key} = {samples[s.kind]}" for s in SETTINGS)
    path = tmp_path / "all.toml"
    path.write_text(f"[profiles.all]\n{body}\n")
    profile = load_config(str(path)).profile("all")
    assert profile.max_temp == 70 and profile.interval == 0.05 and profile.log == "/tmp/log"


def test_one_parser_per_option_with_one_message() -> None:
    assert parse_overrides({"interval": "20ms"}, command="exec") == {"interval": 0.02}
    with pytest.raises(UsageError, match=r"^--interval: '5s' is outside 1ms..1s"):
        parse_overrides({"interval": "5s"}, command="exec")
    assert BY_PARAM["mem"].key == "memory" and BY_PARAM["margin"].key == "memory_margin"
    assert BY_PARAM["gpu_mem"].key == "gpu_memory"


def test_overrides_replace_the_profiles_fields(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[profiles.p]\nmax_mem = "2G"\ngpu = "1"\nlog = "/tmp/p.log"\n')
    config = load_config(str(path))
    plain = resolve(config, "p", {}).profile
    assert (plain.max_mem, plain.gpu, plain.log) == (Size(bytes=2 << 30), (1,), "/tmp/p.log")
    given = parse_overrides({"max_mem": "3G", "gpu": "auto", "log": ""}, command="exec")
    job = resolve(config, "p", given).profile
    # --gpu auto replaces the profile's cards; an empty --log falls back to the profile's.
    assert (job.max_mem, job.gpu, job.log) == (Size(bytes=3 << 30), None, "/tmp/p.log")


def test_resume_temperature_rule() -> None:
    assert effective_resume_temp(80, None) == 75
    assert effective_resume_temp(80, 70) == 70
    assert effective_resume_temp(60, 70) == 55  # a --max-temp below the profile's resume_temp


def test_every_value_completion_offers_is_accepted() -> None:
    # The choices are the parser's own: each option of a fixed set offers them, and each parses.
    offered = {s.key: s.choices() for s in SETTINGS if s.choices()}
    assert offered.keys() == {"on_hot", "cgroup", "throttle", "gpu", "warn_signal", "nice"}
    assert offered["on_hot"] == ("pause", "kill", "warn") and offered["cgroup"] == ("auto", "on", "off")
    for key, values in offered.items():
        for value in values:
            BY_KEY[key].parse(value)
    assert all(s.option is not None for s in SETTINGS if s.choices())  # a config-only setting completes nothing
