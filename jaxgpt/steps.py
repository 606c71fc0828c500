"""Jitted train and eval steps, data-parallel over all devices with jax.sharding.

The batch axis is sharded over a 1-D `data` mesh; params and optimizer state are replicated, and XLA
inserts the gradient all-reduce. The whole step, gradient accumulation included (lax.scan over
micro-batches), is one compiled function with donated state buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.errors import UserError


def make_mesh(batch_size: int) -> Mesh:
    devices = jax.devices()
    if batch_size % len(devices):
        raise UserError(f"batch_size {batch_size} must be divisible by the number of devices ({len(devices)})")
    return Mesh(np.array(devices), ("data",))


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Host batch [..., B, T] -> device array sharded over B."""
    spec = P(*([None] * (batch.ndim - 2)), "data", None)
    return jax.device_put(batch, NamedSharding(mesh, spec))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation) -> Callable:
    """(params, opt_state, x [A, B, T], y [A, B, T]) -> (params, opt_state, metrics); donates the state."""

    def loss_fn(params, x, y):
        return nnx.merge(graphdef, params).loss(x, y, train=True)

    def step(params, opt_state, x, y):
        def micro(grad_sum, xy):
            loss, grads = jax.value_and_grad(loss_fn)(params, *xy)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        grad_sum, losses = jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), (x, y))
        grads = jax.tree.map(lambda g: g / x.shape[0], grad_sum)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(graphdef: nnx.GraphDef) -> Callable:
    """(params, x [B, T], y [B, T]) -> plain cross-entropy of the model's logits."""

    def step(params, x, y):
        return nnx.merge(graphdef, params).loss(x, y, train=False)

    return jax.jit(step)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))
