"""Norm / block axis (the benchmark's `LayerNorm` and `Block`): how norms and residuals wrap mixer and MLP."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import ModelConfig
from jaxgpt.layers.common import linear, proj_std
from jaxgpt.layers.mixers import MIXERS


def layer_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm (weight, optional bias, eps 1e-5) computed in fp32, as torch autocast does."""
    return nnx.LayerNorm(
        cfg.n_embd, epsilon=1e-5, use_bias=cfg.bias, dtype=jnp.float32, use_fast_variance=False, rngs=rngs
    )


class MLP(nnx.Module):
    """4x MLP with exact GELU: c_fc -> gelu -> c_proj."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.c_fc = linear(cfg, cfg.n_embd, 4 * cfg.n_embd, rngs)
        self.c_proj = linear(cfg, 4 * cfg.n_embd, cfg.n_embd, rngs, std=proj_std(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False))


class Block(nnx.Module):
    """`layernorm`: Pre-LN, x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.ln_1 = layer_norm(cfg, rngs)
        self.attn = MIXERS[cfg.mixer](cfg, layer, rngs)
        self.ln_2 = layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# Each entry: (block class, final-norm factory).
BLOCKS: dict[str, tuple[type[nnx.Module], object]] = {"layernorm": (Block, layer_norm)}
