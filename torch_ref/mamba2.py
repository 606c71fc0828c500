"""Mamba2 for torch_ref: `fla.layers.Mamba2` on CUDA, a Triton-free twin on CPU.

The harness builds `Mamba2(hidden_size=C, num_heads=H, head_dim=expand * C / H)` (FLA's default head_dim 64 would
refuse num_heads=H; docs/variants.md), all else FLA 0.6.0's defaults. With CUDA the layer is FLA's own module
(forward returns the output only; inputs on the CPU take the naive path); FLA runs `mamba_ssm`'s kernels when that
package is installed and its PyTorch path `torch_forward` otherwise. Without CUDA, `fla.layers` cannot be imported
(Triton), so the layer is `NaiveMamba2`: FLA's module tree and parameter names (state dicts load either way),
computing what `torch_forward` computes with the SSD as FLA's naive recurrent simple GLA (scale 1; torch_forward's
chunked form with chunk 256 is the same function up to rounding, parity_tests/test_mixer_parity.py checks both).
Decoding: as torch_ref.linear_attn's layers (an FLA cache, `layer_idx`), the states kept as FLA's Mamba2 keeps
them: the convolution's last W inputs [B, I + 2N, W] and the SSM state [B, H, P, N].

Effective init: the harness re-draws in_proj and out_proj (N(0, 0.02)); conv1d keeps PyTorch's Conv1d default
(weight and bias), the norm weight and D are ones, A_log = log U(1, 16) and dt_bias are drawn as FLA draws them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import (
    FLA_NORM_EPS,
    MAMBA2_A_INIT_RANGE,
    MAMBA2_CONV_KERNEL,
    MAMBA2_DT_LIMIT,
    MAMBA2_EXPAND,
    MAMBA2_STATE_SIZE,
)

from .fla_naive import load_fla_file
from .gated_deltanet import dt_bias_init
from .linear_attn import (
    FLATwin, LayerState, ShortConvolution, cached_short_conv, mixer_class, short_conv, state_v_first,
)
from .norms import RMSNorm, rms_normalize

if TYPE_CHECKING:
    from transformers import Cache


def naive_ssd(c: torch.Tensor, b: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
              initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's SSD through FLA's naive_recurrent_simple_gla with scale 1: c, b [B, T, H, N], v = dt * x
    [B, T, H, P], g = dt * A [B, T, H] -> y [B, T, H, P] (without D), state [B, H, N, P] fp32."""
    simple_gla = load_fla_file("ops/simple_gla/naive.py").naive_recurrent_simple_gla
    return simple_gla(c, b, v, g, scale=1.0, initial_state=initial_state, output_final_state=True)


def mamba2_naive_forward(m: nn.Module, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """What fla.layers.Mamba2.torch_forward computes (x [B, T, C]; n_groups 1, D per head, gate before the norm)."""
    B, T, _ = x.shape
    H, P, N, inner = m.num_heads, m.head_dim, m.ssm_state_size, m.intermediate_size
    state = LayerState(cache, m.layer_idx)
    z, xBC, dt = m.in_proj(x).split([inner, inner + 2 * N, H], dim=-1)
    if cache is None:
        xBC = short_conv(m.conv1d, xBC)
    else:
        xBC, state.conv_state = cached_short_conv(m.conv1d, xBC, state.conv_state)
    xs, b, c = xBC.split([inner, N, N], dim=-1)
    dt = F.softplus(dt + m.dt_bias).clamp(*m.dt_limit)  # [B, T, H]
    xs = xs.reshape(B, T, H, P).float()
    c, b = (t.float()[:, :, None].expand(B, T, H, N) for t in (c, b))  # one group: shared by all heads
    y = state.recurrence(state_v_first(naive_ssd), c, b, xs * dt[..., None], -torch.exp(m.A_log.float()) * dt)
    state.save(T)
    y = (y + m.D[:, None] * xs).reshape(B, T, inner)
    return m.out_proj(rms_normalize(y * F.silu(z.float()), m.norm.weight, m.norm.eps).to(x.dtype))


class NaiveMamba2(FLATwin):
    """fla.layers.Mamba2's module tree for head_dim = expand * C / H and its other defaults."""

    FLA_NAME = "Mamba2"

    @staticmethod
    def fla_options(hidden_size: int, num_heads: int) -> dict[str, Any]:
        return dict(hidden_size=hidden_size, num_heads=num_heads, head_dim=MAMBA2_EXPAND * hidden_size // num_heads)

    @staticmethod
    def fla_init(layer: nn.Module) -> None:
        layer.conv1d.activation = layer.activation  # what torch_ref's short_conv reads (the naive path)

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        inner, N = MAMBA2_EXPAND * hidden_size, MAMBA2_STATE_SIZE
        self.num_heads, self.head_dim, self.ssm_state_size = num_heads, inner // num_heads, N
        self.intermediate_size, self.dt_limit, self.layer_idx = inner, MAMBA2_DT_LIMIT, None
        self.in_proj = nn.Linear(hidden_size, 2 * inner + 2 * N + num_heads, bias=False)
        self.conv1d = ShortConvolution(inner + 2 * N, MAMBA2_CONV_KERNEL, bias=True)
        self.dt_bias = nn.Parameter(dt_bias_init(num_heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(*MAMBA2_A_INIT_RANGE)))
        self.norm = RMSNorm(inner, eps=FLA_NORM_EPS)
        self.D = nn.Parameter(torch.ones(num_heads))
        self.out_proj = nn.Linear(inner, hidden_size, bias=False)

    forward = mamba2_naive_forward


def mamba2(cfg: ModelConfig) -> nn.Module:
    """fla.layers.Mamba2(hidden_size=C, num_heads=H, head_dim=2C // H): [B, T, C] -> [B, T, C]."""
    return mixer_class(NaiveMamba2)(cfg.n_embd, cfg.n_head)
