"""Orbax checkpoints: round trip, keep-last-N, what the metadata holds, and atomicity under SIGKILL.

The kill test trains in subprocesses that checkpoint every step, SIGKILLs them at random moments (mostly
during a save), resumes, and checks every checkpoint left on disk against a clean run: a checkpoint that is
listed must restore to exactly the clean run's state at that step.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.checkpoint import Checkpointer, TrainState, load_run
from jaxgpt.spec.config import Config
from jaxgpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]

# A 1-layer, 32-wide model, batch 4, one checkpoint per step, the last 2 kept (so most saves also rotate one
# out). The schedule flags are those of tests/test_train.py's runs, so the subprocesses compile the same
# programs (shared compilation cache).
RUN_ARGS = [
    "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2", "--set", "model.block_size=32",
    "--set", "batch_size=4", "--set", "eval_iters=2", "--set", "log_interval=1",
    "--set", "warmup_iters=1", "--set", "lr_decay_iters=4", "--set", "learning_rate=3e-3",
    "--set", "eval_interval=1000", "--set", "ckpt_interval=1",
]
KEEP = 2
CLEAN_STEPS = 10


def restore(run_dir: Path, step: int | None = None):
    """(meta, params, opt_state) of a run's checkpoint."""
    _, state = load_run(run_dir, step)
    return state.meta, state.params, state.opt_state


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def listed_steps(run_dir: Path) -> list[int]:
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        return ckpt.steps()
    finally:
        ckpt.close()


def train_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


@pytest.fixture(scope="module")
def train_env(tmp_path_factory) -> dict[str, str]:
    """Environment of the training subprocesses: one CPU device, the session's shared compilation cache."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax-compilation-cache"
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    return env


def train_cmd(data: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "jaxgpt.train", "--data", str(data), "--out", str(out), *RUN_ARGS, *args]


# ---------------------------------------------------------------------------------------------------
# Checkpointer on its own
# ---------------------------------------------------------------------------------------------------


def small_state(step: int) -> TrainState:
    params = {"w": jnp.full((3, 2), float(step)), "b": jnp.arange(4, dtype=jnp.float32) + step}
    opt_state = {"count": jnp.asarray(step, jnp.int32), "mu": {"w": jnp.full((3, 2), -float(step))}}
    return TrainState(params, opt_state, {"step": step, "note": f"state {step}", "nested": {"list": [step, 2]}})


def test_keep_last_n_and_round_trip(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    for step in range(1, 6):
        ckpt.save(small_state(step))
    ckpt.wait()
    assert ckpt.steps() == [4, 5]
    assert ckpt.latest_step() == 5
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["4", "5"]
    # a new process (here: a new Checkpointer) sees the same steps and restores each one exactly
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    try:
        assert ckpt.steps() == [4, 5]
        like = small_state(0)
        for step in (4, 5):
            state = ckpt.restore(like.params, like.opt_state, step)
            want = small_state(step)
            assert state.step == step and state.meta == want.meta
            assert ckpt.read_meta(step) == want.meta
            got_leaves = jax.tree.leaves((state.params, state.opt_state))
            for a, b in zip(got_leaves, jax.tree.leaves((want.params, want.opt_state)), strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape
                np.testing.assert_array_equal(a, b)
        assert ckpt.restore(like.params, like.opt_state).step == 5  # latest by default
        with pytest.raises(UserError, match=r"available: \[4, 5\]"):
            ckpt.restore(like.params, like.opt_state, 3)
    finally:
        ckpt.close()


def test_unfinished_save_is_not_listed_and_is_cleaned_up(tmp_path):
    """What a kill during a save leaves (Orbax's temporary directory) is neither a step nor kept."""
    ckpt = Checkpointer(tmp_path / "ck", keep=3)
    ckpt.save(small_state(1))
    ckpt.close()
    # an interrupted save of step 2: Orbax writes into `<step>.orbax-checkpoint-tmp-<n>` and renames at the end
    shutil.copytree(tmp_path / "ck" / "1", tmp_path / "ck" / "2.orbax-checkpoint-tmp-1234")
    ckpt = Checkpointer(tmp_path / "ck", keep=3)
    try:
        assert ckpt.steps() == [1]
        assert ckpt.latest_step() == 1
    finally:
        ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]


def test_half_removed_checkpoint_is_not_listed(tmp_path):
    """Old checkpoints are renamed into a trash folder before they are removed: what a kill during the removal
    leaves there is no step, and the next opening removes it."""
    ckpt = Checkpointer(tmp_path / "ck", keep=1)
    ckpt.save(small_state(1))
    ckpt.save(small_state(2))
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2"]
    shutil.copytree(tmp_path / "ck" / "2", tmp_path / "ck" / ".deleted" / "1")
    for p in list((tmp_path / "ck" / ".deleted" / "1").rglob("*"))[:3]:
        if p.is_file():
            p.unlink()
    ckpt = Checkpointer(tmp_path / "ck", keep=1)
    try:
        assert ckpt.steps() == [2]
    finally:
        ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2"]


def test_empty_directory_has_no_steps(tmp_path):
    ckpt = Checkpointer(tmp_path / "none")
    try:
        assert ckpt.steps() == [] and ckpt.latest_step() is None
        with pytest.raises(UserError, match="no checkpoint"):
            ckpt.read_meta()
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------------------------------
# a training run's checkpoints under SIGKILL
# ---------------------------------------------------------------------------------------------------


def wait_for_step_above(ckpt_dir: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 180) -> int:
    """Poll the directory (no Orbax manager while the run writes) for a finished step directory > step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.is_dir() else []
        if done and max(done) > step:
            return max(done)
        if proc.poll() is not None:
            pytest.fail(f"training exited with {proc.returncode} before a new checkpoint:\n{log.read_text()[-3000:]}")
        time.sleep(0.002)
    proc.kill()
    pytest.fail(f"no checkpoint past step {step} within {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def clean(default_corpus, train_env, tmp_path_factory) -> Path:
    """A never-interrupted run of CLEAN_STEPS steps that keeps every checkpoint."""
    out = tmp_path_factory.mktemp("clean") / "run"
    run = subprocess.run(train_cmd(default_corpus, out, "--max-iters", str(CLEAN_STEPS),
                                   "--set", f"keep_checkpoints={CLEAN_STEPS}"),
                         cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    return out


def test_sigkill_never_leaves_a_wrong_checkpoint(default_corpus, train_env, clean, tmp_path):
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    out = tmp_path / "killed"
    ckpt_dir = out / "checkpoints"
    kills = []
    last = 0
    for segment in range(3):
        log = tmp_path / f"segment{segment}.log"
        cmd = train_cmd(default_corpus, out, "--max-iters", str(CLEAN_STEPS - 2), "--set", f"keep_checkpoints={KEEP}")
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd + (["--resume"] if segment else []), cwd=ROOT, env=train_env, stdout=f,
                                    stderr=subprocess.STDOUT)
        try:
            seen = wait_for_step_above(ckpt_dir, last, proc, log)
            # right after a step directory appears the save is finishing and rotating an old checkpoint out;
            # later the next step runs and its save starts: kill in either phase
            delay = rng.uniform(0.0, 0.01) if rng.random() < 0.5 else rng.uniform(0.01, 0.4)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        last = max(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit())
        kills.append((seen, round(delay, 3), last, sorted(p.name for p in ckpt_dir.iterdir())))
        if proc.returncode == 0:  # it finished all its steps before the kill (a fast machine): stop here
            break
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    context = f"seed {seed}; kills (first new step seen, delay, last step dir, dir listing): {kills}"
    print(context)

    # the checkpoints left behind, as a new process sees them (snapshot: the final resume below rotates them)
    snapshot = tmp_path / "snapshot"
    shutil.copytree(out, snapshot)
    steps = listed_steps(snapshot)
    assert steps, context
    assert max(steps) >= kills[-1][0], context  # a finished checkpoint never disappears by itself
    killed_states = {step: restore(snapshot, step) for step in steps}

    # resume once more and finish the clean run's steps
    done = subprocess.run(train_cmd(default_corpus, out, "--max-iters", str(CLEAN_STEPS), "--resume",
                                    "--set", f"keep_checkpoints={KEEP}"),
                          cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{context}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert f"at step {max(steps)}" in done.stdout
    # keep-last-N, with nothing else left in the directory (temporary or half-deleted checkpoints)
    kept = list(range(CLEAN_STEPS - KEEP + 1, CLEAN_STEPS + 1))
    assert listed_steps(out) == kept
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(str(s) for s in kept), context

    # every listed checkpoint of the killed run is exactly the clean run's state at that step
    for step, (meta, params, opt_state) in killed_states.items():
        clean_meta, clean_params, clean_opt = restore(clean, step)
        assert meta["step"] == step and meta["data"]["next_batch_index"] == step, context
        assert meta["config"]["model"] == clean_meta["config"]["model"]
        for name, (a, b) in {**_paired(params, clean_params), **_paired(opt_state, clean_opt)}.items():
            np.testing.assert_array_equal(a, b, err_msg=f"step {step} {name}; {context}")
    # and the loss trajectory through the kills and resumes is the clean one
    assert train_losses(out) == train_losses(clean), context
    assert sorted(train_losses(clean)) == list(range(1, CLEAN_STEPS + 1))


def _paired(a, b) -> dict:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    return {k: (la[k], lb[k]) for k in la}


# ---------------------------------------------------------------------------------------------------
# what a training checkpoint holds
# ---------------------------------------------------------------------------------------------------


def test_checkpoint_metadata(clean):
    """Each checkpoint holds its step, the run's config and variant, the data position and the RNG seed."""
    assert listed_steps(clean) == list(range(1, CLEAN_STEPS + 1))  # keep_checkpoints=CLEAN_STEPS keeps all
    config = json.loads((clean / "config.json").read_text())
    for step in (1, CLEAN_STEPS):
        meta, params, opt_state = restore(clean, step)
        assert meta["step"] == step
        assert meta["config"] == config
        assert Config.from_dict(meta["config"]).model.n_embd == 32
        assert meta["variant"] == config["variant"] == "baseline"
        assert meta["data"]["next_batch_index"] == step
        assert meta["data"]["seed"] == config["seed"]
        assert (Path(meta["data"]["dir"]) / "meta.json").is_file()
        assert meta["rng"]["init_seed"] == config["seed"]
        # the optimizer state belongs to the same step: Adam's step counter(s) equal the step
        counts = [v for k, v in leaves(opt_state).items() if "count" in k]
        assert counts and all(int(c) == step for c in counts), counts
        assert all(np.all(np.isfinite(v)) for v in leaves(params).values())
