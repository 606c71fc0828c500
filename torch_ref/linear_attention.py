"""Linear attention for torch_ref: `fla.layers.LinearAttention` on CUDA, a Triton-free twin on CPU.

With CUDA the layer is FLA 0.6.0's own module with its defaults for hidden_size=C, num_heads=H (forward returns
the output only; inputs on the CPU take the naive path). Without CUDA, `fla.layers` cannot be imported (Triton), so
the layer is `NaiveLinearAttention`: FLA's module tree and parameter names (state dicts load either way): the
Hadamard feature maps of q and k (layer1(x) * layer2(x), per head dim, with bias), FLA's naive recurrent linear
attention without normalisation (chunk_linear_attn with do_feature_map_norm=False; torch_ref.fla_naive) and the
per-head output RMSNorm `norm`. Decoding: as torch_ref.linear_attn's layers (an FLA cache, `layer_idx`).

Effective init: the harness re-draws the nn.Linear weights (N(0, 0.02), biases zero); the norm weight is ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import FLA_NORM_EPS

from .fla_naive import naive_linear_attn
from .linear_attn import FLATwin, LayerState, head_norm, mixer_class
from .norms import RMSNorm

if TYPE_CHECKING:
    from transformers import Cache


class HadamardFeatureMap(nn.Module):
    """`fla.modules.feature_map.HadamardFeatureMap(head_dim)`: x [..., D] -> layer1(x) * layer2(x)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer1 = nn.Linear(head_dim, head_dim)
        self.layer2 = nn.Linear(head_dim, head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(x) * self.layer2(x)


def linear_attention_naive_forward(m: nn.Module, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """What fla.layers.LinearAttention.forward computes (x [B, T, C]), with FLA's naive recurrent linear attention
    (FLA's feature maps are plain PyTorch and run as they are)."""
    B, T, _ = x.shape
    state = LayerState(cache, m.layer_idx)
    q, k, v = (t.view(B, T, m.num_heads, -1) for t in (m.q_proj(x), m.k_proj(x), m.v_proj(x)))  # [B, T, H, D]
    q, k = m.feature_map_q(q), m.feature_map_k(k)
    o = head_norm(m.norm, state.recurrence(naive_linear_attn, q, k, v))
    state.save(T)
    return m.o_proj(o.reshape(B, T, -1))


class NaiveLinearAttention(FLATwin):
    """fla.layers.LinearAttention's module tree with its defaults (expand_k = expand_v = 1, Hadamard feature maps,
    output RMSNorm)."""

    FLA_NAME = "LinearAttention"

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        head_dim = hidden_size // num_heads
        self.num_heads, self.layer_idx = num_heads, None
        self.feature_map_q = HadamardFeatureMap(head_dim)
        self.feature_map_k = HadamardFeatureMap(head_dim)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm = RMSNorm(head_dim, eps=FLA_NORM_EPS)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    forward = linear_attention_naive_forward


def linear_attention(cfg: ModelConfig) -> nn.Module:
    """fla.layers.LinearAttention(hidden_size=C, num_heads=H): [B, T, C] -> [B, T, C]."""
    return mixer_class(NaiveLinearAttention)(cfg.n_embd, cfg.n_head)
