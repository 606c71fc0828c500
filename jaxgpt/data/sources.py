"""The prepare commands for user corpora: local text / JSON Lines / parquet files, and FineWeb streamed with
Hugging Face `datasets` (or local parquet / JSON Lines files read the same way)."""

import glob
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxgpt.data.encode import tokenize_docs
from jaxgpt.data.writer import finish_writers, new_writers, staging_dir, token_bar
from jaxgpt.errors import UserError

if TYPE_CHECKING:
    import pyarrow.parquet as pq

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


def _text(value: object, where: str, text_key: str) -> str:
    """A document's text: a string field as it is, a missing (null) one as empty; UserError for other types."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field {text_key!r} is of type {type(value).__name__}, not a string")
    return value


def read_docs(path: Path, text_key: str = "text") -> Iterator[str]:
    """The documents of one file: a .txt file is one document; .jsonl/.json has one JSON object per line
    and .parquet one row per document, the text in field/column `text_key` (null: an empty document).
    A file that cannot be read or parsed is a one-line UserError naming it."""
    try:
        if path.suffix == ".txt":
            yield path.read_text(encoding="utf-8", errors="replace")
        elif path.suffix == ".parquet":
            yield from _parquet_docs(path, text_key)
        else:
            yield from _json_lines_docs(path, text_key)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from e


def _open_parquet(path: Path, text_key: str) -> "pq.ParquetFile":
    """`pyarrow.parquet.ParquetFile(path)`, checked to have a string column `text_key` (else a UserError)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except pa.ArrowException as e:
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e
    schema = parquet.schema_arrow
    if text_key not in schema.names:
        raise UserError(f"{path}: no column {text_key!r} (columns: {schema.names})")
    column_type = schema.field(text_key).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UserError(f"{path}: column {text_key!r} holds {column_type}, not strings")
    return parquet


def _parquet_docs(path: Path, text_key: str) -> Iterator[str]:
    import pyarrow as pa

    parquet = _open_parquet(path, text_key)
    try:
        for batch in parquet.iter_batches(columns=[text_key], batch_size=1024):
            yield from (text or "" for text in batch.column(0).to_pylist())
    except pa.ArrowException as e:
        raise UserError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e


def _json_lines_docs(path: Path, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[text_key]
            except (json.JSONDecodeError, TypeError, KeyError) as e:
                raise UserError(
                    f"{path}:{lineno}: expected a JSON object with a {text_key!r} field per line ({e!r})"
                ) from e
            yield _text(value, f"{path}:{lineno}", text_key)


def _n_val_docs(doc_lens: np.ndarray, val_fraction: float) -> int:
    """How many of the last documents make up `val_fraction` of the tokens (at least one, never all)."""
    tail = np.cumsum(doc_lens[::-1])
    n = int(np.searchsorted(tail, val_fraction * tail[-1])) + 1
    return min(n, len(doc_lens) - 1)


MAX_SHARD_TOKENS = 2**31 - 1  # an llm.c shard's token count is an int32


def check_write_options(shard_tokens: int, workers: int | None) -> None:
    """UserError for a --shard-tokens or --workers value the shard writers or the tokenizer pool cannot use."""
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise UserError(
            f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS}] (tokens per shard file), got {shard_tokens}"
        )
    if workers is not None and workers < 0:
        raise UserError(f"--workers must be >= 0 (0: all CPUs), got {workers}")


DOCS_HINT = (
    "each .txt file is one document and each .jsonl/.json line or .parquet row is one, so give at least two "
    "non-empty .txt files or a .jsonl file with several lines"
)


def prepare_files(
    paths: Sequence[str],
    out: str | os.PathLike,
    val_fraction: float = 0.005,
    text_key: str = "text",
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    force: bool = False,
) -> dict[str, int]:
    """Tokenize local document files into `out`; val = the last whole documents, the fewest that hold
    `val_fraction` of the tokens, at least one (so 0 means one document) and never all. Documents with no
    text (empty or whitespace only) are skipped. Returns {split: n_tokens}."""
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    check_write_options(shard_tokens, workers)
    out = Path(out)
    files = collect_files(paths)
    n_empty = 0

    def texts() -> Iterator[str]:
        nonlocal n_empty
        for f in files:
            for doc in read_docs(f, text_key):
                if doc.strip():
                    yield doc
                else:
                    n_empty += 1

    with staging_dir(out, force) as tmp:
        stream = tmp / "all_tokens.tmp"  # every document, before the split point is known
        doc_lens = []
        with open(stream, "wb") as f, token_bar(f"tokenizing {len(files)} file(s)") as bar:
            for tokens in tokenize_docs(texts(), workers or os.cpu_count() or 1):
                f.write(tokens.tobytes())
                doc_lens.append(len(tokens))
                bar.update(len(tokens))
        if len(doc_lens) < 2:
            empty = f" (and {n_empty} without, skipped)" if n_empty else ""
            raise UserError(
                f"found {len(doc_lens)} document(s) with text{empty} in {', '.join(paths)}; need at least 2, "
                f"one for train and one for val: {DOCS_HINT}"
            )
        if n_empty:
            print(f"skipped {n_empty} document(s) with no text (empty or whitespace only)", file=sys.stderr)
        n_val = _n_val_docs(np.array(doc_lens), val_fraction)
        n_train_tokens = sum(doc_lens[:-n_val])
        val_share = 1 - n_train_tokens / sum(doc_lens)
        if not val_fraction / 2 <= val_share <= 2 * val_fraction:
            print(
                f"note: val holds {val_share:.1%} of the tokens, not --val-fraction {val_fraction}: "
                f"it takes whole documents ({n_val} of {len(doc_lens)}), at least one and never all",
                file=sys.stderr,
            )
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
    parquet / JSON Lines files `source` (file, directory or glob) read the same way; texts that are empty or
    whitespace only are skipped.
    The dataset is opened by the call (errors surface here), its rows are read lazily; a row that cannot be read or
    whose text is not a string is a UserError."""
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
        for f in files:
            if f.suffix == ".parquet":
                _open_parquet(f, "text")
        # the JSON loader logs a parse error before raising it; _texts reports it in one line
        logging.getLogger("datasets.packaged_modules.json.json").setLevel(logging.CRITICAL)
        data_files = [str(f) for f in files]
        dataset = load_dataset(kinds.pop(), data_files=data_files, split="train", streaming=True)
    where = f"--source {source}" if source else f"{FINEWEB} {name}"
    try:
        texts = dataset.select_columns(["text"])
    except ValueError as e:  # no such column
        raise UserError(f"{where}: {e}") from e
    return _texts(texts, where)


def _texts(rows: Iterable[dict], where: str) -> Iterator[str]:
    """The "text" fields of dataset `rows` that hold text; UserError naming `where` for a row that cannot be read."""
    import pyarrow as pa

    try:
        for row in rows:
            if (text := _text(row["text"], where, "text")).strip():
                yield text
    except (pa.ArrowException, ValueError) as e:
        raise UserError(f"{where}: cannot read a row ({str(e).splitlines()[0]})") from e


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
    check_write_options(shard_tokens, workers)
    if val_tokens < 1:
        raise UserError(f"--val-tokens must be >= 1, got {val_tokens}")
    if max_tokens is not None and max_tokens <= val_tokens:
        raise UserError(f"--max-tokens {max_tokens} leaves nothing for train: it must exceed --val-tokens {val_tokens}")
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
