"""The softmax statistics of the logits as one Pallas (Triton backend) kernel, writing e over the logits in place.

`softmax_stats_pallas` computes what jaxgpt.ops.cross_entropy.reference.softmax_stats_xla computes (the unnormalised
softmax e = exp(z - max) in z's dtype, and sum_exp, lse, z_target, z_mean [N] fp32), one program per row:
    pass 1   reads the row of z [V] from DRAM in chunks of BV: running max and z[target] (per-lane vectors, reduced
             once at the end)
    pass 2   reads the row again (mostly from L2: it was just read) and writes e = exp(z - max) over it (the logits
             buffer is aliased to e: `input_output_aliases`), summing e and z
All in fp32; one exp per element. So the [N, V] array costs one DRAM read and one write, against XLA's reduce (one
read) plus, in the backward, the softmax - onehot pass (a read and a write); the backward (head.py) reads e only through
its two matmuls.

Tiles: BV = min(CHUNK, next power of two >= V) columns, the tail masked (V = 50304: 13 chunks of 4096, the last 1152
wide), NUM_WARPS warps, one row per program; at GPT-2's vocabulary this reaches ~2.8 TB/s of the bytes read and
written (docs/kernels-cross-entropy.md).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt.ops.cross_entropy.reference import SoftmaxStats

f32 = jnp.float32
# scripts/profile_step.py (softmax_stats's time in the train step) picks these (docs/kernels-cross-entropy.md)
CHUNK = 4096  # columns per load
NUM_WARPS = 16


def _kernel(z_ref, t_ref, e_ref, sum_exp_ref, lse_ref, zt_ref, zmean_ref, *, V, BV):
    row = pl.program_id(0)
    target = t_ref[row]
    n_chunks = pl.cdiv(V, BV)

    def load(i):
        cols = i * BV + jnp.arange(BV)
        mask = cols < V
        return cols, mask, plgpu.load(z_ref.at[row, pl.ds(i * BV, BV)], mask=mask, other=-jnp.inf).astype(f32)

    def first_pass(acc, chunk):
        z_max, z_t = acc
        cols, _, z = chunk
        return jnp.maximum(z_max, z), z_t + jnp.where(cols == target, z, 0.0)

    def second_pass(acc, i, chunk, z_max):
        s, z_sum = acc
        _, mask, z = chunk
        e = jnp.exp(z - z_max)  # masked lanes: exp(-inf) = 0
        plgpu.store(e_ref.at[row, pl.ds(i * BV, BV)], e.astype(e_ref.dtype), mask=mask)
        return s + e, z_sum + jnp.where(mask, z, 0.0)

    zero = jnp.zeros((BV,), f32)
    first, second = (jnp.full((BV,), -jnp.inf, f32), zero), (zero, zero)
    if n_chunks == 1:  # the row is one chunk: load it once
        chunk = load(0)
        z_max, z_t = first_pass(first, chunk)
        z_max = jnp.max(z_max)
        s, z_sum = second_pass(second, 0, chunk, z_max)
    else:
        z_max, z_t = jax.lax.fori_loop(0, n_chunks, lambda i, acc: first_pass(acc, load(i)), first)
        z_max = jnp.max(z_max)
        s, z_sum = jax.lax.fori_loop(0, n_chunks, lambda i, acc: second_pass(acc, i, load(i), z_max), second)
    s = jnp.sum(s)
    for ref, value in ((sum_exp_ref, s), (lse_ref, z_max + jnp.log(s)), (zt_ref, jnp.sum(z_t)),
                       (zmean_ref, jnp.sum(z_sum) / V)):
        plgpu.store(ref.at[pl.ds(row, 1)], jnp.full((1,), value, f32))


def softmax_stats_pallas(
    logits: jax.Array, targets: jax.Array, interpret: bool = False, chunk: int | None = None
) -> SoftmaxStats:
    """SoftmaxStats of logits [N, V] (any float dtype; e is written over them, in place when XLA can donate the
    buffer, else into a copy) and int targets [N] (valid ids). chunk: columns per load (default CHUNK)."""
    N, V = logits.shape
    BV = min(chunk or CHUNK, pl.next_power_of_2(V))
    stat = jax.ShapeDtypeStruct((N,), f32)
    params = {"interpret": True} if interpret else {
        "compiler_params": plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=1)}
    e, sum_exp, lse, z_target, z_mean = pl.pallas_call(
        functools.partial(_kernel, V=V, BV=BV), out_shape=[jax.ShapeDtypeStruct((N, V), logits.dtype)] + [stat] * 4,
        grid=(N,), input_output_aliases={0: 0}, name="softmax_stats", **params,
    )(logits, targets.astype(jnp.int32))
    return SoftmaxStats(e, sum_exp, lse, z_target, z_mean)
