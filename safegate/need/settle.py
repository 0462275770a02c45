"""The one decision of a job's need (RAM and GPU memory) and lock, for exec, check, slots and need alike
(gate.preflight.resolve calls it), each figure with where it came from. Precedence, first that applies:

1. an option: --mem, --gpu-mem (or the API's keyword);
2. the profile, where a config file sets memory / gpu_memory (in the profile or its [defaults]): the user's word;
3. recorded runs of this command's signature, once MIN_RUNS whole runs exist (p95 of their peaks + 10%); below a
   model file's own figures they are not taken (a recorded peak misses weights mapped from a file the page cache
   already held: bench/bench_need_gguf.py recorded 7-35% of such a job's need);
4. the prediction: the built-in table (knowledge.toml) or the model file's header;
5. the profile's own figure: memory = "auto" learned from the profile's runs (else its fallback), or a built-in
   profile's memory (whisper-large-v3's 10G, for a check that names no command);
6. nothing: 0.

The lock: an option, else the profile's, except that the `default` profile takes the model family's lock from the
table (whisper-large for every large whisper)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec

from safegate.config import history
from safegate.config.model import DEFAULT_PROFILE, Profile
from safegate.need.predict import Known, Prediction, predict
from safegate.units import Size, format_bytes

FAR_OFF = 0.25  # a prediction further than this from what recorded runs use is reported

OPTION = {"memory": "--mem", "gpu_memory": "--gpu-mem"}


class Figure(msgspec.Struct, frozen=True):
    """One decided figure. *source*: option, profile, history, table, file or none; *detail*: which one, in
    words."""

    size: Size
    source: str
    detail: str


class Learned(msgspec.Struct, frozen=True):
    """What recorded runs of the command's signature used: their count, the p95 of their peaks, and the need
    learned from them (None until MIN_RUNS whole runs)."""

    runs: int
    peak_memory_p95: int | None
    peak_gpu_memory_p95: int | None
    memory: int | None
    gpu_memory: int | None


class Need(msgspec.Struct, frozen=True):
    memory: Figure
    gpu_memory: Figure
    lock_source: str
    known: Known | None
    learned: Learned | None
    notes: tuple[str, ...] = ()

    @property
    def signature(self) -> str | None:
        return self.known.signature if self.known is not None else None

    @property
    def prediction(self) -> Prediction | None:
        return self.known.prediction if self.known is not None else None


def settle(profile: Profile, overrides: Mapping[str, Any], command: Sequence[str], *, env: Mapping[str, str],
           gpu_present: Callable[[], bool]) -> tuple[Need, dict[str, Any]]:
    """The need, and what it changes in the profile (memory, gpu_memory, lock: what no option set)."""
    known = predict(command, gpu_present) if command else None
    recorded = history.load(history.history_path(env)) if (known and known.signature) or profile.memory_auto else {}
    learned = _learned(recorded, known.signature) if known and known.signature else None
    prediction = known.prediction if known else None
    memory = _figure("memory", profile, overrides, learned, prediction, recorded)
    gpu = _figure("gpu_memory", profile, overrides, learned, prediction, recorded)
    changes: dict[str, Any] = {"memory": memory.size, "gpu_memory": gpu.size}
    lock_source = "option" if "lock" in overrides else f"profile {profile.name}"
    if "lock" not in overrides and profile.name == DEFAULT_PROFILE and prediction and prediction.lock:
        changes["lock"] = prediction.lock
        lock_source = "table"
    notes = [*(known.notes if known else ()), *_far_off(learned, prediction)]
    return Need(memory, gpu, lock_source, known, learned, tuple(notes)), changes


def _figure(key: str, profile: Profile, overrides: Mapping[str, Any], learned: Learned | None,
            prediction: Prediction | None, recorded: Mapping[str, list[history.Run]]) -> Figure:
    own: Size = getattr(profile, key)
    auto = key == "memory" and profile.memory_auto
    if key in overrides:
        return Figure(overrides[key], "option", OPTION[key])
    if key in profile.declared and not auto:
        return Figure(own, "profile", f"profile {profile.name} ({profile.source})")
    runs = None if learned is None else learned.memory if key == "memory" else learned.gpu_memory
    if learned is not None and runs is not None:
        floor = _file_floor(key, prediction)
        if floor is not None and runs < floor:
            # A model file's header is exact arithmetic; a recorded peak can miss what the job maps from a file
            # the page cache already held (charged to whoever read it first): learning only raises it.
            return Figure(Size(bytes=floor), "file", f"{prediction.detail if prediction else ''}; recorded runs "
                          f"used less ({format_bytes(runs)}), below the file's own figures: they only raise it")
        return Figure(Size(bytes=runs), "history", f"{learned.runs} recorded runs of this command (p95 + 10%)")
    if auto:
        of_profile = history.learned_need(recorded.get(profile.name, []))
        if of_profile is not None:
            return Figure(Size(bytes=of_profile), "history", f"recorded runs of profile {profile.name} (auto)")
    if prediction is not None:
        predicted = prediction.ram if key == "memory" else prediction.gpu
        return Figure(Size(bytes=predicted), prediction.source, prediction.detail)
    if auto:
        return Figure(Size(bytes=history.AUTO_FALLBACK), "profile",
                      f"profile {profile.name}: auto, fewer than {history.MIN_RUNS} recorded runs")
    if own.bytes or own.percent:
        return Figure(own, "profile", f"profile {profile.name} ({profile.source})")
    return Figure(own, "none", "nothing predicts it")


def _file_floor(key: str, prediction: Prediction | None) -> int | None:
    """A model file's predicted figure, which recorded runs may raise but never lower (see _figure)."""
    if prediction is None or prediction.source != "file":
        return None
    return prediction.ram if key == "memory" else prediction.gpu


def _learned(recorded: Mapping[str, list[history.Run]], signature: str) -> Learned | None:
    runs = history.of_signature(recorded, signature)
    if not runs:
        return None
    whole = history.whole_runs(runs)
    peaks = [r.peak_memory for r in whole]
    gpu_peaks = [r.peak_gpu_memory for r in whole if r.peak_gpu_memory]
    return Learned(len(runs), history.percentile(peaks, 95) if peaks else None,
                   history.percentile(gpu_peaks, 95) if gpu_peaks else None,
                   history.learned_need(runs), history.learned_gpu_need(runs))


def far_off(predicted: int, used: int | None) -> float | None:
    """How far *predicted* is from *used* (a fraction of *used*), when it is further than FAR_OFF."""
    if used is None or used <= 0:
        return None
    off = abs(predicted - used) / used
    return off if off > FAR_OFF else None


def _far_off(learned: Learned | None, prediction: Prediction | None) -> list[str]:
    if learned is None or prediction is None or learned.memory is None:
        return []
    where = "knowledge.toml" if prediction.source == "table" else "the model file's figures"
    notes = []
    for what, predicted, used in (("RAM", prediction.ram, learned.peak_memory_p95),
                                  ("GPU memory", prediction.gpu, learned.peak_gpu_memory_p95)):
        off = far_off(predicted, used)
        if off is not None and used is not None:
            kept = ("the file's figure is kept (runs only raise it)" if prediction.source == "file" and used < predicted
                    else "the recorded figure is used")
            notes.append(f"the prediction of {what} ({format_bytes(predicted)}) is {off:.0%} off what "
                         f"{learned.runs} recorded runs of this command used ({format_bytes(used)}, p95): {kept}; "
                         f"correct {where} or set memory in a profile")
    return notes
