"""A nanoGPT-equivalent PyTorch training step for torch_ref models (the reference side of benchmarks).

What nanoGPT's train.py does per iteration: bf16 autocast on CUDA, `grad_accum` micro-batches each
backpropagating loss / grad_accum, global-norm clipping, fused AdamW (torch_ref.optim), zero_grad with
set_to_none; TF32 allowed for fp32 matmuls and cuDNN. Optionally `torch.compile`d: the compiled function is
the model's training loss (logits and loss in one graph, as nanoGPT's forward(idx, targets) computes both).
The learning rate stays at the recipe's peak (the schedule costs nothing on the device and does not matter here).
"""

from __future__ import annotations

import contextlib

import torch

from jaxgpt.spec.config import Config

from .model import GPT
from .optim import configure_optimizer


def allow_tf32() -> None:
    """nanoGPT's global setting: TF32 for fp32 matmuls and cuDNN convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


class TorchTrainStep:
    """One optimizer step of `model` on x, y [A, B, T] (int64, on the model's device); A micro-batches.

    `forward` and `forward_backward` are the step's parts (for breakdowns); calling the object runs the whole
    step. All return the loss as a device tensor without synchronising.
    """

    def __init__(self, model: GPT, cfg: Config, compile: bool):
        self.model = model
        self.opt = configure_optimizer(model, cfg)
        self.grad_clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        self.loss_fn = torch.compile(model.loss) if compile else model.loss
        on_cuda = next(model.parameters()).is_cuda
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if on_cuda else contextlib.nullcontext

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean training loss over the micro-batches, no autograd graph."""
        with torch.no_grad(), self.autocast():
            return sum(self.loss_fn(xa, ya) for xa, ya in zip(x, y)) / x.shape[0]

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Accumulate the gradient of the mean loss into .grad; returns the last micro-batch's scaled loss."""
        for xa, ya in zip(x, y):
            with self.autocast():
                loss = self.loss_fn(xa, ya) / x.shape[0]
            loss.backward()
        return loss

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.forward_backward(x, y)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.zero_grad()
        return loss
