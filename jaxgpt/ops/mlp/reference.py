"""The MLP's exact GELU and the MLP itself in XLA: the reference (and the CPU path) for `jaxgpt.ops.mlp.pallas`.

`gelu` is the exact GELU of `jaxgpt.layers.block`'s MLP (here so that the fused op shares it); `mlp_xla` is
`MLP.__call__`'s math without biases: y = gelu(x @ w_fc) @ w_proj, every matmul in the operands' dtype.
"""

import math

import jax
import jax.numpy as jnp


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), computed in fp32 and returned in x's dtype (as torch does for bf16 tensors).

    The custom VJP keeps only x for the backward, dx = dy * (Phi(x) + x * phi(x)), so the forward writes one
    tensor instead of also storing fp32-derived intermediates.
    Phi: for 16-bit x torch's 0.5 * (1 + erf(x / sqrt 2)) (XLA's erf is ~4x cheaper than erfc, and GELU's
    forward is arithmetic-bound on GPUs); for fp32 x jax.nn.gelu's erfc form, because 1 + erf cancels in the
    x << 0 tail, enough to move a scalar gate's fp32 gradient 1.4e-5 from the fp64 reference
    (rmsnorm_parallel_gated), past the parity bound. In 16-bit the tail's error (< 1e-7 absolute) is below
    the output's rounding.
    """
    xf = x.astype(jnp.float32)
    if jnp.finfo(x.dtype).bits >= 32:
        return jax.nn.gelu(xf, approximate=False).astype(x.dtype)
    return (xf * _phi(xf)).astype(x.dtype)


def _phi(x: jax.Array) -> jax.Array:
    """Standard normal CDF 0.5 * (1 + erf(x / sqrt 2)), fp32."""
    return 0.5 * (1 + jax.lax.erf(x * (1 / math.sqrt(2))))


def _gelu_fwd(x):
    return gelu(x), x


def gelu_bwd(x: jax.Array, dy: jax.Array) -> jax.Array:
    """dy * gelu'(x) in fp32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    cdf = _phi(xf)
    pdf = jnp.exp(-0.5 * xf * xf) * (1 / math.sqrt(2 * math.pi))
    return (dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype)


def _gelu_bwd(x, dy):
    return (gelu_bwd(x, dy),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


def mlp_xla(x: jax.Array, w_fc: jax.Array, w_proj: jax.Array) -> jax.Array:
    """gelu(x @ w_fc) @ w_proj in XLA (autodiff through `gelu`'s VJP).   x [..., C], w_fc [C, F], w_proj [F, C]."""
    return jnp.dot(gelu(jnp.dot(x, w_fc)), w_proj)
