"""RetNet layer: `fla.layers.MultiScaleRetention` (FLA 0.6.0) in JAX, with FLA's defaults for hidden_size=C,
num_heads=H.

FLA's defaults: mode='chunk', expand_k=1.0, expand_v=2.0 (K = C / H, V = 2C / H per head), no short convolutions, no
feature map, use_output_gate=True with gate_fn='swish' and fuse_norm (the output g_proj(x) gates the per-head
RMSNorm of o through `g_norm_swish_gate`, eps 1e-5), rotary embeddings on q and k (`fla.modules.RotaryEmbedding`
with dim=K: base 10000, the two halves of each head rotated together, not interleaved; positions and frequencies in
fp32; here cos / sin stay fp32, where FLA rounds its tables to q's dtype, bf16 in training), and `chunk_retention`: simple GLA with the fixed per-head log-decay log(1 - 2^(-5-h)) and scale K^-1/2.
Parameter names: q_proj, k_proj, v_proj, g_proj, o_proj, g_norm_swish_gate; FLA's `rotary.inv_freq` is a
non-persistent buffer, absent from its state dict, and computed here from K.

Positions: 0 at each row's first token in training; in decode mode, at each row's first real token
(`DecodeContext.positions`), as FLA's layer with an attention mask (it drops the padding and offsets the cached
steps by each row's own length).

Effective init: the harness re-draws every nn.Linear weight N(0, 0.02) (o_proj too: no FLA name ends in `c_proj`);
the norm weight is ones.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.layers.cache import RecurrentCache
from jaxgpt.layers.common import linear
from jaxgpt.layers.fla_modules import RMSNorm
from jaxgpt.layers.gla import projection_dim
from jaxgpt.ops import chunk_simple_gla, naive_recurrent_simple_gla
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import FLA_NORM_EPS, ROPE_THETA, retention_log_decays

EXPAND_K, EXPAND_V = 1.0, 2.0  # FLA's MultiScaleRetention defaults


def rotary_embedding(x: jax.Array, positions: jax.Array, base: float = ROPE_THETA) -> jax.Array:
    """`fla.modules.RotaryEmbedding` (not interleaved) on x [B, T, H, D] at positions [B, T] or [T]: the halves
    x1 = x[..., :D/2], x2 = x[..., D/2:] become (x1 cos - x2 sin, x2 cos + x1 sin) with angles position *
    base^(-2i/D), i < D/2, in fp32; the result in x's dtype."""
    D = x.shape[-1]
    inv_freq = 1.0 / base ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None, None] * inv_freq  # [(B,) T, 1, D/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class MultiScaleRetention(RecurrentCache, nnx.Module):
    """x [B, T, C] -> [B, T, C]; K = C / H and V = 2C / H per head. Decode mode: RecurrentCache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        C, H = cfg.n_embd, cfg.n_head
        key_dim, value_dim = projection_dim(cfg, EXPAND_K), projection_dim(cfg, EXPAND_V)
        if (key_dim // H) % 2:
            raise ValueError(f"retnet's rotary embedding needs an even key head dim, got {key_dim // H}")
        self.n_head, self.backend = H, cfg.linear_attn_backend
        self.q_proj = linear(cfg, C, key_dim, rngs, bias=False)
        self.k_proj = linear(cfg, C, key_dim, rngs, bias=False)
        self.v_proj = linear(cfg, C, value_dim, rngs, bias=False)
        self.g_proj = linear(cfg, C, value_dim, rngs, bias=False)
        self.o_proj = linear(cfg, value_dim, C, rngs, bias=False)
        self.g_norm_swish_gate = RMSNorm(value_dim // H, eps=FLA_NORM_EPS)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        x = self.mask_padding(x)
        q, k, v, g = (t.reshape(B, T, self.n_head, -1) for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                                                   self.g_proj(x)))  # [B, T, H, K|V]
        positions = jnp.arange(T) if self.context is None else self.context.positions(T)
        q, k = rotary_embedding(q, positions), rotary_embedding(k, positions)
        decay = jnp.broadcast_to(jnp.asarray(retention_log_decays(self.n_head), jnp.float32), (B, T, self.n_head))
        o = self.linear_attention(chunk_simple_gla, naive_recurrent_simple_gla, q, k, v, decay)  # [B, T, H, V]
        o = self.g_norm_swish_gate(o, g)
        return self.o_proj(o.reshape(B, T, -1))
