"""Gated Linear Attention layer: `fla.layers.GatedLinearAttention` (FLA 0.6.0) in JAX.

The options the mixer variants use (docs/variants.md): mode='chunk', expand_k (0.5, or per layer for gla_depth),
expand_v=1.0, use_output_gate=True, gate_fn='swish' with fuse_norm (the norm is `g_norm_swish_gate`),
gate_low_rank_dim=16, gate_logit_normalizer=16, norm_eps=1e-5, optional short convolutions (conv_size 4, no bias).
Parameter names and shapes are FLA's state-dict names: q_proj, k_proj, v_proj, g_proj, gk_proj.0, gk_proj.1,
o_proj, [q_conv1d, k_conv1d, v_conv1d], g_norm_swish_gate.

Effective init: every nn.Linear is re-drawn by the harness: weights N(0, 0.02) (o_proj too: no FLA
name ends in `c_proj`), the one bias (gk_proj.1) zero. Convolutions and the norm keep FLA/PyTorch's init
(fla_modules.py).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.layers.cache import RecurrentCache
from jaxgpt.layers.common import linear
from jaxgpt.layers.fla_modules import RMSNorm, ShortConvolution
from jaxgpt.ops import chunk_gla, naive_recurrent_gla
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import CONV_SIZE, FLA_NORM_EPS, GATE_LOGIT_NORMALIZER, GATE_LOW_RANK_DIM


def projection_dim(cfg: ModelConfig, expand: float) -> int:
    """C * expand as FLA checks it: an integer divisible by the number of heads."""
    dim = round(cfg.n_embd * expand)
    if not math.isclose(cfg.n_embd * expand, dim) or dim % cfg.n_head:
        raise ValueError(f"n_embd * {expand} = {cfg.n_embd * expand} must be an integer divisible by n_head")
    return dim


class GatedLinearAttention(RecurrentCache, nnx.Module):
    """x [B, T, C] -> [B, T, C]; K = C * expand_k / H and V = C / H per head. Decode mode: RecurrentCache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, expand_k: float = 0.5, use_short_conv: bool = False):
        C, H = cfg.n_embd, cfg.n_head
        key_dim, value_dim = projection_dim(cfg, expand_k), projection_dim(cfg, 1.0)
        self.n_head, self.backend = H, cfg.linear_attn_backend
        self.q_proj = linear(cfg, C, key_dim, rngs, bias=False)
        self.k_proj = linear(cfg, C, key_dim, rngs, bias=False)
        self.v_proj = linear(cfg, C, value_dim, rngs, bias=False)
        self.g_proj = linear(cfg, C, value_dim, rngs, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, CONV_SIZE, rngs)
            self.k_conv1d = ShortConvolution(key_dim, CONV_SIZE, rngs)
            self.v_conv1d = ShortConvolution(value_dim, CONV_SIZE, rngs)
        self.use_short_conv = use_short_conv
        self.gk_proj = nnx.List([  # low-rank gate: nn.Sequential(Linear(C, 16), Linear(16, key_dim, bias))
            linear(cfg, C, GATE_LOW_RANK_DIM, rngs, bias=False),
            linear(cfg, GATE_LOW_RANK_DIM, key_dim, rngs, bias=True),
        ])
        self.o_proj = linear(cfg, value_dim, C, rngs, bias=False)
        self.g_norm_swish_gate = RMSNorm(value_dim // H, eps=FLA_NORM_EPS)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        x = self.mask_padding(x)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            q, k, v = self.q_conv1d(q), self.k_conv1d(k), self.v_conv1d(v)
        gk = self.gk_proj[1](self.gk_proj[0](x))
        q, k, v, gk, g = (t.reshape(B, T, self.n_head, -1) for t in (q, k, v, gk, self.g_proj(x)))  # [B, T, H, K|V]
        gk = jax.nn.log_sigmoid(gk.astype(jnp.float32)) / GATE_LOGIT_NORMALIZER  # fp32: the kernel's cumsum input
        o = self.linear_attention(chunk_gla, naive_recurrent_gla, q, k, v, gk)  # [B, T, H, V]
        o = self.g_norm_swish_gate(o, g)
        return self.o_proj(o.reshape(B, T, -1))
