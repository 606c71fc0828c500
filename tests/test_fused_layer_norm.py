"""The fused residual add + layer norm (jaxgpt.ops.layernorm): Pallas kernels (interpret mode on CPU) against the XLA
path, forward and gradients, fp32 and bf16, widths that are not powers of two, ragged row counts; the dispatch; the
kernels' lowering to Triton; and a whole model with the kernels in its blocks against the XLA blocks."""

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgpt.layers.block as jblock
from jaxgpt.spec.config import MODEL_PRESETS, ModelConfig
from jaxgpt.model import init_model
from jaxgpt.ops import layernorm
from jaxgpt.ops.layernorm import add_layer_norm, pallas


def _rel(got, want):
    got, want = (np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64) for t in (got, want))
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def _fwd_bwd(backend, x, r, scale, bias, out_dtype, cts, residual_out=True):
    """Outputs and gradients w.r.t. (x, r, scale, bias); y is rounded to out_dtype on both paths (the pallas path
    writes it so, the xla path's consumer would cast it)."""

    def f(x, r, scale, bias):
        x_new, y = add_layer_norm(x, r, scale, bias, 1e-5, out_dtype, residual_out, backend=backend)
        return x_new, y.astype(out_dtype)

    out, vjp = jax.vjp(f, x, r, scale, bias)
    return out, vjp(cts)


CASES = [  # (rows, C, with r, with bias, residual_out)
    (37, 768, True, True, True),  # C not a power of two (1024-wide tiles, 256 masked columns); rows not whole tiles
    (37, 100, True, False, True),
    (5, 96, False, True, True),  # no add: x passes through, its gradient is summed in the backward
    (19, 48, False, False, False),  # a final norm: no residual stream out
    (37, 1024, True, True, True),  # gpt2-345m's width: two rows per backward block, the last one half masked
    (64, 1600, True, True, True),  # gpt2-1.5b's width
]


@pytest.mark.parametrize("N,C,has_r,has_bias,residual_out", CASES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 4e-3)])
def test_pallas_matches_xla(N, C, has_r, has_bias, residual_out, dtype, tol):
    """x fp32 (the residual stream), r and y in `dtype` (bf16: a branch output and the next matmul's input)."""
    rng = np.random.default_rng(N * C)
    x = jnp.asarray(rng.normal(0.3, 2, (N, C)), jnp.float32)
    r = jnp.asarray(rng.normal(0, 1, (N, C)), dtype) if has_r else None
    scale = jnp.asarray(rng.normal(1, 0.5, C), jnp.float32)
    bias = jnp.asarray(rng.normal(0, 0.5, C), jnp.float32) if has_bias else None
    cts = (jnp.asarray(rng.normal(0, 1, (N, C)), jnp.float32) if residual_out else None,
           jnp.asarray(rng.normal(0, 1, (N, C)), dtype))
    want = _fwd_bwd("xla", x, r, scale, bias, dtype, cts, residual_out)
    got = _fwd_bwd("pallas", x, r, scale, bias, dtype, cts, residual_out)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert _rel(g, w) < tol
    (x_new, y), (dx, dr, dscale, dbias) = got
    assert y.dtype == dtype and dx.dtype == x.dtype
    assert (dr is None) != has_r and (dbias is None) != has_bias
    if has_r:
        assert dr.dtype == dtype
    if residual_out and not has_r:
        assert x_new is x


def test_backward_programs_loop_over_row_blocks(monkeypatch):
    """Few backward programs (each summing its weight-gradient partials over several row blocks, the last one
    partly past the rows): same gradients."""
    monkeypatch.setattr(pallas, "SM_COUNT", 1)
    monkeypatch.setattr(pallas, "TILES", {  # 2 rows per block at C = 96 -> 128 wide
        "fwd": {0: pallas.Tiles(256, 4, 1)}, "bwd": {0: pallas.Tiles(256, 4, 1, programs_per_sm=3)}})
    rng = np.random.default_rng(1)
    N, C = 29, 96  # 15 blocks: 3 programs x 5 blocks, the last block half past N
    x, r, dres, dy = (jnp.asarray(rng.normal(0, 1, (N, C)), jnp.float32) for _ in range(4))
    scale, bias = (jnp.asarray(rng.normal(1, 0.5, C), jnp.float32) for _ in range(2))
    want = _fwd_bwd("xla", x, r, scale, bias, jnp.float32, (dres, dy))
    got = _fwd_bwd("pallas", x, r, scale, bias, jnp.float32, (dres, dy))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _rel(g, w) < 1e-5


def test_dispatch(monkeypatch):
    """auto: xla on CPU (y in fp32), pallas on GPU (whichever device runs the test)."""
    x = jnp.ones((2, 3, 8), jnp.float32)
    scale = jnp.ones(8)
    monkeypatch.setattr(layernorm.jax, "default_backend", lambda: "cpu")
    _, y = add_layer_norm(x, x, scale, None, 1e-5, jnp.bfloat16)
    assert y.dtype == jnp.float32  # xla

    def called(*args, **kwargs):
        raise RuntimeError("pallas")

    monkeypatch.setattr(layernorm, "add_layer_norm_pallas", called)
    monkeypatch.setattr(layernorm.jax, "default_backend", lambda: "gpu")
    with pytest.raises(RuntimeError, match="pallas"):
        add_layer_norm(x, x, scale, None, 1e-5, jnp.bfloat16)


@pytest.mark.parametrize("C", [768, 1600])
def test_lowers_to_triton(C, cuda_module):
    """The bf16 forward + backward export for CUDA: both kernels lower to Triton IR (compiling them needs a GPU)."""

    def fwd_bwd(x, r, scale, bias, dres, dy):
        out, vjp = jax.vjp(lambda *a: add_layer_norm_pallas(*a, 1e-5, jnp.bfloat16), x, r, scale, bias)
        return out, vjp((dres, dy))

    add_layer_norm_pallas = pallas.add_layer_norm_pallas
    shapes = [((4, 256, C), jnp.float32), ((4, 256, C), jnp.bfloat16), ((C,), jnp.float32), ((C,), jnp.float32),
              ((4, 256, C), jnp.float32), ((4, 256, C), jnp.bfloat16)]
    module = cuda_module(fwd_bwd, *(jax.ShapeDtypeStruct(s, d) for s, d in shapes))
    for name in ("add_layer_norm_fwd", "add_layer_norm_bwd"):
        assert name in module, f"{name} did not lower to a Triton call"
    assert module.count("__gpu$xla.gpu.triton") >= 2


@pytest.mark.parametrize("bias", [False, True])
def test_model_with_pallas_blocks_matches_xla(monkeypatch, bias):
    """A tiny layernorm model (C = 96, not a power of two) with every norm and residual add in the kernels
    (interpret mode) computes the XLA path's loss and gradients."""
    cfg = dataclasses.replace(ModelConfig(**MODEL_PRESETS["tiny"]), n_embd=96, n_head=4, n_layer=2, block_size=16,
                              bias=bias)
    model = init_model(cfg, seed=0)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
    idx = np.random.default_rng(0).integers(0, 97, (2, cfg.block_size)).astype(np.int32)

    def loss_and_grads():  # jitted, as training runs it: one compile instead of op-by-op dispatch
        return jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(idx, (idx + 1) % 97)))(params)

    want = loss_and_grads()
    monkeypatch.setattr(jblock, "add_layer_norm", partial(add_layer_norm, backend="pallas"))
    got = loss_and_grads()
    assert abs(float(got[0]) - float(want[0])) < 1e-5 * abs(float(want[0]))
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert _rel(g, w) < 1e-5
