"""Orbax checkpoints of a run: params, optimizer state and a JSON record (step, data position, RNG, config).

Each checkpoint is one Orbax step directory written to a temporary path and renamed when complete, so a
process killed during a save leaves no directory that restores as a valid checkpoint. The manager keeps the
last `keep` checkpoints; an old one is first renamed into `<run>/checkpoints/.deleted/` (atomic) and only then
removed, so a kill during that removal leaves no half-deleted step directory that still counts as a checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxgpt.errors import UserError

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
        """Restore onto the structure, dtypes and shardings of `params_like`/`opt_state_like`."""
        step = self._resolve(step)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params_like, "opt_state": opt_state_like})
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
