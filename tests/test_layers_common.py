"""The custom-VJP building blocks of jaxgpt.layers.common compute what their plain-JAX forms compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.spec.config import ModelConfig
from jaxgpt.layers.common import qkv_heads
from jaxgpt.layers.mixers import CausalSelfAttention


def test_qkv_heads_matches_one_matmul_split_and_reshape():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 7, 24)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((24, 3 * 24)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal((2, 7, 4, 6)), jnp.float32) for _ in range(3)]

    def loss(parts):
        return sum(jnp.sum(jnp.sin(p) * c) for p, c in zip(parts, weights))

    def plain(x, w):
        return [p.reshape(2, 7, 4, 6) for p in jnp.split(x @ w, 3, axis=-1)]

    got = jax.jit(jax.value_and_grad(lambda x, w: loss(qkv_heads(x, w, 4)), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.value_and_grad(lambda x, w: loss(plain(x, w)), argnums=(0, 1)))(x, w)
    assert [p.shape for p in qkv_heads(x, w, 4)] == [(2, 7, 4, 6)] * 3
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, h in zip(got[1], want[1]):
        np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_attention_equals_fused_projection_then_split(bias):
    """CausalSelfAttention's q/k/v (qkv_heads, bias per third) against nanoGPT's c_attn(x).split(n_embd)."""
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50304, bias=bias, dtype="float32")
    attn = CausalSelfAttention(cfg, 0, nnx.Rngs(params=0))
    if bias:
        attn.c_attn.bias[...] = jnp.asarray(np.random.default_rng(2).standard_normal(48), jnp.float32)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 8, 16)), jnp.float32)

    def reference(x):
        q, k, v = (t.reshape(2, 8, 2, 8) for t in jnp.split(attn.c_attn(x), 3, axis=-1))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return attn.c_proj(y.reshape(2, 8, 16))

    np.testing.assert_allclose(attn(x), reference(x), rtol=1e-5, atol=1e-6)
