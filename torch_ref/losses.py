"""Loss axis in PyTorch (twin of jaxgpt.losses): logits [B, T, V], targets [B, T] -> fp32 scalar."""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from jaxgpt.spec.constants import LABEL_SMOOTHING, LOGIT_CAP, SIGMOID_CAP_SCALE, TANH_CAP_SMOOTHING, Z_WEIGHT

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), label_smoothing=smoothing)


def z_penalty(logits: torch.Tensor) -> torch.Tensor:
    return Z_WEIGHT * torch.logsumexp(logits.float(), dim=-1).square().mean()


def z_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return cross_entropy(logits, targets) + z_penalty(logits)


def poly_ls_z(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    p_target = logits.float().softmax(-1).gather(-1, targets.unsqueeze(-1))
    return cross_entropy(logits, targets, LABEL_SMOOTHING) + (1 - p_target).mean() + z_penalty(logits)


def tanh_cap_ls_z(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    capped = LOGIT_CAP * torch.tanh(logits.float() / LOGIT_CAP)
    return cross_entropy(capped, targets, TANH_CAP_SMOOTHING) + z_penalty(capped)


def sigmoid_cap(logits: torch.Tensor) -> torch.Tensor:
    return LOGIT_CAP * torch.sigmoid(logits.float() / SIGMOID_CAP_SCALE)


LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy,
    "label_smoothing": partial(cross_entropy, smoothing=LABEL_SMOOTHING),
    "z_loss": z_loss,
    "softcap_ce": cross_entropy,
    "poly_ls_z": poly_ls_z,
    "tanh_cap_ls_z": tanh_cap_ls_z,
}

OUTPUT_TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"softcap_ce": sigmoid_cap}
