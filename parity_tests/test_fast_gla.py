"""Parity of the Pallas GLA kernels (jaxgpt.ops.gla.pallas, `chunk_gla(..., backend='pallas')`).

CPU (CI): the kernels in Pallas interpret mode, fp32, against jaxgpt's XLA chunk_gla (`backend='xla'`, full-precision
products; itself checked against the recurrence and FLA's in test_ops_parity.py): outputs, final state and the
gradients w.r.t. q, k, v, gk and the initial state, within 1e-5, at ragged T (1, 70, 100, 130, 150: one to three
chunks), K != V, head dims zero-padded to powers of two (K = 40, 48, 56; V = 24), K = V = 128 (two key and two value
blocks), smaller key / value blocks (the module constants BLOCK_K / BLOCK_V patched: more blocks per program on tiny
shapes), 32 x 32 and 64 x 64 state tiles, and with and without an initial state; gates weak in some key dimensions
and -20 per step in others (any factorisation exp(G_t) * exp(-G_j) over more than a few steps would overflow). And
the bf16 forward + backward lowers to Triton IR for the GPU (`jax.export`, no GPU needed), every kernel by name,
which catches Pallas-Triton lowering errors that the interpreter does not see.

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

from jaxgpt.ops import chunk_gla
from jaxgpt.ops.gla import pallas
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


TOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def run(op, inputs, cot, initial_state: bool = True):
    """(o, h_T, dq, dk, dv, dgk, dh0) as outputs_and_grads, or without an initial state (o, dq, dk, dv, dgk);
    compiled at XLA's lowest backend optimisation level (the interpreted kernels' compile dominates)."""

    def go(inputs, cot):
        if initial_state:
            (o, ht), vjp = jax.vjp(lambda *x: op(*x[:4], initial_state=x[4], output_final_state=True), *inputs)
            return (o, ht, *vjp(tuple(cot)))
        o, vjp = jax.vjp(lambda *x: op(*x)[0], *inputs[:4])
        return (o, *vjp(cot[0]))

    return jax.jit(go).lower(inputs, cot).compile(FAST_COMPILE)(inputs, cot)


INTERPRET_CASES = [  # ((B, T, H, K, V), options: state_block, BLOCK_K / BLOCK_V overrides, h0 (default True))
    ((1, 70, 2, 16, 32), {}),
    ((2, 1, 1, 32, 16), {}),  # T = 1
    ((1, 150, 1, 64, 32), {"h0": False}),  # K != V, three chunks, no initial state
    ((1, 70, 1, 128, 128), {"state_block": 32}),  # two key / value blocks; 4 x 4 state tiles
    ((1, 70, 1, 128, 32), {"state_block": 64}),  # V < K; 2 x 1 state tiles
    ((1, 100, 1, 64, 64), {"state_block": 64}),  # one 64 x 64 state tile
    ((1, 100, 2, 40, 24), {}),  # both padded: K to 64, V to 32
    ((1, 100, 1, 56, 64), {"state_block": 32}),  # K padded to 64 (gla_depth's key dims 40, 48, 56); 2 x 2 tiles
    ((1, 130, 1, 64, 64), {"BLOCK_K": 16, "BLOCK_V": 32}),  # 4 key blocks, 2 value blocks
    ((1, 64, 1, 32, 64), {"BLOCK_K": 16, "BLOCK_V": 16, "h0": False}),
]


def case_id(case) -> str:
    shape, options = case
    return shape_id(shape) + "".join(f"_{k}{v}" for k, v in options.items())


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=case_id)
def test_interpret_matches_xla(case, monkeypatch):
    shape, options = case
    options = dict(options)
    h0 = options.pop("h0", True)
    for name in ("BLOCK_K", "BLOCK_V"):
        if name in options:
            monkeypatch.setattr(pallas, name, options.pop(name))
    rng = np.random.default_rng(0)
    inputs, cot = random_inputs(rng, *shape, strong=True)
    inputs, cot = [jnp.asarray(x) for x in inputs], [jnp.asarray(x) for x in cot]
    got = run(lambda *a, **kw: chunk_gla_pallas(*a, **kw, interpret=True, **options), inputs, cot, h0)
    with jax.default_matmul_precision("highest"):
        ref = run(lambda *a, **kw: chunk_gla(*a, **kw, backend="xla"), inputs, cot, h0)
    names = NAMES if h0 else ("o", "dq", "dk", "dv", "dgk")
    assert [g.shape for g in got] == [r.shape for r in ref]  # the padded head dims are sliced off (and their grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in got)
    errs = {n: rel_err(g, r) for n, g, r in zip(names, got, ref)}
    assert max(errs.values()) < TOL, errs


def test_state_block_heuristic():
    assert state_block_for(8, 32, 64, 64) == 64  # 256 programs of 64 x 64
    assert state_block_for(2, 16, 64, 64) == 32  # 32 programs of 64 x 64 would leave most SMs idle
    assert state_block_for(8, 12, 32, 64) == 32  # 96
    assert state_block_for(4, 16, 128, 128) == 64  # 256


def test_pallas_rejects_unsupported_options(monkeypatch):
    x = jnp.zeros((1, 8, 1, 320))
    with pytest.raises(ValueError, match="head dims"):
        chunk_gla_pallas(x, x, x, x)
    x = jnp.zeros((1, 8, 1, 32))
    with pytest.raises(ValueError, match="state_block"):
        chunk_gla_pallas(x, x, x, x, state_block=24)
    monkeypatch.setattr(pallas, "BLOCK_K", 24)
    with pytest.raises(ValueError, match="BLOCK_K"):
        chunk_gla_pallas(x, x, x, x)


KERNELS = ("_chunk_cumsum_kernel", "_state_fwd_kernel", "_chunk_A_off_kernel", "_chunk_A_diag_kernel",
           "_chunk_o_kernel", "_state_bwd_kernel", "_chunk_dv_kernel", "_chunk_dA_kernel", "_chunk_dqk_intra_kernel",
           "_chunk_dqkg_kernel")


@pytest.mark.parametrize("K,V,state_block", [(32, 64, None), (64, 64, 64), (64, 64, 32), (128, 128, 64),
                                             (40, 24, None)])
def test_lowers_to_triton(K, V, state_block, cuda_module):
    """The bf16 forward + backward export for CUDA: every kernel lowers to Triton IR (compiling it needs a GPU).
    The kernels are called compiled (interpret=False), as on a GPU; off GPU the dispatch would interpret them."""

    def fwd_bwd(q, k, v, gk, do):
        o, vjp = jax.vjp(lambda *x: chunk_gla_pallas(*x, interpret=False, state_block=state_block)[0], q, k, v, gk)
        return o, vjp(do)

    bf = jnp.bfloat16
    dims = ((K, bf), (K, bf), (V, bf), (K, jnp.float32), (V, bf))  # q, k, v, gk, do
    args = [jax.ShapeDtypeStruct((2, 200, 2, d), dtype) for d, dtype in dims]
    module = cuda_module(fwd_bwd, *args)
    missing = [name for name in KERNELS if f'name = "{name}"' not in module]
    assert not missing, f"kernels that did not lower to a Triton call: {missing}"
    # each kernel once (the backward reads the forward's gate cumsum)
    assert module.count("__gpu$xla.gpu.triton") >= len(KERNELS)


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
