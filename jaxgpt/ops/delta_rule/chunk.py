"""Chunked delta rule through the WY/UT representation; a `lax.scan` over chunks carries the state.

Within a chunk of C steps entering with state S, unrolling u_t = beta_t (v_t - S_{t-1}^T k_t) gives
    (I + L) U = diag(beta) V - diag(beta) K S,      L_tj = beta_t k_t . k_j for j < t (strictly lower)
so with the UT transform T = (I + L)^{-1} (one unit-lower-triangular solve per chunk):
    w = T diag(beta) K,   u = T diag(beta) V,   U = u - w S
    o = scale * (Q S + tril(Q K^T) U)
    S' = S + K^T U
"""

import jax
import jax.numpy as jnp

from jaxgpt.ops.delta_rule.pallas import chunk_delta_rule_pallas
from jaxgpt.ops.l2norm import l2norm
from jaxgpt.ops.triangular import unit_lower_solve
from jaxgpt.ops.utils import accumulation_dtype, check_shapes, from_chunks, pad_time, resolve_backend, to_chunks


def chunk_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
    *,
    tril_inverse: str = "pallas",
    block_v: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Delta rule in chunked form; same math and API as `naive_recurrent_delta_rule` (and FLA's `chunk_delta_rule`).

    Args:
        q, k: [B, T, H, K] queries and keys.
        v: [B, T, H, V] values.
        beta: [B, T, H] write strengths.
        scale: score scale; defaults to K ** -0.5.
        initial_state: [B, H, K, V] state, or None for zeros.
        output_final_state: whether to return the final state.
        use_qk_l2norm_in_kernel: L2-normalise q and k first (FLA's flag; eps 1e-6 inside the sqrt).
        chunk_size: steps per chunk; any T works (padded internally with zero inputs and beta = 0).
        backend: 'auto' | 'xla' | 'pallas' (see jaxgpt.ops.utils.resolve_backend). 'xla' is the code below (fp32,
            autodiff through the scan); 'pallas' is `pallas.chunk_delta_rule_pallas` (operands in the inputs' dtype,
            a hand-written backward, Pallas recurrences; interpreted off GPU).
        tril_inverse: the pallas path's per-chunk (I + A)^{-1}: 'pallas' (kernel) or 'trsm' (XLA's solve).
        block_v: the pallas recurrences' state columns per program (a power of two >= 16 dividing V); None:
            32, or 16 where 32 would leave GPU multiprocessors idle (`pallas.default_block_v`). The xla path
            ignores these two.

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32, or None.
    """
    check_shapes(q, k, v, initial_state, per_head={"beta": beta})
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if resolve_backend(backend) == "pallas":
        return chunk_delta_rule_pallas(
            q, k, v, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, chunk_size,
            block_v, tril_inverse=tril_inverse,
        )
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, beta = (to_chunks(pad_time(x.astype(acc), chunk_size), chunk_size) for x in (q, k, v, beta[..., None]))
    h0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)

    w, u = wy_representation(k, v, beta)
    states, new_values, final_state = chunk_states(k, w, u, h0)
    scores = jnp.tril(q @ jnp.swapaxes(k, -1, -2))
    o = scale * (q @ states + scores @ new_values)
    return from_chunks(o, T).astype(dtype), (final_state if output_final_state else None)


def wy_representation(k: jax.Array, v: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """w = T diag(beta) K and u = T diag(beta) V with T = (I + strict_tril(diag(beta) K K^T))^{-1}.

    Args:
        k: [..., C, K]; v: [..., C, V]; beta: [..., C, 1].

    Returns:
        w: [..., C, K]; u: [..., C, V].
    """
    C, K = k.shape[-2:]
    kb = k * beta
    a = jnp.tril(kb @ jnp.swapaxes(k, -1, -2), -1) + jnp.eye(C, dtype=k.dtype)
    rhs = jnp.concatenate([kb, v * beta], axis=-1)
    wu = unit_lower_solve(a, rhs)
    return wu[..., :K], wu[..., K:]


def chunk_states(
    k: jax.Array, w: jax.Array, u: jax.Array, h0: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scan over chunks: U_n = u_n - w_n S_n,  S_{n+1} = S_n + K_n^T U_n.

    Args:
        k, w: [B, H, N, C, K]; u: [B, H, N, C, V]; h0: [B, H, K, V].

    Returns:
        states: [B, H, N, K, V] (S_n before chunk n); new values U: [B, H, N, C, V]; final state [B, H, K, V].
    """

    def step(h, inputs):
        k_n, w_n, u_n = inputs
        u_new = u_n - w_n @ h
        return h + jnp.swapaxes(k_n, -1, -2) @ u_new, (h, u_new)

    final_state, (states, new_values) = jax.lax.scan(step, h0, tuple(jnp.moveaxis(x, 2, 0) for x in (k, w, u)))
    return jnp.moveaxis(states, 0, 2), jnp.moveaxis(new_values, 0, 2), final_state
