"""L2 normalisation with FLA's convention (`fla.modules.l2norm`): the eps sits inside the square root."""

import jax
import jax.numpy as jnp


def l2norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """y = x / sqrt(sum(x^2) + eps) over the last axis, computed in fp32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
