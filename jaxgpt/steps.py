"""Jitted train and eval steps over a (data, fsdp) device mesh with jax.sharding (layouts: sharding.py).

The batch axis is sharded over all devices. With replicated params and optimizer state (data parallelism)
each device accumulates the gradients of its rows over all micro-batches and one all-reduce per step sums
them (shard_map; left to XLA, the all-reduce sat inside the micro-batch loop: one per micro-batch). Without
shardings the layout follows the arguments and XLA inserts the collectives. With FSDP shardings each
micro-batch's gradient is computed per device (shard_map, explicit collectives): the device all-gathers the
parameter shards over `fsdp`, differentiates on its slice of the batch, and the gradient is reduce-scattered
back onto the shards (then summed over `data`); the optimizer update runs on the shards only (ZeRO-3).
The whole step, gradient accumulation included (lax.scan over micro-batches), is one compiled function with
donated state buffers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.sharding import AXES, batch_sharding, make_mesh, replicate, shard_batch

__all__ = ["all_finite", "make_eval_step", "make_mesh", "make_train_step", "merge_model", "replicate", "shard_batch"]


class _Remat(nnx.Module):
    """A block whose activations are recomputed in the backward pass instead of being stored."""

    def __init__(self, block: nnx.Module):
        self.block = block

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.remat(lambda block, x: block(x))(self.block, x)


def merge_model(graphdef: nnx.GraphDef, params: Any, remat: bool = False) -> nnx.Module:
    """The model from its graph and params; with `remat`, each block is rematerialised in the backward pass
    (the parameter tree is unchanged, so checkpoints do not depend on it)."""
    model = nnx.merge(graphdef, params)
    if remat:
        model.h = nnx.List([_Remat(block) for block in model.h])
    return model


def _is_sharded(shardings: Any) -> bool:
    return shardings is not None and not all(s.is_fully_replicated for s in jax.tree.leaves(shardings))


def _fsdp_dim(spec: P) -> int | None:
    return next((d for d, axis in enumerate(spec) if axis == "fsdp"), None)


def _fsdp_value_and_grad(loss_fn: Callable, param_shardings: Any) -> Callable:
    """(param shards, x [B, T], y [B, T]) -> (mean loss, mean gradient on the param shards), ZeRO-3 style.

    Per device: all-gather the fsdp-sharded params, loss and gradient of the local rows, then reduce-scatter
    each sharded gradient over fsdp (psum for replicated ones) and sum over data; dividing by the device count
    turns the sum of per-device means into the mean over the whole batch (all devices hold equal rows, and
    every training loss is a mean over tokens)."""
    mesh = jax.tree.leaves(param_shardings)[0].mesh
    specs = jax.tree.map(lambda s: s.spec, param_shardings)
    batch = P(AXES, None)

    def gather(p, spec):
        dim = _fsdp_dim(spec)
        return p if dim is None else jax.lax.all_gather(p, "fsdp", axis=dim, tiled=True)

    def reduce(g, spec):
        dim = _fsdp_dim(spec)
        g = jax.lax.psum(g, "fsdp") if dim is None else jax.lax.psum_scatter(g, "fsdp", scatter_dimension=dim, tiled=True)
        return jax.lax.psum(g, "data") / mesh.size

    def local(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(jax.tree.map(gather, params, specs), x, y)
        return jax.lax.pmean(loss, AXES), jax.tree.map(reduce, grads, specs)

    # check_vma=False: the gradient above is the device's own (no implicit psum); the reductions are explicit
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, batch, batch), out_specs=(P(), specs), check_vma=False)


def _gathered(params: Any, shardings: Any) -> Any:
    """All-gather FSDP-sharded params (a no-op for replicated ones)."""
    if not _is_sharded(shardings):
        return params
    mesh = jax.tree.leaves(shardings)[0].mesh
    return jax.lax.with_sharding_constraint(params, NamedSharding(mesh, P()))


def _accumulate(value_and_grad: Callable, params: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
    """Summed gradients and the losses [A] of the micro-batches x, y [A, B, T] (a lax.scan)."""

    def micro(grad_sum, xy):
        loss, grads = value_and_grad(params, *xy)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    return jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), (x, y))


def _data_parallel_loss_and_grads(loss_fn: Callable, mesh: Mesh) -> Callable:
    """(replicated params, x [A, B, T], y [A, B, T]) -> (mean loss, mean gradient), one all-reduce per step:
    every device accumulates its rows' gradients over the A micro-batches, then the sums are psum-ed."""
    batch = P(None, AXES, None)

    def local(params, x, y):
        grad_sum, losses = _accumulate(jax.value_and_grad(loss_fn), params, x, y)
        n = mesh.size * x.shape[0]  # equal rows per device and micro-batch: mean of the per-device means
        return jax.lax.pmean(losses.mean(), AXES), jax.tree.map(lambda g: jax.lax.psum(g, AXES) / n, grad_sum)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch, batch), out_specs=(P(), P()), check_vma=False)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    param_shardings: Any = None,
    opt_shardings: Any = None,
    remat: bool = False,
) -> Callable:
    """(params, opt_state, x [A, B, T], y [A, B, T]) -> (params, opt_state, metrics); donates the state.

    Without shardings the layout follows the arguments (replicated params, batch sharded over B: data
    parallel, collectives placed by XLA). With `param_shardings` and `opt_shardings` (pytrees of
    NamedSharding, see sharding.state_shardings) the state keeps those layouts and the batch is sharded over
    the mesh's data and fsdp axes: replicated params get one gradient all-reduce per step; sharded params are
    gathered per micro-batch and their gradients reduce-scattered.
    """

    def loss_fn(params, x, y):
        return merge_model(graphdef, params, remat).loss(x, y, train=True)

    mesh = None if param_shardings is None else jax.tree.leaves(param_shardings)[0].mesh
    if mesh is not None and mesh.size > 1 and not _is_sharded(param_shardings):
        loss_and_grads = _data_parallel_loss_and_grads(loss_fn, mesh)
    else:
        value_and_grad = (_fsdp_value_and_grad(loss_fn, param_shardings) if _is_sharded(param_shardings)
                          else jax.value_and_grad(loss_fn))

        def loss_and_grads(params, x, y):
            grad_sum, losses = _accumulate(value_and_grad, params, x, y)
            return losses.mean(), jax.tree.map(lambda g: g / x.shape[0], grad_sum)

    def step(params, opt_state, x, y):
        loss, grads = loss_and_grads(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(params, updates), opt_state, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    batch = batch_sharding(mesh, 3)
    return jax.jit(
        step,
        in_shardings=(param_shardings, opt_shardings, batch, batch),
        out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )


def make_eval_step(graphdef: nnx.GraphDef, param_shardings: Any = None) -> Callable:
    """(params, x [B, T], y [B, T]) -> plain cross-entropy of the model's logits."""

    def step(params, x, y):
        return nnx.merge(graphdef, _gathered(params, param_shardings)).loss(x, y, train=False)

    return jax.jit(step)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))
