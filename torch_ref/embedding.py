"""Embedding axis in PyTorch (twin of jaxgpt.layers.embedding), same names, shapes and effective init.

Decoding (torch_ref.model.GPT with a cache) continues a sequence: `forward(idx, offset)` places idx at positions
offset.., and `value_embed(layer, idx, previous)` takes the token before idx[:, 0] (None: idx starts the sequence).

Module types decide the effective init: nn.Embedding / nn.Linear tables are re-drawn
N(0, 0.02) by GPT._init_weights whatever they declare; raw nn.Parameters keep their own init.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import BIGRAM_LAMBDA_INIT, HASH_CUR, HASH_PREV, NUM_TABLES, VE_BETA_INIT, VE_LAMBDA_INIT
from jaxgpt.spec.variants import LINEAR_MIXERS, value_embed_layers


class TokenEmbedding(nn.Module):
    """`default`: wte + wpe (dropped for linear mixers), head tied to wte."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.mixer not in LINEAR_MIXERS else None

    def forward(self, idx: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(offset, offset + idx.shape[1], device=idx.device))
        return x

    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight

    def num_pos_params(self) -> int:
        return 0 if self.wpe is None else self.wpe.weight.numel()

    def value_embed(self, layer: int, idx: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor | None:
        return None


class UntiedEmbedding(TokenEmbedding):
    """`untied`: separate head, an nn.Linear(C, V) (weight [V, C], effective N(0, 0.02))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight


def bigram_hash(idx: torch.Tensor, num_buckets: int, previous: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T] -> [B, T] bucket ((36313*cur) XOR (27191*prev)) mod (B-1) in wrapping int32; t=0 -> B-1, unless
    `previous` [B] gives the token before idx[:, 0]."""
    cur = idx.to(torch.int32)
    prev = F.pad(cur[:, :-1], (1, 0)) if previous is None else torch.cat([previous[:, None].to(torch.int32),
                                                                          cur[:, :-1]], dim=1)
    h = ((HASH_CUR * cur) ^ (HASH_PREV * prev)) % (num_buckets - 1)
    if previous is None:
        h[:, 0] = num_buckets - 1
    return h


class BigramHashEmbedding(TokenEmbedding):
    """`bigram_hash`: nn.Embedding `bigram` [5V, C] (declared zero, effective N(0, 0.02)), `bigram_lambda` [L] 0.1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.bigram = nn.Embedding(NUM_TABLES * cfg.vocab_size, cfg.n_embd)
        self.bigram_lambda = nn.Parameter(torch.full((cfg.n_layer,), BIGRAM_LAMBDA_INIT))

    def value_embed(self, layer: int, idx: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        return self.bigram_lambda[layer] * self.bigram(bigram_hash(idx, self.bigram.num_embeddings, previous))


class ValueEmbedding(TokenEmbedding):
    """`value_embed`, `ve_lcr`, `ve_lcr_cyclic_untied` (see jaxgpt.layers.embedding.ValueEmbedding).

    `value_embeds` nn.Embedding [5V, C] (declared N(0, 0.01), effective N(0, 0.02)); raw `ve_lambda` [5] 0.5,
    `ve_beta` [5] 0.1, and with `zero_head` a raw zero head `lm_head` [V, C].
    """

    def __init__(self, cfg: ModelConfig, local_residual: bool = False, cyclic: bool = False, zero_head: bool = False):
        super().__init__(cfg)
        self.vocab_size = cfg.vocab_size
        self.tables = value_embed_layers(cfg.n_layer, cyclic)
        self.value_embeds = nn.Embedding(NUM_TABLES * cfg.vocab_size, cfg.n_embd)
        self.ve_lambda = nn.Parameter(torch.full((NUM_TABLES,), VE_LAMBDA_INIT))
        self.ve_beta = nn.Parameter(torch.full((NUM_TABLES,), VE_BETA_INIT)) if local_residual else None
        self.lm_head = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.n_embd)) if zero_head else None

    def lm_head_weight(self) -> torch.Tensor:
        return super().lm_head_weight() if self.lm_head is None else self.lm_head

    def value_embed(self, layer: int, idx: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor | None:
        if layer not in self.tables:
            return None
        out = 0.0
        for j in self.tables[layer]:
            ve = self.value_embeds(idx + j * self.vocab_size)
            out = out + self.ve_lambda[j] * ve
            if self.ve_beta is not None:  # shift: one step right, zeros (or the previous token's ve_j) at t=0
                if previous is None:
                    shifted = F.pad(ve[:, :-1], (0, 0, 1, 0))
                else:
                    shifted = torch.cat([self.value_embeds(previous[:, None] + j * self.vocab_size), ve[:, :-1]], 1)
                out = out + self.ve_beta[j] * shifted
        return out


EMBEDDINGS = {
    "default": TokenEmbedding,
    "untied": UntiedEmbedding,
    "bigram_hash": BigramHashEmbedding,
    "value_embed": ValueEmbedding,
    "ve_lcr": partial(ValueEmbedding, local_residual=True),
    "ve_lcr_cyclic_untied": partial(ValueEmbedding, local_residual=True, cyclic=True, zero_head=True),
}
