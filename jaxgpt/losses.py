"""Loss axis (the benchmark's `compute_loss`). Training losses only: evaluation is always plain CE.

Each loss maps fp32 logits [B, T, V] and int targets [B, T] to a scalar. `OUTPUT_TRANSFORMS` holds the
loss variants whose logit transform is part of the model output (also at eval).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy, computed in fp32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


LOSSES: dict[str, LossFn] = {"ce": cross_entropy}

OUTPUT_TRANSFORMS: dict[str, Callable[[jax.Array], jax.Array]] = {}
