"""RMSNorm in PyTorch: the `rmsnorm*` blocks' norm and FLA's per-head (optionally swish-gated) output norm."""

import torch
import torch.nn as nn
import torch.nn.functional as F


def rms_normalize(x: torch.Tensor, weight: torch.Tensor, eps: float, g: torch.Tensor | None = None) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight [* silu(g)] over the last axis, in (at least) fp32.

    x, g [..., D], weight [D] -> [..., D] in promote_types(x.dtype, fp32). With g it is FLA's FusedRMSNormGated
    (activation swish). A function of the weight and eps, so that it also computes FLA's own norm modules.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(dtype)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(dtype)
    return y if g is None else y * F.silu(g.to(dtype))


class RMSNorm(nn.Module):
    """Gain-only RMSNorm: weight [D] (ones), `eps`; forward(x [..., D], g=None) -> `rms_normalize`."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return rms_normalize(x, self.weight, self.eps, g)
