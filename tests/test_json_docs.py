"""docs/json.md and the JSON the commands print must describe the same fields."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from support import PY, REPO, Procs, Run, hold_with_flock, hold_with_safegate, wait_until

DOC = (REPO / "docs" / "json.md").read_text()


def section(title: str) -> str:
    return DOC.split(f"## `{title}`", 1)[1].split("\n## ", 1)[0]


def documented_paths(text: str) -> dict[str, str]:
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", text, re.MULTILINE)
    return {path: kind.strip() for path, kind in rows}


def flatten(obj: Any, prefix: str, stops: set[str]) -> set[str]:
    paths: set[str] = set()
    if isinstance(obj, dict):
        for key, value in obj.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            if path not in stops:
                paths |= flatten(value, path, stops)
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict):
                paths |= flatten(item, f"{prefix}[]", stops)
    return paths


def _get(data: Any, path: str) -> Any:
    """The value at a dotted path whose list steps are written `[]` (the first element is taken)."""
    node = data
    for part in path.split("."):
        for piece in re.split(r"(\[\])", part):
            if piece == "[]":
                node = node[0] if isinstance(node, list) and node else None
            elif piece:
                node = node.get(piece) if isinstance(node, dict) else None
    return node


def assert_same(doc: dict[str, str], data: Any, root: str = "") -> None:
    children = {p.rsplit(".", 1)[0].removesuffix("[]") for p in doc if "." in p}
    stops = {p for p, kind in doc.items()
             if "(map)" in kind or "(per check)" in kind or (kind == "list" and p not in children)}
    stops |= {p for p, kind in doc.items() if kind.startswith("object or null")}
    actual = flatten(data, root, stops)
    undocumented = actual - set(doc)
    missing = set()
    for path in set(doc) - actual:
        # Under an empty list (no GPU here) or a null object the field cannot be printed.
        parent = path.rsplit("[]", 1)[0] if "[]" in path else path.rsplit(".", 1)[0]
        if _get(data, parent) in ([], None):
            continue
        missing.add(path)
    assert not undocumented and not missing, f"undocumented: {sorted(undocumented)}; not printed: {sorted(missing)}"


def test_check_json_matches(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    hold_with_safegate(procs, lock_dir, "heavy")
    data = json.loads(run("check", "--config", str(config), "--mem", "0", "--json").stdout)
    assert_same(documented_paths(section("safegate check --json").split("### ")[0]), data)
    row = re.compile(r"^\| `(\w+)` \|\s*(.*?)\s*\|\s*(.*?)\s*\|$", re.MULTILINE)
    by_check = {name: (values, limits) for name, values, limits in row.findall(section("safegate check --json"))}
    for check in data["checks"]:
        values_doc, thresholds_doc = by_check[check["name"]]
        top_level = {w for w in re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", values_doc))}
        assert set(check["values"]) == top_level, check["name"]
        limits = set(re.findall(r"`(\w+)`", thresholds_doc))
        if check["name"] == "thermal":
            limits -= {"resume_temp"}  # resume_temp replaces max_temp only while waiting after a block
        assert set(check["thresholds"]) == limits, check["name"]


def test_status_json_matches(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    hold_with_safegate(procs, lock_dir, "heavy")
    data = json.loads(run("status", "--json", "--config", str(config)).stdout)
    assert_same(documented_paths(section("safegate status --json")), data)


def test_locks_json_matches(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    hold_with_safegate(procs, lock_dir, "heavy")
    data = json.loads(run("locks", "--json", "--config", str(config)).stdout)
    doc = {p.removeprefix("[]."): k for p, k in documented_paths(section("safegate locks --json")).items()}
    stops = set()
    assert data and all(set(flatten(item, "", stops)) == set(doc) for item in data), data


def test_profiles_json_matches(run: Run, config: Path) -> None:
    data = json.loads(run("profiles", "--json", "--config", str(config)).stdout)
    doc = {p.removeprefix("[]."): k for p, k in documented_paths(section("safegate profiles --json")).items()}
    stops = {p for p, k in doc.items() if k == "list"}
    for item in data:
        assert flatten(item, "", stops) == set(doc), item["name"]


def test_need_json_matches(run: Run, config: Path) -> None:
    doc = documented_paths(section("safegate need --json"))
    for command in (["whisper", "--model", "large-v3", "--device", "cpu", "a.wav"], ["sh", "-c", "exit 0"]):
        data = json.loads(run("need", "--json", "--config", str(config), "--", *command).stdout)
        assert_same(doc, data)


def test_exec_log_events_are_documented(run: Run, config: Path, tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    run("exec", "--config", str(config), "--mem", "0", "--log", str(log), "--max-mem", "50M", "--grace", "1s",
        "--", "python3", "-c", "import time; b = b'x' * (100 << 20); time.sleep(600)")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    text = section("safegate exec --log FILE")
    common = set(re.findall(r"^\| `(\w+)` \| (?:string|integer)", text, re.MULTILINE))
    assert common == {"time", "event", "message", "safegate_pid"}
    rows = {}
    for names, extra in re.findall(r"^\| (`[\w`, ]+`) \| (.*?) \|$", text, re.MULTILINE):
        for name in re.findall(r"`(\w+)`", names):
            rows[name] = set(re.findall(r"`(\w+)`", extra))
    seen = {e["event"] for e in events}
    assert {"admitted", "breach", "exit", "summary"} <= seen
    for event in events:
        assert common <= set(event)
        extra = set(event) - common
        assert event["event"] in rows, event
        assert extra <= rows[event["event"]] | {"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"}, (event["event"], extra)


def test_queue_json_matches(run: Run, config: Path, lock_dir: Path, procs: Procs) -> None:
    hold_with_flock(procs, lock_dir / "heavy.lock")
    procs.spawn([PY, "-m", "safegate", "check", "--config", str(config), "--mem", "0", "--wait", "-q"], env=run.env)
    wait_until(lambda: list(lock_dir.glob(".ticket.*.json")), what="the waiter's ticket")
    data = json.loads(run("queue", "--json", "--config", str(config)).stdout)
    doc = {p.removeprefix("[]."): k for p, k in documented_paths(section("safegate queue --json")).items()}
    stops: set[str] = set()
    assert data and all(set(flatten(item, "", stops)) == set(doc) for item in data), data
    text = run("queue", "--config", str(config)).stdout
    assert "lock heavy" in text and "1. pid" in text


def test_exec_log_has_a_timeline_of_samples(run: Run, config: Path, tmp_path: Path) -> None:
    # At least one `sample` a second while the job runs, only in the log (never on stderr), as documented.
    log = tmp_path / "timeline.jsonl"
    result = run("exec", "--config", str(config), "--mem", "0", "--log", str(log), "--", "sleep", "2.5")
    assert result.returncode == 0 and "sample" not in result.stderr
    events = [json.loads(line) for line in log.read_text().splitlines()]
    samples = [e for e in events if e["event"] == "sample"]
    assert len(samples) >= 2, [e["event"] for e in events]  # 2.5 s of job: one at once, then one a second
    assert all(s["available"] > 0 and "pressure" in s and s["gpus"] == [] for s in samples)
    assert any(s["job_memory"] > 0 for s in samples)  # the one taken as the job ends may find it gone
    assert samples[0]["temp"] is None or isinstance(samples[0]["temp"], float)
