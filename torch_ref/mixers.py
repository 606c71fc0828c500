"""Mixer axis in PyTorch (twin of jaxgpt.layers.mixers): [B, T, C] -> [B, T, C].

The linear mixers stack FLA's layers (torch_ref.linear_attn, torch_ref.gated_deltanet) as
jaxgpt.spec.variants.linear_mixer_layer says.
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.variants import LINEAR_MIXERS, linear_mixer_layer

from .gated_deltanet import gated_delta_net
from .linear_attn import delta_net, gated_linear_attention


class CausalSelfAttention(nn.Module):
    """`softmax`: causal multi-head attention through SDPA."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


LINEAR_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "gla": gated_linear_attention, "deltanet": delta_net, "gated_deltanet": gated_delta_net
}


def linear_mixer(mixer: str, cfg: ModelConfig, layer: int) -> nn.Module:
    kind, options = linear_mixer_layer(mixer, layer, cfg.n_layer)
    return LINEAR_LAYERS[kind](cfg, **options)


MIXERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "softmax": CausalSelfAttention,
    **{name: partial(linear_mixer, name) for name in sorted(LINEAR_MIXERS)},
}
