"""Writing a prepared data directory: fixed-size llm.c shards per split, a staging folder renamed into place
when complete, and meta.json (written last, so its presence means the directory is complete)."""

import glob
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxgpt import __version__
from jaxgpt.data.directory import SPLITS
from jaxgpt.data.shards import HEADER_INTS, MAGIC, VERSION, write_shard
from jaxgpt.errors import UserError


class ShardWriter:
    """Writes the token stream of one split as fixed-size llm.c shards `{split}_{k:06d}.bin`."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.buffer = np.empty(shard_tokens, np.uint16)
        self.filled = 0
        self.paths: list[Path] = []
        self.n_tokens = 0
        self.n_docs = 0

    def add(self, tokens: np.ndarray, n_docs: int = 1) -> None:
        """Append tokens [n] (`n_docs` whole documents) to the stream."""
        self.n_tokens += len(tokens)
        self.n_docs += n_docs
        while len(tokens):
            k = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled : self.filled + k] = tokens[:k]
            self.filled += k
            tokens = tokens[k:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        """Write the buffered tokens as the next shard (nothing if the buffer is empty)."""
        if self.filled:
            path = self.out_dir / f"{self.split}_{len(self.paths):06d}.bin"
            write_shard(path, self.buffer[: self.filled])
            self.paths.append(path)
            self.filled = 0


def check_out(out: Path, force: bool, *, arg: str = "--out") -> None:
    """A folder can be written at `out`: no file at `out` or above it, and a non-empty `out` only with `force`.
    `arg` names the command-line argument that gave `out` in the messages."""
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"{arg} {out}: {blocker} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it")


def _remove_stale_staging(out: Path) -> None:
    """Remove the `OUT.tmp-<pid>` folders of processes that no longer run (killed during a write)."""
    for tmp in out.parent.glob(f"{glob.escape(out.name)}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """A fresh `OUT.tmp-<pid>` to write into; on success it is renamed to `out`, so a data directory
    appears complete or not at all. Refuses a non-empty `out` unless `force` (then it is replaced), and a file
    in the way; removes what killed writers of `out` left."""
    check_out(out, force)
    _remove_stale_staging(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename `new` to `out`, replacing an existing `out`."""
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    try:
        if out.exists():
            os.rename(out, old)
        os.rename(new, out)
    except OSError as e:  # e.g. another process created `out` meanwhile
        raise UserError(f"could not move the prepared data into {out}: {e}") from e
    shutil.rmtree(old, ignore_errors=True)


def finish_writers(out_dir: Path, writers: dict[str, ShardWriter], command: str, **meta) -> dict[str, int]:
    """Flush the writers, write meta.json (`meta` plus the split sizes), print where the tokens went;
    returns {split: n_tokens}."""
    for w in writers.values():
        w.flush()
    empty = [s for s, w in writers.items() if w.n_tokens == 0]
    if empty:
        raise UserError(f"no documents went to the {' and '.join(empty)} split; give more data")
    meta = {
        **meta,
        "tokenizer": "gpt2",
        "format": f"llm.c uint16 shards (header of {HEADER_INTS} int32, magic {MAGIC}, version {VERSION})",
        "splits": {
            s: {"n_tokens": w.n_tokens, "n_docs": w.n_docs, "shards": [p.name for p in w.paths]}
            for s, w in writers.items()
        },
        "created_by": f"jaxgpt {__version__}: python -m jaxgpt.data prepare {command}",
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(w.n_tokens for w in writers.values())
    for s, w in writers.items():
        print(
            f"{s}: {w.n_tokens:,} tokens ({w.n_tokens / total:.1%}), {w.n_docs:,} documents, "
            f"{len(w.paths)} shard(s)"
        )
    return {s: w.n_tokens for s, w in writers.items()}


def new_writers(out_dir: Path, shard_tokens: int) -> dict[str, ShardWriter]:
    """One ShardWriter per split, writing shards of `shard_tokens` tokens into `out_dir`."""
    return {s: ShardWriter(out_dir, s, shard_tokens) for s in SPLITS}


def token_bar(desc: str, total: int | None = None) -> tqdm:
    """A tqdm progress bar counting tokens."""
    return tqdm(desc=desc, total=total, unit="tok", unit_scale=True, dynamic_ncols=True)
