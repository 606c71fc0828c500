"""Loss axis in PyTorch (twin of jaxgpt.losses): fp32 logits [B, T, V], targets [B, T] -> scalar."""

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


LOSSES: dict[str, LossFn] = {"ce": cross_entropy}

OUTPUT_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
