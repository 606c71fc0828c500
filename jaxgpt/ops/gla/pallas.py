"""Gated Linear Attention with Pallas (Triton backend) kernels and a hand-written backward (`jax.custom_vjp`).

Same math and API as `jaxgpt.ops.gla.chunk.chunk_gla` (FLA layout [B, T, H, D], 64-step chunks, exact pairwise
gating inside 16-step sub-chunks). The kernels are structured as FLA's `chunk_gla`: 64-row products for the
chunk-level work, 16-row programs (one per sub-chunk, or per off-diagonal sub-block of A) for the intra-chunk
scores and their gradients, one job per kernel, and nothing [.., S, S, K]-sized in memory.

Notation, per chunk n of C = 64 steps and key dimension: g = the chunk-local cumsum of the log-gates gk, in log2
units (log2(e) gk summed, fp32), so that every gate factor e^{x} is one exp2 2^{x / ln 2} (written e^{.} below, in
natural units); g is written once, by _chunk_cumsum first in the forward, and kept as a residual for the backward
(fp32 [B, Tp, H, K], in gk's place: gk is cast to fp32 outside the custom_vjp), so that every kernel, the state
kernels included, reads the same values and no kernel scans inside its loop. g_last = g's last row in the chunk
(read as a row of g, so g_last - g is exactly 0 at the chunk's last step: a separate sum rounds differently, by ~1e-4
at |g| ~ 1e3, and that error would scale the newest, dominant term of a strongly gated state), q~ = scale * q, S_n the
state entering chunk n (S_0 = h0) and dS_{n+1} the gradient w.r.t. the state after it (dS_N = d(final state)).

forward
    _chunk_cumsum     grid (N, B*H)             g
    _state_fwd        grid (B*H, K/SK, V/SV),   S_{n+1} = diag(e^{g_last}) S_n + (k e^{g_last - g})^T v
                      sequential over chunks    writes S_n (fp32 [B, N, H, K, V]) and the final state
    _chunk_A_off      grid (N*6, B*H)           A[t, j] = sum_k q~_tk k_jk e^{g_tk - g_jk} (j <= t, else 0), in v's
    _chunk_A_diag     grid (N*M, B*H)           dtype (a residual for the backward), in 16 x 16 sub-blocks: the 6
                                                off-diagonal ones per chunk (one program each), then the diagonal
                                                ones and the zeros right of them (one program per sub-chunk, into
                                                the same buffer: input_output_aliases)
    _chunk_o          grid (V/BV, N, B*H)       o = (q~ e^{g}) S_n + A v
backward (g: the forward's)
    _state_bwd        grid (B*H, K/SK, V/SV),   dS_n = diag(e^{g_last}) dS_{n+1} + (q~ e^{g})^T do
                      reverse over chunks       writes dS_{n+1} (fp32) and dh0 = dS_0
    _chunk_dv         grid (V/BV, N, B*H)       dv = A^T do + (k e^{g_last - g}) dS_{n+1}
    _chunk_dA         grid (N, B*H)             dA = do v^T (j <= t, else 0), fp32 [B, Tp, H, C]
    _chunk_dqk_intra  grid (N*M, B*H, K/BK)     per sub-chunk, fp32: dq~_intra = [sum_j dA_tj k_j e^{g_t - g_j}],
                                                dk_intra = [sum_t dA_tj q~_t e^{g_t - g_j}]
    _chunk_dqkg       grid (K/BK, N, B*H)       dq~ = e^{g} (do S_n^T) + dq~_intra
                                                dk  = e^{g_last - g} (v dS_{n+1}^T) + dk_intra
                                                dgk = reverse cumsum over the chunk of (q~ dq~ - k dk)
                                                      + e^{g_last} sum_v (S_n * dS_{n+1})
                                                      + sum_t k_t (e^{g_last - g_t} v_t dS_{n+1}^T)
The gate gradient comes from the identity (per key dimension, u in chunk n)
    dgk_u = sum_{s >= u in the chunk} (q~_s dq~_s - k_s dk_s) + sum_v S_{n+1} * dS_{n+1},
whose last term is written with S_n as FLA does (the last two terms of dgk above; k dk there is dk's inter part).

Stability, the reference-row trick: gk <= 0, so g falls along the chunk and e^{g_t - g_j} <= 1 for j <= t, but a
factorisation e^{g_t} e^{-g_j} over the whole chunk would overflow for strong gates (-20 per step: |g| ~ 1e3). The
bracketed intra-chunk sums (and A) are therefore built from the 16 x 16 sub-blocks (i, j) of the chunk (M = 4
sub-chunks of 16 rows per chunk), in the program of sub-chunk i (of the pair (i, j) in _chunk_A_off):
  * off-diagonal blocks as products through a reference row r between the two sub-chunks, so that both factors
    are <= 1 for any gate strength. For A and dq~ (blocks (i, j < i)), r = g at i's first row:
        A_ij = (q~_i e^{g_i - r}) (k_j e^{r - g_j})^T,      dq~_i += e^{g_i - r} sum_{j < i} dA_ij (k_j e^{r - g_j});
    A_ij is one [16, BK] x [BK, 16] product per key block; dq~ is a loop over j < i of [16, 16] x [16, BK]
    products. For dk (blocks (j > i, i)), r = g at i's last row:
        dk_i += e^{r - g_i} sum_{j > i} dA_ji^T (q~_j e^{g_j - r}).
  * diagonal blocks by a loop over the 16 steps s of the sub-chunk (as FLA's intra kernels), each reading s's k /
    q / g rows and dA's column s (for dq~) / row s (for dk) from memory: per step one [16, BK] decay. In
    _chunk_dqk_intra it is e^{-|g_t - g_s|}, which is e^{g_t - g_s} at the rows t >= s that dq~ takes and
    e^{g_s - g_t} at the rows t <= s that dk takes (dA is zero elsewhere), so one exp2 serves both; in
    _chunk_A_diag column s is the row sum of q~ k_s e^{min(g - g_s, 0)} (clamped at 0, `_decay`, where rows t < s
    would overflow), stored straight to A with rows t < s zeroed.
The inter-chunk factors e^{g}, e^{g_last - g}, e^{g_last} are <= 1 as they stand.

Tiles: key blocks of BK = min(K, BLOCK_K) columns (a loop inside _chunk_A_off / _chunk_A_diag / _chunk_o /
_chunk_dv, a grid axis of _chunk_dqk_intra / _chunk_dqkg), value blocks of BV = min(V, BLOCK_V) (a grid axis of
_chunk_o / _chunk_dv, a loop in _chunk_dA / _chunk_dqkg). Where the block is a grid axis of a chunk-level kernel
(_chunk_o, _chunk_dv, _chunk_dqkg) it is axis 0, the fastest-varying: a chunk's blocks run as adjacent programs, so
the rows they all read (q and g; k and g; do and v) come from L2 after the first. The state kernels split each
head's [K, V] state into SK x SV tiles, SK = min(K, state_block), SV = min(V, state_block), one program per tile;
`state_block` None picks 64, or 32 when 64 x 64 tiles give fewer programs than the GPU has SMs (SM_COUNT).
Warps and pipelining stages per kernel: NUM_WARPS, NUM_STAGES.

Padding: the kernels take head dims that are powers of two from 16 (Triton tiles) and T a multiple of 64. Any K, V
in [1, 256] is zero-padded to the next one, K' and V', and T to a multiple of 64, outside the custom_vjp (q, k, gk
and h0's rows to K'; v and h0's columns to V'; the time axis with zeros), and o and the final state are sliced back.
Padded key columns have q = k = 0 and gate 0 (no decay), padded value columns v = 0, padded steps zero inputs and
zero log-gates (the state passes through unchanged), so they add nothing to the real outputs; their gradients are
dropped by the slice's transpose (the pad).

Precision follows FLA: inputs in their dtype, gates, states and accumulators fp32, products accumulated in fp32 at
`_precision` (Precision.DEFAULT for bf16 / fp16 inputs, HIGHEST for fp32 inputs). The products with a chunk's state
or state gradient outside the forward recurrence, (q e^{g}) S_n in _chunk_o, (q~ e^{g})^T do in _state_bwd,
(k e^{g_last - g}) dS_{n+1} in _chunk_dv, do S_n^T and v dS_{n+1}^T in _chunk_dqkg, take both operands in the
inputs' dtype (the fp32 factors cast), as FLA's; so do A v and A^T do (A is stored in v's dtype) and do v^T. The
rest (_state_fwd's (k e^{g_last - g})^T v, A's and the intra-chunk gradients' sub-block products) take fp32
operands: TF32 on the GPU for bf16 / fp16 inputs.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt.ops.utils import SM_COUNT, pad_time, pad_trailing, pow2_dim

CHUNK = 64  # steps per chunk (one state stored per chunk)
SUB = 16  # steps per sub-chunk (pairwise gating inside)
M = CHUNK // SUB  # sub-chunks per chunk
BLOCK_K = 64  # key columns per block (a grid axis of _chunk_dqk_intra / _chunk_dqkg, a loop elsewhere); >= 16
BLOCK_V = 64  # value columns per block (a grid axis of _chunk_o / _chunk_dv, a loop in _chunk_dA / _chunk_dqkg)
PAIRS = M * (M - 1) // 2  # off-diagonal sub-blocks (i, j < i) per chunk
# Warps, stages (1 where unnamed): scripts/bench_linear_attention.py --profile picks these (docs/kernels-gla.md)
NUM_WARPS = {"state": 4, "cumsum": 4, "A_off": 1, "A_diag": 4, "o": 4, "dv": 4, "dA": 4, "intra": 4, "dqkg": 4}
NUM_STAGES = {"state": 3, "intra": 3}
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634  # g is kept in log2 units: every gate factor is one exp2
f32 = jnp.float32

__all__ = ["chunk_gla_pallas", "supported"]


def supported(K: int, V: int) -> bool:
    """Whether the kernels take these head dims (any in [1, 256]: padded to powers of two from 16 internally)."""
    return all(1 <= d <= MAX_HEAD_DIM for d in (K, V))


def state_block_for(B: int, H: int, K: int, V: int) -> int:
    """Heuristic state tile (K, V padded): 64 x 64, unless that gives fewer than SM_COUNT programs, then 32 x 32."""
    programs = B * H * (K // min(K, 64)) * (V // min(V, 64))
    return 64 if programs >= SM_COUNT else 32


class Options(NamedTuple):
    """Static (hashable) options of `_gla`."""

    scale: float
    state_block: int  # SK = min(K, state_block), SV = min(V, state_block) in _state_fwd / _state_bwd
    block_k: int  # BK = min(K, block_k)
    block_v: int  # BV = min(V, block_v)
    interpret: bool  # run the kernels in Pallas's interpreter (tests, off GPU)


# ---------------------------------------------------------------------------------------------------- helpers


def _dot(a: jax.Array, b: jax.Array, precision, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a @ b (optionally transposed operands) with fp32 accumulation."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _iota(shape, dim) -> jax.Array:
    return jax.lax.broadcasted_iota(jnp.int32, shape, dim)


def _blocks(D: int, BD: int) -> list[pl.Slice]:
    return [pl.ds(i * BD, BD) for i in range(D // BD)]


def _decay(x: jax.Array) -> jax.Array:
    """e^{min(x, 0)}: a gate factor whose masked-out entries (x > 0) must not overflow."""
    return jnp.exp2(jnp.minimum(x, 0.0))


def _pair(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sub-block (i, j) of off-diagonal pair p in [0, PAIRS): (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)."""
    i = 1 + (p >= 1).astype(jnp.int32) + (p >= 3).astype(jnp.int32)
    return i, p - i * (i - 1) // 2


def _block_major_ids() -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chunk, b * H + h, block) of a program on a grid (blocks, N, B*H): the blocks of one chunk are adjacent
    programs, so the second block's reads of the rows they share (q and g, or k, do and v) come from L2."""
    return pl.program_id(1), pl.program_id(2), pl.program_id(0)


def _add(total: jax.Array | None, x: jax.Array) -> jax.Array:
    """total + x for a sum over blocks (None: nothing yet, so one block gives x itself)."""
    return x if total is None else total + x


# ---------------------------------------------------------------------------------------------------- kernels


def _chunk_cumsum_kernel(gk_ref, g_ref, *, H, BK, K):
    """g = cumsum of gk over the steps of chunk program_id(0) (fp32), head program_id(1)."""
    n, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // H, bh % H
    t = pl.ds(n * CHUNK, CHUNK)
    for ks in _blocks(K, BK):
        g_ref[b, t, h, ks] = jnp.cumsum(gk_ref[b, t, h, ks].astype(f32) * LOG2E, axis=0)


def _state_fwd_kernel(k_ref, v_ref, g_ref, h0_ref, states_ref, ht_ref, *, H, N, BK, BV, precision):
    """states[b, n, h] = S_n (fp32 [BK, BV] tile), ht = S_N; g_ref: the gate cumsum g (fp32, `_chunk_cumsum`)."""
    bh, ik, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    ks, vs = pl.ds(ik * BK, BK), pl.ds(iv * BV, BV)

    def step(n, state):
        states_ref[b, n, h, ks, vs] = state
        t = pl.ds(n * CHUNK, CHUNK)
        g_last = g_ref[b, n * CHUNK + CHUNK - 1, h, ks]  # [BK]: g's last row of the chunk
        k = k_ref[b, t, h, ks].astype(f32) * jnp.exp2(g_last[None, :] - g_ref[b, t, h, ks])
        return state * jnp.exp2(g_last)[:, None] + _dot(k, v_ref[b, t, h, vs].astype(f32), precision, trans_a=True)

    ht_ref[b, h, ks, vs] = jax.lax.fori_loop(0, N, step, h0_ref[b, h, ks, vs])


def _state_bwd_kernel(q_ref, g_ref, do_ref, dht_ref, dstates_ref, dh0_ref, *, H, N, BK, BV, scale, precision):
    """dstates[b, n, h] = dS_{n+1} (gradient w.r.t. the state after chunk n), dh0 = dS_0; g_ref: g (fp32)."""
    bh, ik, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    ks, vs = pl.ds(ik * BK, BK), pl.ds(iv * BV, BV)

    def step(i, dstate):
        n = N - 1 - i
        dstates_ref[b, n, h, ks, vs] = dstate
        t = pl.ds(n * CHUNK, CHUNK)
        g_last = g_ref[b, n * CHUNK + CHUNK - 1, h, ks]
        q = q_ref[b, t, h, ks].astype(f32) * (scale * jnp.exp2(g_ref[b, t, h, ks]))
        do = do_ref[b, t, h, vs]
        return dstate * jnp.exp2(g_last)[:, None] + _dot(q.astype(do.dtype), do, precision, trans_a=True)

    dh0_ref[b, h, ks, vs] = jax.lax.fori_loop(0, N, step, dht_ref[b, h, ks, vs])


def _chunk_A_off_kernel(q_ref, k_ref, g_ref, A_ref, *, H, BK, K, scale, precision):
    """Off-diagonal block (i, j < i) [SUB, SUB] of A (scale included): pair program_id(0) % PAIRS (`_pair`) of chunk
    program_id(0) // PAIRS, head program_id(1); reference row r = g at i's first row."""
    c, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // H, bh % H
    start = (c // PAIRS) * CHUNK
    i, j = _pair(c % PAIRS)
    first = start + i * SUB
    t, s = pl.ds(first, SUB), pl.ds(start + j * SUB, SUB)
    A = None
    for ks in _blocks(K, BK):
        r = g_ref[b, first, h, ks][None, :]
        q = q_ref[b, t, h, ks].astype(f32) * (scale * jnp.exp2(g_ref[b, t, h, ks] - r))
        k = k_ref[b, s, h, ks].astype(f32) * jnp.exp2(r - g_ref[b, s, h, ks])
        A = _add(A, _dot(q, k, precision, trans_b=True))
    A_ref[b, t, h, pl.ds(j * SUB, SUB)] = A.astype(A_ref.dtype)


def _chunk_A_diag_kernel(q_ref, k_ref, g_ref, _, A_ref, *, H, BK, K, scale):
    """Diagonal block (i, i) of A and zeros right of it, rows [SUB, C] of sub-chunk i = program_id(0) % M of chunk
    program_id(0) // M, head program_id(1); A_ref aliases the 4th input, whose blocks j < i `_chunk_A_off` wrote."""
    c, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // H, bh % H
    start, i = (c // M) * CHUNK, c % M
    first = start + i * SUB
    t = pl.ds(first, SUB)
    cols = _iota((SUB, CHUNK), 1)
    plgpu.store(A_ref.at[b, t, h, :], jnp.zeros((SUB, CHUNK), A_ref.dtype), mask=cols >= (i + 1) * SUB)
    blocks = [(q_ref[b, t, h, ks].astype(f32) * scale, g_ref[b, t, h, ks], ks) for ks in _blocks(K, BK)]
    row = _iota((SUB,), 0)

    def diagonal(jj, _):  # column first + jj: rows t >= first + jj
        j = first + jj
        scores = jnp.sum(sum(q * k_ref[b, j, h, ks].astype(f32)[None, :] * _decay(g - g_ref[b, j, h, ks][None, :])
                             for q, g, ks in blocks), axis=1)
        A_ref[b, t, h, i * SUB + jj] = jnp.where(row >= jj, scores, 0.0).astype(A_ref.dtype)

    jax.lax.fori_loop(0, SUB, diagonal, None)


def _chunk_o_kernel(q_ref, v_ref, g_ref, A_ref, states_ref, o_ref, *, H, BK, BV, K, scale, precision):
    """o [C, BV] of chunk program_id(1), head program_id(2), value block program_id(0)."""
    n, bh, iv = _block_major_ids()
    b, h = bh // H, bh % H
    t, vs = pl.ds(n * CHUNK, CHUNK), pl.ds(iv * BV, BV)
    o, dt = None, q_ref.dtype
    for ks in _blocks(K, BK):
        q = q_ref[b, t, h, ks].astype(f32) * jnp.exp2(g_ref[b, t, h, ks])
        o = _add(o, _dot(q.astype(dt), states_ref[b, n, h, ks, vs].astype(dt), precision))
    o = o * scale + _dot(A_ref[b, t, h, :], v_ref[b, t, h, vs], precision)
    o_ref[b, t, h, vs] = o.astype(o_ref.dtype)


def _chunk_dv_kernel(k_ref, g_ref, A_ref, do_ref, dstates_ref, dv_ref, *, H, BK, BV, K, precision):
    """dv [C, BV] of chunk program_id(1), head program_id(2), value block program_id(0)."""
    n, bh, iv = _block_major_ids()
    b, h = bh // H, bh % H
    start = n * CHUNK
    t, vs = pl.ds(start, CHUNK), pl.ds(iv * BV, BV)
    dv = _dot(A_ref[b, t, h, :], do_ref[b, t, h, vs], precision, trans_a=True)
    dt = k_ref.dtype
    for ks in _blocks(K, BK):
        g_last = g_ref[b, start + CHUNK - 1, h, ks][None, :]
        k = k_ref[b, t, h, ks].astype(f32) * jnp.exp2(g_last - g_ref[b, t, h, ks])
        dv = dv + _dot(k.astype(dt), dstates_ref[b, n, h, ks, vs].astype(dt), precision)
    dv_ref[b, t, h, vs] = dv.astype(dv_ref.dtype)


def _chunk_dA_kernel(v_ref, do_ref, dA_ref, *, H, BV, V, precision):
    """dA [C, C] = do v^T (zero above the diagonal, fp32) of chunk program_id(0), head program_id(1)."""
    n, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // H, bh % H
    t = pl.ds(n * CHUNK, CHUNK)
    dA = None
    for vs in _blocks(V, BV):
        dA = _add(dA, _dot(do_ref[b, t, h, vs], v_ref[b, t, h, vs], precision, trans_b=True))
    dA_ref[b, t, h, :] = jnp.where(_iota((CHUNK, CHUNK), 0) >= _iota((CHUNK, CHUNK), 1), dA, 0.0)


def _chunk_dqk_intra_kernel(q_ref, k_ref, g_ref, dA_ref, dq_ref, dk_ref, *, H, BK, scale, precision):
    """Intra-chunk parts of dq~ and dk [SUB, BK] (fp32) of sub-chunk i = program_id(0) % M of chunk
    program_id(0) // M, head program_id(1), key block program_id(2)."""
    c, bh, ik = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    start, i = (c // M) * CHUNK, c % M
    first = start + i * SUB
    t, ks, own = pl.ds(first, SUB), pl.ds(ik * BK, BK), pl.ds(i * SUB, SUB)  # own: sub-chunk i's columns of dA
    g = g_ref[b, t, h, ks]
    zeros = jnp.zeros((SUB, BK), f32)

    r = g_ref[b, first, h, ks][None, :]  # blocks (i, j < i), reference: g at i's first row

    def dq_block(j, dq):
        s = pl.ds(start + j * SUB, SUB)
        k = k_ref[b, s, h, ks].astype(f32) * jnp.exp2(r - g_ref[b, s, h, ks])
        return dq + _dot(dA_ref[b, t, h, pl.ds(j * SUB, SUB)], k, precision)

    dq = jnp.exp2(g - r) * jax.lax.fori_loop(0, i, dq_block, zeros)

    r = g_ref[b, first + SUB - 1, h, ks][None, :]  # blocks (j > i, i), reference: g at i's last row

    def dk_block(j, dk):
        s = pl.ds(start + j * SUB, SUB)
        q = q_ref[b, s, h, ks].astype(f32) * jnp.exp2(g_ref[b, s, h, ks] - r)
        return dk + _dot(dA_ref[b, s, h, own], q, precision, trans_a=True)

    dk = jnp.exp2(r - g) * jax.lax.fori_loop(i + 1, M, dk_block, zeros)

    def diagonal(jj, carry):  # step s = first + jj: dq~ rows t >= s (dA's column s), dk rows j <= s (dA's row s)
        dq, dk = carry
        s = first + jj
        decay = jnp.exp2(-jnp.abs(g - g_ref[b, s, h, ks][None, :]))  # both sides of s (module docstring)
        dq = dq + dA_ref[b, t, h, i * SUB + jj][:, None] * (k_ref[b, s, h, ks].astype(f32)[None, :] * decay)
        dk = dk + dA_ref[b, s, h, own][:, None] * (q_ref[b, s, h, ks].astype(f32)[None, :] * decay)
        return dq, dk

    dq, dk = jax.lax.fori_loop(0, SUB, diagonal, (dq, dk))
    dq_ref[b, t, h, ks] = dq
    dk_ref[b, t, h, ks] = dk * scale


def _chunk_dqkg_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dstates_ref, dq_intra_ref, dk_intra_ref,
                       dq_ref, dk_ref, dg_ref, *, H, BK, BV, V, scale, precision):
    """dq, dk, dgk [C, BK] of chunk program_id(1), head program_id(2), key block program_id(0): the inter-chunk
    terms plus the intra parts (`_chunk_dqk_intra`)."""
    n, bh, ik = _block_major_ids()
    b, h = bh // H, bh % H
    start = n * CHUNK
    t, ks = pl.ds(start, CHUNK), pl.ds(ik * BK, BK)

    dq = dk = state_term = None  # the value-sized work, in value blocks
    dt = do_ref.dtype
    for vs in _blocks(V, BV):
        state, dstate = states_ref[b, n, h, ks, vs], dstates_ref[b, n, h, ks, vs]
        dq = _add(dq, _dot(do_ref[b, t, h, vs], state.astype(dt), precision, trans_b=True))
        dk = _add(dk, _dot(v_ref[b, t, h, vs], dstate.astype(dt), precision, trans_b=True))
        state_term = _add(state_term, jnp.sum(state * dstate, axis=1))

    q = q_ref[b, t, h, ks].astype(f32) * scale
    k = k_ref[b, t, h, ks].astype(f32)
    g = g_ref[b, t, h, ks]
    g_last = g_ref[b, start + CHUNK - 1, h, ks]
    dq = jnp.exp2(g) * dq + dq_intra_ref[b, t, h, ks]  # d(q~)
    dk = jnp.exp2(g_last[None, :] - g) * dk
    state_term = jnp.exp2(g_last) * state_term + jnp.sum(k * dk, axis=0)  # sum_v S_{n+1} * dS_{n+1}
    dk = dk + dk_intra_ref[b, t, h, ks]
    dq_ref[b, t, h, ks] = (dq * scale).astype(dq_ref.dtype)
    dk_ref[b, t, h, ks] = dk.astype(dk_ref.dtype)
    dg = q * dq - k * dk
    dg_ref[b, t, h, ks] = jnp.sum(dg, axis=0)[None, :] - jnp.cumsum(dg, axis=0) + dg + state_term[None, :]


# ---------------------------------------------------------------------------------------------------- launchers


def _params(interpret: bool, num_warps: int, num_stages: int) -> dict:
    if interpret:
        return {"interpret": True}
    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _precision(dtype) -> jax.lax.Precision:
    """Full fp32 products for fp32 (and wider) inputs, TF32 for bf16 / fp16 inputs (as FLA's Triton)."""
    return jax.lax.Precision.HIGHEST if jnp.finfo(dtype).bits >= 32 else jax.lax.Precision.DEFAULT


def _launch(kernel, name, out_shape, grid, options: Options, aliases: dict[int, int] | None = None, **kw):
    return pl.pallas_call(functools.partial(kernel, **kw), out_shape=out_shape, grid=grid,
                          input_output_aliases=aliases or {},
                          **_params(options.interpret, NUM_WARPS[name], NUM_STAGES.get(name, 1)))


def _cumsum(gk, options: Options):
    """g [B, Tp, H, K] fp32: the chunk-local cumsum of gk."""
    B, Tp, H, K = gk.shape
    return _launch(_chunk_cumsum_kernel, "cumsum", jax.ShapeDtypeStruct(gk.shape, f32), (Tp // CHUNK, B * H),
                   options, H=H, BK=min(K, options.block_k), K=K)(gk)


def _state_shapes(B, N, H, K, V):
    """out_shape of _state_fwd / _state_bwd: per-chunk states [B, N, H, K, V] and one [B, H, K, V] (fp32)."""
    return jax.ShapeDtypeStruct((B, N, H, K, V), f32), jax.ShapeDtypeStruct((B, H, K, V), f32)


def _state_grid(B: int, H: int, K: int, V: int, options: Options) -> tuple[tuple[int, int, int], int, int]:
    """(grid, SK, SV) of _state_fwd / _state_bwd: one program per (b, h) and SK x SV state tile."""
    SK, SV = min(K, options.state_block), min(V, options.state_block)
    return (B * H, K // SK, V // SV), SK, SV


def _forward(q, k, v, gk, h0, options: Options):
    """Padded inputs [B, Tp, H, D] (gk fp32) -> (o, states [B, N, H, K, V], final state, A [B, Tp, H, C], g)."""
    B, Tp, H, K = q.shape
    V, N = v.shape[-1], Tp // CHUNK
    BK, BV = min(K, options.block_k), min(V, options.block_v)
    prec = _precision(q.dtype)
    grid, SK, SV = _state_grid(B, H, K, V, options)
    g = _cumsum(gk, options)
    states, ht = _launch(_state_fwd_kernel, "state", _state_shapes(B, N, H, K, V), grid, options,
                         H=H, N=N, BK=SK, BV=SV, precision=prec)(k, v, g, h0)
    A_shape = jax.ShapeDtypeStruct((B, Tp, H, CHUNK), v.dtype)
    A = _launch(_chunk_A_off_kernel, "A_off", A_shape, (N * PAIRS, B * H), options,
                H=H, BK=BK, K=K, scale=options.scale, precision=prec)(q, k, g)
    A = _launch(_chunk_A_diag_kernel, "A_diag", A_shape, (N * M, B * H), options, aliases={3: 0},
                H=H, BK=BK, K=K, scale=options.scale)(q, k, g, A)
    o = _launch(_chunk_o_kernel, "o", jax.ShapeDtypeStruct(v.shape, q.dtype), (V // BV, N, B * H), options,
                H=H, BK=BK, BV=BV, K=K, scale=options.scale, precision=prec)(q, v, g, A, states)
    return o, states, ht, A, g


def _backward(q, k, v, g, A, do, states, dht, options: Options):
    """Padded inputs and the forward's g -> (dq, dk, dv, dgk (fp32), dh0)."""
    B, Tp, H, K = q.shape
    V, N = v.shape[-1], Tp // CHUNK
    BK, BV = min(K, options.block_k), min(V, options.block_v)
    prec = _precision(q.dtype)
    grid, SK, SV = _state_grid(B, H, K, V, options)
    dstates, dh0 = _launch(_state_bwd_kernel, "state", _state_shapes(B, N, H, K, V), grid, options,
                           H=H, N=N, BK=SK, BV=SV, scale=options.scale, precision=prec)(q, g, do, dht)
    dv = _launch(_chunk_dv_kernel, "dv", jax.ShapeDtypeStruct(v.shape, v.dtype), (V // BV, N, B * H), options,
                 H=H, BK=BK, BV=BV, K=K, precision=prec)(k, g, A, do, dstates)
    dA = _launch(_chunk_dA_kernel, "dA", jax.ShapeDtypeStruct((B, Tp, H, CHUNK), f32), (N, B * H), options,
                 H=H, BV=BV, V=V, precision=prec)(v, do)
    dq_intra, dk_intra = _launch(
        _chunk_dqk_intra_kernel, "intra", (jax.ShapeDtypeStruct(q.shape, f32),) * 2, (N * M, B * H, K // BK), options,
        H=H, BK=BK, scale=options.scale, precision=prec,
    )(q, k, g, dA)
    dq, dk, dg = _launch(
        _chunk_dqkg_kernel, "dqkg",
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
         jax.ShapeDtypeStruct(g.shape, f32)),
        (K // BK, N, B * H), options, H=H, BK=BK, BV=BV, V=V, scale=options.scale, precision=prec,
    )(q, k, v, g, do, states, dstates, dq_intra, dk_intra)
    return dq, dk, dv, dg, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, gk, h0, options: Options):
    """GLA on padded inputs (T a multiple of CHUNK, head dims powers of two >= 16, gk fp32) -> (o, final state)."""
    o, _, ht, _, _ = _forward(q, k, v, gk, h0, options)
    return o, ht


def _gla_fwd(q, k, v, gk, h0, options: Options):
    o, states, ht, A, g = _forward(q, k, v, gk, h0, options)
    return (o, ht), (q, k, v, g, A, states)


def _gla_bwd(options: Options, residuals, cotangents):
    q, k, v, g, A, states = residuals
    do, dht = cotangents
    return _backward(q, k, v, g, A, do.astype(q.dtype), states, dht.astype(f32), options)


_gla.defvjp(_gla_fwd, _gla_bwd)


def chunk_gla_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gk: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    interpret: bool | None = None,
    *,
    state_block: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """GLA with the Pallas kernels; arguments and results as `chunk_gla` (q, k, gk: [B, T, H, K], v: [B, T, H, V],
    initial_state [B, H, K, V]; returns o [B, T, H, V] in q's dtype and the fp32 final state or None).

    `interpret=True` runs the kernels in Pallas interpret mode (any device; used by the CPU tests); None: off GPU.
    `state_block`: the state kernels' tile, SK = min(K', state_block) and SV = min(V', state_block) on the padded
    head dims K', V' (a power of two >= 16); None: `state_block_for` (64, or 32 when the GPU would sit part idle).
    Key / value blocks and warps of the other kernels: the module constants BLOCK_K, BLOCK_V, NUM_WARPS (read when
    a call is traced). Any T works: the time axis is zero-padded to a multiple of 64 (zero log-gates keep the
    state); any K, V in [1, 256]: padded to the next power of two >= 16 (module docstring).
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    B, T, H, K = q.shape
    V = v.shape[-1]
    if not supported(K, V):
        raise ValueError(f"pallas chunk_gla needs head dims in [1, {MAX_HEAD_DIM}], got K={K}, V={V}")
    for name, value in (("state_block", state_block), ("BLOCK_K", BLOCK_K), ("BLOCK_V", BLOCK_V)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    Kp, Vp = pow2_dim(K), pow2_dim(V)
    scale = K**-0.5 if scale is None else float(scale)
    options = Options(scale, state_block or state_block_for(B, H, Kp, Vp), BLOCK_K, BLOCK_V, interpret)
    h0 = jnp.zeros((B, H, Kp, Vp), f32) if initial_state is None else pad_trailing(initial_state.astype(f32), Kp, Vp)
    q, k, gk = (pad_trailing(pad_time(x, CHUNK), Kp) for x in (q, k.astype(q.dtype), gk.astype(f32)))
    v = pad_trailing(pad_time(v.astype(q.dtype), CHUNK), Vp)
    o, ht = _gla(q, k, v, gk, h0, options)
    return o[:, :T, :, :V], (ht[:, :, :K, :V] if output_final_state else None)
