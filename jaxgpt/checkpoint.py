"""Orbax checkpoints of a run: params, optimizer state and a JSON record (step, data position, RNG, config).

Each checkpoint is one Orbax step directory written to a temporary path and renamed when complete, so a
process killed during a save leaves no directory that restores as a valid checkpoint. The manager keeps the
last `keep` checkpoints; an old one is first renamed into `<run>/checkpoints/.deleted/` (atomic) and only then
removed, so a kill during that removal leaves no half-deleted step directory that still counts as a checkpoint.

Restores read onto the shardings of their targets, so a checkpoint saved from any device mesh (N devices,
data parallel or FSDP) restores onto any other (M devices): `load_run(path, mesh=...)` or, in train.py,
targets built with `sharding.state_shardings`.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxgpt import __version__
from jaxgpt.spec.config import Config
from jaxgpt.errors import UserError
from jaxgpt.model import init_model
from jaxgpt.optim import make_optimizer
from jaxgpt.sharding import abstract_with_shardings, state_shardings

TRASH = ".deleted"  # subdirectory that old checkpoints are renamed into before they are removed


@dataclass
class TrainState:
    """What a checkpoint holds. `params`/`opt_state` are pytrees; `meta` is JSON-serialisable."""

    params: Any
    opt_state: Any
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


class Checkpointer:
    """Save and restore TrainStates under `<run>/checkpoints/<step>`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, todelete_subdir=TRASH
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # Orbax removes the temporary directories of interrupted saves in a background thread. Finish that here:
        # a process that stops right after (a user error such as --resume without a checkpoint) would otherwise
        # exit with the thread still running, and it prints a traceback from the interpreter's shutdown.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._empty_trash()  # what a killed process was removing

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state: TrainState) -> None:
        """Save asynchronously; the checkpoint appears only once fully written."""
        self.wait()  # the previous save is committed and the steps it rotated out are removed
        args = ocp.args.Composite(
            state=ocp.args.StandardSave({"params": state.params, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(state.meta),
        )
        self._manager.save(state.step, args=args, force=True)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        step = self._resolve(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, params_like: Any, opt_state_like: Any, step: int | None = None) -> TrainState:
        """Restore onto the structure, dtypes and shardings of `params_like`/`opt_state_like` (arrays or
        shape/dtype structures; one without a sharding lands on the first local device, whatever device
        layout saved the checkpoint)."""
        step = self._resolve(step)
        target = jax.tree.map(_restore_target, {"params": params_like, "opt_state": opt_state_like})
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return TrainState(out["state"]["params"], out["state"]["opt_state"], out["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._empty_trash()

    def close(self) -> None:
        self._manager.close()
        self._empty_trash()

    def _empty_trash(self) -> None:
        """Remove the checkpoints that the manager rotated out (call only while no save is in flight)."""
        shutil.rmtree(self.directory / TRASH, ignore_errors=True)

    def _resolve(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise UserError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise UserError(f"no checkpoint for step {step} in {self.directory}; available: {steps}")
        return step


def _restore_target(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def make_meta(cfg: Config, step: int, data_dir: str, **extra: Any) -> dict[str, Any]:
    """The JSON record of a checkpoint: step, config, variant, data position and RNG seed."""
    return {
        "step": step,
        "config": cfg.to_dict(),
        "variant": cfg.variant,
        "data": {"dir": str(data_dir), "seed": cfg.seed, "next_batch_index": step},
        "rng": {"init_seed": cfg.seed},
        "jaxgpt_version": __version__,
        **extra,
    }


def abstract_params(cfg: Config) -> nnx.State:
    """The run's parameters as shape/dtype structures (nothing allocated)."""
    return nnx.state(nnx.eval_shape(lambda: init_model(cfg.model, cfg.seed)), nnx.Param)


def checkpoint_dir(path: str | Path) -> Path:
    """A run folder (holding checkpoints/) or a checkpoints folder -> the checkpoints folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if not path.is_dir():
        raise UserError(f"checkpoint directory {path} does not exist")
    return path


def load_run(path: str | Path, step: int | None = None, mesh: Mesh | None = None) -> tuple[Config, TrainState]:
    """Restore a run's checkpoint (latest, or `step`) without building the model: -> (config, state).

    Without `mesh` every array lands on the first local device; with one, on that mesh with the training
    layout (sharding.state_shardings: replicated, or FSDP-sharded when the mesh has an fsdp axis > 1)."""
    ckpt = Checkpointer(checkpoint_dir(path))
    try:
        meta = ckpt.read_meta(step)
        cfg = Config.from_dict(meta["config"])
        try:
            params = abstract_params(cfg)
        except KeyError as e:
            raise UserError(f"checkpoint variant {cfg.variant!r} needs {e}, unknown to this jaxgpt") from None
        opt_state = jax.eval_shape(make_optimizer(cfg).init, params)
        if mesh is not None:
            params, opt_state = (abstract_with_shardings(t, state_shardings(t, mesh)) for t in (params, opt_state))
        state = ckpt.restore(params, opt_state, step=meta["step"])
    finally:
        ckpt.close()
    return cfg, state
