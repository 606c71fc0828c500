"""One device call for the DeltaNet kernels (docs/kernels-deltanet.md): bf16 parity of chunk_delta_rule (JAX
backends vs FLA 0.6.0's Triton `chunk_delta_rule` vs an fp32 JAX reference) and fwd+bwd timings of the op and of the
DeltaNet layer, JAX beside FLA in one process. Results go to $OUT/delta_rule.json; a short table is printed last.

    python3 scripts/device_delta_rule.py [--budget SECONDS] [--steps PREFIX,...]
"""

import argparse
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from jaxgpt.ops.delta_rule.chunk import chunk_delta_rule  # noqa: E402
from jaxgpt.ops.delta_rule.pallas import chunk_delta_rule_pallas  # noqa: E402

FWD_TOL, GRAD_TOL, NOISE_FACTOR, ACCURACY_FACTOR = 4e-3, 8e-3, 1.5, 1.25  # parity_tests/test_gpu_parity.py
TIMING_SHAPES = [(8, 1024, 12, 64), (2, 4096, 16, 64), (1, 16384, 16, 128)]  # (B, T, H, D)
RAGGED_SHAPES = [(2, 1000, 4, 64), (2, 65, 4, 64), (2, 1, 4, 64)]
NAMES = ["o", "dq", "dk", "dv", "dbeta"]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(B, T, H, D, seed=0):
    """bf16 q, k, v (normal), beta (sigmoid of normal), do; as numpy fp32 holding bf16-representable values."""
    rng = np.random.default_rng(seed)
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)  # noqa: E731
    q, k, v, do = (bf(rng.standard_normal((B, T, H, D), np.float32)) for _ in range(4))
    beta = bf(1 / (1 + np.exp(-rng.standard_normal((B, T, H), np.float32))))
    return q, k, v, beta, do


def jax_fwd_bwd(op):
    """jit (q, k, v, beta, do) -> (o, dq, dk, dv, dbeta) for op(q, k, v, beta) -> o."""

    @jax.jit
    def run(q, k, v, beta, do):
        o, vjp = jax.vjp(op, q, k, v, beta)
        return (o, *vjp(do.astype(o.dtype)))

    return run


def jax_ops(block_v=None):
    ops = {
        "jax_xla": lambda q, k, v, b: chunk_delta_rule(q, k, v, b, use_qk_l2norm_in_kernel=True, backend="xla")[0],
        "jax_pallas": lambda q, k, v, b: chunk_delta_rule_pallas(q, k, v, b, q.shape[-1] ** -0.5, None, False, True,
                                                                 64, block_v)[0],
    }
    return ops


def time_jax(fn, args, min_time=0.25) -> float:
    """Median ms per call (after compile and warm-up) over 5 trials of back-to-back calls."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    reps = max(2, min(50, int(min_time / max(time.perf_counter() - t, 1e-5))))
    trials = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        trials.append((time.perf_counter() - t) / reps * 1e3)
    return statistics.median(trials)


def time_torch(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def fla_op_fwd_bwd(q, k, v, beta, do, h0=None, dht=None):
    """FLA's bf16 chunk_delta_rule: a closure doing fwd+bwd, and its outputs (o, dq, dk, dv, dbeta[, dh0, ht])."""
    from fla.ops.delta_rule import chunk_delta_rule as fla_chunk

    t = [torch.tensor(x, device="cuda", dtype=torch.bfloat16, requires_grad=True) for x in (q, k, v, beta)]
    tdo = torch.tensor(do, device="cuda", dtype=torch.bfloat16)
    extra = []
    if h0 is not None:
        extra = [torch.tensor(h0, device="cuda", requires_grad=True)]
        tdht = torch.tensor(dht, device="cuda")

    def run():
        o, ht = fla_chunk(*t, initial_state=extra[0] if extra else None, output_final_state=bool(extra),
                          use_qk_l2norm_in_kernel=True)
        loss_terms = [(o, tdo)] + ([(ht, tdht)] if extra else [])
        grads = torch.autograd.grad([a for a, _ in loss_terms], t + extra, [g for _, g in loss_terms])
        return o, ht, grads

    o, ht, grads = run()
    outs = [o] + list(grads[:4]) + (list(grads[4:]) + [ht] if extra else [])
    return run, [x.detach().float().cpu().numpy() for x in outs]


def op_parity(results, shape, with_h0=False):
    """Errors of JAX pallas / xla (bf16) and FLA (bf16) against the fp32 JAX reference, and JAX vs FLA."""
    B, T, H, D = shape
    q, k, v, beta, do = inputs(*shape, seed=T)
    rng = np.random.default_rng(1)
    h0 = rng.standard_normal((B, H, D, D), np.float32) if with_h0 else None
    dht = rng.standard_normal((B, H, D, D), np.float32) if with_h0 else None
    names = NAMES + (["dh0", "ht"] if with_h0 else [])
    _, fla = fla_op_fwd_bwd(q, k, v, beta, do, h0, dht)

    def run_jax(backend, dtype):
        def op(q, k, v, b, s0):
            o, ht = chunk_delta_rule(q, k, v, b, initial_state=s0, output_final_state=True,
                                     use_qk_l2norm_in_kernel=True, backend=backend)
            return o, ht

        @jax.jit
        def fn(q, k, v, b, s0, do, dht):
            (o, ht), vjp = jax.vjp(op, q, k, v, b, s0)
            g = vjp((do.astype(o.dtype), dht))
            return [o, *g[:4]] + ([g[4], ht] if with_h0 else [])

        s0 = jnp.asarray(h0) if with_h0 else jnp.zeros((B, H, D, D), jnp.float32)
        d_t = jnp.asarray(dht) if with_h0 else jnp.zeros((B, H, D, D), jnp.float32)
        args = [jnp.asarray(x, dtype) for x in (q, k, v, beta, do)]
        return [np.asarray(x, np.float32) for x in fn(*args[:4], s0, args[4], d_t)]

    with jax.default_matmul_precision("highest"):
        ref = run_jax("xla", jnp.float32)
    row = {}
    for label, got in [("pallas", run_jax("pallas", jnp.bfloat16)), ("xla", run_jax("xla", jnp.bfloat16))]:
        for n, g, r, f in zip(names, got, ref, fla):
            e = {"vs_fp32": rel(g, r), "vs_fla": rel(g, f), "fla_vs_fp32": rel(f, r)}
            tol = FWD_TOL if n in ("o", "ht") else GRAD_TOL
            e["ok"] = bool(e["vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol)
                           and e["vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]))
            row[f"{label}.{n}"] = e
    results["parity"][f"B{B}T{T}H{H}D{D}" + ("-h0" if with_h0 else "")] = row


def op_timing(results, shape, block_vs, with_xla=True):
    B, T, H, D = shape
    q, k, v, beta, do = inputs(*shape)
    run, _ = fla_op_fwd_bwd(q, k, v, beta, do)
    row = {"fla": time_torch(run)}
    args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, beta, do)]
    outs = {}
    for bv in block_vs:
        if D % bv == 0:
            fn = jax_fwd_bwd(jax_ops(bv)["jax_pallas"])
            row[f"jax_pallas_bv{bv}"] = time_jax(fn, args)
            outs[bv] = [np.asarray(x, np.float32) for x in fn(*args)]
    if len(outs) > 1:  # the tile width must not change the result beyond accumulation order
        a, b = outs.values()
        results["block_v_max_rel_diff"][f"B{B}T{T}H{H}D{D}"] = max(rel(x, y) for x, y in zip(a, b))
    if with_xla:
        row["jax_xla"] = time_jax(jax_fwd_bwd(jax_ops()["jax_xla"]), args)
    results["op_ms"][f"B{B}T{T}H{H}D{D}"] = row


def layer_timing(results):
    from flax import nnx

    from jaxgpt.spec.config import ModelConfig
    from jaxgpt.convert import jax_to_torch
    from jaxgpt.layers.deltanet import DeltaNet
    from torch_ref.linear_attn import delta_net

    B, T = 8, 1024
    row = {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, T, 768), np.float32)
    dy = rng.standard_normal((B, T, 768), np.float32)
    for backend in ("pallas", "xla"):
        cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=T, dtype="bfloat16",
                          linear_attn_backend=backend)
        layer = DeltaNet(cfg, nnx.Rngs(0))
        graphdef, params = nnx.split(layer, nnx.Param)

        @jax.jit
        def run(params, x, dy):
            y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
            return y, *vjp(dy.astype(y.dtype))

        row[f"jax_{backend}"] = time_jax(run, (params, jnp.asarray(x), jnp.asarray(dy)))
    tlayer = delta_net(cfg).cuda()
    tlayer.load_state_dict({n: torch.from_numpy(np.array(w)) for n, w in
                            jax_to_torch(nnx.to_pure_dict(params)).items()}, strict=True)
    tx = torch.tensor(x, device="cuda", requires_grad=True)
    tdy = torch.tensor(dy, device="cuda")
    leaves = [tx] + list(tlayer.parameters())

    def fla_run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = tlayer(tx)
        return torch.autograd.grad(y, leaves, tdy.to(y.dtype))

    row["fla"] = time_torch(fla_run)
    results["layer_ms"]["B8T1024C768H12"] = row


def layer_parity(results):
    """parity_tests/test_gpu_mixers.py's DeltaNet case at T=1024 (the layer on linear_attn_backend='auto')."""
    from parity_tests.test_gpu_mixers import test_bf16_layer_parity_with_fla

    try:
        test_bf16_layer_parity_with_fla("deltanet", 1024)
        results["layer_parity_T1024"] = "passed"
    except AssertionError:
        results["layer_parity_T1024"] = traceback.format_exc()[-1500:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=200.0, help="seconds; later steps are skipped past it")
    ap.add_argument("--steps", default="", help="comma-separated prefixes of the step names to run (default: all)")
    args = ap.parse_args()
    start = time.time()
    out = os.environ.get("OUT", "/tmp")
    results = {"env": {"jax": jax.__version__, "torch": torch.__version__, "device": str(jax.devices()[0]),
                       "gpu": torch.cuda.get_device_name(0)},
               "op_ms": {}, "layer_ms": {}, "parity": {}, "block_v_max_rel_diff": {}, "errors": [], "skipped": []}
    print(results["env"], flush=True)
    small, mid, big = TIMING_SHAPES
    steps = [("layer_timing", layer_timing, ()), ("parity small", op_parity, (small,)),
             ("timing small", op_timing, (small, (32, 64)))]
    steps += [(f"parity ragged {s}", op_parity, (s,)) for s in RAGGED_SHAPES]
    steps += [("layer_parity", layer_parity, ()), ("timing mid", op_timing, (mid, (32, 64))),
              ("timing big", op_timing, (big, (32, 64), False)), ("parity mid", op_parity, (mid,)),
              ("parity big", op_parity, (big,)), ("parity h0", op_parity, (RAGGED_SHAPES[0], True))]
    prefixes = [p for p in args.steps.split(",") if p]
    for name, fn, a in steps:
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        if time.time() - start > args.budget:
            results["skipped"].append(name)
            continue
        t = time.time()
        try:
            fn(results, *a)
        except Exception:  # keep going: one failure must not cost the rest of the call
            results["errors"].append(f"{name}: {traceback.format_exc()[-2000:]}")
            print(results["errors"][-1], flush=True)
        print(f"[{time.time() - start:6.1f}s] {name} done in {time.time() - t:.1f}s", flush=True)
        with open(os.path.join(out, "delta_rule.json"), "w") as f:
            json.dump(results, f, indent=1)
    with open(os.path.join(out, "delta_rule.json"), "w") as f:
        json.dump(results, f, indent=1)

    print("\n== parity (rel RMS; ok = FLA-like thresholds) ==")
    for shape, row in results["parity"].items():
        for key, e in row.items():
            print(f"{shape:22s} {key:14s} vs_fp32 {e['vs_fp32']:.2e}  vs_fla {e['vs_fla']:.2e}  "
                  f"fla_vs_fp32 {e['fla_vs_fp32']:.2e}  {'ok' if e['ok'] else 'FAIL'}")
    print("layer parity T1024:", str(results.get("layer_parity_T1024"))[:300])
    print("errors:", len(results["errors"]), "skipped:", results["skipped"])
    print("block_v max rel diff (bv32 vs bv64):", results["block_v_max_rel_diff"])
    print("\n== fwd+bwd ms (ratio = JAX / FLA) ==")
    for group in ("layer_ms", "op_ms"):
        for shape, row in results[group].items():
            fla = row.get("fla")
            cells = [f"{k} {v:.3f}" + (f" ({v / fla:.2f}x)" if fla and k != "fla" else "") for k, v in row.items()]
            print(f"{group[:-3]:5s} {shape:18s} " + " | ".join(cells))


if __name__ == "__main__":
    main()
