"""Mixer axis (the benchmark's `CausalSelfAttention`): token mixing across time, [B, T, C] -> [B, T, C]."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import ModelConfig
from jaxgpt.layers.common import linear, proj_std

class CausalSelfAttention(nnx.Module):
    """`softmax`: causal multi-head attention, fused qkv projection `c_attn`, output `c_proj`."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.n_head = cfg.n_head
        self.c_attn = linear(cfg, cfg.n_embd, 3 * cfg.n_embd, rngs)
        self.c_proj = linear(cfg, cfg.n_embd, cfg.n_embd, rngs, std=proj_std(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, C = x.shape
        q, k, v = (t.reshape(B, T, self.n_head, C // self.n_head) for t in jnp.split(self.c_attn(x), 3, axis=-1))
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)  # [B, T, H, D]; cuDNN flash on GPU
        return self.c_proj(y.reshape(B, T, C))


MIXERS: dict[str, type[nnx.Module]] = {"softmax": CausalSelfAttention}
