"""Linear attention fwd+bwd: jaxgpt (JAX, backend xla / pallas) against FLA 0.6.0's Triton kernels, on one GPU.

    python scripts/bench_linear_attention.py [--ops chunk_gla,gla,gla_conv,...] [--shapes op1,layer1024,...]
                                             [--impl xla,pallas] [--state-block none,32,64]
                                             [--delta-inverse pallas,trsm]
                                             [--delta-block-v 16,32] [--out results.json]
                                             [--profile DIR]

Rows (one table): shape, op or layer, JAX impl, JAX ms, FLA ms, ratio = FLA ms / JAX ms (> 1: JAX faster), and the
JAX side's achieved TFLOP/s and GB/s under the model below. `--state-block` sweeps chunk_gla's pallas state tile
(`chunk_gla(..., state_block=...)`; none: its heuristic): one row per value, impl labelled e.g. 'pallas sb=32';
`--delta-inverse pallas,trsm` and `--delta-block-v` likewise chunk_delta_rule's per-chunk triangular inverse and
its recurrences' state columns per program ('pallas inv=trsm bv=16'); `--delta-block-v` also sweeps
chunk_gated_delta_rule's (through `chunk_gated_delta_rule_pallas(..., block_v=...)`).
Every measurement runs twice (columns run 1 / run 2) to show the noise; each is the median over `--reps` samples
of `--inner` back-to-back fwd+bwd calls (device events for PyTorch, a host clock around a blocked JAX dispatch for
JAX), after warm-up, rotating over 3 sets of random inputs drawn fresh for every shape. Failures (e.g. a backend
that is not there yet) print 'n/a' with the error. `--profile DIR` also traces 5 fwd+bwd calls of each row (a
jax.profiler trace for both sides) and prints each side's GPU kernel time per call by kernel, the costliest first.

Ops (bf16 q, k, v, do; fp32 log-gates / bf16 beta; no initial state; gradients w.r.t. every input):
    chunk_gla         jaxgpt.ops.chunk_gla(q, k, v, gk, backend=impl)      vs fla.ops.gla.chunk_gla
    chunk_delta_rule  jaxgpt.ops.chunk_delta_rule(q, k, v, beta, use_qk_l2norm_in_kernel=True, backend=impl)
                      vs fla.ops.delta_rule.chunk_delta_rule (same flag)
    chunk_gated_delta_rule  jaxgpt.ops.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True,
                      backend=impl) vs fla.ops.gated_delta_rule.chunk_gated_delta_rule (same flag); g fp32 from the
                      layer's gate (`gdn_gate` at FLA's A_log / dt_bias initialisation), beta bf16
    chunk_simple_gla  jaxgpt.ops.chunk_simple_gla(q, k, v, g, backend=impl) vs fla.ops.simple_gla.chunk_simple_gla;
                      g [B, T, H] fp32 log-decays drawn as chunk_gated_delta_rule's
    chunk_retention   jaxgpt.ops.chunk_simple_gla(q, k, v, g, backend=impl) with retention's fixed per-head g
                      (RetNet's layer) vs fla.ops.retention.chunk_retention
    chunk_linear_attn jaxgpt.ops.chunk_simple_gla(q, k, v, backend=impl) (no decay) vs
                      fla.ops.linear_attn.chunk_linear_attn(normalize=False), as the LinearAttention layer calls it
Layers (x [B, T, C], fp32 parameters, bf16 compute / FLA under bf16 autocast; gradients w.r.t. x and all params):
    gla, gla_conv, deltanet, gated_deltanet: jaxgpt.layers (config linear_attn_backend=impl) vs torch_ref (the real
    fla.layers modules with the variants' options); random weights of the same shapes (the harness init).

FLOP model (fwd + bwd = 3 x fwd, per batch and head, chunk C = 64, head dims K and V):
    op fwd = T * (4 K V + C (K + V))         states (2KV) + inter-chunk output (2KV) + causal intra-chunk scores
                                              (C K: half of 2CK) and their product with v (C V)
    layer fwd = op fwd * B * H + 2 B T (C_in * (2 Kd + 2 Vd + r + r Kd) + Vd * C_in)   (projections; r = 16 for
                                              GLA's low-rank gate; DeltaNet: q, k, v, o of C x C plus b_proj)
Byte model (the least HBM traffic, each tensor once): op fwd reads q, k, v, gate and writes o; bwd reads q, k, v,
gate, do and writes dq, dk, dv, dgate. Layer: x, y, dy, dx in bf16 plus every parameter read and its gradient
written in fp32, plus the op's bytes.
"""

import argparse
import itertools
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

CHUNK = 64
OP_SHAPES = {  # name -> (B, T, H, D)
    "op1": (8, 1024, 12, 64),
    "op2": (2, 4096, 16, 64),
    "op3": (1, 16384, 16, 128),
}
LAYER_SHAPES = {  # name -> (B, T, C, H)
    "layer1024": (8, 1024, 768, 12),
    "layer4096": (2, 4096, 768, 12),
    "layer16384": (1, 16384, 768, 12),
}
OPS = ("chunk_gla", "chunk_delta_rule", "chunk_gated_delta_rule", "chunk_simple_gla", "chunk_retention",
       "chunk_linear_attn", "gla", "gla_conv", "deltanet", "gated_deltanet")
INPUT_DTYPES = {  # op -> dtype of each of op_inputs' arrays (q, k, v, *gates, do): log-decays fp32, the rest bf16
    "chunk_gla": ("bfloat16",) * 3 + ("float32", "bfloat16"),
    "chunk_delta_rule": ("bfloat16",) * 5,
    "chunk_gated_delta_rule": ("bfloat16",) * 3 + ("float32", "bfloat16", "bfloat16"),
    "chunk_simple_gla": ("bfloat16",) * 3 + ("float32", "bfloat16"),
    "chunk_retention": ("bfloat16",) * 4,
    "chunk_linear_attn": ("bfloat16",) * 4,
}
# what FLA runs through its gated chunk_bwd_dqkwg (refused on Hopper: lift_fla_hopper_guard)
FLA_GATED_BWD = ("chunk_gated_delta_rule", "gated_deltanet", "chunk_simple_gla")
LAYER_OPTIONS = {"gla": ("gla", {}), "gla_conv": ("gla", {"use_short_conv": True}), "deltanet": ("deltanet", {}),
                 "gated_deltanet": ("gated_deltanet", {})}


def op_flops(B, T, H, K, V):
    return 3 * B * H * T * (4 * K * V + CHUNK * (K + V))


def op_bytes(B, T, H, K, V, gate_elems, gate_bytes=4, elt=2):
    fwd = B * T * H * (elt * (2 * K + 2 * V)) + B * T * H * gate_elems * gate_bytes
    bwd = B * T * H * (elt * (2 * K + 2 * V) + elt * (2 * K + V)) + 2 * B * T * H * gate_elems * gate_bytes
    return fwd + bwd


# ---------------------------------------------------------------------------------------------- timing


def time_jax(fn, inputs_sets, reps, inner):
    import jax

    for inputs in inputs_sets:  # compile + warm-up
        jax.block_until_ready(fn(*inputs))
    samples = []
    for r in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(inner):
            out = fn(*inputs_sets[(r * inner + i) % len(inputs_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(samples)


def time_torch(fn, inputs_sets, reps, inner):
    import torch

    for inputs in inputs_sets:
        fn(*inputs)
    torch.cuda.synchronize()
    samples = []
    for r in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(inner):
            fn(*inputs_sets[(r * inner + i) % len(inputs_sets)])
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return statistics.median(samples)


def profile_calls(fn, inputs_sets, sync, trace_dir, calls=5):
    """{kernel name: (us per call, launches per call)} of `calls` calls of fn after a warm-up call, from a
    jax.profiler trace (its CUPTI tracer sees every kernel of the process, PyTorch's too; a second profiler
    could not subscribe). sync: waits for fn's result (jax.block_until_ready / torch.cuda.synchronize)."""
    import jax
    from profile_step import trace_events  # scripts/ is on sys.path

    sync(fn(*inputs_sets[0]))
    with jax.profiler.trace(trace_dir):
        for i in range(calls):
            out = fn(*inputs_sets[i % len(inputs_sets)])
        sync(out)
    table = {}
    for name, _, us in trace_events(Path(trace_dir))[0]:
        total, n = table.get(name, (0.0, 0))
        table[name] = (total + us / calls, n + 1 / calls)
    return table


def profile(title, fn, inputs_sets, sync, trace_dir):
    """print_kernels of profile_calls; a failure is printed and leaves the row's timings alone."""
    try:
        print_kernels(title, profile_calls(fn, inputs_sets, sync, trace_dir))
    except Exception:  # noqa: BLE001 - report and go on
        traceback.print_exc(limit=3)


def print_kernels(title, table, top=15):
    total = sum(us for us, _ in table.values())
    print(f"\n{title}: {total / 1e3:.3f} ms GPU kernel time per fwd+bwd call")
    for name, (us, n) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {us / 1e3:8.3f} ms  {n:5.1f}x  {name[:100]}")


# ---------------------------------------------------------------------------------------------- ops


def op_inputs(op, B, T, H, D, rng, n_sets=3):
    """n_sets of (q, k, v, *gates, do) in fp32: gates (gk) for chunk_gla, (beta) for chunk_delta_rule, (g, beta)
    for chunk_gated_delta_rule, (g) for chunk_simple_gla, none for chunk_retention and chunk_linear_attn."""
    sets = []
    for _ in range(n_sets):
        q, k, v, do = (rng.standard_normal((B, T, H, D), np.float32) for _ in range(4))
        beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H)).astype(np.float32)))
        if op == "chunk_gla":  # the layer's gates: logsigmoid(N(0, 1)) / 16
            gates = (np.log(1 / (1 + np.exp(-rng.standard_normal((B, T, H, D))))).astype(np.float32) / 16,)
        elif op == "chunk_gated_delta_rule":
            gates = (gdn_log_decays(B, T, H, rng), beta)
        elif op == "chunk_simple_gla":
            gates = (gdn_log_decays(B, T, H, rng),)
        elif op in ("chunk_retention", "chunk_linear_attn"):
            gates = ()
        else:
            gates = (beta,)
        sets.append((q, k, v, *gates, do))
    return sets


def gdn_log_decays(B, T, H, rng):
    """g [B, T, H] fp32 as Gated DeltaNet's gate makes it at FLA's initialisation: -exp(A_log) softplus(a + dt_bias),
    a ~ N(0, 1), A = exp(A_log) ~ U(0, 16), dt_bias = softplus^{-1}(dt), log dt ~ U(log 1e-3, log 0.1)."""
    a = rng.standard_normal((B, T, H))
    A = rng.uniform(0, 16, H)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), H))
    dt_bias = dt + np.log(-np.expm1(-dt))
    return (-A * np.logaddexp(0.0, a + dt_bias)).astype(np.float32)


def jax_op(op, impl, sets, options):
    import jax
    import jax.numpy as jnp

    from jaxgpt import ops

    if op == "chunk_gla":
        def f(q, k, v, g):
            return ops.chunk_gla(q, k, v, g, backend=impl, **options)[0]
    elif op == "chunk_gated_delta_rule":
        def f(q, k, v, g, beta):
            if options:  # swept kernel options: the pallas entry point takes them
                from jaxgpt.ops.gated_delta_rule.pallas import chunk_gated_delta_rule_pallas

                return chunk_gated_delta_rule_pallas(q, k, v, g, beta, q.shape[-1] ** -0.5, None, False, True, CHUNK,
                                                     **options)[0]
            return ops.chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True, backend=impl)[0]
    elif op == "chunk_simple_gla":
        def f(q, k, v, g):
            return ops.chunk_simple_gla(q, k, v, g, backend=impl)[0]
    elif op == "chunk_retention":
        from jaxgpt.spec.constants import retention_log_decays

        def f(q, k, v):
            g = jnp.broadcast_to(jnp.asarray(retention_log_decays(q.shape[2]), jnp.float32), q.shape[:3])
            return ops.chunk_simple_gla(q, k, v, g, backend=impl)[0]
    elif op == "chunk_linear_attn":
        def f(q, k, v):
            return ops.chunk_simple_gla(q, k, v, backend=impl)[0]
    else:
        def f(q, k, v, g):
            return ops.chunk_delta_rule(q, k, v, g, use_qk_l2norm_in_kernel=True, backend=impl, **options)[0]

    @jax.jit
    def step(*inputs):
        o, vjp = jax.vjp(f, *inputs[:-1])
        return o, vjp(inputs[-1])

    return step, [tuple(jnp.asarray(x, getattr(jnp, t)) for x, t in zip(s, INPUT_DTYPES[op])) for s in sets]


def fla_op(op, sets):
    import torch

    if op == "chunk_gla":
        from fla.ops.gla import chunk_gla as f

        def call(*inputs):
            return f(*inputs)[0]
    elif op in ("chunk_simple_gla", "chunk_retention"):
        if op == "chunk_simple_gla":
            from fla.ops.simple_gla import chunk_simple_gla as f
        else:
            from fla.ops.retention import chunk_retention as f

        def call(*inputs):
            return f(*inputs)[0]
    elif op == "chunk_linear_attn":
        from fla.ops.linear_attn import chunk_linear_attn as f

        def call(*inputs):
            return f(*inputs, normalize=False)[0]
    else:
        if op == "chunk_gated_delta_rule":
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f
        else:
            from fla.ops.delta_rule import chunk_delta_rule as f

        def call(*inputs):
            return f(*inputs, use_qk_l2norm_in_kernel=True)[0]

    def step(*inputs):
        for t in inputs[:-1]:
            t.grad = None
        call(*inputs[:-1]).backward(inputs[-1])

    def tensors(arrays):
        ts = [torch.tensor(x, device="cuda", dtype=getattr(torch, t)) for x, t in zip(arrays, INPUT_DTYPES[op])]
        return tuple(t.requires_grad_() for t in ts[:-1]) + (ts[-1],)

    return step, [tensors(s) for s in sets]


# ---------------------------------------------------------------------------------------------- layers


def layer_flops(op, B, T, C, H):
    if op == "deltanet":
        K = V = C // H
        proj = C * (3 * C + H) + C * C
    elif op == "gated_deltanet":  # q, k, v, g (output gate), o of C x C; a, b of C x H
        K = V = C // H
        proj = 5 * C * C + 2 * C * H
    else:
        Kd, Vd = C // 2, C
        K, V = Kd // H, Vd // H
        proj = C * (2 * Kd + 2 * Vd + 16) + 16 * Kd + Vd * C
    return op_flops(B, T, H, K, V) + 3 * 2 * B * T * proj


def layer_bytes(op, B, T, C, H, n_params):
    if op == "deltanet":
        K = V = C // H
        extra = op_bytes(B, T, H, K, V, 1 / K, 2)
    elif op == "gated_deltanet":
        K = V = C // H
        extra = op_bytes(B, T, H, K, V, 1, 6)
    else:
        K, V = C // 2 // H, C // H
        extra = op_bytes(B, T, H, K, V, K)
    return 4 * B * T * C * 2 + 8 * n_params + extra


def jax_layer(op, impl, B, T, C, H, rng):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgpt.spec.config import ModelConfig
    from jaxgpt.layers.mixers import LINEAR_LAYERS

    kind, options = LAYER_OPTIONS[op]
    cfg = ModelConfig(n_layer=12, n_head=H, n_embd=C, block_size=T, dtype="bfloat16", linear_attn_backend=impl)
    layer = LINEAR_LAYERS[kind](cfg, nnx.Rngs(int(rng.integers(1 << 30))), **options)
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def step(params, x, dy):
        y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        return y, vjp(dy.astype(y.dtype))

    sets = [(params, jnp.asarray(rng.standard_normal((B, T, C), np.float32)),
             jnp.asarray(rng.standard_normal((B, T, C), np.float32))) for _ in range(3)]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return step, sets, layer, n_params


def fla_layer(op, B, T, C, H, jlayer, rng):
    import torch
    from flax import nnx

    from jaxgpt.spec.config import ModelConfig
    from jaxgpt.convert import jax_to_torch
    from torch_ref.mixers import LINEAR_LAYERS

    kind, options = LAYER_OPTIONS[op]
    cfg = ModelConfig(n_layer=12, n_head=H, n_embd=C, block_size=T, dtype="bfloat16")
    tlayer = LINEAR_LAYERS[kind](cfg, **options).cuda()
    params = nnx.to_pure_dict(nnx.state(jlayer, nnx.Param))
    tlayer.load_state_dict({n: torch.from_numpy(np.array(w)) for n, w in jax_to_torch(params).items()}, strict=True)

    def step(x, dy):
        tlayer.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = tlayer(x)
        y.backward(dy)

    sets = [(torch.tensor(rng.standard_normal((B, T, C), np.float32), device="cuda", requires_grad=True),
             torch.tensor(rng.standard_normal((B, T, C), np.float32), device="cuda", dtype=torch.bfloat16))
            for _ in range(3)]
    return step, sets


# ---------------------------------------------------------------------------------------------- driver


def measure_pair(jax_fn, jax_sets, args):
    return [time_jax(jax_fn, jax_sets, args.reps, args.inner) for _ in range(2)]


def parse_state_blocks(text):
    """'none,32,64' -> [None, 32, 64] (None: chunk_gla's heuristic)."""
    return [None if x == "none" else int(x) for x in text.split(",")]


def variants(op, impls, args):
    """(impl, row label, op keyword options) for the JAX rows of one op: on pallas, one row per combination of the
    op's swept options (chunk_gla: --state-block; chunk_delta_rule: --delta-inverse x --delta-block-v); else one
    row per impl."""
    sweeps = {"chunk_gla": [("state_block", "sb", args.state_block)],
              "chunk_delta_rule": [("tril_inverse", "inv", args.delta_inverse), ("block_v", "bv", args.delta_block_v)],
              "chunk_gated_delta_rule": [("block_v", "bv", args.delta_block_v)]}
    rows = []
    for impl in impls:
        swept = [sweep for sweep in sweeps.get(op, []) if sweep[2]] if impl == "pallas" else []
        for combo in itertools.product(*[values for _, _, values in swept]):
            names = [(key, short) for key, short, _ in swept]
            label = " ".join([impl] + [f"{short}={'none' if x is None else x}" for (_, short), x in zip(names, combo)])
            rows.append((impl, label, {key: x for (key, _), x in zip(names, combo)}))
    return rows


def run(args):
    from fla_guard import lift_fla_hopper_guard  # scripts/ is on sys.path

    rows = []
    rng = np.random.default_rng(0)
    ops = args.ops.split(",")
    for shape in args.shapes.split(","):
        for op in ops:
            is_op = op in INPUT_DTYPES
            if is_op != (shape in OP_SHAPES):
                continue
            fla_ms, fla_err, fla_note = None, None, None
            if is_op:
                B, T, H, D = OP_SHAPES[shape]
                sets = op_inputs(op, B, T, H, D, rng)
                flops = op_flops(B, T, H, D, D)
                gate_bytes = {"chunk_gla": (D, 4), "chunk_delta_rule": (1, 2), "chunk_gated_delta_rule": (1, 6),
                              "chunk_simple_gla": (1, 4), "chunk_retention": (0, 4), "chunk_linear_attn": (0, 4)}[op]
                nbytes = op_bytes(B, T, H, D, D, *gate_bytes)
                label = f"B{B} T{T} H{H} D{D}"
                try:
                    fla_note = lift_fla_hopper_guard() if op in FLA_GATED_BWD else None
                    fstep, fsets = fla_op(op, sets)
                    fla_ms = [time_torch(fstep, fsets, args.reps, args.inner) for _ in range(2)]
                    if args.profile:
                        import torch

                        profile(f"FLA {op} {label}", fstep, fsets, lambda _: torch.cuda.synchronize(),
                                f"{args.profile}/{shape}_{op}_fla")
                    del fsets
                except Exception as e:  # noqa: BLE001 - report and go on
                    fla_err = f"{type(e).__name__}: {e}"
            else:
                B, T, C, H = LAYER_SHAPES[shape]
                label = f"B{B} T{T} C{C} H{H}"
                flops = layer_flops(op, B, T, C, H)
            for impl, impl_label, options in variants(op, args.impl.split(","), args):
                row = {"shape": label, "op": op, "impl": impl_label}
                try:
                    if is_op:
                        jstep, jsets = jax_op(op, impl, sets, options)
                    else:
                        jstep, jsets, jlayer, n_params = jax_layer(op, impl, B, T, C, H, rng)
                        nbytes = layer_bytes(op, B, T, C, H, n_params)
                        if fla_ms is None and fla_err is None:
                            try:
                                fla_note = lift_fla_hopper_guard() if op in FLA_GATED_BWD else None
                                fstep, fsets = fla_layer(op, B, T, C, H, jlayer, rng)
                                fla_ms = [time_torch(fstep, fsets, args.reps, args.inner) for _ in range(2)]
                                del fsets
                            except Exception as e:  # noqa: BLE001
                                fla_err = f"{type(e).__name__}: {e}"
                    jax_ms = measure_pair(jstep, jsets, args)
                    best = min(jax_ms)
                    row |= {"jax_ms": jax_ms, "tflops": flops / best / 1e9, "gbs": nbytes / best / 1e6}
                    if args.profile:
                        import jax

                        profile(f"jaxgpt {op} {impl_label} {label}", jstep, jsets, jax.block_until_ready,
                                f"{args.profile}/{shape}_{op}_{impl_label.replace(' ', '_')}")
                    del jsets
                except Exception as e:  # noqa: BLE001
                    row["jax_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc(limit=3)
                row["fla_ms"], row["fla_error"] = fla_ms, fla_err
                if fla_note:
                    row["fla_note"] = fla_note
                if fla_ms and "jax_ms" in row:
                    row["ratio"] = min(fla_ms) / min(row["jax_ms"])
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)
    return rows


def fmt(ms):
    return "n/a" if not ms else " / ".join(f"{m:.3f}" for m in ms)


def print_table(rows):
    head = (f"{'shape':<22}{'op':<24}{'impl':<22}{'JAX ms (x2)':>18}{'FLA ms (x2)':>18}{'ratio':>7}{'TFLOP/s':>9}"
            f"{'GB/s':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "n/a"
        tf = f"{r['tflops']:.1f}" if "tflops" in r else "n/a"
        gb = f"{r['gbs']:.0f}" if "gbs" in r else "n/a"
        print(f"{r['shape']:<22}{r['op']:<24}{r['impl']:<22}{fmt(r.get('jax_ms')):>18}{fmt(r.get('fla_ms')):>18}"
              f"{ratio:>7}{tf:>9}{gb:>8}")
    for note in sorted({f"{r['op']}: {r['fla_note']}" for r in rows if "fla_note" in r}):
        print(note)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--shapes", default="op1,op2,op3,layer1024,layer4096")
    p.add_argument("--impl", default="xla,pallas")
    p.add_argument("--state-block", type=parse_state_blocks, default=None,
                   help="chunk_gla pallas state tiles to sweep, e.g. none,32,64 (none: the heuristic)")
    p.add_argument("--delta-block-v", type=lambda t: [int(x) for x in t.split(",")], default=None,
                   help="chunk_delta_rule pallas state columns per program to sweep, e.g. 16,32")
    p.add_argument("--delta-inverse", type=lambda t: t.split(","), default=None,
                   help="chunk_delta_rule pallas triangular inverses to sweep: pallas,trsm")
    p.add_argument("--out", default=None, help="write the rows as JSON")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="also trace each row and print GPU kernel time per call by kernel (traces under DIR)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inner", type=int, default=5)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    bad = [o for o in args.ops.split(",") if o not in OPS]
    bad += [s for s in args.shapes.split(",") if s not in OP_SHAPES and s not in LAYER_SHAPES]
    if bad:
        sys.exit(f"unknown ops/shapes {bad}; ops: {OPS}; shapes: {list(OP_SHAPES) + list(LAYER_SHAPES)}")
    rows = run(args)
    print_table(rows)


if __name__ == "__main__":
    main()
