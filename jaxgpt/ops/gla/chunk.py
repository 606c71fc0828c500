"""Chunked Gated Linear Attention: exact within chunks, a `lax.scan` over chunks carries the state.

Notation for one chunk of C steps starting from state S (all in fp32):
    G_t = sum_{s <= t} gk_s                               cumulative log-gate, relative to the chunk start
    o_t = scale * [ (q_t * exp(G_t))^T S + sum_{j <= t} (sum_k q_tk k_jk exp(G_tk - G_jk)) v_j ]
    S'  = diag(exp(G_C)) S + sum_j (k_j * exp(G_C - G_j)) v_j^T
Every exponent above is <= 0 for log forget gates (gk <= 0), so nothing overflows however strong the gates.
The intra-chunk scores exp(G_t - G_j) are split into sub-chunks of 16 steps (as FLA does): between sub-chunks a
and b < a the factor is exp(G_t - n_a) * exp(n_a - G_j) with n_a the G of a's first step (both factors <= 1);
within a sub-chunk it is formed pairwise per key dimension.
"""

import jax
import jax.numpy as jnp

from jaxgpt.ops.gla import pallas
from jaxgpt.ops.utils import accumulation_dtype, check_shapes, from_chunks, pad_time, resolve_backend, to_chunks


def chunk_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    gk: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    sub_chunk_size: int = 16,
    backend: str = "auto",
    *,
    state_block: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """GLA in chunked form; same math and API as `naive_recurrent_gla` (and FLA's `chunk_gla`).

    Args:
        q, k: [B, T, H, K] queries and keys.
        v: [B, T, H, V] values.
        gk: [B, T, H, K] log-space forget gates (<= 0), one per key dimension.
        scale: score scale; defaults to K ** -0.5.
        initial_state: [B, H, K, V] state, or None for zeros.
        output_final_state: whether to return the final state.
        chunk_size: steps per chunk; any T works (padded internally with zero inputs / zero log-gates).
        sub_chunk_size: sub-chunk length for the intra-chunk scores; must divide chunk_size.
        backend: 'auto' | 'xla' | 'pallas' (see jaxgpt.ops.utils.resolve_backend). 'pallas' runs the fused GPU
            kernels of jaxgpt.ops.gla.pallas (head dims up to 256, the default chunk sizes); 'xla' is this module's
            chunked form, differentiated by JAX; 'auto' is 'pallas' on GPU for the head dims and chunk sizes the
            kernels take, else 'xla'.
        state_block: the pallas state kernels' tile (`pallas.chunk_gla_pallas`; None: its heuristic). The xla
            path ignores it.

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32, or None.
    """
    check_shapes(q, k, v, initial_state, per_key={"gk": gk})
    impl = resolve_backend(backend)
    fits = pallas.supported(q.shape[-1], v.shape[-1]) and (chunk_size, sub_chunk_size) == (pallas.CHUNK, pallas.SUB)
    if impl == "pallas" and (fits or backend == "pallas"):
        if (chunk_size, sub_chunk_size) != (pallas.CHUNK, pallas.SUB):
            raise ValueError(f"the pallas backend uses chunk_size={pallas.CHUNK}, sub_chunk_size={pallas.SUB}")
        return pallas.chunk_gla_pallas(q, k, v, gk, scale, initial_state, output_final_state,
                                       state_block=state_block)
    if chunk_size % sub_chunk_size:
        raise ValueError(f"sub_chunk_size {sub_chunk_size} must divide chunk_size {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    q, k, v, gk = (to_chunks(pad_time(x.astype(acc), chunk_size), chunk_size) for x in (q, k, v, gk))
    q = q * scale
    g = jnp.cumsum(gk, axis=-2)  # G: [B, H, N, C, K]
    h0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)

    states, final_state = chunk_states(k, v, g, h0)
    scores = intra_chunk_scores(q, k, g, sub_chunk_size)
    o = jnp.einsum("bhnck,bhnkv->bhncv", q * jnp.exp(g), states) + scores @ v
    return from_chunks(o, T).astype(dtype), (final_state if output_final_state else None)


def chunk_states(k: jax.Array, v: jax.Array, g: jax.Array, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """State entering every chunk, and the final state.

    S_{n+1} = diag(exp(G_{n,C})) S_n + (k_n * exp(G_{n,C} - G_n))^T v_n

    Args:
        k: [B, H, N, C, K]; v: [B, H, N, C, V]; g: [B, H, N, C, K] chunk-local cumulative log-gates.
        h0: [B, H, K, V].

    Returns:
        states: [B, H, N, K, V] (S_n before chunk n); final state [B, H, K, V].
    """
    g_last = g[..., -1:, :]  # [B, H, N, 1, K]
    kv = jnp.einsum("bhnck,bhncv->nbhkv", k * jnp.exp(g_last - g), v)
    decay = jnp.moveaxis(jnp.exp(g_last[..., 0, :]), 2, 0)[..., None]  # [N, B, H, K, 1]

    def step(h, inputs):
        decay_n, kv_n = inputs
        return decay_n * h + kv_n, h

    final_state, states = jax.lax.scan(step, h0, (decay, kv))
    return jnp.moveaxis(states, 0, 2), final_state


def intra_chunk_scores(q: jax.Array, k: jax.Array, g: jax.Array, sub_chunk_size: int) -> jax.Array:
    """Causal gated scores A[t, j] = sum_k q_tk k_jk exp(G_tk - G_jk) for j <= t, else 0.

    Args:
        q, k, g: [..., C, K] (q already scaled; g chunk-local cumulative log-gates).
        sub_chunk_size: S; C = M * S.

    Returns:
        [..., C, C] lower-triangular scores.
    """
    *lead, C, K = q.shape
    S = sub_chunk_size
    M = C // S
    q, k, g = (x.reshape(*lead, M, S, K) for x in (q, k, g))

    # Across sub-chunks (b < a): exp(G_t - n_a) * exp(n_a - G_j), n_a = G at the first step of sub-chunk a.
    n = g[..., :1, :]  # [..., M, 1, K]
    q_rel = q * jnp.exp(g - n)
    earlier = jnp.tril(jnp.ones((M, M), bool), -1)[:, :, None, None]  # [a, b, 1, 1]: b < a
    k_gap = jnp.where(earlier, n[..., :, None, :, :] - g[..., None, :, :, :], -jnp.inf)  # [..., a, b, S, K]
    across = jnp.einsum("...atk,...abjk->...atbj", q_rel, k[..., None, :, :, :] * jnp.exp(k_gap))

    # Within a sub-chunk (j <= t): pairwise exp(G_t - G_j) per key dimension.
    causal = jnp.tril(jnp.ones((S, S), bool))[:, :, None]  # [t, j, 1]
    gap = jnp.where(causal, g[..., :, None, :] - g[..., None, :, :], -jnp.inf)  # [..., M, t, j, K]
    within = jnp.einsum("...tk,...tjk,...jk->...tj", q, jnp.exp(gap), k)  # [..., M, S, S]
    diagonal = jnp.einsum("...atj,ab->...atbj", within, jnp.eye(M, dtype=within.dtype))

    return (across + diagonal).reshape(*lead, C, C)
