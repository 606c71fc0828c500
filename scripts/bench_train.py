"""Training-step throughput, side by side in one process: jaxgpt (JAX) against torch_ref (PyTorch, nanoGPT's recipe).

    python scripts/bench_train.py --runs gpt2-124m:12,gpt2-124m:32,gpt2-345m:16 --breakdown --out bench.json
    python scripts/bench_train.py --runs gpt2-124m:8 --variant gla,gla_conv     # torch: FLA's Triton layers, eager
    python scripts/bench_train.py --runs tiny:2 --steps 2 --warmup 1 --torch-mode eager   # CPU smoke test

A run is `preset:batch[:T]` (preset: a config in configs/ or a model size; T defaults to the block size), done
for each preset of `--variant` (comma-separated, jaxgpt.variants). For each run and side the same model (same
variant, batch, sequence length, grad_accum) trains on random tokens (uniform in [0, 50257)), several batches
rotated and placed on the device beforehand, so the loader is not timed:
- jax: `jaxgpt.steps.make_train_step` with `jaxgpt.optim.make_optimizer`, replicated params (bf16 compute on GPU);
- torch-compile / torch-eager: `torch_ref.train_step.TorchTrainStep` (bf16 autocast, fused AdamW, clip 1.0,
  TF32 allowed), the loss `torch.compile`d or not. `--torch-mode auto` compiles softmax models and runs the
  linear mixers (FLA's Triton layers) eagerly. FLA 0.6.0 refuses Gated DeltaNet's backward on Hopper under Triton
  3.4 to 3.7.0 (its #640); there the guard is lifted for timing only and the rows carry a `note` saying so.
Timing: warm-up steps (compilation) first, then `--steps` steps each synchronised on its own (median, p10-p90),
then the same number back to back with one synchronisation at the end ("pipelined", mean); all of that
`--repeats` times, the sides alternating, so the spread between repeats shows the noise. The pipelined time is
what the training loop (which synchronises only to log) sees; a synchronised median well above it is host
overhead per step. `--breakdown` also times the forward loss and forward+backward of each side. MFU uses
6N + 12LHDT FLOPs per token (`jaxgpt.metrics.flops_per_token`) over a bf16 matmul peak measured in the same
process (`--peak-tflops` to set). `--out` is rewritten after every run, so a run cut off keeps what it measured.

On a multi-GPU host, set CUDA_VISIBLE_DEVICES to one GPU (the JAX step shards the batch over every device).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share the GPU's memory

import argparse
import gc
import json
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.spec.config import (
    Config,
    ModelConfig,
    apply_overrides,
    available_configs,
    load_config_file,
    parse_set_args,
)
from jaxgpt.errors import UserError, cli_main
from jaxgpt.metrics import flops_per_token
from jaxgpt.model import GPT, init_model, num_params
from jaxgpt.optim import make_optimizer
from jaxgpt.steps import make_mesh, make_train_step, replicate, shard_batch
from jaxgpt.spec.variants import LINEAR_MIXERS, apply_variant, linear_mixer_layer

GPT2_VOCAB = 50257  # random tokens are drawn from the real vocabulary, not the padded one
PHASES = ("fwd", "fwd+bwd", "step")
FLOPS_FRACTION = {"fwd": 1 / 3, "fwd+bwd": 1.0, "step": 1.0}  # of the 6N + 12LHDT training FLOPs


@dataclass(frozen=True)
class RunSpec:
    """One benchmark configuration from `--runs`: preset:batch[:T]."""

    preset: str
    batch: int
    seq_len: int | None = None

    @property
    def label(self) -> str:
        return f"{self.preset}:{self.batch}" + (f":{self.seq_len}" if self.seq_len else "")


def parse_runs(text: str) -> list[RunSpec]:
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[1:]):
            raise UserError(f"--runs expects preset:batch[:T] items, got {item!r}")
        specs.append(RunSpec(parts[0], *(int(p) for p in parts[1:])))
    if not specs:
        raise UserError("--runs is empty")
    return specs


def build_config(spec: RunSpec, variant: str, accum: int, overrides: dict[str, str]) -> Config:
    """The recipe of configs/<preset>.toml (or the bare model size) with the variant, batch, accum and overrides."""
    cfg = Config()
    if spec.preset in available_configs():
        cfg = apply_overrides(cfg, load_config_file(spec.preset), source=f"config {spec.preset}")
    else:
        cfg = apply_overrides(cfg, {"model_size": spec.preset})
    cfg = apply_variant(cfg, variant)
    shape = {"batch_size": spec.batch, "grad_accum": accum}
    if spec.seq_len:
        shape["model.block_size"] = spec.seq_len
    return apply_overrides(cfg, {**shape, **overrides}, source="--set")


def random_batches(cfg: Config, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n batches of inputs and targets, [n, A, B, T] int32 each, uniform over the GPT-2 vocabulary."""
    rng = np.random.default_rng(seed)
    shape = (n, cfg.grad_accum, cfg.batch_size, cfg.model.block_size)
    return rng.integers(0, GPT2_VOCAB, shape, dtype=np.int32), rng.integers(0, GPT2_VOCAB, shape, dtype=np.int32)


class JaxSide:
    """jaxgpt's train step (params replicated, batch [A, B, T] sharded over B) and, for breakdowns, its parts."""

    name = "jax"

    def __init__(self, cfg: Config, x: np.ndarray, y: np.ndarray, breakdown: bool):
        mesh = make_mesh(cfg.batch_size)
        graphdef, params = nnx.split(init_model(cfg.model, cfg.seed), nnx.Param)
        tx = make_optimizer(cfg)
        opt_state = tx.init(params)
        self.train_step = make_train_step(graphdef, tx, params, opt_state)
        self.p, self.o = self.train_step.leaves(replicate(params, mesh), replicate(opt_state, mesh))  # as train.py
        self.x = [shard_batch(b, mesh) for b in x]
        self.y = [shard_batch(b, mesh) for b in y]
        self.phases: tuple[str, ...] = PHASES if breakdown else ("step",)

        def loss_fn(p: list, x: jax.Array, y: jax.Array) -> jax.Array:  # p: the params' leaves; x, y [B, T]
            return nnx.merge(graphdef, self.train_step.params_def.unflatten(p)).loss(x, y, train=True)

        self.loss = jax.jit(loss_fn)
        self.loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))

    def run(self, phase: str, i: int) -> jax.Array:
        """Run `phase` on rotated batch i; returns one output of the last executable (all its outputs are
        ready together, so blocking on it waits for the whole computation)."""
        x, y = self.x[i % len(self.x)], self.y[i % len(self.y)]
        if phase == "step":
            self.p, self.o, metrics = self.train_step.jitted(self.p, self.o, x, y)
            return metrics["loss"]
        fn = self.loss if phase == "fwd" else lambda *a: self.loss_and_grad(*a)[0]
        return [fn(self.p, xa, ya) for xa, ya in zip(x, y)][-1]  # micro-batch by micro-batch, like torch

    def sync(self, out: jax.Array) -> None:
        jax.block_until_ready(out)

    def profile(self, directory: Path, steps: int) -> None:
        """A jax.profiler trace of `steps` train steps, and the optimized HLO of the step."""
        directory.mkdir(parents=True, exist_ok=True)
        compiled = self.train_step.jitted.lower(self.p, self.o, self.x[0], self.y[0]).compile()
        (directory / "train_step.hlo.txt").write_text(compiled.as_text())
        with jax.profiler.trace(str(directory), create_perfetto_trace=True):
            for i in range(steps):
                self.sync(self.run("step", i))


def uses_gated_delta_rule(model: ModelConfig) -> bool:
    """Whether any layer of the model is Gated DeltaNet (FLA's gated delta rule)."""
    return model.mixer in LINEAR_MIXERS and any(
        linear_mixer_layer(model.mixer, layer, model.n_layer)[0] == "gated_deltanet" for layer in range(model.n_layer))


class TorchSide:
    """torch_ref's model with TorchTrainStep (nanoGPT's recipe), compiled or eager, and its parts."""

    def __init__(self, cfg: Config, x: np.ndarray, y: np.ndarray, breakdown: bool, compile: bool):
        import torch

        from torch_ref.model import build_model
        from torch_ref.train_step import TorchTrainStep, allow_tf32

        self.name = "torch-compile" if compile else "torch-eager"
        self.cuda = torch.cuda.is_available()
        self.note = None
        if self.cuda and uses_gated_delta_rule(cfg.model):
            from fla_guard import lift_fla_hopper_guard  # scripts/ is on sys.path

            self.note = lift_fla_hopper_guard()
        device = "cuda" if self.cuda else "cpu"
        allow_tf32()
        if compile:
            torch._dynamo.reset()  # a fresh cache per model: guards on each new model would hit the recompile limit
        self.step = TorchTrainStep(build_model(cfg.model, cfg.seed).to(device), cfg, compile=compile)
        self.x = torch.from_numpy(x).long().to(device)  # [n, A, B, T]
        self.y = torch.from_numpy(y).long().to(device)
        self.phases: tuple[str, ...] = PHASES if breakdown else ("step",)

    def run(self, phase: str, i: int) -> Any:
        x, y = self.x[i % len(self.x)], self.y[i % len(self.y)]
        if phase == "fwd":
            return self.step.forward(x, y)
        if phase == "fwd+bwd":
            loss = self.step.forward_backward(x, y)
            self.step.zero_grad()
            return loss
        return self.step(x, y)

    def sync(self, out: Any) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def profile(self, directory: Path, steps: int) -> None:
        """A torch.profiler trace of `steps` train steps, as directory/torch_trace.json."""
        from torch.profiler import ProfilerActivity, profile

        directory.mkdir(parents=True, exist_ok=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                self.sync(self.run("step", i))
        prof.export_chrome_trace(str(directory / "torch_trace.json"))

    def close(self) -> None:
        del self.step, self.x, self.y
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()


Side = JaxSide | TorchSide


@dataclass
class Repeat:
    """One timing pass of one phase: `step_ms` each synchronised, then `pipelined_ms` (mean, back to back)."""

    step_ms: list[float]
    pipelined_ms: float


def time_phase(side: Side, phase: str, steps: int, offset: int) -> Repeat:
    """Time `steps` runs of `phase` on batches offset, offset+1, ...; the device is idle on entry (every
    warm-up step and timing pass ends synchronised)."""
    step_ms = []
    for i in range(steps):
        t0 = time.perf_counter()
        side.sync(side.run(phase, offset + i))
        step_ms.append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    out = None
    for i in range(steps):
        out = side.run(phase, offset + i)
    side.sync(out)
    return Repeat(step_ms, (time.perf_counter() - t0) * 1e3 / steps)


def warm_up(side: Side, steps: int) -> float:
    """Run each phase `steps` times (the first compiles); returns the first step call's seconds, compile included."""
    first = 0.0
    for phase in reversed(side.phases):  # the step first: its compile time is the one reported
        for i in range(steps):
            t0 = time.perf_counter()
            side.sync(side.run(phase, i))
            if phase == "step" and i == 0:
                first = time.perf_counter() - t0
    return first


@dataclass
class SideResult:
    side: str
    first_step_s: float | None = None
    timings: dict[str, list[Repeat]] = field(default_factory=dict)
    error: str | None = None
    note: str | None = None  # what the rows of this side must be read with


def measure_peak_tflops(matmul_size: int | None) -> dict[str, Any]:
    """Median rate of an n x n x n matmul on random data: bf16 through torch on a CUDA GPU, else through JAX
    (bf16 on an accelerator, fp32 on CPU). n defaults to 8192 on an accelerator, 512 on CPU."""
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    on_cpu = not cuda and jax.default_backend() == "cpu"
    n, reps = matmul_size or (512 if on_cpu else 8192), 10
    times = []
    if cuda:
        a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        source = f"torch bf16 {n}^3 matmul on {torch.cuda.get_device_name(0)}"
    else:
        dtype = jnp.float32 if on_cpu else jnp.bfloat16
        ka, kb = jax.random.split(jax.random.key(0))
        a, b = (jax.random.normal(k, (n, n), dtype) for k in (ka, kb))
        matmul = jax.jit(jnp.matmul)
        for _ in range(3):
            matmul(a, b).block_until_ready()
        for _ in range(reps):
            t0 = time.perf_counter()
            matmul(a, b).block_until_ready()
            times.append(time.perf_counter() - t0)
        source = f"jax {jnp.dtype(dtype).name} {n}^3 matmul on {jax.devices()[0].device_kind}"
    seconds = float(np.median(times))
    return {"tflops": 2 * n**3 / seconds / 1e12, "source": f"{source}, median of {reps}", "measured": True}


def environment() -> dict[str, Any]:
    env = {"python": platform.python_version(), "jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()]}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        env["torch"] = None
    from importlib.metadata import PackageNotFoundError, version

    # mamba_ssm: FLA's Mamba2 runs its kernels when it is installed, its PyTorch path torch_forward otherwise
    for key, package in (("fla", "fla-core"), ("mamba_ssm", "mamba_ssm"), ("causal_conv1d", "causal_conv1d")):
        try:
            env[key] = version(package)
        except PackageNotFoundError:
            env[key] = None
    return env


def torch_modes(mode: str, cfg: Config) -> list[bool]:
    """`--torch-mode` -> the compile flags of the torch sides to run."""
    if mode == "auto":
        return [cfg.model.mixer not in LINEAR_MIXERS]
    return {"compile": [True], "eager": [False], "both": [True, False]}[mode]


def bench_run(spec: RunSpec, variant: str, args: argparse.Namespace,
              overrides: dict[str, str]) -> tuple[Config, int, list[SideResult]]:
    """Warm up and time every side of one run of `variant`, alternating sides over the repeats."""
    cfg = build_config(spec, variant, args.accum, overrides)
    n_params = num_params(nnx.eval_shape(lambda: GPT(cfg.model, nnx.Rngs(0))))
    x, y = random_batches(cfg, args.batches, args.seed)
    tag = f"[{spec.label} {variant}]"
    results: list[SideResult] = []
    sides: list[tuple[Side, SideResult]] = []

    def attempt(result: SideResult, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one side failing must not lose the other's numbers
            traceback.print_exc()
            result.error = f"{what}: {type(e).__name__}: {e}"[:2000]
            print(f"{tag} {result.side}: FAILED in {what}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            return None

    factories: list[tuple[str, Callable[[], Side]]] = []
    if "jax" in args.sides:
        factories.append(("jax", lambda: JaxSide(cfg, x, y, args.breakdown)))
    if "torch" in args.sides:
        for compile in torch_modes(args.torch_mode, cfg):
            name = "torch-compile" if compile else "torch-eager"
            factories.append((name, lambda c=compile: TorchSide(cfg, x, y, args.breakdown, c)))
    for name, factory in factories:
        result = SideResult(name)
        results.append(result)
        print(f"{tag} {name}: building and warming up ({args.warmup} steps per phase)", flush=True)
        side = attempt(result, "setup", factory)
        if side is None:
            continue
        first = attempt(result, "warm-up", lambda: warm_up(side, args.warmup))
        if first is None:
            if isinstance(side, TorchSide):
                side.close()  # give its memory back to the other sides
            continue
        result.first_step_s = first
        result.note = getattr(side, "note", None)
        print(f"{tag} {name}: first step {first:.1f} s (compile included)", flush=True)
        sides.append((side, result))

    for rep in range(args.repeats):
        for side, result in sides:
            if result.error:
                continue
            for phase in side.phases:
                timing = attempt(result, f"{phase} repeat {rep + 1}",
                                 lambda: time_phase(side, phase, args.steps, args.warmup + rep * args.steps))
                if timing is None:
                    break
                result.timings.setdefault(phase, []).append(timing)
                print(f"{tag} {side.name} {phase} repeat {rep + 1}: median {np.median(timing.step_ms):.2f} ms, "
                      f"pipelined {timing.pipelined_ms:.2f} ms", flush=True)

    if args.profile and sides and isinstance(sides[0][0], JaxSide) and not sides[0][1].error:
        directory = Path(args.profile) / f"{spec.label.replace(':', '_')}_{variant}"
        attempt(sides[0][1], "profile", lambda: sides[0][0].profile(directory, 3))
        print(f"{tag} jax trace and HLO in {directory}", flush=True)
    for side, _ in sides:
        if isinstance(side, TorchSide):
            side.close()
    sides.clear()  # drop the sides (and their device memory) before the next run
    gc.collect()
    return cfg, n_params, results


def summarise(repeats: list[Repeat]) -> dict[str, Any]:
    samples = [t for r in repeats for t in r.step_ms]
    return {
        "median_ms": float(np.median(samples)),
        "p10_ms": float(np.percentile(samples, 10)),
        "p90_ms": float(np.percentile(samples, 90)),
        "repeat_median_ms": [float(np.median(r.step_ms)) for r in repeats],
        "pipelined_ms": [r.pipelined_ms for r in repeats],
        "step_ms": [r.step_ms for r in repeats],
    }


def make_rows(spec: RunSpec, cfg: Config, n_params: int, results: list[SideResult], variant: str,
              peak_tflops: float) -> list[dict[str, Any]]:
    """One row per side and phase; torch rows carry jax tok/s over their tok/s for the same phase."""
    tokens = cfg.grad_accum * cfg.batch_size * cfg.model.block_size
    fpt = flops_per_token(cfg.model, n_params)
    base = {"model": spec.preset, "variant": variant, "batch": cfg.batch_size, "accum": cfg.grad_accum,
            "T": cfg.model.block_size, "tokens_per_step": tokens, "n_params": n_params, "flops_per_token": fpt}
    rows = []
    for r in results:
        phases = list(r.timings) or ["step"]
        for phase in phases:
            row = {**base, "side": r.side, "phase": phase, "first_step_s": r.first_step_s, "error": r.error,
                   "note": r.note}
            if phase in r.timings:
                stats = summarise(r.timings[phase])
                tok_s = tokens / (stats["median_ms"] / 1e3)
                row |= stats | {"tokens_per_s": tok_s, "mfu": tok_s * fpt * FLOPS_FRACTION[phase] / (peak_tflops * 1e12)}
            rows.append(row)
    jax_tok = {row["phase"]: row["tokens_per_s"] for row in rows if row["side"] == "jax" and "tokens_per_s" in row}
    for row in rows:
        if row["side"] != "jax" and "tokens_per_s" in row and row["phase"] in jax_tok:
            row["ratio_jax_over_torch"] = jax_tok[row["phase"]] / row["tokens_per_s"]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ["model", "variant", "batch", "T", "side", "phase", "ms/step (median)", "p10-p90", "repeats",
              "pipelined", "tokens/s", "MFU", "jax/torch tok/s"]
    lines = [header]
    for r in rows:
        batch = f"{r['batch']}x{r['accum']}" if r["accum"] > 1 else str(r["batch"])
        ident = [r["model"], r["variant"], batch, str(r["T"]), r["side"], r["phase"]]
        if "median_ms" not in r:
            lines.append(ident + [f"FAILED: {r['error'][:60]}"] + [""] * 6)
            continue
        ratio = r.get("ratio_jax_over_torch")
        lines.append(ident + [
            f"{r['median_ms']:.2f}",
            f"{r['p10_ms']:.2f}-{r['p90_ms']:.2f}",
            " / ".join(f"{m:.2f}" for m in r["repeat_median_ms"]),
            " / ".join(f"{m:.2f}" for m in r["pipelined_ms"]),
            f"{r['tokens_per_s'] / 1e3:.1f}k",
            f"{100 * r['mfu']:.1f}%",
            f"{ratio:.3f}" if ratio else "-",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def format_breakdown(rows: list[dict[str, Any]]) -> str:
    """Per side: forward, backward (= fwd+bwd - fwd) and optimizer and the rest (= step - fwd+bwd), in ms."""
    by_side: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if "median_ms" in r:
            by_side.setdefault((r["model"], r["variant"], r["batch"], r["T"], r["side"]), {})[r["phase"]] = r["median_ms"]
    lines = ["model | variant | batch | T | side | fwd ms | bwd ms | optimizer+rest ms | step ms"]
    for key, ms in by_side.items():
        if set(PHASES) <= set(ms):
            lines.append(" | ".join(map(str, key)) + f" | {ms['fwd']:.2f} | {ms['fwd+bwd'] - ms['fwd']:.2f} | "
                         f"{ms['step'] - ms['fwd+bwd']:.2f} | {ms['step']:.2f}")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/bench_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="gpt2-124m:12", help="comma-separated preset:batch[:T] (default gpt2-124m:12)")
    p.add_argument("--variant", default="baseline", help="comma-separated presets of jaxgpt.variants (default baseline)")
    p.add_argument("--sides", default="jax,torch", help="comma-separated subset of jax,torch")
    p.add_argument("--torch-mode", default="auto", choices=["auto", "compile", "eager", "both"],
                   help="auto: compile softmax models, eager for linear mixers (FLA's Triton layers)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (grad_accum)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per phase and repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per phase before timing (compile)")
    p.add_argument("--repeats", type=int, default=2, help="timing passes per side, alternating sides")
    p.add_argument("--batches", type=int, default=4, help="distinct random batches rotated through")
    p.add_argument("--breakdown", action="store_true", help="also time forward and forward+backward")
    p.add_argument("--peak-tflops", type=float, help="peak for MFU instead of measuring a bf16 matmul")
    p.add_argument("--peak-size", type=int, help="matmul size for the peak (default 8192 on a GPU, 512 on CPU)")
    p.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace and the step's HLO per run to DIR")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe/model override")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE", help="write all results as JSON")
    return p


@cli_main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    args.sides = {s.strip() for s in args.sides.split(",") if s.strip()}
    if not args.sides or args.sides - {"jax", "torch"}:
        raise UserError(f"--sides takes jax and/or torch, got {','.join(sorted(args.sides))}")
    if min(args.steps, args.warmup, args.repeats, args.batches, args.accum) < 1:
        raise UserError("--steps, --warmup, --repeats, --batches and --accum must be >= 1")
    specs = parse_runs(args.runs)
    variants = [v.strip() for v in args.variant.split(",") if v.strip()]
    overrides = parse_set_args(args.set)
    for spec in specs:  # fail on a bad run or variant before any compile
        for variant in variants:
            build_config(spec, variant, args.accum, overrides)

    env = environment()
    print(f"environment: {env}", flush=True)
    if args.peak_tflops:
        peak = {"tflops": args.peak_tflops, "source": "--peak-tflops", "measured": False}
    else:
        peak = measure_peak_tflops(args.peak_size)
    print(f"peak: {peak['tflops']:.1f} TFLOP/s ({peak['source']})", flush=True)

    report = {"argv": argv, "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
              "environment": env, "peak": peak, "rows": []}
    for spec in specs:
        for variant in variants:
            cfg, n_params, results = bench_run(spec, variant, args, overrides)
            report["rows"] += make_rows(spec, cfg, n_params, results, variant, peak["tflops"])
            if args.out:  # after every run, so a call cut off by its time limit keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    rows = report["rows"]
    if args.breakdown:
        print("\nwhere the time goes (medians):\n" + format_breakdown(rows))
    print(f"\npeak {peak['tflops']:.1f} TFLOP/s ({peak['source']}); repeats and pipelined: per repeat, "
          "pipelined = mean of back-to-back steps\n" + format_table(rows), flush=True)
    for note in dict.fromkeys(f"{r['variant']} {r['side']}: {r['note']}" for r in rows if r.get("note")):
        print(f"note: {note}", flush=True)
    return report


if __name__ == "__main__":
    main()
