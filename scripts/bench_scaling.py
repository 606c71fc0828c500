"""Multi-device scaling of the JAX train step at a fixed per-device batch (synthetic tokens, no data files).

    python scripts/bench_scaling.py --model gpt2-124m --per-device-batch 12            # 1, 2, 4, ... devices
    python scripts/bench_scaling.py --model gpt2-1.5b --per-device-batch 8 --mesh-kind fsdp --devices 4

For each device count n (the first n of jax.devices()) the step of jaxgpt.steps runs on a mesh `data=n`
(data parallel, replicated params) or `fsdp=n` (params and optimizer state sharded), each count in a fresh
subprocess so that compile caches and the peak-memory counter start clean. Reported: median ms/step over
`--steps` timed steps after `--warmup` (each step waited for with block_until_ready), tokens/s, scaling
efficiency tok/s(n) / ((n / n0) * tok/s(n0)) against the smallest count n0 run (n0 = 1 by default), the model
TFLOP/s per device (tok/s x `jaxgpt.metrics.flops_per_token` / n; divide by the bf16 peak for MFU), the peak
memory per device (max over the devices used, from device.memory_stats(); '-' where the backend has none) and
the collectives in the compiled step (all-gather / reduce-scatter / all-reduce). Each worker reports its progress
(initialisation, compile time) on stderr as it goes: compiling a large model takes minutes. CPU smoke test:

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python scripts/bench_scaling.py --model tiny --per-device-batch 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxgpt.spec.config import MODEL_PRESETS, Config, apply_overrides, parse_set_args  # noqa: E402

RESULT = "BENCH_RESULT "
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce")


def count_collectives(hlo: str) -> dict[str, int]:
    """Collective ops in optimized HLO text (sync `op(` or async `op-start(` forms)."""
    return {op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def progress(n: int, message: str) -> None:
    """A worker's progress line, on stderr (passed through to the terminal while stdout carries the result)."""
    print(f"  [{n} devices] {message}", file=sys.stderr, flush=True)


def measure(args: argparse.Namespace, n: int) -> dict:
    """Time the train step on the first n devices; -> one result record."""
    # JAX is imported by the measuring processes only: a backend started in the parent would hold GPU memory
    import jax
    import numpy as np
    from flax import nnx

    from jaxgpt.metrics import flops_per_token
    from jaxgpt.model import init_model, num_params
    from jaxgpt.optim import make_optimizer
    from jaxgpt.sharding import batch_sharding, make_mesh, state_shardings
    from jaxgpt.steps import init_state, make_train_step

    devices = jax.devices()[:n]
    if len(devices) < n:
        raise SystemExit(f"{n} devices requested, {len(devices)} visible")
    cfg = apply_overrides(Config(), {
        "model_size": args.model, "batch_size": args.per_device_batch * n, "grad_accum": args.grad_accum,
        "model.dtype": args.dtype, "remat": args.remat, "max_iters": 10_000, "warmup_iters": 100,
        **parse_set_args(args.set),
    })
    A, B, T = cfg.grad_accum, cfg.batch_size, cfg.model.block_size
    mesh = make_mesh(B, f"{args.mesh_kind}={n}", devices)
    abstract_model = nnx.eval_shape(lambda: init_model(cfg.model, cfg.seed))
    graphdef, abstract = nnx.split(abstract_model, nnx.Param)
    tx = make_optimizer(cfg)
    param_sh = state_shardings(abstract, mesh)
    opt_sh = state_shardings(jax.eval_shape(tx.init, abstract), mesh)
    t0 = time.perf_counter()
    params, opt_state = init_state(cfg.model, cfg.seed, tx, param_sh, opt_sh)
    jax.block_until_ready((params, opt_state))
    progress(n, f"mesh {dict(mesh.shape)}, params and optimizer state initialised ({time.perf_counter() - t0:.0f} s); "
                "compiling the step")

    tokens = np.random.default_rng(0).integers(0, 50257, size=(A, B, T + 1), dtype=np.int32)
    x, y = (jax.device_put(a, batch_sharding(mesh, 3)) for a in (tokens[..., :-1], tokens[..., 1:]))
    t0 = time.perf_counter()
    step = make_train_step(graphdef, tx, params, opt_state, param_shardings=param_sh, opt_shardings=opt_sh,
                           remat=cfg.remat)
    p, o = step.leaves(params, opt_state)
    compiled = step.jitted.lower(p, o, x, y).compile()
    compile_s = time.perf_counter() - t0
    progress(n, f"compiled in {compile_s:.0f} s; {args.warmup} warm-up + {args.steps} timed steps")
    for _ in range(args.warmup):
        p, o, metrics = compiled(p, o, x, y)
    jax.block_until_ready((p, o, metrics))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        p, o, metrics = compiled(p, o, x, y)
        jax.block_until_ready((p, o, metrics))
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    tokens_per_s = A * B * T / (ms / 1e3)
    n_params = num_params(abstract_model)
    stats = [d.memory_stats() or {} for d in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return {
        "devices": n, "mesh": f"data={mesh.shape['data']},fsdp={mesh.shape['fsdp']}", "model": args.model,
        "params": n_params, "per_device_batch": args.per_device_batch, "global_batch": B,
        "grad_accum": A, "block_size": T, "remat": cfg.remat, "ms_per_step": ms,
        "ms_per_step_min": min(times) * 1e3, "tokens_per_s": tokens_per_s,
        "model_tflops_per_device": tokens_per_s * flops_per_token(cfg.model, n_params) / n / 1e12,
        "peak_bytes_per_device": max(peaks) if peaks else None, "compile_s": compile_s,
        "collectives": count_collectives(compiled.as_text()), "loss": float(metrics["loss"]),
        "platform": devices[0].platform, "device_kind": devices[0].device_kind,
    }


def device_counts(spec: str | None) -> list[int]:
    if spec:
        return [int(s) for s in spec.split(",")]
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"], capture_output=True,
                         text=True, check=True).stdout
    visible = int(out.split()[-1])
    counts = [1 << i for i in range(visible.bit_length()) if 1 << i <= visible]
    return counts + ([visible] if counts[-1] != visible else [])


def run_one(argv: list[str], n: int) -> dict:
    """Measure n devices in a fresh process of this script."""
    p = subprocess.run([sys.executable, __file__, *argv, "--worker", str(n)], stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(RESULT)]
    if p.returncode or not lines:  # the worker's stderr (progress, traceback) has already been printed
        raise SystemExit(f"the {n}-device run failed (rc {p.returncode}):\n{p.stdout[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT))


def table(results: list[dict]) -> str:
    base = results[0]
    rows = ["devices  mesh              global batch   ms/step      tok/s   efficiency  TFLOP/s/dev  "
            "peak mem/device  all-gather/reduce-scatter/all-reduce"]
    for r in results:
        eff = r["tokens_per_s"] / (r["devices"] / base["devices"] * base["tokens_per_s"])
        r["scaling_efficiency"] = eff
        mem = "-" if r["peak_bytes_per_device"] is None else f"{r['peak_bytes_per_device'] / 2**30:.2f} GiB"
        coll = "/".join(str(r["collectives"][op]) for op in COLLECTIVES)
        rows.append(f"{r['devices']:>7}  {r['mesh']:<16}  {r['global_batch']:>5} x {r['grad_accum']:<4}  "
                    f"{r['ms_per_step']:>8.2f}  {r['tokens_per_s']:>9,.0f}  {eff:>10.1%}  "
                    f"{r['model_tflops_per_device']:>11.1f}  {mem:>15}  {coll}")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2-124m", choices=list(MODEL_PRESETS))
    p.add_argument("--per-device-batch", type=int, default=12, help="sequences per device per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--devices", help="comma-separated device counts (default: 1, 2, 4, ... and all visible)")
    p.add_argument("--mesh-kind", choices=["data", "fsdp"], default="data",
                   help="data: replicated params (data parallel); fsdp: params and optimizer state sharded")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe or model.<key> override, e.g. model.block_size=2048 or model.mixer=gla")
    p.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.worker:
        print(RESULT + json.dumps(measure(args, args.worker)), flush=True)
        return
    counts = device_counts(args.devices)
    print(f"{args.model}, {args.per_device_batch} sequences/device x accum {args.grad_accum}, mesh kind "
          f"{args.mesh_kind}; device counts {counts}", flush=True)
    results = []
    for n in counts:
        results.append(run_one(argv, n))
        r = results[-1]
        print(f"  {n}x {r['device_kind']}: {r['ms_per_step']:.2f} ms/step (compile {r['compile_s']:.0f} s, "
              f"loss {r['loss']:.3f})", flush=True)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
