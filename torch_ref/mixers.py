"""Mixer axis in PyTorch (twin of jaxgpt.layers.mixers): [B, T, C] -> [B, T, C].

The linear mixers stack FLA's layers (torch_ref.linear_attn, torch_ref.gated_deltanet) as
jaxgpt.spec.variants.linear_mixer_layer says.

Each mixer's forward takes an optional transformers Cache, read and extended in place (decoding): a DynamicCache
holding softmax attention's keys and values, FLA's cache holding a linear mixer's recurrent and convolution states
(torch_ref.linear_attn.new_fla_cache). Each mixer knows its block's index in the cache, `layer_idx`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.variants import LINEAR_MIXERS, linear_mixer_layer

from .gated_deltanet import gated_delta_net
from .hgrn2 import hgrn2_attention
from .mamba2 import mamba2
from .linear_attention import linear_attention
from .linear_attn import delta_net, gated_linear_attention
from .retnet import multiscale_retention

if TYPE_CHECKING:
    from transformers import Cache


class CausalSelfAttention(nn.Module):
    """`softmax`: causal multi-head attention through SDPA."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.layer_idx = cfg.n_head, layer
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # q attends to the cached keys and its own, causally: query t sees keys up to P + t
            k, v = cache.update(k, v, self.layer_idx)
            P = k.shape[2] - T
            mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


LINEAR_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "gla": gated_linear_attention, "deltanet": delta_net, "gated_deltanet": gated_delta_net,
    "hgrn2": hgrn2_attention, "mamba2": mamba2, "retnet": multiscale_retention,
    "linear_attn": linear_attention,
}


def linear_mixer(mixer: str, cfg: ModelConfig, layer: int) -> nn.Module:
    kind, options = linear_mixer_layer(mixer, layer, cfg.n_layer)
    module = LINEAR_LAYERS[kind](cfg, **options)
    module.layer_idx = layer  # FLA's layers find their state in a cache by it
    return module


MIXERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "softmax": CausalSelfAttention,
    **{name: partial(linear_mixer, name) for name in sorted(LINEAR_MIXERS)},
}
