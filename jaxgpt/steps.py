"""Jitted train and eval steps over a (data, fsdp) device mesh with jax.sharding (layouts: sharding.py).

The batch axis is sharded over all devices. On a mesh of several devices each device computes the gradients of
its own rows (shard_map, explicit collectives) and accumulates them over all micro-batches; one reduction per
step, after the micro-batch loop, sums them over the devices (placed by XLA, the all-reduce would run inside
the loop, once per micro-batch). With replicated params and optimizer state (data parallelism) that is one
all-reduce.
With FSDP shardings the device also all-gathers the parameter shards over `fsdp` for each micro-batch and
reduce-scatters that micro-batch's gradient back onto the shards; the accumulated shards are then summed over
`data` once per step, and the optimizer update runs on the shards only (ZeRO-3). Without shardings the layout
follows the arguments and XLA inserts the collectives. The whole step, gradient accumulation included
(lax.scan over micro-batches), is one compiled function with donated state buffers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.spec.config import ModelConfig
from jaxgpt.model import init_model
from jaxgpt.sharding import MESH_AXES, batch_sharding, make_mesh, replicate, shard_batch

__all__ = [
    "TrainStep", "all_finite", "init_state", "make_eval_step", "make_mesh", "make_train_step", "merge_model",
    "replicate", "shard_batch",
]


class _Remat(nnx.Module):
    """A block whose activations are recomputed in the backward pass instead of being stored."""

    def __init__(self, block: nnx.Module):
        self.block = block

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.remat(lambda block, x: block(x))(self.block, x)

    @property
    def fuses_residual(self) -> bool:
        return getattr(self.block, "fuses_residual", False)

    def fused(self, x: jax.Array, r: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """`Block.fused`, rematerialised."""
        return nnx.remat(lambda block, x, r: block.fused(x, r))(self.block, x, r)


def merge_model(graphdef: nnx.GraphDef, params: Any, remat: bool = False) -> nnx.Module:
    """The model from its graph and params; with `remat`, each block is rematerialised in the backward pass
    (the parameter tree is unchanged, so checkpoints do not depend on it)."""
    model = nnx.merge(graphdef, params)
    if remat:
        model.h = nnx.List([_Remat(block) for block in model.h])
    return model


def _fsdp_dim(spec: P) -> int | None:
    return next((d for d, axis in enumerate(spec) if axis == "fsdp"), None)


def _gather(p: jax.Array, spec: P) -> jax.Array:
    """A device's shard of a parameter laid out as `spec` -> the whole parameter (all-gather over fsdp)."""
    dim = _fsdp_dim(spec)
    return p if dim is None else jax.lax.all_gather(p, "fsdp", axis=dim, tiled=True)


def _scatter(g: jax.Array, spec: P) -> jax.Array:
    """A device's gradient of a whole parameter -> its shard of the gradient, summed over fsdp (reduce-scatter);
    the gradient of a replicated parameter stays as it is (summed once per step, see _mesh_loss_and_grads)."""
    dim = _fsdp_dim(spec)
    return g if dim is None else jax.lax.psum_scatter(g, "fsdp", scatter_dimension=dim, tiled=True)


def _replicated_axes(spec: P) -> tuple[str, ...]:
    """The mesh axes a parameter laid out as `spec` is replicated over (its gradient is summed over them)."""
    return tuple(axis for axis in MESH_AXES if axis not in spec)


def _accumulate(value_and_grad: Callable, params: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array]:
    """Summed gradients and the losses [A] of the micro-batches x, y [A, B, T] (a lax.scan)."""

    def micro(grad_sum, xy):
        loss, grads = value_and_grad(params, *xy)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    return jax.lax.scan(micro, jax.tree.map(jnp.zeros_like, params), (x, y))


def _mesh_loss_and_grads(loss_fn: Callable, mesh: Mesh, specs: Any) -> Callable:
    """(params laid out as `specs`, x [A, B, T], y [A, B, T]) -> (mean loss, mean gradient laid out as `specs`).

    Per device and micro-batch: all-gather the fsdp-sharded params, loss and gradient of the local rows,
    reduce-scatter the sharded gradients over fsdp (ZeRO-3: no device keeps a whole gradient). Every device
    accumulates its gradients over the A micro-batches, then one reduction per step sums each over the axes its
    parameter is replicated on: `data` for the fsdp shards, `data` and `fsdp` for the replicated ones (with
    every spec P(), plain data parallelism: a single all-reduce). Dividing by devices x A turns the sum of
    per-device means into the mean over the whole batch (all devices hold equal rows, and every training loss
    is a mean over tokens)."""
    batch = P(None, MESH_AXES, None)

    def value_and_grad(params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(jax.tree.map(_gather, params, specs), x, y)
        return loss, jax.tree.map(_scatter, grads, specs)

    def local(params, x, y):
        grad_sum, losses = _accumulate(value_and_grad, params, x, y)
        n = mesh.size * x.shape[0]
        grads = jax.tree.map(lambda g, spec: jax.lax.psum(g, _replicated_axes(spec)) / n, grad_sum, specs)
        return jax.lax.pmean(losses.mean(), MESH_AXES), grads

    # check_vma=False: the gradients above are the device's own (no implicit psum); the reductions are explicit
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, batch, batch), out_specs=(P(), specs), check_vma=False)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The compiled train step, on the state's leaves: `jitted(p, o, x, y) -> (p, o, metrics)` with p, o the flat
    lists of the params' and optimizer state's arrays and x, y [A, B, T].

    jit flattens its arguments at every call, and nnx.State and optax's state trees flatten through Python
    callbacks, host time per step in which the device may wait (scripts/bench_dispatch.py measures it); flat
    lists flatten in C++. Loops keep `leaves(params, opt_state)`
    between steps and rebuild the trees with `trees(p, o)` where they need them (evaluation, checkpoints);
    calling the TrainStep itself takes and returns trees.
    """

    jitted: Callable
    params_def: Any  # PyTreeDefs of params and opt_state
    opt_def: Any

    def leaves(self, params: Any, opt_state: Any) -> tuple[list, list]:
        return self.params_def.flatten_up_to(params), self.opt_def.flatten_up_to(opt_state)

    def trees(self, p: list, o: list) -> tuple[Any, Any]:
        return self.params_def.unflatten(p), self.opt_def.unflatten(o)

    def __call__(self, params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, dict]:
        p, o, metrics = self.jitted(*self.leaves(params, opt_state), x, y)
        return *self.trees(p, o), metrics


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    params: Any,
    opt_state: Any,
    *,
    param_shardings: Any = None,
    opt_shardings: Any = None,
    remat: bool = False,
) -> TrainStep:
    """The train step for state shaped like `params` and `opt_state` (arrays or jax.ShapeDtypeStructs); it takes
    (params, opt_state, x [A, B, T], y [A, B, T]) -> (params, opt_state, metrics) and donates the state.

    Without shardings the layout follows the arguments (replicated params, batch sharded over B: data
    parallel, collectives placed by XLA). With `param_shardings` and `opt_shardings` (pytrees of
    NamedSharding, see sharding.state_shardings) the state keeps those layouts and the batch is sharded over
    the mesh's data and fsdp axes: sharded params are gathered per micro-batch and their gradients
    reduce-scattered; the gradients are summed over the remaining axes once per step (replicated params: one
    all-reduce).
    """
    params_def, opt_def = jax.tree.structure(params), jax.tree.structure(opt_state)

    def loss_fn(params, x, y):
        return merge_model(graphdef, params, remat).loss(x, y, train=True)

    mesh = None if param_shardings is None else jax.tree.leaves(param_shardings)[0].mesh
    if mesh is not None and mesh.size > 1:
        loss_and_grads = _mesh_loss_and_grads(loss_fn, mesh, jax.tree.map(lambda s: s.spec, param_shardings))
    else:
        def loss_and_grads(params, x, y):
            grad_sum, losses = _accumulate(jax.value_and_grad(loss_fn), params, x, y)
            return losses.mean(), jax.tree.map(lambda g: g / x.shape[0], grad_sum)

    def step(p, o, x, y):
        params, opt_state = params_def.unflatten(p), opt_def.unflatten(o)
        loss, grads = loss_and_grads(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        params = optax.apply_updates(params, updates)
        return params_def.flatten_up_to(params), opt_def.flatten_up_to(opt_state), metrics

    if mesh is None:
        return TrainStep(jax.jit(step, donate_argnums=(0, 1)), params_def, opt_def)
    batch = batch_sharding(mesh, 3)
    state = (params_def.flatten_up_to(param_shardings), opt_def.flatten_up_to(opt_shardings))
    jitted = jax.jit(
        step, in_shardings=(*state, batch, batch), out_shardings=(*state, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )
    return TrainStep(jitted, params_def, opt_def)


def init_state(
    model_cfg: ModelConfig, seed: int, tx: optax.GradientTransformation, param_shardings: Any, opt_shardings: Any
) -> tuple[Any, Any]:
    """Fresh params and optimizer state, initialised in place on their shardings: no device ever holds more
    than its shard of either (under FSDP a large model need not fit on one device first)."""
    params = jax.jit(lambda: nnx.state(init_model(model_cfg, seed), nnx.Param), out_shardings=param_shardings)()
    return params, jax.jit(tx.init, out_shardings=opt_shardings)(params)


def make_eval_step(graphdef: nnx.GraphDef, param_shardings: Any = None) -> Callable:
    """(params, x [B, T], y [B, T]) -> plain cross-entropy of the model's logits.

    On a mesh of several devices each device evaluates its own rows (shard_map, as the train step), so the
    model's Pallas kernels see local arrays (XLA cannot partition them: under a plain jit it would gather the
    activations onto every device), and the per-device means are averaged (equal rows per device)."""

    def loss(params, x, y):
        return nnx.merge(graphdef, params).loss(x, y, train=False)

    mesh = None if param_shardings is None else jax.tree.leaves(param_shardings)[0].mesh
    if mesh is None or mesh.size == 1:
        return jax.jit(loss)
    specs = jax.tree.map(lambda s: s.spec, param_shardings)

    def local(params, x, y):
        return jax.lax.pmean(loss(jax.tree.map(_gather, params, specs), x, y), MESH_AXES)

    batch = P(MESH_AXES, None)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(specs, batch, batch), out_specs=P(), check_vma=False))


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))
