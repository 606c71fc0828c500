"""CPU fp32 parity of the linear-attention ops: JAX chunk vs JAX naive vs FLA's naive PyTorch ops.

FLA's naive references are loaded straight from their files (torch_ref.fla_naive): importing `fla.ops` pulls
in Triton, which a CPU machine lacks. Every comparison covers outputs, final states and the gradients w.r.t.
all inputs (including the initial state) for a random output/state cotangent.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jaxgpt.ops import chunk_delta_rule, chunk_gla, naive_recurrent_delta_rule, naive_recurrent_gla, short_conv
from torch_ref.fla_naive import l2norm, load_fla_file

TOL = 1e-5
FLA_GLA = load_fla_file("ops/gla/naive.py")
FLA_DELTA = load_fla_file("ops/delta_rule/naive.py")
FLA_GATED_DELTA = load_fla_file("ops/gated_delta_rule/naive.py")


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@functools.cache
def jitted_vjp(op, **kwargs):
    """A jitted (inputs, do, dht) -> (o, h_T, grads w.r.t. every input) for `op(*inputs, **kwargs)`.

    Cached per op so that tests with equal shapes share one compilation (compiling dominates the run time)."""

    def fn(q, k, v, gate, h0=None):
        return op(q, k, v, gate, initial_state=h0, output_final_state=True, **kwargs)

    @jax.jit
    def run(inputs, do, dht):
        (o, ht), vjp = jax.vjp(fn, *inputs)
        return o, ht, vjp((do, dht))

    return run


def jax_outputs_and_grads(op, inputs: list[np.ndarray], do: np.ndarray, dht: np.ndarray, **kwargs):
    """(o, h_T, grads w.r.t. every input) of a JAX op for the cotangents (do, dht)."""
    return jitted_vjp(op, **kwargs)([jnp.asarray(x) for x in inputs], jnp.asarray(do), jnp.asarray(dht))


def torch_outputs_and_grads(fn, inputs: list[np.ndarray], do: np.ndarray, dht: np.ndarray):
    """(o, h_T, grads w.r.t. every input) of a PyTorch op for the cotangents (do, dht)."""
    ts = [torch.tensor(x, requires_grad=True) for x in inputs]
    o, ht = fn(*ts)
    ((o * torch.from_numpy(do)).sum() + (ht * torch.from_numpy(dht)).sum()).backward()
    return o.detach(), ht.detach(), [t.grad for t in ts]


def assert_close(results: dict, ref: tuple, names: list[str]):
    """Every result (o, h_T, grads) within TOL of the reference, with the errors in the message."""
    for label, got in results.items():
        errs = {"o": rel_err(got[0], ref[0]), "ht": rel_err(got[1], ref[1])}
        errs |= {f"d{n}": rel_err(g, r) for n, g, r in zip(names, got[2], ref[2])}
        assert max(errs.values()) < TOL, f"{label}: {errs}"


def random_qkv(rng, B, T, H, K, V):
    q = rng.standard_normal((B, T, H, K), np.float32)
    k = rng.standard_normal((B, T, H, K), np.float32)
    v = rng.standard_normal((B, T, H, V), np.float32)
    h0 = rng.standard_normal((B, H, K, V), np.float32)
    do = rng.standard_normal((B, T, H, V), np.float32)
    dht = rng.standard_normal((B, H, K, V), np.float32)
    return q, k, v, h0, do, dht


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x).astype(np.float32)


GATES = {
    "weak": lambda x: log_sigmoid(x) / 16,  # FLA GLA's logsigmoid / gate_logit_normalizer(16)
    "strong": lambda x: log_sigmoid(4 * x),
    "extreme": lambda x: log_sigmoid(16 * x),  # per-step decays down to ~exp(-60)
}

SHAPES = [  # (B, T, H, K, V)
    (2, 1, 2, 16, 16),
    (1, 63, 2, 8, 12),
    (2, 64, 1, 16, 32),
    (1, 65, 2, 16, 8),
    (2, 130, 2, 12, 20),
]
# Every shape with an initial state; T = 65 also without one (compiles are the cost, so not every combination).
CASES = [pytest.param(s, True, id="B{}T{}H{}K{}V{}-h0".format(*s)) for s in SHAPES] + [
    pytest.param(SHAPES[3], False, id="B{}T{}H{}K{}V{}-no_h0".format(*SHAPES[3]))
]


@pytest.mark.parametrize("shape,with_h0", CASES)
@pytest.mark.parametrize("gate", ["weak", "strong"])
def test_gla_parity(shape, with_h0, gate):
    B, T, H, K, V = shape
    rng = np.random.default_rng(T * 7 + K)
    q, k, v, h0, do, dht = random_qkv(rng, *shape)
    gk = GATES[gate](rng.standard_normal((B, T, H, K), np.float32))
    inputs, names = [q, k, v, gk], ["q", "k", "v", "gk"]
    if with_h0:
        inputs, names = inputs + [h0], names + ["h0"]

    def fla_op(q, k, v, gk, h0=None):
        return FLA_GLA.naive_recurrent_gla(q, k, v, gk, initial_state=h0, output_final_state=True)

    ref = torch_outputs_and_grads(fla_op, inputs, do, dht)
    results = {
        "jax_naive": jax_outputs_and_grads(naive_recurrent_gla, inputs, do, dht),
        "jax_chunk": jax_outputs_and_grads(chunk_gla, inputs, do, dht),
    }
    assert_close(results, ref, names)
    assert_close({"chunk_vs_naive": results["jax_chunk"]}, results["jax_naive"], names)


def test_gla_chunk_extreme_gates_stay_finite():
    """Decays down to exp(-60) per step: exp(cumsum) would overflow fp32 in a 64-step chunk without the
    relative-to-sub-chunk factorisation. (Same shape as a parity case, so no new compilation.)"""
    shape = SHAPES[4]
    rng = np.random.default_rng(1)
    q, k, v, h0, do, dht = random_qkv(rng, *shape)
    gk = GATES["extreme"](rng.standard_normal(shape[:4], np.float32))
    assert gk.min() < -50
    inputs = [q, k, v, gk, h0]

    naive = jax_outputs_and_grads(naive_recurrent_gla, inputs, do, dht)
    chunk = jax_outputs_and_grads(chunk_gla, inputs, do, dht)
    for x in (chunk[0], chunk[1], *chunk[2]):
        assert bool(jnp.all(jnp.isfinite(x)))
    assert_close({"chunk_vs_naive": chunk}, naive, ["q", "k", "v", "gk", "h0"])


@pytest.mark.parametrize(
    "shape,with_h0,qk_l2norm",
    [pytest.param(*c.values, True, id=c.id + "-l2_in_kernel") for c in CASES]
    + [pytest.param(SHAPES[3], True, False, id="B{}T{}H{}K{}V{}-h0-prenormed_k".format(*SHAPES[3]))],
)
def test_delta_rule_parity(shape, with_h0, qk_l2norm):
    B, T, H, K, V = shape
    rng = np.random.default_rng(T * 5 + K)
    q, k, v, h0, do, dht = random_qkv(rng, *shape)
    if not qk_l2norm:  # the delta rule is only stable for ||k|| <= 1 (and beta in [0, 2])
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H)).astype(np.float32)))
    inputs, names = [q, k, v, beta], ["q", "k", "v", "beta"]
    if with_h0:
        inputs, names = inputs + [h0], names + ["h0"]

    def normed(q, k):
        return (l2norm(q), l2norm(k)) if qk_l2norm else (q, k)

    def fla_delta(q, k, v, beta, h0=None):  # head-first [B, H, T, D]
        q, k = normed(q, k)
        o, ht = FLA_DELTA.delta_rule_recurrence(
            *(x.transpose(1, 2) for x in (q, k, v, beta)), initial_state=h0, output_final_state=True
        )
        return o.transpose(1, 2), ht

    def fla_gated_delta(q, k, v, beta, h0=None):  # [B, T, H, D] with a zero log-decay
        q, k = normed(q, k)
        g = torch.zeros_like(beta)
        return FLA_GATED_DELTA.naive_recurrent_gated_delta_rule(
            q, k, v, beta, g, initial_state=h0, output_final_state=True
        )

    ref = torch_outputs_and_grads(fla_delta, inputs, do, dht)
    flag = {"use_qk_l2norm_in_kernel": qk_l2norm}
    results = {
        "fla_gated_delta_g0": torch_outputs_and_grads(fla_gated_delta, inputs, do, dht),
        "jax_naive": jax_outputs_and_grads(naive_recurrent_delta_rule, inputs, do, dht, **flag),
        "jax_chunk": jax_outputs_and_grads(chunk_delta_rule, inputs, do, dht, **flag),
    }
    assert_close(results, ref, names)
    assert_close({"chunk_vs_naive": results["jax_chunk"]}, results["jax_naive"], names)


@pytest.mark.parametrize("activation,bias", [("silu", True), ("silu", False), (None, True)])
@pytest.mark.parametrize("T", [1, 37])
def test_short_conv_parity(activation, bias, T):
    B, C, W = 2, 24, 4
    rng = np.random.default_rng(T)
    x = rng.standard_normal((B, T, C), np.float32)
    weight = rng.standard_normal((C, 1, W), np.float32) / 2
    b = rng.standard_normal((C,), np.float32)
    dy = rng.standard_normal((B, T, C), np.float32)
    inputs = [x, weight] + ([b] if bias else [])

    def torch_conv(x, weight, b=None):  # nn.Conv1d(C, C, W, padding=W-1, groups=C), first T outputs
        y = F.conv1d(x.transpose(1, 2), weight, b, padding=W - 1, groups=C)[..., :T].transpose(1, 2)
        return F.silu(y) if activation else y

    ts = [torch.tensor(a, requires_grad=True) for a in inputs]
    y_ref = torch_conv(*ts)
    (y_ref * torch.from_numpy(dy)).sum().backward()

    y, vjp = jax.vjp(jax.jit(lambda *a: short_conv(*a, activation=activation)), *[jnp.asarray(a) for a in inputs])
    grads = vjp(jnp.asarray(dy))
    errs = {"y": rel_err(y, y_ref.detach())} | {f"d{i}": rel_err(g, t.grad) for i, (g, t) in enumerate(zip(grads, ts))}
    assert max(errs.values()) < TOL, errs
