"""Chunked gated delta rule in XLA: the WY/UT representation with the decay folded in, a `lax.scan` over chunks.

Within a chunk of C steps entering with state S, let G_t = g_1 + ... + g_t (the cumulative log decay from the chunk
start) and Gamma_tj = exp(G_t - G_j) for j <= t (0 above the diagonal; every entry <= 1 for g <= 0, so nothing
overflows; the exponents are summed segment by segment, `segment_sums`). Unrolling u_t = beta_t (v_t - S'_t^T k_t)
with S'_t = exp(G_t) S + sum_{j<t} Gamma_tj k_j u_j^T gives

    (I + L) U = diag(beta) V - diag(beta exp(G)) K S,     L_tj = beta_t Gamma_tj k_t . k_j for j < t

so with T = (I + L)^{-1} (one unit-lower-triangular solve per chunk):
    w = T diag(beta exp(G)) K,   u = T diag(beta) V,   U = u - w S
    o  = scale * (diag(exp(G)) Q S + (tril(Q K^T) * Gamma) U)
    S' = exp(G_C) S + (diag(exp(G_C - G)) K)^T U
Everything is computed in fp32 (at least); gradients come from autodiff through the scan.
"""

import jax
import jax.numpy as jnp

from jaxgpt.ops.l2norm import l2norm
from jaxgpt.ops.triangular import unit_lower_solve
from jaxgpt.ops.utils import accumulation_dtype, from_chunks, pad_time, to_chunks


def chunk_gated_delta_rule_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated delta rule in chunked form (arguments checked by `jaxgpt.ops.gated_delta_rule.chunk_gated_delta_rule`).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H] log decays and write strengths.
        scale: score scale.
        initial_state: [B, H, K, V] or None for zeros.
        output_final_state: whether to return the final state.
        use_qk_l2norm_in_kernel: L2-normalise q and k first (eps 1e-6 inside the sqrt).
        chunk_size: steps per chunk; any T works (padded with zero inputs, g = 0 and beta = 0: no decay, no write).

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32, or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, g, beta = (
        to_chunks(pad_time(x.astype(acc), chunk_size), chunk_size) for x in (q, k, v, g[..., None], beta[..., None])
    )
    h0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)

    G = jnp.cumsum(g, axis=-2)  # [B, H, N, C, 1] log decay from the chunk's start
    D = segment_sums(g)  # [B, H, N, C, C]
    gamma = jnp.where(jnp.tril(jnp.ones(D.shape[-2:], bool)), jnp.exp(D), 0.0)
    w, u = gated_wy_representation(k, v, beta, G, gamma)
    to_end = jnp.swapaxes(D[..., -1:, :], -1, -2)  # [B, H, N, C, 1]: G_C - G_j
    states, new_values, final_state = gated_chunk_states(k * jnp.exp(to_end), w, u, jnp.exp(G[..., -1:, :]), h0)
    scores = jnp.tril(q @ jnp.swapaxes(k, -1, -2)) * gamma
    o = scale * ((q * jnp.exp(G)) @ states + scores @ new_values)
    return from_chunks(o, T).astype(dtype), (final_state if output_final_state else None)


def segment_sums(g: jax.Array) -> jax.Array:
    """D_tj = g_{j+1} + ... + g_t for j < t, else 0: the log decay from step j to step t within a chunk.

    Args:
        g: [..., C, 1] log decays of one chunk.

    Returns:
        [..., C, C]. Summed directly (a cumsum over t of the terms after j), not as G_t - G_j: once |G| is large
        the difference of two cumulative sums loses the small segments' digits (fp32 spacing at |G| = 64 is 8e-6).
    """
    C = g.shape[-2]
    after = jnp.arange(C)[:, None] > jnp.arange(C)[None, :]  # [i, j]: step i comes after j
    return jnp.cumsum(jnp.where(after, g, 0.0), axis=-2)


def gated_wy_representation(
    k: jax.Array, v: jax.Array, beta: jax.Array, G: jax.Array, gamma: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """w = T diag(beta exp(G)) K and u = T diag(beta) V with T = (I + strict_tril(diag(beta) K K^T * Gamma))^{-1}.

    Args:
        k: [..., C, K]; v: [..., C, V]; beta, G: [..., C, 1]; gamma: [..., C, C].

    Returns:
        w: [..., C, K]; u: [..., C, V].
    """
    K = k.shape[-1]
    kb = k * beta
    a = (kb @ jnp.swapaxes(k, -1, -2)) * gamma  # strictly lower part used; the solve ignores the rest
    rhs = jnp.concatenate([kb * jnp.exp(G), v * beta], axis=-1)
    wu = unit_lower_solve(a, rhs)
    return wu[..., :K], wu[..., K:]


def gated_chunk_states(
    k_decayed: jax.Array, w: jax.Array, u: jax.Array, chunk_decay: jax.Array, h0: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scan over chunks: U_n = u_n - w_n S_n,  S_{n+1} = exp(G_C) S_n + K~_n^T U_n  (K~ = diag(exp(G_C - G)) K).

    Args:
        k_decayed, w: [B, H, N, C, K]; u: [B, H, N, C, V]; chunk_decay: [B, H, N, 1, 1] exp(G_C); h0: [B, H, K, V].

    Returns:
        states: [B, H, N, K, V] (S_n before chunk n); new values U: [B, H, N, C, V]; final state [B, H, K, V].
    """

    def step(h, inputs):
        k_n, w_n, u_n, decay_n = inputs
        u_new = u_n - w_n @ h
        return decay_n * h + jnp.swapaxes(k_n, -1, -2) @ u_new, (h, u_new)

    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (k_decayed, w, u, chunk_decay))
    final_state, (states, new_values) = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(states, 0, 2), jnp.moveaxis(new_values, 0, 2), final_state
