"""The fused LM head + cross-entropy statistics (jaxgpt.ops.cross_entropy): the Pallas kernel (interpret mode on CPU)
against the XLA pass, fp32 and bf16, ragged rows and vocabularies; head_stats' values and gradients against autodiff
of the plain head; every loss through GPT.loss on the fused path against the logits path; the dispatch; the lowering
(one Triton kernel, nothing [N, V]-sized in fp32 and no [N, V] elementwise pass in the backward)."""

import dataclasses
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgpt.model as jmodel
from jaxgpt.spec import variants
from jaxgpt.spec.config import ModelConfig
from jaxgpt.losses import LOSSES, OUTPUT_TRANSFORMS, cross_entropy
from jaxgpt.model import init_model
from jaxgpt.ops import cross_entropy as ce_ops
from jaxgpt.ops.cross_entropy import head_stats, lm_head_stats, softmax_stats_pallas, softmax_stats_xla


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    """fp32 matmuls in fp32 on every backend (XLA's GPU default would take TF32, ~1e-4 off the reference)."""
    with jax.default_matmul_precision("highest"):
        yield


def _rel(got, want):
    got, want = (np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64) for t in (got, want))
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("N,V,chunk", [
    (7, 37, None),  # one chunk, V not a power of two (64 wide, 27 masked)
    (13, 300, 128),  # 3 chunks, the last 84 of 128 masked
    (9, 1000, 256),  # 4 chunks, the last 232 of 256 masked
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_matches_xla(N, V, chunk, dtype):
    rng = np.random.default_rng(N * V)
    z = jnp.asarray(rng.normal(0, 4, (N, V)), dtype)
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    targets = targets.at[0].set(V - 1).at[1].set(0)  # the last column (in the masked chunk) and the first
    want = softmax_stats_xla(z, targets)
    got = softmax_stats_pallas(z, targets, interpret=True, chunk=chunk)
    for name, g, w in zip(want._fields, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert np.all(np.isfinite(np.asarray(g.astype(jnp.float32)))), name
        # e: both round the same fp32 exp to z's dtype (the sums differ by summation order only)
        assert _rel(g, w) < (1e-6 if dtype == jnp.float32 or name != "e" else 4e-3), name
    np.testing.assert_array_equal(np.asarray(got.z_target), np.asarray(z.astype(jnp.float32))[np.arange(N), targets])


def _plain_stats(h, w, targets):
    """The unfused formulation: logits and jax.nn.logsumexp, differentiated by autodiff."""
    z = (h @ w.astype(h.dtype).T).astype(jnp.float32)
    return jax.nn.logsumexp(z, -1), jnp.take_along_axis(z, targets[..., None], -1)[..., 0], z.mean(-1)


def _weighted(stats_fn, cts, use_mean=True):
    """A scalar of the statistics with cotangents cts (z_mean left out unless use_mean: a symbolic-zero cotangent)."""
    def f(h, w):
        stats = stats_fn(h, w)[: 3 if use_mean else 2]
        return sum((s * c).sum() for s, c in zip(stats, cts))
    return f


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("use_mean", [True, False])
def test_head_stats_values_and_gradients(backend, use_mean):
    """fp32, [B, T] leading axes, V = 300 (3 kernel chunks of 128): values and gradients w.r.t. h and w vs autodiff of
    the plain head; z_mean unused skips the mean terms of the backward."""
    rng = np.random.default_rng(3)
    B, T, C, V = 2, 5, 24, 300
    h = jnp.asarray(rng.normal(0, 1, (B, T, C)), jnp.float32)
    w = jnp.asarray(rng.normal(0, 1, (V, C)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    cts = [jnp.asarray(rng.normal(0, 1, (B, T)), jnp.float32) for _ in range(3)]
    fused = partial(head_stats, targets=targets, backend=backend)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ce_ops.head, "softmax_stats_pallas", partial(softmax_stats_pallas, chunk=128))
        got = fused(h, w)
        got_grads = jax.grad(_weighted(fused, cts, use_mean), (0, 1))(h, w)
    want = _plain_stats(h, w, targets)
    want_grads = jax.grad(_weighted(lambda h, w: _plain_stats(h, w, targets), cts, use_mean), (0, 1))(h, w)
    for g, w_ in zip(got, want, strict=True):
        assert g.shape == (B, T) and g.dtype == jnp.float32
        assert _rel(g, w_) < 1e-6
    for g, w_ in zip(got_grads, want_grads, strict=True):
        assert g.shape == w_.shape and g.dtype == w_.dtype
        assert _rel(g, w_) < 1e-5


def test_head_stats_bf16_dtypes():
    """bf16 h with an fp32 weight: dh in bf16, dw in fp32 (accumulated in fp32, rounded nowhere), within bf16 rounding
    of the fp32 head's gradients."""
    rng = np.random.default_rng(4)
    N, C, V = 16, 32, 200
    h = jnp.asarray(rng.normal(0, 1, (N, C)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(0, 0.3, (V, C)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    cts = [jnp.asarray(rng.normal(0, 1, N), jnp.float32) for _ in range(3)]
    for backend in ("xla", "pallas"):
        dh, dw = jax.grad(_weighted(partial(head_stats, targets=targets, backend=backend), cts), (0, 1))(h, w)
        assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
        want_dh, want_dw = jax.grad(_weighted(lambda h, w: _plain_stats(h, w, targets), cts), (0, 1))(
            h.astype(jnp.float32), w)
        assert _rel(dh, want_dh) < 1e-2 and _rel(dw, want_dw) < 1e-2


TINY = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, dtype="float32")


def _loss_and_grads(model, idx, targets, train, logits_path):
    graphdef, params = nnx.split(model)

    def f(p):
        m = nnx.merge(graphdef, p)
        if logits_path:  # the loss of the materialised logits, without the fused head
            return (LOSSES[m.cfg.loss] if train else cross_entropy)(m(idx), targets)
        return m.loss(idx, targets, train=train)

    return jax.value_and_grad(f)(params)


def _assert_same_loss_and_grads(got, want):
    """(loss, grads) pairs: the loss within 1e-6, every gradient leaf within 1e-5 (relative)."""
    assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-6)
    for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert _rel(g, w) < 1e-5


@pytest.mark.parametrize("loss", list(variants.AXES["loss"]))
def test_gpt_loss_fused_matches_logits_path(loss):
    """Every loss (training and evaluation) through GPT.loss vs the loss of the model's logits, fp32: the fused head
    where the loss allows it (its statistics are those of the raw logits), the logits path where it does not."""
    model = init_model(dataclasses.replace(TINY, loss=loss), seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 50257, (2, TINY.block_size)).astype(np.int32)
    targets = rng.integers(0, 50257, (2, TINY.block_size)).astype(np.int32)
    for train in (True, False):
        want = _loss_and_grads(model, idx, targets, train, logits_path=True)
        got = _loss_and_grads(model, idx, targets, train, logits_path=False)
        _assert_same_loss_and_grads(got, want)


def test_gpt_loss_takes_the_fused_head_where_it_can(monkeypatch):
    calls = []
    monkeypatch.setattr(jmodel, "head_stats", lambda *a: calls.append(1) or head_stats(*a))
    idx = np.zeros((1, TINY.block_size), np.int32)
    for loss in variants.AXES["loss"]:
        model = init_model(dataclasses.replace(TINY, loss=loss), seed=0)
        for train in (True, False):
            calls.clear()
            jax.eval_shape(lambda: model.loss(idx, idx, train=train))
            capped = loss in OUTPUT_TRANSFORMS or (train and LOSSES[loss].transform is not None)
            assert calls == ([] if capped else [1]), (loss, train)


def test_gpt_loss_pallas_matches_xla(monkeypatch):
    """poly_ls_z (all three statistics) on the tiny model with the kernel in interpret mode (V = 50304: 7 chunks)."""
    model = init_model(dataclasses.replace(TINY, loss="poly_ls_z"), seed=0)
    rng = np.random.default_rng(1)
    idx, targets = (rng.integers(0, 50257, (1, TINY.block_size)).astype(np.int32) for _ in range(2))
    want = _loss_and_grads(model, idx, targets, True, logits_path=False)
    monkeypatch.setattr(jmodel, "head_stats", partial(head_stats, backend="pallas"))
    got = _loss_and_grads(model, idx, targets, True, logits_path=False)
    _assert_same_loss_and_grads(got, want)


def test_dispatch(monkeypatch):
    """auto: the XLA pass on CPU, the kernel on GPU; an explicit 'pallas' off GPU runs it in the interpreter."""
    kernels = []
    monkeypatch.setattr(ce_ops, "lm_head_stats", lambda h, w, t, kernel: kernels.append(kernel) or (t, t, t))
    monkeypatch.setattr(ce_ops.jax, "default_backend", lambda: "cpu")
    h, w, t = jnp.ones((2, 3, 8)), jnp.ones((11, 8)), jnp.zeros((2, 3), jnp.int32)
    head_stats(h, w, t)
    head_stats(h, w, t, backend="pallas")
    monkeypatch.setattr(ce_ops.jax, "default_backend", lambda: "gpu")
    head_stats(h, w, t)
    head_stats(h, w, t, backend="xla")
    assert kernels == ["xla", "pallas_interpret", "pallas", "xla"]


def test_lowers_to_one_triton_kernel_and_no_nv_pass(cuda_module):
    """The bf16 fused head's forward + backward exported for CUDA: one Triton kernel (softmax_stats), and the [N, V]
    arrays are only the logits (the forward matmul's output, the kernel's in-place operand and result) and the two
    backward matmuls' operand: no fp32 [N, V] array, no [N, V] elementwise op."""
    N, C, V = 48, 64, 1000

    def fwd_bwd(h, w, targets):
        def loss(h, w):
            lse, z_target, z_mean = lm_head_stats(h, w, targets, "pallas")
            return (lse - z_target).mean() + 0.1 * (z_mean - z_target).mean()  # label smoothing: all three
        return jax.value_and_grad(loss, (0, 1))(h, w)

    module = cuda_module(fwd_bwd, jax.ShapeDtypeStruct((N, C), jnp.bfloat16), jax.ShapeDtypeStruct((V, C), jnp.float32),
                         jax.ShapeDtypeStruct((N,), jnp.int32))
    assert module.count("__gpu$xla.gpu.triton") == 1 and "softmax_stats" in module
    ops = [line for line in module.splitlines() if f"{N}x{V}x" in line and "=" in line]
    assert not any(f"{N}x{V}xf32" in line for line in ops), ops
    kinds = sorted(re.search(r"= (\S+)", line).group(1).split("(")[0] for line in ops)
    assert kinds == ["stablehlo.custom_call", "stablehlo.dot_general", "stablehlo.dot_general",
                     "stablehlo.dot_general"], ops
