"""The softmax statistics of the logits as one Pallas (Triton backend) kernel, writing e over the logits in place.

`softmax_stats_pallas` computes what jaxgpt.ops.cross_entropy.naive.softmax_stats_xla computes (the unnormalised
softmax e = exp(z - max) in z's dtype, and sum_exp, lse, z_target, z_mean [N] fp32), in one kernel per row:
    pass 1   reads the row of z [V] from DRAM in chunks of BV: running max and z[target] (per-lane vectors, reduced
             once at the end)
    pass 2   reads the row again (from L2: it was just read) and writes e = exp(z - max) over it (the logits buffer is
             aliased to e: `input_output_aliases`), summing e and z
All in fp32; one exp per element. So the [N, V] array costs one DRAM read and one write, against XLA's reduce (one
read) plus, in the backward, the softmax - onehot pass (a read and a write), and the backward (head.py) reads e only
through its two matmuls.

Tiles: BV = min(CHUNK, next power of two >= V) columns, the tail masked; ROWS consecutive rows per program (rows past N
masked). V = 50304 is 7 chunks of 8192 (8% masked in the last).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt.ops.cross_entropy.naive import SoftmaxStats

f32 = jnp.float32
# Chunk width (columns per load), warps, rows per program and pipeline stages.
CHUNK = 8192
NUM_WARPS = 8
ROWS = 1
NUM_STAGES = 1


def _kernel(z_ref, t_ref, e_ref, sum_exp_ref, lse_ref, zt_ref, zmean_ref, *, N, V, BV, rows):
    n_chunks = pl.cdiv(V, BV)
    row0 = pl.program_id(0) * rows  # read outside the loop (the interpreter cannot inside)

    def row_body(r, carry):
        row = row0 + r
        valid = row < N
        row = jnp.minimum(row, N - 1)  # rows past N read row N - 1 and store nothing
        target = t_ref[row]

        def load(i):
            cols = i * BV + jnp.arange(BV)
            mask = (cols < V) & valid
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
        out = pl.ds(row, 1)
        for ref, value in ((sum_exp_ref, s), (lse_ref, z_max + jnp.log(s)), (zt_ref, jnp.sum(z_t)),
                           (zmean_ref, jnp.sum(z_sum) / V)):
            plgpu.store(ref.at[out], jnp.full((1,), value, f32), mask=jnp.full((1,), valid))
        return carry

    jax.lax.fori_loop(0, rows, row_body, 0)


def softmax_stats_pallas(
    logits: jax.Array,
    targets: jax.Array,
    interpret: bool = False,
    chunk: int | None = None,
    num_warps: int | None = None,
    rows: int | None = None,
) -> SoftmaxStats:
    """SoftmaxStats of logits [N, V] (any float dtype; e is written over them, in place when XLA can donate the
    buffer, else into a copy) and int targets [N] (valid ids). chunk, num_warps, rows: the tiling (default CHUNK,
    NUM_WARPS, ROWS)."""
    N, V = logits.shape
    BV = min(chunk or CHUNK, pl.next_power_of_2(V))
    rows = rows or ROWS
    stat = jax.ShapeDtypeStruct((N,), f32)
    kernel = functools.partial(_kernel, N=N, V=V, BV=BV, rows=rows)
    params = {"interpret": True} if interpret else {
        "compiler_params": plgpu.CompilerParams(num_warps=num_warps or NUM_WARPS, num_stages=NUM_STAGES)}
    e, sum_exp, lse, z_target, z_mean = pl.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct((N, V), logits.dtype), stat, stat, stat, stat],
        grid=(pl.cdiv(N, rows),), input_output_aliases={0: 0}, name="softmax_stats", **params,
    )(logits, targets.astype(jnp.int32))
    return SoftmaxStats(e, sum_exp, lse, z_target, z_mean)
