"""Norm / block axis (the benchmark's `LayerNorm` and `Block`): how norms and residuals wrap mixer and MLP.

Effective init: norm gains one (biases zero); the scalar gates of `rmsnorm_parallel_gated` are raw
parameters, 1/sqrt(2). MLP and mixer weights follow common.py.
"""

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import ModelConfig
from jaxgpt.layers.common import linear, proj_std
from jaxgpt.layers.mixers import MIXERS

NormFactory = Callable[[ModelConfig, nnx.Rngs], nnx.Module]


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


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm's parameters and init (weight `scale`, optional `bias`), computed in fp32 as torch autocast
    does, with `scaled_normalize`'s hand-written backward."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = scaled_normalize(x, self.scale[...].astype(jnp.float32), self.epsilon)
        return y + self.bias[...].astype(jnp.float32) if self.use_bias else y


def layer_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> LayerNorm:
    """LayerNorm (weight, optional bias, eps 1e-5) computed in fp32, as torch autocast does."""
    return LayerNorm(cfg.n_embd, epsilon=1e-5, use_bias=cfg.bias, dtype=jnp.float32, rngs=rngs)


def rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm (gain only, eps 1e-6) computed in fp32: x / sqrt(mean(x^2) + eps) * weight."""
    return nnx.RMSNorm(cfg.n_embd, epsilon=1e-6, dtype=jnp.float32, rngs=rngs)


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


def _gelu_bwd(x, dy):
    xf = x.astype(jnp.float32)
    cdf = _phi(xf)
    pdf = jnp.exp(-0.5 * xf * xf) * (1 / math.sqrt(2 * math.pi))
    return ((dy.astype(jnp.float32) * (cdf + xf * pdf)).astype(x.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class MLP(nnx.Module):
    """4x MLP with exact GELU: c_fc -> gelu -> c_proj."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.c_fc = linear(cfg, cfg.n_embd, 4 * cfg.n_embd, rngs)
        self.c_proj = linear(cfg, 4 * cfg.n_embd, cfg.n_embd, rngs, std=proj_std(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(gelu(self.c_fc(x)))


class Block(nnx.Module):
    """`layernorm` / `rmsnorm`: Pre-LN, x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, norm: NormFactory = layer_norm):
        self.ln_1 = norm(cfg, rngs)
        self.attn = MIXERS[cfg.mixer](cfg, layer, rngs)
        self.ln_2 = norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ParallelBlock(nnx.Module):
    """`rmsnorm_parallel`: one norm feeds both branches, h = ln_1(x); x = x + attn(h) + mlp(h)."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.ln_1 = rms_norm(cfg, rngs)
        self.attn = MIXERS[cfg.mixer](cfg, layer, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.ln_1(x)
        return x + self.attn(h) + self.mlp(h)


class SandwichBlock(Block):
    """`rmsnorm_post`: x = x + ln_1_out(attn(ln_1(x))); x = x + ln_2_out(mlp(ln_2(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        super().__init__(cfg, layer, rngs, norm=rms_norm)
        self.ln_1_out = rms_norm(cfg, rngs)
        self.ln_2_out = rms_norm(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.ln_1_out(self.attn(self.ln_1(x)))
        return x + self.ln_2_out(self.mlp(self.ln_2(x)))


class GatedParallelBlock(Block):
    """`rmsnorm_parallel_gated`: x = x + attn_gate*attn(ln_1(x)) + mlp_gate*mlp(ln_2(x)), gates init 1/sqrt(2)."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        super().__init__(cfg, layer, rngs, norm=rms_norm)
        self.attn_gate = nnx.Param(jnp.asarray(1 / math.sqrt(2), jnp.float32))
        self.mlp_gate = nnx.Param(jnp.asarray(1 / math.sqrt(2), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.attn_gate[...] * self.attn(self.ln_1(x)) + self.mlp_gate[...] * self.mlp(self.ln_2(x))


# Each entry: (block factory (cfg, layer, rngs), final-norm factory).
BLOCKS: dict[str, tuple[Callable[..., nnx.Module], NormFactory]] = {
    "layernorm": (Block, layer_norm),
    "rmsnorm": (partial(Block, norm=rms_norm), rms_norm),
    "rmsnorm_parallel": (ParallelBlock, rms_norm),
    "rmsnorm_post": (SandwichBlock, rms_norm),
    "rmsnorm_parallel_gated": (GatedParallelBlock, rms_norm),
}
