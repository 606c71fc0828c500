"""Which implementation the linear-attention ops run: explicit backends, 'auto' per device, config -> layer -> op."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgpt.ops.delta_rule.chunk as delta_chunk
import jaxgpt.ops.gla.chunk as gla_chunk
from jaxgpt.spec.config import ModelConfig
from jaxgpt.errors import UserError
from jaxgpt.model import init_model
from jaxgpt import ops
from jaxgpt.ops import utils


def test_resolve_backend(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert utils.resolve_backend("auto") == "xla"
    assert utils.resolve_backend("xla") == "xla" and utils.resolve_backend("pallas") == "pallas"
    with pytest.raises(ValueError, match="auto"):
        utils.resolve_backend("triton")
    monkeypatch.setattr(utils.jax, "default_backend", lambda: "gpu")
    assert utils.resolve_backend("auto") == "pallas"
    assert utils.resolve_backend("xla") == "xla"


class Called(Exception):
    pass


def _spy(monkeypatch, module, name):
    def fail(*args, **kwargs):
        raise Called(name)

    monkeypatch.setattr(module, name, fail)


@pytest.mark.parametrize("gpu", [False, True])
def test_ops_dispatch(monkeypatch, gpu):
    """On CPU 'auto' runs xla; on GPU it runs both ops' pallas paths (GLA's for head dims up to 256, padded to powers
    of two, and the default chunk sizes); an explicit 'pallas' always reaches the kernels."""
    if gpu:
        monkeypatch.setattr(utils.jax, "default_backend", lambda: "gpu")
    _spy(monkeypatch, delta_chunk, "chunk_delta_rule_pallas")
    _spy(monkeypatch, gla_chunk.pallas, "chunk_gla_pallas")
    x = jnp.ones((1, 8, 2, 16), jnp.float32)
    odd = jnp.ones((1, 8, 2, 24), jnp.float32)  # K = 24: the kernels take it zero-padded to 32
    beta = jnp.full((1, 8, 2), 0.5)
    auto_calls = (lambda: delta_chunk.chunk_delta_rule(x, x, x, beta), lambda: gla_chunk.chunk_gla(x, x, x, -x),
                  lambda: gla_chunk.chunk_gla(odd, odd, odd, -odd))
    for call in auto_calls:
        if gpu:
            with pytest.raises(Called):
                call()
        else:
            call()
    wide = jnp.ones((1, 8, 1, 320), jnp.float32)  # K = 320 > 256, or a non-default chunk size: GLA's auto stays on xla
    jax.eval_shape(lambda: gla_chunk.chunk_gla(wide, wide, wide, -wide))  # (traced only: no Called means xla)
    jax.eval_shape(lambda: gla_chunk.chunk_gla(x, x, x, -x, chunk_size=32))
    for call in (lambda: delta_chunk.chunk_delta_rule(x, x, x, beta, backend="pallas"),
                 lambda: gla_chunk.chunk_gla(x, x, x, -x, backend="pallas")):
        with pytest.raises(Called):
            call()


@pytest.mark.parametrize("mixer", ["gla_conv", "deltanet"])
def test_model_config_reaches_the_op(monkeypatch, mixer):
    _spy(monkeypatch, delta_chunk, "chunk_delta_rule_pallas")
    _spy(monkeypatch, gla_chunk.pallas, "chunk_gla_pallas")
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8, mixer=mixer, dtype="float32")
    idx = np.zeros((1, 8), np.int32)
    init_model(cfg)(idx)  # auto on CPU: xla
    with pytest.raises(Called):
        init_model(dataclasses.replace(cfg, linear_attn_backend="pallas"))(idx)
    with pytest.raises(UserError, match="linear_attn_backend"):
        dataclasses.replace(cfg, linear_attn_backend="cuda")


X, HEADS = jnp.ones((1, 8, 2, 16)), jnp.full((1, 8, 2), 0.5)
OPS = {  # op -> its arguments after q, k, v at the right shapes
    "chunk_gla": (ops.chunk_gla, {"gk": -X}),
    "chunk_delta_rule": (ops.chunk_delta_rule, {"beta": HEADS}),
    "chunk_gated_delta_rule": (ops.chunk_gated_delta_rule, {"g": -HEADS, "beta": HEADS}),
    "chunk_simple_gla": (ops.chunk_simple_gla, {"g": -HEADS}),
}


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bad,match", [
    ({"v": X[:, :5]}, r"v must be \[B, T, H, V\] = \[1, 8, 2, V\]"),  # T padded to a chunk would line up silently
    ({"k": X[..., :8]}, "q and k must both be"),
    ({"initial_state": jnp.ones((1, 2, 16, 8))}, "initial_state must be"),
    ({"gate": "shorter"}, r"must be \[1, 8, 2"),
])
def test_shapes_that_do_not_fit_are_one_line(op, backend, bad, match):
    """Every chunked op, on either backend, rejects inputs whose shapes do not fit together with one ValueError
    line naming the argument, before any padding or kernel."""
    fn, gates = OPS[op]
    if "gate" in bad:  # each of the op's per-step arguments, 3 steps short
        bad = {name: x[:, :5] for name, x in gates.items()}
    with pytest.raises(ValueError, match=match) as e:
        fn(**{"q": X, "k": X, "v": X} | gates | bad, backend=backend)
    assert "\n" not in str(e.value)


def test_gla_pallas_backend_off_gpu_runs_the_interpreter():
    """An explicit 'pallas' off GPU runs the kernels in Pallas's interpreter (what `--set
    model.linear_attn_backend=pallas` does on a CPU), with the xla path's result. (The other ops' interpreted
    kernels are checked against xla in their parity tests.)"""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(X.shape), jnp.float32) for _ in range(3))
    o_pallas, _ = ops.chunk_gla(q, k, v, -0.5 * X, backend="pallas")
    o_xla, _ = ops.chunk_gla(q, k, v, -0.5 * X, backend="xla")
    np.testing.assert_allclose(o_pallas, o_xla, rtol=1e-4, atol=1e-5)
