"""Norm / block axis (the benchmark's `LayerNorm` and `Block`): how norms and residuals wrap mixer and MLP.

Effective init: norm gains one (biases zero); the scalar gates of `rmsnorm_parallel_gated` are raw
parameters, 1/sqrt(2). MLP and mixer weights follow common.py.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.layers.common import compute_dtype, linear, proj_std
from jaxgpt.layers.mixers import MIXERS
from jaxgpt.ops.layernorm import add_layer_norm
from jaxgpt.ops.mlp import gelu, mlp
from jaxgpt.ops.utils import resolve_backend
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import LAYER_NORM_EPS, PARALLEL_GATE_INIT, RMS_NORM_EPS

NormFactory = Callable[[ModelConfig, nnx.Rngs], nnx.Module]


class LayerNorm(nnx.LayerNorm):
    """nnx.LayerNorm's parameters and init (weight `scale`, optional `bias`), computed in fp32 as torch autocast
    does, with torch's backward (`jaxgpt.ops.layernorm`). `add` fuses a residual add into the norm: on GPU one
    Pallas kernel each way, which writes the output in `out_dtype` (the compute dtype of the matmul it feeds);
    elsewhere XLA's add and `scaled_normalize`, fp32 output."""

    def __init__(self, *args, out_dtype: jnp.dtype = jnp.float32, **kwargs):
        super().__init__(*args, **kwargs)
        self.out_dtype = jnp.dtype(out_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.add(x, None, residual_out=False)[1]

    def add(self, x: jax.Array, r: jax.Array | None, residual_out: bool = True) -> tuple[jax.Array | None, jax.Array]:
        """(x + r, self(x + r)); r None: (x, self(x)), and the gradient reaching the returned x is summed into x's
        in the norm's backward kernel."""
        bias = self.bias[...].astype(jnp.float32) if self.use_bias else None
        return add_layer_norm(x, r, self.scale[...].astype(jnp.float32), bias, self.epsilon, self.out_dtype,
                              residual_out)


def layer_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> LayerNorm:
    """LayerNorm (weight, optional bias, eps 1e-5) computed in fp32, as torch autocast does."""
    return LayerNorm(cfg.n_embd, epsilon=LAYER_NORM_EPS, use_bias=cfg.bias, dtype=jnp.float32, rngs=rngs,
                     out_dtype=compute_dtype(cfg))


def rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm (gain only, eps 1e-6) computed in fp32: x / sqrt(mean(x^2) + eps) * weight."""
    return nnx.RMSNorm(cfg.n_embd, epsilon=RMS_NORM_EPS, dtype=jnp.float32, rngs=rngs)


class MLP(nnx.Module):
    """4x MLP with exact GELU: c_fc -> gelu -> c_proj (`gelu`: jaxgpt.ops.mlp.reference).

    Without biases, on GPU, the op `jaxgpt.ops.mlp.mlp` (same forward; its backward fuses the first matmul with
    GELU's derivative); with biases, and on other devices, the two nnx.Linear layers around `gelu`.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.c_fc = linear(cfg, cfg.n_embd, 4 * cfg.n_embd, rngs)
        self.c_proj = linear(cfg, 4 * cfg.n_embd, cfg.n_embd, rngs, std=proj_std(cfg))

    def __call__(self, x: jax.Array, backend: str = "auto") -> jax.Array:
        if not self.c_fc.use_bias and resolve_backend(backend) == "pallas":
            dt = self.c_fc.dtype  # nnx.Linear's promotion: input and kernel in the compute dtype
            return mlp(x.astype(dt), self.c_fc.kernel[...].astype(dt), self.c_proj.kernel[...].astype(dt),
                       backend=backend)
        return self.c_proj(gelu(self.c_fc(x)))


class Block(nnx.Module):
    """`layernorm` / `rmsnorm`: Pre-LN, x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs, norm: NormFactory = layer_norm):
        self.ln_1 = norm(cfg, rngs)
        self.attn = MIXERS[cfg.mixer](cfg, layer, rngs)
        self.ln_2 = norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fuses_residual:
            x, r = self.fused(x, None)
            return x + r
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    @property
    def fuses_residual(self) -> bool:
        """Whether `fused` applies: this class (not a subclass with its own __call__) with layer norms."""
        return type(self) is Block and isinstance(self.ln_1, LayerNorm)

    def fused(self, x: jax.Array, r: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """The block on the residual stream x + r, r a branch output still to be added (None: nothing pending)
        -> (x', r') with x' + r' the block's output. ln_1 adds r, ln_2 the attention output, inside the norms'
        kernels; the MLP output r' is left for the next norm to add (`GPT.__call__`).   x, r [B, T, C]."""
        x, h = self.ln_1.add(x, r)
        x, h = self.ln_2.add(x, self.attn(h))
        return x, self.mlp(h)


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
        self.attn_gate = nnx.Param(jnp.asarray(PARALLEL_GATE_INIT, jnp.float32))
        self.mlp_gate = nnx.Param(jnp.asarray(PARALLEL_GATE_INIT, jnp.float32))

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
