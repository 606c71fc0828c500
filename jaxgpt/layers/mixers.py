"""Mixer axis (the benchmark's `CausalSelfAttention`): token mixing across time, [B, T, C] -> [B, T, C].

The linear mixers stack FLA's layers (jaxgpt.layers.gla / deltanet / gated_deltanet) as
jaxgpt.spec.variants.linear_mixer_layer says.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.spec.config import ModelConfig
from jaxgpt.layers.common import linear, proj_std, qkv_heads
from jaxgpt.layers.deltanet import DeltaNet
from jaxgpt.layers.gated_deltanet import GatedDeltaNet
from jaxgpt.layers.gla import GatedLinearAttention
from jaxgpt.spec.variants import LINEAR_MIXERS, linear_mixer_layer


def attention_implementation(dtype: jnp.dtype) -> str:
    """cuDNN's fused flash attention on GPU for 16-bit inputs; XLA's reference path otherwise.

    `jax.nn.dot_product_attention(implementation=None)` always picks XLA, which materialises the [T, T] scores.
    """
    return "cudnn" if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else "xla"


class CausalSelfAttention(nnx.Module):
    """`softmax`: causal multi-head attention, fused qkv projection `c_attn`, output `c_proj`."""

    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.n_head = cfg.n_head
        self.c_attn = linear(cfg, cfg.n_embd, 3 * cfg.n_embd, rngs)
        self.c_proj = linear(cfg, cfg.n_embd, cfg.n_embd, rngs, std=proj_std(cfg))

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, C = x.shape
        dtype = self.c_attn.dtype
        q, k, v = qkv_heads(x.astype(dtype), self.c_attn.kernel[...].astype(dtype), self.n_head)
        if self.c_attn.use_bias:  # [3C] -> one [H, D] bias per third
            b = self.c_attn.bias[...].astype(dtype).reshape(3, self.n_head, C // self.n_head)
            q, k, v = q + b[0], k + b[1], v + b[2]
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention_implementation(q.dtype))
        return self.c_proj(y.reshape(B, T, C))  # y: [B, T, H, D]


LINEAR_LAYERS: dict[str, Callable[..., nnx.Module]] = {
    "gla": GatedLinearAttention, "deltanet": DeltaNet, "gated_deltanet": GatedDeltaNet
}


def linear_mixer(mixer: str, cfg: ModelConfig, layer: int, rngs: nnx.Rngs) -> nnx.Module:
    kind, options = linear_mixer_layer(mixer, layer, cfg.n_layer)
    return LINEAR_LAYERS[kind](cfg, rngs, **options)


MIXERS: dict[str, Callable[[ModelConfig, int, nnx.Rngs], nnx.Module]] = {
    "softmax": CausalSelfAttention,
    **{name: partial(linear_mixer, name) for name in sorted(LINEAR_MIXERS)},
}
