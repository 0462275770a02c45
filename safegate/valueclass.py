"""The runtime half of safegate.records: dataclasses' decorator and helpers, for the subset safegate uses, at a
fraction of their cost when a module is imported.

`safegate check` runs before every job start (GNU parallel's --limit, Slurm's health check), so its start-up is
its cost. The stdlib's dataclasses imports inspect (ast, dis, tokenize) and compiles four or five methods per class
with exec() when the class is defined: for safegate's ~60 classes, over half of check's import time. Here a class
is set up by a walk over its annotations; its first instances are filled by a walk over its fields, and its own
__init__ is compiled only once it has made many; __repr__, __eq__ and __hash__ are shared functions.

Supported, as dataclasses define them: frozen=, eq=, repr=, init=; field(default=, default_factory=, init=,
repr=); __post_init__; inherited fields; fields(), replace(), asdict(). Assigning to a frozen field raises
AttributeError (dataclasses' FrozenInstanceError is one; safegate's exception types all live in safegate.errors).
tests/test_records.py holds each against the stdlib's behaviour on the same class bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FIELDS = "__record_fields__"
_INIT = "__init__"  # the class attribute holding a record class's fields, in order


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Field:
    """One field: its name, its default or default factory, and whether __init__ and __repr__ take it."""

    __slots__ = ("default", "default_factory", "init", "name", "repr")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING, init: bool = True,
                 repr: bool = True) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = ""
        self.default = default
        self.default_factory = default_factory
        self.init = init
        self.repr = repr

    def __repr__(self) -> str:
        return f"Field(name={self.name!r}, default={self.default!r}, default_factory={self.default_factory!r})"


def field(*, default: Any = MISSING, default_factory: Any = MISSING, init: bool = True, repr: bool = True) -> Any:
    return Field(default, default_factory, init, repr)


def dataclass(cls: type | None = None, /, *, init: bool = True, repr: bool = True, eq: bool = True,
              frozen: bool = False) -> Any:
    def wrap(cls: type) -> type:
        return _process(cls, init=init, repr=repr, eq=eq, frozen=frozen)

    return wrap if cls is None else wrap(cls)


def fields(class_or_instance: object) -> tuple[Field, ...]:
    found: tuple[Field, ...] | None = getattr(class_or_instance, FIELDS, None)
    if found is None:
        raise TypeError("must be called with a dataclass type or instance")
    return found


def replace(obj: Any, /, **changes: Any) -> Any:
    for f in fields(obj):
        if not f.init:
            if f.name in changes:
                raise ValueError(f"field {f.name} is declared with init=False, it cannot be specified with replace()")
        elif f.name not in changes:
            changes[f.name] = getattr(obj, f.name)
    return obj.__class__(**changes)


def asdict(obj: Any) -> dict[str, Any]:
    if getattr(type(obj), FIELDS, None) is None:
        raise TypeError("asdict() should be called on dataclass instances")
    result: dict[str, Any] = _as_plain(obj)
    return result


def _as_plain(obj: Any) -> Any:
    if getattr(type(obj), FIELDS, None) is not None:
        return {f.name: _as_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple: rebuilt from its positions
        return type(obj)(*[_as_plain(v) for v in obj])
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_plain(v) for v in obj)
    if isinstance(obj, dict):
        return type(obj)((_as_plain(k), _as_plain(v)) for k, v in obj.items())
    if obj is None or isinstance(obj, (str, int, float, bool, bytes)):
        return obj
    import copy

    return copy.deepcopy(obj)


# --- setting up a class ---------------------------------------------------------------------------------------


def _process(cls: type, *, init: bool, repr: bool, eq: bool, frozen: bool) -> type:
    found: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        for f in base.__dict__.get(FIELDS, ()):
            found[f.name] = f
    own_annotations: dict[str, object] = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 - no inspect
    for name, annotation in own_annotations.items():
        if _is_classvar(annotation):
            continue
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name = name
        if f.default is not MISSING:
            setattr(cls, name, f.default)  # as dataclasses leave it: the class attribute is the default
        elif isinstance(value, Field):
            delattr(cls, name)
        found[name] = f
    every = tuple(found.values())
    _check_order(cls, every)
    setattr(cls, FIELDS, every)
    own = dict(cls.__dict__)
    methods: dict[str, object] = {}
    if init and "__init__" not in own:
        methods["__init__"] = _lazy_init(cls, every, frozen)
    if repr and "__repr__" not in own:
        methods["__repr__"] = _repr
    if eq and "__eq__" not in own:
        methods["__eq__"] = _eq
    if frozen:
        for name in ("__setattr__", "__delattr__"):
            if name in own:
                raise TypeError(f"Cannot overwrite attribute {name} in class {cls.__name__}")
        names = frozenset(f.name for f in every)
        methods["__setattr__"] = _frozen_setattr(cls, names)
        methods["__delattr__"] = _frozen_delattr(cls, names)
    # A class body with __eq__ and no __hash__ has __hash__ = None put there by Python: that is not explicit.
    explicit_hash = own.get("__hash__") is not None if "__eq__" in own else "__hash__" in own
    if eq and not explicit_hash:
        # dataclasses' rule: eq and frozen hash by the fields; eq alone makes instances unhashable.
        methods["__hash__"] = _hash if frozen else None
    for name, method in methods.items():
        setattr(cls, name, method)
    return cls


def _is_classvar(annotation: object) -> bool:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return isinstance(text, str) and (text.startswith(("ClassVar", "typing.ClassVar")))


def _check_order(cls: type, every: tuple[Field, ...]) -> None:
    defaulted = False
    for f in every:
        if not f.init:
            continue
        if f.default is not MISSING or f.default_factory is not MISSING:
            defaulted = True
        elif defaulted:
            raise TypeError(f"non-default argument {f.name!r} follows default argument in {cls.__name__}")


COMPILE_AFTER = 48  # instances made by the generic __init__ before the class's own is compiled (~as costly)


def _lazy_init(cls: type, every: tuple[Field, ...], frozen: bool) -> Callable[..., None]:
    """An __init__ that fills the fields by a walk over them; after COMPILE_AFTER instances (or at once, for
    arguments it does not simply fit, so that errors are Python's own) it compiles the class's own __init__,
    puts it in the class and runs it. Most classes make a handful of instances per command, where compiling
    would cost more than it saves; a process table's records make thousands."""
    init_fields = tuple(f for f in every if f.init)
    known = frozenset(f.name for f in init_fields)
    rest = tuple(f for f in every if not f.init and (f.default is not MISSING or f.default_factory is not MISSING))
    assign = object.__setattr__ if frozen else setattr
    post_init = hasattr(cls, "__post_init__")
    made = 0

    def compiled(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        own = _compile_init(cls, every, frozen)
        if cls.__dict__.get("__init__") is __init__:
            setattr(cls, _INIT, own)
        own(self, *args, **kwargs)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal made
        made += 1
        if made > COMPILE_AFTER or len(args) > len(init_fields) or not known.issuperset(kwargs):
            compiled(self, args, kwargs)
            return
        values = []
        for i, f in enumerate(init_fields):
            if i < len(args):
                if f.name in kwargs:
                    compiled(self, args, kwargs)  # given twice
                    return
                values.append(args[i])
            elif f.name in kwargs:
                values.append(kwargs[f.name])
            elif f.default is not MISSING:
                values.append(f.default)
            elif f.default_factory is not MISSING:
                values.append(f.default_factory())
            else:
                compiled(self, args, kwargs)  # missing
                return
        for f, value in zip(init_fields, values, strict=True):
            assign(self, f.name, value)
        for f in rest:
            assign(self, f.name, f.default_factory() if f.default_factory is not MISSING else f.default)
        if post_init:
            self.__post_init__()

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


def _compile_init(cls: type, every: tuple[Field, ...], frozen: bool) -> Callable[..., None]:
    names: dict[str, Any] = {"_MISSING": MISSING, "_set": object.__setattr__}
    params: list[str] = ["self"]
    body: list[str] = []
    for i, f in enumerate(every):
        if f.init:
            if f.default is not MISSING:
                names[f"_d{i}"] = f.default
                params.append(f"{f.name}=_d{i}")
            elif f.default_factory is not MISSING:
                names[f"_f{i}"] = f.default_factory
                params.append(f"{f.name}=_MISSING")
                body.append(f"if {f.name} is _MISSING: {f.name} = _f{i}()")
            else:
                params.append(f.name)
            value = f.name
        elif f.default_factory is not MISSING:
            names[f"_f{i}"] = f.default_factory
            value = f"_f{i}()"
        elif f.default is not MISSING:
            names[f"_d{i}"] = f.default
            value = f"_d{i}"
        else:
            continue  # dataclasses leave such a field unset
        body.append(f"_set(self, {f.name!r}, {value})" if frozen else f"self.{f.name} = {value}")
    if hasattr(cls, "__post_init__"):
        body.append("self.__post_init__()")
    source = f"def __init__({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body or ["pass"])
    exec(source, names)
    made: Callable[..., None] = names["__init__"]
    made.__qualname__ = f"{cls.__qualname__}.__init__"
    return made


def _repr(self: Any) -> str:
    shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in getattr(self, FIELDS) if f.repr)
    return f"{type(self).__qualname__}({shown})"


def _values(obj: Any) -> tuple[Any, ...]:
    return tuple(getattr(obj, f.name) for f in getattr(obj, FIELDS))


def _eq(self: Any, other: object) -> object:
    if other.__class__ is self.__class__:
        return _values(self) == _values(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(_values(self))


def _frozen_setattr(cls: type, names: frozenset[str]) -> Callable[[Any, str, Any], None]:
    parent: Callable[[Any, str, Any], None] = _inherited(cls, "__setattr__")

    def __setattr__(self: Any, name: str, value: Any) -> None:
        if type(self) is cls or name in names:
            raise AttributeError(f"cannot assign to field {name!r}")  # as FrozenInstanceError (one) says
        parent(self, name, value)

    return __setattr__


def _frozen_delattr(cls: type, names: frozenset[str]) -> Callable[[Any, str], None]:
    parent: Callable[[Any, str], None] = _inherited(cls, "__delattr__")

    def __delattr__(self: Any, name: str) -> None:
        if type(self) is cls or name in names:
            raise AttributeError(f"cannot delete field {name!r}")
        parent(self, name)

    return __delattr__


def _inherited(cls: type, name: str) -> Any:
    """What super(cls, self).<name> finds: the method from the first class after *cls* in its MRO."""
    return next(klass.__dict__[name] for klass in cls.__mro__[1:] if name in klass.__dict__)
