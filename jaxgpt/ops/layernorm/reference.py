"""Layer norm with torch's backward, in XLA: `scaled_normalize` and the residual add + layer norm built from it.

This is the reference (and the CPU path) for `jaxgpt.ops.layernorm.pallas`: x_new = x + r by XLA's add, then
`scaled_normalize(x_new) + bias` in fp32.
"""

from functools import partial

import jax
import jax.numpy as jnp


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def scaled_normalize(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x_hat * scale in fp32, x_hat = (x - mean) / sqrt(var + eps) over the last axis.   x [..., C], scale [C].

    The backward is torch's layer-norm backward from the saved mean and 1/std ([..., 1] each), with g = dy * scale:
        dx = (g - mean(g) - x_hat * mean(g * x_hat)) / std,    dscale = sum over rows of dy * x_hat
    so the statistics are not recomputed and no [..., C] intermediate is stored besides x itself.
    """
    return _normalize(x, eps)[0] * scale


def _normalize(x, eps):
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    return (xf - mean) * rstd, mean, rstd


def _scaled_normalize_fwd(x, scale, eps):
    x_hat, mean, rstd = _normalize(x, eps)
    # The barrier stores x, mean and rstd as computed here; without it XLA recomputes the statistics (and x
    # itself, from the residual add's operands) inside every backward fusion that reads them.
    x, mean, rstd = jax.lax.optimization_barrier((x, mean, rstd))
    return x_hat * scale, (x, scale, mean, rstd)


def _scaled_normalize_bwd(eps, residuals, dy):
    x, scale, mean, rstd = residuals
    x_hat = (x.astype(jnp.float32) - mean) * rstd
    dy = dy.astype(jnp.float32)
    g = dy * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - x_hat * (g * x_hat).mean(-1, keepdims=True))
    dscale = (dy * x_hat).reshape(-1, scale.shape[-1]).sum(0)
    return dx.astype(x.dtype), dscale.astype(scale.dtype)


scaled_normalize.defvjp(_scaled_normalize_fwd, _scaled_normalize_bwd)


def layer_norm_xla(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
    """scaled_normalize(x) + bias, fp32 (scale and bias fp32)."""
    y = scaled_normalize(x, scale, eps)
    return y if bias is None else y + bias


def add_layer_norm_xla(
    x: jax.Array, r: jax.Array | None, scale: jax.Array, bias: jax.Array | None, eps: float
) -> tuple[jax.Array, jax.Array]:
    """(x + r, layer_norm(x + r)); r None: (x, layer_norm(x)). y in fp32."""
    x = x if r is None else x + r
    return x, layer_norm_xla(x, scale, bias, eps)
