"""Delta rule for GPUs: the chunked WY form with a hand-written backward (`jax.custom_vjp`) and the two chunk-to-chunk
recurrences and the per-chunk triangular inverse as Pallas (Triton) kernels; everything else parallel over chunks stays
batched XLA matrix products.

The structure is FLA's (`fla/ops/delta_rule/chunk.py`), the math is the one in `chunk.py`. Per chunk n of C steps
(rows of q, k [C, K], v [C, V], beta [C]; all chunks at once unless said otherwise):

forward
    A   = strict_tril(diag(beta) K K^T)          T = (I + A)^{-1}      (fp32, Pallas kernel: blockwise substitution)
    W   = T diag(beta) K                         U = T diag(beta) V
    S_0 = h0;  V'_n = U_n - W_n S_n;  S_{n+1} = S_n + K_n^T V'_n             (sequential: Pallas kernel)
    O   = scale (Q S_n + tril(Q K^T) V'_n)
backward (G_{n+1} = dL/dS_{n+1}, G_N = dht)
    dV'_n = scale triu(K Q^T) dO + K G_{n+1}                                   (sequential: Pallas kernel,
    G_n   = G_{n+1} + scale Q^T dO - W^T dV'_n                                   reverse order, dh0 = G_0)
    dQ    = scale (dO S_n^T + tril(dO V'^T) K)
    dK    = V' G_{n+1}^T + scale tril(dO V'^T)^T Q  (+ the WY terms below)
    dW    = -dV' S_n^T,   dU = dV'
    WY:  dKb = T^T dW,  dVb = T^T dU,  dT = dW Kb^T + dU Vb^T,  dA = strict_tril(-T^T dT T^T),
         dKb += dA K,  dK += dA^T Kb + diag(beta) dKb,  dV = diag(beta) dVb,  dbeta = rowsum(dKb*K + dVb*V)
         (Kb = diag(beta) K, Vb = diag(beta) V)

Precision as FLA: matrix-product operands in the inputs' dtype (bf16 under mixed precision), fp32 accumulation
(`preferred_element_type`), T and the running state S / its gradient G in fp32; S_n and V' are stored in the
operand dtype. With fp32 inputs every product runs at full fp32 precision (`Precision.HIGHEST`), which is how the
CPU tests check this path against `chunk.py` (Pallas in interpret mode).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt.ops.l2norm import l2norm
from jaxgpt.ops.utils import from_chunks, pad_time, to_chunks, value_row

F32 = jnp.float32
CONTRACT_ROWS = (((0,), (0,)), ((), ()))  # dot_general dimension numbers for a^T b of 2-D a, b
SUB = 16  # diagonal block size of the triangular inverse


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

    block_v: state columns per recurrence program (a power of 2 dividing V); None: min(V, 32).
    tril_inverse: how T = (I + A)^{-1} is computed: 'pallas' (`tril_inverse_pallas`, blockwise forward
    substitution; chunk sizes that are multiples of 16) or 'trsm' (XLA's batched triangular solve).
    Off GPU the kernels run in Pallas's interpreter (slow; for tests).
    """
    if tril_inverse not in ("pallas", "trsm"):
        raise ValueError(f"tril_inverse must be 'pallas' or 'trsm', got {tril_inverse!r}")
    if chunk_size % SUB:
        tril_inverse = "trsm"
    B, T, H, K = q.shape
    V = v.shape[-1]
    if block_v is None:  # 32 measured as fast as or faster than 64 at every benchmark shape (docs/kernels-deltanet.md)
        block_v = min(V, 32)
    if block_v < 16 or block_v & (block_v - 1) or V % block_v:
        raise ValueError(f"block_v must be a power of two >= 16 dividing V={V}, got {block_v}")
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, beta = (to_chunks(pad_time(x, chunk_size), chunk_size) for x in (q, k, v, beta[..., None]))
    h0 = jnp.zeros((B, H, K, V), F32) if initial_state is None else initial_state.astype(F32)
    options = Options(scale, block_v, tril_inverse, jax.default_backend() != "gpu")
    o, final_state = delta_rule(q, k, v, beta[..., 0], h0, options)
    return from_chunks(o, T), (final_state if output_final_state else None)


class Options(NamedTuple):
    """Static (hashable) options of `delta_rule`."""

    scale: float
    block_v: int  # state columns per recurrence program
    tril_inverse: str  # 'pallas' or 'trsm'
    interpret: bool  # run the kernels in Pallas's interpreter (off GPU)


def mm(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    """einsum of two operands in their (common) dtype with fp32 accumulation; full fp32 precision for fp32."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jnp.einsum(spec, a, b, preferred_element_type=F32, precision=precision)


def strict_tril(x: jax.Array) -> jax.Array:
    """Entries strictly below the diagonal of the last two axes."""
    return jnp.tril(x, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def delta_rule(q, k, v, beta, h0, options: Options):
    """Chunked delta rule on chunked inputs.

    Args:
        q, k: [B, H, N, C, K]; v: [B, H, N, C, V]; beta: [B, H, N, C]; h0: [B, H, K, V] fp32.

    Returns:
        o: [B, H, N, C, V] in q's dtype; final state [B, H, K, V] fp32.
    """
    return delta_rule_fwd(q, k, v, beta, h0, options)[0]


def delta_rule_fwd(q, k, v, beta, h0, options: Options):
    dt = q.dtype
    t_inv, w, u = wy_fwd(k, v, beta, options)
    states, v_new, final_state = state_recurrence(k, w, u, h0, options)
    scores = jnp.tril(mm(q, k, "...ik,...jk->...ij")).astype(dt)  # [..., C, C]
    o = options.scale * (mm(q, states, "...ck,...kv->...cv") + mm(scores, v_new, "...ij,...jv->...iv"))
    return (o.astype(dt), final_state), (q, k, v, beta, t_inv, w, states, v_new)


def delta_rule_bwd(options: Options, residuals, cotangents):
    q, k, v, beta, t_inv, w, states, v_new = residuals
    do, dht = cotangents
    dt, scale = q.dtype, options.scale
    do = do.astype(dt)
    scores = jnp.tril(mm(q, k, "...ik,...jk->...ij")).astype(dt)
    dv_local = scale * mm(scores, do, "...ij,...iv->...jv")  # scale tril(Q K^T)^T dO: [..., C, V]
    dstates, dv, dh0 = state_recurrence_bwd(q, k, w, do, dv_local, dht.astype(F32), options)  # G_{n+1}, dV'
    dscores = (scale * jnp.tril(mm(do, v_new, "...iv,...jv->...ij"))).astype(dt)  # dL/d(Q K^T), masked
    dq = scale * mm(do, states, "...iv,...kv->...ik") + mm(dscores, k, "...ij,...jk->...ik")
    dk = mm(v_new, dstates, "...cv,...kv->...ck") + mm(dscores, q, "...ij,...ik->...jk")
    dw = -mm(dv.astype(dt), states, "...cv,...kv->...ck")
    dk_wy, dv_in, dbeta = wy_bwd(k, v, beta, t_inv, dw, dv)
    dk = dk + dk_wy
    return dq.astype(dt), dk.astype(dt), dv_in.astype(v.dtype), dbeta.astype(beta.dtype), dh0


delta_rule.defvjp(delta_rule_fwd, delta_rule_bwd)


def wy_fwd(k: jax.Array, v: jax.Array, beta: jax.Array, options: Options) -> tuple[jax.Array, jax.Array, jax.Array]:
    """T = (I + strict_tril(diag(beta) K K^T))^{-1} (fp32), W = T diag(beta) K, U = T diag(beta) V.

    Args:
        k: [..., C, K]; v: [..., C, V]; beta: [..., C].

    Returns:
        T [..., C, C] fp32; W [..., C, K] and U [..., C, V] in k's dtype.
    """
    dt, C = k.dtype, k.shape[-2]
    b = beta.astype(F32)[..., None]
    kb = (k.astype(F32) * b).astype(dt)
    a = strict_tril(mm(kb, k, "...ik,...jk->...ij"))
    if options.tril_inverse == "pallas":
        t_inv = tril_inverse_pallas(a, options.interpret)
    else:
        eye = jnp.broadcast_to(jnp.eye(C, dtype=F32), a.shape)
        t_inv = jax.lax.linalg.triangular_solve(a + eye, eye, left_side=True, lower=True, unit_diagonal=True)
    tc = t_inv.astype(dt)
    w = mm(tc, kb, "...ij,...jk->...ik").astype(dt)
    u = mm(tc, (v.astype(F32) * b).astype(dt), "...ij,...jv->...iv").astype(dt)
    return t_inv, w, u


def wy_bwd(
    k: jax.Array, v: jax.Array, beta: jax.Array, t_inv: jax.Array, dw: jax.Array, du: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of (W, U) = wy_fwd(k, v, beta) w.r.t. k, v, beta (the module docstring's WY step).

    Args:
        k: [..., C, K]; v: [..., C, V]; beta: [..., C]; t_inv: [..., C, C] fp32; dw: [..., C, K]; du: [..., C, V].

    Returns:
        dk [..., C, K], dv [..., C, V], dbeta [..., C], all fp32.
    """
    dt = k.dtype
    b = beta.astype(F32)[..., None]
    kb, vb = (k.astype(F32) * b).astype(dt), (v.astype(F32) * b).astype(dt)
    tc, dw, du = t_inv.astype(dt), dw.astype(dt), du.astype(dt)
    dkb = mm(tc, dw, "...ij,...ik->...jk")  # T^T dW
    dvb = mm(tc, du, "...ij,...iv->...jv")  # T^T dU
    dt_inv = mm(dw, kb, "...ik,...jk->...ij") + mm(du, vb, "...iv,...jv->...ij")  # dT = dW Kb^T + dU Vb^T
    x = mm(dt_inv.astype(dt), tc, "...ij,...kj->...ik")  # dT T^T
    da = strict_tril(-mm(tc, x.astype(dt), "...ji,...jk->...ik")).astype(dt)  # strict_tril(-T^T dT T^T)
    dkb = dkb + mm(da, k, "...ij,...jk->...ik")
    dk = mm(da, kb, "...ij,...ik->...jk") + dkb * b
    dbeta = jnp.sum(dkb * k.astype(F32), -1) + jnp.sum(dvb * v.astype(F32), -1)
    return dk, dvb * b, dbeta


def _dot(a: jax.Array, b: jax.Array, dimension_numbers=(((1,), (0,)), ((), ()))) -> jax.Array:
    """2-D product inside a kernel: fp32 accumulation, full fp32 precision for fp32 operands."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
    return jax.lax.dot_general(a, b, dimension_numbers, precision=precision, preferred_element_type=F32)


def _state_fwd_kernel(k_ref, w_ref, u_ref, h0_ref, h_ref, vn_ref, ht_ref, *, chunk: int, block_v: int):
    """One (batch*head, block of V columns): S_n stored, V'_n = U_n - W_n S_n, S_{n+1} = S_n + K_n^T V'_n.

    Refs: k, w [BH, N*C, K]; u, v' [BH, N*C, V]; h0, ht [BH, K, V] fp32; h (the S_n) [BH, N, K, V].
    """
    bh, cols = pl.program_id(0), pl.ds(pl.program_id(1) * block_v, block_v)

    def step(n, state):  # state: [K, block_v] fp32, S_n
        rows = pl.ds(n * chunk, chunk)
        s = state.astype(h_ref.dtype)
        h_ref[bh, n, :, cols] = s
        v_new = (u_ref[bh, rows, cols].astype(F32) - _dot(w_ref[bh, rows, :], s)).astype(vn_ref.dtype)
        vn_ref[bh, rows, cols] = v_new
        return state + _dot(k_ref[bh, rows, :], v_new, CONTRACT_ROWS)

    ht_ref[bh, :, cols] = jax.lax.fori_loop(0, h_ref.shape[1], step, h0_ref[bh, :, cols])


def _state_bwd_kernel(q_ref, k_ref, w_ref, do_ref, dvl_ref, dht_ref, dh_ref, dv_ref, dh0_ref, *,
                      chunk: int, block_v: int, scale: float):
    """One (batch*head, block of V columns), chunks in reverse: G_{n+1} stored, dV'_n = dV_local + K_n G_{n+1},
    G_n = G_{n+1} + scale Q_n^T dO_n - W_n^T dV'_n.

    Refs: q, k, w [BH, N*C, K]; do [BH, N*C, V]; dv_local, dv' [BH, N*C, V] fp32; dht, dh0 [BH, K, V] fp32;
    dh (the G_{n+1}) [BH, N, K, V].
    """
    bh, cols = pl.program_id(0), pl.ds(pl.program_id(1) * block_v, block_v)
    n_chunks = dh_ref.shape[1]

    def step(i, grad):  # grad: [K, block_v] fp32, G_{n+1}
        n = n_chunks - 1 - i
        rows = pl.ds(n * chunk, chunk)
        g = grad.astype(dh_ref.dtype)
        dh_ref[bh, n, :, cols] = g
        dv = dvl_ref[bh, rows, cols] + _dot(k_ref[bh, rows, :], g)
        dv_ref[bh, rows, cols] = dv
        dq_term = _dot(q_ref[bh, rows, :], do_ref[bh, rows, cols], CONTRACT_ROWS)
        return grad + scale * dq_term - _dot(w_ref[bh, rows, :], dv.astype(w_ref.dtype), CONTRACT_ROWS)

    dh0_ref[bh, :, cols] = jax.lax.fori_loop(0, n_chunks, step, dht_ref[bh, :, cols])


def _tril_inverse_kernel(a_ref, t_ref):
    """One chunk's T = (I + A)^{-1}, A [C, C] fp32 strictly lower triangular, C a multiple of SUB.

    Each SUB x SUB diagonal block by forward substitution, row i: T_i = e_i - sum_{j<i} A_ij T_j; then the blocks
    below the diagonal by block forward substitution: T_rc = -T_rr sum_{c<=m<r} A_rm T_mc.
    """
    i, nb = pl.program_id(0), a_ref.shape[-1] // SUB
    rows = jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 0)
    eye = (rows == jax.lax.broadcasted_iota(jnp.int32, (SUB, SUB), 1)).astype(F32)

    def block(r, c):
        return i, pl.ds(r * SUB, SUB), pl.ds(c * SUB, SUB)

    t = {}
    for r in range(nb):
        a, t_rr = a_ref[block(r, r)], eye
        for row in range(1, SUB):
            a_row = value_row(a, row)  # [SUB]
            t_rr = t_rr - jnp.where(rows == row, jnp.sum(a_row[:, None] * t_rr, axis=0)[None, :], 0.0)
        t[r, r] = t_rr
        for c in range(r):
            acc = _dot(a_ref[block(r, c)], t[c, c])
            for m in range(c + 1, r):
                acc = acc + _dot(a_ref[block(r, m)], t[m, c])
            t[r, c] = -_dot(t_rr, acc)
    for r in range(nb):
        for c in range(nb):
            t_ref[block(r, c)] = t[r, c] if c <= r else jnp.zeros((SUB, SUB), F32)


def tril_inverse_pallas(a: jax.Array, interpret: bool) -> jax.Array:
    """(I + A)^{-1} for strictly lower-triangular A [..., C, C] (fp32, C a multiple of 16), one program per matrix.

    Replaces XLA's batched triangular solve (cuBLAS trsm), which at B*H*N ~ 1.5k-4k 64x64 matrices runs slowly;
    the same blockwise scheme as FLA's `solve_tril`.
    """
    *batch, C, _ = a.shape
    flat = a.reshape(-1, C, C).astype(F32)
    t = _call(_tril_inverse_kernel, (flat.shape[0],), jax.ShapeDtypeStruct(flat.shape, F32), interpret, 2, flat)
    return t.reshape(*batch, C, C)


def _flat(x: jax.Array) -> jax.Array:
    """[B, H, N, C, D] -> [B*H, N*C, D] (free: a reshape)."""
    B, H, N, C, D = x.shape
    return x.reshape(B * H, N * C, D)


def _call(kernel, grid, out_shape, interpret: bool, num_warps: int, *args):
    return pl.pallas_call(
        kernel, out_shape=out_shape, grid=grid, interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
    )(*args)


def state_recurrence(k: jax.Array, w: jax.Array, u: jax.Array, h0: jax.Array, options: Options):
    """Forward recurrence (Pallas). k, w: [B, H, N, C, K]; u: [B, H, N, C, V]; h0: [B, H, K, V] fp32.

    Returns:
        S_n [B, H, N, K, V] and V' [B, H, N, C, V] in k's dtype; final state [B, H, K, V] fp32.
    """
    B, H, N, C, K = k.shape
    V = u.shape[-1]
    dt = k.dtype
    out_shape = (jax.ShapeDtypeStruct((B * H, N, K, V), dt), jax.ShapeDtypeStruct((B * H, N * C, V), dt),
                 jax.ShapeDtypeStruct((B * H, K, V), F32))
    kernel = functools.partial(_state_fwd_kernel, chunk=C, block_v=options.block_v)
    grid = (B * H, V // options.block_v)
    h, v_new, ht = _call(kernel, grid, out_shape, options.interpret, 4 if K * options.block_v <= 4096 else 8,
                         _flat(k), _flat(w), _flat(u), h0.reshape(B * H, K, V))
    return h.reshape(B, H, N, K, V), v_new.reshape(B, H, N, C, V), ht.reshape(B, H, K, V)


def state_recurrence_bwd(q, k, w, do, dv_local, dht, options: Options):
    """Backward recurrence (Pallas). q, k, w: [B, H, N, C, K]; do: [B, H, N, C, V]; dv_local: same, fp32;
    dht: [B, H, K, V] fp32.

    Returns:
        G_{n+1} [B, H, N, K, V] in q's dtype; dV' [B, H, N, C, V] fp32; dh0 = G_0 [B, H, K, V] fp32.
    """
    B, H, N, C, K = k.shape
    V = do.shape[-1]
    out_shape = (jax.ShapeDtypeStruct((B * H, N, K, V), q.dtype), jax.ShapeDtypeStruct((B * H, N * C, V), F32),
                 jax.ShapeDtypeStruct((B * H, K, V), F32))
    kernel = functools.partial(_state_bwd_kernel, chunk=C, block_v=options.block_v, scale=options.scale)
    grid = (B * H, V // options.block_v)
    dh, dv, dh0 = _call(kernel, grid, out_shape, options.interpret, 4 if K * options.block_v <= 4096 else 8,
                        _flat(q), _flat(k), _flat(w), _flat(do), _flat(dv_local), dht.reshape(B * H, K, V))
    return dh.reshape(B, H, N, K, V), dv.reshape(B, H, N, C, V), dh0.reshape(B, H, K, V)
