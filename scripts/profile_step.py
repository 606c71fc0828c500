"""Where the time of a JAX train step goes: GPU kernel time by kind, from a jax.profiler trace.

    python scripts/profile_step.py --variant baseline --model gpt2-124m --batch 12 [--steps 5] [--out DIR]
    python scripts/profile_step.py --side torch ...     # torch_ref's torch.compile'd step, same table

Traces a few steady-state steps (after compile and warm-up) through the side's `profile` (bench_train: JaxSide's
jax.profiler trace, which also writes the optimized HLO, train_step.hlo.txt, to match kernel names against;
TorchSide's torch.profiler trace of torch_ref's torch.compile'd step, as bench_train times it). Reads the
Chrome-format trace, sums the GPU kernels' durations per step into kinds (matmuls, attention, fusions, reductions,
copies, ...), then prints the 25 costliest kernels. The traced steps are synchronised one by one (as
bench_train's median), so it also reports where a synchronised step's time goes beyond its kernels: from the step
call to the first kernel (host dispatch), first to last kernel, last kernel to the synchronisation's return.
Random tokens, pre-placed on the device, so the loader is not in the numbers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

from bench_train import JaxSide, RunSpec, Side, TorchSide, build_config, random_batches  # scripts/ is on sys.path

from jaxgpt.spec.config import parse_set_args

# First match wins; applied to the lower-cased kernel name.
KINDS = [
    ("attention (cuDNN)", r"cudnn|fmha|flash|sdpa"),
    ("jaxgpt Pallas kernel", r"add_layer_norm|softmax_stats|mosaic_gpu"),  # jaxgpt/ops' named kernels
    ("matmul", r"gemm|xmma|cutlass|cublas|sm90_|wgmma|matmul|dot"),
    ("reduction fusion", r"triton_(red|per)_"),  # torch inductor's generated kernels
    ("elementwise fusion", r"triton_poi_"),
    ("pallas/triton kernel", r"pallas|triton"),
    ("reduction fusion", r"reduce|reduction"),
    ("scatter/gather", r"scatter|gather|dynamic"),
    ("transpose/copy", r"transpose|copy|memcpy|memset|concatenate|pad|slice"),
    ("elementwise fusion", r"fusion|loop|input|convert|multiply|add|select"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "other")


def trace_events(trace_dir: Path, torch: bool = False) -> tuple[list[tuple[str, float, float]], list[float]]:
    """From the trace under trace_dir (the newest jax.profiler perfetto trace, or with `torch` torch.profiler's
    torch_trace.json): (kernel name, start, duration) of every kernel on a GPU stream, and the end times of the
    host's synchronisations (jax's block_until_ready, torch's cudaDeviceSynchronize), all in us."""
    if torch:
        events = json.loads((trace_dir / "torch_trace.json").read_text())["traceEvents"]
        events = [e for e in events if e.get("ph") == "X"]
        return ([(e["name"], float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") == "kernel"],
                sorted(e["ts"] + e["dur"] for e in events if e["name"] == "cudaDeviceSynchronize"))
    path = max(trace_dir.rglob("*.trace.json.gz"), key=lambda p: p.stat().st_mtime, default=None) or max(
        trace_dir.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime
    )
    events = json.loads(gzip.open(path).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {(e["pid"], e.get("tid")): str(e["args"].get("name")) for e in events
             if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name")}
    gpu_pids = {pid for (pid, tid), name in names.items() if tid is None and re.search(r"GPU|device:", name)
                and "host" not in name.lower()}
    # Kernels sit on the device's "Stream #n" lines; other lines (XLA ops/modules) would count them twice.
    streams = {key for key, name in names.items() if key[0] in gpu_pids and key[1] is not None and "Stream" in name}
    print("trace lines used:", sorted(names[k] for k in streams) or sorted(names[(p, None)] for p in gpu_pids))
    events = [e for e in events if e.get("ph") == "X"]
    return ([(e["name"], float(e["ts"]), float(e["dur"])) for e in events if e.get("pid") in gpu_pids
             and (not streams or (e["pid"], e.get("tid")) in streams)],
            sorted(e["ts"] + e["dur"] for e in events if e.get("pid") not in gpu_pids
                   and e["name"].endswith(" block_until_ready")))


def step_latencies(kernels: list[tuple[str, float, float]], syncs: list[float]) -> list[tuple[float, float, float]]:
    """Per synchronised step after the first (its kernels are those between two synchronisations' ends):
    (ms from the previous synchronisation's end, i.e. the step call, to its first kernel; ms from first kernel
    start to last kernel end; ms from the last kernel's end to the synchronisation's end)."""
    out = []
    for begin, end in zip(syncs, syncs[1:]):
        ks = [(ts, ts + dur) for _, ts, dur in kernels if begin < ts < end]
        if ks:
            first, last = min(k[0] for k in ks), max(k[1] for k in ks)
            out.append(((first - begin) / 1e3, (last - first) / 1e3, (end - last) / 1e3))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("jax", "torch"), default="jax", help="torch: torch_ref, torch.compile")
    p.add_argument("--variant", default="baseline")
    p.add_argument("--model", default="gpt2-124m")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe/model overrides")
    p.add_argument("--out", default="/tmp/jaxgpt-profile")
    args = p.parse_args()

    cfg = build_config(RunSpec(args.model, args.batch), args.variant, args.accum, parse_set_args(args.set))
    T, B, A = cfg.model.block_size, cfg.batch_size, cfg.grad_accum
    batches = random_batches(cfg, 4, seed=0)
    side: Side = JaxSide(cfg, *batches, breakdown=False) if args.side == "jax" else \
        TorchSide(cfg, *batches, breakdown=False, compile=True)
    for i in range(3):  # compile + warm-up
        side.sync(side.run("step", i))
    t0 = time.perf_counter()
    for i in range(args.steps):
        out = side.run("step", i)
    side.sync(out)
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3

    out = Path(args.out)
    side.profile(out, args.steps)

    kernels, syncs = trace_events(out, torch=args.side == "torch")
    by_kind, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for name, _, dur in kernels:
        by_kind[kind_of(name)] += dur / args.steps
        by_name[name][0] += dur / args.steps
        by_name[name][1] += 1
    busy = sum(by_kind.values()) / 1e3
    print(f"\n{args.side} {args.variant} {args.model} batch {B}x{A}x{T}: {wall_ms:.2f} ms/step wall (untraced), "
          f"{busy:.2f} ms GPU kernel time/step, {len(kernels) // args.steps} kernels/step")
    latencies = step_latencies(kernels, syncs)
    if latencies:
        start, span, tail = (statistics.median(col) for col in zip(*latencies))
        print(f"synchronised steps (median of {len(latencies)}): step call to first kernel {start:.2f} ms, first to "
              f"last kernel {span:.2f} ms, last kernel to synchronisation's end {tail:.2f} ms")
    print("| kind | ms/step | share |\n| --- | ---: | ---: |")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 1e3:.2f} | {us / 1e3 / busy:.0%} |")
    ranked = [(name, us / 1e3, n / args.steps) for name, (us, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])]
    print("\n| kernel | kind | ms/step | calls/step |\n| --- | --- | ---: | ---: |")
    for name, ms, calls in ranked[:25]:
        print(f"| {name[:90]} | {kind_of(name)} | {ms:.3f} | {calls:.0f} |")
    summary = {"side": args.side, "variant": args.variant, "model": args.model, "batch": B, "accum": A,
               "wall_ms": wall_ms, "gpu_ms": busy, "by_kind_ms": {k: v / 1e3 for k, v in by_kind.items()},
               "synced_steps_ms": [dict(zip(("call_to_first_kernel", "kernels_span", "last_kernel_to_sync"), r))
                                   for r in latencies],
               "kernels": ranked}
    (out / f"profile_{args.side}_{args.variant}_{args.model}_b{B}.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
