"""The fast delta rule (`chunk_delta_rule(..., backend='pallas')`: hand-written backward, Pallas recurrences).

CPU: in fp32 with the kernels interpreted it must match the 'xla' reference path (itself checked against FLA's
naive ops in test_ops_parity.py) to rel < 1e-5 in the output, the final state and every gradient, ragged T included.
GPU (`pytest -m gpu`): in bf16 it must match FLA 0.6.0's Triton `chunk_delta_rule` within FLA's thresholds (or
1.5x FLA's own bf16-vs-fp32 noise) and be as close to the fp32 reference as FLA's bf16 is (within 25%).
"""

import numpy as np
import pytest

from jaxgpt.ops import chunk_delta_rule
from parity_tests.test_ops_parity import assert_close, jax_outputs_and_grads, random_qkv, rel_err

FWD_TOL, GRAD_TOL, NOISE_FACTOR, ACCURACY_FACTOR = 4e-3, 8e-3, 1.5, 1.25  # as parity_tests/test_gpu_parity.py


def delta_inputs(rng, B, T, H, K, V):
    q, k, v, h0, do, dht = random_qkv(rng, B, T, H, K, V)
    beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, H))))).astype(np.float32)
    return [q, k, v, beta, h0], do, dht


@pytest.mark.parametrize("shape", [(2, 130, 2, 16, 32), (1, 1, 2, 16, 16)], ids=lambda s: "B{}T{}H{}K{}V{}".format(*s))
def test_pallas_matches_xla_fp32(shape):
    inputs, do, dht = delta_inputs(np.random.default_rng(shape[1]), *shape)
    flag = {"use_qk_l2norm_in_kernel": True}
    ref = jax_outputs_and_grads(chunk_delta_rule, inputs, do, dht, backend="xla", **flag)
    got = jax_outputs_and_grads(chunk_delta_rule, inputs, do, dht, backend="pallas", **flag)
    assert_close({"pallas_vs_xla": got}, ref, ["q", "k", "v", "beta", "h0"])


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 1024, 12, 64), (2, 1000, 4, 64), (2, 65, 4, 64), (2, 1, 4, 64)],
                         ids=lambda s: "B{}T{}H{}D{}".format(*s))
def test_bf16_pallas_vs_fla(shape):
    import jax
    import jax.numpy as jnp
    import torch
    from fla.ops.delta_rule import chunk_delta_rule as fla_chunk_delta_rule

    B, T, H, D = shape
    rng = np.random.default_rng(T)
    inputs, do, _ = delta_inputs(rng, B, T, H, D, D)
    inputs, do = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in inputs[:4]], do  # bf16 values

    def jax_grads(backend, dtype):
        def fn(q, k, v, beta, do):
            o, vjp = jax.vjp(lambda *a: chunk_delta_rule(*a, use_qk_l2norm_in_kernel=True, backend=backend)[0],
                             q, k, v, beta)
            return [o, *vjp(do.astype(o.dtype))]

        return [np.asarray(x, np.float32) for x in jax.jit(fn)(*[jnp.asarray(x, dtype) for x in inputs + [do]])]

    with jax.default_matmul_precision("highest"):
        ref = jax_grads("xla", jnp.float32)
    got = jax_grads("pallas", jnp.bfloat16)
    ts = [torch.tensor(x, device="cuda", dtype=torch.bfloat16, requires_grad=True) for x in inputs]
    o, _ = fla_chunk_delta_rule(*ts, use_qk_l2norm_in_kernel=True)
    fla = [o] + list(torch.autograd.grad(o, ts, torch.tensor(do, device="cuda", dtype=torch.bfloat16)))
    fla = [x.float().cpu().numpy() for x in fla]
    for name, g, r, f in zip(["o", "dq", "dk", "dv", "dbeta"], got, ref, fla):
        tol = FWD_TOL if name == "o" else GRAD_TOL
        e = {"vs_fp32": rel_err(g, r), "vs_fla": rel_err(g, f), "fla_vs_fp32": rel_err(f, r)}
        assert e["vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)
