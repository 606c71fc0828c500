"""Parity of the Pallas GLA kernels (jaxgpt.ops.gla.pallas, `chunk_gla(..., backend='pallas')`).

CPU (CI): the kernels in Pallas interpret mode, fp32, against the plain recurrence `naive_recurrent_gla`: outputs,
final state and the gradients w.r.t. q, k, v, gk and the initial state, at ragged T spanning two or three chunks and
K = 16, 64, 128 (one, two and four of the kernels' 32-column key blocks, as key groups of one program each or two
blocks per program), head dims that are zero-padded to powers of two (K = 40, 48, 56; V = 24), and 32 x 32 and
64 x 64 state tiles at K = V = 64 and 128, with gates weak in some key
dimensions and strong enough in others (log-decay -20 per step) that any factorisation exp(G_t) * exp(-G_j) over
more than a few steps would overflow. And the bf16 forward + backward lowers to Triton IR for the GPU (`jax.export`,
no GPU needed) at both state tile and key group sizes, which catches Pallas-Triton lowering errors that the
interpreter does not see.

GPU (`pytest -m gpu parity_tests/test_fast_gla.py` on the device): bf16 pallas vs FLA 0.6.0's Triton `chunk_gla`
(bf16), both against an fp32 reference (jaxgpt's xla chunk_gla in fp32, full-precision products, from the same
bf16-rounded inputs), forward and backward (dq, dk, dv, dgk, dh0), thresholds as parity_tests/test_gpu_mixers.py:
pallas within FLA's tolerance of FLA or 1.5x FLA's own bf16 noise, and at most 1.25x as far from fp32 as FLA is
(or within FLA's tolerance of fp32).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.ops import chunk_gla, naive_recurrent_gla
from jaxgpt.ops.gla.pallas import chunk_gla_pallas, state_block_for
from parity_tests.helpers import rel_err

FWD_TOL, GRAD_TOL = 4e-3, 8e-3  # FLA's own test thresholds
NOISE_FACTOR, ACCURACY_FACTOR = 1.5, 1.25
NAMES = ("o", "ht", "dq", "dk", "dv", "dgk", "dh0")


def random_inputs(rng, B, T, H, K, V, strong: bool = False):
    q, k = (rng.standard_normal((B, T, H, K), np.float32) for _ in range(2))
    v = rng.standard_normal((B, T, H, V), np.float32)
    gk = np.log(1 / (1 + np.exp(-rng.standard_normal((B, T, H, K))))).astype(np.float32) / 16
    if strong:  # half the key dimensions forget almost at once
        gk[..., K // 2:] = -20 * rng.uniform(0.5, 1.0, (B, T, H, K - K // 2)).astype(np.float32)
    h0 = rng.standard_normal((B, H, K, V), np.float32)
    do = rng.standard_normal((B, T, H, V), np.float32)
    dht = rng.standard_normal((B, H, K, V), np.float32)
    return (q, k, v, gk, h0), (do, dht)


def outputs_and_grads(op, inputs, cotangents):
    """(o, h_T, dq, dk, dv, dgk, dh0) of `op(q, k, v, gk, initial_state=h0, output_final_state=True)`."""

    def fn(q, k, v, gk, h0):
        return op(q, k, v, gk, initial_state=h0, output_final_state=True)

    @jax.jit
    def run(inputs, cotangents):
        (o, ht), vjp = jax.vjp(fn, *inputs)
        return (o, ht, *vjp(tuple(cotangents)))

    return run(inputs, cotangents)


def shape_id(shape) -> str:
    return "B{}_T{}_H{}_K{}_V{}".format(*shape)


INTERPRET_CASES = [  # ((B, T, H, K, V), chunk_gla_pallas options)
    ((1, 150, 2, 16, 32), {}),
    ((1, 100, 1, 64, 64), {"state_block": 64}),  # one 64 x 64 state tile; two key groups
    ((1, 100, 1, 64, 64), {"state_block": 32, "key_group": 64}),  # 2 x 2 tiles; one group of two key blocks
    ((1, 70, 1, 128, 32), {"state_block": 64, "key_group": 64}),  # 2 x 2 groups x blocks, V < K; 2 x 1 tiles
    ((1, 70, 1, 128, 128), {"state_block": 32}),  # 4 x 4 tiles, four key groups
    ((1, 100, 1, 40, 64), {}),  # K padded to 64 (gla_depth's key dims 40, 48, 56)
    ((1, 100, 1, 56, 64), {"key_group": 64}),
    ((1, 100, 2, 48, 24), {}),  # both padded: K to 64, V to 32
]


def case_id(case) -> str:
    shape, options = case
    return shape_id(shape) + "".join(f"_{k}{v}" for k, v in options.items())


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=case_id)
def test_interpret_matches_recurrence(case):
    shape, options = case
    rng = np.random.default_rng(0)
    inputs, cot = random_inputs(rng, *shape, strong=True)
    inputs, cot = [jnp.asarray(x) for x in inputs], [jnp.asarray(x) for x in cot]
    got = outputs_and_grads(lambda *a, **kw: chunk_gla_pallas(*a, **kw, interpret=True, **options), inputs, cot)
    ref = outputs_and_grads(naive_recurrent_gla, inputs, cot)
    assert [g.shape for g in got] == [r.shape for r in ref]  # the padded head dims are sliced off (and their grads)
    errs = {n: rel_err(g, r) for n, g, r in zip(NAMES, got, ref)}
    assert all(np.isfinite(np.asarray(g)).all() for g in got)
    assert max(errs.values()) < 1e-5, errs


def test_state_block_heuristic():
    assert state_block_for(8, 32, 64, 64) == 64  # 256 programs of 64 x 64
    assert state_block_for(2, 16, 64, 64) == 32  # 32 programs of 64 x 64 would leave most SMs idle
    assert state_block_for(8, 12, 32, 64) == 32  # 96
    assert state_block_for(4, 16, 128, 128) == 64  # 256


@pytest.mark.parametrize("K,V,state_block,key_group", [(32, 64, None, 32), (64, 64, 64, 32), (64, 64, 32, 64),
                                                       (128, 128, 64, 64), (128, 128, 32, 32), (40, 24, None, 32)])
def test_lowers_to_triton(K, V, state_block, key_group):
    """The bf16 forward + backward export for CUDA: every kernel lowers to Triton IR (compiling it needs a GPU)."""

    def fwd_bwd(q, k, v, gk, do):
        o, vjp = jax.vjp(lambda *x: chunk_gla(*x, backend="pallas", state_block=state_block,
                                                 key_group=key_group)[0], q, k, v, gk)
        return o, vjp(do)

    bf = jnp.bfloat16
    dims = ((K, bf), (K, bf), (V, bf), (K, jnp.float32), (V, bf))  # q, k, v, gk, do
    args = [jax.ShapeDtypeStruct((2, 200, 2, d), dtype) for d, dtype in dims]
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(*args)
    module = exported.mlir_module()
    kernels = ("_state_fwd_kernel", "_output_fwd_kernel", "_state_bwd_kernel", "_grad_bwd_kernel")
    assert all(f'name = "{name}"' in module for name in kernels), "a kernel did not lower to a Triton call"
    assert module.count(triton) >= len(kernels)


def test_pallas_rejects_unsupported_options():
    x = jnp.zeros((1, 8, 1, 320))
    with pytest.raises(ValueError, match="head dims"):
        chunk_gla_pallas(x, x, x, x)
    x = jnp.zeros((1, 8, 1, 32))
    with pytest.raises(ValueError, match="state_block"):
        chunk_gla_pallas(x, x, x, x, state_block=24)
    with pytest.raises(ValueError, match="key_group"):
        chunk_gla_pallas(x, x, x, x, key_group=8)


# ------------------------------------------------------------------------------------------------ GPU

GPU_CASES = [  # (B, T, H, K, V)
    (8, 1024, 12, 64, 64),
    (2, 4096, 16, 64, 64),
    (1, 16384, 16, 128, 128),
    (8, 1024, 12, 32, 64),  # the GLA layer's heads (expand_k = 0.5)
    (8, 1024, 12, 48, 64),  # a gla_depth middle layer: K zero-padded to 64
    (2, 1000, 4, 64, 64),
    (2, 65, 4, 64, 64),
    (2, 1, 4, 32, 64),
]


def fla_outputs_and_grads(inputs, cotangents):
    import torch
    from fla.ops.gla import chunk_gla as fla_chunk_gla

    q, k, v, gk, h0 = (torch.tensor(np.asarray(x, np.float32), device="cuda") for x in inputs)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    gk, h0 = gk.requires_grad_(), h0.requires_grad_()
    o, ht = fla_chunk_gla(q, k, v, gk, initial_state=h0, output_final_state=True)
    do, dht = (torch.tensor(np.asarray(x, np.float32), device="cuda") for x in cotangents)
    ((o.float() * do).sum() + (ht.float() * dht).sum()).backward()
    return [t.detach().float().cpu().numpy() for t in (o, ht, q.grad, k.grad, v.grad, gk.grad, h0.grad)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_CASES, ids=shape_id)
def test_bf16_pallas_parity_with_fla(shape):
    rng = np.random.default_rng(sum(shape))
    inputs, cot = random_inputs(rng, *shape)
    bf = jnp.bfloat16
    q, k, v = (jnp.asarray(x, bf) for x in inputs[:3])
    gk, h0 = (jnp.asarray(x) for x in inputs[3:])
    cot = (jnp.asarray(cot[0], bf), jnp.asarray(cot[1]))
    got = outputs_and_grads(lambda *a, **kw: chunk_gla(*a, **kw, backend="pallas"), (q, k, v, gk, h0), cot)
    with jax.default_matmul_precision("highest"):
        ref = outputs_and_grads(lambda *a, **kw: chunk_gla(*a, **kw, backend="xla"),
                                [x.astype(jnp.float32) for x in (q, k, v, gk, h0)],
                                [x.astype(jnp.float32) for x in cot])
    fla = fla_outputs_and_grads([np.asarray(x.astype(jnp.float32)) for x in (q, k, v, gk, h0)],
                                [np.asarray(x.astype(jnp.float32)) for x in cot])
    report = {n: {"jax_vs_fla": rel_err(g, f), "jax_vs_fp32": rel_err(g, r), "fla_vs_fp32": rel_err(f, r)}
              for n, g, f, r in zip(NAMES, got, fla, ref)}
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "fast_gla_parity.jsonl"), "a") as f:
            f.write(json.dumps({"shape": shape, "report": report}) + "\n")
    print(shape, json.dumps(report))
    for name, e in report.items():
        tol = FWD_TOL if name in ("o", "ht") else GRAD_TOL
        assert e["jax_vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["jax_vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)
