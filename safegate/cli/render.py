"""Turning verdicts into text for people and JSON for programs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from safegate.gate.competing import rule_json
from safegate.gate.results import (
    CheckResult,
    CheckValues,
    CompetingValues,
    GpuValues,
    LockValues,
    MemoryValues,
    PressureValues,
    StaleValues,
    ThermalValues,
    Verdict,
)
from safegate.probes.gpu import GpuInfo
from safegate.probes.snapshots import Ticket
from safegate.units import format_bytes, format_duration, printable

if TYPE_CHECKING:
    from safegate.commands.reports import LockInfo, StatusReport
    from safegate.config.history import Run
    from safegate.config.model import Profile


def gpu_json(g: GpuInfo) -> dict[str, Any]:
    return {
        "index": g.index, "name": g.name, "uuid": g.uuid, "total": g.total, "used": g.used, "free": g.free,
        "temp": g.temp, "slowdown": g.slowdown, "mig_mode": g.mig_mode, "error": g.error,
        "processes": [{"pid": p.pid, "used": p.used, "kind": p.kind} for p in g.processes],
        "vendor": g.vendor, "vendor_index": g.index if g.vendor_index is None else g.vendor_index,
        "bus_id": g.bus_id,
        "hotspots": [{"label": h.label, "temp": h.celsius, "crit": h.crit} for h in g.hotspots],
        "clock_reasons": None if g.clock_reasons is None else list(g.clock_reasons),
    }


def values_json(values: CheckValues | None) -> dict[str, Any]:
    """A check's figures as documented in docs/json.md (the "values" object)."""
    if values is None:
        return {}
    if isinstance(values, MemoryValues):
        return {"available": values.available, "total": values.total, "reserved": values.reserved,
                "need": values.need, "left_after_start": values.left_after_start}
    if isinstance(values, PressureValues):
        return {"some_avg10": values.some_avg10}
    if isinstance(values, ThermalValues):
        return {"hottest": values.hottest, "sensor": values.sensor, "sensors": dict(values.sensors),
                "gpus": {f"gpu{i}": {"temp": t.temp, "limit": t.limit} for i, t in values.gpus.items()},
                "notes": list(values.notes)}
    if isinstance(values, GpuValues):
        return {"backend": values.backend, "driver": values.driver, "need": values.need,
                "gpus": [gpu_json(g) for g in values.gpus], "candidates": list(values.candidates),
                "reserved": {str(k): v for k, v in values.reserved.items()}, "chosen": values.chosen,
                "notes": list(values.notes)}
    if isinstance(values, LockValues):
        h = values.holder
        holder = None if h is None else {"pid": h.pid, "user": h.user, "host": h.host, "cmdline": h.cmdline,
                                         "started_at": h.started_at, "profile": h.profile,
                                         "alive": values.holder_alive, "job_pid": h.job_pid, "grant_to": h.owner}
        return {"lock": values.lock, "path": values.path, "held": values.held, "holder": holder,
                "legacy": [{"path": str(s.path), "pid": s.pid, "alive": s.alive, "note": s.note}
                           for s in values.legacy]}
    if isinstance(values, CompetingValues):
        # Command lines are other people's text: escaped, and in full (the text form quotes only their start).
        return {"matches": [{"pid": m.process.pid, "user": printable(m.user), "program": printable(m.process.program),
                             "rss": m.process.rss, "rule": rule_json(m.rule), "pattern": m.rule.pattern,
                             "action": m.rule.action, "matched": printable(m.matched),
                             "cmdline": printable(m.process.cmdline)} for m in values.matches]}
    if isinstance(values, StaleValues):
        return {"removed": [{"path": str(r.path), "what": r.what, "removed": r.removed, "error": r.error}
                            for r in values.removed]}
    raise TypeError(f"no JSON form for {type(values).__name__}")


def verdict_json(verdict: Verdict) -> str:
    data: dict[str, Any] = {
        "verdict": "pass" if verdict.ok else "blocked",
        "exit_code": int(verdict.exit_code),
        "profile": verdict.profile,
        "checks": [
            {
                "name": c.name,
                "status": c.status.value,
                "reason": c.reason,
                "values": values_json(c.values),
                "thresholds": dict(c.thresholds),
                "exit_code_if_failing": int(c.code),
            }
            for c in verdict.checks
        ],
    }
    import json  # only for --json: a plain check prints text

    return json.dumps(data, indent=2, sort_keys=False, default=str)


def check_line(check: CheckResult) -> str:
    # Reasons quote text from outside (holder records, command lines, sensor labels): escaped for the terminal.
    return f"{check.status.value.upper():<8} {check.name:<16} {printable(check.reason)}"


def verdict_text(verdict: Verdict) -> str:
    head = (
        f"safe to start (profile {printable(verdict.profile)})"
        if verdict.ok
        else f"BLOCKED (exit {int(verdict.exit_code)}, profile {printable(verdict.profile)})"
    )
    return "\n".join([head, *(check_line(c) for c in verdict.checks)])


def render_lock(lock: LockInfo, now: float | None = None) -> str:
    import time

    now = time.time() if now is None else now
    h = lock.holder
    state = "HELD" if lock.held else "free" if lock.usable else "UNUSABLE"
    if lock.legacy_pid is not None:
        who = f"pid {lock.legacy_pid} (an old shell gate's pid file: every check blocks while it lives)"
    elif h is None:
        who = "(held by a process without metadata, e.g. flock(1))" if lock.held else ""
    else:
        pid = h.job_pid or h.pid
        alive = "" if lock.alive else " (gone)"
        # Anyone can write a holder record or name a command: never send its control characters to a terminal.
        who = (f"pid {pid}{alive} {printable(h.user)}@{printable(h.host)} profile {printable(h.profile)} for "
               f"{format_duration(max(0.0, now - h.started_at))}: {printable(' '.join(h.cmdline))[:80]}")
        if h.owner is not None:  # a passing check's grant, held by its keeper for the owner's job
            job = f"job pid {h.job_pid}" if h.job_pid is not None else "next job (not started yet)"
            who = (f"granted to pid {h.owner}'s {job} by a check (keeper pid {h.pid}, {printable(h.user)}, profile "
                   f"{printable(h.profile)}) for {format_duration(max(0.0, now - h.started_at))}")
    note = f"  [{printable(lock.note)}]" if lock.note else ""
    return f"{printable(lock.name):<20} {state:<5} {who}".rstrip() + note


def queue_json(tickets: Sequence[Ticket], now: float) -> list[dict[str, Any]]:
    return [{"position": i, "pid": t.pid, "user": printable(t.user),
             "lock": None if t.lock is None else printable(t.lock), "profile": printable(t.profile),
             "need": t.need, "arrived_at": t.arrival / 1e9, "waited": max(0.0, now - t.arrival / 1e9),
             "blocked_by": printable(t.blocked_by), "reason": printable(t.reason)}
            for i, t in enumerate(tickets, 1)]


def queue_text(tickets: Sequence[Ticket], now: float) -> list[str]:
    """One line per waiter, in the order they are served (per lock)."""
    return [f"{i:>3}. pid {t.pid} {printable(t.user)} lock {printable(t.lock or '-')} profile {printable(t.profile)} "
            f"need "
            f"{format_bytes(t.need)}, waiting {format_duration(max(0.0, now - t.arrival / 1e9))}: "
            f"{printable(t.reason)[:160] or 'arriving'}" for i, t in enumerate(tickets, 1)]


def status_text(r: StatusReport) -> str:
    m = r.memory
    pressure = f"{m.pressure_some_avg10:g}%" if m.pressure_some_avg10 is not None else "unknown"
    lines = [
        f"RAM      {format_bytes(m.available)} available of {format_bytes(m.total)}; pressure some avg10 {pressure}",
        f"swap     {format_bytes(r.swap_used)} used of {format_bytes(r.swap_total)}",
    ]
    # Sensor labels and GPU names come from drivers and config files: escaped like any outside text.
    temps = ", ".join(f"{printable(x.key)} {x.celsius:g} C" for x in r.thermal.readings) or "no readable sensor"
    lines.append(f"temps    {temps}")
    if r.gpus.gpus:
        for g in r.gpus.gpus:
            mem = f"{format_bytes(g.used or 0)} used of {format_bytes(g.total)}" if g.total else "unified memory"
            temp = f", {g.temp:g} C" if g.temp is not None else ""
            temp += "".join(f", {printable(h.label)} {h.celsius:g} C" + (f" (crit {h.crit:g})" if h.crit else "")
                            for h in g.hotspots)
            # DRM cards list no processes here (fdinfo is read for a job's own processes only)
            procs = f", {len(g.processes)} process(es)" if g.vendor == "nvidia" else f" ({g.vendor})"
            lines.append(f"GPU {g.index}    {printable(g.name)}: {printable(g.error or mem)}{temp}{procs}"
                         + _clocks_held(g))
    else:
        lines.append(f"GPUs     none ({r.gpus.backend})")
    where = printable(str(r.lock_dir))
    lines.append(f"locks    in {where}:" if r.locks else f"locks    none in {where}")
    lines += ["  " + render_lock(lock, r.time) for lock in r.locks]
    lines.append("waiting  " + (f"{len(r.waiters)}, in the order they are served:" if r.waiters else "nobody"))
    lines += ["  " + line for line in queue_text(r.waiters, r.time)]
    lines.append("largest processes:")
    lines += [f"  {p.pid:>7} {format_bytes(p.rss):>10}  {printable(p.cmdline)[:90]}" for p in r.top]
    return "\n".join(lines)


def _clocks_held(g: GpuInfo) -> str:
    """Why the card holds its clocks down (NVML's clock-event reasons), where it does; idle is not news."""
    reasons = [r for r in g.clock_reasons or () if r != "GpuIdle"]
    return f", clocks held down: {', '.join(reasons)}" if reasons else ""


def status_json(r: StatusReport) -> str:
    m = r.memory
    data = {
        "time": r.time,
        "memory": {"total": m.total, "available": m.available, "pressure_some_avg10": m.pressure_some_avg10},
        "swap": {"total": r.swap_total, "used": r.swap_used},
        "temperatures": {x.key: x.celsius for x in r.thermal.readings},
        "temperature_notes": list(r.thermal.notes),
        "gpus": {"backend": r.gpus.backend, "status": r.gpus.status, "devices": [gpu_json(g) for g in r.gpus.gpus]},
        "lock_dir": str(r.lock_dir),
        "locks": [lock_json(lock) for lock in r.locks],
        "waiters": queue_json(r.waiters, r.time),
        "top_processes": [{"pid": p.pid, "rss": p.rss, "cmdline": p.cmdline} for p in r.top],
    }
    import json

    return json.dumps(data, indent=2)


def profile_line(p: dict[str, Any]) -> str:
    """One row of `safegate profiles`, from the profile's JSON form."""
    lock = printable(p["lock"] or "(none)")
    rec = p["recorded"]
    p95 = rec["peak_memory_p95"]
    seen = (f"{rec['runs']} runs, p95 peak {format_bytes(p95)}" if p95 is not None
            else f"{rec['runs']} runs, no whole run" if rec["runs"] else "no runs recorded")
    notes = []
    for sig in p.get("signatures", []):
        if sig["memory_off"] is not None or sig["gpu_memory_off"] is not None:
            off = max(x for x in (sig["memory_off"], sig["gpu_memory_off"]) if x is not None)
            notes.append(f"{printable(sig['signature'])}: predicted {format_bytes(sig['predicted_memory'] or 0)} RAM, "
                         f"{format_bytes(sig['predicted_gpu_memory'] or 0)} GPU memory; learned "
                         f"{format_bytes(sig['learned_memory'] or 0)}, {format_bytes(sig['learned_gpu_memory'] or 0)}"
                         f" ({off:.0%} off: correct the table or set memory in a profile)")
        elif sig["learned_memory"] is not None:
            notes.append(f"{printable(sig['signature'])}: predicted {format_bytes(sig['predicted_memory'] or 0)}, "
                         f"learned {format_bytes(sig['learned_memory'])} RAM")
    if rec.get("stopped_at_cap"):
        notes.append(f"{rec['stopped_at_cap']} stopped at a cap (left out of the p95: they needed more)")
    if rec.get("exceeds_need"):
        notes.append(f"recorded peak {format_bytes(rec['peak_memory_any'])} exceeds the declared memory "
                     f"{printable(p['memory'])}")
    return (f"{printable(p['name']):<20} memory {printable(p['memory']):<10} lock {lock:<16} {seen:<32} "
            f"{printable(p['source'])}" + "".join(f"; {note}" for note in notes))


def lock_json(lock: LockInfo) -> dict[str, Any]:
    h = lock.holder
    return {
        "name": lock.name, "held": lock.held, "alive": lock.alive, "note": lock.note, "usable": lock.usable,
        "legacy_pid": lock.legacy_pid,
        "holder": None if h is None else {
            "pid": h.pid, "job_pid": h.job_pid, "user": h.user, "host": h.host, "cmdline": h.cmdline,
            "started_at": h.started_at, "profile": h.profile, "need": h.need, "used": h.used, "grant_to": h.owner,
        },
    }


def profile_json(p: Profile, runs: list[Run] | None = None) -> dict[str, Any]:
    from safegate.config.history import capped, learned_need, percentile, whole_runs

    runs = runs or []
    peaks = [r.peak_memory for r in whole_runs(runs)]  # a run stopped at a cap peaked at the cap
    stopped = [r.peak_memory for r in runs if capped(r)]
    # What the runs used against what the profile declares: a whole run's peak, or the cap a run was stopped at
    # (it needed at least that), above the declared memory.
    used = max([*peaks, *stopped], default=0)
    # Not compared: "auto", a share of RAM (percent), or 0 (no need declared).
    declared = None if p.memory_auto else p.memory.bytes or None
    return {
        "name": p.name, "source": p.source, "description": p.description, "match": list(p.match),
        "memory": "auto" if p.memory_auto else str(p.memory), "lock": p.lock,
        "recorded": {
            "runs": len(runs),
            "peak_memory_p95": percentile(peaks, 95) if peaks else None,
            "peak_memory_max": max(peaks) if peaks else None,
            "learned_need": learned_need(runs),
            "peak_gpu_memory_max": max((r.peak_gpu_memory for r in runs if r.peak_gpu_memory), default=None),
            "stopped_at_cap": len(stopped),
            "peak_memory_any": used or None,
            "exceeds_need": declared is not None and used > declared,
        }, "signatures": signatures_json(runs), "memory_margin": str(p.memory_margin), "max_temp": p.max_temp,
        "gpu_memory": str(p.gpu_memory), "max_mem": str(p.max_mem) if p.max_mem else None,
        "competing": [rule_json(r) for r in p.competing],
    }


def need_text(n: dict[str, Any]) -> str:
    """`safegate need`, from its JSON form: the two figures and where each comes from, then the prediction and
    what recorded runs used."""
    tool = f"{n['tool']} (program {printable(n['program'])})" if n["tool"] else "no tool safegate knows"
    lines = [f"profile     {printable(n['profile'])}", f"tool        {tool}"]
    if n["signature"]:
        lines.append(f"signature   {printable(n['signature'])}")
    for label, key in (("RAM", "memory"), ("GPU memory", "gpu_memory")):
        f = n[key]
        lines.append(f"{label:<11} {format_bytes(f['bytes']):<10} from {f['source']}: {printable(f['detail'])}")
    lock = n["lock"]
    lines.append(f"lock        {printable(lock['name'] or '(none)')} ({printable(lock['source'])})")
    p = n["predicted"]
    lines.append("predicted   " + ("nothing" if p is None else f"RAM {format_bytes(p['memory'])}, GPU memory "
                                   f"{format_bytes(p['gpu_memory'])} ({p['source']}; {', '.join(p['cites'])})"))
    from safegate.config.history import MIN_RUNS

    r = n["learned"]
    if r is None:
        lines.append("learned     no recorded runs of this command")
    else:
        got = (f"RAM {format_bytes(r['memory'])}" + (f", GPU memory {format_bytes(r['gpu_memory'])}"
                                                    if r["gpu_memory"] is not None else "")
               if r["memory"] is not None else f"not yet (fewer than {MIN_RUNS} whole runs)")
        lines.append(f"learned     {got} from {r['runs']} recorded run(s)")
    lines += [f"note: {printable(note)}" for note in n["notes"]]
    return "\n".join(lines)


def signatures_json(runs: list[Run]) -> list[dict[str, Any]]:
    """Per command signature among a profile's runs: what was predicted for it (at its last run) and what its runs
    taught (safegate.need.settle's figures), and how far apart they are when that is far."""
    from safegate.config.history import learned_gpu_need, learned_need, percentile, whole_runs
    from safegate.need.settle import far_off

    by: dict[str, list[Run]] = {}
    for r in runs:
        if r.signature is not None:
            by.setdefault(r.signature, []).append(r)
    out = []
    for signature, rs in by.items():
        whole = whole_runs(rs)
        last = rs[-1]
        peaks = [r.peak_memory for r in whole]
        gpu_peaks = [r.peak_gpu_memory for r in whole if r.peak_gpu_memory]
        learned = learned_need(rs)
        used = percentile(peaks, 95) if peaks and learned is not None else None
        gpu_used = percentile(gpu_peaks, 95) if gpu_peaks and learned_gpu_need(rs) is not None else None
        out.append({
            "signature": printable(signature), "runs": len(rs), "predicted_memory": last.predicted_memory,
            "predicted_gpu_memory": last.predicted_gpu_memory, "learned_memory": learned,
            "learned_gpu_memory": learned_gpu_need(rs),
            "memory_off": None if last.predicted_memory is None else far_off(last.predicted_memory, used),
            "gpu_memory_off": None if last.predicted_gpu_memory is None else far_off(last.predicted_gpu_memory,
                                                                                     gpu_used),
        })
    return out
