"""Config files: the documented example, precedence, merging, and every kind of mistake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import TIMEOUT

from safegate.config import file as config_module
from safegate.config.file import find_config_path, load_config
from safegate.config.model import DEFAULT_CPU_SENSORS, PROFILE_KEYS, SETTINGS
from safegate.errors import ConfigError
from safegate.regex import compiled

GiB = 1024**3

EXAMPLE = """
lock_dir = "/run/lock/safegate"
legacy_lock_files = ["/tmp/j5a_locks/whisper_large.lock"]

[defaults]
memory_margin = "4G"
max_temp = 80
resume_temp = 75
max_memory_pressure = 20      # PSI some avg10, percent

[thermal]
sensors = ["coretemp:Package*", "k10temp:Tctl"]   # [] = no psutil sensors
ignore = ["acpitz:*"]
files = ["/sys/class/hwmon/hwmon3/temp1_input"]   # millidegrees C
require = false

[profiles.whisper-large-v3]
match = ['whisper.*large']    # exec picks this profile when the command matches
memory = "10G"
lock = "whisper-large"

[[profiles.whisper-large-v3.competing]]
pattern = 'whisper.*large'
action = "block"

[[profiles.whisper-large-v3.competing]]
pattern = 'claude'
action = "warn"
min_rss = "500M"
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_builtin_profiles_without_any_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not the machine's /etc/safegate/config.toml, which may exist: a system config path with nothing there.
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", tmp_path / "etc" / "config.toml")
    cfg = load_config(env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert cfg.path is None
    whisper = cfg.profile("whisper-large-v3")
    assert whisper.memory.bytes == 10 * GiB and whisper.lock == "whisper-large" and whisper.source == "built-in"
    assert [r.action for r in whisper.competing][:2] == ["block", "warn"]
    default = cfg.profile("default")
    assert default.lock == "heavy" and default.memory.bytes == 0 and default.memory_margin.bytes == 4 * GiB
    assert [(r.pattern, r.action, str(r.min_rss)) for r in default.competing] == [(".", "warn", "25%")]
    assert cfg.thermal.sensors == DEFAULT_CPU_SENSORS


def test_builtin_regexes_are_re2(tmp_path: Path) -> None:
    # The built-in profiles' regexes are trusted at load (RE2 is imported when a rule is first tried): each one
    # must compile, and load as a config file's would.
    builtin = load_config(write(tmp_path, "")).profiles
    patterns = {p for profile in builtin.values() for p in profile.match}
    patterns |= {p for profile in builtin.values() for r in profile.competing for p in (r.pattern, r.program, r.args)
                 if p is not None}
    assert {"whisper.*large", "whisper", "large", "."} <= patterns
    for pattern in patterns:
        compiled(pattern)
    text = "".join(f"[profiles.p{i}]\nmatch = [{json.dumps(p)}]\n" for i, p in enumerate(sorted(patterns)))
    load_config(write(tmp_path, text))


def _modules_after(code: str, env: dict[str, str]) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"], env=env,
                         capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
    return set(out.split())


def test_re2_is_imported_only_for_a_pattern(tmp_path: Path, env: dict[str, str]) -> None:
    # A check with only the built-in profiles never pays for importing re2 (about 3 ms) until a rule is tried;
    # a config file's pattern is compiled when it is read, to refuse what RE2 cannot run.
    load = "from safegate.config.file import load_config\nconfig = load_config({!r})"
    assert "re2" not in _modules_after(load.format(write(tmp_path, "")), env)
    with_rule = write(tmp_path, "[profiles.night]\ncompeting = [{ pattern = 'x' }]\n")
    assert "re2" in _modules_after(load.format(with_rule), env)
    tried = load.format(write(tmp_path, "")) + "\nconfig.profile_for_command(['whisper', 'large'])"
    assert "re2" in _modules_after(tried, env)


def test_documented_example_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, EXAMPLE))
    assert cfg.lock_dir == Path("/run/lock/safegate")
    assert cfg.legacy_lock_files == (Path("/tmp/j5a_locks/whisper_large.lock"),)
    assert cfg.thermal.sensors == ("coretemp:Package*", "k10temp:Tctl") and cfg.thermal.ignore == ("acpitz:*",)
    whisper = cfg.profile("whisper-large-v3")
    assert whisper.source.endswith("config.toml") and whisper.resume_temp == 75
    assert len(whisper.competing) == 2  # the file's list replaces the built-in one


def test_profile_overrides_builtin_key_by_key(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[profiles.whisper-large-v3]\nmemory = "8G"\n'))
    whisper = cfg.profile("whisper-large-v3")
    assert whisper.memory.bytes == 8 * GiB and whisper.lock == "whisper-large" and whisper.competing


def test_defaults_apply_to_every_profile(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[defaults]\nmax_temp = 70\n[profiles.llm]\nmemory = "20G"\n'))
    assert cfg.profile("llm").max_temp == 70 and cfg.profile("default").max_temp == 70
    assert cfg.profile("llm").effective_resume_temp == 65


def test_unknown_profile_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown profile 'nope': known profiles are default, whisper-large-v3"):
        load_config(write(tmp_path, "")).profile("nope")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lock_dir = 3", "lock_dir: expected a directory path"),
        ("bogus = 1", "bogus: unknown key"),
        ("[defaults]\nmemory_margin = \"4GG\"", "defaults.memory_margin: invalid size '4GG'"),
        ("[defaults]\nmax_temp = \"hot\"", "defaults.max_temp: invalid temperature 'hot'"),
        ("[defaults]\nmax_temp = true", "defaults.max_temp: expected a temperature"),
        ("[defaults]\nmax_memory_pressure = 120", "defaults.max_memory_pressure: expected a percentage"),
        ("[defaults]\nlock = \"x\"", "defaults.lock: is per profile"),
        ("[thermal]\nsensors = \"coretemp:*\"", "thermal.sensors: expected a list of strings"),
        ("[thermal]\nsensors = [\"coretemp\"]", "expected 'chip:label' globs"),
        ("[thermal]\nrequire = \"yes\"", "thermal.require: expected true or false"),
        ("[thermal]\nfan = 1", "thermal.fan: unknown key"),
        ("[profiles.night]\nmemory = \"10GG\"", "profiles.night.memory: invalid size '10GG'"),
        ("[profiles.night]\nlock = \"../x\"", "profiles.night.lock: invalid lock name '../x'"),
        ("[profiles.night]\nmatch = ['(']", "profiles.night.match: invalid regular expression"),
        ("[profiles.night]\nmemroy = \"1G\"", "profiles.night.memroy: unknown key"),
        ("[[profiles.night.competing]]\naction = \"block\"", "missing key 'pattern'"),
        ("[[profiles.night.competing]]\npattern = 'x'\naction = \"kill\"", "invalid action 'kill'"),
        ("[[profiles.night.competing]]\npattern = 'x'\nmin_rss = \"lots\"", "competing[0].min_rss: invalid size"),
        ("[profiles.night]\nmax_temp = 70\nresume_temp = 75", "resume_temp: 75 is above max_temp 70"),
        ("[profiles.night]\nslurm_license = \"a b\"", "invalid license name 'a b'"),
        ("[profiles.night]\nslurm_license = 1", "expected a Slurm license name"),
        ("[profiles.night]\nnice = 99", "invalid nice value '99'"),
        ("[profiles.night]\non_hot = \"explode\"", "invalid --on-hot value"),
        ("[profiles.night]\ngpu = \"first\"", "invalid GPU selection 'first'"),
        ("[gpu]\nbackend = \"cuda\"", "invalid GPU backend 'cuda'"),
        ("profiles = 3", "profiles: expected a table of profiles"),
        ("[profiles.\"a b\"]\nmemory = \"1G\"", "invalid profile name"),
        ("x = [", "invalid TOML"),
        ("a = " + "[" * 2000 + "]" * 2000, "config"),
    ],
)
def test_every_mistake_is_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    text_of = str(info.value)
    assert message in text_of
    assert "\n" not in text_of.strip() or "invalid TOML" in text_of
    assert "config.toml" in text_of


@pytest.mark.parametrize(
    ("text", "place", "suggestion"),
    [
        ('[defaults]\nmax_memm = "1G"', "defaults.max_memm: unknown key", "max_mem"),
        ('[profiles.night]\nmemroy = "1G"', "profiles.night.memroy: unknown key", "memory"),
        ('[profiles.night]\non_hto = "kill"', "profiles.night.on_hto: unknown key", "on_hot"),
        ('[default]\nmax_temp = 70', "default: unknown key", "defaults"),
        ('[profile.night]\nmemory = "1G"', "profile: unknown key", "profiles"),
        ('[thermal]\nsensor = ["coretemp:*"]', "thermal.sensor: unknown key", "sensors"),
        ('[gpu]\nbackedn = "nvml"', "gpu.backedn: unknown key", "backend"),
        ('[gpu]\nbackend = "nvlm"', "invalid GPU backend 'nvlm'", "nvml"),
        ("[[profiles.night.competing]]\npatern = 'x'", "competing[0].patern: unknown key", "pattern"),
        ("[[profiles.night.competing]]\npattern = 'x'\naction = \"blok\"", "invalid action 'blok'", "block"),
        ('[profiles.night]\non_hot = "paus"', "invalid --on-hot value 'paus'", "pause"),
        ('[profiles.night]\ncgroup = "atuo"', "invalid --cgroup value 'atuo'", "auto"),
        ('[profiles.night]\nthrottle = "of"', "invalid value 'of'", "off"),
        ('[profiles.night]\nwarn_signal = "SIGTREM"', "invalid signal 'SIGTREM'", "SIGTERM"),
    ],
)
def test_a_typo_gets_the_closest_name(tmp_path: Path, text: str, place: str, suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    message = str(info.value)
    assert place in message and message.endswith(f"; did you mean {suggestion!r}?"), message


def test_a_far_miss_gets_no_suggestion(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, '[defaults]\nzzzzzz = 1'))
    assert "did you mean" not in str(info.value)


def test_each_table_lists_only_the_keys_it_accepts(tmp_path: Path) -> None:
    # [defaults] refuses the per-profile keys, so it must not offer them; a profile's table accepts them all.
    def accepted(text: str) -> set[str]:
        with pytest.raises(ConfigError) as info:
            load_config(write(tmp_path, text))
        listed = str(info.value).split("accepted keys: ", 1)[1].split(";", 1)[0]
        return set(listed.split(", "))

    per_profile = {s.key for s in SETTINGS if s.per_profile}
    assert per_profile >= {"lock", "match", "memory"}
    assert accepted("[defaults]\nbogus = 1") == set(PROFILE_KEYS) - per_profile
    assert accepted("[profiles.night]\nbogus = 1") == set(PROFILE_KEYS)
    with pytest.raises(ConfigError, match=r"defaults\.lock: is per profile"):
        load_config(write(tmp_path, '[defaults]\nlock = "x"\nbogus = 1'))


def test_a_mistyped_profile_gets_the_closest_name(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[profiles.llm-70b]\nmemory = "40G"\n'))
    with pytest.raises(ConfigError) as info:
        config.profile("whsiper-large-v3")
    assert str(info.value) == ("unknown profile 'whsiper-large-v3': known profiles are default, llm-70b, "
                               "whisper-large-v3; did you mean 'whisper-large-v3'?")


def test_a_mistake_in_an_unused_profile_shows_on_first_load(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"profiles\.only-at-2am\.memory"):
        load_config(write(tmp_path, '[profiles.only-at-2am]\nmemory = "lots"\n'))


def test_missing_unreadable_and_directory_configs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "absent.toml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'x = "\xff"\n')
    with pytest.raises(ConfigError, match="config"):
        load_config(str(bad))


def test_search_order(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    (xdg / "safegate").mkdir(parents=True)
    (xdg / "safegate" / "config.toml").write_text("")
    env = {"XDG_CONFIG_HOME": str(xdg), "HOME": str(tmp_path)}
    assert find_config_path(None, env)[0] == xdg / "safegate" / "config.toml"
    env["SAFEGATE_CONFIG"] = str(tmp_path / "from-env.toml")
    assert find_config_path(None, env)[0] == tmp_path / "from-env.toml"
    assert find_config_path(str(tmp_path / "explicit.toml"), env)[0] == tmp_path / "explicit.toml"
    home_only = {"HOME": str(tmp_path)}
    (tmp_path / ".config" / "safegate").mkdir(parents=True)
    (tmp_path / ".config" / "safegate" / "config.toml").write_text("")
    assert find_config_path(None, home_only)[0] == tmp_path / ".config" / "safegate" / "config.toml"
