"""docs/recipes.md's systemd unit, verbatim, under systemd as PID 1 on cgroup v2, in the test VM (tests/vm/): the
wait in line is the unit's start (Type=notify: `activating` until the job runs, so TimeoutStartSec= covers it),
and with Delegate=yes the job runs inside the service's own cgroup, where the unit's MemoryMax= and accounting
reach it; without Delegate=yes it runs in a scope of its own outside the unit, as the recipe says.

One boot for all scenarios (a boot costs 20-60 s under TCG). Opt-in like tests/test_vm.py (SAFEGATE_VM_TESTS=1).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from support import REPO
from vm.harness import TESTER, Boot, Result, Scenario, boot, guest_venv, require_vm

RECIPES = (REPO / "docs" / "recipes.md").read_text()
# Waits on a condition with a deadline (120 s of guest time), as the host's tests do.
WAIT_FOR = ('wait_for() { i=0; while ! eval "$1"; do i=$((i+1)); [ $i -gt 1200 ] && { echo "timeout: $1"; '
            'return 1; }; sleep 0.1; done; }\n')
MiB = 1 << 20
HELD = 100  # MiB the job allocates and holds while the test looks at the cgroups


def recipe_unit() -> str:
    """The unit as docs/recipes.md gives it, between its markers: the file systemd gets, byte for byte."""
    block = RECIPES.split("<!-- systemd-unit:", 1)[1].split("<!-- /systemd-unit -->", 1)[0]
    return block.split("```ini\n", 1)[1].split("```", 1)[0]


def _setup(python: str) -> str:
    """safegate where the unit runs it, the job where the unit says it is, and a config for the profile."""
    return WAIT_FOR + (
        f"printf '#!/bin/sh\\nPYTHONPATH={REPO} PYTHONDONTWRITEBYTECODE=1 exec {python} -m safegate \"$@\"\\n'"
        " > /usr/local/bin/safegate && chmod 755 /usr/local/bin/safegate\n"
        # The job: says where it runs, then holds HELD MiB (touched, so counted) until told to end.
        "mkdir -p /opt/whisper && cat > /opt/whisper/run.sh <<'JOB'\n#!/bin/sh\n"
        "exec python3 -c 'import os, sys, time\n"
        "cg = open(\"/proc/self/cgroup\").read().strip().split(\":\", 2)[2]\n"
        f"block = b\"x\" * ({HELD} << 20)\n"
        "print(os.getpid(), cg, file=open(\"/tmp/job\", \"w\"))\n"
        "while not os.path.exists(\"/tmp/job-done\"): time.sleep(0.1)\n'\nJOB\n"
        "chmod 755 /opt/whisper/run.sh\n"
        "printf '[defaults]\\nmemory_margin = \"0\"\\n[profiles.whisper-large-v3]\\nmemory = \"10M\"\\n"
        "competing = []\\n' > /etc/safegate.toml\n"
        "export SAFEGATE_CONFIG=/etc/safegate.toml\n"
    )


def _install(name: str, unit: str, extra: str) -> str:
    """*unit* as /etc/systemd/system/NAME.service, the test's own settings in a drop-in beside it; "verbatim" when
    the file is the recipe's unit byte for byte."""
    return (
        f"cat > /etc/systemd/system/{name}.service <<'UNIT'\n{unit}UNIT\n"
        f"mkdir -p /etc/systemd/system/{name}.service.d\n"
        f"printf '[Service]\\nEnvironment=SAFEGATE_CONFIG=/etc/safegate.toml\\n{extra}' "
        f"> /etc/systemd/system/{name}.service.d/test.conf\n"
        "systemctl daemon-reload\n"
        f"cmp /etc/systemd/system/{name}.service - <<'UNIT' && echo verbatim\n{recipe_unit()}UNIT\n"
    )


def _state(name: str) -> str:
    return f"$(systemctl show -p ActiveState --value {name})"


def _scenarios(python: str) -> dict[str, Scenario]:
    setup = _setup(python)
    # The lock held by another safegate until /tmp/release appears.
    hold = ("rm -f /tmp/release /tmp/holder.jsonl; safegate exec -p whisper-large-v3 --log /tmp/holder.jsonl -- "
            "sh -c 'while [ ! -e /tmp/release ]; do sleep 0.1; done' & holder=$!\n"
            "wait_for 'grep -q admitted /tmp/holder.jsonl 2>/dev/null'\n")
    look = (  # the job's cgroup, the unit's, and what the kernel says of both, while the job holds its memory
        "wait_for '[ -s /tmp/job ]'\n"
        "read job jobcg < /tmp/job\n"
        "unitcg=$(systemctl show -p ControlGroup --value {name})\n"
        "main=$(systemctl show -p MainPID --value {name})\n"
        "echo \"job=$job jobcg=$jobcg unitcg=$unitcg\"\n"
        "echo \"safegate cgroup=$(cut -d: -f3 /proc/$main/cgroup)\"\n"
        "echo \"job memory.max=$(cat /sys/fs/cgroup$jobcg/memory.max)\"\n"
        "echo \"unit memory.max=$(cat /sys/fs/cgroup$unitcg/memory.max)\"\n"
        "echo \"unit memory.current=$(cat /sys/fs/cgroup$unitcg/memory.current)\"\n"
        "echo \"unit subtree_control=$(cat /sys/fs/cgroup$unitcg/cgroup.subtree_control)\"\n"
        "echo \"unit own procs=$(cat /sys/fs/cgroup$unitcg/cgroup.procs | tr '\\n' ' ')\"\n"
        "echo \"MemoryCurrent=$(systemctl show -p MemoryCurrent --value {name})\"\n"
        # The unit's process tree as `systemctl status` draws it (no journal lines): "└─PID command".
        "systemctl status --no-pager -n 0 {name} | sed 's/^/| /'\n"
        "systemctl status --no-pager -n 0 {name} | grep -q \"─$job \" && echo \"status lists the job\"\n"
        "touch /tmp/job-done\n"
        f"wait_for '[ \"{_state('{name}')}\" = inactive ]'\n"
        "echo \"after: $(systemctl show -p Result --value {name}) "
        "status=$(systemctl show -p ExecMainStatus --value {name})\"\n"
        "[ -e /sys/fs/cgroup$unitcg ] && echo \"unit cgroup left\" || echo \"unit cgroup removed\"\n"
        "grep -v '\"sample\"' /var/log/whisper.jsonl; rm -f /var/log/whisper.jsonl /tmp/job /tmp/job-done\n"
    )
    recipe = setup + _install("sg-recipe", recipe_unit(), "MemoryMax=1G\\n") + hold + (
        "systemctl start --no-block sg-recipe.service\n"
        "wait_for 'journalctl -u sg-recipe -o cat | grep -q waiting'\n"  # safegate's stderr: it waits in line
        f"echo \"while held: {_state('sg-recipe')} started=$([ -e /tmp/job ] && echo yes || echo no)\"\n"
        "touch /tmp/release; wait $holder\n"
        f"wait_for '[ \"{_state('sg-recipe')}\" = active ]'\n"
        "echo \"status text: $(systemctl show -p StatusText --value sg-recipe)\"\n"
        + look.format(name="sg-recipe")
    )
    plain_unit = "".join(line for line in recipe_unit().splitlines(keepends=True) if line != "Delegate=yes\n")
    plain = setup + _install("sg-plain", plain_unit, "MemoryMax=1G\\n") + (
        "systemctl start sg-plain.service\n"  # nothing holds the lock: start returns once the job runs
        + look.format(name="sg-plain")
    )
    # TimeoutStartSec= (here 5 s instead of the recipe's 35m) ends a start that waits in line.
    timeout = setup + _install("sg-timeout", recipe_unit(), "TimeoutStartSec=5s\\n") + hold + (
        "systemctl start sg-timeout.service; echo \"start rc=$?\"\n"
        "echo \"after: $(systemctl show -p Result --value sg-timeout) "
        f"state={_state('sg-timeout')} started=$([ -e /tmp/job ] && echo yes || echo no)\"\n"
        "touch /tmp/release; wait $holder\n"
    )
    # A shell as the unit's main process, two safegates after each other: the first moves the shell into the
    # supervisor leaf with itself, the second finds memory handed down already.
    shell = setup + (
        "printf '#!/bin/sh\\nexec > /tmp/shell-out\\n"
        "safegate exec -p whisper-large-v3 -- cut -d: -f3 /proc/self/cgroup\\n"
        "echo \"sh $(cut -d: -f3 /proc/$$/cgroup)\"\\n"
        "safegate exec -p whisper-large-v3 -- cut -d: -f3 /proc/self/cgroup\\n' > /tmp/two.sh\n"
        "printf '[Service]\\nType=oneshot\\nDelegate=yes\\nEnvironment=SAFEGATE_CONFIG=/etc/safegate.toml\\n"
        "ExecStart=/bin/sh /tmp/two.sh\\n' > /etc/systemd/system/sg-shell.service\n"
        "systemctl daemon-reload; systemctl start sg-shell.service; echo \"start rc=$?\"\n"
        "cat /tmp/shell-out\n"
    )
    # A normal user's own service with Delegate=yes, in their systemd instance.
    user = WAIT_FOR + (
        "mkdir -p ~/.config/systemd/user\n"
        "printf '[Service]\\nType=notify\\nDelegate=yes\\nEnvironment=SAFEGATE_CONFIG=/etc/safegate.toml\\n"
        "ExecStart=/usr/local/bin/safegate exec --cgroup on -p whisper-large-v3 --max-mem 50M -- "
        "/bin/sh -c \"cut -d: -f3 /proc/self/cgroup > /tmp/user-job\"\\n' > ~/.config/systemd/user/sg-user.service\n"
        "systemctl --user daemon-reload; systemctl --user start sg-user.service; echo \"start rc=$?\"\n"
        "python3 -c 'import os, sys\ntry: print(\"mark\", os.getxattr(sys.argv[1], \"user.delegate\").decode())\n"
        "except OSError: print(\"mark none\")' /sys/fs/cgroup$(systemctl --user show -p ControlGroup --value sg-user)\n"
        "wait_for '[ -s /tmp/user-job ]'; echo \"job $(cat /tmp/user-job)\"\n"  # start returns once it runs
        "wait_for '[ \"$(systemctl --user show -p ActiveState --value sg-user)\" = inactive ]'\n"
        "systemctl --user show -p Result,ExecMainStatus sg-user.service\n"
    )
    root = {"timeout": 400}
    return {"recipe": Scenario(recipe, **root), "no_delegate": Scenario(plain, **root),
            "start_timeout": Scenario(timeout, **root), "shell": Scenario(shell, **root),
            "user_service": Scenario(user, user=TESTER, timeout=300)}


@pytest.fixture(scope="module")
def vm() -> tuple[Boot, dict[str, Result]]:
    artefacts = require_vm()
    venv = guest_venv()
    scenarios = _scenarios(f"{venv}/bin/python")
    b = boot(list(scenarios.values()), shares=(REPO, venv), artefacts=artefacts)
    return b, dict(zip(scenarios, b.results, strict=True))


def _facts(stdout: str) -> dict[str, str]:
    """The `key=value` facts a scenario printed (the first of each key)."""
    found: dict[str, str] = {}
    for line in stdout.splitlines():
        for key, value in re.findall(r"(\S[^=]*?)=(\S*)(?:\s|$)", line):
            found.setdefault(key, value)
    return found


def _events(stdout: str) -> dict[str, dict[str, Any]]:
    return {e["event"]: e for e in map(json.loads, re.findall(r"^\{.*\}$", stdout, re.M))}


def test_the_recipe_waits_in_line_as_the_units_start_then_runs_the_job_inside_the_unit(
        vm: tuple[Boot, dict[str, Result]]) -> None:
    """The unit as written, with Delegate=yes: `activating` while the lock is held and the job not started; once
    it runs, the unit is active, and the job sits in its own leaf inside the unit's cgroup, capped at --max-mem,
    counted in the unit's memory and held to its MemoryMax=; safegate sits in the unit's `supervisor` leaf."""
    r = vm[1]["recipe"].check()
    out = r.stdout
    assert "verbatim" in out.splitlines(), out
    assert "while held: activating started=no" in out, out
    f = _facts(out)
    unit, job = f["unitcg"], f["jobcg"]
    assert unit == "/system.slice/sg-recipe.service", out
    assert re.fullmatch(re.escape(unit) + r"/safegate-\d+-\d+", job), out
    assert f["safegate cgroup"] == f"{unit}/supervisor", out
    # --max-mem 12G from the unit's ExecStart (lowered to hold --min-available on this small VM): a cap of its own
    assert f["job memory.max"].isdigit() and int(f["job memory.max"]) <= 12 << 30, out
    assert f["unit memory.max"] == str(1 << 30), out  # the drop-in's MemoryMax=1G, above the job's leaf
    assert int(f["unit memory.current"]) >= HELD * MiB and int(f["MemoryCurrent"]) >= HELD * MiB, out
    assert "memory" in f["unit subtree_control"].split() and f["unit own procs"] == "", out
    assert "status lists the job" in out, out
    assert "status text: running pid" in out, out  # safegate's STATUS= with its READY=1
    assert "after: success status=0" in out and "unit cgroup removed" in out, out
    events = _events(out)
    assert events["admitted"]["cgroup"] == f"/sys/fs/cgroup{job}", events["admitted"]
    assert events["exit"]["exit_code"] == 0 and events["admitted"]["profile"] == "whisper-large-v3"


def test_without_delegation_the_job_runs_in_a_scope_outside_the_unit(vm: tuple[Boot, dict[str, Result]]) -> None:
    """As the recipe says: the job still gets --max-mem from a scope of its own, but outside the unit, where the
    unit's MemoryMax= and accounting do not reach it."""
    r = vm[1]["no_delegate"].check()
    out = r.stdout
    f = _facts(out)
    unit, job = f["unitcg"], f["jobcg"]
    assert unit == "/system.slice/sg-plain.service", out
    assert re.fullmatch(r"/system\.slice/safegate-\d+-\d+-\d+\.scope/job", job), out
    assert f["safegate cgroup"] == unit, out  # safegate left where systemd put it
    assert f["job memory.max"].isdigit() and int(f["job memory.max"]) <= 12 << 30, out
    assert "verbatim" not in out.splitlines(), out  # the recipe's unit, less its Delegate=yes line
    assert int(f["unit memory.current"]) < HELD * MiB, out  # the job's memory is not the unit's
    assert "status lists the job" not in out, out
    assert "after: success status=0" in out, out


def test_the_units_start_timeout_ends_a_wait_in_line(vm: tuple[Boot, dict[str, Result]]) -> None:
    """Type=notify: TimeoutStartSec= (5 s here) covers the wait; the unit fails by timeout, the job never ran."""
    r = vm[1]["start_timeout"].check()
    out = r.stdout
    assert "verbatim" in out.splitlines(), out
    assert "start rc=1" in out, out
    assert "after: timeout state=failed started=no" in out, out


def test_a_shell_as_the_units_main_process_moves_to_the_supervisor_leaf_and_each_job_gets_its_own(
        vm: tuple[Boot, dict[str, Result]]) -> None:
    r = vm[1]["shell"].check()
    out = r.stdout
    assert "start rc=0" in out, out
    unit = "/system.slice/sg-shell.service"
    first, shell, second = out.splitlines()[-3:]
    assert re.fullmatch(re.escape(unit) + r"/safegate-\d+-\d+", first), out
    assert shell == f"sh {unit}/supervisor", out
    assert re.fullmatch(re.escape(unit) + r"/safegate-\d+-\d+", second) and second != first, out


def test_a_users_own_service_with_delegate_runs_the_job_inside_it_where_systemd_marks_the_delegation(
        vm: tuple[Boot, dict[str, Result]]) -> None:
    """safegate knows a delegated cgroup by systemd's user.delegate mark. The user manager of Debian 12's systemd
    252 sets none on its units (checked here, so a newer guest shows the other branch): there the job gets a
    scope of the user's instance, as without Delegate=yes, as the recipe says."""
    r = vm[1]["user_service"].check()
    out = r.stdout
    assert "start rc=0" in out and "Result=success" in out and "ExecMainStatus=0" in out, out
    slice_ = r"/user\.slice/user-1500\.slice/user@1500\.service/app\.slice/"
    if "mark 1" in out.splitlines():
        assert re.search(rf"^job {slice_}sg-user\.service/safegate-\d+-\d+$", out, re.M), out
    else:
        assert "mark none" in out.splitlines(), out
        assert re.search(rf"^job {slice_}safegate-\d+-\d+-\d+\.scope/job$", out, re.M), out
