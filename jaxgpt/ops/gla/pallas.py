"""Gated Linear Attention with Pallas (Triton backend) kernels and a hand-written backward (`jax.custom_vjp`).

Same math and API as `jaxgpt.ops.gla.chunk.chunk_gla` (FLA layout [B, T, H, D], chunk-local gate cumsum, 64-step
chunks, exact pairwise gating inside 16-step sub-chunks). Four kernels, none materialises a [..., S, S, K] tensor:

forward
    _state_fwd   grid (B*H, K/BK, V/BV), sequential over chunks n:   S_{n+1} = diag(e^{G_C}) S_n + (k e^{G_C - G})^T v
                 writes S_n (the state entering chunk n, fp32) and the final state.
    _output_fwd  grid (N, B*H), parallel over chunks. Inside a chunk it walks the 16-step sub-chunks a with a local
                 state H_a (H_0 = S_n), so every exponent stays <= 0 (no overflow for any gate strength):
                     c = cumsum of gk inside the sub-chunk, s = its sum
                     o_a = scale * [ (q_a e^{c}) H_a + A_aa v_a ],  A_aa[t, j] = sum_k q_tk k_jk e^{c_tk - c_jk} (j <= t)
                     H_{a+1} = diag(e^{s}) H_a + (k_a e^{s - c})^T v_a
backward (dS_n: gradient w.r.t. the state entering chunk n; dS_N = d(final state))
    _state_bwd   grid (B*H, K/BK, V/BV), reverse over chunks:        dS_n = diag(e^{G_C}) dS_{n+1} + scale (q e^{G})^T do
    _grad_bwd    grid (N, B*H). A forward walk over sub-chunks gives dq's first term (from H_a), a reverse walk the
                 rest of dq and dk, dv (from D_a, the gradient w.r.t. H_{a+1}, D_{M-1} = dS_{n+1}):
                     dq_a = scale [ e^{c} (do_a H_a^T) + sum_j dA_tj k_j e^{c_t - c_j} ],   dA = do_a v_a^T (j <= t)
                     dk_a = e^{s - c} (v_a D_a^T) + sum_t dA_tj q_t e^{c_t - c_j}
                     dv_a = (k_a e^{s - c}) D_a + A_aa^T do_a
                     D_{a-1} = diag(e^{s}) D_a + scale (q_a e^{c})^T do_a
                 and the gate gradient from the identity (per key dimension, u inside chunk n)
                     dgk_u = sum_{s >= u in the chunk} (q_s dq_s - k_s dk_s) + sum_v S_{n+1} * dS_{n+1},
                 a reverse cumsum carried across the sub-chunks, starting from the last term (S_{n+1} = H_M).

Key groups: _output_fwd and _grad_bwd run one program per key group of G = min(K, key_group) columns as well
(grid (N, B*H, K/G); key_group defaults to KEY_GROUP = 32). The gates are diagonal in the key dim, so c, s, the rows
of H_a and D_a, dq, dk and dgk belong to one group; o and dv are sums over the groups, which each program writes as
an fp32 share ([K/G, B, T, H, V], summed afterwards; with one group it writes o / dv itself). At K = 64, 32-column
groups beat one 64-column group by 12-14% per op (H200, session 6, `bench_linear_attention.py --key-group 32,64`):
twice the programs, each with half the live state tiles, for the cost of that sum.

Key blocks: inside a program each sub-chunk is taken in static blocks of KB = min(G, 32) key columns; as for the
groups, only A_aa (with A_aa v_a and A_aa^T do_a), o and dv are sums over the blocks, and dA does not involve K
(once per sub-chunk). The pairwise-gated terms of the diagonal sub-chunk (A_aa and, backward, their share of dq
and dk) come from `_intra`: a loop over the key step j with one [S, KB] decay e^{c - c_j} per step, as FLA's intra
kernels, so no [S, S, KB] temporary exists. In _grad_bwd the forward walk keeps only dq's inter part,
e^{c} (do_a H_a^T); the reverse walk adds the intra terms, from the same decays as dk.

State tiles: _state_fwd / _state_bwd split each head's [K, V] state into BK x BV tiles, BK = min(K, state_block),
BV = min(V, state_block), one program per tile. `state_block` None picks 64, or 32 when 64 x 64 tiles give fewer
programs than the GPU has SMs (SM_COUNT): 4x the programs, each walking the same N chunks.

Head dims: the kernels take powers of two from 16 (Triton tiles); any K, V in [1, 256] is zero-padded to the next
one, K' and V', outside the custom_vjp (q, k, gk and h0's rows to K'; v and h0's columns to V'), and o and the final
state are sliced back. Padded key columns have q = k = 0 (and gate 0: no decay), padded value columns v = 0, so they
add nothing to the real outputs; their gradients are dropped by the slice's transpose (the pad).

Precision follows FLA: inputs in their dtype, gates, states and accumulators fp32; the A v / A^T do products take
A in v's dtype (bf16 operands, fp32 accumulation); the other products take fp32 operands (TF32 on the GPU for
bf16 / fp16 inputs, full fp32 for fp32 inputs).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt.ops.utils import pad_time, value_row

CHUNK = 64  # steps per chunk (one state stored per chunk)
SUB = 16  # steps per sub-chunk (pairwise gating inside)
M = CHUNK // SUB  # sub-chunks per chunk
KEY_BLOCK = 32  # key columns per block in _output_fwd / _grad_bwd (bounds their [SUB, SUB, KB] fp32 temporaries)
KEY_GROUP = 32  # default key columns per program of _output_fwd / _grad_bwd
MAX_HEAD_DIM = 256
SM_COUNT = 132  # streaming multiprocessors of an H100 / H200 (SXM): the state-tile heuristic fills them
f32 = jnp.float32


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
    state_block: int  # BK = min(K, state_block), BV = min(V, state_block) in _state_fwd / _state_bwd
    key_group: int  # G = min(K, key_group) key columns per program of _output_fwd / _grad_bwd
    num_warps: int | None  # of _output_fwd / _grad_bwd; None: `_warps`
    interpret: bool  # run the kernels in Pallas's interpreter (tests, off GPU)


def _dot(a: jax.Array, b: jax.Array, precision, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a @ b (optionally transposed operands) with fp32 accumulation."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _col(x: jax.Array, j) -> jax.Array:
    """x[:, j] [S] of a value x [S, D], as `value_row`."""
    return jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) == j, x, 0.0), axis=1)


def _causal(S: int) -> jax.Array:
    """[S, S] mask of j <= t."""
    return jax.lax.broadcasted_iota(jnp.int32, (S, S), 0) >= jax.lax.broadcasted_iota(jnp.int32, (S, S), 1)


def _intra(q: jax.Array, k: jax.Array, c: jax.Array, dA: jax.Array | None = None):
    """The diagonal sub-chunk's pairwise-gated terms, by a loop over the key step j (as FLA's intra kernels): one
    [S, KB] decay E_j = e^{c - c_j} per j (exponents <= 0 where t >= j), no [S, S, KB] temporaries.

        A[t, j] = sum_k q_tk k_jk E_j[t, k]                       (j <= t, else 0)
    and, given dA [S, S] (the gradient w.r.t. A, zero above the diagonal), the gradients through A:
        dq_t = sum_j dA_tj k_j E_j[t],     dk_j = sum_t dA_tj q_t E_j[t]
    q, k, c: [S, KB] (c the gate cumsum). Returns A, or (A, dq, dk) when dA is given."""
    S = q.shape[0]
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, S), 1)
    rows = jax.lax.broadcasted_iota(jnp.int32, (S, 1), 0)

    def step(j, carry):
        k_j, c_j = value_row(k, j), value_row(c, j)
        decay = jnp.exp(jnp.minimum(c - c_j[None, :], 0.0))  # rows t < j are masked out below / by dA's zeros
        A = jnp.where(cols == j, jnp.sum(q * k_j[None, :] * decay, axis=1)[:, None], carry[0])
        if dA is None:
            return (A,)
        dA_j = _col(dA, j)[:, None]
        dq = carry[1] + dA_j * k_j[None, :] * decay
        dk = jnp.where(rows == j, jnp.sum(dA_j * q * decay, axis=0)[None, :], carry[2])
        return A, dq, dk

    zeros = jnp.zeros_like(q)
    carry = jax.lax.fori_loop(0, S, step, (jnp.zeros((S, S), f32),) + (() if dA is None else (zeros, zeros)))
    A = jnp.where(_causal(S), carry[0], 0.0)
    return A if dA is None else (A, *carry[1:])


def _key_blocks(group, G: int) -> list[pl.Slice]:
    """Slices of the key dim for key group `group` (G columns, one program's share), in static blocks of
    min(G, KEY_BLOCK) columns."""
    KB = min(G, KEY_BLOCK)
    return [pl.ds(group * G + i * KB, KB) for i in range(G // KB)]


def _sub_chunk(n, a: int) -> pl.Slice:
    """Time steps of sub-chunk a of chunk n."""
    return pl.ds(n * CHUNK + a * SUB, SUB)


def _gate_cumsum(gk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cumsum g [C, K] of log-gates gk [C, K] over steps and its last row g_last [K], read from g (as FLA does)
    so that g_last - g is exactly 0 at the last step. A separate sum rounds differently: at |g| ~ 1e3 (gates of -20
    per step) by ~1e-4, which scaled the newest, dominant term of a strongly gated state and gave final-state errors
    of ~1e-5 against the recurrence (~2e-7 with g's own last row)."""
    g = jnp.cumsum(gk, axis=0)
    return g, value_row(g, g.shape[0] - 1)


def _load_keys(q_ref, k_ref, g_ref, idx, scale):
    """q * scale, k, the gate cumsum c ([S, KB] fp32 each) and the gate sum s ([KB]) at idx = (b, t, h, key block)."""
    gk = g_ref[idx].astype(f32)
    return q_ref[idx].astype(f32) * scale, k_ref[idx].astype(f32), jnp.cumsum(gk, axis=0), jnp.sum(gk, axis=0)


def _decay_add(state: jax.Array, s: jax.Array, x: jax.Array, y: jax.Array, precision) -> jax.Array:
    """diag(e^{s}) state + x^T y: a local state (or its gradient) carried over one sub-chunk."""
    return state * jnp.exp(s)[:, None] + _dot(x, y, precision, trans_a=True)


def _add(total: jax.Array | None, x: jax.Array) -> jax.Array:
    """total + x for a sum over key blocks (None: nothing yet, so one block gives x itself)."""
    return x if total is None else total + x


# ---------------------------------------------------------------------------------------------------- kernels


def _state_fwd_kernel(k_ref, v_ref, g_ref, h0_ref, states_ref, ht_ref, *, H, N, BK, BV, precision):
    """states[b, n, h] = S_n (fp32 [BK, BV] tile), ht = S_N."""
    bh, ik, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    ks, vs = pl.ds(ik * BK, BK), pl.ds(iv * BV, BV)

    def step(n, state):
        states_ref[b, n, h, ks, vs] = state
        t = pl.ds(n * CHUNK, CHUNK)
        g, g_last = _gate_cumsum(g_ref[b, t, h, ks].astype(f32))  # [C, BK], [BK]
        k = k_ref[b, t, h, ks].astype(f32) * jnp.exp(g_last[None, :] - g)
        return state * jnp.exp(g_last)[:, None] + _dot(k, v_ref[b, t, h, vs].astype(f32), precision, trans_a=True)

    ht_ref[b, h, ks, vs] = jax.lax.fori_loop(0, N, step, h0_ref[b, h, ks, vs])


def _output_fwd_kernel(q_ref, k_ref, v_ref, g_ref, states_ref, o_ref, *, H, G, scale, precision):
    """o for chunk n = program_id(0), head program_id(1), by a walk over its sub-chunks, each in key blocks; key
    group program_id(2) writes its share of o (o_ref [key groups, B, T, H, V])."""
    n, bh, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    blocks = _key_blocks(group, G)
    states = [states_ref[b, n, h, ks, :] for ks in blocks]  # H_0 = S_n: a [KB, V] fp32 tile per key block
    for a in range(M):
        t = _sub_chunk(n, a)
        v = v_ref[b, t, h, :]  # [S, V]
        o = scores = None
        for i, ks in enumerate(blocks):
            q, k, c, s = _load_keys(q_ref, k_ref, g_ref, (b, t, h, ks), scale)
            scores = _add(scores, _intra(q, k, c))  # A_aa
            o = _add(o, _dot(q * jnp.exp(c), states[i], precision))
            if a < M - 1:
                states[i] = _decay_add(states[i], s, k * jnp.exp(s[None, :] - c), v.astype(f32), precision)
        o = o + _dot(scores.astype(v.dtype), v, None)
        o_ref[group, b, t, h, :] = o.astype(o_ref.dtype)


def _state_bwd_kernel(q_ref, g_ref, do_ref, dht_ref, dstates_ref, dh0_ref, *, H, N, BK, BV, scale, precision):
    """dstates[b, n, h] = dS_{n+1} (gradient w.r.t. the state after chunk n), dh0 = dS_0."""
    bh, ik, iv = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    ks, vs = pl.ds(ik * BK, BK), pl.ds(iv * BV, BV)

    def step(i, dstate):
        n = N - 1 - i
        dstates_ref[b, n, h, ks, vs] = dstate
        t = pl.ds(n * CHUNK, CHUNK)
        g, g_last = _gate_cumsum(g_ref[b, t, h, ks].astype(f32))
        q = q_ref[b, t, h, ks].astype(f32) * (scale * jnp.exp(g))
        return dstate * jnp.exp(g_last)[:, None] + _dot(q, do_ref[b, t, h, vs].astype(f32), precision, trans_a=True)

    dh0_ref[b, h, ks, vs] = jax.lax.fori_loop(0, N, step, dht_ref[b, h, ks, vs])


def _grad_bwd_kernel(q_ref, k_ref, v_ref, g_ref, do_ref, states_ref, dstates_ref, dq_ref, dk_ref, dv_ref, dg_ref, *,
                     H, G, scale, precision):
    """dq, dk, dgk of key group program_id(2) and its share of dv (dv_ref [key groups, B, T, H, V]) for chunk
    n = program_id(0), head program_id(1), each sub-chunk in key blocks (module docstring)."""
    n, bh, group = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h = bh // H, bh % H
    blocks = _key_blocks(group, G)

    # Forward walk: the inter-sub-chunk part of dq, from H_a.
    states = [states_ref[b, n, h, ks, :] for ks in blocks]
    dq_inter = {}  # (a, key block) -> e^{c} (do_a H_a^T): [S, KB]
    for a in range(M):
        t = _sub_chunk(n, a)
        v, do = v_ref[b, t, h, :], do_ref[b, t, h, :]
        for i, ks in enumerate(blocks):
            q, k, c, s = _load_keys(q_ref, k_ref, g_ref, (b, t, h, ks), scale)
            dq_inter[a, i] = jnp.exp(c) * _dot(do.astype(f32), states[i], precision, trans_b=True)
            states[i] = _decay_add(states[i], s, k * jnp.exp(s[None, :] - c), v.astype(f32), precision)

    # Reverse walk: the intra terms, dk, dv from D_a; the gate gradient's reverse cumsum starts from
    # sum_v S_{n+1} * dS_{n+1}.
    dstates = [dstates_ref[b, n, h, ks, :] for ks in blocks]  # D_{M-1} = dS_{n+1}
    carries = [jnp.sum(st * dst, axis=1) for st, dst in zip(states, dstates)]  # states are now H_M = S_{n+1}
    for a in reversed(range(M)):
        t = _sub_chunk(n, a)
        v, do = v_ref[b, t, h, :], do_ref[b, t, h, :]
        dscores = jnp.where(_causal(SUB), _dot(do, v, None, trans_b=True), 0.0)  # dA: [S, S]
        scores = dv = None
        for i, ks in enumerate(blocks):
            q, k, c, s = _load_keys(q_ref, k_ref, g_ref, (b, t, h, ks), scale)
            A, dq_intra, dk_intra = _intra(q, k, c, dscores)
            scores = _add(scores, A)  # A_aa
            dq = dq_inter[a, i] + dq_intra  # d(q * scale)
            dq_ref[b, t, h, ks] = (dq * scale).astype(dq_ref.dtype)
            k_gate = jnp.exp(s[None, :] - c)
            dk = k_gate * _dot(v.astype(f32), dstates[i], precision, trans_b=True) + dk_intra
            dk_ref[b, t, h, ks] = dk.astype(dk_ref.dtype)
            dv = _add(dv, _dot(k * k_gate, dstates[i], precision))
            dg = q * dq - k * dk
            total = jnp.sum(dg, axis=0)
            dg_ref[b, t, h, ks] = (carries[i] + total)[None, :] - jnp.cumsum(dg, axis=0) + dg  # sum over steps >= u
            carries[i] = carries[i] + total
            if a > 0:
                dstates[i] = _decay_add(dstates[i], s, q * jnp.exp(c), do.astype(f32), precision)
        dv = dv + _dot(scores.astype(do.dtype), do, None, trans_a=True)
        dv_ref[group, b, t, h, :] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------------------- launchers


def _params(interpret: bool, num_warps: int, num_stages: int = 1) -> dict:
    if interpret:
        return {"interpret": True}
    return {"compiler_params": plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)}


def _precision(dtype) -> jax.lax.Precision:
    """Full fp32 products for fp32 (and wider) inputs, TF32 for bf16 / fp16 inputs (as FLA's Triton)."""
    return jax.lax.Precision.HIGHEST if jnp.finfo(dtype).bits >= 32 else jax.lax.Precision.DEFAULT


def _warps(G: int, V: int) -> int:
    """num_warps of _output_fwd / _grad_bwd, whose programs hold [G, V] states. Measured on an H200 (fwd+bwd op):
    G = V = 64 (session 5): 2 warps beat 4 by 6% and 8 by 50%; G = 32, V = 64 (session 6): 4 beat 2 by 10%;
    G = 32, V = 128 (session 6, T = 16384): 2 warps 11.6 ms, 4 12.0 ms, 8 14.0 ms."""
    return 8 if G * V >= 128 * 128 else 2 if G * V >= 64 * 64 else 4


def _key_groups(K: int, options: Options) -> tuple[int, int, jax.typing.DTypeLike | None]:
    """(G, number of key groups, dtype of the per-group partial sums: fp32 when there are several, else None)."""
    G = min(K, options.key_group)
    return G, K // G, (f32 if K > G else None)


def _sum_groups(parts: jax.Array, dtype) -> jax.Array:
    """o or dv from its per-key-group shares [groups, B, T, H, V]."""
    return parts[0] if parts.shape[0] == 1 else jnp.sum(parts, axis=0).astype(dtype)


def _state_grid(B: int, H: int, K: int, V: int, options: Options) -> tuple[tuple[int, int, int], int, int]:
    """(grid, BK, BV) of _state_fwd / _state_bwd: one program per (b, h) and BK x BV state tile."""
    BK, BV = min(K, options.state_block), min(V, options.state_block)
    return (B * H, K // BK, V // BV), BK, BV


def _forward(q, k, v, gk, h0, options: Options):
    """Padded inputs [B, Tp, H, D] -> (o [B, Tp, H, V], states [B, N, H, K, V], final state [B, H, K, V])."""
    B, Tp, H, K = q.shape
    V, N = v.shape[-1], Tp // CHUNK
    grid, BK, BV = _state_grid(B, H, K, V, options)
    prec = _precision(q.dtype)
    states, ht = pl.pallas_call(
        functools.partial(_state_fwd_kernel, H=H, N=N, BK=BK, BV=BV, precision=prec),
        out_shape=(jax.ShapeDtypeStruct((B, N, H, K, V), f32), jax.ShapeDtypeStruct((B, H, K, V), f32)),
        grid=grid, **_params(options.interpret, 4, 2),
    )(k, v, gk, h0)
    G, groups, part_dtype = _key_groups(K, options)
    o = pl.pallas_call(
        functools.partial(_output_fwd_kernel, H=H, G=G, scale=options.scale, precision=prec),
        out_shape=jax.ShapeDtypeStruct((groups, B, Tp, H, V), part_dtype or q.dtype),
        grid=(N, B * H, groups), **_params(options.interpret, options.num_warps or _warps(G, V)),
    )(q, k, v, gk, states)
    return _sum_groups(o, q.dtype), states, ht


def _backward(q, k, v, gk, do, states, dht, options: Options):
    """Padded inputs -> (dq, dk, dv, dgk, dh0)."""
    B, Tp, H, K = q.shape
    V, N = v.shape[-1], Tp // CHUNK
    grid, BK, BV = _state_grid(B, H, K, V, options)
    prec = _precision(q.dtype)
    dstates, dh0 = pl.pallas_call(
        functools.partial(_state_bwd_kernel, H=H, N=N, BK=BK, BV=BV, scale=options.scale, precision=prec),
        out_shape=(jax.ShapeDtypeStruct((B, N, H, K, V), f32), jax.ShapeDtypeStruct((B, H, K, V), f32)),
        grid=grid, **_params(options.interpret, 4, 2),
    )(q, gk, do, dht)
    G, groups, part_dtype = _key_groups(K, options)
    dq, dk, dv, dg = pl.pallas_call(
        functools.partial(_grad_bwd_kernel, H=H, G=G, scale=options.scale, precision=prec),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct((groups, *v.shape), part_dtype or v.dtype),
                   jax.ShapeDtypeStruct(gk.shape, f32)),
        grid=(N, B * H, groups), **_params(options.interpret, options.num_warps or _warps(G, V)),
    )(q, k, v, gk, do, states, dstates)
    return dq, dk, _sum_groups(dv, v.dtype), dg, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _gla(q, k, v, gk, h0, options: Options):
    """GLA on padded inputs (T a multiple of CHUNK, head dims the kernels take) -> (o, final state)."""
    o, _, ht = _forward(q, k, v, gk, h0, options)
    return o, ht


def _gla_fwd(q, k, v, gk, h0, options: Options):
    o, states, ht = _forward(q, k, v, gk, h0, options)
    return (o, ht), (q, k, v, gk, states)


def _gla_bwd(options: Options, residuals, cotangents):
    q, k, v, gk, states = residuals
    do, dht = cotangents
    dq, dk, dv, dg, dh0 = _backward(q, k, v, gk, do.astype(q.dtype), states, dht.astype(f32), options)
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
    key_group: int | None = None,
    num_warps: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """GLA with the Pallas kernels; arguments and results as `chunk_gla` (q, k, gk: [B, T, H, K], v: [B, T, H, V],
    initial_state [B, H, K, V]; returns o [B, T, H, V] in q's dtype and the fp32 final state or None).

    `interpret=True` runs the kernels in Pallas interpret mode (any device; used by the CPU tests).
    `state_block`: the state kernels' tile, BK = min(K', state_block) and BV = min(V', state_block) on the padded
    head dims K', V' (a power of two >= 16); None: `state_block_for` (64, or 32 when the GPU would sit part idle).
    `key_group`: key columns per program of the output and gradient kernels, G = min(K', key_group) (a power of two
    >= 16; None: KEY_GROUP = 32); with K' > G each program writes an fp32 share of o / dv, summed afterwards.
    `num_warps`: Triton warps of the output and gradient kernels (None: `_warps`, by tile size).
    Any T works: the time axis is zero-padded to a multiple of 64 (zero log-gates keep the state); any K, V in
    [1, 256]: padded to the next power of two >= 16 (module docstring).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if not supported(K, V):
        raise ValueError(f"pallas chunk_gla needs head dims in [1, {MAX_HEAD_DIM}], got K={K}, V={V}")
    for name, value in (("state_block", state_block), ("key_group", key_group)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    Kp, Vp = _padded_dim(K), _padded_dim(V)
    scale = K**-0.5 if scale is None else float(scale)
    state_block = state_block or state_block_for(B, H, Kp, Vp)
    options = Options(scale, state_block, key_group or KEY_GROUP, num_warps, interpret)
    h0 = jnp.zeros((B, H, Kp, Vp), f32) if initial_state is None else _pad_trailing(initial_state.astype(f32), Kp, Vp)
    q, k, gk = (_pad_trailing(pad_time(x, CHUNK), Kp) for x in (q, k.astype(q.dtype), gk))
    v = _pad_trailing(pad_time(v.astype(q.dtype), CHUNK), Vp)
    o, ht = _gla(q, k, v, gk, h0, options)
    return o[:, :T, :, :V], (ht[:, :, :K, :V] if output_final_state else None)
