"""RetNet for torch_ref: `fla.layers.MultiScaleRetention` on CUDA, a Triton-free twin on CPU.

With CUDA the layer is FLA 0.6.0's own module with its defaults for hidden_size=C, num_heads=H (forward returns
the output only; inputs on the CPU take the naive path). Without CUDA, `fla.layers` cannot be imported (Triton), so
the layer is `NaiveMultiScaleRetention`: FLA's module tree and parameter names (state dicts load either way; FLA's
`rotary.inv_freq` is a non-persistent buffer, in no state dict), computing with FLA's naive recurrent simple GLA at
the fixed per-head log-decays log(1 - 2^(-5-h)) that FLA's chunk_retention passes (torch_ref.fla_naive), FLA's
rotary embedding (not interleaved, base 10000, fp32 angles) and its swish-gated per-head RMSNorm. Decoding: as
torch_ref.linear_attn's layers (an FLA cache, `layer_idx`); rotary positions continue from the cache's length.

Effective init: the harness re-draws the nn.Linear weights (N(0, 0.02)); the norm weight is ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import FLA_NORM_EPS, ROPE_THETA, retention_log_decays

from .fla_naive import naive_simple_gla
from .linear_attn import FLATwin, LayerState, head_norm, mixer_class
from .norms import RMSNorm

if TYPE_CHECKING:
    from transformers import Cache

EXPAND_K, EXPAND_V = 1.0, 2.0  # FLA's MultiScaleRetention defaults


def rotary_embedding(x: torch.Tensor, offset: int = 0, base: float = ROPE_THETA) -> torch.Tensor:
    """`fla.modules.RotaryEmbedding` (not interleaved) on x [B, T, H, D] at positions offset .. offset + T - 1: the
    halves x1, x2 of each head become (x1 cos - x2 sin, x2 cos + x1 sin), angles position * base^(-2i/D) in fp32;
    the result in x's dtype."""
    D = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D)
    t = torch.arange(offset, offset + x.shape[1], dtype=torch.float32, device=x.device)
    angles = torch.outer(t, inv_freq)[:, None]  # [T, 1, D/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def retnet_naive_forward(m: nn.Module, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """What fla.layers.MultiScaleRetention.forward computes (x [B, T, C]), with FLA's naive simple GLA."""
    B, T, _ = x.shape
    state = LayerState(cache, m.layer_idx)
    offset = cache.get_seq_length(m.layer_idx) if cache is not None else 0
    q, k, v, g = (t.view(B, T, m.num_heads, -1) for t in (m.q_proj(x), m.k_proj(x), m.v_proj(x), m.g_proj(x)))
    q, k = rotary_embedding(q, offset), rotary_embedding(k, offset)
    decay = torch.tensor(retention_log_decays(m.num_heads), dtype=torch.float32, device=x.device).expand(B, T, -1)
    o = head_norm(m.g_norm_swish_gate, state.recurrence(naive_simple_gla, q, k, v, decay), g)
    state.save(T)
    return m.o_proj(o.reshape(B, T, -1))


class NaiveMultiScaleRetention(FLATwin):
    """fla.layers.MultiScaleRetention's parameters with its defaults (expand_k 1, expand_v 2, swish-gated fused
    norm, no short convolutions); FLA's parameter-free `rotary` module is the function `rotary_embedding`."""

    FLA_NAME = "MultiScaleRetention"

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        key_dim, value_dim = round(hidden_size * EXPAND_K), round(hidden_size * EXPAND_V)
        self.num_heads, self.layer_idx = num_heads, None
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)
        self.g_norm_swish_gate = RMSNorm(value_dim // num_heads, eps=FLA_NORM_EPS)

    forward = retnet_naive_forward


def multiscale_retention(cfg: ModelConfig) -> nn.Module:
    """fla.layers.MultiScaleRetention(hidden_size=C, num_heads=H): [B, T, C] -> [B, T, C]."""
    return mixer_class(NaiveMultiScaleRetention)(cfg.n_embd, cfg.n_head)
