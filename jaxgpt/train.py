"""Train a GPT variant: `python -m jaxgpt.train [--variant NAME] [--config NAME|PATH] [--data DIR] ...`.

With no arguments: the `tiny` preset on the embedded default corpus (prepared on first use), on CPU in a few
minutes. Prints progress lines, the benchmark's `TRAIN_METRICS:` lines at every evaluation and its
`Final metrics (...)` line at the end; writes config.json, metrics.jsonl, loss.png and Orbax checkpoints
into the run folder.

Scales over the GPUs of one host or several: `--mesh` lays the devices out as a (data, fsdp) mesh (default: all on
`data`, plain data parallelism; `--mesh fsdp=4` or `data=2,fsdp=2` shards parameters and optimizer state, see
sharding.py). Over several hosts it runs as one process per host (`--coordinator`, `--num-processes`,
`--process-id`, or SLURM; distributed.py): each process samples only its devices' rows of each batch, the
checkpoints are written by all processes together, and process 0 alone prints and writes the logs, metrics and
plots. A background thread samples and copies the next batches to the devices while a step runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxgpt import distributed
from jaxgpt.checkpoint import Checkpointer, TrainState, make_meta
from jaxgpt.spec.config import (
    MODEL_PRESETS,
    Config,
    apply_overrides,
    available_configs,
    load_config_file,
    parse_set_args,
)
from jaxgpt.data import BatchSampler, ensure_default_corpus
from jaxgpt.data.writer import check_out
from jaxgpt.errors import UserError, cli_main
from jaxgpt.metrics import (
    TENSORBOARD_GLOB,
    MetricsLog,
    TensorBoard,
    device_peak_tflops,
    flops_per_token,
    model_label,
    plot_losses,
)
from jaxgpt.model import init_model, num_params
from jaxgpt.optim import learning_rate, make_optimizer
from jaxgpt.sharding import (
    abstract_with_shardings,
    assemble_batch,
    format_mesh,
    make_mesh,
    state_bytes_per_device,
    state_shardings,
)
from jaxgpt.signals import StopRequest
from jaxgpt.steps import all_finite, init_state, make_eval_step, make_train_step
from jaxgpt.spec.variants import AXES, PRESETS, apply_variant
from jaxgpt.watchdog import Watchdog, WatchdogLimits


class TrainingDiverged(UserError):
    """A loss, a gradient norm or the parameters became non-finite; the run stops without saving and names the
    last checkpoint that verifies."""


class Stopped(Exception):
    """SIGINT or SIGTERM stopped the run after it saved its last step; the process exits with 128 + `signum`."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def run_dir(cfg: Config) -> Path:
    return Path(cfg.out or f"runs/{cfg.variant}-{cfg.model_size}")


class Prefetcher:
    """Iterates (i, fetch(i)) for i in `indices`, in order, computed up to `depth` items ahead by a background
    thread: sampling a batch and its host-to-device copy overlap the step that runs on the devices."""

    _END = object()

    def __init__(self, fetch: Callable[[int], Any], indices: Iterable[int], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(fetch, indices), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _work(self, fetch: Callable[[int], Any], indices: Iterable[int]) -> None:
        try:
            for i in indices:
                if not self._put((i, fetch(i))):
                    return
        except BaseException as e:  # re-raised in the consumer
            self._put(e)
            return
        self._put(self._END)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class Evaluator:
    """Mean plain-CE loss over a fixed set of `eval_iters` batches per split (the same batches every time)."""

    def __init__(self, cfg: Config, data_dir: Path, eval_step, mesh):
        self.cfg, self.eval_step, self.mesh = cfg, eval_step, mesh
        T = cfg.model.block_size
        self.samplers = {s: BatchSampler(data_dir, s, T, vocab_size=cfg.model.vocab_size, seed=cfg.seed + 1)
                         for s in ("train", "val")}

    def __call__(self, params) -> dict[str, float]:
        out = {}
        for split, sampler in self.samplers.items():
            losses = []
            for i in range(self.cfg.eval_iters):
                x, y = assemble_batch(lambda rows: sampler.get(i, self.cfg.batch_size, rows),
                                      (self.cfg.batch_size, self.cfg.model.block_size), self.mesh)
                losses.append(self.eval_step(params, x, y))
            out[split] = float(np.mean(jax.device_get(losses)))
        return out


def train(cfg: Config, resume: bool = False, *, watchdog: WatchdogLimits = WatchdogLimits(),
          peak_tflops: float | None = None) -> dict:
    """Run (or resume) training; returns the final evaluation {'train_loss', 'val_loss', 'step'}.

    Resuming loads the newest checkpoint that verifies (checkpoint.py); newer damaged ones are reported and set
    aside. The run stops with TrainingDiverged when a loss, a gradient norm, a validation loss or the parameters
    become non-finite, with CheckpointSaveError when a save fails, with Stopped after SIGINT/SIGTERM (one save
    first, signals.py), and, through the watchdog thread, with exit code 3 when a step stalls (watchdog.py).
    `peak_tflops` (one device's) turns tokens/s into MFU; by default it comes from metrics.PEAK_TFLOPS.
    In a run of several processes every process calls this; process 0 alone prints and writes the run's files.
    """
    primary = distributed.is_primary()
    out = run_dir(cfg)
    check_out(out, force=True)  # no file in the way (a resumed run's folder holds files)
    data_dir = Path(cfg.data) if cfg.data else ensure_default_corpus()
    T, B, A = cfg.model.block_size, cfg.batch_size, cfg.grad_accum
    mesh = make_mesh(B, cfg.mesh)
    abstract_model = nnx.eval_shape(lambda: init_model(cfg.model, cfg.seed))
    n_params = num_params(abstract_model)
    graphdef, abstract = nnx.split(abstract_model, nnx.Param)
    tx = make_optimizer(cfg)
    abstract_opt = jax.eval_shape(tx.init, abstract)
    param_sh, opt_sh = state_shardings(abstract, mesh), state_shardings(abstract_opt, mesh)
    # both splits are opened (and checked) before anything is written to the run folder
    train_data = BatchSampler(data_dir, "train", T, vocab_size=cfg.model.vocab_size, seed=cfg.seed)
    evaluate = Evaluator(cfg, data_dir, make_eval_step(graphdef, param_sh), mesh)
    if resume and not (out / "checkpoints").is_dir():
        raise UserError(f"nothing to resume: no checkpoint in {out / 'checkpoints'}")
    try:
        ckpt = Checkpointer(out / "checkpoints", keep=cfg.keep_checkpoints)
    except OSError as e:  # the run folder is made here: not writable, or refused by the filesystem
        raise UserError(f"--out {out}: cannot create the run folder ({e.strerror or e})") from None
    if ckpt.steps() and not resume:
        raise UserError(f"{out} already holds checkpoints (steps {ckpt.steps()}); pass --resume to continue it or "
                        "--out NEW_DIR")
    if resume and not ckpt.steps():
        raise UserError(f"nothing to resume: no checkpoint in {ckpt.directory}")

    log = MetricsLog(out / "metrics.jsonl", writes=primary)
    start, records = 0, []
    if resume:
        start = ckpt.select(set_aside=True, action="resuming from")
        saved = Config.from_dict(ckpt.read_meta(start)["config"])
        if saved.model != cfg.model:
            diff = [f"{f.name} {getattr(saved.model, f.name)!r} -> {getattr(cfg.model, f.name)!r}"
                    for f in dataclasses.fields(cfg.model)
                    if getattr(saved.model, f.name) != getattr(cfg.model, f.name)]
            raise UserError(f"--resume: the requested model differs from the checkpoint's in {', '.join(diff)}")
        # restored straight onto this run's layout, whatever mesh saved it
        state = ckpt.restore(abstract_with_shardings(abstract, param_sh), abstract_with_shardings(abstract_opt, opt_sh),
                             start)
        params, opt_state = state.params, state.opt_state
        records = log.truncate_after(start)
        say(f"resumed from {ckpt.directory} at step {start}")
        changed = [f"{k} ({v} -> {getattr(cfg, k)})" for k, v in saved.to_dict().items()
                   if k != "model" and getattr(cfg, k) != v]
        if changed:
            say(f"note: the recipe differs from the checkpoint's in {', '.join(changed)}; "
                "the run continues with the new values (the lr schedule too)")
    else:
        params, opt_state = init_state(cfg.model, cfg.seed, tx, param_sh, opt_sh)
        if primary:
            out.mkdir(parents=True, exist_ok=True)
            log.path.unlink(missing_ok=True)
            for old in out.glob(TENSORBOARD_GLOB):
                old.unlink()
    if primary:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tb = TensorBoard(out, purge_step=start + 1 if resume else None, writes=primary)

    train_step = make_train_step(graphdef, tx, abstract, abstract_opt, param_shardings=param_sh, opt_shardings=opt_sh,
                                 remat=cfg.remat)
    processes = f"{jax.process_count()} processes x " if jax.process_count() > 1 else ""
    say(
        f"{cfg.variant} ({', '.join(f'{a}={getattr(cfg.model, a)}' for a in AXES)}) | {cfg.model_size} "
        f"{n_params / 1e6:.2f}M params | {processes}{mesh.devices.size}x {jax.devices()[0].platform} "
        f"(mesh {format_mesh(dict(mesh.shape))}){' remat' if cfg.remat else ''}, params + optimizer state "
        f"{state_bytes_per_device((params, opt_state)) / 2**20:,.1f} MiB/device | "
        f"{cfg.tokens_per_iter:,} tokens/iter (batch {B} x accum {A} x {T}) | data {data_dir} "
        f"({train_data.n_tokens:,} train tokens) | run {out}"
    )

    p, o = train_step.leaves(params, opt_state)  # the loop's state; trees are rebuilt for evaluation and saving
    del params, opt_state
    saved_step = start  # the newest step saved (or restored) by this process

    def last_verified() -> str:
        ckpt.wait()
        step, _ = ckpt.newest_intact()
        if step is None:
            return f"No verified checkpoint in {ckpt.directory}."
        return f"Last verified checkpoint: step {step} in {ckpt.directory}."

    def save(step: int) -> None:
        nonlocal saved_step
        params, opt_state = train_step.trees(p, o)
        if not bool(all_finite(params)):
            raise TrainingDiverged(f"non-finite parameters at step {step}; not saved. {last_verified()}")
        tb.flush()  # the events up to a checkpoint are on disk with it
        ckpt.save(TrainState(params, opt_state, make_meta(cfg, step, data_dir)))
        saved_step = step

    def run_eval(step: int) -> dict:
        t0 = time.time()
        losses = evaluate(train_step.trees(p, o)[0])
        bad = [f"{'validation' if split == 'val' else split} loss is {v}" for split, v in losses.items()
               if not math.isfinite(v)]
        if bad:
            raise TrainingDiverged(f"{' and '.join(bad)} at step {step}; stopping. {last_verified()}")
        say(f"TRAIN_METRICS: step={step}, train_loss={losses['train']:.4f}, val_loss={losses['val']:.4f}")
        log.write(kind="eval", step=step, train_loss=losses["train"], val_loss=losses["val"], seconds=time.time() - t0)
        tb.scalars("eval", step, {"train_loss": losses["train"], "val_loss": losses["val"]})
        return {"step": step, "train_loss": losses["train"], "val_loss": losses["val"]}

    flops = flops_per_token(cfg.model, n_params)
    peak = (peak_tflops or device_peak_tflops(jax.devices()[0].device_kind) or 0.0) * mesh.devices.size
    t_last, step_last = time.time(), start

    def report(step: int, metrics: dict) -> None:
        """Wait for step `step`, check its loss and gradient norm, and log them at log steps."""
        nonlocal t_last, step_last
        metrics = jax.device_get(metrics)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        for name, value in (("loss", loss), ("grad norm", grad_norm)):
            if not math.isfinite(value):
                raise TrainingDiverged(f"{name} is {value} at step {step}; stopping. {last_verified()}")
        dog.beat(step)
        if step % cfg.log_interval and step != cfg.max_iters and step != start + 1:
            return
        dt = (time.time() - t_last) / max(1, step - step_last)
        t_last, step_last = time.time(), step
        tok_s = cfg.tokens_per_iter / dt
        lr = float(learning_rate(cfg, step - 1))
        say(
            f"step {step:>6}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | grad norm {grad_norm:.3f} | "
            f"{dt * 1e3:.1f} ms/iter | {tok_s / 1e3:.1f}k tok/s" + (" (incl. compile)" if step == start + 1 else ""),
            flush=True,
        )
        values = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "ms_per_iter": dt * 1e3, "tokens_per_s": tok_s,
                  "tflops": tok_s * flops / 1e12}
        if peak:
            values["mfu"] = values["tflops"] / peak
        log.write(kind="train", step=step, **values)
        tb.scalars("train", step, values)

    # a run resumed at its last step has its final evaluation in its records already
    logged = [r for r in records if r.get("kind") == "eval" and r.get("step") == start]
    final = run_eval(0) if start == 0 else (dict(logged[-1]) if logged and start >= cfg.max_iters else None)
    completed = start

    def fetch(step: int) -> tuple[jax.Array, ...]:
        return assemble_batch(lambda rows: train_data.get(step, B * A, rows), (A, B, T), mesh)

    batches = Prefetcher(fetch, range(start, cfg.max_iters))
    dog = Watchdog(watchdog, context=lambda: _on_disk(ckpt))
    stop = StopRequest(abort_note=lambda: _on_disk(ckpt))
    stop_vote = distributed.Vote(mesh)  # processes stop after the same step
    pending = None  # (step, metrics) of the step dispatched last, not reported yet
    try:
        with stop:
            for step, (x, y) in batches:
                p, o, metrics = train_step.jitted(p, o, x, y)
                completed = done = step + 1
                if pending is not None:
                    report(*pending)  # the step before, while this one runs
                pending = (done, metrics)
                evaluate_now = done % cfg.eval_interval == 0 or done == cfg.max_iters
                save_now = done % cfg.checkpoint_every == 0 or done == cfg.max_iters
                if evaluate_now or save_now:
                    report(*pending)
                    pending = None
                    with dog.paused():
                        if evaluate_now:
                            final = run_eval(done)
                            t_last = time.time()
                        if save_now:
                            save(done)
                else:
                    ckpt.poll()  # a failed background save stops the run at the next step
                if stop_vote.cast(stop.requested is not None):
                    if pending is not None:
                        report(*pending)
                        pending = None
                    with dog.paused():
                        if saved_step != done:
                            save(done)
                        ckpt.wait()
                    say(f"\nstopped by {stop.requested or 'a signal to another process'}: saved step {done} to "
                        f"{ckpt.directory}; continue with --resume", flush=True)
                    raise Stopped(stop.signum or signal.SIGTERM)
            if final is None:  # resumed at or past max_iters, without a logged evaluation of that step
                final = run_eval(completed)
    finally:
        batches.close()
        dog.close()
        tb.close()
        ckpt.close()

    if primary:
        plot_losses(log.read(), out / "loss.png", title=f"{cfg.variant} {cfg.model_size}")
    final = {k: final[k] for k in ("step", "train_loss", "val_loss")}
    label = model_label(cfg.model_size)
    say(f"Final metrics ({label}): val_loss_{label}={final['val_loss']:.4f}")
    say(f"run folder: {out} (metrics.jsonl, TensorBoard events, loss.png, checkpoints/)")
    return final


def say(*args: Any, **kwargs: Any) -> None:
    """`print` on process 0; the other processes of a multi-process run print nothing but errors."""
    if distributed.is_primary():
        print(*args, **kwargs)


def _on_disk(ckpt: Checkpointer) -> str:
    """Where the newest committed checkpoint is (from the folder listing: safe from any thread)."""
    steps = ckpt.committed_steps()
    if not steps:
        return f"No checkpoint in {ckpt.directory} yet."
    return f"Last checkpoint: step {steps[-1]} in {ckpt.directory} (continue with --resume)."


def build_config(args: argparse.Namespace) -> Config:
    """The run's config from the command line (defaults, --config, the variant, --set, direct options), checked;
    a bad option or value is a UserError."""
    cfg = Config()
    if args.config:
        cfg = apply_overrides(cfg, load_config_file(args.config), source=f"config {args.config}")
    cfg = apply_variant(cfg, args.variant, **{axis: getattr(args, axis) for axis in AXES})
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UserError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if not args.watchdog_seconds >= 0:
        raise UserError(f"--watchdog-seconds must be >= 0 (0: no watchdog), got {args.watchdog_seconds}")
    sets = parse_set_args(args.set)
    if "variant" in sets:
        raise UserError("--set variant=... would rename the run without changing its model; use --variant NAME")
    cfg = apply_overrides(cfg, sets, source="--set")
    direct = {"data": args.data, "out": args.out, "max_iters": args.max_iters, "mesh": args.mesh}
    cfg = apply_overrides(cfg, {k: v for k, v in direct.items() if v is not None}, source="option")
    if args.max_iters is not None and cfg.warmup_iters > cfg.max_iters and "warmup_iters" not in sets:
        # A short run of a preset (`--max-iters 5`, a smoke test) warms up over all its steps; a warmup the
        # user sets longer than the run is still an error.
        say(f"note: warmup_iters {cfg.warmup_iters} > --max-iters {cfg.max_iters}: warming up over all "
            f"{cfg.max_iters} steps")
        cfg = apply_overrides(cfg, {"warmup_iters": cfg.max_iters}, source="--max-iters")
    return cfg.check_schedule()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxgpt.train",
        description="Train a GPT-2 variant of the MLS-Bench harness (default: tiny preset on the embedded corpus).",
    )
    p.add_argument("--variant", help=f"variant preset: {', '.join(PRESETS)}")
    for axis, choices in AXES.items():
        p.add_argument(f"--{axis}", help=f"{axis} axis: {', '.join(choices)}")
    p.add_argument("--config", help=f"config name in configs/ ({', '.join(available_configs())}) or a .toml path")
    p.add_argument("--data", help="token-shard folder (default: the embedded Shakespeare corpus)")
    p.add_argument("--out", help="run folder (default: runs/<variant>-<model_size>)")
    p.add_argument("--max-iters", type=int, help="number of optimizer steps")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2 or fsdp=-1 (axes data, fsdp; -1: the remaining "
                   "devices; sizes multiply to the visible device count); default: all devices on data")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any recipe key or model.<key>; model_size in {', '.join(MODEL_PRESETS)}")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest intact checkpoint in the run folder (damaged ones are set aside)")
    defaults = WatchdogLimits()
    p.add_argument("--watchdog-seconds", type=float, default=defaults.min_seconds, metavar="S",
                   help="stop a run whose step takes longer than S seconds and --watchdog-factor x the median of "
                   f"the last steps (default {defaults.min_seconds:g}; 0: no watchdog)")
    p.add_argument("--watchdog-factor", type=float, default=defaults.factor, metavar="F",
                   help=f"see --watchdog-seconds (default {defaults.factor:g})")
    p.add_argument("--peak-tflops", type=float, metavar="TF",
                   help="one device's peak TFLOP/s for MFU (default: the bf16 peak of known GPUs; none on CPU)")
    distributed.add_arguments(p)
    return p


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    distributed.initialize(distributed.launch_from(args))
    with distributed.exit_at_once_on_error():
        cfg = build_config(args)
        limits = WatchdogLimits(factor=args.watchdog_factor, min_seconds=args.watchdog_seconds)
        try:
            train(cfg, resume=args.resume, watchdog=limits, peak_tflops=args.peak_tflops)
        except Stopped as e:
            sys.exit(128 + e.signum)


if __name__ == "__main__":
    main()
