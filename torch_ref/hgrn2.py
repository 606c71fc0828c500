"""HGRN2 for torch_ref: `fla.layers.HGRN2Attention` on CUDA, a Triton-free twin on CPU.

The harness builds `HGRN2Attention(hidden_size=C, num_heads=H, expand_ratio=None)` (FLA's default expand_ratio=128
would set num_heads = C // 128 whatever H is; docs/variants.md), all else FLA 0.6.0's defaults. With CUDA the
layer is FLA's own module (forward returns the output only; inputs on the CPU take the naive path). Without CUDA,
`fla.layers` cannot be imported (Triton), so the layer is `NaiveHGRN2Attention`: FLA's module tree and parameter
names (state dicts load either way), computing FLA's forward with its naive recurrent GLA (torch_ref.fla_naive).
Decoding: as torch_ref.linear_attn's layers (an FLA cache, `layer_idx`); the recurrent state is kept as FLA's
layer keeps it, [B, H, V, K] (its `state_v_first=True`).

Effective init: the harness re-draws the nn.Linear weights (N(0, 0.02)); the norm weight is ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import FLA_NORM_EPS

from .fla_naive import naive_gla
from .linear_attn import FLATwin, LayerState, mixer_class, state_v_first
from .norms import RMSNorm, rms_normalize

if TYPE_CHECKING:
    from transformers import Cache


def hgrn2_naive_forward(m: nn.Module, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """What fla.layers.HGRN2Attention.forward computes (x [B, T, C]; no short convolutions, no lower bound), with
    FLA's naive recurrent GLA: q = swish(q_proj x), g = logsigmoid(f_proj x), k = 1 - exp(g), v = i_proj x, then
    `rms_norm_linear` (RMSNorm over C with FLA's default eps 1e-5, o_proj)."""
    B, T, _ = x.shape
    state = LayerState(cache, m.layer_idx)
    g = F.logsigmoid(m.f_proj(x))
    q, k, i, g = (t.view(B, T, m.num_heads, -1) for t in (F.silu(m.q_proj(x)), 1 - g.exp(), m.i_proj(x), g))
    o = state.recurrence(state_v_first(naive_gla), q, k, i, g)  # [B, T, H, D]
    state.save(T)
    return m.o_proj(rms_normalize(o.reshape(B, T, -1), m.g_norm.weight, FLA_NORM_EPS).to(x.dtype))


class NaiveHGRN2Attention(FLATwin):
    """fla.layers.HGRN2Attention's module tree for expand_ratio = C / H without short convolutions."""

    FLA_NAME = "HGRN2Attention"

    @staticmethod
    def fla_options(hidden_size: int, num_heads: int) -> dict[str, Any]:
        return dict(hidden_size=hidden_size, num_heads=num_heads, expand_ratio=None)

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.layer_idx = num_heads, None
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.f_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.i_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.g_norm = RMSNorm(hidden_size, eps=FLA_NORM_EPS)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    forward = hgrn2_naive_forward


def hgrn2_attention(cfg: ModelConfig) -> nn.Module:
    """fla.layers.HGRN2Attention(hidden_size=C, num_heads=H, expand_ratio=None): [B, T, C] -> [B, T, C]."""
    return mixer_class(NaiveHGRN2Attention)(cfg.n_embd, cfg.n_head)
