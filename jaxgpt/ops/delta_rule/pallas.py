"""Delta rule for GPUs: the chunked WY form with a hand-written backward (`jax.custom_vjp`), all per-chunk work in
Pallas (Triton) kernels that read and write the [B, T, H, D] layout directly (T padded to a multiple of C).

The structure is FLA's (`fla/ops/delta_rule/chunk.py`), the math is the one in `chunk.py`. Per chunk n of C steps
(rows of q, k [C, K], v [C, V], beta [C]):

forward
    A   = strict_tril(diag(beta) K K^T)          T = (I + A)^{-1}      (fp32, blockwise substitution)
    W   = T diag(beta) K                         U = T diag(beta) V
    S_0 = h0;  V'_n = U_n - W_n S_n;  S_{n+1} = S_n + K_n^T V'_n             (sequential over chunks)
    O   = scale (Q S_n + tril(Q K^T) V'_n)
backward (G_{n+1} = dL/dS_{n+1}, G_N = dht)
    dV'_n = scale triu(K Q^T) dO + K G_{n+1}                                   (sequential over chunks,
    G_n   = G_{n+1} + scale Q^T dO - W^T dV'_n                                   reverse order, dh0 = G_0)
    dQ    = scale (dO S_n^T + tril(dO V'^T) K)
    dK    = V' G_{n+1}^T + scale tril(dO V'^T)^T Q  (+ the WY terms below)
    dW    = -dV' S_n^T,   dU = dV'
    WY:  dKb = T^T dW,  dVb = T^T dU,  dT = dW Kb^T + dU Vb^T,  dA = strict_tril(-T^T dT T^T),
         dKb += dA K,  dK += dA^T Kb + diag(beta) dKb,  dV = diag(beta) dVb,  dbeta = rowsum(dKb*K + dVb*V)
         (Kb = diag(beta) K, Vb = diag(beta) V)

Kernels (N = T / C chunks; "V/BV" etc. a grid axis over column blocks, BK = `_block(K)`, BV = `_block(V)`: 64
columns, or the whole head dim when 64 does not divide it):

    forward   _wy_fwd      (N, B*H)            A, T (in 16 x 16 blocks, `_tril_inverse`), W, U; writes T, W, U
              _state_fwd   (B*H, V/block_v)    the forward recurrence; writes S_n, V', the final state
              _output_fwd  (N, B*H, V/BV)      O
    backward  _dv_local    (N, B*H, V/BV)      scale triu(K Q^T) dO (fp32), the input of the reverse recurrence
              _state_bwd   (B*H, V/block_v)    the reverse recurrence; writes G_{n+1}, dV', dh0
              _dqkw        (N, B*H, K/BKQ)     dQ, dK without the WY terms (fp32), dW (BKQ = `_dqkw_block(K)`)
              _wy_bwd      (N, B*H)            the WY step; writes the final dK, dV, dbeta

The gated delta rule (`jaxgpt/ops/gated_delta_rule/pallas.py`) runs the same kernels with a gate: G [B, T, H] fp32,
the cumulative log decay within each chunk (G_i = g_1 + ... + g_i from the chunk's start). Each kernel then takes a
gate ref and scales as the gated math says: A_ij and the intra-chunk scores by exp(G_i - G_j), W = T diag(beta
exp(G)) K, the queries' state term by exp(G_i), the chunk's writes by exp(G_last - G_i) and the carried state by
exp(G_last); `_dqkw` and `_wy_bwd` also write dL/dG (the reverse cumulative sum that makes dg is XLA's, outside).
Without a gate every kernel runs the code above unchanged (the gate ref and the dG outputs are None: `_call`).
Simple GLA (`jaxgpt/ops/simple_gla/pallas.py`) is this with W = 0 and U = V: it runs `_state_fwd`, `_output_fwd`,
`_dv_local`, `_state_bwd` and `_dqkw` with no W (V' = V, dV' = dV, no dW) and neither WY kernel.

Residuals: q, k, v, beta, (G,) T, W, S_n, V' (FLA recomputes S_n in its backward). With tril_inverse='trsm', or a chunk
size that is not a multiple of 16, the forward WY step runs in XLA instead (`wy_fwd_xla`: batched products and XLA's
triangular solve on the chunked layout; for timing against, and the fallback); every other kernel is the same.

Precision as FLA: matrix-product operands in the inputs' dtype (bf16 under mixed precision), fp32 accumulation
(`preferred_element_type`), T and the running state S / its gradient G computed in fp32; T, S_n, V', G_{n+1} and
dV' are stored in the operand dtype (their readers use them only as product operands). With fp32 inputs every
product runs at full fp32 precision (`Precision.HIGHEST`), which is how the CPU tests check this path against
`chunk.py` (Pallas in interpret mode).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt.ops.l2norm import l2norm
from jaxgpt.ops.triangular import unit_lower_solve
from jaxgpt.ops.utils import SM_COUNT, from_chunks, pad_time, to_chunks, value_row

F32 = jnp.float32
CONTRACT_ROWS = (((0,), (0,)), ((), ()))  # dot_general dimension numbers for a^T b of 2-D a, b
CONTRACT_COLS = (((1,), (1,)), ((), ()))  # a b^T
SUB = 16  # diagonal block size of the triangular inverse
BLOCK = 64  # head-dim columns per block of the per-chunk kernels (`_block`)
HEAD_DIMS = (16, 32, 64, 128, 256)  # K and V the kernels take (powers of two: Triton's block shapes)
CHUNK_SIZES = (16, 32, 64)  # multiples of the triangular inverse's 16-row blocks (FLA's set)
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def chunk_delta_rule_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    scale: float,
    initial_state: jax.Array | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    chunk_size: int,
    block_v: int | None = None,
    *,
    tril_inverse: str = "pallas",
) -> tuple[jax.Array, jax.Array | None]:
    """`chunk_delta_rule` on the fast path; arguments as there (q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H]).

    block_v: state columns per recurrence program (a power of 2 dividing V); None: `default_block_v`.
    tril_inverse: how T = (I + A)^{-1} is computed: 'pallas' (inside `_wy_fwd_kernel`, blockwise forward
    substitution; chunk sizes that are multiples of 16) or 'trsm' (`wy_fwd_xla`, XLA's batched triangular solve).
    Off GPU the kernels run in Pallas's interpreter (slow; for tests).
    """
    if tril_inverse not in ("pallas", "trsm"):
        raise ValueError(f"tril_inverse must be 'pallas' or 'trsm', got {tril_inverse!r}")
    if chunk_size % SUB:
        tril_inverse = "trsm"
    B, T, H, K = q.shape
    V = v.shape[-1]
    if block_v is None:
        block_v = default_block_v(B * H, V)
    if block_v < 16 or block_v & (block_v - 1) or V % block_v:
        raise ValueError(f"block_v must be a power of two >= 16 dividing V={V}, got {block_v}")
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, beta = (pad_time(x, chunk_size) for x in (q, k, v, beta))
    h0 = jnp.zeros((B, H, K, V), F32) if initial_state is None else initial_state.astype(F32)
    options = Options(scale, chunk_size, block_v, tril_inverse, jax.default_backend() != "gpu")
    o, final_state = delta_rule(q, k, v, beta, h0, options)
    return o[:, :T], (final_state if output_final_state else None)


class Options(NamedTuple):
    """Static (hashable) options of `delta_rule`."""

    scale: float
    chunk: int  # C, steps per chunk
    block_v: int  # state columns per recurrence program
    tril_inverse: str  # 'pallas' or 'trsm'
    interpret: bool  # run the kernels in Pallas's interpreter (off GPU)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def delta_rule(q, k, v, beta, h0, options: Options):
    """Chunked delta rule on time-padded inputs.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; h0: [B, H, K, V] fp32 (T a multiple of options.chunk).

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32.
    """
    return delta_rule_fwd(q, k, v, beta, h0, options)[0]


def delta_rule_fwd(q, k, v, beta, h0, options: Options):
    return chunk_fwd(q, k, v, beta, None, h0, options)


def delta_rule_bwd(options: Options, residuals, cotangents):
    dq, dk, dv, dbeta, _, dh0 = chunk_bwd(options, residuals, cotangents)
    return dq, dk, dv, dbeta, dh0


delta_rule.defvjp(delta_rule_fwd, delta_rule_bwd)


def chunk_fwd(q, k, v, beta, gate, h0, options: Options):
    """The forward kernels; gate: None (the delta rule) or G [B, T, H] fp32 (the gated delta rule; needs
    tril_inverse='pallas'). Returns ((o, final state), residuals)."""
    if options.tril_inverse == "pallas":
        t_inv, w, u = wy_fwd_pallas(k, v, beta, options, gate)
    elif gate is None:
        t_inv, w, u = wy_fwd_xla(k, v, beta, options.chunk)
    else:
        raise ValueError("the gated delta rule's WY step runs only in the kernel (tril_inverse='pallas')")
    states, v_new, final_state = state_fwd(k, w, u, h0, options, gate)
    o = output_fwd(q, k, states, v_new, options, gate)
    return (o, final_state), (q, k, v, beta, gate, t_inv, w, states, v_new)


def chunk_bwd(options: Options, residuals, cotangents):
    """The backward kernels: (dq, dk, dv, dbeta, dG (None without a gate), dh0)."""
    q, k, v, beta, gate, t_inv, w, states, v_new = residuals
    do, dht = cotangents
    do = do.astype(q.dtype)
    dv_local = dv_local_bwd(q, k, do, options, gate)
    dstates, dv_new, dh0 = state_bwd(q, k, w, do, dv_local, dht.astype(F32), options, gate)
    dq, dk, dw, dgate = dqkw_bwd(q, k, v_new, do, states, dstates, dv_new, options, gate)
    dk, dv, dbeta, dgate_wy = wy_bwd(k, v, beta, t_inv, dk, dw, dv_new, options, gate)
    if gate is not None:
        dgate = jnp.sum(dgate, axis=0) + dgate_wy
    return dq, dk, dv, dbeta.astype(beta.dtype), dgate, dh0


def wy_fwd_xla(k: jax.Array, v: jax.Array, beta: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The forward WY step in XLA (XLA's triangular solve; the 'trsm' option and any chunk size): as `_wy_fwd_kernel`.

    Args:
        k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H].

    Returns:
        T [B, T, H, C] (row t: the row of its chunk's T), W [B, T, H, K] and U [B, T, H, V], all in k's dtype.
    """
    dt, Tp = k.dtype, k.shape[1]
    precision = jax.lax.Precision.HIGHEST if dt == F32 else None
    mm = functools.partial(jnp.einsum, preferred_element_type=F32, precision=precision)
    k, v, b = (to_chunks(x, chunk) for x in (k, v, beta[..., None].astype(F32)))
    kb, vb = (k.astype(F32) * b).astype(dt), (v.astype(F32) * b).astype(dt)
    a = jnp.tril(mm("...ik,...jk->...ij", kb, k), -1)
    eye = jnp.broadcast_to(jnp.eye(chunk, dtype=F32), a.shape)
    t_inv = unit_lower_solve(a, eye)
    tc = t_inv.astype(dt)
    w, u = (mm("...ij,...jd->...id", tc, x).astype(dt) for x in (kb, vb))
    return tuple(from_chunks(x, Tp) for x in (tc, w, u))


def chunk_cumsum(g: jax.Array, chunk: int) -> jax.Array:
    """G [B, T', H] fp32: the running sum of g [B, T, H] within each chunk of `chunk` steps, T zero-padded to T', a
    multiple of the chunk (padded steps add no decay: G stays at its last real value, which the recurrence needs
    as the chunk's G_last)."""
    g = pad_time(g.astype(F32), chunk)
    B, Tp, H = g.shape
    return jnp.cumsum(g.reshape(B, Tp // chunk, chunk, H), axis=2).reshape(B, Tp, H)


# ---------------------------------------------------------------------------------------------------- kernels


def _dot(a: jax.Array, b: jax.Array, dimension_numbers=(((1,), (0,)), ((), ()))) -> jax.Array:
    """2-D product inside a kernel: fp32 accumulation, full fp32 precision for fp32 operands."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, dimension_numbers, precision=precision, preferred_element_type=F32)


def _tril_mask(C: int, diagonal: int = 0) -> jax.Array:
    """[C, C] mask of column <= row + diagonal (jnp.tril's)."""
    rows, cols = (jax.lax.broadcasted_iota(jnp.int32, (C, C), d) for d in (0, 1))
    return cols <= rows + diagonal


def _decay(rows: jax.Array, cols: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """exp(rows_i - cols_j) [len(rows), len(cols)] fp32 (the gate's decay between two positions), 0 outside `mask`;
    the exponent is masked first, so an entry outside the mask never overflows."""
    diff = rows[:, None] - cols[None, :]
    if mask is None:
        return jnp.exp(diff)
    return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _last(gate: jax.Array) -> jax.Array:
    """G_last, the last entry of a chunk's gate [C], as a scalar (a masked sum: exact)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, gate.shape, 0)
    return jnp.sum(jnp.where(rows == gate.shape[0] - 1, gate, 0.0))


def _tril_inverse(a: dict) -> dict:
    """T = (I + A)^{-1} of a strictly lower-triangular fp32 A given as SUB x SUB blocks a[r, c] (c <= r); returns
    T's blocks t[r, c] (c <= r; those above the diagonal are zero).

    Each diagonal block by forward substitution, row i: T_i = e_i - sum_{j<i} A_ij T_j; then the blocks below the
    diagonal by block forward substitution: T_rc = -T_rr sum_{c<=m<r} A_rm T_mc.
    """
    nb = max(r for r, _ in a) + 1
    rows = jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    eye = (rows == jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)).astype(F32)
    t = {}
    for r in range(nb):
        t_rr = eye
        for row in range(1, SUB):
            a_row = value_row(a[r, r], row)  # [SUB]
            t_rr = t_rr - jnp.where(rows == row, jnp.sum(a_row[:, None] * t_rr, axis=0)[None, :], 0.0)
        t[r, r] = t_rr
        for c in range(r):
            acc = _dot(a[r, c], t[c, c])
            for m in range(c + 1, r):
                acc = acc + _dot(a[r, m], t[m, c])
            t[r, c] = -_dot(t_rr, acc)
    return t


def _wy_fwd_kernel(k_ref, v_ref, beta_ref, g_ref, t_ref, w_ref, u_ref, *, H: int, C: int):
    """Chunk n = program_id(0), head program_id(1), in blocks of SUB rows: A_rc = strict_tril(Kb_r K_c^T),
    T = (I + A)^{-1} (`_tril_inverse`), W_r = sum_{c<=r} T_rc Kb_c, U_r = sum_{c<=r} T_rc Vb_c. With a gate:
    A_rc *= exp(G_i - G_j) and W from diag(beta exp(G)) K.

    Refs: k, w [B, T, H, K]; v, u [B, T, H, V]; beta [B, T, H]; g (G, or None) [B, T, H] fp32; t [B, T, H, C] (row
    t: its chunk's T row; T is computed in fp32 and stored in k's dtype).
    """
    n, bh = pl.program_id(0), pl.program_id(1)
    b, h = bh // H, bh % H
    nb, dt = C // SUB, k_ref.dtype
    rows = [pl.ds(n * C + r * SUB, SUB) for r in range(nb)]
    betas = [beta_ref[b, t, h].astype(F32)[:, None] for t in rows]  # [SUB, 1]
    ks = [k_ref[b, t, h, :] for t in rows]  # [SUB, K]
    kbs = [(x.astype(F32) * beta).astype(dt) for x, beta in zip(ks, betas)]
    a = {(r, c): _dot(kbs[r], ks[c], CONTRACT_COLS) for r in range(nb) for c in range(r + 1)}
    if g_ref is None:
        for r in range(nb):
            a[r, r] = jnp.where(_tril_mask(SUB, -1), a[r, r], 0.0)
        wbs = kbs
    else:
        gates = [g_ref[b, t, h] for t in rows]  # [SUB] fp32
        for r, c in a:
            a[r, c] = a[r, c] * _decay(gates[r], gates[c], _tril_mask(SUB, -1) if r == c else None)
        wbs = [(x.astype(F32) * (beta * jnp.exp(g)[:, None])).astype(dt) for x, beta, g in zip(ks, betas, gates)]
    t_inv = _tril_inverse(a)
    for r in range(nb):
        for c in range(nb):
            t_rc = t_inv[r, c] if c <= r else jnp.zeros((SUB, SUB), F32)
            t_ref[b, rows[r], h, pl.ds(c * SUB, SUB)] = t_rc.astype(t_ref.dtype)
    tcs = {rc: x.astype(dt) for rc, x in t_inv.items()}
    vbs = [(v_ref[b, t, h, :].astype(F32) * beta).astype(dt) for t, beta in zip(rows, betas)]
    for out_ref, xbs in ((w_ref, wbs), (u_ref, vbs)):
        for r in range(nb):
            acc = _dot(tcs[r, 0], xbs[0])
            for c in range(1, r + 1):
                acc = acc + _dot(tcs[r, c], xbs[c])
            out_ref[b, rows[r], h, :] = acc.astype(out_ref.dtype)


def _state_fwd_kernel(k_ref, w_ref, u_ref, g_ref, h0_ref, h_ref, vn_ref, ht_ref, *, H: int, C: int, block_v: int):
    """One (batch*head, block of V columns): S_n stored, V'_n = U_n - W_n S_n, S_{n+1} = S_n + K_n^T V'_n; with a
    gate S_{n+1} = exp(G_last) S_n + K_n^T diag(exp(G_last - G)) V'_n. Without W (no WY step: simple GLA) V' = U,
    and v' is not written.

    Refs: k, w (or None) [B, T, H, K]; u, v' (or None) [B, T, H, V]; g (G, or None) [B, T, H] fp32; h0, ht
    [B, H, K, V] fp32; h (the S_n) [B, N, H, K, V].
    """
    bh, cols = pl.program_id(0), pl.ds(pl.program_id(1) * block_v, block_v)
    b, h = bh // H, bh % H

    def step(n, state):  # state: [K, block_v] fp32, S_n
        t = pl.ds(n * C, C)
        s = state.astype(h_ref.dtype)
        h_ref[b, n, h, :, cols] = s
        if w_ref is None:  # no WY step: V' = U
            u = u_ref[b, t, h, cols]
            v_new, v_operand = u.astype(F32), u
        else:
            v_new = u_ref[b, t, h, cols].astype(F32) - _dot(w_ref[b, t, h, :], s)
            v_operand = v_new.astype(vn_ref.dtype)
            vn_ref[b, t, h, cols] = v_operand
        if g_ref is None:
            return state + _dot(k_ref[b, t, h, :], v_operand, CONTRACT_ROWS)
        gate = g_ref[b, t, h]
        last = _last(gate)
        v_decayed = (v_new * jnp.exp(last - gate)[:, None]).astype(h_ref.dtype)
        return jnp.exp(last) * state + _dot(k_ref[b, t, h, :], v_decayed, CONTRACT_ROWS)

    ht_ref[b, h, :, cols] = jax.lax.fori_loop(0, h_ref.shape[1], step, h0_ref[b, h, :, cols])


def _output_fwd_kernel(q_ref, k_ref, g_ref, h_ref, vn_ref, o_ref, *, H: int, C: int, BV: int, scale: float):
    """Chunk n = program_id(0), head program_id(1), value block program_id(2): O = scale (Q S_n + tril(Q K^T) V');
    with a gate O = scale (diag(exp(G)) Q S_n + (tril(Q K^T) * exp(G_i - G_j)) V').

    Refs: q, k [B, T, H, K]; g (G, or None) [B, T, H] fp32; h (the S_n) [B, N, H, K, V]; v', o [B, T, H, V].
    """
    n, bh, vs = pl.program_id(0), pl.program_id(1), pl.ds(pl.program_id(2) * BV, BV)
    b, h, t = bh // H, bh % H, pl.ds(n * C, C)
    q = q_ref[b, t, h, :]
    qk = _dot(q, k_ref[b, t, h, :], CONTRACT_COLS)
    if g_ref is None:
        scores = jnp.where(_tril_mask(C), qk, 0.0).astype(q.dtype)
        o = _dot(q, h_ref[b, n, h, :, vs]) + _dot(scores, vn_ref[b, t, h, vs])
    else:
        gate = g_ref[b, t, h]
        scores = (qk * _decay(gate, gate, _tril_mask(C))).astype(q.dtype)
        o = _dot(q, h_ref[b, n, h, :, vs]) * jnp.exp(gate)[:, None] + _dot(scores, vn_ref[b, t, h, vs])
    o_ref[b, t, h, vs] = (scale * o).astype(o_ref.dtype)


def _dv_local_kernel(q_ref, k_ref, g_ref, do_ref, dvl_ref, *, H: int, C: int, BV: int, scale: float):
    """Chunk n = program_id(0), head program_id(1), value block program_id(2): dV_local = scale triu(K Q^T) dO
    (with a gate, entry [j, i] of triu(K Q^T) times exp(G_i - G_j)).

    Refs: q, k [B, T, H, K]; g (G, or None) [B, T, H] fp32; do [B, T, H, V]; dv_local [B, T, H, V] fp32.
    """
    n, bh, vs = pl.program_id(0), pl.program_id(1), pl.ds(pl.program_id(2) * BV, BV)
    b, h, t = bh // H, bh % H, pl.ds(n * C, C)
    k = k_ref[b, t, h, :]
    triu = jnp.logical_not(_tril_mask(C, -1))
    kq = _dot(k, q_ref[b, t, h, :], CONTRACT_COLS)  # [j, i]: k_j . q_i
    if g_ref is None:
        scores_t = jnp.where(triu, kq, 0.0).astype(k.dtype)
    else:
        gate = g_ref[b, t, h]
        scores_t = (kq * _decay(-gate, -gate, triu)).astype(k.dtype)
    dvl_ref[b, t, h, vs] = scale * _dot(scores_t, do_ref[b, t, h, vs])


def _state_bwd_kernel(q_ref, k_ref, w_ref, g_ref, do_ref, dvl_ref, dht_ref, dh_ref, dv_ref, dh0_ref, *,
                      H: int, C: int, block_v: int, scale: float):
    """One (batch*head, block of V columns), chunks in reverse: G_{n+1} stored, dV'_n = dV_local + K_n G_{n+1},
    G_n = G_{n+1} + scale Q_n^T dO_n - W_n^T dV'_n; with a gate dV'_n = dV_local + diag(exp(G_last - G)) K_n G_{n+1},
    G_n = exp(G_last) G_{n+1} + scale (diag(exp(G)) Q_n)^T dO_n - W_n^T dV'_n. Without W (simple GLA) the W term
    is dropped and dV' is dV.

    Refs: q, k, w (or None) [B, T, H, K]; g (the gate G, or None) [B, T, H] fp32; do, dv' [B, T, H, V]; dv_local
    [B, T, H, V] fp32; dht, dh0 [B, H, K, V] fp32; dh (the G_{n+1}) [B, N, H, K, V].
    """
    bh, cols = pl.program_id(0), pl.ds(pl.program_id(1) * block_v, block_v)
    b, h = bh // H, bh % H
    n_chunks = dh_ref.shape[1]

    def step(i, grad):  # grad: [K, block_v] fp32, G_{n+1}
        n = n_chunks - 1 - i
        t = pl.ds(n * C, C)
        g = grad.astype(dh_ref.dtype)
        dh_ref[b, n, h, :, cols] = g
        q, kg = q_ref[b, t, h, :], _dot(k_ref[b, t, h, :], g)
        if g_ref is not None:
            gate = g_ref[b, t, h]
            last = _last(gate)
            kg = kg * jnp.exp(last - gate)[:, None]
            q = (q.astype(F32) * jnp.exp(gate)[:, None]).astype(q.dtype)
            grad = jnp.exp(last) * grad
        dv = (dvl_ref[b, t, h, cols] + kg).astype(dv_ref.dtype)
        dv_ref[b, t, h, cols] = dv
        grad = grad + scale * _dot(q, do_ref[b, t, h, cols], CONTRACT_ROWS)
        return grad if w_ref is None else grad - _dot(w_ref[b, t, h, :], dv, CONTRACT_ROWS)

    dh0_ref[b, h, :, cols] = jax.lax.fori_loop(0, n_chunks, step, dht_ref[b, h, :, cols])


def _dqkw_kernel(q_ref, k_ref, g_ref, vn_ref, do_ref, h_ref, dh_ref, dvn_ref, dq_ref, dk_ref, dw_ref, dg_ref, *,
                 H: int, C: int, BK: int, scale: float):
    """Chunk n = program_id(0), head program_id(1), key block program_id(2): with dS = scale tril(dO V'^T),
    dQ = scale dO S_n^T + dS K,  dK = V' G_{n+1}^T + dS^T Q (before the WY terms),  dW = -dV' S_n^T.
    With a gate: dS *= exp(G_i - G_j), dO S_n^T's row i *= exp(G_i), V' G_{n+1}^T's row i *= exp(G_last - G_i),
    and dL/dG (this key block's part; the WY part is `_wy_bwd`'s) = rowsum(dQ * Q) - rowsum(dK * K), plus at the
    chunk's last row exp(G_last) sum(S_n * G_{n+1}) + sum(V' G_{n+1}^T-term * K) (the decay of the carried state).
    Without the WY step (simple GLA: V' = V, dw None) dK is final and there are no WY terms.

    Refs: q, k, dq, dw (or None) [B, T, H, K]; g (G, or None) [B, T, H] fp32; v', do, dv' [B, T, H, V]; h (S_n), dh
    (G_{n+1}) [B, N, H, K, V]; dk [B, T, H, K] (fp32 before the WY terms); dg (or None) [K/BK, B, T, H] fp32.
    """
    n, bh, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b, h, t, ks = bh // H, bh % H, pl.ds(n * C, C), pl.ds(kb * BK, BK)
    do, v_new, s = do_ref[b, t, h, :], vn_ref[b, t, h, :], h_ref[b, n, h, ks, :]  # s: [BK, V]
    dt = do.dtype
    if dw_ref is not None:
        dw_ref[b, t, h, ks] = (-_dot(dvn_ref[b, t, h, :], s, CONTRACT_COLS)).astype(dw_ref.dtype)
    if g_ref is None:
        dscores = (scale * jnp.where(_tril_mask(C), _dot(do, v_new, CONTRACT_COLS), 0.0)).astype(dt)
        dq = scale * _dot(do, s, CONTRACT_COLS) + _dot(dscores, k_ref[b, t, h, ks])
        dq_ref[b, t, h, ks] = dq.astype(dq_ref.dtype)
        dk = _dot(v_new, dh_ref[b, n, h, ks, :], CONTRACT_COLS) + _dot(dscores, q_ref[b, t, h, ks], CONTRACT_ROWS)
        dk_ref[b, t, h, ks] = dk.astype(dk_ref.dtype)
        return
    gate = g_ref[b, t, h]
    last = _last(gate)
    q, k, ds = q_ref[b, t, h, ks], k_ref[b, t, h, ks], dh_ref[b, n, h, ks, :]
    dscores = (scale * _dot(do, v_new, CONTRACT_COLS) * _decay(gate, gate, _tril_mask(C))).astype(dt)
    dq = scale * _dot(do, s, CONTRACT_COLS) * jnp.exp(gate)[:, None] + _dot(dscores, k)
    dk_state = _dot(v_new, ds, CONTRACT_COLS) * jnp.exp(last - gate)[:, None]
    dk = dk_state + _dot(dscores, q, CONTRACT_ROWS)
    dq_ref[b, t, h, ks] = dq.astype(dq_ref.dtype)
    dk_ref[b, t, h, ks] = dk.astype(dk_ref.dtype)
    q, k = q.astype(F32), k.astype(F32)
    dlast = jnp.exp(last) * jnp.sum(s.astype(F32) * ds.astype(F32)) + jnp.sum(dk_state * k)
    dgate = jnp.sum(dq * q, axis=1) - jnp.sum(dk * k, axis=1)
    rows = jax.lax.broadcasted_iota(jnp.int32, (C,), 0)
    dg_ref[kb, b, t, h] = jnp.where(rows == C - 1, dgate + dlast, dgate)


def _wy_bwd_kernel(k_ref, v_ref, beta_ref, g_ref, t_ref, dk_ref, dw_ref, du_ref, dk_out_ref, dv_ref, dbeta_ref,
                   dg_ref, *, H: int, C: int, BK: int, BV: int):
    """Chunk n = program_id(0), head program_id(1): the WY step of the module docstring, over key and value
    blocks of BK and BV columns; adds its dK terms to dk (the _dqkw part). Value blocks in one pass (dV needs no
    dA), key blocks in two (dT, then dK). With a gate (W = T diag(beta exp(G)) K, A_ij = beta_i k_i.k_j
    exp(G_i - G_j)): Kb in dT is diag(beta exp(G)) K, T^T dW is scaled by exp(G) before it joins dA K, dA by
    exp(G_i - G_j), and dL/dG = beta rowsum(exp(G) T^T dW * K) + rowsum(dA * A) - colsum(dA * A).

    Refs: k, dw [B, T, H, K]; v, du (= dV') [B, T, H, V]; beta [B, T, H]; g (G, or None) [B, T, H] fp32;
    t [B, T, H, C]; dk [B, T, H, K] fp32. Outputs dk_out [B, T, H, K], dv [B, T, H, V], dbeta [B, T, H] fp32,
    dg (or None) [B, T, H] fp32.
    """
    n, bh = pl.program_id(0), pl.program_id(1)
    b, h, t = bh // H, bh % H, pl.ds(n * C, C)
    K, V, dt = k_ref.shape[-1], v_ref.shape[-1], k_ref.dtype
    key_blocks = [pl.ds(i * BK, BK) for i in range(K // BK)]
    value_blocks = [pl.ds(i * BV, BV) for i in range(V // BV)]
    beta = beta_ref[b, t, h].astype(F32)[:, None]  # [C, 1]
    tc = t_ref[b, t, h, :]
    gate = None if g_ref is None else g_ref[b, t, h]
    beta_w = beta if gate is None else beta * jnp.exp(gate)[:, None]  # W = T diag(beta_w) K

    def load(ref, cols, scale=beta):  # (x, diag(scale) x in the operand dtype)
        x = ref[b, t, h, cols]
        return x, (x.astype(F32) * scale).astype(dt)

    dt_inv = jnp.zeros((C, C), F32)  # dT = dW Kb^T + dU Vb^T
    for cols in key_blocks:
        dt_inv = dt_inv + _dot(dw_ref[b, t, h, cols], load(k_ref, cols, beta_w)[1], CONTRACT_COLS)
    dbeta = jnp.zeros((C,), F32)
    for cols in value_blocks:  # dV needs no dA: one pass
        v, vb = load(v_ref, cols)
        du = du_ref[b, t, h, cols]
        dt_inv = dt_inv + _dot(du, vb, CONTRACT_COLS)
        dvb = _dot(tc, du, CONTRACT_ROWS)  # T^T dU
        dv_ref[b, t, h, cols] = (dvb * beta).astype(dv_ref.dtype)
        dbeta = dbeta + jnp.sum(dvb * v.astype(F32), axis=1)
    x = _dot(dt_inv.astype(dt), tc, CONTRACT_COLS)  # dT T^T
    da = jnp.where(_tril_mask(C, -1), -_dot(tc, x.astype(dt), CONTRACT_ROWS), 0.0)
    if gate is not None:
        da = da * _decay(gate, gate, _tril_mask(C, -1))
        dgate, kk = jnp.zeros((C,), F32), jnp.zeros((C, C), F32)
    da = da.astype(dt)
    for cols in key_blocks:
        k, kb = load(k_ref, cols)
        tdw = _dot(tc, dw_ref[b, t, h, cols], CONTRACT_ROWS)  # T^T dW
        if gate is not None:
            tdw = tdw * jnp.exp(gate)[:, None]
            dgate = dgate + beta[:, 0] * jnp.sum(tdw * k.astype(F32), axis=1)
            kk = kk + _dot(k, k, CONTRACT_COLS)
        dkb = tdw + _dot(da, k)  # T^T dW + dA K
        dk = dk_ref[b, t, h, cols] + _dot(da, kb, CONTRACT_ROWS) + dkb * beta
        dk_out_ref[b, t, h, cols] = dk.astype(dk_out_ref.dtype)
        dbeta = dbeta + jnp.sum(dkb * k.astype(F32), axis=1)
    dbeta_ref[b, t, h] = dbeta
    if gate is not None:
        da_a = da.astype(F32) * (beta * kk)  # dA * A (A without its decay factor: da carries it)
        dg_ref[b, t, h] = dgate + jnp.sum(da_a, axis=1) - jnp.sum(da_a, axis=0)


# ---------------------------------------------------------------------------------------------------- launchers


def _block(d: int) -> int:
    """Head-dim columns per block of the per-chunk kernels: BLOCK, or all d when BLOCK does not divide it."""
    return BLOCK if d % BLOCK == 0 else d


def _dqkw_block(K: int) -> int:
    """Key columns per `_dqkw` program: all of K up to 2 * BLOCK (every program reads all of dO, V', dV' and computes
    dS again, so fewer programs do less), else `_block`."""
    return K if K <= 2 * BLOCK else _block(K)


# num_warps of the per-chunk kernels: scripts/bench_linear_attention.py --profile picks these (docs/kernels-deltanet.md)
WARPS = {"wy_fwd": 2, "output_fwd": 4, "dv_local": 4, "dqkw": 4, "wy_bwd": 4}


# num_stages (Triton's software pipelining of the loop's loads) of the recurrences; the per-chunk kernels have no loop.
# scripts/bench_linear_attention.py --profile picks these (docs/kernels-deltanet.md).
STAGES = {"state_fwd": 4, "state_bwd": 3}


def default_block_v(heads: int, V: int) -> int:
    """State columns per recurrence program: 32, or 16 where 32 leaves multiprocessors idle (heads * V / 32 programs
    under SM_COUNT: the recurrences' only parallelism is batch x heads x state columns)."""
    return min(V, 32 if heads * V // 32 >= SM_COUNT else 16)


def _call(kernel, grid, out_shape, options: Options, num_warps: int, *args, num_stages: int = 2, **static):
    """pallas_call of kernel(*input refs, *output refs, **static). An input or output given as None (the gate and
    the dG outputs of an ungated call) is left out of the call: the kernel gets None for its ref, the caller None."""
    outs = out_shape if isinstance(out_shape, tuple) else (out_shape,)
    present = [x is not None for x in (*args, *outs)]

    def body(*refs):
        given = iter(refs)
        kernel(*[next(given) if p else None for p in present], **static)

    results = iter(pl.pallas_call(
        body, out_shape=tuple(x for x in outs if x is not None), grid=grid, interpret=options.interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages), name=kernel.__name__,
    )(*[x for x in args if x is not None]))
    results = tuple(next(results) if x is not None else None for x in outs)
    return results if isinstance(out_shape, tuple) else results[0]


def _like(x: jax.Array, dtype=None, last: int | None = None) -> jax.ShapeDtypeStruct:
    """Output shape of x's shape (its last dim replaced by `last`) in `dtype` (None: x's)."""
    shape = x.shape if last is None else (*x.shape[:-1], last)
    return jax.ShapeDtypeStruct(shape, dtype or x.dtype)


def wy_fwd_pallas(k: jax.Array, v: jax.Array, beta: jax.Array, options: Options, gate: jax.Array | None = None):
    """T, W, U of every chunk (`_wy_fwd_kernel`). k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; gate (G, or
    None) [B, T, H] fp32.

    Returns:
        T [B, T, H, C], W [B, T, H, K] and U [B, T, H, V], all in k's dtype.
    """
    B, Tp, H, K = k.shape
    C = options.chunk
    out_shape = (_like(k, None, C), _like(k), _like(v, k.dtype))
    return _call(_wy_fwd_kernel, (Tp // C, B * H), out_shape, options, WARPS["wy_fwd"], k, v, beta, gate, H=H, C=C)


def state_fwd(k: jax.Array, w: jax.Array | None, u: jax.Array, h0: jax.Array, options: Options,
              gate: jax.Array | None = None):
    """Forward recurrence. k, w: [B, T, H, K]; u: [B, T, H, V]; h0: [B, H, K, V] fp32; gate (G, or None):
    [B, T, H] fp32. w None: no WY step (simple GLA), V' = U.

    Returns:
        S_n [B, N, H, K, V] and V' [B, T, H, V] (None without w) in k's dtype; final state [B, H, K, V] fp32.
    """
    B, Tp, H, K = k.shape
    V, N, bv = u.shape[-1], Tp // options.chunk, options.block_v
    v_new = None if w is None else _like(u, k.dtype)
    out_shape = (jax.ShapeDtypeStruct((B, N, H, K, V), k.dtype), v_new, _like(h0))
    return _call(_state_fwd_kernel, (B * H, V // bv), out_shape, options, 4 if K * bv <= 4096 else 8,
                 k, w, u, gate, h0, num_stages=STAGES["state_fwd"], H=H, C=options.chunk, block_v=bv)


def output_fwd(q: jax.Array, k: jax.Array, states: jax.Array, v_new: jax.Array, options: Options,
               gate: jax.Array | None = None) -> jax.Array:
    """O [B, T, H, V] in q's dtype (`_output_fwd_kernel`). q, k: [B, T, H, K]; states: [B, N, H, K, V];
    v': [B, T, H, V]; gate (G, or None): [B, T, H] fp32."""
    B, Tp, H, K = q.shape
    V, BV = v_new.shape[-1], _block(v_new.shape[-1])
    return _call(_output_fwd_kernel, (Tp // options.chunk, B * H, V // BV), _like(v_new, q.dtype), options,
                 WARPS["output_fwd"],
                 q, k, gate, states, v_new, H=H, C=options.chunk, BV=BV, scale=options.scale)


def dv_local_bwd(q: jax.Array, k: jax.Array, do: jax.Array, options: Options,
                 gate: jax.Array | None = None) -> jax.Array:
    """scale triu(K Q^T) dO per chunk (decayed by the gate G [B, T, H] fp32 if given), [B, T, H, V] fp32
    (`_dv_local_kernel`)."""
    B, Tp, H, K = q.shape
    V, BV = do.shape[-1], _block(do.shape[-1])
    return _call(_dv_local_kernel, (Tp // options.chunk, B * H, V // BV), _like(do, F32), options, WARPS["dv_local"],
                 q, k, gate, do, H=H, C=options.chunk, BV=BV, scale=options.scale)


def state_bwd(q, k, w, do, dv_local, dht, options: Options, gate: jax.Array | None = None):
    """Backward recurrence. q, k, w: [B, T, H, K]; do: [B, T, H, V]; dv_local: same, fp32; dht: [B, H, K, V] fp32;
    gate (G, or None): [B, T, H] fp32. w None: no WY step (simple GLA), dV' is dV.

    Returns:
        G_{n+1} [B, N, H, K, V] and dV' [B, T, H, V] in q's dtype; dh0 = G_0 [B, H, K, V] fp32.
    """
    B, Tp, H, K = k.shape
    V, N, bv = do.shape[-1], Tp // options.chunk, options.block_v
    out_shape = (jax.ShapeDtypeStruct((B, N, H, K, V), q.dtype), _like(dv_local, q.dtype), _like(dht))
    return _call(_state_bwd_kernel, (B * H, V // bv), out_shape, options, 4 if K * bv <= 4096 else 8,
                 q, k, w, gate, do, dv_local, dht, num_stages=STAGES["state_bwd"], H=H, C=options.chunk, block_v=bv,
                 scale=options.scale)


def dqkw_bwd(q, k, v_new, do, states, dstates, dv_new, options: Options, gate: jax.Array | None = None,
             wy: bool = True):
    """dQ, dK (before the WY terms, fp32), dW and dL/dG (`_dqkw_kernel`). q, k: [B, T, H, K]; v', do, dv':
    [B, T, H, V]; states, dstates: [B, N, H, K, V]; gate (G, or None): [B, T, H] fp32. wy=False (simple GLA: no
    WY step): dk is final, in k's dtype, and there is no dW.

    Returns:
        dq [B, T, H, K] in q's dtype, dk [B, T, H, K] fp32 (k's dtype without wy), dw [B, T, H, K] in q's dtype (None
        without wy), dG by key block [K/BK, B, T, H] fp32 (None without a gate).
    """
    B, Tp, H, K = q.shape
    BK = _dqkw_block(K)
    dg = None if gate is None else jax.ShapeDtypeStruct((K // BK, *gate.shape), F32)
    out_shape = (_like(q), _like(k, F32 if wy else None), _like(q) if wy else None, dg)
    return _call(_dqkw_kernel, (Tp // options.chunk, B * H, K // BK), out_shape, options, WARPS["dqkw"],
                 q, k, gate, v_new, do, states, dstates, dv_new, H=H, C=options.chunk, BK=BK, scale=options.scale)


def wy_bwd(k, v, beta, t_inv, dk, dw, du, options: Options, gate: jax.Array | None = None):
    """The WY step backward (`_wy_bwd_kernel`). k, dw: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H];
    t_inv: [B, T, H, C]; dk (the _dqkw part): [B, T, H, K] fp32; du = dV': [B, T, H, V]; t_inv, dw, du in k's dtype;
    gate (G, or None): [B, T, H] fp32.

    Returns:
        dk [B, T, H, K] in k's dtype, dv [B, T, H, V] in v's dtype, dbeta [B, T, H] fp32, the WY part of dL/dG
        [B, T, H] fp32 (None without a gate).
    """
    B, Tp, H, K = k.shape
    V = v.shape[-1]
    out_shape = (_like(k), _like(v), _like(beta, F32), None if gate is None else _like(gate, F32))
    return _call(_wy_bwd_kernel, (Tp // options.chunk, B * H), out_shape, options, WARPS["wy_bwd"],
                 k, v, beta, gate, t_inv, dk, dw, du, H=H, C=options.chunk, BK=_block(K), BV=_block(V))
