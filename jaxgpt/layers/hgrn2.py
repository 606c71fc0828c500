"""HGRN2 layer: `fla.layers.HGRN2Attention` (FLA 0.6.0) in JAX.

The harness builds `HGRN2Attention(hidden_size=C, num_heads=H, expand_ratio=None)`, all else FLA's defaults
(docs/variants.md). FLA's default expand_ratio=128 sets num_heads = C // 128 and ignores num_heads (6 heads at
C=768, none at all below C=128); with expand_ratio=None FLA takes expand_ratio = C // H, so the layer has the
model's H heads with forget (key) and input (value) head dims both C / H. Defaults: mode 'chunk', no short
convolutions, g_norm an RMSNorm over the whole hidden size C (eps 1e-5, the eps `rms_norm_linear` applies).

What FLA's forward computes (x [B, T, C], heads of size D = C / H):
    q = swish(q_proj(x)),  g = logsigmoid(f_proj(x)),  k = 1 - exp(g),  i = i_proj(x)
    o = GLA(q, k, v=i, gk=g), scale D^-0.5                       (h_t = diag(exp(g_t)) h_{t-1} + k_t i_t^T)
    y = o_proj(RMSNorm_C(o))
Parameter names: q_proj, f_proj, i_proj, g_norm, o_proj.

Effective init: the harness re-draws every nn.Linear weight N(0, 0.02) (no FLA name ends in `c_proj`); the norm
weight is ones.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.layers.cache import RecurrentCache
from jaxgpt.layers.common import linear
from jaxgpt.layers.fla_modules import RMSNorm
from jaxgpt.ops import chunk_gla, naive_recurrent_gla
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import FLA_NORM_EPS


class HGRN2Attention(RecurrentCache, nnx.Module):
    """x [B, T, C] -> [B, T, C]; K = V = C / H per head. Decode mode: RecurrentCache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        C, H = cfg.n_embd, cfg.n_head
        if C % H:
            raise ValueError(f"n_embd {C} must be divisible by n_head {H}")
        self.n_head, self.backend = H, cfg.linear_attn_backend
        self.q_proj = linear(cfg, C, C, rngs, bias=False)  # forget dim H * expand_ratio = C
        self.f_proj = linear(cfg, C, C, rngs, bias=False)
        self.i_proj = linear(cfg, C, C, rngs, bias=False)
        self.g_norm = RMSNorm(C, eps=FLA_NORM_EPS)
        self.o_proj = linear(cfg, C, C, rngs, bias=False)

    def state_dims(self) -> tuple[int, int]:
        D = self.q_proj.out_features // self.n_head
        return D, D

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, C = x.shape
        x = self.mask_padding(x)
        q = jax.nn.silu(self.q_proj(x))
        g = jax.nn.log_sigmoid(self.f_proj(x).astype(jnp.float32))  # fp32: the kernel's cumsum input
        k = (1 - jnp.exp(g)).astype(q.dtype)
        q, k, g, i = (t.reshape(B, T, self.n_head, -1) for t in (q, k, g, self.i_proj(x)))  # [B, T, H, D]
        o = self.linear_attention(chunk_gla, naive_recurrent_gla, q, k, i, g)  # [B, T, H, D]
        return self.o_proj(self.g_norm(o.reshape(B, T, C)))
