"""DeltaNet layer: `fla.layers.DeltaNet` (FLA 0.6.0) in JAX.

The options the mixer variants use (docs/variants.md): mode='chunk', expand_k=expand_v=1.0, use_beta=True (beta =
sigmoid(b_proj(x)), b_proj without bias), use_gate=False, short convolutions (conv_size 4, no bias, SiLU on q, k
and v: qk_activation='silu'), qk_norm='l2' (inside the kernel, eps 1e-6 inside the sqrt), per-head fp32 RMSNorm
`o_norm` (eps 1e-5). Parameter names: q_proj, k_proj, v_proj, b_proj, q_conv1d, k_conv1d, v_conv1d, o_norm, o_proj.

Effective init: the harness re-draws every nn.Linear weight N(0, 0.02) (o_proj too: no FLA name ends
in `c_proj`); convolutions and the norm keep FLA/PyTorch's init (fla_modules.py).
"""

import jax
from flax import nnx

from jaxgpt.layers.cache import RecurrentCache
from jaxgpt.layers.common import linear
from jaxgpt.layers.fla_modules import RMSNorm, ShortConvolution
from jaxgpt.ops import chunk_delta_rule, naive_recurrent_delta_rule
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import CONV_SIZE, FLA_NORM_EPS


class DeltaNet(RecurrentCache, nnx.Module):
    """x [B, T, C] -> [B, T, C]; K = V = C / H per head. Decode mode: RecurrentCache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        C, H = cfg.n_embd, cfg.n_head
        if C % H:
            raise ValueError(f"n_embd {C} must be divisible by n_head {H}")
        self.n_head, self.backend = H, cfg.linear_attn_backend
        self.q_proj = linear(cfg, C, C, rngs, bias=False)
        self.k_proj = linear(cfg, C, C, rngs, bias=False)
        self.v_proj = linear(cfg, C, C, rngs, bias=False)
        self.b_proj = linear(cfg, C, H, rngs, bias=False)
        self.q_conv1d = ShortConvolution(C, CONV_SIZE, rngs)
        self.k_conv1d = ShortConvolution(C, CONV_SIZE, rngs)
        self.v_conv1d = ShortConvolution(C, CONV_SIZE, rngs)
        self.o_norm = RMSNorm(C // H, eps=FLA_NORM_EPS)
        self.o_proj = linear(cfg, C, C, rngs, bias=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, C = x.shape
        x = self.mask_padding(x)
        q, k, v = self.q_conv1d(self.q_proj(x)), self.k_conv1d(self.k_proj(x)), self.v_conv1d(self.v_proj(x))
        q, k, v = (t.reshape(B, T, self.n_head, -1) for t in (q, k, v))  # [B, T, H, K|V]
        beta = jax.nn.sigmoid(self.b_proj(x))  # [B, T, H]
        o = self.linear_attention(chunk_delta_rule, naive_recurrent_delta_rule, q, k, v, beta,
                                  use_qk_l2norm_in_kernel=True)  # [B, T, H, V]
        return self.o_proj(self.o_norm(o).reshape(B, T, C))
