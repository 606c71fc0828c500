"""Mixer axis (the benchmark's `CausalSelfAttention`): token mixing across time, [B, T, C] -> [B, T, C].

The linear mixers stack FLA's layers (jaxgpt.layers.gla / deltanet / gated_deltanet) as
jaxgpt.spec.variants.linear_mixer_layer says.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.layers.cache import DecodeContext
from jaxgpt.layers.common import linear, proj_std, qkv_heads
from jaxgpt.layers.deltanet import DeltaNet
from jaxgpt.layers.gated_deltanet import GatedDeltaNet
from jaxgpt.layers.gla import GatedLinearAttention
from jaxgpt.layers.hgrn2 import HGRN2Attention
from jaxgpt.layers.linear_attention import LinearAttention
from jaxgpt.layers.mamba2 import Mamba2
from jaxgpt.layers.retnet import MultiScaleRetention
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.variants import LINEAR_MIXERS, linear_mixer_layer


def attention_implementation(dtype: jnp.dtype) -> str:
    """cuDNN's fused flash attention on GPU for 16-bit inputs; XLA's reference path otherwise.

    `jax.nn.dot_product_attention(implementation=None)` always picks XLA, which materialises the [T, T] scores.
    """
    return "cudnn" if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16) else "xla"


class CausalSelfAttention(nnx.Module):
    """`softmax`: causal multi-head attention, fused qkv projection `c_attn`, output `c_proj`.

    Decode mode (`init_cache`): keys and values of every token fed so far in a KV cache [B, max_length, H, D].
    """

    context: DecodeContext | None = None  # set by init_cache
    cached_key: nnx.Cache | None = None
    cached_value: nnx.Cache | None = None

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
        if self.context is None:
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention_implementation(q.dtype))
        else:
            y = self.cached_attention(q, k, v)
        return self.c_proj(y.reshape(B, T, C))  # y: [B, T, H, D]

    def init_cache(self, context: DecodeContext, max_length: int) -> None:
        """Decode mode with an empty KV cache of `max_length` steps in the compute dtype."""
        B, H, C = context.start.shape[0], self.n_head, self.c_proj.in_features
        self.context = context
        self.cached_key = nnx.Cache(jnp.zeros((B, max_length, H, C // H), self.c_attn.dtype))
        self.cached_value = nnx.Cache(jnp.zeros((B, max_length, H, C // H), self.c_attn.dtype))

    def cached_attention(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """q, k, v [B, T, H, D] of the tokens at sequence indices context.times(T) -> y [B, T, H, D]: k and v go into
        the cache, q attends to the cached keys up to its own index from its row's first real token (a padding
        query only to itself)."""
        index = (0, self.context.index[...], 0, 0)
        self.cached_key[...] = keys = jax.lax.dynamic_update_slice(self.cached_key[...], k, index)
        self.cached_value[...] = values = jax.lax.dynamic_update_slice(self.cached_value[...], v, index)
        s, t = jnp.arange(keys.shape[1]), self.context.times(q.shape[1])  # key and query indices
        first = jnp.minimum(self.context.start[...][:, None], t[None])  # [B, T]
        mask = (s <= t[:, None]) & (s >= first[..., None])  # [B, T, S]
        return jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None])


LINEAR_LAYERS: dict[str, Callable[..., nnx.Module]] = {
    "gla": GatedLinearAttention, "deltanet": DeltaNet, "gated_deltanet": GatedDeltaNet,
    "hgrn2": HGRN2Attention, "mamba2": Mamba2, "retnet": MultiScaleRetention,
    "linear_attn": LinearAttention,
}


def linear_mixer(mixer: str, cfg: ModelConfig, layer: int, rngs: nnx.Rngs) -> nnx.Module:
    kind, options = linear_mixer_layer(mixer, layer, cfg.n_layer)
    return LINEAR_LAYERS[kind](cfg, rngs, **options)


MIXERS: dict[str, Callable[[ModelConfig, int, nnx.Rngs], nnx.Module]] = {
    "softmax": CausalSelfAttention,
    **{name: partial(linear_mixer, name) for name in sorted(LINEAR_MIXERS)},
}
