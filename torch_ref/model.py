"""GPT-2 harness in PyTorch: the four variant axes as in jaxgpt, nanoGPT conventions and init."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.config import ModelConfig
from jaxgpt.variants import LINEAR_MIXERS
from torch_ref.losses import LOSSES, OUTPUT_TRANSFORMS, cross_entropy


class TokenEmbedding(nn.Module):
    """`default`: wte + wpe (dropped for linear mixers), head tied to wte."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.mixer not in LINEAR_MIXERS else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return x

    def lm_head_weight(self) -> torch.Tensor:
        return self.wte.weight

    def num_pos_params(self) -> int:
        return 0 if self.wpe is None else self.wpe.weight.numel()

    def value_embed(self, layer: int, idx: torch.Tensor) -> torch.Tensor | None:
        return None


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


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


def layer_norm(cfg: ModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)


class Block(nn.Module):
    """`layernorm`: Pre-LN block."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = layer_norm(cfg)
        self.attn = MIXERS[cfg.mixer](cfg, layer)
        self.ln_2 = layer_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


EMBEDDINGS = {"default": TokenEmbedding}
MIXERS = {"softmax": CausalSelfAttention}
BLOCKS = {"layernorm": (Block, layer_norm)}


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
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """The harness's effective init: every Linear/Embedding re-drawn after construction."""
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx [B, T] -> logits [B, T, V]."""
        x = self.embedding(idx)
        for i, block in enumerate(self.h):
            ve = self.embedding.value_embed(i, idx)
            if ve is not None:
                x = x + ve
            x = block(x)
        logits = F.linear(self.ln_f(x), self.embedding.lm_head_weight())
        transform = OUTPUT_TRANSFORMS.get(self.cfg.loss)
        return logits if transform is None else transform(logits)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, train: bool = True) -> torch.Tensor:
        logits = self(idx)
        return LOSSES[self.cfg.loss](logits, targets) if train else cross_entropy(logits, targets)


def build_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg)
