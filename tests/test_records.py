"""safegate.valueclass against the stdlib's dataclasses: the same class bodies, decorated both ways, behave alike.

mypy checks safegate's classes as stdlib dataclasses (safegate.records), so any difference at run time would be
invisible to it: these tests are what holds the two together.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import pytest
from support import TIMEOUT

from safegate import valueclass
from safegate.config import Profile, load_config
from safegate.locks.holders import HolderRecord

Decorate = Callable[..., Any]
KINDS = {"stdlib": dataclasses, "safegate": valueclass}


class Pair(NamedTuple):
    left: int
    right: list[int]


def _classes(module: Any) -> dict[str, Any]:
    """The same bodies as safegate writes them, made by *module*'s dataclass and field."""
    dataclass, field = module.dataclass, module.field

    @dataclass(frozen=True)
    class Base:
        name: str
        size: int = 0
        tags: tuple[str, ...] = field(default_factory=tuple)
        LIMIT: ClassVar[int] = 3

        @property
        def doubled(self) -> int:
            return 2 * self.size

    @dataclass(frozen=True)
    class Child(Base):
        extra: list[int] = field(default_factory=list)
        hidden: str = field(default="h", repr=False)

    @dataclass
    class Mutable:
        count: int
        seen: list[str] = field(default_factory=list)
        state: dict[str, int] = field(default_factory=dict, init=False, repr=False)
        marker: str | None = field(default=None, init=False)

    @dataclass(frozen=True)
    class Posted:
        value: int

        def __post_init__(self) -> None:
            if self.value < 0:
                raise ValueError("negative")

    @dataclass(frozen=True)
    class Nested:
        base: Base
        children: list[Child]
        by_name: dict[str, Base]
        pair: Pair

    return {"Base": Base, "Child": Child, "Mutable": Mutable, "Posted": Posted, "Nested": Nested}


def _outcome(action: Callable[[], object]) -> tuple[str, str]:
    """What an action gives, in a form that compares across the two implementations."""
    try:
        value = action()
    except Exception as exc:
        # dataclasses' FrozenInstanceError is an AttributeError; safegate's frozen records raise AttributeError.
        kind = "AttributeError" if isinstance(exc, AttributeError) else type(exc).__name__
        return ("raises", f"{kind}: {exc}")
    return ("returns", repr(value))


def _assigned(obj: Any) -> Any:
    obj.count = 5
    return obj


def _copies(module: Any, obj: Any) -> bool:
    return module.asdict(obj)["extra"] is obj.extra


SCENARIOS: dict[str, Callable[[dict[str, Any], Any], object]] = {
    "positional": lambda c, m: c["Child"]("a", 2, ("t",), [1]),
    "keywords and defaults": lambda c, m: c["Child"](name="a"),
    "missing argument": lambda c, m: c["Base"](),
    "too many arguments": lambda c, m: c["Base"]("a", 1, (), 5),
    "unknown keyword": lambda c, m: c["Base"]("a", colour=1),
    "twice": lambda c, m: c["Base"]("a", name="b"),
    "factory gives a new object each time": lambda c, m: c["Child"]("a").extra is c["Child"]("b").extra,
    "equal": lambda c, m: c["Child"]("a", 1) == c["Child"]("a", 1),
    "unequal": lambda c, m: c["Child"]("a", 1) == c["Child"]("a", 2),
    "another class is never equal": lambda c, m: c["Base"]("a") == c["Child"]("a"),
    "against a tuple": lambda c, m: c["Base"]("a") == ("a", 0, ()),
    "hash of equal values": lambda c, m: hash(c["Base"]("a", 1)) == hash(c["Base"]("a", 1)),
    "hash in a set": lambda c, m: len({c["Base"]("a"), c["Base"]("a"), c["Base"]("b")}),
    "unhashable field": lambda c, m: hash(c["Child"]("a", extra=[1])),
    "mutable is unhashable": lambda c, m: hash(c["Mutable"](1)),
    "assign a field": lambda c, m: setattr(c["Base"]("a"), "size", 3),
    "assign a new name": lambda c, m: setattr(c["Base"]("a"), "other", 3),
    "delete a field": lambda c, m: delattr(c["Base"]("a"), "size"),
    "mutable assigns": lambda c, m: _assigned(c["Mutable"](1)),
    "init=False fields": lambda c, m: (c["Mutable"](1).state, c["Mutable"](1).marker),
    "init=False refused as argument": lambda c, m: c["Mutable"](1, [], {}),
    "class attribute is the default": lambda c, m: (c["Base"].size, c["Mutable"].marker),
    "factory field is no class attribute": lambda c, m: hasattr(c["Base"], "tags"),
    "ClassVar is no field": lambda c, m: [f.name for f in m.fields(c["Child"])],
    "fields of an instance": lambda c, m: [(f.name, f.init) for f in m.fields(c["Mutable"](1))],
    "fields of a plain object": lambda c, m: m.fields(object()),
    "replace": lambda c, m: m.replace(c["Child"]("a", 1, extra=[2]), size=5),
    "replace keeps the rest": lambda c, m: m.replace(c["Child"]("a", 1, ("x",)), name="b").tags,
    "replace an init=False field": lambda c, m: m.replace(c["Mutable"](1), state={}),
    "replace an unknown name": lambda c, m: m.replace(c["Base"]("a"), colour=1),
    "replace runs __post_init__": lambda c, m: m.replace(c["Posted"](1), value=-1),
    "__post_init__": lambda c, m: c["Posted"](-1),
    "property": lambda c, m: c["Child"]("a", 4).doubled,
    "asdict": lambda c, m: m.asdict(c["Nested"](c["Base"]("a"), [c["Child"]("c", extra=[1])],
                                             {"k": c["Base"]("k", 2)}, Pair(1, [2]))),
    "asdict copies": lambda c, m: _copies(m, c["Child"]("a", extra=[1])),
    "asdict of a plain object": lambda c, m: m.asdict(object()),
    "repr of mutable": lambda c, m: c["Mutable"](1, ["s"]),
}


@pytest.mark.parametrize("compile_after", [valueclass.COMPILE_AFTER, 0], ids=["walked", "compiled"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_behaves_as_the_stdlib(scenario: str, compile_after: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways a record's __init__ runs: the walk over its fields (its first instances), and compiled."""
    monkeypatch.setattr(valueclass, "COMPILE_AFTER", compile_after)
    act = SCENARIOS[scenario]
    stdlib = _outcome(lambda: act(_classes(dataclasses), dataclasses))
    ours = _outcome(lambda: act(_classes(valueclass), valueclass))
    # repr names the class by its qualname: the same local class names on both sides.
    assert ours == stdlib


def test_a_non_default_field_after_a_default_is_refused_at_definition() -> None:
    for module in KINDS.values():
        with pytest.raises(TypeError):
            @module.dataclass(frozen=True)
            class Bad:
                a: int = 0
                b: int  # type: ignore[misc]


def test_a_frozen_class_may_not_define_setattr() -> None:
    for module in KINDS.values():
        with pytest.raises(TypeError):
            @module.dataclass(frozen=True)
            class Bad:
                a: int

                def __setattr__(self, name: str, value: object) -> None:
                    pass


def test_a_class_with_its_own_methods_keeps_them() -> None:
    for module in KINDS.values():
        @module.dataclass(frozen=True)
        class Own:
            a: int

            def __repr__(self) -> str:
                return "own"

            def __eq__(self, other: object) -> bool:
                return True

            def __hash__(self) -> int:
                return 7

        assert (repr(Own(1)), Own(1) == Own(2), hash(Own(1))) == ("own", True, 7)


def test_init_is_compiled_once_a_class_has_made_many_instances() -> None:
    @valueclass.dataclass(frozen=True)
    class Lazy:
        a: int
        b: int = 2

    walker = Lazy.__dict__["__init__"]
    made = [Lazy(i) for i in range(valueclass.COMPILE_AFTER)]
    assert Lazy.__dict__["__init__"] is walker
    assert Lazy(1, b=3) == Lazy(a=1, b=3)
    compiled = Lazy.__dict__["__init__"]
    assert compiled is not walker
    assert Lazy.__init__.__qualname__.endswith("Lazy.__init__")
    assert made[5] == Lazy(5) and Lazy(7).b == 2
    assert Lazy.__dict__["__init__"] is compiled  # once


def test_arguments_that_do_not_fit_get_pythons_own_error_at_once() -> None:
    @valueclass.dataclass(frozen=True)
    class Strict:
        a: int

    with pytest.raises(TypeError, match="missing 1 required positional argument: 'a'"):
        Strict()
    with pytest.raises(TypeError, match="unexpected keyword argument 'b'"):
        Strict(1, b=2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'a'"):
        Strict(1, a=2)  # type: ignore[misc]


def test_safegate_records_are_not_stdlib_dataclasses_at_run_time() -> None:
    # The point of the exercise: the classes safegate imports on check's path are built without dataclasses.
    assert not dataclasses.is_dataclass(Profile)
    profile = load_config(None).profile("whisper-large-v3")
    assert valueclass.replace(profile, description="x").description == "x"
    holder = HolderRecord(pid=1, start_time=2.0, user="u", host="h", cmdline=["a"], started_at=3.0,
                          profile="p", lock="l")
    assert valueclass.asdict(holder)["cmdline"] == ["a"]
    with pytest.raises(AttributeError):
        holder.pid = 2  # type: ignore[misc]


def test_mypy_sees_stdlib_dataclasses(tmp_path: Path) -> None:
    """safegate.records gives mypy the stdlib's names: a wrong replace() keyword is a type error."""
    (tmp_path / "use.py").write_text("from safegate.records import dataclass, replace\n"
                                     "@dataclass(frozen=True)\nclass A:\n    a: int\n"
                                     "replace(A(1), b=2)\nA(1).a = 3\n", encoding="utf-8")
    # MYPYPATH: mypy cannot follow an editable install's import hook to the checkout.
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "use.py"], cwd=tmp_path,
                            env=dict(os.environ, MYPYPATH=str(Path(__file__).resolve().parents[1])),
                            capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert result.returncode == 1, result.stdout
    assert 'Unexpected keyword argument "b" for "replace" of "A"' in result.stdout
    assert 'Property "a" defined in "A" is read-only' in result.stdout
