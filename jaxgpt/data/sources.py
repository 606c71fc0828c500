"""The prepare commands for user corpora: local text / JSON Lines / parquet files, and FineWeb streamed with
Hugging Face `datasets` (or local parquet / JSON Lines files read the same way)."""

import glob
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import numpy as np

from jaxgpt.data.encode import tokenize_docs
from jaxgpt.data.writer import finish_writers, new_writers, staging_dir, token_bar
from jaxgpt.errors import UserError

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
    with staging_dir(out, force) as tmp:
        stream = tmp / "all_tokens.tmp"  # every document, before the split point is known
        doc_lens = []
        with open(stream, "wb") as f, token_bar(f"tokenizing {len(files)} file(s)") as bar:
            for tokens in tokenize_docs(docs, workers or os.cpu_count() or 1):
                f.write(tokens.tobytes())
                doc_lens.append(len(tokens))
                bar.update(len(tokens))
        if len(doc_lens) < 2:
            raise UserError(f"found {len(doc_lens)} document(s) in {', '.join(paths)}; need at least 2")
        n_val = _n_val_docs(np.array(doc_lens), val_fraction)
        n_train_tokens = sum(doc_lens[:-n_val])
        writers = new_writers(tmp, shard_tokens)
        tokens = np.memmap(stream, dtype=np.uint16, mode="r")
        writers["train"].add(tokens[:n_train_tokens], n_docs=len(doc_lens) - n_val)
        writers["val"].add(tokens[n_train_tokens:], n_docs=n_val)
        del tokens
        stream.unlink()
        stats = finish_writers(tmp, writers, "files", source=[str(f) for f in files], text_key=text_key)
    print(f"wrote {out}")
    return stats


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
    with staging_dir(out, force) as tmp:
        docs = fineweb_docs(name, source)
        writers = new_writers(tmp, shard_tokens)
        n_tokens = 0
        with (
            token_bar(f"tokenizing {source or f'{FINEWEB} {name}'}", total=max_tokens) as bar,
            closing(tokenize_docs(docs, workers or os.cpu_count() or 1)) as tokenized,
        ):
            for tokens in tokenized:
                writers["val" if writers["val"].n_tokens < val_tokens else "train"].add(tokens)
                n_tokens += len(tokens)
                bar.update(len(tokens))
                if max_tokens is not None and n_tokens >= max_tokens:
                    break
        source_desc = source or f"{FINEWEB} name={name} split=train (streamed)"
        stats = finish_writers(tmp, writers, "fineweb", source=source_desc)
    print(f"wrote {out}")
    return stats
