"""The token shard file format: llm.c / modded-nanogpt shards and nanoGPT raw uint16 files, validated on open.

  - llm.c / modded-nanogpt: 256 int32 header (magic 20240520, version 1, n_tokens, zeros), then
    n_tokens uint16 (e.g. `fineweb_train_000001.bin`);
  - nanoGPT: raw uint16 tokens, no header (`train.bin`, `val.bin`).
Tokens are read as read-only numpy memmaps.

Which format a file is in: a file that starts with the magic is an llm.c shard. A file that does not is read
as raw tokens only if nothing says it was meant to be a shard; it must have a valid header (and opening it is
an error naming the evidence) when
  - its name carries an llm.c shard index, `*_NNNNNN.bin` (what llm.c, modded-nanogpt and `prepare` write), or
  - its first int32 is within 3 bits of the magic (a damaged magic), or
  - its first int32 is date-like (llm.c's magics are dates) and the second a version below 16, or
  - it is at least a header long and the header's token count matches the file size (1024 + 2 n bytes), or
  - it is at least a header long and the header's reserved ints 3..255 are all zero.
For raw tokens each content test needs specific token ids at the start of the file (or 506 zero tokens in a
row), so a damaged header is caught instead of being read as 512 garbage tokens.

Token ids must be < vocab_size: opening a shard with `vocab_size` checks SAMPLE_IDS evenly spaced ids (cheap on
a memmap; random bytes fail it at once), and BatchSampler checks every batch it draws.
"""

import os
import re
from collections.abc import Sequence
from pathlib import Path

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


_SHARD_INDEX = re.compile(r"_\d{6}\.bin$")
_MAGIC_BITS = 3  # a first int32 this few bits from MAGIC is a damaged magic
SAMPLE_IDS = 4096  # token ids checked against vocab_size when a shard is opened


def _shard_evidence(name: str, head: np.ndarray, size: int) -> str | None:
    """Why a file whose first int32 [`head`: up to 256 of them] is not MAGIC must still be an llm.c shard,
    or None: it is a raw token file."""
    if _SHARD_INDEX.search(name):
        return "its name has an llm.c shard index _NNNNNN"
    if not len(head):
        return None
    first = int(head[0]) & 0xFFFFFFFF
    if (first ^ MAGIC).bit_count() <= _MAGIC_BITS:
        return f"its first int32 is {(first ^ MAGIC).bit_count()} bit(s) from the magic"
    if len(head) > 1 and 2020_00_00 <= head[0] <= 2099_12_31 and 0 < head[1] < 16:
        return "its first int32s look like an llm.c magic (a date) and version"
    if len(head) < HEADER_INTS:
        return None
    if size == HEADER_BYTES + 2 * int(head[2]):
        return f"its header's token count {head[2]} matches the file size"
    if not head[3:].any():
        return "its reserved header ints 3..255 are zero"
    return None


def shard_header(path: str | os.PathLike) -> np.ndarray | None:
    """The validated llm.c header (int32 [256]) of a shard file, or None for a raw nanoGPT file (see the
    module docstring for which is which). Raises a one-line UserError naming the file for a bad or truncated
    header, a token count that does not match the file size, or an odd-sized raw file."""
    size = os.path.getsize(path)
    head = np.fromfile(path, dtype=np.int32, count=min(size // 4, HEADER_INTS))
    has_magic = len(head) > 0 and head[0] == MAGIC
    evidence = None if has_magic else _shard_evidence(Path(path).name, head, size)
    if not has_magic and evidence is None:
        if size % 2:
            raise UserError(f"{path}: {size} bytes is not a whole number of uint16 tokens (raw token file)")
        return None
    why = "" if has_magic else f"; not read as raw tokens because {evidence}"
    if size < HEADER_BYTES:
        raise UserError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header (llm.c shard format{why})")
    if not has_magic:
        first = int(head[0]) & 0xFFFFFFFF
        raise UserError(f"{path}: header magic {first:#x} is not {MAGIC} (llm.c shard format{why})")
    if head[1] != VERSION:
        raise UserError(f"{path}: header version {head[1]} is not {VERSION} (llm.c shard format)")
    expected = HEADER_BYTES + 2 * int(head[2])
    if head[2] < 0 or size != expected:
        raise UserError(
            f"{path}: header says {head[2]} tokens ({expected} bytes) but the file has {size} bytes "
            "(truncated or corrupt llm.c shard)"
        )
    return head


def check_token_ids(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int, n: int = SAMPLE_IDS) -> None:
    """UserError naming `path` if any of `n` evenly spaced ids of tokens [len] is >= vocab_size."""
    if not len(tokens):
        return
    positions = np.unique(np.linspace(0, len(tokens) - 1, num=min(n, len(tokens))).astype(np.int64))
    sample = tokens[positions]
    bad = np.flatnonzero(sample >= vocab_size)
    if bad.size:
        raise bad_token_error(path, int(positions[bad[0]]), int(sample[bad[0]]), vocab_size)


def bad_token_error(path: str | os.PathLike, position: int, token: int, vocab_size: int) -> UserError:
    """The one-line data error for token id `token` >= vocab_size at `position` of the shard `path`."""
    return UserError(
        f"{path}: token id {token} at position {position} is >= vocab_size {vocab_size} "
        "(corrupt shard, random bytes, or another tokenizer)"
    )


def load_tokens(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Tokens [n] uint16 of an llm.c shard or a raw nanoGPT .bin file, as a read-only memmap (no copy).
    The header is validated; with `vocab_size`, so is a sample of the token ids (`check_token_ids`)."""
    header = shard_header(path)
    offset = 0 if header is None else HEADER_BYTES
    if os.path.getsize(path) == offset:
        return np.zeros(0, np.uint16)  # numpy cannot memmap zero bytes
    tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=offset)
    if vocab_size is not None:
        check_token_ids(path, tokens, vocab_size)
    return tokens
