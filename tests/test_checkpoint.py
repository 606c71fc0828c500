"""Orbax checkpoints: round trip, keep-last-N, the checksum manifest, a failed save, and what the metadata holds.

Killed, stopped and damaged training runs are in test_faults.py.
"""

import errno
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt.checkpoint
from cli_runs import TINY, leaves, restore
from jaxgpt.checkpoint import MANIFEST, CheckpointSaveError, Checkpointer, TrainState
from jaxgpt.errors import UserError
from jaxgpt.spec.config import Config
from jaxgpt.train import build_config, parser, train

CLEAN_STEPS = 3


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
        assert ckpt.select() == 5  # the newest intact step by default
        with pytest.raises(UserError, match=r"available: \[4, 5\]"):
            ckpt.select(3)
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
            ckpt.select()
    finally:
        ckpt.close()


def test_manifest_covers_every_file_the_save_wrote(tmp_path):
    ckpt = Checkpointer(tmp_path / "ck")
    ckpt.save(small_state(1))
    ckpt.close()
    step_dir = tmp_path / "ck" / "1"
    files = json.loads((step_dir / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file()}
    # all but the manifest and what Orbax writes after it (its commit record, not read on restore)
    assert set(files) == on_disk - {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert "meta/metadata" in files and "state/_METADATA" in files
    assert any(name.startswith("state/") and v["size"] > 0 for name, v in files.items())
    assert jaxgpt.checkpoint.damage(step_dir) is None
    (step_dir / "_CHECKPOINT_METADATA").write_text("{")  # not covered: restoring does not read it
    ckpt = Checkpointer(tmp_path / "ck")
    try:
        like = small_state(0)
        np.testing.assert_array_equal(ckpt.restore(like.params, like.opt_state, ckpt.select()).params["w"],
                                      small_state(1).params["w"])
    finally:
        ckpt.close()


def test_disk_full_during_a_save(tmp_path, monkeypatch):
    """ENOSPC inside the save (in the background thread that writes the manifest, after the arrays): one error
    naming the step and the reason, no temporary folder, the checkpoint before intact, and the Checkpointer
    saves again once there is room."""
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    ckpt.save(small_state(1))
    ckpt.wait()
    write_manifest = jaxgpt.checkpoint.write_manifest

    def full(step_dir):
        raise OSError(errno.ENOSPC, "No space left on device", str(step_dir / MANIFEST))

    monkeypatch.setattr(jaxgpt.checkpoint, "write_manifest", full)
    ckpt.save(small_state(2))
    with pytest.raises(CheckpointSaveError) as e:
        ckpt.wait()
    assert str(e.value).startswith(f"saving checkpoint step 2 to {tmp_path / 'ck'} failed: No space left on device")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1"]
    assert ckpt.steps() == [1] and ckpt.damage(1) is None
    monkeypatch.setattr(jaxgpt.checkpoint, "write_manifest", write_manifest)
    ckpt.save(small_state(3))
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["1", "3"]


def test_set_aside_step_is_not_counted_nor_deleted(tmp_path):
    """A damaged step set aside as `<step>.damaged` is no step: keep-last-N rotates the others around it, never
    deletes it, and the same step can be saved again."""
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    for step in (1, 2):
        ckpt.save(small_state(step))
    ckpt.wait()
    shutil.rmtree(tmp_path / "ck" / "2" / "state")
    assert ckpt.damage(2) == "state/_METADATA is missing"
    assert ckpt.select(set_aside=True) == 1
    for step in (2, 3, 4):
        ckpt.save(small_state(step))
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["2.damaged", "3", "4"]


# ---------------------------------------------------------------------------------------------------
# what a training checkpoint holds
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean(default_corpus, tmp_path_factory) -> Path:
    """A 3-step run that saves and keeps every step."""
    out = tmp_path_factory.mktemp("clean") / "run"
    argv = ["--data", str(default_corpus), "--out", str(out), "--max-iters", str(CLEAN_STEPS), *TINY,
            "--set", "ckpt_interval=1", "--set", f"keep_checkpoints={CLEAN_STEPS}"]
    train(build_config(parser().parse_args(argv)))
    return out


def test_checkpoint_metadata(clean):
    """Each checkpoint holds its step, the run's config and variant, the data position and the RNG seed."""
    ckpt = Checkpointer(clean / "checkpoints")
    try:
        assert ckpt.steps() == list(range(1, CLEAN_STEPS + 1))  # keep_checkpoints=CLEAN_STEPS keeps all
        assert all(ckpt.damage(step) is None for step in ckpt.steps())
    finally:
        ckpt.close()
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
