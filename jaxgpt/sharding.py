"""Device meshes and where arrays live: data parallelism and FSDP (ZeRO-3) over the GPUs of one or more hosts.

Every run uses a 2-D mesh with axes `data` and `fsdp` (either may have size 1). The batch axis of the data is
sharded over both axes together; parameters and the optimizer state are replicated over `data` and sharded
over `fsdp`: each large array is split on its largest dimension that the fsdp size divides, small or
indivisible ones (biases, norm gains, scalars) are replicated. With fsdp = 1 everything is replicated and the
step is plain data parallelism. Under FSDP the step all-gathers the parameters for each micro-batch's
forward/backward pass and reduce-scatters the gradients back onto the shards (explicit collectives, steps.py).

With several processes (distributed.py) the mesh spans every process's devices, in `jax.devices()` order: process
0's devices first, so the fsdp axis stays within a host when it is no larger than a host's device count. Each
process builds only its rows of a batch (`assemble_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxgpt.errors import UserError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch is split over data x fsdp devices
# Arrays with fewer elements stay replicated under FSDP: gathering them costs more latency than their memory.
MIN_FSDP_SIZE = 2**18


def parse_mesh(spec: str) -> dict[str, int]:
    """'data=2,fsdp=2' -> {'data': 2, 'fsdp': 2}; a size of -1 (at most one) means "the remaining devices".
    Omitted axes have size 1; an empty spec is {} (all devices on `data`, see mesh_shape)."""
    sizes: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise UserError(f"mesh: expected axis=size items such as 'data=2,fsdp=2', got {item!r} in {spec!r}")
        if name not in MESH_AXES:
            raise UserError(f"mesh: unknown axis {name!r} in {spec!r}; axes: {', '.join(MESH_AXES)}")
        if name in sizes:
            raise UserError(f"mesh: axis {name!r} given twice in {spec!r}")
        try:
            size = int(value)
        except ValueError:
            raise UserError(f"mesh: size of {name!r} must be an integer, got {value!r}") from None
        if size < 1 and size != -1:
            raise UserError(f"mesh: size of {name!r} must be >= 1 or -1 (the remaining devices), got {size}")
        sizes[name] = size
    if list(sizes.values()).count(-1) > 1:
        raise UserError(f"mesh: at most one axis may be -1, got {spec!r}")
    return sizes


def mesh_shape(spec: str, n_devices: int, batch_size: int | None = None) -> dict[str, int]:
    """Resolve a mesh spec against the device count: -> {'data': d, 'fsdp': f} with d * f == n_devices.

    An empty spec puts every device on `data`; a -1 axis takes the devices the other one leaves.
    `batch_size`, when given, must divide over the d * f devices that share the batch."""
    sizes = parse_mesh(spec) or {"data": -1}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    for name, size in sizes.items():
        if size == -1:
            if n_devices % fixed:
                raise UserError(f"mesh {spec!r}: {n_devices} devices do not divide over the fixed axes ({fixed})")
            sizes[name] = n_devices // fixed
    shape = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    if math.prod(shape.values()) != n_devices:
        used = "x".join(str(s) for s in shape.values())
        raise UserError(
            f"mesh {spec!r} uses {used} = {math.prod(shape.values())} devices but {n_devices} are visible; "
            "the axis sizes must multiply to the device count (use -1 for the rest, or limit the visible "
            "devices, e.g. CUDA_VISIBLE_DEVICES)"
        )
    if batch_size is not None and batch_size % n_devices:
        raise UserError(
            f"batch_size {batch_size} must be divisible by data x fsdp = {n_devices} devices "
            f"(mesh {format_mesh(shape)}): each device takes an equal slice of the batch"
        )
    return shape


def format_mesh(shape: dict[str, int]) -> str:
    return ",".join(f"{axis}={size}" for axis, size in shape.items())


def make_mesh(batch_size: int, spec: str = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all) from a spec such as 'fsdp=4' (default: all on data)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(spec, len(devices), batch_size)
    return Mesh(np.array(devices).reshape(shape["data"], shape["fsdp"]), MESH_AXES)


def fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
    """Partition spec of one parameter (or optimizer moment) of `shape` on an fsdp axis of size `fsdp`:
    the largest dimension divisible by `fsdp` is split over it; small or indivisible arrays are replicated."""
    if fsdp == 1 or math.prod(shape) < MIN_FSDP_SIZE:
        return P()
    divisible = [d for d, n in enumerate(shape) if n % fsdp == 0]
    if not divisible:
        return P()
    dim = max(divisible, key=lambda d: shape[d])
    return P(*(["fsdp" if d == dim else None for d in range(len(shape))]))


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of parameters or optimizer state (arrays or shape/dtype structures)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), tree)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a token array [..., B, T]: B over every batch axis of the mesh, the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(*([None] * (ndim - 2)), axes, None))


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """Host batch [..., B, T] -> device array sharded over B."""
    return jax.device_put(batch, batch_sharding(mesh, batch.ndim))


def assemble_batch(sample: Callable[[np.ndarray], tuple[np.ndarray, ...]], shape: tuple[int, ...],
                   mesh: Mesh) -> tuple[jax.Array, ...]:
    """Global token arrays of `shape` [..., B, T], sharded over B as `batch_sharding` says, built from this
    process's rows alone: `sample(rows)` returns the arrays' rows at the flat row indices `rows` of the
    [prod(shape[:-1]), T] batch (sorted; every row of the batch with one process)."""
    sharding = batch_sharding(mesh, len(shape))
    flat = np.arange(math.prod(shape[:-1])).reshape(shape[:-1])
    indices = sharding.addressable_devices_indices_map(shape).values()
    rows = np.unique(np.concatenate([flat[index[:-1]].ravel() for index in indices]))

    def make(local: np.ndarray) -> jax.Array:  # a device's block: its rows, found among this process's
        return jax.make_array_from_callback(shape, sharding,
                                            lambda index: local[np.searchsorted(rows, flat[index[:-1]])])

    return tuple(make(local) for local in sample(rows))


def state_bytes_per_device(tree: Any) -> int:
    """Bytes of a pytree of arrays held by one device (the first): its shard of each array."""
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """Shape/dtype structures of `tree` that carry `shardings` (targets for a sharded restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
