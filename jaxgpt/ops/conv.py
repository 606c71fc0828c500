"""Causal depthwise short convolution, as FLA's `ShortConvolution` (a depthwise `nn.Conv1d`).

The weight keeps PyTorch's depthwise Conv1d layout [C, 1, W] so converted checkpoints pass through unchanged.
"""

import jax
import jax.numpy as jnp

ACTIVATIONS = (None, "silu", "swish")


def short_conv(
    x: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    activation: str | None = "silu",
) -> jax.Array:
    """Causal depthwise convolution over time.

    y[b, t, c] = act(bias[c] + sum_{i=0}^{W-1} weight[c, 0, i] * x[b, t - (W - 1) + i, c]),  x[b, s < 0] = 0

    Args:
        x: [B, T, C] inputs.
        weight: [C, 1, W] depthwise kernel (PyTorch Conv1d layout).
        bias: [C] or None.
        activation: 'silu' / 'swish' (the same function) or None.

    Returns:
        [B, T, C] in x's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    T, W = x.shape[1], weight.shape[-1]
    w = weight[:, 0, :].astype(x.dtype)  # [C, W]
    xp = jnp.pad(x, ((0, 0), (W - 1, 0), (0, 0)))
    y = sum(xp[:, i : i + T] * w[:, i] for i in range(W))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    if activation is not None:
        y = jax.nn.silu(y)
    return y
