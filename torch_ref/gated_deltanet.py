"""Gated DeltaNet for torch_ref: `fla.layers.GatedDeltaNet` on CUDA, a Triton-free twin on CPU.

With CUDA the layer is FLA 0.6.0's own module (forward returns the output only; inputs on the CPU take the naive
path). Without CUDA, `fla.layers` cannot be imported (Triton), so the layer is `NaiveGatedDeltaNet`: FLA's module
tree and parameter names (state dicts load either way), computing with FLA's naive recurrence and its
`naive_gdn_gate` (torch_ref.fla_naive). Decoding: as torch_ref.linear_attn's layers (an FLA cache, `layer_idx`).

Effective init: the harness re-draws the nn.Linear weights (N(0, 0.02)); the short convolutions keep PyTorch's
Conv1d default, the norm weight is ones, and A_log and dt_bias are drawn as FLA draws them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import CONV_SIZE, FLA_NORM_EPS, GDN_A_INIT_MAX, GDN_DT_INIT_FLOOR, GDN_DT_MAX, GDN_DT_MIN

from .fla_naive import naive_gated_delta_rule_l2, naive_gdn_gate
from .linear_attn import FLATwin, LayerState, ShortConvolution, head_norm, mixer_class
from .norms import RMSNorm

if TYPE_CHECKING:
    from transformers import Cache


def dt_bias_init(num_heads: int) -> torch.Tensor:
    """FLA's dt_bias [H]: softplus^-1(dt) = dt + log(-expm1(-dt)), dt log-uniform in [DT_MIN, DT_MAX], at least the
    floor (Gated DeltaNet's and Mamba2's)."""
    log_dt = torch.empty(num_heads).uniform_(math.log(GDN_DT_MIN), math.log(GDN_DT_MAX))
    dt = log_dt.exp().clamp(min=GDN_DT_INIT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))


def gated_deltanet_naive_forward(m: nn.Module, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """What fla.layers.GatedDeltaNet.forward computes in training (x [B, T, C]), with FLA's naive gated delta rule:
    beta = sigmoid(b_proj(x)) and g = naive_gdn_gate(a_proj(x), A_log, dt_bias), both fp32 (FLA's kernel options
    use_beta_sigmoid_in_kernel and use_gate_in_kernel), q and k L2-normalised, swish-gated output norm."""
    B, T, _ = x.shape
    state = LayerState(cache, m.layer_idx)
    q, k, v = state.convs((m.q_conv1d, m.q_proj(x)), (m.k_conv1d, m.k_proj(x)), (m.v_conv1d, m.v_proj(x)))
    q, k, v, g_out = (t.view(B, T, m.num_heads, -1) for t in (q, k, v, m.g_proj(x)))  # [B, T, H, D]
    beta = m.b_proj(x).float().sigmoid()
    g = naive_gdn_gate(m.a_proj(x), m.A_log, m.dt_bias)
    o = head_norm(m.o_norm, state.recurrence(naive_gated_delta_rule_l2, q, k, v, g, beta), g_out)
    state.save(T)
    return m.o_proj(o.reshape(B, T, -1))


class NaiveGatedDeltaNet(FLATwin):
    """fla.layers.GatedDeltaNet's module tree for the options the variants use (head_dim C / H, expand_v 1, output
    gate, short convolutions)."""

    FLA_NAME = "GatedDeltaNet"

    @staticmethod
    def fla_options(hidden_size: int, num_heads: int) -> dict[str, Any]:
        return dict(mode="chunk", hidden_size=hidden_size, num_heads=num_heads, head_dim=hidden_size // num_heads,
                    expand_v=1.0, use_gate=True, use_short_conv=True, conv_size=CONV_SIZE)

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.layer_idx = num_heads, None
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(0, GDN_A_INIT_MAX)))  # A ~ U(0, 16)
        self.dt_bias = nn.Parameter(dt_bias_init(num_heads))
        self.q_conv1d = ShortConvolution(hidden_size, CONV_SIZE)
        self.k_conv1d = ShortConvolution(hidden_size, CONV_SIZE)
        self.v_conv1d = ShortConvolution(hidden_size, CONV_SIZE)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_norm = RMSNorm(hidden_size // num_heads, eps=FLA_NORM_EPS)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    forward = gated_deltanet_naive_forward


def gated_delta_net(cfg: ModelConfig) -> nn.Module:
    """fla.layers.GatedDeltaNet(mode='chunk', hidden_size=C, num_heads=H, head_dim=C // H, expand_v=1.0,
    use_gate=True, use_short_conv=True, conv_size=4): [B, T, C] -> [B, T, C]."""
    return mixer_class(NaiveGatedDeltaNet)(cfg.n_embd, cfg.n_head)
