"""Orbax checkpoints of a run: params, optimizer state and a JSON record (step, data position, RNG, config).

Each checkpoint is one Orbax step folder, written to a temporary path and renamed when complete, so a process
killed during a save leaves no folder that passes for a checkpoint; what it leaves is removed when the folder is
next opened. The manager keeps the last `keep` checkpoints; an old one is first renamed into
`<run>/checkpoints/.deleted/` (atomic) and only then removed, so a kill during that removal leaves no half-deleted
step folder that still counts as a checkpoint.

Integrity: just before Orbax commits a step folder, `checksums.json` is written into it with the size and sha256 of
every file the save wrote, so the folder appears together with its manifest. Loading verifies a step against its
manifest first (`Checkpointer.select`): a truncated, garbled or missing file, an empty folder or a missing
manifest makes the step damaged. Without an explicit step the newest intact one is used and each newer damaged
one is reported in one line; `train --resume` also renames it to `<step>.damaged`, which Orbax no longer lists, so
keep-last-N neither counts nor deletes it.

A failed save (disk full, no permission) raises CheckpointSaveError naming the step, as soon as the background
write has failed (`poll`, `wait`), and removes that save's temporary folder; the checkpoints before it stay.

Restores read onto the shardings of their targets, so a checkpoint saved from any device mesh (N devices,
data parallel or FSDP) restores onto any other (M devices): `load_run(path, mesh=...)` or, in train.py,
targets built with `sharding.state_shardings`.

Several processes (distributed.py) save and restore together through Orbax's multi-process support: every
process writes its shards of each array, and process 0 (Orbax's primary host) waits for all of them, then writes
the metadata, the manifest and renames the step folder. Setting damaged steps aside and removing trash and
temporary folders are process 0's too. A checkpoint of P processes restores onto any number of processes and
devices, one device included (`load_run`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from jaxgpt import __version__
from jaxgpt.distributed import barrier, is_primary
from jaxgpt.spec.config import Config
from jaxgpt.errors import UserError
from jaxgpt.model import init_model
from jaxgpt.optim import make_optimizer
from jaxgpt.sharding import abstract_with_shardings, state_shardings

TRASH = ".deleted"  # subdirectory that old checkpoints are renamed into before they are removed
MANIFEST = "checksums.json"  # in each step folder: {"files": {relative path: {"size", "sha256"}}}
# What Orbax writes into a step folder after the manifest, as part of its commit; restoring reads neither.
ORBAX_COMMIT_FILES = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})
DAMAGED = ".damaged"  # suffix of a damaged step folder that was set aside
TMP_GLOB = "*.orbax-checkpoint-tmp*"  # Orbax's temporary folders of unfinished saves


class CheckpointSaveError(UserError):
    """A checkpoint could not be written; the message names the step and the reason (e.g. disk full)."""


@dataclass
class TrainState:
    """What a checkpoint holds. `params`/`opt_state` are pytrees; `meta` is JSON-serialisable."""

    params: Any
    opt_state: Any
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# ---------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _covered_files(step_dir: Path) -> list[Path]:
    """The files of a step folder that its manifest covers: all but the manifest and Orbax's commit files."""
    skip = ORBAX_COMMIT_FILES | {MANIFEST}
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and str(p.relative_to(step_dir)) not in skip)


def write_manifest(step_dir: Path) -> None:
    """Record the size and sha256 of every file in `step_dir` in `step_dir/checksums.json` (fsynced)."""
    files = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _covered_files(step_dir)}
    with open(step_dir / MANIFEST, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def damage(step_dir: Path) -> str | None:
    """Why the checkpoint in `step_dir` is damaged, or None when every file of its manifest is there, intact."""
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
        return "empty step folder"
    try:
        files = json.loads((step_dir / MANIFEST).read_text())["files"]
        entries = [(name, int(want["size"]), str(want["sha256"])) for name, want in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"unreadable {MANIFEST}"
    for name, size, sha256 in entries:
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} written"
        if _sha256(path) != sha256:
            return f"{name} does not match its checksum"
    return None


class _ManifestedPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's write-then-rename protocol, with the manifest written into a step folder right before Orbax commits
    and renames it (Orbax uses this class for the step folder and for the item folders inside it)."""

    async def finalize(self) -> None:
        if self.get_final().name.isdigit():  # the step folder; its items are already final inside it
            await asyncio.to_thread(write_manifest, Path(self.get()))
        await super().finalize()


def _quiet_orbax_errors(record: logging.LogRecord) -> bool:
    """Drop Orbax's error logs (each a traceback, repeated by every thread a failed save went through): the
    Checkpointer reports a failed save itself, in one line."""
    return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


def _quiet_closed_loop(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops `RuntimeError: Event loop is closed`: when a save fails, the
    array writes still in flight complete after Orbax has closed that save's event loop, and the writer reports
    each one this way. Everything else goes to `previous`."""

    def hook(unraisable: Any) -> None:
        if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.quiets_closed_loop = True
    return hook


def save_error_reason(e: BaseException) -> str:
    """A one-line reason for a failed save: the OS error when there is one (Orbax's writer reports it as
    `[os_error_code='28']` inside a long message), else the error's first line."""
    for err in (e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno:
            return os.strerror(err.errno) + (f": {err.filename}" if err.filename else "")
    if m := re.search(r"os_error_code='(\d+)'", str(e)):
        return os.strerror(int(m[1]))
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# ---------------------------------------------------------------------------------------------------
# Checkpointer
# ---------------------------------------------------------------------------------------------------


class Checkpointer:
    """Save, verify and restore TrainStates under `<run>/checkpoints/<step>`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).resolve()
        logger = logging.getLogger("absl")
        if _quiet_orbax_errors not in logger.filters:
            logger.addFilter(_quiet_orbax_errors)
        if not getattr(sys.unraisablehook, "quiets_closed_loop", False):
            sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True, todelete_subdir=TRASH,
            temporary_path_class=_ManifestedPath,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        # Orbax removes the temporary folders of interrupted saves in a background thread. Finish that here:
        # a process that stops right after (a user error such as --resume without a checkpoint) would otherwise
        # exit with the thread still running, and it prints a traceback from the interpreter's shutdown.
        await_cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if await_cleanup is not None:
            await_cleanup()
        self._pending: int | None = None  # the step of the save in flight
        self._empty_trash()  # what a killed process was removing

    def steps(self) -> list[int]:
        """Every step folder Orbax lists (intact or not; see `select`)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def committed_steps(self) -> list[int]:
        """The step folders on disk, from the folder listing alone (no Orbax call: safe from any thread)."""
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def damage(self, step: int) -> str | None:
        """Why checkpoint `step` is damaged, or None if it is intact (checks every file against the manifest)."""
        return damage(self.step_dir(step))

    def newest_intact(self) -> tuple[int | None, list[tuple[int, str]]]:
        """-> (the newest intact step or None, [(step, reason)] of the damaged steps newer than it)."""
        damaged = []
        for step in reversed(self.steps()):
            reason = self.damage(step)
            if reason is None:
                return step, damaged
            damaged.append((step, reason))
        return None, damaged

    def select(self, step: int | None = None, *, set_aside: bool = False, action: str = "using") -> int:
        """The step to load, verified: `step`, or else the newest intact one. Each newer damaged step is reported
        on stderr (`checkpoint step 35 is damaged (<reason>); <action> step 30`) and, with `set_aside`, renamed
        to `<step>.damaged`. A damaged `step`, or no intact step at all, is a UserError."""
        if step is not None:
            if step not in self.steps():
                raise UserError(f"no checkpoint for step {step} in {self.directory}; available: {self.steps()}")
            if reason := self.damage(step):
                raise UserError(f"checkpoint step {step} in {self.directory} is damaged ({reason})")
            return step
        good, damaged = self.newest_intact()
        if good is None:
            if not damaged:
                raise UserError(f"no checkpoint in {self.directory}")
            listing = "; ".join(f"step {s} is damaged ({reason})" for s, reason in damaged)
            raise UserError(f"no intact checkpoint in {self.directory}: {listing}")
        for s, reason in damaged:
            moved = f"; moved it to {self.set_aside(s).name}" if set_aside else ""
            if is_primary():
                print(f"checkpoint step {s} is damaged ({reason}); {action} step {good}{moved}", file=sys.stderr)
        return good

    def set_aside(self, step: int) -> Path:
        """Rename a damaged step folder to `<step>.damaged` (`.damaged-2`, ... if taken); -> the new path."""
        self.wait()
        target = self.directory / f"{step}{DAMAGED}"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}{DAMAGED}-{n}"
        barrier(f"jaxgpt_set_aside_{step}_found")  # every process has looked before process 0 renames
        if is_primary():
            self.step_dir(step).rename(target)
        barrier(f"jaxgpt_set_aside_{step}_renamed")
        self._manager.reload()
        return target

    def save(self, state: TrainState) -> None:
        """Save asynchronously; the step folder appears only once fully written, with its manifest. A failure
        is raised here or by the next `poll`/`wait`/`save` as CheckpointSaveError."""
        self.wait()  # the previous save is committed and the steps it rotated out are removed
        args = ocp.args.Composite(
            state=ocp.args.StandardSave({"params": state.params, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(state.meta),
        )
        self._pending = state.step
        try:
            self._manager.save(state.step, args=args, force=True)
        except Exception as e:
            self._failed(e)

    def poll(self) -> None:
        """Raise the error of a background save that has failed; returns at once while one is running."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is committed (CheckpointSaveError if it failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._failed(e)
        self._pending = None
        self._empty_trash()

    def _failed(self, e: Exception) -> None:
        step, self._pending = self._pending, None
        self.remove_temporary()
        self._manager.reload()
        raise CheckpointSaveError(
            f"saving checkpoint step {step} to {self.directory} failed: {save_error_reason(e)}"
        ) from None

    def remove_temporary(self) -> None:
        """Remove the temporary folders of unfinished saves (call only while no save is in flight; process 0)."""
        if not is_primary():
            return
        for tmp in self.directory.glob(TMP_GLOB):
            shutil.rmtree(tmp, ignore_errors=True)

    def read_meta(self, step: int) -> dict[str, Any]:
        return self._restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore(self, params_like: Any, opt_state_like: Any, step: int) -> TrainState:
        """Restore `step` (see `select`) onto the structure, dtypes and shardings of `params_like`/`opt_state_like`
        (arrays or shape/dtype structures; one without a sharding lands on the first local device, whatever device
        layout saved the checkpoint)."""
        target = jax.tree.map(_restore_target, {"params": params_like, "opt_state": opt_state_like})
        out = self._restore(step, state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        return TrainState(out["state"]["params"], out["state"]["opt_state"], out["meta"])

    def _restore(self, step: int, **items: Any) -> Any:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # a checkpoint that verified, but does not fit this code or the requested model
            line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise UserError(f"checkpoint step {step} in {self.directory} could not be restored: {line}") from None

    def close(self) -> None:
        """Wait for the save in flight (CheckpointSaveError if it failed) and release the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()
            self._empty_trash()

    def _empty_trash(self) -> None:
        """Remove the checkpoints that the manager rotated out (call only while no save is in flight; process 0)."""
        if is_primary():
            shutil.rmtree(self.directory / TRASH, ignore_errors=True)


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
    if path.is_file():
        raise UserError(f"{path} is a file, not a run folder or a checkpoints folder")
    if not path.is_dir():
        raise UserError(f"checkpoint directory {path} does not exist")
    return path


def load_run(path: str | Path, step: int | None = None, mesh: Mesh | None = None) -> tuple[Config, TrainState]:
    """Restore a run's checkpoint (`step`, or the newest intact one; verified first) without building the
    model: -> (config, state). Read only: a damaged newer step is reported on stderr and left where it is.

    Without `mesh` every array lands on the first local device; with one, on that mesh with the training
    layout (sharding.state_shardings: replicated, or FSDP-sharded when the mesh has an fsdp axis > 1)."""
    ckpt = Checkpointer(checkpoint_dir(path))
    try:
        step = ckpt.select(step)
        meta = ckpt.read_meta(step)
        cfg = Config.from_dict(meta["config"])
        try:
            params = abstract_params(cfg)
        except KeyError as e:
            raise UserError(f"checkpoint variant {cfg.variant!r} needs {e}, unknown to this jaxgpt") from None
        opt_state = jax.eval_shape(make_optimizer(cfg).init, params)
        if mesh is not None:
            params, opt_state = (abstract_with_shardings(t, state_shardings(t, mesh)) for t in (params, opt_state))
        state = ckpt.restore(params, opt_state, step)
    finally:
        ckpt.close()
    return cfg, state
