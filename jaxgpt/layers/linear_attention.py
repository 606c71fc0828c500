"""Linear attention layer: `fla.layers.LinearAttention` (FLA 0.6.0) in JAX, with FLA's defaults for hidden_size=C,
num_heads=H.

FLA's defaults: mode='chunk', expand_k=expand_v=1.0 (K = V = C / H per head), feature_map='elementwise_product'
(a `HadamardFeatureMap` per head dim for q and one for k, not tied: layer1(x) * layer2(x), two K x K nn.Linear
with bias, shared by all heads), no q / k normalisation (norm_q=norm_k=False), output_norm='rmsnorm' (per-head
RMSNorm `norm`, eps 1e-5, no output gate), and `chunk_linear_attn` with normalize=do_feature_map_norm=False and
scale K^-1/2: simple GLA without decay, o_t = K^-1/2 S_t^T q_t with S_t = S_{t-1} + k_t v_t^T.
Parameter names: q_proj, k_proj, v_proj, feature_map_q.layer1, feature_map_q.layer2, feature_map_k.layer1,
feature_map_k.layer2, norm, o_proj.

Effective init: the harness re-draws every nn.Linear (the feature maps' too): weights N(0, 0.02) (o_proj too: no
FLA name ends in `c_proj`), biases zero; the norm weight is ones.
"""

import jax
from flax import nnx

from jaxgpt.layers.cache import RecurrentCache
from jaxgpt.layers.common import linear
from jaxgpt.layers.fla_modules import RMSNorm
from jaxgpt.layers.gla import projection_dim
from jaxgpt.ops import chunk_simple_gla, naive_recurrent_simple_gla
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import FLA_NORM_EPS


class HadamardFeatureMap(nnx.Module):
    """`fla.modules.feature_map.HadamardFeatureMap(head_dim)`: x [..., D] -> layer1(x) * layer2(x) [..., D]."""

    def __init__(self, cfg: ModelConfig, head_dim: int, rngs: nnx.Rngs):
        self.layer1 = linear(cfg, head_dim, head_dim, rngs, bias=True)
        self.layer2 = linear(cfg, head_dim, head_dim, rngs, bias=True)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer1(x) * self.layer2(x)


class LinearAttention(RecurrentCache, nnx.Module):
    """x [B, T, C] -> [B, T, C]; K = V = C / H per head. Decode mode: RecurrentCache (a padding token has x = 0,
    so v = 0 and it adds nothing to the state, whatever the feature maps' biases make of its k)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        C, H = cfg.n_embd, cfg.n_head
        dim = projection_dim(cfg, 1.0)
        self.n_head, self.backend = H, cfg.linear_attn_backend
        self.q_proj = linear(cfg, C, dim, rngs, bias=False)
        self.k_proj = linear(cfg, C, dim, rngs, bias=False)
        self.v_proj = linear(cfg, C, dim, rngs, bias=False)
        self.feature_map_q = HadamardFeatureMap(cfg, dim // H, rngs)
        self.feature_map_k = HadamardFeatureMap(cfg, dim // H, rngs)
        self.norm = RMSNorm(dim // H, eps=FLA_NORM_EPS)
        self.o_proj = linear(cfg, dim, C, rngs, bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        x = self.mask_padding(x)
        q, k, v = (t.reshape(B, T, self.n_head, -1) for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x)))
        q, k = self.feature_map_q(q), self.feature_map_k(k)  # [B, T, H, K]
        o = self.linear_attention(chunk_simple_gla, naive_recurrent_simple_gla, q, k, v, None)  # [B, T, H, V]
        return self.o_proj(self.norm(o).reshape(B, T, -1))
