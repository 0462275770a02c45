"""Model files read, never loaded: GGUF and safetensors headers give the weights, the KV cache's shape and the split
between RAM and GPU memory; a truncated, hostile or foreign file gives one line saying why, never an exception,
a hang, or a large allocation.

The files are written by the gguf package's own GGUFWriter (llama.cpp's gguf-py) and by the documented safetensors
layout; expected sizes come from gguf.GGML_QUANT_SIZES, independently of safegate's table.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import tracemalloc
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from modelfiles import (
    LLAMA,
    MiB,
    header_end,
    llama_config,
    llama_safetensors_tensors,
    write_llama_gguf,
    write_safetensors,
)
from support import TIMEOUT

from safegate.need import gguf as reader
from safegate.need.modelfile import FileNeed, ModelFile, file_need, read_model

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, dict[str, int]]:
    """An 8B Llama 3-shaped GGUF (32 blocks, embedding 4096, 32 heads, 8 KV heads): 4.8 GB, sparse."""
    written = write_llama_gguf(tmp_path_factory.mktemp("gguf") / "llama.gguf", **LLAMA)
    return written.paths[0], written.total, written.tensors


def _model(path: Path | str) -> ModelFile:
    found = read_model(str(path))
    assert isinstance(found, ModelFile), found
    return found


def _note(path: Path | str) -> str:
    """The note read_model gives for a file that gives no prediction: one line, bounded, and found cheaply."""
    tracemalloc.start()
    try:
        found = read_model(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert isinstance(found, str), found
    assert "\n" not in found and "\r" not in found and 0 < len(found) < 600, found
    assert peak < 16 * MiB, (found, peak)
    return found


# --- GGUF: weights, KV cache, the split -----------------------------------------------------------------------


def test_the_type_table_is_the_reference_one() -> None:
    ours = {kind: (block, size) for kind, (_, block, size) in reader.GGML_TYPES.items()}
    assert ours == {int(kind): sizes for kind, sizes in gguf.GGML_QUANT_SIZES.items()}
    assert {kind: name for kind, (name, _, _) in reader.GGML_TYPES.items()} == {
        int(kind): kind.name for kind in gguf.GGML_QUANT_SIZES}


def test_a_gguf_header_gives_every_tensors_bytes_and_the_kv_shape(llama: tuple[Path, int, dict[str, int]]) -> None:
    path, total, tensors = llama
    model = _model(path)
    assert model.format == "gguf" and model.paths == (str(path),)
    assert model.weights == total == sum(tensors.values()) > 4 * 10**9
    assert (model.arch, model.block_count, model.embedding_length, model.head_count, model.head_count_kv) == (
        "llama", 32, 4096, 32, 8)
    assert model.context_length == 8192 and model.vocab_size == 1000
    assert len(model.layer_weights) == 32
    assert model.layer_weights[7] == sum(b for name, b in tensors.items() if name.startswith("blk.7."))
    assert model.input_weights == tensors["token_embd.weight"]
    assert model.output_weights == tensors["output.weight"] + tensors["output_norm.weight"]
    assert model.input_weights + sum(model.layer_weights) + model.output_weights == model.weights
    assert not model.tied_output


def test_twice_the_context_is_512_mib_more_kv_cache_where_the_layers_are(
        llama: tuple[Path, int, dict[str, int]]) -> None:
    model = _model(llama[0])

    def need(context: int, layers: int) -> FileNeed:
        return file_need(model, context=context, gpu_layers=layers, cache_type="f16")

    # 2 (K and V) x 32 layers x 8 KV heads x 128 (4096 / 32) x 2 bytes = 128 KiB a token.
    assert need(4096, 99).kv_cache == 4096 * 128 * 1024
    on_gpu = need(8192, 99), need(4096, 99)
    assert on_gpu[0].kv_cache - on_gpu[1].kv_cache == 512 * MiB
    assert on_gpu[0].gpu - on_gpu[1].gpu == 512 * MiB and on_gpu[0].ram == on_gpu[1].ram
    in_ram = need(8192, 0), need(4096, 0)
    assert in_ram[0].ram - in_ram[1].ram == 512 * MiB
    assert in_ram[0].gpu == in_ram[1].gpu == 0
    assert on_gpu[0].gpu_layers == 33 and in_ram[0].gpu_layers == 0 and on_gpu[0].context == 8192
    # Weights: everything but the token embeddings on the GPU; all of it in RAM without offload.
    assert on_gpu[0].gpu_weights == model.weights - model.input_weights
    assert in_ram[0].ram == model.weights + 1024 * MiB + in_ram[0].overhead
    assert on_gpu[0].ram + on_gpu[0].gpu == model.weights + 1024 * MiB + on_gpu[0].overhead
    assert all(line and "\n" not in line for line in on_gpu[0].notes)


def test_ngl_offloads_the_last_layers_then_the_output(llama: tuple[Path, int, dict[str, int]]) -> None:
    model = _model(llama[0])
    per_token = 128 * 1024 // 32  # one layer's K and V
    only_output = file_need(model, context=4096, gpu_layers=1)
    assert only_output.gpu_weights == model.output_weights and only_output.gpu_kv_cache == 0
    ten = file_need(model, context=4096, gpu_layers=10)
    assert ten.gpu_weights == sum(model.layer_weights[23:]) + model.output_weights
    assert ten.gpu_kv_cache == 9 * 4096 * per_token
    assert ten.ram + ten.gpu == file_need(model, context=4096, gpu_layers=0).ram + ten.gpu_overhead + (
        ten.overhead - ten.gpu_overhead - file_need(model, context=4096, gpu_layers=0).overhead)
    every = file_need(model, context=4096, gpu_layers=-1)
    assert every.gpu_layers == 33 and every.gpu_weights == model.weights - model.input_weights
    assert file_need(model, context=4096, gpu_layers=33) == every == file_need(model, context=4096, gpu_layers=999)
    assert file_need(model, context=4096, gpu_layers=99, kv_offload=False).gpu_kv_cache == 0


def test_defaults_context_cache_types_and_flash_attention(llama: tuple[Path, int, dict[str, int]]) -> None:
    model = _model(llama[0])
    trained = file_need(model)
    assert trained.context == 8192 and trained.gpu_layers == 0 and trained.gpu == 0
    assert any("trained context" in line for line in trained.notes)
    assert file_need(model, context=4000).context == 4096  # padded to 256, as llama.cpp does
    f16 = file_need(model, context=4096).kv_cache
    assert file_need(model, context=4096, cache_type="q8_0").kv_cache == f16 // 2 * 34 // 32
    assert file_need(model, context=4096, cache_type="q8_0", cache_type_v="q4_0").kv_cache == (
        f16 // 4 * 34 // 32 + f16 // 4 * 18 // 32)
    unknown = file_need(model, context=4096, cache_type="f13\x1b")
    assert unknown.kv_cache == f16 and any("f13\\x1b" in line and "f16 assumed" in line for line in unknown.notes)
    # The compute buffer: the logits (vocab x batch, f32; this file's tokenizer has 1000 tokens), or, without flash
    # attention and where they are larger, the attention scores (heads x context x batch, f32).
    fa, no_fa = file_need(model, context=4096, gpu_layers=99), file_need(
        model, context=4096, gpu_layers=99, flash_attention=False)
    logits = 4 * 512 * (1000 + 2 * 4096)
    scores = (4 + 2) * 512 * 32 * 4096 + 4 * 512 * 6 * 4096 + 4 * 4096 * 8 * 128  # the scores in f32, then f16
    assert no_fa.gpu - fa.gpu == scores - logits and no_fa.ram == fa.ram
    assert file_need(model, context=16384).overhead == file_need(model, context=4096).overhead  # flash attention


def test_per_layer_head_counts_are_summed_and_sliding_windows_are_bounds(tmp_path: Path) -> None:
    def more(writer: gguf.GGUFWriter) -> None:
        writer.add_head_count_kv([2, 4, 4, 2])  # overwrites the scalar with a per-layer array, as OpenELM's
        writer.add_sliding_window(1024)
        writer.add_key_length(256)
        writer.add_value_length(256)

    written = write_llama_gguf(tmp_path / "swa.gguf", blocks=4, embedding=512, heads=8, kv_heads=2, ff=1024,
                               vocab=32000, more=more)
    model = _model(written.paths[0])
    assert (model.head_count_kv, model.key_length, model.sliding_window) == (4, 256, 1024)
    assert model.head_count_kv_per_layer == (2, 4, 4, 2)
    need = file_need(model, context=4096)
    assert need.kv_cache == (2 + 4 + 4 + 2) * 4096 * (256 + 256) * 2
    assert file_need(model, context=4096, gpu_layers=2).gpu_kv_cache == 2 * 4096 * (256 + 256) * 2
    assert any("2-4 KV heads (per layer, 12 in all)" in line for line in need.notes)
    assert any("1024 tokens only" in line for line in need.notes)
    assert not any("tokens only" in line for line in file_need(model, context=1024).notes)


def test_a_model_without_output_weight_copies_its_embeddings_to_the_gpu(tmp_path: Path) -> None:
    written = write_llama_gguf(tmp_path / "tied.gguf", blocks=4, embedding=512, heads=8, kv_heads=2, ff=1024,
                               vocab=32000, tied=True)
    model = _model(written.paths[0])
    assert model.tied_output and model.weights == written.total
    need = file_need(model, context=512, gpu_layers=99)
    assert need.gpu_weights == model.weights - model.input_weights + model.input_weights
    assert need.ram - need.overhead + need.gpu_overhead == model.input_weights


def test_a_split_model_is_read_in_all_its_parts(tmp_path: Path) -> None:
    whole = write_llama_gguf(tmp_path / "whole.gguf", blocks=8, embedding=1024, heads=8, kv_heads=2, ff=2048,
                             vocab=32000)
    split = write_llama_gguf(tmp_path / "split.gguf", blocks=8, embedding=1024, heads=8, kv_heads=2, ff=2048,
                             vocab=32000, parts=3)
    assert [p.name for p in split.paths] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    model = _model(split.paths[0])
    assert model.paths == tuple(map(str, split.paths))
    assert model.weights == whole.total == split.total
    assert model.layer_weights == _model(whole.paths[0]).layer_weights and model.block_count == 8
    assert "part 2 of 3" in _note(split.paths[1])
    split.paths[2].rename(tmp_path / "elsewhere.gguf")
    assert "part 3 of 3 is missing" in _note(split.paths[0])


def test_a_20_gb_header_is_read_without_reading_the_file(tmp_path: Path) -> None:
    """A 70B-shaped model with a real-sized tokenizer: the data is never read (a sparse file reads as zeros, so
    reading it would show in the process's read bytes)."""
    written = write_llama_gguf(tmp_path / "big.gguf", blocks=80, embedding=8192, heads=64, kv_heads=8, ff=28672,
                               tokens=128256)
    path = written.paths[0]
    assert path.stat().st_size > 20 * 10**9 and path.stat().st_blocks * 512 < 100 * MiB
    before = _read_bytes()
    model = _model(path)
    assert model.weights == written.total and model.block_count == 80
    assert _read_bytes() - before < header_end(path) + 4 * MiB


def _read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


# --- GGUF: truncated, hostile, foreign ------------------------------------------------------------------------


def test_a_truncated_gguf_is_one_note_wherever_it_is_cut(tmp_path: Path) -> None:
    written = write_llama_gguf(tmp_path / "m.gguf", blocks=4, embedding=512, heads=8, kv_heads=2, ff=1024,
                               vocab=32000)
    data = written.paths[0].read_bytes()[: header_end(written.paths[0])]
    size = written.paths[0].stat().st_size
    cut = tmp_path / "cut.gguf"
    for at in (0, 3, 10, 24, 40, len(data) // 3, len(data) // 2, len(data) - 5, len(data), size - 1):
        with open(cut, "wb") as fh:
            fh.write(data[:at])
            fh.truncate(at)
        assert "truncated" in _note(cut), at
    cut.write_bytes(data)
    os.truncate(cut, size)
    assert _model(cut).weights == written.total


def _s(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def _kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


def _tensor(name: str, dims: list[int], kind: int = 0, offset: int = 0, n_dims: int | None = None) -> bytes:
    return (_s(name) + struct.pack("<I", len(dims) if n_dims is None else n_dims)
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset))


def _gguf(kvs: list[bytes], tensors: list[bytes], *, version: int = 3, n_kv: int | None = None,
          n_tensors: int | None = None, magic: bytes = b"GGUF", tail: int = 4096) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    return head + b"".join(kvs) + b"".join(tensors) + bytes(tail)


ARCH = _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
HOSTILE = {
    "bad magic": _gguf([], [], magic=b"GGML"),
    "version 1": _gguf([], [], version=1),
    "version 99": _gguf([], [], version=99),
    "big-endian": _gguf([], [], version=3 << 24),
    "2**63 kv pairs": _gguf([ARCH], [], n_kv=1 << 63),
    "2**64-1 tensors": _gguf([ARCH], [], n_tensors=(1 << 64) - 1),
    "tensors beyond the file": _gguf([ARCH], [], n_tensors=5000),
    "kv pairs beyond the file": _gguf([ARCH], [], n_kv=60000),
    "a key of 2**40 bytes": _gguf([_s("k", 1 << 40)], []),
    "a string of 2**40 bytes": _gguf([_s("general.name") + struct.pack("<I", 8) + _s("x", 1 << 40)], []),
    "a kept string of 2**40 bytes": _gguf([_s("general.architecture") + struct.pack("<I", 8) + _s("x", 1 << 40)],
                                          []),
    "2**62 strings": _gguf([_s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 62)], []),
    "3 million strings past the end": _gguf([_s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3_000_000)],
                                            []),
    "2**60 floats": _gguf([_s("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 1 << 60)], []),
    "an array of arrays": _gguf([_s("x") + struct.pack("<IIQ", 9, 9, 1 << 40) + struct.pack("<IQ", 9, 1 << 40)],
                                []),
    "an unknown value type": _gguf([_s("x") + struct.pack("<I", 77)], []),
    "an array of an unknown type": _gguf([_s("x") + struct.pack("<IIQ", 9, 13, 1)], []),
    "a per-layer array of 2**40": _gguf([ARCH, _s("llama.attention.head_count_kv") + struct.pack("<IIQ", 9, 4,
                                                                                                  1 << 40)], []),
    "n_dims 1000": _gguf([ARCH], [_tensor("t", [32], n_dims=1000)]),
    "an unknown ggml type": _gguf([ARCH], [_tensor("t", [32], kind=31)]),
    "a type id of 2**32-1": _gguf([ARCH], [_tensor("t", [32], kind=(1 << 32) - 1)]),
    "dims of 2**64-1": _gguf([ARCH], [_tensor("t", [(1 << 64) - 1, (1 << 64) - 1, 2, 2])]),
    "rows not whole blocks": _gguf([ARCH], [_tensor("t", [33], kind=2)]),
    "a name of 2**40 bytes": _gguf([ARCH], [_s("t", 1 << 40)]),
    "a name of 64 bytes": _gguf([ARCH], [_tensor("t" * 64, [32])]),
    "a misaligned offset": _gguf([ARCH], [_tensor("t", [32], offset=3)]),
    "an offset past the end": _gguf([ARCH], [_tensor("t", [32], offset=1 << 40)]),
    "a tensor twice": _gguf([ARCH], [_tensor("t", [32]), _tensor("t", [32], offset=128)]),
    "an alignment of 3": _gguf([ARCH, _kv_u32("general.alignment", 3)], [_tensor("t", [32])]),
    "an alignment of 0": _gguf([ARCH, _kv_u32("general.alignment", 0)], [_tensor("t", [32])]),
    "a key not UTF-8": _gguf([_s(b"\xff\xfe") + struct.pack("<II", 4, 1)], []),
    "a split of 65535 parts": _gguf([ARCH, _s("split.count") + struct.pack("<IH", 2, 65535)], []),
    "2**20 blocks": _gguf([ARCH, _kv_u32("llama.block_count", 1 << 20)], []),
    "a split without its name": _gguf([ARCH, _s("split.count") + struct.pack("<IH", 2, 3)], []),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_gguf_is_one_note(tmp_path: Path, case: str) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE[case])
    _note(path)


def test_what_is_not_a_model_file_is_one_note(tmp_path: Path) -> None:
    assert "cannot open" in _note(tmp_path / "absent.gguf")
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    # No writer ever comes: a blocking open would never return, so it runs where a hang is a failure, not a hang.
    found: list[str] = []
    thread = threading.Thread(target=lambda: found.append(_note(fifo)), daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "read_model blocked on a FIFO"
    assert "not a regular file" in found[0]
    assert "not a regular file" in _note("/dev/zero")
    (tmp_path / "text").write_text("hello\n")
    assert "not a model file" in _note(tmp_path / "text")
    (tmp_path / "line\nbreak.gguf").write_bytes(b"GGUF")
    assert "line\\nbreak" in _note(tmp_path / "line\nbreak.gguf")
    os.mkdir(tmp_path / "empty")
    assert "no model.safetensors.index.json" in _note(tmp_path / "empty")


def test_a_file_that_is_still_being_written_is_read_as_it_is(tmp_path: Path) -> None:
    """A download in progress: the reader sees what is there, and says truncated rather than waiting."""
    written = write_llama_gguf(tmp_path / "m.gguf", blocks=2, embedding=256, heads=4, kv_heads=2, ff=512,
                               vocab=1024)
    data = written.paths[0].read_bytes()
    grow = tmp_path / "grow.gguf"
    done = threading.Event()

    def writer() -> None:
        with open(grow, "wb") as fh:
            for at in range(0, len(data), 4096):
                fh.write(data[at:at + 4096])
                fh.flush()
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        found = read_model(str(grow))
        assert isinstance(found, (str, ModelFile))
    thread.join()


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """*data* with a few bytes replaced, a hostile u64 planted, or cut anywhere."""
    def replace(at: int, chunk: bytes) -> bytes:
        at %= len(data)
        return data[:at] + chunk + data[at + len(chunk):]

    hostile = st.sampled_from([0, 1, 3, 4, 31, 1 << 16, (1 << 31) - 1, 1 << 32, 1 << 40, (1 << 63) - 1, (1 << 64) - 1])
    return st.one_of(
        st.builds(replace, st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)),
        st.builds(replace, st.integers(0, 1 << 20), hostile.map(lambda n: struct.pack("<Q", n))),
        st.builds(replace, st.integers(0, 1 << 20), hostile.map(lambda n: struct.pack("<I", n & 0xFFFFFFFF))),
        st.integers(0, len(data)).map(lambda n: data[:n]),
    )


_SMALL_GGUF: list[bytes] = []


def _small_gguf(tmp_path: Path) -> bytes:
    if not _SMALL_GGUF:
        written = write_llama_gguf(tmp_path / "small.gguf", blocks=2, embedding=256, heads=4, kv_heads=2, ff=512,
                                   vocab=256, tokens=20)
        _SMALL_GGUF.append(written.paths[0].read_bytes())
    return _SMALL_GGUF[0]


def _either(path: Path) -> None:
    found = read_model(str(path))
    if isinstance(found, str):
        assert "\n" not in found and len(found) < 600
    else:
        assert found.weights >= 0 and found.paths == (str(path),)


@FAST
@given(data=st.data())
def test_mutated_gguf_headers_give_a_model_or_a_note(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(data.draw(_mutations(_small_gguf(tmp_path))))
    _either(path)


@FAST
@given(blob=st.binary(max_size=400), prefix=st.sampled_from([b"", b"GGUF", b"GGUF\x03\x00\x00\x00"]))
def test_random_bytes_give_a_model_or_a_note(tmp_path: Path, blob: bytes, prefix: bytes) -> None:
    for name in ("r.gguf", "r.safetensors", "r.bin"):
        (tmp_path / name).write_bytes(prefix + blob)
        _either(tmp_path / name)


# --- safetensors -----------------------------------------------------------------------------------------------


def _llama_folder(folder: Path, shards: int = 2, config: bool = True) -> int:
    folder.mkdir()
    blocks, embedding, heads, kv_heads = LLAMA.values()
    weight_map: dict[str, str] = {}
    total = 0
    step = blocks // shards
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        tensors = llama_safetensors_tensors(blocks, embedding, heads, kv_heads, 14336, 128256, first=n * step,
                                            last=blocks if n == shards - 1 else (n + 1) * step)
        total += write_safetensors(folder / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config:
        (folder / "config.json").write_text(json.dumps(llama_config(blocks, embedding, heads, kv_heads)))
    return total


def test_a_safetensors_folder_is_read_through_its_index_and_config(tmp_path: Path) -> None:
    total = _llama_folder(tmp_path / "llama")
    for named in (tmp_path / "llama", tmp_path / "llama" / "model.safetensors.index.json"):
        model = _model(named)
        assert model.format == "safetensors" and len(model.paths) == 2 and model.weights == total
        assert (model.block_count, model.embedding_length, model.head_count, model.head_count_kv) == (32, 4096, 32, 8)
        assert model.arch == "llama" and model.cache_element_bytes == 2 and len(model.layer_weights) == 32
    assert file_need(model, context=None).kv_cache == 0
    long, short = file_need(model, context=8192, gpu_layers=-1), file_need(model, context=4096, gpu_layers=-1)
    assert long.kv_cache - short.kv_cache == 512 * MiB == long.gpu - short.gpu
    assert long.gpu_weights == total
    cpu = file_need(model, context=4096)
    assert cpu.gpu == 0 and cpu.ram >= total + short.kv_cache
    # device_map fills the GPU in the model's order: the embeddings and the first blocks.
    first = file_need(model, context=4096, gpu_layers=4)
    assert first.gpu_weights == model.input_weights + sum(model.layer_weights[:4])
    assert first.gpu_kv_cache == short.kv_cache // 32 * 4


def test_a_safetensors_file_written_by_the_reference_library_is_read(tmp_path: Path) -> None:
    import numpy
    import safetensors.numpy as safetensors_numpy  # a test extra, as gguf (which brings numpy)

    arrays = {"a": numpy.zeros((3, 5), dtype=numpy.float16), "b": numpy.zeros((7,), dtype=numpy.int64),
              "model.layers.0.w": numpy.zeros((4, 4), dtype=numpy.float32)}
    safetensors_numpy.save_file(arrays, str(tmp_path / "ref.safetensors"))
    model = _model(tmp_path / "ref.safetensors")
    assert model.weights == 3 * 5 * 2 + 7 * 8 + 16 * 4 and model.layer_weights == (64,)
    assert any("no readable config.json" in note for note in model.notes)


def _safetensors_with(header: bytes, length: int | None = None, data: int = 64) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + bytes(data)


def _one(**fields: object) -> bytes:
    return json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **fields}}).encode()


SAFETENSORS_HOSTILE: dict[str, bytes] = {
    "a header of 2**40 bytes": _safetensors_with(b"{}", length=1 << 40),
    "a header past the end": _safetensors_with(b"{}", length=500),
    "not JSON": _safetensors_with(b"{not json"),
    "a list": _safetensors_with(b"[1, 2]"),
    "deep nesting": _safetensors_with(b"{\"t\": " + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "an unknown dtype": _safetensors_with(_one(dtype="F13")),
    "a negative dim": _safetensors_with(_one(shape=[-4])),
    "a 400-digit dim": _safetensors_with(_one(shape=[int("9" * 400)]).replace(b'"F32"', b'"F32"')),
    "offsets that do not fit": _safetensors_with(_one(data_offsets=[0, 15])),
    "offsets past the end": _safetensors_with(_one(shape=[4000], data_offsets=[0, 16000])),
    "a string shape": _safetensors_with(_one(shape="4")),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_HOSTILE))
def test_a_hostile_safetensors_is_one_note(tmp_path: Path, case: str) -> None:
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(SAFETENSORS_HOSTILE[case])
    _note(path)


@pytest.mark.parametrize("weight_map", [{"t": "../../etc/passwd"}, {"t": "/etc/passwd"}, {"t": ""}, {},
                                         {f"t{i}": f"s{i}.safetensors" for i in range(2000)}, "x"])
def test_a_hostile_index_is_one_note(tmp_path: Path, weight_map: object) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _note(tmp_path / "model.safetensors.index.json")
    _note(tmp_path)


def test_a_missing_shard_is_one_note(tmp_path: Path) -> None:
    _llama_folder(tmp_path / "llama")
    (tmp_path / "llama" / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in _note(tmp_path / "llama")


@pytest.mark.parametrize("config", ['{"num_hidden_layers": "32"}', "[]", "{", '{"num_hidden_layers": 1e999}',
                                    '{"num_hidden_layers": 99999999999999999999999}'])
def test_a_hostile_config_leaves_the_weights(tmp_path: Path, config: str) -> None:
    total = _llama_folder(tmp_path / "llama")
    (tmp_path / "llama" / "config.json").write_text(config)
    model = _model(tmp_path / "llama")
    assert model.weights == total and file_need(model, context=4096).kv_cache == 0


def test_a_vision_language_config_sizes_the_cache_from_its_text_model(tmp_path: Path) -> None:
    _llama_folder(tmp_path / "llava")
    text = llama_config(*LLAMA.values())
    (tmp_path / "llava" / "config.json").write_text(json.dumps(
        {"model_type": "llava", "vision_config": {"num_hidden_layers": 24}, "text_config": text}))
    model = _model(tmp_path / "llava")
    assert (model.block_count, model.head_count_kv) == (32, 8)
    assert file_need(model, context=4096).kv_cache == 512 * MiB


@FAST
@given(data=st.data())
def test_mutated_safetensors_headers_give_a_model_or_a_note(tmp_path: Path, data: st.DataObject) -> None:
    path = tmp_path / "m.safetensors"
    if not (tmp_path / "ref.safetensors").exists():
        write_safetensors(tmp_path / "ref.safetensors",
                          llama_safetensors_tensors(2, 64, 4, 2, 128, 100), sparse=False)
    path.write_bytes(data.draw(_mutations((tmp_path / "ref.safetensors").read_bytes()[:4000])))
    _either(path)


@FAST
@given(model=st.builds(
    ModelFile, format=st.sampled_from(["gguf", "safetensors"]), paths=st.just(("m",)),
    weights=st.integers(0, 1 << 50), block_count=st.none() | st.integers(0, 1 << 20),
    embedding_length=st.none() | st.integers(0, 1 << 20), head_count=st.none() | st.integers(0, 1 << 10),
    head_count_kv=st.none() | st.integers(0, 1 << 10), key_length=st.none() | st.integers(0, 1 << 12),
    context_length=st.none() | st.integers(0, 1 << 24), vocab_size=st.none() | st.integers(0, 1 << 20),
    layer_weights=st.lists(st.integers(0, 1 << 40), max_size=8).map(tuple), tied_output=st.booleans()),
    context=st.none() | st.integers(-5, 1 << 24), layers=st.none() | st.integers(-5, 200),
    cache=st.sampled_from(["f16", "q8_0", "nope", "F32"]), ubatch=st.integers(-5, 1 << 16))
def test_the_arithmetic_never_raises(model: ModelFile, context: int | None, layers: int | None, cache: str,
                                     ubatch: int) -> None:
    need = file_need(model, context=context, gpu_layers=layers, cache_type=cache, ubatch=ubatch)
    assert need.ram >= 0 and need.gpu >= 0 and need.kv_cache >= 0
    assert need.gpu_weights + need.gpu_kv_cache + need.gpu_overhead == need.gpu

