"""Deterministic batch sampling: random token windows of one split as a pure function of (seed, batch index)."""

from __future__ import annotations

import os
import zlib

import numpy as np

from jaxgpt.data.directory import split_files
from jaxgpt.data.shards import bad_token_error, load_tokens
from jaxgpt.errors import UserError


class BatchSampler:
    """nanoGPT-style random windows from the shards of one split, as a pure function of the batch index.

    Each row picks a window start uniformly among all windows of all shards (so a shard is drawn with
    probability proportional to its number of windows, len - block_size). The RNG of batch `index` is
    seeded with (seed, split, index) only: any process, in any order, gets the same batch, so resuming
    needs nothing but the step number. A process of a multi-process run reads only its own rows of a batch
    (`rows`): every process draws the same window starts and gathers the tokens of its rows.

    Token ids must be < `vocab_size` (the model's embedding rows): a sample of each shard is checked when it
    is opened and every batch drawn is checked (one max per batch), so a bad id is a one-line UserError
    naming the shard and position, never an out-of-range lookup or a NaN loss.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, block_size: int, *, vocab_size: int, seed: int = 0):
        self.files = split_files(data_dir, split)
        self.shards = [load_tokens(f, vocab_size) for f in self.files]
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.seed = seed
        self._split_id = zlib.crc32(split.encode())
        lengths = np.array([len(s) for s in self.shards], np.int64)
        self.n_tokens = int(lengths.sum())
        self._windows = np.maximum(lengths - block_size, 0)
        self._window_ends = np.cumsum(self._windows)
        if self._window_ends[-1] == 0:
            raise UserError(
                f"the {split} split of {data_dir} is too small for block_size {block_size}: its largest "
                f"shard has {lengths.max()} tokens, at least {block_size + 1} are needed"
            )

    def get(self, index: int, batch_size: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Batch number `index`: inputs x and targets y, int32 [batch_size, block_size], y[:, t] = x[:, t+1]
        (y's last column is the token after the window); with `rows`, only those rows of it, in that order."""
        rng = np.random.default_rng([self.seed, self._split_id, index])
        window = rng.integers(0, self._window_ends[-1], size=batch_size)
        if rows is not None:
            window = window[rows]
        shard = np.searchsorted(self._window_ends, window, side="right")
        start = window - (self._window_ends[shard] - self._windows[shard])
        tokens = np.empty((len(window), self.block_size + 1), np.int32)
        offsets = np.arange(self.block_size + 1)
        for s in np.unique(shard):
            picked = shard == s
            tokens[picked] = self.shards[s][start[picked, None] + offsets]
        if tokens.size and tokens.max() >= self.vocab_size:
            row, col = np.argwhere(tokens >= self.vocab_size)[0]
            raise bad_token_error(self.files[shard[row]], int(start[row] + col), int(tokens[row, col]),
                                  self.vocab_size)
        return tokens[:, :-1].copy(), tokens[:, 1:].copy()
