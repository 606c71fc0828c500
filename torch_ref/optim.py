"""The benchmark's optimizer in PyTorch (twin of jaxgpt.optim): AdamW with decay on >=2-D params only."""

import torch

from jaxgpt.spec.config import Config
from jaxgpt.spec.schedule import learning_rate


def configure_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, it: int) -> float:
    """One nanoGPT update after backward(): set lr for iteration `it`, clip, step, zero grads; returns grad norm."""
    lr = learning_rate(cfg, it)
    for group in opt.param_groups:
        group["lr"] = lr
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)
