"""safegate inside Slurm: a node health check that drains and resumes its own drains, and exec in a job.

safegate grows no distributed lock or scheduler: Slurm licenses are the cluster-wide mutex, its --mem is the
admission by memory, draining is how a node says "not now". safegate adds what Slurm does not know:
temperatures, memory pressure, GPU health and competing non-Slurm processes, and a clean stop before the
cgroup OOM killer.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence

import msgspec

from safegate.config.file import load_config
from safegate.config.model import DEFAULT_PROFILE
from safegate.errors import LicenseMissing, SlurmError
from safegate.exitcodes import ExitCode
from safegate.gate.preflight import evaluate, resolve
from safegate.gate.results import Verdict
from safegate.units import Size

DEFAULT_PREFIX = "safegate:"
# Checks that describe the node, not one job: the per-job lock and memory need do not belong in a health check.
NODE_CHECKS = ("memory", "memory_pressure", "gpu", "thermal", "competing")
MEM_HEADROOM = 0.95  # exec's default --max-mem inside a job: a little below the allocation


class NodeState(msgspec.Struct, frozen=True):
    name: str
    state: str  # e.g. IDLE, MIXED+DRAIN
    reason: str

    @property
    def drained(self) -> bool:
        return "DRAIN" in self.state.upper()


def node_name(explicit: str | None, env: Mapping[str, str]) -> str:
    """--node, else SLURMD_NODENAME, else the short hostname."""
    return explicit or env.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def _scontrol(args: Sequence[str], timeout: float = 20) -> str:
    exe = shutil.which("scontrol")
    if exe is None:
        raise SlurmError("scontrol not found on PATH")
    try:
        result = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"scontrol {' '.join(args)} timed out after {timeout:g}s") from None
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}").splitlines()[0]
        raise SlurmError(f"scontrol {' '.join(args)} failed: {detail}")
    return result.stdout


def parse_fields(text: str) -> dict[str, str]:
    """`scontrol show ... -o` output: Key=Value pairs; Reason= runs to its end (it may hold spaces)."""
    fields: dict[str, str] = {}
    key, value = "", list[str]()
    for token in text.strip().split(" "):
        name, sep, rest = token.partition("=")
        if sep and name and name[0].isupper() and key != "Reason":
            if key:
                fields[key] = " ".join(value)
            key, value = name, [rest]
        elif sep and name in ("Comment", "Extra", "Features", "AvailableFeatures") and key == "Reason":
            fields[key] = " ".join(value)
            key, value = name, [rest]
        else:
            value.append(token)
    if key:
        fields[key] = " ".join(value)
    return fields


def read_node(name: str) -> NodeState:
    fields = parse_fields(_scontrol(["show", "node", name, "-o"]))
    reason = fields.get("Reason", "")
    # scontrol appends " [user@time]" to the reason it shows.
    if reason.endswith("]") and " [" in reason:
        reason = reason[: reason.rindex(" [")]
    return NodeState(name, fields.get("State", ""), reason)


def node_problems(verdict: Verdict) -> list[str]:
    return [f"{c.name}: {c.reason}" for c in verdict.checks if c.name in NODE_CHECKS and c.blocks]


def node_code(verdict: Verdict) -> ExitCode:
    return min((c.code for c in verdict.checks if c.name in NODE_CHECKS and c.blocks), default=ExitCode.OK)


class HealthAction(msgspec.Struct, frozen=True):
    command: list[str] | None  # the scontrol update to run, if any
    message: str


def decide(node: NodeState, problems: list[str], prefix: str) -> HealthAction:
    """Pure: what to do about the node. Drain when unsafe; resume only a drain of our own making."""
    if problems:
        why = f"{prefix} " + "; ".join(problems)
        why = why[:200]  # Slurm keeps reasons short; the first problem is the one that matters
        if node.drained and node.reason == why:
            return HealthAction(None, f"node {node.name} already drained: {why}")
        if node.drained and not node.reason.startswith(prefix):
            return HealthAction(None, f"node {node.name} is drained by someone else ({node.reason}); left alone")
        return HealthAction(["update", f"NodeName={node.name}", "State=DRAIN", f"Reason={why}"],
                            f"draining node {node.name}: {why}")
    if node.drained and node.reason.startswith(prefix):
        return HealthAction(["update", f"NodeName={node.name}", "State=RESUME"],
                            f"node {node.name} is healthy again; resuming it (was: {node.reason})")
    if node.drained:
        return HealthAction(None, f"node {node.name} is healthy; its drain by someone else ({node.reason}) is left")
    return HealthAction(None, f"node {node.name} is healthy")


def apply(action: HealthAction, dry_run: bool) -> str | None:
    """Run the action's scontrol command; with dry_run, return it as a shell line instead."""
    if action.command is None:
        return None
    if dry_run:
        import shlex

        return shlex.join(["scontrol", *action.command])
    _scontrol(action.command)
    return None


# --- exec inside a job --------------------------------------------------------------------------------


def _decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' or '٣', which int() then refuses."""
    return text.isascii() and text.isdigit()


def job_licenses(env: Mapping[str, str]) -> dict[str, int]:
    """The licenses the job holds: SLURM_JOB_LICENSES where Slurm sets it, else scontrol show job."""
    text = env.get("SLURM_JOB_LICENSES")
    if text is None:
        fields = parse_fields(_scontrol(["show", "job", env["SLURM_JOB_ID"], "-o"]))
        text = fields.get("Licenses", "")
    held: dict[str, int] = {}
    for item in text.replace(",", " ").split():
        if item in ("(null)", "(none)"):
            continue
        name, _, count = item.partition(":")
        name = name.split("@", 1)[0]
        held[name] = held.get(name, 0) + (int(count) if _decimal(count) else 1)
    return held


def require_license(license_name: str, env: Mapping[str, str]) -> None:
    held = job_licenses(env)
    if held.get(license_name, 0) < 1:
        raise LicenseMissing(
            f"job {env.get('SLURM_JOB_ID')} does not hold the Slurm license {license_name!r} this profile needs "
            f"(Slurm licenses are advisory); add '#SBATCH -L {license_name}:1' to the job script"
        )


def job_memory_limit(env: Mapping[str, str]) -> int | None:
    """The job's memory allocation on this node in bytes (SLURM_MEM_PER_NODE, or per CPU times CPUs)."""
    per_node = env.get("SLURM_MEM_PER_NODE")
    if per_node and _decimal(per_node) and int(per_node) > 0:
        return int(per_node) * 1024**2
    per_cpu = env.get("SLURM_MEM_PER_CPU")
    cpus = env.get("SLURM_CPUS_ON_NODE") or env.get("SLURM_JOB_CPUS_PER_NODE", "").split("(")[0]
    if per_cpu and _decimal(per_cpu) and cpus and _decimal(cpus):
        return int(per_cpu) * int(cpus) * 1024**2
    return None


def default_max_mem(env: Mapping[str, str]) -> int | None:
    """exec's --max-mem inside a job: a little below the allocation, so safegate stops the job cleanly (exit 20,
    a summary) before the cgroup OOM killer leaves it half-dead."""
    limit = job_memory_limit(env)
    return int(limit * MEM_HEADROOM) if limit else None


# slurm health: drain the node when it is unsafe, resume it when safe again if the drain is safegate's own.


class HealthResult(msgspec.Struct, frozen=True):
    notes: tuple[str, ...]  # for stderr: what was decided, and why the node state was assumed
    action: HealthAction
    dry_run: bool
    exit_code: ExitCode


def health(config: str | None, node: str | None, reason_prefix: str, dry_run: bool) -> HealthResult:
    settings = resolve(load_config(config), DEFAULT_PROFILE, {"memory": Size(bytes=0)})
    verdict = evaluate(settings)
    problems = node_problems(verdict)
    name = node_name(node, os.environ)
    notes: list[str] = []
    try:
        state = read_node(name)
    except SlurmError as exc:
        if not dry_run:
            raise
        # A dry run still says what it would do, from a node state it could not read.
        notes.append(f"{exc}; assuming node {name} is not drained")
        state = NodeState(name, "", "")
    action = decide(state, problems, reason_prefix)
    notes.append(action.message)
    return HealthResult(tuple(notes), action, dry_run, node_code(verdict))


def apply_health(result: HealthResult) -> str | None:
    """Carry out the decision (after it has been told); with --dry-run, the scontrol command instead."""
    return apply(result.action, result.dry_run)
