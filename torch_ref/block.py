"""Norm / block axis in PyTorch (twin of jaxgpt.layers.block), same module names.

Every block's forward takes an optional transformers Cache, which its mixer reads and extends (decoding).

Effective init: LayerNorm/RMSNorm gains one; the gates of `rmsnorm_parallel_gated` are raw parameters
(1/sqrt(2)), so the harness's Linear/Embedding re-init leaves them alone.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import LAYER_NORM_EPS, PARALLEL_GATE_INIT, RMS_NORM_EPS

from .mixers import MIXERS
from .norms import RMSNorm

if TYPE_CHECKING:
    from transformers import Cache


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.n_embd, eps=LAYER_NORM_EPS, bias=cfg.bias)


def rms_norm(cfg: ModelConfig) -> RMSNorm:
    """Gain-only RMSNorm over C in (at least) fp32: [..., C] -> fp32 [..., C]."""
    return RMSNorm(cfg.n_embd, eps=RMS_NORM_EPS)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    """`layernorm` / `rmsnorm`: Pre-LN block."""

    def __init__(self, cfg: ModelConfig, layer: int, norm: Callable[[ModelConfig], nn.Module] = layer_norm):
        super().__init__()
        self.ln_1 = norm(cfg)
        self.attn = MIXERS[cfg.mixer](cfg, layer)
        self.ln_2 = norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class ParallelBlock(nn.Module):
    """`rmsnorm_parallel`: h = ln_1(x); x = x + attn(h) + mlp(h)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = rms_norm(cfg)
        self.attn = MIXERS[cfg.mixer](cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        return x + self.attn(h, cache) + self.mlp(h)


class SandwichBlock(Block):
    """`rmsnorm_post`: x = x + ln_1_out(attn(ln_1(x))); x = x + ln_2_out(mlp(ln_2(x)))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer, norm=rms_norm)
        self.ln_1_out = rms_norm(cfg)
        self.ln_2_out = rms_norm(cfg)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        x = x + self.ln_1_out(self.attn(self.ln_1(x), cache))
        return x + self.ln_2_out(self.mlp(self.ln_2(x)))


class GatedParallelBlock(Block):
    """`rmsnorm_parallel_gated`: x = x + attn_gate*attn(ln_1(x)) + mlp_gate*mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer, norm=rms_norm)
        self.attn_gate = nn.Parameter(torch.tensor(PARALLEL_GATE_INIT))
        self.mlp_gate = nn.Parameter(torch.tensor(PARALLEL_GATE_INIT))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return x + self.attn_gate * self.attn(self.ln_1(x), cache) + self.mlp_gate * self.mlp(self.ln_2(x))


BLOCKS = {
    "layernorm": (Block, layer_norm),
    "rmsnorm": (partial(Block, norm=rms_norm), rms_norm),
    "rmsnorm_parallel": (ParallelBlock, rms_norm),
    "rmsnorm_post": (SandwichBlock, rms_norm),
    "rmsnorm_parallel_gated": (GatedParallelBlock, rms_norm),
}
