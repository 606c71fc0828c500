"""Gated Linear Attention with Pallas (Triton backend) kernels and a hand-written backward (`jax.custom_vjp`).

Same math and API as `jaxgpt.ops.gla.chunk.chunk_gla` (FLA layout [B, T, H, D], 64-step chunks, exact pairwise
gating inside 16-step sub-chunks). The kernels are structured as FLA's `chunk_gla`: whole 64-step chunks, 64-row
products, one job per kernel, and nothing [.., S, S, K]-sized in memory.

Notation, per chunk n of C = 64 steps and key dimension: g = the chunk-local cumsum of the log-gates gk (fp32,
written once per pass by _chunk_cumsum, first, so that every kernel, the state kernels included, reads the same
values and no kernel scans inside its loop), g_last = g's last row in the chunk (read as a row of g, so g_last - g is
exactly 0 at the chunk's last step: a separate sum rounds differently, by ~1e-4 at |g| ~ 1e3, and that error scaled
the newest, dominant term of a strongly gated state), q~ = scale * q, S_n the state entering chunk n (S_0 = h0) and
dS_{n+1} the gradient w.r.t. the state after it (dS_N = d(final state)).

forward
    _chunk_cumsum  grid (N, B*H)              g
    _state_fwd     grid (B*H, K/SK, V/SV),    S_{n+1} = diag(e^{g_last}) S_n + (k e^{g_last - g})^T v
                   sequential over chunks     writes S_n (fp32 [B, N, H, K, V]) and the final state
    _chunk_A       grid (N, B*H)              A[t, j] = sum_k q~_tk k_jk e^{g_tk - g_jk} (j <= t, else 0), [C, C]
                                              per chunk, stored in v's dtype (a residual for the backward)
    _chunk_o       grid (N, B*H, V/BV)        o = (q~ e^{g}) S_n + A v
backward (g again from _chunk_cumsum, first, instead of a residual)
    _chunk_cumsum  grid (N, B*H)              g
    _state_bwd     grid (B*H, K/SK, V/SV),    dS_n = diag(e^{g_last}) dS_{n+1} + (q~ e^{g})^T do
                   reverse over chunks        writes dS_{n+1} (fp32) and dh0 = dS_0
    _chunk_dv      grid (N, B*H, V/BV)        dv = A^T do + (k e^{g_last - g}) dS_{n+1}
    _chunk_dqkg    grid (N, B*H, K/BK)        dA = do v^T (j <= t), then
                                              dq~ = e^{g} (do S_n^T) + [sum_j dA_tj k_j e^{g_t - g_j}]
                                              dk  = e^{g_last - g} (v dS_{n+1}^T) + [sum_t dA_tj q~_t e^{g_t - g_j}]
                                              dgk = reverse cumsum over the chunk of (q~ dq~ - k dk)
                                                    + e^{g_last} sum_v (S_n * dS_{n+1})
                                                    + sum_t k_t (e^{g_last - g_t} v_t dS_{n+1}^T)
The gate gradient comes from the identity (per key dimension, u in chunk n)
    dgk_u = sum_{s >= u in the chunk} (q~_s dq~_s - k_s dk_s) + sum_v S_{n+1} * dS_{n+1},
whose last term is written with S_n as FLA does (the last two terms of dgk above; k dk there is dk's inter part).

Stability, the reference-row trick: gk <= 0, so g falls along the chunk and e^{g_t - g_j} <= 1 for j <= t, but a
factorisation e^{g_t} e^{-g_j} over the whole chunk would overflow for strong gates (-20 per step: |g| ~ 1e3). The
bracketed intra-chunk sums (and A) are therefore built from the 16 x 16 sub-blocks (a, b) of the chunk, in [64, .]
frames:
  * off-diagonal blocks (a > b) as products through a reference row r between the two sub-chunks, so that both
    factors are <= 1 for any gate strength: for A and dq~, r = g at the first row of sub-chunk a,
        A_ab = (q~_a e^{g_a - r}) (k_b e^{r - g_b})^T,      dq~_a += e^{g_a - r} (dA_ab (k_b e^{r - g_b})),
    one masked [64, 64] x [64, BK] product per a; for dk, r = g at the last row of sub-chunk b,
        dk_b += e^{r - g_b} (dA_ab^T (q~_a e^{g_a - r})),
    one product per b. Exponents are clamped at 0 (`_decay`) where a row is masked out, so nothing overflows.
  * diagonal blocks by a loop over the 16 steps jj of a sub-chunk (as FLA's intra kernels): row t of the frame
    pairs with step 16 (t // 16) + jj of its own sub-chunk, whose k / q~ / g rows are loaded (four row loads), so
    every step costs one [64, BK] decay e^{g_t - g_j}, and no [S, S, K] temporary exists.
The inter-chunk factors e^{g}, e^{g_last - g}, e^{g_last} are <= 1 as they stand.

Tiles: key blocks of BK = min(K, BLOCK_K) columns (a loop inside _chunk_A / _chunk_o / _chunk_dv, the grid axis of
_chunk_dqkg), value blocks of BV = min(V, BLOCK_V) (the grid axis of _chunk_o / _chunk_dv, a loop in _chunk_dqkg).
The state kernels split each head's [K, V] state into SK x SV tiles, SK = min(K, state_block), SV = min(V,
state_block), one program per tile; `state_block` None picks 64, or 32 when 64 x 64 tiles give fewer programs than
the GPU has SMs (SM_COUNT). Warps per kernel: NUM_WARPS (_chunk_dqkg holds ~6 live [64, 64] fp32 tiles: 8 warps;
4 were slower on an H200).

Padding: the kernels take head dims that are powers of two from 16 (Triton tiles) and T a multiple of 64. Any K, V
in [1, 256] is zero-padded to the next one, K' and V', and T to a multiple of 64, outside the custom_vjp (q, k, gk
and h0's rows to K'; v and h0's columns to V'; the time axis with zeros), and o and the final state are sliced back.
Padded key columns have q = k = 0 and gate 0 (no decay), padded value columns v = 0, padded steps zero inputs and
zero log-gates (the state passes through unchanged), so they add nothing to the real outputs; their gradients are
dropped by the slice's transpose (the pad).

Precision follows FLA: inputs in their dtype, gates, states and accumulators fp32; A v and A^T do take A in v's
dtype, do v^T takes do and v as they are; the other products take fp32 operands, at `_precision` (TF32 on the GPU
for bf16 / fp16 inputs, Precision.HIGHEST for fp32 inputs, which then covers the A v products too).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt.ops.utils import pad_time

CHUNK = 64  # steps per chunk (one state stored per chunk)
SUB = 16  # steps per sub-chunk (pairwise gating inside)
M = CHUNK // SUB  # sub-chunks per chunk
BLOCK_K = 64  # key columns per block (the key grid axis of _chunk_dqkg, a loop elsewhere); a power of two >= 16
BLOCK_V = 64  # value columns per block (the value grid axis of _chunk_o / _chunk_dv, a loop in _chunk_dqkg)
NUM_WARPS = {"state": 4, "cumsum": 4, "A": 4, "o": 4, "dv": 4, "dqkg": 8}  # dqkg 4: op1 +15-20%, op3 +16% (H200)
MAX_HEAD_DIM = 256
SM_COUNT = 132  # streaming multiprocessors of an H100 / H200 (SXM): the state-tile heuristic fills them
f32 = jnp.float32

__all__ = ["chunk_gla_pallas", "supported"]


def supported(K: int, V: int) -> bool:
    """Whether the kernels take these head dims (any in [1, 256]: padded to powers of two from 16 internally)."""
    return all(1 <= d <= MAX_HEAD_DIM for d in (K, V))


def _padded_dim(d: int) -> int:
    """The kernels' size for head dim d: the next power of two, at least 16 (Triton tiles)."""
    return max(16, 1 << (d - 1).bit_length())


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


def _frame():
    """(rows, cols, row sub-chunk, col sub-chunk) of a [C, C] frame."""
    rows, cols = _iota((CHUNK, CHUNK), 0), _iota((CHUNK, CHUNK), 1)
    return rows, cols, jax.lax.div(rows, SUB), jax.lax.div(cols, SUB)


def _blocks(D: int, BD: int) -> list[pl.Slice]:
    return [pl.ds(i * BD, BD) for i in range(D // BD)]


def _sub_rows(ref, b, h, cols, start, jj) -> jax.Array:
    """[C, D] fp32 whose row t is ref[b, start + SUB * (t // SUB) + jj, h, cols]: each row paired with step jj of
    its own sub-chunk (four row loads)."""
    block = jax.lax.div(_iota((CHUNK, 1), 0), SUB)
    out = None
    for a in range(M):
        row = ref[b, start + a * SUB + jj, h, cols].astype(f32)[None, :]
        out = row if out is None else jnp.where(block == a, row, out)
    return out


def _decay(x: jax.Array) -> jax.Array:
    """e^{min(x, 0)}: a gate factor whose masked-out entries (x > 0) must not overflow."""
    return jnp.exp(jnp.minimum(x, 0.0))


def _pick(x: jax.Array, cols: jax.Array, target: jax.Array) -> jax.Array:
    """[C] of x[t, target[t]] (x [C, C]; cols its column iota), a masked sum."""
    return jnp.sum(jnp.where(cols == target, x, 0.0), axis=1)


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
        g_ref[b, t, h, ks] = jnp.cumsum(gk_ref[b, t, h, ks].astype(f32), axis=0)


def _state_fwd_kernel(k_ref, v_ref, g_ref, h0_ref, states_ref, ht_ref, *, H, N, BK, BV, precision):
    """states[b, n, h] = S_n (fp32 [BK, BV] tile), ht = S_N; g_ref: the gate cumsum g (fp32, `_chunk_cumsum`)."""
    bh, ik, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    ks, vs = pl.ds(ik * BK, BK), pl.ds(iv * BV, BV)

    def step(n, state):
        states_ref[b, n, h, ks, vs] = state
        t = pl.ds(n * CHUNK, CHUNK)
        g_last = g_ref[b, n * CHUNK + CHUNK - 1, h, ks]  # [BK]: g's last row of the chunk
        k = k_ref[b, t, h, ks].astype(f32) * jnp.exp(g_last[None, :] - g_ref[b, t, h, ks])
        return state * jnp.exp(g_last)[:, None] + _dot(k, v_ref[b, t, h, vs].astype(f32), precision, trans_a=True)

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
        q = q_ref[b, t, h, ks].astype(f32) * (scale * jnp.exp(g_ref[b, t, h, ks]))
        return dstate * jnp.exp(g_last)[:, None] + _dot(q, do_ref[b, t, h, vs].astype(f32), precision, trans_a=True)

    dh0_ref[b, h, ks, vs] = jax.lax.fori_loop(0, N, step, dht_ref[b, h, ks, vs])


def _chunk_A_kernel(q_ref, k_ref, g_ref, A_ref, *, H, BK, K, scale, precision):
    """A [C, C] (scale included, zero above the diagonal) of chunk program_id(0), head program_id(1)."""
    n, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // H, bh % H
    start = n * CHUNK
    t = pl.ds(start, CHUNK)
    rows, cols, row_sub, col_sub = _frame()
    A = jnp.zeros((CHUNK, CHUNK), f32)
    for ks in _blocks(K, BK):
        q = q_ref[b, t, h, ks].astype(f32) * scale
        k = k_ref[b, t, h, ks].astype(f32)
        g = g_ref[b, t, h, ks]
        for a in range(1, M):  # blocks (a, b < a), reference: g at the first row of sub-chunk a
            r = g_ref[b, start + a * SUB, h, ks][None, :]
            block = _dot(q * _decay(g - r), k * _decay(r - g), precision, trans_b=True)
            A = A + jnp.where((row_sub == a) & (col_sub < a), block, 0.0)

        def diagonal(jj, A, q=q, g=g, ks=ks):  # column 16 (t // 16) + jj of row t
            k_j, g_j = _sub_rows(k_ref, b, h, ks, start, jj), _sub_rows(g_ref, b, h, ks, start, jj)
            scores = jnp.sum(q * k_j * _decay(g - g_j), axis=1)
            return A + jnp.where(cols == row_sub * SUB + jj, scores[:, None], 0.0)

        A = jax.lax.fori_loop(0, SUB, diagonal, A)
    A_ref[b, t, h, :] = jnp.where(rows >= cols, A, 0.0).astype(A_ref.dtype)


def _chunk_o_kernel(q_ref, v_ref, g_ref, A_ref, states_ref, o_ref, *, H, BK, BV, K, scale, precision):
    """o [C, BV] of chunk program_id(0), head program_id(1), value block program_id(2)."""
    n, bh, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    t, vs = pl.ds(n * CHUNK, CHUNK), pl.ds(iv * BV, BV)
    o = _dot(A_ref[b, t, h, :], v_ref[b, t, h, vs], precision)
    for ks in _blocks(K, BK):
        q = q_ref[b, t, h, ks].astype(f32) * scale
        o = o + _dot(q * jnp.exp(g_ref[b, t, h, ks]), states_ref[b, n, h, ks, vs], precision)
    o_ref[b, t, h, vs] = o.astype(o_ref.dtype)


def _chunk_dv_kernel(k_ref, g_ref, A_ref, do_ref, dstates_ref, dv_ref, *, H, BK, BV, K, precision):
    """dv [C, BV] of chunk program_id(0), head program_id(1), value block program_id(2)."""
    n, bh, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    start = n * CHUNK
    t, vs = pl.ds(start, CHUNK), pl.ds(iv * BV, BV)
    dv = _dot(A_ref[b, t, h, :], do_ref[b, t, h, vs], precision, trans_a=True)
    for ks in _blocks(K, BK):
        g_last = g_ref[b, start + CHUNK - 1, h, ks][None, :]
        k = k_ref[b, t, h, ks].astype(f32) * jnp.exp(g_last - g_ref[b, t, h, ks])
        dv = dv + _dot(k, dstates_ref[b, n, h, ks, vs], precision)
    dv_ref[b, t, h, vs] = dv.astype(dv_ref.dtype)


def _chunk_dqkg_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dstates_ref, dq_ref, dk_ref, dg_ref, *,
                       H, BK, BV, V, scale, precision):
    """dq, dk, dgk [C, BK] of chunk program_id(0), head program_id(1), key block program_id(2)."""
    n, bh, ik = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    start = n * CHUNK
    t, ks = pl.ds(start, CHUNK), pl.ds(ik * BK, BK)

    # The value-sized work, in value blocks: dA, dA^T, the inter-chunk products and sum_v S_n * dS_{n+1}.
    dA = dAT = dq = dk = state_term = None
    for vs in _blocks(V, BV):
        do, v = do_ref[b, t, h, vs], v_ref[b, t, h, vs]
        state, dstate = states_ref[b, n, h, ks, vs], dstates_ref[b, n, h, ks, vs]
        dA = _add(dA, _dot(do, v, precision, trans_b=True))
        dAT = _add(dAT, _dot(v, do, precision, trans_b=True))
        dq = _add(dq, _dot(do.astype(f32), state, precision, trans_b=True))
        dk = _add(dk, _dot(v.astype(f32), dstate, precision, trans_b=True))
        state_term = _add(state_term, jnp.sum(state * dstate, axis=1))
    rows, cols, row_sub, col_sub = _frame()
    dA = jnp.where(rows >= cols, dA, 0.0)  # dA[t, j]
    dAT = jnp.where(rows <= cols, dAT, 0.0)  # dA[t, j] at [j, t]

    q = q_ref[b, t, h, ks].astype(f32) * scale
    k = k_ref[b, t, h, ks].astype(f32)
    g = g_ref[b, t, h, ks]
    g_last = g_ref[b, start + CHUNK - 1, h, ks]
    dq = jnp.exp(g) * dq  # d(q~), inter-chunk
    dk = jnp.exp(g_last[None, :] - g) * dk
    state_term = jnp.exp(g_last) * state_term + jnp.sum(k * dk, axis=0)  # sum_v S_{n+1} * dS_{n+1}

    for a in range(1, M):  # dq~ of sub-chunk a from the blocks (a, b < a); reference: g at a's first row
        r = g_ref[b, start + a * SUB, h, ks][None, :]
        dA_a = jnp.where((row_sub == a) & (col_sub < a), dA, 0.0)
        dq = dq + _decay(g - r) * _dot(dA_a, k * _decay(r - g), precision)
    for a in range(M - 1):  # dk of sub-chunk a from the blocks (c > a, a); reference: g at a's last row
        r = g_ref[b, start + a * SUB + SUB - 1, h, ks][None, :]
        dAT_a = jnp.where((row_sub == a) & (col_sub > a), dAT, 0.0)
        dk = dk + _decay(r - g) * _dot(dAT_a, q * _decay(g - r), precision)

    def diagonal(jj, carry):  # dq~ row t with step j = 16 (t // 16) + jj <= t, dk row j with t = 16 (j // 16) + jj
        dq, dk = carry
        g_s = _sub_rows(g_ref, b, h, ks, start, jj)  # g at the paired step s (j for dq~, t for dk)
        k_s, q_s = _sub_rows(k_ref, b, h, ks, start, jj), _sub_rows(q_ref, b, h, ks, start, jj) * scale
        target = row_sub * SUB + jj
        dq = dq + _pick(dA, cols, target)[:, None] * k_s * _decay(g - g_s)
        dk = dk + _pick(dAT, cols, target)[:, None] * q_s * _decay(g_s - g)
        return dq, dk

    dq, dk = jax.lax.fori_loop(0, SUB, diagonal, (dq, dk))
    dq_ref[b, t, h, ks] = (dq * scale).astype(dq_ref.dtype)
    dk_ref[b, t, h, ks] = dk.astype(dk_ref.dtype)
    dg = q * dq - k * dk
    dg_ref[b, t, h, ks] = jnp.sum(dg, axis=0)[None, :] - jnp.cumsum(dg, axis=0) + dg + state_term[None, :]


# ---------------------------------------------------------------------------------------------------- launchers


def _params(interpret: bool, num_warps: int, num_stages: int = 1) -> dict:
    if interpret:
        return {"interpret": True}
    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _precision(dtype) -> jax.lax.Precision:
    """Full fp32 products for fp32 (and wider) inputs, TF32 for bf16 / fp16 inputs (as FLA's Triton)."""
    return jax.lax.Precision.HIGHEST if jnp.finfo(dtype).bits >= 32 else jax.lax.Precision.DEFAULT


def _launch(kernel, name, out_shape, grid, options: Options, num_stages: int = 1, **kw):
    return pl.pallas_call(functools.partial(kernel, **kw), out_shape=out_shape, grid=grid,
                          **_params(options.interpret, NUM_WARPS[name], num_stages))


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
    """Padded inputs [B, Tp, H, D] -> (o, states [B, N, H, K, V], final state, A [B, Tp, H, C])."""
    B, Tp, H, K = q.shape
    V, N = v.shape[-1], Tp // CHUNK
    BK, BV = min(K, options.block_k), min(V, options.block_v)
    prec = _precision(q.dtype)
    grid, SK, SV = _state_grid(B, H, K, V, options)
    g = _cumsum(gk, options)
    states, ht = _launch(_state_fwd_kernel, "state", _state_shapes(B, N, H, K, V), grid, options, num_stages=2,
                         H=H, N=N, BK=SK, BV=SV, precision=prec)(k, v, g, h0)
    A = _launch(_chunk_A_kernel, "A", jax.ShapeDtypeStruct((B, Tp, H, CHUNK), v.dtype), (N, B * H), options,
                H=H, BK=BK, K=K, scale=options.scale, precision=prec)(q, k, g)
    o = _launch(_chunk_o_kernel, "o", jax.ShapeDtypeStruct(v.shape, q.dtype), (N, B * H, V // BV), options,
                H=H, BK=BK, BV=BV, K=K, scale=options.scale, precision=prec)(q, v, g, A, states)
    return o, states, ht, A


def _backward(q, k, v, gk, A, do, states, dht, options: Options):
    """Padded inputs -> (dq, dk, dv, dgk, dh0)."""
    B, Tp, H, K = q.shape
    V, N = v.shape[-1], Tp // CHUNK
    BK, BV = min(K, options.block_k), min(V, options.block_v)
    prec = _precision(q.dtype)
    grid, SK, SV = _state_grid(B, H, K, V, options)
    g = _cumsum(gk, options)
    dstates, dh0 = _launch(_state_bwd_kernel, "state", _state_shapes(B, N, H, K, V), grid, options, num_stages=2,
                           H=H, N=N, BK=SK, BV=SV, scale=options.scale, precision=prec)(q, g, do, dht)
    dv = _launch(_chunk_dv_kernel, "dv", jax.ShapeDtypeStruct(v.shape, v.dtype), (N, B * H, V // BV), options,
                 H=H, BK=BK, BV=BV, K=K, precision=prec)(k, g, A, do, dstates)
    dq, dk, dg = _launch(
        _chunk_dqkg_kernel, "dqkg",
        (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
         jax.ShapeDtypeStruct(gk.shape, f32)),
        (N, B * H, K // BK), options, H=H, BK=BK, BV=BV, V=V, scale=options.scale, precision=prec,
    )(q, k, v, g, do, states, dstates)
    return dq, dk, dv, dg, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, gk, h0, options: Options):
    """GLA on padded inputs (T a multiple of CHUNK, head dims powers of two >= 16) -> (o, final state)."""
    o, _, ht, _ = _forward(q, k, v, gk, h0, options)
    return o, ht


def _gla_fwd(q, k, v, gk, h0, options: Options):
    o, states, ht, A = _forward(q, k, v, gk, h0, options)
    return (o, ht), (q, k, v, gk, A, states)


def _gla_bwd(options: Options, residuals, cotangents):
    q, k, v, gk, A, states = residuals
    do, dht = cotangents
    dq, dk, dv, dg, dh0 = _backward(q, k, v, gk, A, do.astype(q.dtype), states, dht.astype(f32), options)
    return dq, dk, dv, dg.astype(gk.dtype), dh0


_gla.defvjp(_gla_fwd, _gla_bwd)


def _pad_trailing(x: jax.Array, *sizes: int) -> jax.Array:
    """Zero-pad the trailing len(sizes) axes of x [..., D1, ..., Dn] up to sizes [..., S1, ..., Sn]."""
    widths = [(0, 0)] * (x.ndim - len(sizes)) + [(0, n - d) for n, d in zip(sizes, x.shape[-len(sizes):])]
    return jnp.pad(x, widths)


def chunk_gla_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gk: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    interpret: bool = False,
    *,
    state_block: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """GLA with the Pallas kernels; arguments and results as `chunk_gla` (q, k, gk: [B, T, H, K], v: [B, T, H, V],
    initial_state [B, H, K, V]; returns o [B, T, H, V] in q's dtype and the fp32 final state or None).

    `interpret=True` runs the kernels in Pallas interpret mode (any device; used by the CPU tests).
    `state_block`: the state kernels' tile, SK = min(K', state_block) and SV = min(V', state_block) on the padded
    head dims K', V' (a power of two >= 16); None: `state_block_for` (64, or 32 when the GPU would sit part idle).
    Key / value blocks and warps of the other kernels: the module constants BLOCK_K, BLOCK_V, NUM_WARPS (read when
    a call is traced). Any T works: the time axis is zero-padded to a multiple of 64 (zero log-gates keep the
    state); any K, V in [1, 256]: padded to the next power of two >= 16 (module docstring).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if not supported(K, V):
        raise ValueError(f"pallas chunk_gla needs head dims in [1, {MAX_HEAD_DIM}], got K={K}, V={V}")
    for name, value in (("state_block", state_block), ("BLOCK_K", BLOCK_K), ("BLOCK_V", BLOCK_V)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    Kp, Vp = _padded_dim(K), _padded_dim(V)
    scale = K**-0.5 if scale is None else float(scale)
    options = Options(scale, state_block or state_block_for(B, H, Kp, Vp), BLOCK_K, BLOCK_V, interpret)
    h0 = jnp.zeros((B, H, Kp, Vp), f32) if initial_state is None else _pad_trailing(initial_state.astype(f32), Kp, Vp)
    q, k, gk = (_pad_trailing(pad_time(x, CHUNK), Kp) for x in (q, k.astype(q.dtype), gk))
    v = _pad_trailing(pad_time(v.astype(q.dtype), CHUNK), Vp)
    o, ht = _gla(q, k, v, gk, h0, options)
    return o[:, :T, :, :V], (ht[:, :, :K, :V] if output_final_state else None)
