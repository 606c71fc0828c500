"""The fast delta rule (`chunk_delta_rule(..., backend='pallas')`: hand-written backward, Pallas kernels).

CPU: in fp32 with the kernels interpreted it must match the 'xla' reference path (itself checked against FLA's
naive ops in test_ops_parity.py) to rel < 1e-5 in the output, the final state and every gradient, ragged T included.
GPU (`pytest -m gpu`): in bf16 it must match FLA 0.6.0's Triton `chunk_delta_rule` within FLA's thresholds (or
1.5x FLA's own bf16-vs-fp32 noise) and be as close to the fp32 reference as FLA's bf16 is (within 25%).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.ops import chunk_delta_rule
from jaxgpt.ops.delta_rule import pallas as delta_pallas
from parity_tests.test_ops_parity import assert_close, jax_outputs_and_grads, random_qkv, rel_err

FWD_TOL, GRAD_TOL, NOISE_FACTOR, ACCURACY_FACTOR = 4e-3, 8e-3, 1.5, 1.25  # as parity_tests/test_gpu_parity.py


def delta_inputs(rng, B, T, H, K, V):
    q, k, v, h0, do, dht = random_qkv(rng, B, T, H, K, V)
    beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, H))))).astype(np.float32)
    return [q, k, v, beta, h0], do, dht


@pytest.mark.parametrize("shape,block_v", [((2, 130, 2, 16, 32), None), ((2, 130, 2, 16, 32), 16),
                                           ((1, 1, 2, 16, 16), None), ((1, 130, 2, 128, 128), None)],
                         ids=lambda s: "B{}T{}H{}K{}V{}".format(*s) if isinstance(s, tuple) else f"bv{s}")
def test_pallas_matches_xla_fp32(shape, block_v):
    """K = V = 128: the per-chunk kernels take the head dims in 64-column blocks (grid axes and loops)."""
    inputs, do, dht = delta_inputs(np.random.default_rng(shape[1]), *shape)
    flag = {"use_qk_l2norm_in_kernel": True}
    ref = jax_outputs_and_grads(chunk_delta_rule, inputs, do, dht, backend="xla", **flag)
    got = jax_outputs_and_grads(chunk_delta_rule, inputs, do, dht, backend="pallas", block_v=block_v, **flag)
    assert_close({"pallas_vs_xla": got}, ref, ["q", "k", "v", "beta", "h0"])


@pytest.mark.parametrize("chunk_size,tril_inverse", [(64, "trsm"), (24, "pallas")])
def test_xla_wy_fallback_matches_xla_fp32(monkeypatch, chunk_size, tril_inverse):
    """The forward WY step in XLA (`wy_fwd_xla`: the 'trsm' option, and chunk sizes that are not multiples of 16),
    the other kernels as usual: same results."""
    inputs, do, dht = delta_inputs(np.random.default_rng(1), 1, 70, 2, 16, 16)
    ref = jax_outputs_and_grads(chunk_delta_rule, inputs, do, dht, backend="xla", chunk_size=chunk_size)
    monkeypatch.setattr(delta_pallas, "wy_fwd_pallas", None)  # fails if the fused WY kernel were used
    got = jax_outputs_and_grads(chunk_delta_rule, inputs, do, dht, backend="pallas", chunk_size=chunk_size,
                                tril_inverse=tril_inverse)
    assert_close({"xla_wy_vs_xla": got}, ref, ["q", "k", "v", "beta", "h0"])


@pytest.mark.parametrize("C,correlated", [(64, False), (64, True), (32, False)])
def test_wy_fwd_inverse(C, correlated):
    """T = (I + strict_tril(diag(beta) K K^T))^{-1} from `_wy_fwd_kernel` (interpreted, fp32) against the fp64
    inverse (errors 3e-8 .. 2e-7); W, U against T diag(beta) K, T diag(beta) V. Correlated keys (all near one
    direction) make A close to beta * ones below the diagonal: the hard case."""
    rng = np.random.default_rng(C)
    k = rng.standard_normal((1, 2 * C, 3, 64)) + (4.0 if correlated else 0.0)  # [B, T, H, K], two chunks
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    v = rng.standard_normal((1, 2 * C, 3, 32)).astype(np.float32)
    beta = rng.uniform(0.2, 1.0, (1, 2 * C, 3)).astype(np.float32)
    options = delta_pallas.Options(scale=1.0, chunk=C, block_v=32, tril_inverse="pallas", interpret=True)
    t_inv, w, u = (np.asarray(x, np.float64) for x in delta_pallas.wy_fwd_pallas(*map(jnp.asarray, (k, v, beta)),
                                                                                 options))

    def chunked(x):  # [1, 2C, 3, D] -> [N, H, C, D] fp64
        return x.reshape(2, C, 3, -1).transpose(0, 2, 1, 3).astype(np.float64)

    kc, vc, bc, tc = chunked(k), chunked(v), chunked(beta[..., None]), chunked(t_inv)
    exact = np.linalg.inv(np.tril(bc * (kc @ kc.swapaxes(-1, -2)), -1) + np.eye(C))
    assert rel_err(tc, exact) < 1e-6
    assert np.array_equal(np.triu(tc, 1), np.zeros_like(tc))
    assert rel_err(chunked(w), exact @ (bc * kc)) < 2e-6 and rel_err(chunked(u), exact @ (bc * vc)) < 2e-6  # 5e-7


KERNELS = ("_wy_fwd_kernel", "_state_fwd_kernel", "_output_fwd_kernel", "_dv_local_kernel", "_state_bwd_kernel",
           "_dqkw_kernel", "_wy_bwd_kernel")


@pytest.mark.parametrize("D", [64, 128])
def test_lowers_to_triton(D, cuda_module):
    """The bf16 forward + backward export for CUDA: every kernel lowers to Triton IR (compiling needs a GPU)."""
    options = delta_pallas.Options(scale=0.125, chunk=64, block_v=32, tril_inverse="pallas", interpret=False)

    def fwd_bwd(q, k, v, beta, h0, do):
        (o, ht), vjp = jax.vjp(lambda *x: delta_pallas.delta_rule(*x, options), q, k, v, beta, h0)
        return o, vjp((do, jnp.zeros_like(ht)))

    bf = jnp.bfloat16
    B, T, H = 2, 192, 2
    args = [jax.ShapeDtypeStruct((B, T, H, D), bf) for _ in range(3)] + [
        jax.ShapeDtypeStruct((B, T, H), bf), jax.ShapeDtypeStruct((B, H, D, D), jnp.float32),
        jax.ShapeDtypeStruct((B, T, H, D), bf)]
    module = cuda_module(fwd_bwd, *args)
    missing = [name for name in KERNELS if f'name = "{name}"' not in module]
    assert not missing, f"kernels that did not lower to a Triton call: {missing}"
    assert not any(f"stablehlo.{op}" in module for op in ("transpose", "triangular_solve", "dot_general"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 1024, 12, 64), (2, 4096, 16, 64), (1, 16384, 16, 128),
                                   (2, 1000, 4, 64), (2, 65, 4, 64), (2, 1, 4, 64)],
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
    fla = [o.detach()] + list(torch.autograd.grad(o, ts, torch.tensor(do, device="cuda", dtype=torch.bfloat16)))
    fla = [x.float().cpu().numpy() for x in fla]
    for name, g, r, f in zip(["o", "dq", "dk", "dv", "dbeta"], got, ref, fla):
        tol = FWD_TOL if name == "o" else GRAD_TOL
        e = {"vs_fp32": rel_err(g, r), "vs_fla": rel_err(g, f), "fla_vs_fp32": rel_err(f, r)}
        assert e["vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)
