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

    Computed in (at least) fp32 (as FLA's kernels accumulate), returned in the input dtype. In decode mode
    (`init_cache`) the last W-1 inputs [B, W-1, C] of each call precede the next call's (FLA's conv cache).
    """

    conv_state: nnx.Cache | None = None  # set by init_cache

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
        history = 0 if self.conv_state is None else self.conv_state.shape[1]
        if history:
            x = jnp.concatenate([self.conv_state[...], x], axis=1)
            self.conv_state[...] = x[:, -history:]
        y = short_conv(x.astype(acc), self.weight[...], bias, self.activation).astype(x.dtype)
        return y[:, history:] if history else y

    def init_cache(self, batch_size: int, dtype: jnp.dtype) -> None:
        """Decode mode: keep the last W-1 inputs (zeros before the first call) in `dtype`, the inputs' dtype."""
        hidden_size, _, kernel_size = self.weight.shape
        self.conv_state = nnx.Cache(jnp.zeros((batch_size, kernel_size - 1, hidden_size), dtype))


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
