"""GPT-2 harness in PyTorch: the four variant axes (torch_ref.{embedding,block,mixers,losses}) as in jaxgpt."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import INIT_STD

from .block import BLOCKS
from .embedding import EMBEDDINGS
from .losses import LOSSES, OUTPUT_TRANSFORMS, cross_entropy

if TYPE_CHECKING:
    from transformers import Cache


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        block, final_norm = BLOCKS[cfg.norm]
        self.embedding = EMBEDDINGS[cfg.embedding](cfg)
        self.h = nn.ModuleList([block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_f = final_norm(cfg)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=INIT_STD / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The harness's effective init: every Linear/Embedding re-drawn after construction."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)

    def forward(self, idx: torch.Tensor, cache: Cache | None = None, previous: torch.Tensor | None = None,
                keep: int | torch.Tensor = 0) -> torch.Tensor:
        """idx [B, T] -> logits [B, T', V] at the positions `keep` names: the last `keep` (0: all T) or an index
        tensor, as transformers' `logits_to_keep` (a prefill needs the last position's only).

        Decoding: with a transformers Cache (a DynamicCache for softmax attention, torch_ref.linear_attn.new_fla_cache
        for linear mixers) idx continues the tokens the cache has seen: positions start at its length, `previous`
        [B] is the token before idx[:, 0] (bigram_hash, ve_lcr), and each mixer reads and extends its state.
        """
        x = self.embedding(idx, 0 if cache is None else cache.get_seq_length())
        for i, block in enumerate(self.h):
            ve = self.embedding.value_embed(i, idx, previous)
            if ve is not None:
                x = x + ve
            x = block(x, cache)
        x = x[:, slice(-keep, None) if isinstance(keep, int) else keep]  # slice(-0, None): every position
        logits = F.linear(self.ln_f(x), self.embedding.lm_head_weight())
        transform = OUTPUT_TRANSFORMS.get(self.cfg.loss)
        return logits if transform is None else transform(logits)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, train: bool = True) -> torch.Tensor:
        logits = self(idx)
        return LOSSES[self.cfg.loss](logits, targets) if train else cross_entropy(logits, targets)


def build_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)
