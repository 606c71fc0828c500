"""Loss axis (the benchmark's `compute_loss`). Training losses only: evaluation is always plain CE.

Each loss maps logits [B, T, V] and int targets [B, T] to a scalar, computed in fp32. `OUTPUT_TRANSFORMS`
holds the loss variants whose logit transform is part of the model output (also at eval).
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Z_WEIGHT = 1e-4


def _normalizer_and_target(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fp32 logsumexp(z) and z[target], [B, T] each (no [B, T, V] log-softmax: its gradient is slow on CPU)."""
    z = logits.astype(jnp.float32)
    z_target = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(z, axis=-1), z_target


def cross_entropy(logits: jax.Array, targets: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Mean token cross-entropy in fp32; with `smoothing` eps the target is (1-eps)*onehot + eps/V (torch's rule):
    loss = lse - (1-eps) z_target - eps mean_v(z)."""
    lse, z_target = _normalizer_and_target(logits, targets)
    nll = lse - z_target
    if smoothing:
        nll = nll - smoothing * (logits.astype(jnp.float32).mean(-1) - z_target)
    return nll.mean()


def z_penalty(logits: jax.Array) -> jax.Array:
    """1e-4 * mean(logsumexp(logits)^2) in fp32."""
    return Z_WEIGHT * jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)).mean()


def z_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return cross_entropy(logits, targets) + z_penalty(logits)


def poly_ls_z(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """CE with label smoothing 0.05 + PolyLoss-1 term mean(1 - p_target) + z-loss of the raw logits."""
    lse, z_target = _normalizer_and_target(logits, targets)
    p_target = jnp.exp(z_target - lse)
    return cross_entropy(logits, targets, 0.05) + (1 - p_target).mean() + z_penalty(logits)


def tanh_cap_ls_z(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """capped = 30*tanh(logits/30); CE with label smoothing 0.1 + z-loss, both of the capped logits."""
    capped = 30 * jnp.tanh(logits.astype(jnp.float32) / 30)
    return cross_entropy(capped, targets, 0.1) + z_penalty(capped)


def sigmoid_cap(logits: jax.Array) -> jax.Array:
    """`softcap_ce` model output: 30*sigmoid(logits/7.5), in fp32."""
    return 30 * jax.nn.sigmoid(logits.astype(jnp.float32) / 7.5)


LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy,
    "label_smoothing": partial(cross_entropy, smoothing=0.05),
    "z_loss": z_loss,
    "softcap_ce": cross_entropy,  # on the capped model output
    "poly_ls_z": poly_ls_z,
    "tanh_cap_ls_z": tanh_cap_ls_z,
}

OUTPUT_TRANSFORMS: dict[str, Callable[[jax.Array], jax.Array]] = {"softcap_ce": sigmoid_cap}
