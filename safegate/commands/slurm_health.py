"""slurm health: drain the node when it is unsafe, resume it when safe again if the drain is safegate's own."""

from __future__ import annotations

import os

import msgspec

from safegate.commands.slurm import HealthAction
from safegate.config.file import load_config
from safegate.config.model import DEFAULT_PROFILE
from safegate.errors import SlurmError
from safegate.exitcodes import ExitCode
from safegate.gate.preflight import evaluate, resolve
from safegate.units import Size


class HealthResult(msgspec.Struct, frozen=True):
    notes: tuple[str, ...]  # for stderr: what was decided, and why the node state was assumed
    action: HealthAction
    dry_run: bool
    exit_code: ExitCode


def health(config: str | None, node: str | None, reason_prefix: str, dry_run: bool) -> HealthResult:
    from safegate.commands import slurm

    settings = resolve(load_config(config), DEFAULT_PROFILE, {"memory": Size(bytes=0)})
    verdict = evaluate(settings)
    problems = slurm.node_problems(verdict)
    name = slurm.node_name(node, os.environ)
    notes: list[str] = []
    try:
        state = slurm.read_node(name)
    except SlurmError as exc:
        if not dry_run:
            raise
        # A dry run still says what it would do, from a node state it could not read.
        notes.append(f"{exc}; assuming node {name} is not drained")
        state = slurm.NodeState(name, "", "")
    action = slurm.decide(state, problems, reason_prefix)
    notes.append(action.message)
    return HealthResult(tuple(notes), action, dry_run, slurm.node_code(verdict))


def apply(result: HealthResult) -> str | None:
    """Carry out the decision (after it has been told); with --dry-run, the scontrol command instead."""
    from safegate.commands import slurm

    return slurm.apply(result.action, result.dry_run)
