"""The custom-VJP building blocks of jaxgpt.layers.common compute exactly what their plain-JAX forms compute."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.layers.common import split_heads3


def test_split_heads3_matches_split_and_reshape():
    rng = np.random.default_rng(1)
    qkv = jnp.asarray(rng.standard_normal((2, 7, 3 * 24)), jnp.float32)
    weights = [jnp.asarray(rng.standard_normal((2, 7, 4, 6)), jnp.float32) for _ in range(3)]

    def loss(parts):
        return sum(jnp.sum(jnp.sin(p) * w) for p, w in zip(parts, weights))

    got = jax.jit(jax.value_and_grad(lambda t: loss(split_heads3(t, 4))))(qkv)
    want = jax.jit(jax.value_and_grad(lambda t: loss([p.reshape(2, 7, 4, 6) for p in jnp.split(t, 3, axis=-1)])))(qkv)
    assert [p.shape for p in split_heads3(qkv, 4)] == [(2, 7, 4, 6)] * 3
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
