"""Data directories: the shard files of each split, whether a prepare command finished, and where the default
corpus lives. A split's shards are every `*{split}*.bin` file of the directory, sorted by name."""

import os
from pathlib import Path

from jaxgpt.errors import UserError

SPLITS = ("train", "val")


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
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(
            f"data directory {data_dir} is a file, not a folder; give the folder that holds the *train*.bin and "
            "*val*.bin shards"
        )
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist; {_prepare_hint(data_dir)}")
    files = sorted(f for f in data_dir.glob(f"*{split}*.bin") if f.is_file())
    if not files:
        raise UserError(f"no {split} shards (*{split}*.bin) in {data_dir}; {_prepare_hint(data_dir)}")
    return files


def is_prepared(data_dir: str | os.PathLike) -> bool:
    """Whether a prepare command finished writing `data_dir` (its meta.json is written last)."""
    return (Path(data_dir) / "meta.json").is_file()
