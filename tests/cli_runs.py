"""Helpers for the tests that run `python -m jaxgpt.train` in subprocesses (test_train.py, test_sharding.py; the
`cli` and `reference` fixtures built on them are in conftest.py)."""

import fcntl
import json
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt.checkpoint import load_run

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240

# 1 layer, 32 wide, 32 tokens of context, batch 4: a few hundred ms per step including the 50304-row head; no warmup
# (a run shorter than the preset's warmup is rejected).
TINY = [
    "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2", "--set", "model.block_size=32",
    "--set", "batch_size=4", "--set", "eval_iters=2", "--set", "log_interval=1", "--set", "warmup_iters=0",
]
# The 4-step schedule shared by the reference, resume and data-parallel runs: the lr schedule is pinned by
# lr_decay_iters (not max_iters), so a run stopped at step 2 follows the same schedule as the full one.
SCHEDULE = [
    "--set", "warmup_iters=1", "--set", "lr_decay_iters=4", "--set", "learning_rate=3e-3",
    "--set", "eval_interval=2", "--set", "ckpt_interval=2",
]


@dataclass
class Run:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    def records(self, kind: str) -> list[dict]:
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.records("train")}

    def check(self) -> "Run":
        assert self.returncode == 0, f"rc={self.returncode}\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}"
        return self


def train_env(cache: Path, devices: int = 1) -> dict[str, str]:
    """The environment of a training subprocess: JAX on `devices` virtual CPU devices, this checkout importable,
    and the compilation cache `cache` shared by every run of one pytest invocation (it only saves compile time)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A directory of this pytest invocation, shared by all its pytest-xdist workers."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)



def restore(run_dir: Path, step: int | None = None):
    """(meta, params, opt_state) of a run's checkpoint."""
    _, state = load_run(run_dir, step)
    return state.meta, state.params, state.opt_state


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b, rtol: float = 0.0):
    a, b = leaves(a), leaves(b)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        if rtol == 0:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            err = np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-30)
            assert err < rtol, (k, err)


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the TensorBoard event files in `run_dir`, read as TensorBoard reads them: TFRecord
    frames (length, masked CRC-32C, Event proto, masked CRC-32C; the CRCs are checked), files in name order, and
    a SessionLog START at step s (a resumed writer's purge_step) discards the earlier events at steps >= s. A tag
    logged twice at one step is an error here."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.record_writer import masked_crc32c

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,), (length_crc,) = struct.unpack_from("<Q", data, pos), struct.unpack_from("<I", data, pos + 8)
            assert length_crc == masked_crc32c(data[pos:pos + 8]), f"{path}: bad length CRC at {pos}"
            record = data[pos + 12:pos + 12 + length]
            (record_crc,) = struct.unpack_from("<I", data, pos + 12 + length)
            assert record_crc == masked_crc32c(record), f"{path}: bad record CRC at {pos}"
            pos += 16 + length
            event = Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                scalars = {tag: {s: v for s, v in values.items() if s < event.step} for tag, values in scalars.items()}
            for value in event.summary.value:
                steps = scalars.setdefault(value.tag, {})
                assert event.step not in steps, f"{value.tag} logged twice at step {event.step}"
                steps[event.step] = value.simple_value
    return scalars
