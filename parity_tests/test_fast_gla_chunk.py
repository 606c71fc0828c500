"""Parity of the chunk-level Pallas GLA kernels (jaxgpt.ops.gla.pallas_chunk, the A/B candidate to
jaxgpt.ops.gla.pallas).

CPU (CI): the kernels in Pallas interpret mode, fp32, against jaxgpt's XLA chunk_gla (`backend='xla'`, full-precision
products): outputs, final state and the gradients w.r.t. q, k, v, gk and the initial state, at ragged T (1, 70, 150:
one to three chunks), K != V, head dims zero-padded to powers of two (K = 40, V = 24), K = V = 128 (two key and two
value blocks), smaller key / value blocks through $JAXGPT_GLA_CHUNK (more blocks per program on tiny shapes), and
with and without an initial state; gates weak in some key dimensions and -20 per step in others (any factorisation
exp(G_t) * exp(-G_j) over more than a few steps would overflow). And the bf16 forward + backward lowers to Triton IR
for the GPU (`jax.export`, no GPU needed), every kernel by name.

GPU (`pytest -m gpu parity_tests/test_fast_gla_chunk.py` on the device): bf16 against FLA's Triton `chunk_gla` and an
fp32 reference, thresholds and shapes as test_fast_gla.py's test_bf16_pallas_parity_with_fla.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.ops import chunk_gla
from jaxgpt.ops.gla import pallas_chunk
from jaxgpt.ops.gla.pallas_chunk import chunk_gla_pallas
from parity_tests.helpers import rel_err
from parity_tests.test_fast_gla import (ACCURACY_FACTOR, FWD_TOL, GPU_CASES, GRAD_TOL, NAMES, NOISE_FACTOR,
                                        fla_outputs_and_grads, outputs_and_grads, random_inputs, shape_id)

TOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def xla_reference(inputs, cot, initial_state: bool = True):
    with jax.default_matmul_precision("highest"):
        return run(lambda *a, **kw: chunk_gla(*a, **kw, backend="xla"), inputs, cot, initial_state)


def run(op, inputs, cot, initial_state: bool = True):
    """(o, h_T, dq, dk, dv, dgk, dh0) as test_fast_gla's outputs_and_grads, or without an initial state (o, dq, dk,
    dv, dgk); compiled at XLA's lowest backend optimisation level (the interpreted kernels' compile dominates)."""

    def go(inputs, cot):
        if initial_state:
            (o, ht), vjp = jax.vjp(lambda *x: op(*x[:4], initial_state=x[4], output_final_state=True), *inputs)
            return (o, ht, *vjp(tuple(cot)))
        o, vjp = jax.vjp(lambda *x: op(*x)[0], *inputs[:4])
        return (o, *vjp(cot[0]))

    return jax.jit(go).lower(inputs, cot).compile(FAST_COMPILE)(inputs, cot)


INTERPRET_CASES = [  # ((B, T, H, K, V), $JAXGPT_GLA_CHUNK, initial state)
    ((1, 70, 2, 16, 32), "", True),
    ((2, 1, 1, 32, 16), "", True),  # T = 1
    ((1, 150, 1, 64, 32), "", False),  # K != V, three chunks, no initial state
    ((1, 70, 1, 128, 128), "", True),  # two key blocks (_chunk_A / _o / _dv loops, _dqkg grid), two value blocks
    ((1, 100, 2, 40, 24), "", True),  # both padded: K to 64, V to 32
    ((1, 130, 1, 64, 64), "block_k=16,block_v=32,dqkg=4", True),  # 4 key blocks, 2 value blocks
    ((1, 64, 1, 32, 64), "block_k=16,block_v=16", False),
]


def case_id(case) -> str:
    shape, env, h0 = case
    return shape_id(shape) + (f"_{env}" if env else "") + ("" if h0 else "_noh0")


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=case_id)
def test_interpret_matches_xla(case, monkeypatch):
    shape, env, h0 = case
    monkeypatch.setenv(pallas_chunk.ENV, env)
    rng = np.random.default_rng(0)
    inputs, cot = random_inputs(rng, *shape, strong=True)
    inputs, cot = [jnp.asarray(x) for x in inputs], [jnp.asarray(x) for x in cot]
    got = run(lambda *a, **kw: chunk_gla_pallas(*a, **kw, interpret=True), inputs, cot, h0)
    ref = xla_reference(inputs, cot, h0)
    names = NAMES if h0 else ("o", "dq", "dk", "dv", "dgk")
    assert [g.shape for g in got] == [r.shape for r in ref]  # the padded head dims are sliced off (and their grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in got)
    errs = {n: rel_err(g, r) for n, g, r in zip(names, got, ref)}
    assert max(errs.values()) < TOL, errs


def test_tuning_overrides(monkeypatch):
    monkeypatch.setenv(pallas_chunk.ENV, "block_v=32,dqkg=8")
    block_k, block_v, warps = pallas_chunk.tuning()
    assert (block_k, block_v, warps["dqkg"], warps["A"]) == (pallas_chunk.BLOCK_K, 32, 8, pallas_chunk.NUM_WARPS["A"])
    monkeypatch.setenv(pallas_chunk.ENV, "block_k=24")
    with pytest.raises(ValueError, match="block_k"):
        pallas_chunk.tuning()
    monkeypatch.setenv(pallas_chunk.ENV, "nope=2")
    with pytest.raises(ValueError, match="unknown key"):
        pallas_chunk.tuning()


def test_rejects_unsupported():
    x = jnp.zeros((1, 8, 1, 320))
    with pytest.raises(ValueError, match="head dims"):
        chunk_gla_pallas(x, x, x, x)
    x = jnp.zeros((1, 8, 1, 32))
    with pytest.raises(ValueError, match="state_block"):
        chunk_gla_pallas(x, x, x, x, state_block=24)


KERNELS = ("_state_fwd_kernel", "_chunk_cumsum_kernel", "_chunk_A_kernel", "_chunk_o_kernel", "_state_bwd_kernel",
           "_chunk_dv_kernel", "_chunk_dqkg_kernel")


@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (40, 24)])
def test_lowers_to_triton(K, V):
    """The bf16 forward + backward export for CUDA: every kernel lowers to Triton IR (compiling it needs a GPU)."""

    def fwd_bwd(q, k, v, gk, do):
        o, vjp = jax.vjp(lambda *x: chunk_gla_pallas(*x)[0], q, k, v, gk)
        return o, vjp(do)

    bf = jnp.bfloat16
    dims = ((K, bf), (K, bf), (V, bf), (K, jnp.float32), (V, bf))  # q, k, v, gk, do
    args = [jax.ShapeDtypeStruct((2, 200, 2, d), dtype) for d, dtype in dims]
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(*args)
    module = exported.mlir_module()
    missing = [name for name in KERNELS if f'name = "{name}"' not in module]
    assert not missing, f"kernels that did not lower to a Triton call: {missing}"
    assert module.count(triton) >= len(KERNELS) + 1  # the gate cumsum runs in the forward and the backward


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_CASES, ids=shape_id)
def test_bf16_pallas_chunk_parity_with_fla(shape):
    rng = np.random.default_rng(sum(shape))
    inputs, cot = random_inputs(rng, *shape)
    bf = jnp.bfloat16
    q, k, v = (jnp.asarray(x, bf) for x in inputs[:3])
    gk, h0 = (jnp.asarray(x) for x in inputs[3:])
    cot = (jnp.asarray(cot[0], bf), jnp.asarray(cot[1]))
    got = outputs_and_grads(chunk_gla_pallas, (q, k, v, gk, h0), cot)
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
        with open(os.path.join(out, "fast_gla_chunk_parity.jsonl"), "a") as f:
            f.write(json.dumps({"shape": shape, "report": report}) + "\n")
    print(shape, json.dumps(report))
    for name, e in report.items():
        tol = FWD_TOL if name in ("o", "ht") else GRAD_TOL
        assert e["jax_vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["jax_vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)
