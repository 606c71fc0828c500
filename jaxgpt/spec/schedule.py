"""The learning-rate schedule (nanoGPT's get_lr) as plain Python; jaxgpt.optim traces the same formula for optax."""

import math

from .config import Config


def learning_rate(cfg: Config, it: int) -> float:
    """lr * (it + 1) / (warmup + 1) for it < warmup_iters, then cosine from lr to min_lr at decay_iters, then min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    ratio = min(max((it - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters), 0.0), 1.0)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
