"""The MLP op (jaxgpt.ops.mlp): the fused dgrad + GELU' kernel (Pallas's GPU interpreter on CPU) against XLA; its
division-free erf; values and gradients of the op and of `MLP` against the XLA path they replace; the dispatch
(fp32, biases, shapes that are not whole tiles and non-GPU devices take XLA); the kernel's lowering for CUDA."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgpt.layers.block as jblock
import jaxgpt.ops.mlp as mlp_ops
from jaxgpt.spec.config import MODEL_PRESETS, ModelConfig
from jaxgpt.ops.mlp import dgrad_gelu_pallas, gelu_bwd, mlp, mlp_xla, pallas, reference

bf16 = jnp.bfloat16
erf64 = np.vectorize(math.erf)


def _rel(got, want):
    got, want = (np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64) for t in (got, want))
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _normal(key, shape, scale=1.0, dtype=bf16):
    return (scale * jax.random.normal(jax.random.key(key), shape)).astype(dtype)


def test_erf_fast_and_gelu_grad():
    """The kernel's division-free erf and GELU' against fp64, over and past the clamped range."""
    z = np.linspace(-9, 9, 100_001)
    assert np.abs(np.asarray(pallas.erf_fast(jnp.asarray(z, jnp.float32)), np.float64) - erf64(z)).max() < 1e-6
    want = 0.5 * (1 + erf64(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    assert np.abs(np.asarray(pallas.gelu_grad(jnp.asarray(z, jnp.float32)), np.float64) - want).max() < 2e-6


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the interpreter bit for bit against XLA CPU's "
                    "rounding; on a GPU the compiled kernel is checked by the op / module tests and GPU parity")
def test_dgrad_kernel_matches_xla():
    """du = bf16(dy @ w_proj^T) * gelu'(u): the kernel (2 programs, 4 tiles of 128 x 256, 2 K steps, each program
    loops over 2 tiles) against XLA's bf16 matmul + GELU backward; every element written (none is NaN, the
    interpreter's fill for uninitialized memory, and all but a few match to the last bf16 bit)."""
    M, C, F = 256, 128, 512
    dy, w_proj, u = _normal(0, (M, C)), _normal(1, (F, C), 0.1), _normal(2, (M, F), 2.0)
    want = gelu_bwd(u, jnp.dot(dy, w_proj.T))
    got = dgrad_gelu_pallas(dy, w_proj, u, interpret=True)
    assert got.shape == want.shape and got.dtype == bf16
    assert not np.isnan(np.asarray(got, np.float32)).any()
    assert _rel(got, want) < 1e-3
    assert np.mean(np.asarray(got) != np.asarray(want)) < 0.01


def test_dgrad_kernel_rejects_partial_tiles():
    with pytest.raises(ValueError, match="unsupported"):
        dgrad_gelu_pallas(_normal(0, (200, 128)), _normal(1, (512, 128)), _normal(2, (200, 512)), interpret=True)


def _value_and_grads(f, *args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(_normal(9, y.shape, dtype=y.dtype))


def test_op_matches_xla_bf16():
    """mlp on the pallas path (interpreted kernel in the backward) against XLA autodiff of mlp_xla: output (the
    same XLA forward: identical) and the gradients of x, w_fc, w_proj."""
    C, F = 128, 512
    x, w_fc, w_proj = _normal(3, (2, 128, C)), _normal(4, (C, F), 0.1), _normal(5, (F, C), 0.05)
    want = _value_and_grads(mlp_xla, x, w_fc, w_proj)
    got = _value_and_grads(lambda *a: mlp(*a, backend="pallas"), x, w_fc, w_proj)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
    for g, w in zip(got[1], want[1], strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert _rel(g, w) < 4e-3


@pytest.mark.parametrize("shape,C,F,dtype", [
    ((3, 37, 96), 96, 384, jnp.float32),  # fp32: the kernel is 16-bit only
    ((3, 37, 128), 128, 512, bf16),  # 111 rows: not whole 128-row tiles
    ((2, 64, 96), 96, 384, bf16),  # C = 96: not whole 64-deep K steps; F = 384 not whole 256-wide tiles
])
def test_op_falls_back_to_xla(monkeypatch, shape, C, F, dtype):
    """Inputs the kernel does not take run mlp_xla on the pallas path too (same values and gradients, exactly)."""

    def called(*args, **kwargs):
        raise AssertionError("kernel called")

    monkeypatch.setattr(mlp_ops, "dgrad_gelu_pallas", called)
    x, w_fc, w_proj = _normal(6, shape, dtype=dtype), _normal(7, (C, F), 0.1, dtype), _normal(8, (F, C), 0.1, dtype)
    want = _value_and_grads(mlp_xla, x, w_fc, w_proj)
    got = _value_and_grads(lambda *a: mlp(*a, backend="pallas"), x, w_fc, w_proj)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def _cfg(bias=False, dtype="bfloat16"):
    return dataclasses.replace(ModelConfig(**MODEL_PRESETS["tiny"]), n_embd=128, n_head=4, bias=bias, dtype=dtype)


def test_module_matches_xla_path():
    """MLP (no bias, bf16 compute) through the op with the interpreted kernel vs the nnx.Linear + gelu path: same
    output, fp32 parameter gradients (via the casts) and input gradient; parameter names unchanged."""
    module = jblock.MLP(_cfg(), nnx.Rngs(0))
    graphdef, params = nnx.split(module)
    assert {k[0] for k, _ in nnx.to_flat_state(params)} == {"c_fc", "c_proj"}
    x = _normal(10, (2, 128, 128), dtype=jnp.float32)

    def run(backend):
        return _value_and_grads(lambda p, x: nnx.merge(graphdef, p)(x, backend=backend), params, x)

    want, got = run("xla"), run("pallas")
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert g.dtype == w.dtype
        assert _rel(g, w) < 4e-3


@pytest.mark.parametrize("bias,gpu,uses_op", [(False, False, False), (False, True, True), (True, True, False)])
def test_dispatch(monkeypatch, bias, gpu, uses_op):
    """auto: the op on GPU without biases; nnx.Linear + gelu on CPU (numerics unchanged) and with biases."""

    def called(*args, **kwargs):
        raise RuntimeError("op")

    module = jblock.MLP(_cfg(bias=bias, dtype="float32"), nnx.Rngs(0))
    x = jnp.ones((2, 4, 128), jnp.float32)
    want = module.c_proj(reference.gelu(module.c_fc(x)))
    monkeypatch.setattr(jblock, "mlp", called)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if gpu else "cpu")
    if uses_op:
        with pytest.raises(RuntimeError, match="op"):
            module(x)
    else:
        np.testing.assert_array_equal(np.asarray(module(x)), np.asarray(want))


def test_kernel_lowers_for_cuda():
    """The GPU path (w_proj read as stored, tiles transposed in shared memory) lowers to a Mosaic GPU call at
    gpt2-124m's shapes (compiling it needs a GPU)."""
    M, C, F = 12288, 768, 3072
    args = [jax.ShapeDtypeStruct(s, bf16) for s in ((M, C), (F, C), (M, F))]
    module = jax.export.export(jax.jit(dgrad_gelu_pallas), platforms=["cuda"])(*args).mlir_module()
    assert module.count("custom_call @mosaic_gpu") == 1
