"""Documents to tokens: GPT-2 BPE, each document as EOT followed by its tokens, optionally in a process pool."""

import itertools
import multiprocessing as mp
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from jaxgpt.tokenizer import EOT, get_tokenizer


def encode_doc(text: str) -> np.ndarray:
    """One document as tokens [1 + n] uint16: EOT, then `encode_ordinary(text)`."""
    return np.array([EOT, *get_tokenizer().encode_ordinary(text)], np.uint16)


def _encode_docs(texts: list[str]) -> list[np.ndarray]:
    return [encode_doc(t) for t in texts]


def tokenize_docs(texts: Iterable[str], workers: int = 1, chunksize: int = 16) -> Iterator[np.ndarray]:
    """`encode_doc` of each text, in order. With workers > 1 a pool of spawned processes (safe even after
    JAX started its threads) encodes chunks of `chunksize` texts; at most 4 * workers chunks are in flight, so
    an endless stream is tokenized in bounded memory. Closing the iterator early cancels what is queued."""
    if workers <= 1:
        yield from map(encode_doc, texts)
        return
    stream = iter(texts)
    chunks = iter(lambda: list(itertools.islice(stream, chunksize)), [])
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        pending: deque[Future] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(_encode_docs, chunk))
                if len(pending) >= 4 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
