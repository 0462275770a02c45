"""safegate need, and check/slots/exec -- CMD: a job's need predicted from its own command line (issue 27)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_nvml import FakeGpu, FakeNvmlUnavailable, build_fake_nvml, nvml_env, write_state
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelfiles import llama_config, llama_safetensors_tensors, write_llama_gguf, write_safetensors
from support import Run

from safegate.exitcodes import ExitCode
from safegate.need.command import MAX_ARGS, SIGNATURE_MAX, recognise
from safegate.need.knowledge import knowledge
from safegate.need.predict import predict

GiB = 1024**3
MiB = 1024**2
WHISPER_README = "https://github.com/openai/whisper#available-models-and-languages"


def need(run: Run, *command: str, options: tuple[str, ...] = (), **kwargs: object) -> dict[str, object]:
    result = run("need", "--json", *options, "--", *command, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def fig(data: dict[str, object], key: str) -> dict[str, object]:
    value = data[key]
    assert isinstance(value, dict)
    return value


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return build_fake_nvml(tmp_path_factory.mktemp("nvml"))
    except FakeNvmlUnavailable as exc:
        pytest.skip(f"the fake NVML cannot be built here: {exc}")


@pytest.fixture
def gpu_env(env: dict[str, str], fake_lib: Path, tmp_path: Path) -> Callable[[float], dict[str, str]]:
    """The environment of a machine with one 24 GiB GPU with *free_gib* free."""

    def make(free_gib: float) -> dict[str, str]:
        total = 24 * GiB
        write_state(tmp_path / "nvml-state", [FakeGpu("Fake GPU", "GPU-0000", total=total,
                                                      used=total - int(free_gib * GiB))])
        return nvml_env(fake_lib, tmp_path / "nvml-state", base=env)

    return make


# --- the table ------------------------------------------------------------------------------------------------


def test_whisper_large_v3_on_cpu_needs_ram_from_the_table(run: Run) -> None:
    data = need(run, "whisper", "--model", "large-v3", "--device", "cpu", "talk.wav")
    memory, gpu = fig(data, "memory"), fig(data, "gpu_memory")
    assert isinstance(memory["bytes"], int) and 8 * GiB <= memory["bytes"] <= 14 * GiB
    assert gpu["bytes"] == 0
    assert memory["source"] == "table" and "openai-whisper large-v3" in str(memory["detail"])
    assert WHISPER_README in fig(data, "predicted")["cites"]  # type: ignore[operator]
    assert data["tool"] == "openai-whisper" and data["lock"] == {"name": "whisper-large",
                                                                "source": "profile whisper-large-v3"}
    text = run("need", "--", "whisper", "--model", "large-v3", "--device", "cpu", "talk.wav").stdout
    assert "from table: openai-whisper large-v3" in text and WHISPER_README in text


@pytest.mark.parametrize(("model", "vram"), [("medium", 5), ("turbo", 6), ("large-v2", 10), ("tiny.en", 1)])
def test_each_whisper_size_gets_its_table_figure_on_the_gpu(run: Run, gpu_env: Callable[[float], dict[str, str]],
                                                            model: str, vram: int) -> None:
    on_gpu = need(run, "whisper", "--model", model, "talk.wav", env=gpu_env(20))
    assert fig(on_gpu, "gpu_memory") == {**fig(on_gpu, "gpu_memory"), "bytes": vram * GiB, "source": "table"}
    # Without a GPU, openai-whisper runs on the CPU: the same RAM (it builds the model on the CPU either way), no
    # GPU memory.
    on_cpu = need(run, "whisper", "--model", model, "talk.wav")
    assert fig(on_cpu, "gpu_memory")["bytes"] == 0
    assert fig(on_cpu, "memory")["bytes"] == fig(on_gpu, "memory")["bytes"] > 0


def test_faster_whisper_int8_needs_less_than_float16(run: Run) -> None:
    def gpu(*compute: str) -> int:
        data = need(run, "whisper-ctranslate2", "--model", "large-v3", "--device", "cuda", *compute, "a.wav")
        value = fig(data, "gpu_memory")["bytes"]
        assert isinstance(value, int) and fig(data, "gpu_memory")["source"] == "table"
        return value

    assert 0 < gpu("--compute_type", "int8") < gpu("--compute_type", "float16") == gpu()

    def ram(*args: str) -> int:
        value = fig(need(run, *args), "memory")["bytes"]
        assert isinstance(value, int)
        return value

    cpu = ("--device", "cpu", "--compute_type")
    assert ram("whisperx", "a.wav", "--model", "large-v2", *cpu, "int8") < ram("whisperx", "a.wav", "--model",
                                                                              "large-v2", *cpu, "float32")
    # Both the CTranslate2 tools below openai-whisper's fp32 load, for the same model.
    assert ram("whisperx", "a.wav", "--model", "large-v2", *cpu, "float32") < ram("whisper", "--model", "large-v2",
                                                                                 "--device", "cpu", "a.wav")


@pytest.mark.parametrize("argv", [
    ["whisper"], ["/usr/local/bin/whisper"], [sys.executable, "/opt/venv/bin/whisper"], ["python3", "-m", "whisper"],
    ["python3", "-u", "-X", "dev", "-mwhisper"], ["uv", "run", "--with", "openai-whisper", "whisper"],
    ["env", "-u", "HOME", "CUDA_VISIBLE_DEVICES=1", "whisper"], ["nice", "-n", "10", "nohup", "whisper"],
    ["conda", "run", "-n", "asr", "--no-capture-output", "whisper"], ["OMP_NUM_THREADS=4", "whisper"],
    ["timeout", "-s", "INT", "10h", "taskset", "-c", "0-3", "whisper"],
])
def test_the_program_is_recognised_however_it_is_launched(argv: list[str]) -> None:
    found = recognise([*argv, "talk.wav", "--model=large-v3", "--device", "cpu"], knowledge())
    assert (found.family, found.model, found.options.get("--device")) == ("openai-whisper", "large-v3", "cpu")


def test_a_shell_command_line_is_read_as_the_shell_splits_it() -> None:
    found = recognise(["bash", "-c", "cd /data && OMP_NUM_THREADS=4 whisper --model 'large-v3' a.wav > log 2>&1"],
                      knowledge())
    assert (found.family, found.model) == ("openai-whisper", "large-v3")
    # A model file handed to the script as $1 still counts; an unmatched quote is no command.
    assert recognise(["sh", "-c", 'llama-cli -m "$1"', "sh", "m.gguf"], knowledge()).model == "m.gguf"
    assert recognise(["sh", "-c", "whisper 'x"], knowledge()).family == ""


def test_a_command_nothing_knows_needs_nothing(run: Run) -> None:
    data = need(run, "sh", "-c", "exit 0")
    assert fig(data, "memory")["source"] == "none" and fig(data, "memory")["bytes"] == 0
    assert data["predicted"] is None and data["tool"] is None
    missing = run("need", "--json")
    assert missing.returncode == ExitCode.USAGE and missing.stderr.count("\n") == 1 and "CMD" in missing.stderr


ARG = st.one_of(st.sampled_from(["whisper", "python3", "-m", "env", "uv", "run", "--model", "large-v3", "-c", "-ngl",
                                 "99", "x.gguf", "--device=cpu", "--", "A=1", "llama-server", "-m", "whisperx",
                                 "--compute_type", "int8", "nice", "-n", "conda", "/"]),
                st.text(max_size=30))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(ARG, max_size=24))
def test_the_recogniser_and_the_prediction_never_raise(argv: list[str]) -> None:
    found = recognise(argv, knowledge())
    assert found.family == "" or found.family in knowledge().families
    assert all(len(v) <= 4096 for v in found.options.values())
    known = predict(argv, lambda: True)
    assert known.signature is None or len(known.signature) <= SIGNATURE_MAX
    assert known.prediction is None or (known.prediction.ram >= 0 and known.prediction.gpu >= 0)
    assert all("\n" not in note for note in known.notes)


def test_a_huge_command_line_is_read_only_so_far() -> None:
    argv = ["env"] * 5 + ["whisper"] + ["x" * 100_000] * (MAX_ARGS * 4)
    found = recognise(argv, knowledge())
    assert found.notes == (f"only the first {MAX_ARGS} arguments were read",)
    assert found.program == "whisper"


def test_a_plain_check_imports_none_of_it(env: dict[str, str], config: Path) -> None:
    """check without -- CMD is on every job start's path: the need machinery is imported only for a command."""
    code = ("import sys; from safegate.cli.fastpath import main; rc = main(sys.argv[1:]); "
            "print([m for m in sys.modules if m.startswith('safegate.need')], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, "check", "--config", str(config), "--no-grant", "-q"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.stderr.strip().splitlines()[-1] == "[]"


# --- which figure wins ------------------------------------------------------------------------------------------


def test_an_explicit_profile_or_option_beats_the_table(run: Run, tmp_path: Path, config: Path) -> None:
    mine = tmp_path / "mine.toml"
    mine.write_text(config.read_text() + '[profiles.mine]\nmatch = ["whisper"]\nmemory = "3G"\n')
    data = need(run, "whisper", "--model", "large-v3", "a.wav", options=("--config", str(mine)))
    assert data["profile"] == "mine"
    assert fig(data, "memory") == {**fig(data, "memory"), "bytes": 3 * GiB, "source": "profile"}
    assert fig(data, "predicted")["source"] == "table"  # still shown beside it
    data = need(run, "whisper", "--model", "large-v3", "a.wav", options=("--config", str(mine), "--mem", "1G"))
    assert fig(data, "memory") == {"bytes": GiB, "source": "option", "detail": "--mem"}
    # The built-in whisper-large-v3's 10G: what a check without a command needs; with one, the table's figure.
    no_command = json.loads(run("check", "--config", str(config), "-p", "whisper-large-v3", "--json").stdout)
    assert next(c for c in no_command["checks"] if c["name"] == "memory")["values"]["need"] == 10 * GiB
    data = need(run, "whisper", "--model", "large-v3", "a.wav", options=("--config", str(config)))
    assert fig(data, "memory")["source"] == "table" and fig(data, "memory")["bytes"] != 10 * GiB


def test_the_default_profile_takes_the_model_familys_lock(run: Run, tmp_path: Path, config: Path) -> None:
    unmatched = tmp_path / "unmatched.toml"  # the built-in whisper-large-v3 profile matches no command here
    unmatched.write_text(config.read_text() + "[profiles.whisper-large-v3]\nmatch = []\n")
    for model in ("large-v2", "large-v3-turbo", "medium"):
        data = need(run, "whisperx", "a.wav", "--model", model, options=("--config", str(unmatched)))
        assert data["profile"] == "default"
        large = model.startswith("large-v2")  # turbo is its own size, with no lock of its own
        assert data["lock"] == ({"name": "whisper-large", "source": "table"} if large else
                                {"name": "heavy", "source": "profile default"}), model
    data = need(run, "whisperx", "a.wav", "--model", "large-v2", options=("--config", str(unmatched), "--lock", "x"))
    assert data["lock"] == {"name": "x", "source": "option"}


def _history(env: dict[str, str], runs: list[dict[str, object]]) -> Path:
    path = Path(env["XDG_STATE_HOME"]) / "safegate" / "history.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"default": runs}))
    return path


def _signed(signature: str, peak: int, predicted: int) -> dict[str, object]:
    return {"time": 1.7e9, "peak_memory": peak, "peak_gpu_memory": None, "duration": 60.0, "reason": "exited",
            "exit_code": 0, "signature": signature, "predicted_memory": predicted, "predicted_gpu_memory": 0}


def test_recorded_runs_of_the_command_refine_the_prediction(run: Run, env: dict[str, str], config: Path) -> None:
    command = ("whisper", "--model", "medium", "--device", "cpu", "a.wav")
    first = need(run, *command, options=("--config", str(config)))
    signature, predicted = first["signature"], fig(first, "memory")["bytes"]
    assert signature == "program=whisper model=medium device=cpu" and isinstance(predicted, int)
    # Two runs are not enough: the table still decides, and both figures are shown.
    _history(env, [_signed(signature, 2 * GiB, predicted)] * 2)
    data = need(run, *command, options=("--config", str(config)))
    assert fig(data, "memory")["source"] == "table" and fig(data, "learned")["runs"] == 2
    assert fig(data, "learned")["memory"] is None
    # Three whole runs at 2 GiB: their p95 + 10% wins, and a table this far off is reported.
    _history(env, [_signed(signature, 2 * GiB, predicted)] * 3)
    data = need(run, *command, options=("--config", str(config)))
    assert fig(data, "memory") == {**fig(data, "memory"), "bytes": int(2 * GiB * 1.1), "source": "history"}
    assert fig(data, "predicted")["memory"] == predicted
    off = [n for n in data["notes"] if "off what 3 recorded runs" in n]  # type: ignore[attr-defined]
    assert len(off) == 1 and "knowledge.toml" in off[0]
    text = run("need", "--config", str(config), "--", *command).stdout
    assert "from history" in text and "learned     RAM 2.2 GiB from 3 recorded run(s)" in text and "off" in text
    shown = json.loads(run("profiles", "--json", "--config", str(config)).stdout)
    sig = next(p for p in shown if p["name"] == "default")["signatures"]
    assert sig == [{"signature": signature, "runs": 3, "predicted_memory": predicted, "predicted_gpu_memory": 0,
                    "learned_memory": int(2 * GiB * 1.1), "learned_gpu_memory": None,
                    "memory_off": pytest.approx(abs(predicted - 2 * GiB) / (2 * GiB)), "gpu_memory_off": None}]
    assert "off: correct the table" in run("profiles", "--config", str(config)).stdout
    # Runs close to the prediction: learned wins, nothing reported.
    _history(env, [_signed(signature, int(predicted * 0.9), predicted)] * 3)
    data = need(run, *command, options=("--config", str(config)))
    assert fig(data, "memory")["source"] == "history" and data["notes"] == []


# --- check, slots and exec use the same need ------------------------------------------------------------------


def test_check_and_slots_block_on_the_gpu_memory_a_command_needs(run: Run, config: Path,
                                                                 gpu_env: Callable[[float], dict[str, str]]) -> None:
    env = gpu_env(4)  # 4 GiB free: large (~10 GB) does not fit, tiny (~1 GB) does
    large = ("--", "whisper", "--model", "large-v3", "a.wav")
    tiny = ("--", "whisper", "--model", "tiny", "a.wav")
    options = ("--config", str(config), "--no-grant")
    blocked = run("check", *options, "--json", *large, env=env)
    assert blocked.returncode == ExitCode.GPU_MEMORY, blocked.stdout + blocked.stderr
    gpu = next(c for c in json.loads(blocked.stdout)["checks"] if c["name"] == "gpu")
    assert gpu["values"]["need"] == 10 * GiB
    assert run("check", *options, *tiny, env=env).returncode == 0
    slots = run("slots", "--config", str(config), *large, env=env)
    assert (slots.stdout.strip(), slots.returncode) == ("0", ExitCode.GPU_MEMORY)
    slots = run("slots", "--config", str(config), *tiny, env=env)
    assert (slots.stdout.strip(), slots.returncode) == ("1", 0)  # the default profile's lock: a mutex
    # Without -- CMD, check is what it was: the default profile needs nothing.
    assert run("check", *options, env=env).returncode == 0


def test_exec_check_and_need_agree(run: Run, config: Path, env: dict[str, str], tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "whisper").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "whisper").chmod(0o755)
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}
    command = ("whisper", "--model", "tiny", "--device", "cpu", "a.wav")
    predicted = need(run, *command, options=("--config", str(config)), env=env)
    checked = json.loads(run("check", "--config", str(config), "--no-grant", "--json", "--", *command,
                             env=env).stdout)
    assert checked["profile"] == predicted["profile"] == "default"
    memory = next(c for c in checked["checks"] if c["name"] == "memory")["values"]["need"]
    assert memory == fig(predicted, "memory")["bytes"] > 0
    result = run("exec", "--config", str(config), "--", *command, env=env)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((Path(env["XDG_STATE_HOME"]) / "safegate" / "history.json").read_text())["default"]
    assert recorded[-1]["signature"] == predicted["signature"]
    assert recorded[-1]["predicted_memory"] == fig(predicted, "memory")["bytes"]


# --- GGUF files ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A llama-architecture GGUF as the issue describes it: 32 blocks, embedding 4096, 32 heads, 8 KV heads (its
    header written by the gguf package, its data sparse)."""
    path = tmp_path_factory.mktemp("gguf") / "llama-8b-q4_k_m.gguf"
    write_llama_gguf(path, blocks=32, embedding=4096, heads=32, kv_heads=8)
    return path


def _bytes(data: dict[str, object], key: str) -> int:
    value = fig(data, key)["bytes"]
    assert isinstance(value, int)
    return value


def test_a_gguf_context_and_offload_decide_where_its_need_goes(run: Run, llama: Path,
                                                               gpu_env: Callable[[float], dict[str, str]]) -> None:
    env = gpu_env(20)
    at = {c: need(run, "llama-server", "-m", str(llama), "-c", c, "-ngl", "99", env=env) for c in ("4096", "8192")}
    # The f16 KV cache of 32 layers x 8 KV heads x 128 x (K + V) x 2 bytes: 128 KiB a token, 512 MiB more for
    # 4096 tokens more, all of it in GPU memory with every layer offloaded.
    assert _bytes(at["8192"], "gpu_memory") - _bytes(at["4096"], "gpu_memory") == 512 * MiB
    assert _bytes(at["8192"], "memory") == _bytes(at["4096"], "memory")
    assert fig(at["8192"], "gpu_memory")["source"] == "file" and "llama-8b-q4_k_m.gguf" in str(
        fig(at["8192"], "gpu_memory")["detail"])
    assert at["8192"]["signature"] == "program=llama-server model=llama-8b-q4_k_m.gguf ctx=8192 ngl=33"
    # -ngl 0: all of it in RAM, the same 512 MiB apart.
    cpu = {c: need(run, "llama-server", "-m", str(llama), "-c", c, "-ngl", "0", env=env) for c in ("4096", "8192")}
    assert _bytes(cpu["8192"], "gpu_memory") == 0
    assert _bytes(cpu["8192"], "memory") - _bytes(cpu["4096"], "memory") == 512 * MiB
    assert _bytes(cpu["8192"], "memory") > _bytes(at["8192"], "memory")
    # Spelled the long way, after env and nice: the same need.
    long = need(run, "env", "A=1", "nice", "llama-server", "--model", str(llama), "--ctx-size=8192",
                "--n-gpu-layers", "99", env=env)
    assert (fig(long, "memory"), fig(long, "gpu_memory")) == (fig(at["8192"], "memory"), fig(at["8192"], "gpu_memory"))
    # No GPU here: llama.cpp keeps every layer in RAM whatever -ngl says.
    alone = need(run, "llama-server", "-m", str(llama), "-c", "8192", "-ngl", "99")
    assert _bytes(alone, "gpu_memory") == 0 and _bytes(alone, "memory") == _bytes(cpu["8192"], "memory")


def test_llama_cpp_python_programs_get_its_defaults(run: Run, llama: Path, tmp_path: Path) -> None:
    server = need(run, sys.executable, "-m", "llama_cpp.server", "--model", str(llama))
    assert server["tool"] == "llama-cpp-python" and str(server["signature"]).endswith("ctx=2048 ngl=0")
    script = need(run, "python3", str(tmp_path / "chat.py"), "--model", str(llama), "--n_ctx", "4096")
    assert script["tool"] == "llama-cpp-python" and str(script["signature"]).endswith("ctx=4096 ngl=0")
    assert _bytes(script, "memory") > _bytes(server, "memory")
    other = need(run, "./my-chat", str(llama), "-c", "1024")
    assert other["tool"] == "a GGUF model" and "ctx=1024" in str(other["signature"])


@pytest.mark.parametrize("kind", ["truncated", "hostile"])
def test_an_unreadable_gguf_is_one_note_and_no_prediction(run: Run, llama: Path, tmp_path: Path, config: Path,
                                                          kind: str) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(llama.read_bytes()[:1000] if kind == "truncated" else b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    data = need(run, "llama-server", "-m", str(bad), "-c", "4096", options=("--config", str(config)))
    assert data["predicted"] is None and data["signature"] is None
    assert fig(data, "memory") == {"bytes": 0, "source": "none", "detail": "nothing predicts it"}
    notes = data["notes"]
    assert isinstance(notes, list) and len(notes) == 1 and "bad.gguf" in notes[0] and "no prediction" in notes[0]
    # Not a usage error: check goes on with no need.
    assert run("check", "--config", str(config), "--no-grant", "-q", "--", "llama-server", "-m", str(bad)
               ).returncode == 0


def test_check_slots_and_exec_block_a_gguf_too_large_for_this_machine(run: Run, config: Path, tmp_path: Path) -> None:
    huge = tmp_path / "huge.gguf"  # 9 TiB of weights in its header, larger than any machine's RAM; sparse on disk
    write_llama_gguf(huge, blocks=64, embedding=131072, ff=524288, context=4096)
    small = tmp_path / "small.gguf"
    write_llama_gguf(small, blocks=1, embedding=256, heads=4, kv_heads=2, ff=512, vocab=1000, context=512)
    options = ("--config", str(config), "--no-grant")
    blocked = run("check", *options, "--json", "--", "llama-cli", "-m", str(huge), "-ngl", "0")
    assert blocked.returncode == ExitCode.MEMORY, blocked.stderr
    memory = next(c for c in json.loads(blocked.stdout)["checks"] if c["name"] == "memory")
    assert memory["values"]["need"] > 8 * 1024 * GiB
    assert run("check", *options, "--", "llama-cli", "-m", str(small), "-ngl", "0").returncode == 0
    slots = run("slots", "--config", str(config), "--", "llama-cli", "-m", str(huge))
    assert (slots.stdout.strip(), slots.returncode) == ("0", ExitCode.MEMORY)
    assert run("slots", "--config", str(config), "--", "llama-cli", "-m", str(small)).stdout.strip() == "1"
    marker = tmp_path / "ran"
    result = run("exec", "--config", str(config), "--", "sh", "-c", f"touch {marker}", str(huge))
    assert result.returncode == ExitCode.MEMORY and not marker.exists()
    result = run("exec", "--config", str(config), "--", "sh", "-c", f"touch {marker}", str(small))
    assert result.returncode == 0 and marker.exists()


def test_a_safetensors_folder_goes_to_the_gpu_when_there_is_one(run: Run, tmp_path: Path,
                                                                gpu_env: Callable[[float], dict[str, str]]) -> None:
    folder = tmp_path / "llama-tiny"
    folder.mkdir()
    shape = {"blocks": 4, "embedding": 512, "heads": 8, "kv_heads": 2, "ff": 1024, "vocab": 32000}
    weights, weight_map = 0, {}
    for n, (first, last) in enumerate([(0, 2), (2, 4)], start=1):
        shard = f"model-0000{n}-of-00002.safetensors"
        tensors = llama_safetensors_tensors(**shape, first=first, last=last)
        weights += write_safetensors(folder / shard, tensors)
        weight_map.update(dict.fromkeys(tensors, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": weights},
                                                                      "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(llama_config(4, 512, 8, 2)))
    command = ("python3", "generate.py", "--model", str(folder))
    on_gpu = need(run, *command, env=gpu_env(20))
    assert on_gpu["tool"] == "a safetensors model" and fig(on_gpu, "gpu_memory")["source"] == "file"
    assert _bytes(on_gpu, "gpu_memory") > weights
    no_gpu = need(run, *command)
    assert _bytes(no_gpu, "gpu_memory") == 0 and _bytes(no_gpu, "memory") > weights
    told = need(run, *command, "--device", "cpu", env=gpu_env(20))
    assert _bytes(told, "gpu_memory") == 0 and _bytes(told, "memory") == _bytes(no_gpu, "memory")


def test_the_api_takes_the_command_as_check_and_slots_do(tmp_path: Path, config: Path, lock_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """safegate.check(command=[...]) and slots(command=[...]) judge the need exec would predict for it."""
    import safegate

    monkeypatch.setenv("SAFEGATE_LOCK_DIR", str(lock_dir))
    monkeypatch.setenv("SAFEGATE_CONFIG", str(config))
    monkeypatch.setenv("SAFEGATE_GPU", "none")
    huge = tmp_path / "huge.gguf"  # 9 TiB of weights in its header, larger than any machine's RAM; sparse on disk
    write_llama_gguf(huge, blocks=64, embedding=131072, ff=524288, context=4096)
    small = tmp_path / "small.gguf"
    write_llama_gguf(small, blocks=1, embedding=256, heads=4, kv_heads=2, ff=512, vocab=1000, context=512)
    verdict = safegate.check(command=["llama-cli", "-m", str(huge), "-ngl", "0"], reserve=False)
    assert verdict.exit_code is ExitCode.MEMORY
    memory = verdict.result("memory")
    assert memory is not None and memory.values is not None and memory.values["need"] > 8 * 1024 * GiB
    assert safegate.slots(command=["llama-cli", "-m", str(huge)]) == 0
    assert safegate.check(command=["llama-cli", "-m", str(small), "-ngl", "0"], reserve=False).ok
    assert safegate.slots(command=["llama-cli", "-m", str(small)]) == 1
    with pytest.raises(TypeError, match="not one string"):
        safegate.check(command="llama-cli -m x.gguf")  # type: ignore[arg-type]


def test_flash_attention_as_each_program_runs_it(run: Run, llama: Path, tmp_path: Path) -> None:
    """llama-cpp-python runs without flash attention by default, llama.cpp's programs with it (-fa auto): without
    it, the attention scores of a filled context are in the compute buffer (bench/bench_need_gguf.py measured the
    prediction 29% under a filled 8K context before this was modelled)."""
    from safegate.need.modelfile import file_need, read_model

    model = read_model(str(llama))
    assert not isinstance(model, str)
    ram = {fa: file_need(model, context=8192, gpu_layers=0, flash_attention=fa).ram for fa in (True, False)}
    assert ram[False] > ram[True]
    script = need(run, "python3", str(tmp_path / "chat.py"), "--model", str(llama), "--n_ctx", "8192")
    assert _bytes(script, "memory") == ram[False]
    assert _bytes(need(run, "python3", str(tmp_path / "chat.py"), "--model", str(llama), "--n_ctx", "8192",
                       "--flash-attn"), "memory") == ram[True]  # a bare flag at the end: on
    server = ["llama-server", "-m", str(llama), "-c", "8192", "-ngl", "0"]
    assert _bytes(need(run, *server), "memory") == ram[True]
    assert _bytes(need(run, *server, "-fa", "off"), "memory") == ram[False]
    assert _bytes(need(run, *server[:1], "-fa", *server[1:]), "memory") == ram[True]  # the older bare -fa


def test_recorded_runs_raise_a_model_files_figure_but_never_lower_it(run: Run, llama: Path, env: dict[str, str],
                                                                      config: Path) -> None:
    """A job mapping a model file the page cache already holds is charged little of it: its recorded peak (7-35%
    of its need in bench/bench_need_gguf.py) must not teach safegate to reserve less than the file's arithmetic."""
    command = ("llama-server", "-m", str(llama), "-c", "4096", "-ngl", "0")
    first = need(run, *command, options=("--config", str(config)))
    signature, predicted = first["signature"], _bytes(first, "memory")
    assert isinstance(signature, str) and fig(first, "memory")["source"] == "file"
    _history(env, [_signed(signature, predicted // 10, predicted)] * 3)  # mmap-warm runs: 10% charged
    low = need(run, *command, options=("--config", str(config)))
    assert (_bytes(low, "memory"), fig(low, "memory")["source"]) == (predicted, "file")
    assert "only raise it" in str(fig(low, "memory")["detail"])
    assert any("the file's figure is kept" in n for n in low["notes"])  # type: ignore[attr-defined]
    _history(env, [_signed(signature, 2 * predicted, predicted)] * 3)  # runs that used more: they win
    high = need(run, *command, options=("--config", str(config)))
    assert (_bytes(high, "memory"), fig(high, "memory")["source"]) == (int(2 * predicted * 1.1), "history")
