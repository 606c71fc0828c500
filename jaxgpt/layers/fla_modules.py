"""Twins of the `fla.modules` that FLA's linear-attention layers are built from: ShortConvolution, (gated) RMSNorm.

Parameter names and layouts are FLA's (`weight`, conv kernels in torch Conv1d layout [C, 1, W]), so
jaxgpt.convert passes them through unchanged.

Effective init: neither is an nn.Linear/nn.Embedding, so the harness's re-init leaves them alone.
ShortConvolution keeps PyTorch's Conv1d default, kaiming-uniform: weight (and bias) ~ U(-b, b) with
b = 1/sqrt(fan_in), fan_in = W for a depthwise kernel; the norm weights are ones.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.ops import short_conv
from jaxgpt.ops.utils import accumulation_dtype


class ShortConvolution(nnx.Module):
    """`fla.modules.ShortConvolution`: causal depthwise conv over time + optional SiLU, [B, T, C] -> [B, T, C].

    Computed in (at least) fp32 (as FLA's kernels accumulate), returned in the input dtype.
    """

    def __init__(self, hidden_size: int, kernel_size: int, rngs: nnx.Rngs, bias: bool = False,
                 activation: str | None = "silu"):
        bound = 1 / math.sqrt(kernel_size)
        uniform = nnx.initializers.uniform(2 * bound)  # U(0, 2b), shifted below to U(-b, b)
        self.activation = activation
        self.weight = nnx.Param(uniform(rngs.params(), (hidden_size, 1, kernel_size), jnp.float32) - bound)
        self.bias = nnx.Param(uniform(rngs.params(), (hidden_size,), jnp.float32) - bound) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        acc = accumulation_dtype(x.dtype)
        return short_conv(x.astype(acc), self.weight[...], bias, self.activation).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Per-head RMSNorm over the last axis in (at least) fp32, optionally with FLA's fused swish output gate.

    `RMSNorm(x)` is `fla.modules.RMSNorm`; `RMSNorm(x, g)` is `fla.modules.FusedRMSNormGated` (activation swish):
        y = x / sqrt(mean(x^2) + eps) * weight [* g * sigmoid(g)]
    x, g: [..., D]; y in x's dtype.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((hidden_size,), jnp.float32))

    def __call__(self, x: jax.Array, g: jax.Array | None = None) -> jax.Array:
        acc = accumulation_dtype(x.dtype)
        xf = x.astype(acc)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps) * self.weight[...]
        if g is not None:
            y = y * jax.nn.silu(g.astype(acc))
        return y.astype(x.dtype)
