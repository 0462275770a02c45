"""What a model file's header says (`ModelFile`), and the bounded reading both readers (`gguf`, `safetensors`) share.

A model file named on a command line is another user's file as much as the user's own: it may be truncated, a FIFO,
a device, or written to make a reader hang or allocate. Every read here is of a regular file opened without
blocking, through a cursor that never reads past the file's end and never allocates more than it was asked for;
a problem is raised as `BadModelFile` with a one-line reason, which the readers turn into the note they return.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from typing import BinaryIO

import msgspec

from safegate.errors import BadModelFile
from safegate.units import printable

# The buffer the cursor reads through: small reads (a key, a length) cost no system call each.
BUFFER = 1 << 20
# Where a file's name is the reason, keep the note one line even for a name of 4 KiB.
NAME_IN_NOTE = 120
_U64 = struct.Struct("<Q")
_BLOCK = re.compile(r"^blk\.(\d+)\.")


class ModelFile(msgspec.Struct, frozen=True):
    """A model file's header, read, never loaded. Sizes in bytes.

    `weights` is the sum of every tensor's bytes (from its type and shape), split as
    `input_weights + sum(layer_weights) + output_weights`: the input layer (token embeddings, which llama.cpp
    keeps on the CPU whatever -ngl says), one figure per repeating block (`blk.<i>.*` in GGUF,
    `*.layers.<i>.*` in safetensors: what -ngl offloads), and the rest (the output layer and norms).
    """

    format: str  # "gguf" | "safetensors"
    paths: tuple[str, ...]  # every part read, in order
    weights: int
    arch: str | None = None  # general.architecture (GGUF) or config.json's model_type
    block_count: int | None = None
    embedding_length: int | None = None
    head_count: int | None = None
    head_count_kv: int | None = None  # the largest, where the file gives one per layer
    key_length: int | None = None  # per head, where the file says it (else embedding_length / head_count)
    value_length: int | None = None
    context_length: int | None = None  # the context the model was trained with
    vocab_size: int | None = None
    layer_weights: tuple[int, ...] = ()
    input_weights: int = 0
    output_weights: int = 0
    # No output.weight: llama.cpp then uses token_embd as the output too, and copies it to the output's device.
    tied_output: bool = False
    # Some layers attend to a window of this many tokens only (Gemma 2 and 3, Mistral's SWA): their cache is smaller.
    sliding_window: int | None = None
    # KV heads of each block where they differ (0: a recurrent layer of a hybrid model, without a KV cache).
    head_count_kv_per_layer: tuple[int, ...] = ()
    # The bytes of one element of the KV cache where the file decides it (safetensors: config.json's dtype).
    cache_element_bytes: float | None = None
    notes: tuple[str, ...] = ()  # what the reader assumed or left out (e.g. no config.json beside it)


def quoted(path: str) -> str:
    """A file name as a note shows it: printable, one line, bounded."""
    text = printable(path)
    return text if len(text) <= NAME_IN_NOTE else text[: NAME_IN_NOTE - 3] + "..."


def open_regular(path: str) -> BinaryIO:
    """*path* opened for reading if it is a regular file. O_NONBLOCK: a FIFO or a tty named as a model must not
    block the open; the fstat then turns it away before any read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BadModelFile(f"{quoted(path)}: cannot open ({exc.strerror or exc})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadModelFile(f"{quoted(path)}: not a regular file")
        return os.fdopen(fd, "rb", buffering=BUFFER)
    except BaseException:
        os.close(fd)
        raise


class Cursor:
    """Reads a file front to back, checked against its size before every read, so a length from the file can never
    make it allocate more than the file holds; skips by seeking, never by reading."""

    def __init__(self, fh: BinaryIO, path: str) -> None:
        self.fh = fh
        self.path = path
        self.size = os.fstat(fh.fileno()).st_size
        self.pos = 0

    def truncated(self, what: str) -> BadModelFile:
        return BadModelFile(f"{quoted(self.path)}: truncated ({what} runs past the end of its {self.size} bytes)")

    def read(self, n: int, what: str, limit: int = 1 << 16) -> bytes:
        """*n* bytes, where the caller bounds n by *limit*: a length inside a 20 GB file may be 2**33."""
        if n > limit:
            raise BadModelFile(f"{quoted(self.path)}: {what} of {n} bytes (at most {limit} accepted)")
        if n < 0 or self.pos + n > self.size:
            raise self.truncated(what)
        data = self.fh.read(n)
        if len(data) != n:  # the file shrank under us
            raise self.truncated(what)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.truncated(what)
        if n:
            self.fh.seek(n, os.SEEK_CUR)
            self.pos += n

    def skip_strings(self, count: int, what: str) -> None:
        """Skip *count* length-prefixed strings (u64 length, bytes): a tokenizer's 100-400 thousand, walked through
        1 MiB chunks in one tight loop (~0.13 µs a string) rather than a read and a seek each."""
        unpack = _U64.unpack_from
        while count:
            chunk = self.fh.read(min(BUFFER, self.size - self.pos))
            last = len(chunk) - 8  # the last place a length can start
            if last < 0:
                raise self.truncated(what)
            at = 0
            for done in range(count):
                if at > last:  # the next length is not (wholly) in this chunk
                    count -= done
                    break
                at += 8 + unpack(chunk, at)[0]
            else:
                count = 0
            self.pos += at
            if self.pos > self.size:
                raise self.truncated(what)
            self.fh.seek(self.pos)

    def u32(self, what: str) -> int:
        return int.from_bytes(self.read(4, what), "little")

    def u64(self, what: str) -> int:
        return int.from_bytes(self.read(8, what), "little")

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[int | float, ...]:
        return fmt.unpack(self.read(fmt.size, what))


def block_of(name: str) -> int | None:
    """The repeating block a GGUF tensor belongs to ('blk.12.attn_q.weight' -> 12), or None."""
    match = _BLOCK.match(name)
    return int(match.group(1)) if match else None
