"""CPU fp32 parity of Gated DeltaNet: the ops (jaxgpt.ops.gated_delta_rule) against FLA's naive PyTorch ops, the
gate against FLA's `naive_gdn_gate`, and the layer against torch_ref's twin (FLA's module tree on FLA's naive op).

Every comparison covers the outputs and the gradients w.r.t. every input (ops: q, k, v, g, beta and the initial
state, plus the final state for a random state cotangent; layer: the input and every parameter), rel err < 1e-5.
"""

import functools

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx

import jaxgpt.ops.gated_delta_rule as gdr
from jaxgpt.layers.gated_deltanet import GatedDeltaNet
from jaxgpt.ops import chunk_gated_delta_rule, gdn_gate, naive_recurrent_gated_delta_rule
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.variants import linear_mixer_layer
from parity_tests import test_mixer_parity
from parity_tests.test_ops_parity import assert_close, log_sigmoid, random_qkv, rel_err, torch_outputs_and_grads
from torch_ref.fla_naive import l2norm, load_fla_file, naive_gdn_gate
from torch_ref.gated_deltanet import NaiveGatedDeltaNet

TOL = 1e-5
FLA_GATED_DELTA = load_fla_file("ops/gated_delta_rule/naive.py")


@functools.cache
def jitted_vjp(op, **kwargs):
    """A jitted (inputs, do, dht) -> (o, h_T, grads w.r.t. every input) for `op(q, k, v, g, beta, h0, **kwargs)`;
    cached so that cases of equal shapes share one compilation."""

    def fn(q, k, v, g, beta, h0=None):
        return op(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs)

    @jax.jit
    def run(inputs, do, dht):
        (o, ht), vjp = jax.vjp(fn, *inputs)
        return o, ht, vjp((do, dht))

    return run


def jax_outputs_and_grads(op, inputs, do, dht, **kwargs):
    return jitted_vjp(op, **kwargs)([jnp.asarray(x) for x in inputs], jnp.asarray(do), jnp.asarray(dht))


def fla_recurrent(q, k, v, g, beta, h0=None):
    """FLA's naive recurrence with the in-kernel L2 norm (its argument order is q, k, v, beta, g)."""
    return FLA_GATED_DELTA.naive_recurrent_gated_delta_rule(
        l2norm(q), l2norm(k), v, beta, g, initial_state=h0, output_final_state=True
    )


def fla_chunked(q, k, v, g, beta, h0=None, chunk_size=64):
    """FLA's naive chunked form (a second reference for the chunked math)."""
    return FLA_GATED_DELTA.naive_chunk_gated_delta_rule(
        l2norm(q), l2norm(k), v, g, beta, chunk_size=chunk_size, initial_state=h0, output_final_state=True
    )


def gdn_log_decay(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Log decays as the layer makes them at init: FLA's A_log and dt_bias distributions, logits a ~ N(0, 1)."""
    H = shape[-1]
    A_log = np.log(rng.uniform(0, 16, H))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), H))
    dt_bias = dt + np.log(-np.expm1(-dt))
    a = rng.standard_normal(shape)
    return (-np.exp(A_log) * np.logaddexp(0.0, a + dt_bias)).astype(np.float32)


GATES = {
    "gdn_init": gdn_log_decay,
    "weak": lambda rng, shape: log_sigmoid(rng.standard_normal(shape).astype(np.float32)) / 16,  # long memory
}
SHAPES = [  # (B, T, H, K, V)
    (2, 1, 2, 16, 16),
    (1, 63, 2, 8, 12),
    (1, 65, 2, 16, 8),
    (2, 130, 2, 12, 20),
]
CASES = (  # (shape, with_h0, gate, chunk_size)
    [(s, True, "gdn_init", 64) for s in SHAPES]
    + [(SHAPES[2], False, "gdn_init", 64), (SHAPES[3], True, "weak", 64), (SHAPES[3], True, "weak", 16)]
)


@pytest.mark.parametrize(
    "shape,with_h0,gate,chunk_size",
    [pytest.param(*c, id="B{}T{}H{}K{}V{}".format(*c[0]) + f"-{'h0' if c[1] else 'no_h0'}-{c[2]}-C{c[3]}")
     for c in CASES],
)
def test_gated_delta_rule_parity(shape, with_h0, gate, chunk_size):
    B, T, H, K, V = shape
    rng = np.random.default_rng(T * 3 + K + chunk_size)
    q, k, v, h0, do, dht = random_qkv(rng, *shape)
    g = GATES[gate](rng, (B, T, H))
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H)).astype(np.float32)))
    inputs, names = [q, k, v, g, beta], ["q", "k", "v", "g", "beta"]
    if with_h0:
        inputs, names = inputs + [h0], names + ["h0"]

    io = (inputs, do, dht)
    ref = torch_outputs_and_grads(fla_recurrent, *io)
    flag = {"use_qk_l2norm_in_kernel": True}
    results = {
        "fla_naive_chunk": torch_outputs_and_grads(functools.partial(fla_chunked, chunk_size=chunk_size), *io),
        "jax_naive": jax_outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, do, dht, **flag),
        "jax_chunk": jax_outputs_and_grads(chunk_gated_delta_rule, inputs, do, dht, chunk_size=chunk_size, **flag),
    }
    assert_close(results, ref, names)
    assert_close({"chunk_vs_naive": results["jax_chunk"]}, results["jax_naive"], names)


def test_chunk_extreme_gates_stay_finite():
    """Per-step log decays down to about -60 (exp(G) underflows to 0 within a chunk): no inf/NaN reaches the output
    or the gradients (the decay matrix masks its exponent above the diagonal). Same shape as a parity case."""
    shape = SHAPES[3]
    B, T, H, K, V = shape
    rng = np.random.default_rng(1)
    q, k, v, h0, do, dht = random_qkv(rng, *shape)
    g = log_sigmoid(16 * rng.standard_normal((B, T, H)).astype(np.float32))
    assert g.min() < -50
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, T, H)).astype(np.float32)))
    inputs = [q, k, v, g, beta, h0]
    flag = {"use_qk_l2norm_in_kernel": True}
    naive = jax_outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, do, dht, **flag)
    chunk = jax_outputs_and_grads(chunk_gated_delta_rule, inputs, do, dht, chunk_size=64, **flag)
    for x in (chunk[0], chunk[1], *chunk[2]):
        assert bool(jnp.all(jnp.isfinite(x)))
    assert_close({"chunk_vs_naive": chunk}, naive, ["q", "k", "v", "g", "beta", "h0"])


@pytest.mark.parametrize("with_bias", [True, False])
def test_gate_parity(with_bias):
    """gdn_gate vs FLA's naive_gdn_gate, value and gradients w.r.t. a, A_log and dt_bias, with logits on both sides
    of softplus's threshold (20) and far below it."""
    B, T, H = 2, 9, 4
    rng = np.random.default_rng(7)
    a = (8 * rng.standard_normal((B, T, H))).astype(np.float32)
    a[0, :3] = [[25.0, -40.0, 19.5, 20.5]] * 3
    A_log = np.log(rng.uniform(0, 16, H)).astype(np.float32)
    dt_bias = rng.standard_normal(H).astype(np.float32)
    dy = rng.standard_normal((B, T, H)).astype(np.float32)
    inputs = [a, A_log] + ([dt_bias] if with_bias else [])

    ts = [torch.tensor(x, requires_grad=True) for x in inputs]
    y_ref = naive_gdn_gate(*ts, *([] if with_bias else [None]))
    (y_ref * torch.from_numpy(dy)).sum().backward()

    y, vjp = jax.vjp(lambda *xs: gdn_gate(*xs), *[jnp.asarray(x) for x in inputs])
    grads = vjp(jnp.asarray(dy))
    assert y.dtype == jnp.float32
    errors = {"y": rel_err(y, y_ref.detach())}
    errors |= {f"d{i}": rel_err(g, t.grad) for i, (g, t) in enumerate(zip(grads, ts))}
    assert max(errors.values()) < TOL, errors


def test_dispatch(monkeypatch):
    """'auto' runs xla on CPU and the Pallas path on GPU; an explicit 'pallas' reaches it with the resolved scale
    and every option."""
    calls = []
    monkeypatch.setattr(gdr, "chunk_gated_delta_rule_pallas", lambda *args: calls.append(args) or (args[2], None))
    x = jnp.ones((1, 8, 2, 16), jnp.float32)
    gb = jnp.full((1, 8, 2), -0.5)
    chunk_gated_delta_rule(x, x, x, gb, -gb)
    assert not calls
    chunk_gated_delta_rule(x, x, x, gb, -gb, use_qk_l2norm_in_kernel=True, chunk_size=32, backend="pallas")
    assert len(calls) == 1 and calls[0][5] == 16**-0.5 and calls[0][6:] == (None, False, True, 32)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    chunk_gated_delta_rule(x, x, x, gb, -gb)
    assert len(calls) == 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"backend": "triton"}, "backend must be one of"),
        ({"chunk_size": 48}, "power of two"),
        ({"chunk_size": 0}, "power of two"),
        ({"beta": jnp.ones((1, 8, 3))}, "beta must be"),
        ({"v": jnp.ones((1, 7, 2, 16))}, "v must be"),
        ({"k": jnp.ones((1, 8, 2, 8))}, "q and k"),
        ({"initial_state": jnp.ones((1, 2, 16, 8))}, "initial_state must be"),
    ],
)
def test_invalid_arguments(kwargs, match):
    x = jnp.ones((1, 8, 2, 16), jnp.float32)
    args = {"q": x, "k": x, "v": x, "g": jnp.full((1, 8, 2), -0.5), "beta": jnp.full((1, 8, 2), 0.5)} | kwargs
    with pytest.raises(ValueError, match=match):
        chunk_gated_delta_rule(**args)


# --- the layer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 63, 65, 130])
def test_layer_parity(T):
    """GatedDeltaNet vs torch_ref's twin (FLA's module tree on FLA's naive op and gate), output and the gradients
    w.r.t. the input and every parameter: test_mixer_parity's check, with A_log and dt_bias at FLA's init (the
    gate-bias argument is GLA's and unused here)."""
    test_mixer_parity.test_layer_parity("gated_deltanet", "weak", T)


def test_decay_parameters_keep_flas_init():
    """A_log and dt_bias on both sides follow FLA's init: exp(A_log) ~ U(0, 16) and softplus(dt_bias) = dt with
    log(dt) ~ U(log 1e-3, log 0.1) (Kolmogorov-Smirnov against the uniform, 1024 heads of width 1 per side)."""
    H = 1024
    jlayer = GatedDeltaNet(ModelConfig(n_layer=1, n_head=H, n_embd=H, block_size=8, dtype="float32"), nnx.Rngs(0))
    torch.manual_seed(0)
    tlayer = NaiveGatedDeltaNet(H, H)
    sides = {
        "jax": (np.asarray(jlayer.A_log[...]), np.asarray(jlayer.dt_bias[...])),
        "torch": (tlayer.A_log.detach().numpy(), tlayer.dt_bias.detach().numpy()),
    }
    for side, (A_log, dt_bias) in sides.items():
        dt = np.logaddexp(0.0, dt_bias.astype(np.float64))
        uniforms = {"A": np.exp(A_log) / 16, "dt": (np.log(dt) - math.log(1e-3)) / math.log(100)}
        for name, u in uniforms.items():
            assert u.min() >= 0 and u.max() <= 1 + 1e-6, (side, name)
            assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3, (side, name)


def test_mixer_stacks():
    assert [linear_mixer_layer("gated_deltanet", layer, 3) for layer in range(3)] == [("gated_deltanet", {})] * 3
    kinds = [linear_mixer_layer("gla_gated_deltanet", layer, 4)[0] for layer in range(4)]
    assert kinds == ["gated_deltanet", "gla", "gated_deltanet", "gla"]
