"""The token shard file format: llm.c / modded-nanogpt shards and nanoGPT raw uint16 files.

  - llm.c / modded-nanogpt: 256 int32 header (magic 20240520, version 1, n_tokens, zeros), then
    n_tokens uint16 (e.g. `fineweb_train_000001.bin`);
  - nanoGPT: raw uint16 tokens, no header (`train.bin`, `val.bin`).
Tokens are read as read-only numpy memmaps.
"""

import os
from collections.abc import Sequence

import numpy as np

from jaxgpt.errors import UserError

MAGIC = 20240520  # llm.c token shard
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Sequence[int]) -> None:
    """Write tokens [n] (ints in [0, 65536)) as an llm.c shard, atomically (tmp file + rename)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"tokens must be in [0, 65536), got [{tokens.min()}, {tokens.max()}]")
    if tokens.size >= 2**31:
        raise ValueError(f"{tokens.size} tokens do not fit an llm.c shard (n_tokens is an int32)")
    header = np.zeros(HEADER_INTS, np.int32)
    header[:3] = MAGIC, VERSION, tokens.size
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype(np.uint16, copy=False).tobytes())
    os.replace(tmp, path)


def _looks_like_header(head: np.ndarray) -> bool:
    """An llm.c-style header (a date-like magic, then zeros from int 3 on) rather than raw tokens."""
    return len(head) == HEADER_INTS and 2020_00_00 <= head[0] <= 2099_12_31 and not head[3:].any()


def shard_header(path: str | os.PathLike) -> np.ndarray | None:
    """The validated llm.c header (int32 [256]) of a shard file, or None for a raw nanoGPT file.
    Raises UserError for a bad magic or version, or a size that does not match the header."""
    size = os.path.getsize(path)
    head = np.fromfile(path, dtype=np.int32, count=min(size // 4, HEADER_INTS))
    if len(head) and head[0] == MAGIC:
        if len(head) < HEADER_INTS:
            raise UserError(f"{path}: truncated llm.c shard header ({size} bytes)")
        if head[1] != VERSION:
            raise UserError(f"{path}: llm.c shard version {head[1]}, only version {VERSION} is supported")
        expected = HEADER_BYTES + 2 * int(head[2])
        if size != expected:
            raise UserError(
                f"{path}: header says {head[2]} tokens ({expected} bytes) but the file has {size} bytes "
                "(truncated or corrupt)"
            )
        return head
    if _looks_like_header(head):
        raise UserError(f"{path}: bad magic {head[0]} in an llm.c-style header (token shards have {MAGIC})")
    if size % 2:
        raise UserError(f"{path}: {size} bytes is not a whole number of uint16 tokens")
    return None


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """Tokens [n] uint16 of an llm.c shard or a raw nanoGPT .bin file, as a read-only memmap (no copy)."""
    header = shard_header(path)
    offset = 0 if header is None else HEADER_BYTES
    if os.path.getsize(path) == offset:
        return np.zeros(0, np.uint16)  # numpy cannot memmap zero bytes
    return np.memmap(path, dtype=np.uint16, mode="r", offset=offset)
