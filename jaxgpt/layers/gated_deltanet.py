"""Gated DeltaNet layer: `fla.layers.GatedDeltaNet` (FLA 0.6.0) in JAX.

The options the mixer variants use (docs/variants.md): mode='chunk', head_dim = C / H, num_v_heads = num_heads,
expand_v=1.0 (K = V = C / H per head), use_gate=True (output gate g_proj through the fused swish-gated RMSNorm
`o_norm`, eps 1e-5), short convolutions (conv_size 4, no bias, SiLU on q, k and v), allow_neg_eigval=False.
FLA's kernel options: the L2 norm of q and k inside the kernel (eps 1e-6 inside the sqrt), beta = sigmoid(b_proj(x))
in fp32, and the decay gate g = -exp(A_log) * softplus(a_proj(x) + dt_bias) in fp32 (`jaxgpt.ops.gdn_gate`).
Parameter names: q_proj, k_proj, v_proj, a_proj, b_proj, A_log, dt_bias, q_conv1d, k_conv1d, v_conv1d, g_proj,
o_norm, o_proj.

Effective init: the harness re-draws every nn.Linear weight N(0, 0.02) (o_proj too: no FLA name ends in `c_proj`);
convolutions and the norm keep FLA/PyTorch's init (fla_modules.py), A_log and dt_bias FLA's own random init
(`a_log_init`, `dt_bias_init`).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.layers.cache import RecurrentCache
from jaxgpt.layers.common import linear
from jaxgpt.layers.fla_modules import RMSNorm, ShortConvolution
from jaxgpt.ops import chunk_gated_delta_rule, gdn_gate, naive_recurrent_gated_delta_rule
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import (
    CONV_SIZE,
    FLA_NORM_EPS,
    GDN_A_INIT_MAX,
    GDN_DT_INIT_FLOOR,
    GDN_DT_MAX,
    GDN_DT_MIN,
)


def a_log_init(key: jax.Array, num_heads: int) -> jax.Array:
    """FLA's A_log: log(A) with A ~ U(0, 16) per head, fp32 [H]."""
    return jnp.log(jax.random.uniform(key, (num_heads,), jnp.float32, 0.0, GDN_A_INIT_MAX))


def dt_bias_init(key: jax.Array, num_heads: int) -> jax.Array:
    """FLA's dt_bias: softplus^-1(dt) = dt + log(-expm1(-dt)) with log(dt) ~ U(log 1e-3, log 0.1), dt >= 1e-4;
    fp32 [H]."""
    log_dt = jax.random.uniform(key, (num_heads,), jnp.float32, math.log(GDN_DT_MIN), math.log(GDN_DT_MAX))
    dt = jnp.maximum(jnp.exp(log_dt), GDN_DT_INIT_FLOOR)
    return dt + jnp.log(-jnp.expm1(-dt))


class GatedDeltaNet(RecurrentCache, nnx.Module):
    """x [B, T, C] -> [B, T, C]; K = V = C / H per head. Decode mode: RecurrentCache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        C, H = cfg.n_embd, cfg.n_head
        if C % H:
            raise ValueError(f"n_embd {C} must be divisible by n_head {H}")
        self.n_head, self.backend = H, cfg.linear_attn_backend
        self.q_proj = linear(cfg, C, C, rngs, bias=False)
        self.k_proj = linear(cfg, C, C, rngs, bias=False)
        self.v_proj = linear(cfg, C, C, rngs, bias=False)
        self.a_proj = linear(cfg, C, H, rngs, bias=False)
        self.b_proj = linear(cfg, C, H, rngs, bias=False)
        self.A_log = nnx.Param(a_log_init(rngs.params(), H))
        self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), H))
        self.q_conv1d = ShortConvolution(C, CONV_SIZE, rngs)
        self.k_conv1d = ShortConvolution(C, CONV_SIZE, rngs)
        self.v_conv1d = ShortConvolution(C, CONV_SIZE, rngs)
        self.g_proj = linear(cfg, C, C, rngs, bias=False)
        self.o_norm = RMSNorm(C // H, eps=FLA_NORM_EPS)
        self.o_proj = linear(cfg, C, C, rngs, bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, C = x.shape
        x = self.mask_padding(x)
        q, k, v = self.q_conv1d(self.q_proj(x)), self.k_conv1d(self.k_proj(x)), self.v_conv1d(self.v_proj(x))
        q, k, v, g_out = (t.reshape(B, T, self.n_head, -1) for t in (q, k, v, self.g_proj(x)))  # [B, T, H, K|V]
        beta = jax.nn.sigmoid(self.b_proj(x).astype(jnp.float32))  # [B, T, H] fp32
        g = gdn_gate(self.a_proj(x), self.A_log[...], self.dt_bias[...])  # [B, T, H] fp32 log decays
        o = self.linear_attention(chunk_gated_delta_rule, naive_recurrent_gated_delta_rule, q, k, v, g, beta,
                                  use_qk_l2norm_in_kernel=True)  # [B, T, H, V]
        return self.o_proj(self.o_norm(o, g_out).reshape(B, T, C))
