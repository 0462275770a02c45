"""A command line read for what it will need: which tool it runs (through env, nice, uv run, python -m, ...), the
model it names, and the options that size it. Never runs or imports anything; a command line is another user's
text (holder records, exec's argument), so every step is bounded: the first MAX_ARGS arguments, each cut at
MAX_ARG, at most MAX_STATS filesystem look-ups, and no exception for any input."""

from __future__ import annotations

import os
import re
import shlex
import stat
from collections.abc import Sequence

import msgspec

from safegate.need.knowledge import Family, Knowledge

MAX_ARGS = 512
MAX_ARG = 4096
MAX_STATS = 16
MAX_WRAPPERS = 8
MAX_SHELLS = 1  # sh -c '...' is read; a shell inside it is not
MAX_COMMANDS = 16  # simple commands of a shell's -c line tried
SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh"})
SIGNATURE_MAX = 400

PYTHON = re.compile(r"(python|pypy)(\d+(\.\d+)?)?[a-z]?")
# Python's own options that take a value (python -X dev -W ignore script.py).
PYTHON_VALUE_OPTIONS = frozenset({"-X", "-W", "--check-hash-based-pycs"})
INDEX = "model.safetensors.index.json"
MODEL_SUFFIXES = (".gguf", ".safetensors")

# Launchers that run the command after their own options: name -> (options taking a value, subcommand).
WRAPPERS: dict[str, tuple[frozenset[str], str | None]] = {
    "env": (frozenset({"-u", "--unset", "-C", "--chdir", "-S", "--split-string"}), None),
    "nohup": (frozenset(), None),
    "time": (frozenset({"-f", "--format", "-o", "--output"}), None),
    "nice": (frozenset({"-n", "--adjustment"}), None),
    "ionice": (frozenset({"-c", "--class", "-n", "--classdata", "-p", "-P", "-u"}), None),
    "stdbuf": (frozenset({"-i", "-o", "-e"}), None),
    "chrt": (frozenset(), None),
    "timeout": (frozenset({"-s", "--signal", "-k", "--kill-after"}), None),
    "taskset": (frozenset(), None),
    "numactl": (frozenset({"-C", "-N", "-m", "-i", "-p"}), None),
    "sudo": (frozenset({"-u", "--user", "-g", "--group", "-C", "-D", "-h", "-p", "-r", "-t", "-T", "-U"}), None),
    "uv": (frozenset({"--with", "--with-editable", "--with-requirements", "--python", "-p", "--project",
                      "--directory", "--package", "--extra", "--group", "--env-file", "--index", "--from",
                      "--no-group", "--only-group", "--isolated-python", "--cache-dir", "--config-file"}), "run"),
    "uvx": (frozenset({"--with", "--from", "--python", "-p", "--index", "--cache-dir"}), None),
    "pipx": (frozenset({"--spec", "--python", "--pip-args", "--index-url"}), "run"),
    "poetry": (frozenset(), "run"),
    "pdm": (frozenset(), "run"),
    "hatch": (frozenset(), "run"),
    "pixi": (frozenset({"-e", "--environment", "--manifest-path"}), "run"),
    "conda": (frozenset({"-n", "--name", "-p", "--prefix", "--cwd"}), "run"),
    "mamba": (frozenset({"-n", "--name", "-p", "--prefix", "--cwd"}), "run"),
    "micromamba": (frozenset({"-n", "--name", "-p", "--prefix", "--cwd"}), "run"),
}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=.*", re.DOTALL)


class Invocation(msgspec.Struct, frozen=True):
    """What a command line says of its job. *family*: the knowledge.toml family that sizes it ("" when none);
    *program*: the program or module as recognised; *model*: the model it names (a name, or a file or folder);
    *options*: the values of the options its family reads, by the family's first spelling of each."""

    family: str
    program: str
    model: str | None = None
    options: dict[str, str] = {}
    notes: tuple[str, ...] = ()


def recognise(argv: Sequence[str], known: Knowledge, *, depth: int = 0) -> Invocation:
    """*argv* read as one of the tools *known* describes; never raises. A shell's -c command line is read as
    the shell would split it (no expansion), when it names a tool."""
    notes: list[str] = []
    args = [a[:MAX_ARG] if isinstance(a, str) else "" for a in list(argv[:MAX_ARGS])]
    if len(argv) > MAX_ARGS:
        notes.append(f"only the first {MAX_ARGS} arguments were read")
    args = _unwrap(args)
    if not args:
        return Invocation("", "", notes=tuple(notes))
    shell = _shell_command(args)
    if shell is not None:
        for words in shell[0][:MAX_COMMANDS] if depth < MAX_SHELLS else ():
            found = recognise(words, known, depth=depth + 1)
            if found.family:
                return msgspec.structs.replace(found, notes=(*notes, *found.notes))
        args = [args[0], *shell[1]]  # its $0, $1, ...: a model file may be handed to the script there
    program, rest, python = _program(args)
    family_name = _family_of(program, known)
    family = known.families.get(family_name) if family_name else None
    options = _options(rest, family) if family is not None else {}
    model = options.get(family.model_options[0]) if family is not None and family.model_options else None
    if model is None and (family is None or family.engine is None):
        model = _model_file(rest)
        if model is not None and family is None:
            family_name = _file_family(model, python)
            family = known.families[family_name]
            options = _options(rest, family)
    if family is not None and family.engine is not None and model is None:
        model = family.default_model
    return Invocation(family_name, program, model, options, tuple(notes))


def _unwrap(args: list[str]) -> list[str]:
    """The command under env, nice, uv run, conda run, ...: at most MAX_WRAPPERS deep."""
    for _ in range(MAX_WRAPPERS):
        while args and ASSIGNMENT.fullmatch(args[0]):
            args = args[1:]  # VAR=value, as env takes it
        if not args:
            return args
        name = os.path.basename(args[0])
        if name not in WRAPPERS:
            return args
        takes_value, subcommand = WRAPPERS[name]
        rest = args[1:]
        if subcommand is not None:
            rest = _skip_options(rest, takes_value)
            if not rest or rest[0] != subcommand:
                return args  # `uv pip ...`, `conda list`: not a launcher here
            rest = rest[1:]
        rest = _skip_options(rest, takes_value)
        if name == "env":
            while rest and ASSIGNMENT.fullmatch(rest[0]):
                rest = rest[1:]
        elif name in ("chrt", "timeout", "taskset") and rest:
            rest = rest[1:]  # the priority, the duration, the CPU mask or list
        args = rest
    return args


def _shell_command(args: list[str]) -> tuple[list[list[str]], list[str]] | None:
    """For `sh -c 'CMD ...' ARG...`: the simple commands of CMD as the shell would split them (quotes, no
    expansion; at `&&`, `;`, `|`, ...), and the ARGs after it; else None."""
    if os.path.basename(args[0]) not in SHELLS:
        return None
    rest = args[1:]
    while rest and rest[0].startswith("-") and rest[0] not in ("-c", "--"):
        rest = rest[1:]  # -e, -x, -l, --login, ...
    if len(rest) < 2 or rest[0] != "-c":
        return None
    lexer = shlex.shlex(rest[1], posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    try:
        for count, word in enumerate(lexer):
            if count >= MAX_ARGS:
                break
            if word and all(c in "();<>|&" for c in word):
                commands.append([])  # an operator or a redirection: what follows is another command or a file
            else:
                commands[-1].append(word)
    except ValueError:  # an unmatched quote: not a command line to read
        return [], rest[2:]
    # "$1" and "${1}" are the arguments after the command line ($0 first), as the shell hands them over.
    given = {f"${i}": word for i, word in enumerate(rest[2:12])} | {f"${{{i}}}": w for i, w in enumerate(rest[2:12])}
    return [[given.get(w, w) for w in c] for c in commands if c], rest[2:]


def _skip_options(args: list[str], takes_value: frozenset[str]) -> list[str]:
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] != "-":
        if args[i] == "--":
            return args[i + 1:]
        i += 2 if args[i] in takes_value else 1
    return args[i:]


def _program(args: list[str]) -> tuple[str, list[str], bool]:
    """(program or module, its arguments, whether Python runs it)."""
    name = os.path.basename(args[0])
    if not PYTHON.fullmatch(name):
        return name, args[1:], False
    i = 1
    while i < len(args):
        arg = args[i]
        if arg == "-m" and i + 1 < len(args):
            return args[i + 1], args[i + 2:], True
        if arg.startswith("-m") and len(arg) > 2:
            return arg[2:], args[i + 1:], True
        if arg == "-c":
            return "python -c", args[i + 2:], True
        if arg in PYTHON_VALUE_OPTIONS:
            i += 2
            continue
        if arg.startswith("-") and arg != "-":
            i += 1
            continue
        return os.path.basename(arg), args[i + 1:], True
    return name, [], True


def _family_of(program: str, known: Knowledge) -> str:
    for key, family in known.families.items():
        if program in family.programs or program in family.modules:
            return key
    return ""


def _file_family(model: str, python: bool) -> str:
    if model.lower().endswith(".gguf"):
        return "llama-cpp-python" if python else "gguf"
    return "safetensors"


def _is_model_file(text: str) -> bool:
    return text.lower().endswith(MODEL_SUFFIXES)


def _model_file(args: list[str]) -> str | None:
    """The first .gguf or .safetensors named (also as --opt=FILE), or folder holding a safetensors index."""
    stats = 0
    for arg in args:
        value = arg.partition("=")[2] if arg.startswith("-") and "=" in arg else arg
        if _is_model_file(value) and "\0" not in value:
            return value
        if value.startswith("-") or not value or "\0" in value or stats >= MAX_STATS:
            continue
        stats += 1
        try:
            if stat.S_ISDIR(os.stat(value).st_mode) and os.path.isfile(os.path.join(value, INDEX)):
                return value
        except (OSError, ValueError):
            continue
    return None


def _options(args: list[str], family: Family) -> dict[str, str]:
    """The values of the options *family* reads (`-c 8192`, `--ctx-size=8192`), each under the family's first
    spelling of it (-c for --ctx-size); the last one given wins, as in llama.cpp and argparse."""
    spelling = {name: group[0] for group in (family.model_options, family.device_options, family.compute_options,
                                            family.context_options, family.gpu_layers_options, family.cache_options)
                for name in group}
    found: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg in spelling and i + 1 < len(args):
            found[spelling[arg]] = args[i + 1]
        elif arg.startswith("--") and "=" in arg:
            name, _, value = arg.partition("=")
            if name in spelling:
                found[spelling[name]] = value
    return found
