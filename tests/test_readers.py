"""Every reader of a file another user (or a broken older safegate) can write, fed generated hostile content.

The documented outcome, whatever the bytes: a record whose every field is in range, or nothing (another user's
file is ignored; the user's own is set aside by the writer that finds it) — never an exception.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from safegate import schema
from safegate.config import history
from safegate.gate.queue import read_tickets, ticket_name
from safegate.locks.holders import read_file
from safegate.locks.legacy import read_legacy
from safegate.probes.pids import identity

HOSTILE_NUMBERS = st.sampled_from(["1e999", "-1e999", "9" * 400, "-" + "9" * 400, "NaN", "Infinity", "1e-999",
                                   "0.5", "-1", "4194305", "9007199254740993", "253402300800"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                    st.text(max_size=40), st.text(alphabet="\n\r\x1b\x00\u2028 ab", max_size=10))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                    max_leaves=20)
RUN = {"time": 1.7e9, "peak_memory": 1, "peak_gpu_memory": None, "duration": 1.0, "reason": "exited", "exit_code": 0}
# A run as exec records it since issue 27: with its command's signature and what was predicted for it.
SIGNED_RUN = {**RUN, "signature": "program=whisper model=tiny device=cpu", "predicted_memory": 1,
              "predicted_gpu_memory": 0}


def _contents(template: dict[str, object]) -> st.SearchStrategy[bytes]:
    """Hostile variants of a valid record: any JSON, raw bytes, deep nesting, cut files, a field replaced by a
    hostile number or any JSON value."""
    valid = json.dumps(template)

    def with_number(field: str, number: str) -> bytes:
        return json.dumps({**template, field: "@@"}).replace('"@@"', number).encode()

    def with_value(field: str, value: object) -> bytes:
        return json.dumps({**template, field: value}).encode()

    fields = st.sampled_from(sorted(template))
    return st.one_of(
        JSON.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=300),
        st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * (n % 3)),
        st.integers(0, len(valid)).map(lambda n: valid[:n].encode()),
        st.builds(with_number, fields, HOSTILE_NUMBERS),
        st.builds(with_value, fields, JSON),
    )


def _me_start() -> int:
    me = identity(os.getpid())
    assert me is not None
    return me.start


TICKET = {"user": "u", "lock": "night", "profile": "p", "need": 1}
STATE = {"blocked_by": "memory", "reason": "r", "memory_only": True}
HOLDER = {"pid": os.getpid(), "start_time": 1.7e9, "user": "u", "host": "h", "cmdline": ["x"], "started_at": 1.7e9,
          "profile": "p", "lock": "heavy", "job_pid": None, "job_start_time": None, "need": 1, "used": 0,
          "gpu_index": None, "gpu_need": 0, "gpu_used": 0}
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(place=_contents(TICKET), state=_contents(STATE))
def test_tickets(tmp_path: Path, place: bytes, state: bytes) -> None:
    base = tmp_path / ticket_name(os.getpid(), _me_start())
    base.write_bytes(place)
    base.with_suffix(".state").write_bytes(state)
    for ticket in read_tickets(tmp_path, sweep=True):
        assert ticket.pid == os.getpid() and 0 <= ticket.need <= schema.SIZE_MAX
        assert ticket.lock is None or "\n" not in ticket.lock
        assert len(ticket.reason) <= schema.TEXT_MAX and isinstance(ticket.memory_only, bool)


@FAST
@given(content=_contents(HOLDER))
def test_holder_records(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "heavy.holder-1.1-0123456789abcdef.json"
    path.write_bytes(content)
    found = read_file(path)
    if found.holder is None:
        assert "\n" not in found.note
        return
    h = found.holder
    assert 1 <= h.pid <= schema.PID_MAX and h.lock == "heavy"
    assert all(0 <= n <= schema.SIZE_MAX for n in (h.need, h.used, h.gpu_need, h.gpu_used))
    assert h.started_at == h.started_at and h.started_at >= 0


@FAST
@given(run=st.one_of(_contents(RUN), _contents(SIGNED_RUN)), profile=st.text(max_size=20))
def test_history(tmp_path: Path, run: bytes, profile: str) -> None:
    path = tmp_path / "history.json"
    path.write_bytes(b'{' + json.dumps(profile).encode() + b': [' + run + b']}')
    runs, note = history.read(path)
    assert "\n" not in note  # a bad run costs that run (the note says so), a bad file all of them
    for recorded in runs.values():
        for r in recorded:
            assert 0 <= r.peak_memory <= schema.SIZE_MAX and 0 <= r.time < 1e11 and r.duration == r.duration
            assert r.signature is None or len(r.signature) <= schema.TEXT_MAX
            assert all(n is None or 0 <= n <= schema.SIZE_MAX for n in (r.predicted_memory, r.predicted_gpu_memory))
    # Learning from it never fails either, per profile or per command signature.
    for recorded in runs.values():
        history.learned_need(recorded)
        history.learned_gpu_need(recorded)
    history.of_signature(runs, SIGNED_RUN["signature"])


def test_history_without_signatures_still_loads(tmp_path: Path) -> None:
    """A file written before runs carried a signature: every run loads, signed and unsigned side by side."""
    path = tmp_path / "history.json"
    path.write_text(json.dumps({"default": [RUN, RUN, SIGNED_RUN]}))
    runs, note = history.read(path)
    assert note == "" and len(runs["default"]) == 3
    assert [r.signature for r in runs["default"]] == [None, None, SIGNED_RUN["signature"]]
    assert len(history.of_signature(runs, str(SIGNED_RUN["signature"]))) == 1


@FAST
@given(content=st.one_of(st.binary(max_size=64), HOSTILE_NUMBERS.map(str.encode),
                         st.integers(-10, 2**80).map(lambda n: str(n).encode())))
def test_legacy_pid_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "whisper.pid"
    path.write_bytes(content)
    state = read_legacy(path)
    assert state.pid is None or 1 <= state.pid <= schema.PID_MAX
