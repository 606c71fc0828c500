"""Chunked scalar-decay linear attention ("simple GLA"): exact within chunks, a `lax.scan` over chunks carries the
state.

Notation for one chunk of C steps starting from state S (all in fp32), per head:
    G_t = sum_{s <= t} g_s                               cumulative log-decay, relative to the chunk start
    o_t = scale * [ exp(G_t) q_t^T S + sum_{j <= t} exp(G_t - G_j) (q_t . k_j) v_j ]
    S'  = exp(G_C) S + sum_j exp(G_C - G_j) k_j v_j^T
The decay is one scalar per head and step, so the intra-chunk decay matrix exp(G_t - G_j) is [C, C] per head and
multiplies the plain scores q k^T: no per-key-dimension pairwise term and no sub-chunks, unlike GLA
(jaxgpt/ops/gla/chunk.py). Every exponent is <= 0 for log decays g <= 0 (the upper triangle, where G_t - G_j > 0,
is masked to -inf before the exp), so nothing overflows however strong the decay. With g = None (no decay) the
decay factors are dropped altogether.
"""

import jax
import jax.numpy as jnp

from jaxgpt.ops.simple_gla import pallas
from jaxgpt.ops.utils import accumulation_dtype, check_shapes, from_chunks, pad_time, resolve_backend, to_chunks


def chunk_simple_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """Simple GLA in chunked form; same math and API as `naive_recurrent_simple_gla` (and FLA's `chunk_simple_gla`).

    Args:
        q, k: [B, T, H, K] queries and keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decays (<= 0), one scalar per head and step; None: no decay (linear attention).
        scale: score scale; defaults to K ** -0.5.
        initial_state: [B, H, K, V] state, or None for zeros.
        output_final_state: whether to return the final state.
        chunk_size: steps per chunk; any T works (padded internally with zero inputs / zero log-decays).
        backend: 'auto' | 'xla' | 'pallas' (see jaxgpt.ops.utils.resolve_backend). 'pallas' runs the delta rule's
            chunk kernels without the WY step (`pallas.py`: head dims up to 256, chunk_size 16, 32 or 64; inputs
            the kernels do not take run 'xla'); 'xla' is this module's chunked form, differentiated by JAX; 'auto'
            is 'pallas' on GPU for the chunk sizes the kernels take, else 'xla'.

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32, or None.
    """
    check_shapes(q, k, v, initial_state, per_head={"g": g})
    impl = resolve_backend(backend)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if impl == "pallas" and (chunk_size in pallas.CHUNK_SIZES or backend == "pallas"):
        if chunk_size not in pallas.CHUNK_SIZES:
            raise ValueError(f"the pallas backend takes chunk_size in {pallas.CHUNK_SIZES}, got {chunk_size}")
        if pallas.kernels_take(q, k, v):
            return pallas.chunk_simple_gla_pallas(q, k, v, g, scale, initial_state, output_final_state, chunk_size)
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    q, k, v = (to_chunks(pad_time(x.astype(acc), chunk_size), chunk_size) for x in (q, k, v))
    q = q * scale
    h0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    scores = q @ jnp.swapaxes(k, -1, -2)  # [B, H, N, C, C]
    if g is None:
        states, final_state = chunk_states(k, v, None, h0)
        o = q @ states + jnp.where(causal, scores, 0.0) @ v
    else:
        G = jnp.cumsum(to_chunks(pad_time(g.astype(acc)[..., None], chunk_size), chunk_size)[..., 0], axis=-1)
        states, final_state = chunk_states(k, v, G, h0)  # G: [B, H, N, C]
        decay = jnp.exp(jnp.where(causal, G[..., :, None] - G[..., None, :], -jnp.inf))  # [B, H, N, C, C]
        o = (q * jnp.exp(G)[..., None]) @ states + (scores * decay) @ v
    return from_chunks(o, T).astype(dtype), (final_state if output_final_state else None)


def chunk_states(k: jax.Array, v: jax.Array, G: jax.Array | None, h0: jax.Array) -> tuple[jax.Array, jax.Array]:
    """State entering every chunk, and the final state.

    S_{n+1} = exp(G_{n,C}) S_n + (k_n * exp(G_{n,C} - G_n))^T v_n

    Args:
        k: [B, H, N, C, K]; v: [B, H, N, C, V]; G: [B, H, N, C] chunk-local cumulative log-decays, or None (no
            decay).
        h0: [B, H, K, V].

    Returns:
        states: [B, H, N, K, V] (S_n before chunk n); final state [B, H, K, V].
    """
    if G is None:
        kv = jnp.einsum("bhnck,bhncv->nbhkv", k, v)
        decay = jnp.ones(kv.shape[:3] + (1, 1), kv.dtype)
    else:
        G_last = G[..., -1:]  # [B, H, N, 1]
        kv = jnp.einsum("bhnck,bhncv->nbhkv", k * jnp.exp(G_last - G)[..., None], v)
        decay = jnp.moveaxis(jnp.exp(G_last), 2, 0)[..., None]  # [N, B, H, 1, 1]

    def step(h, inputs):
        decay_n, kv_n = inputs
        return decay_n * h + kv_n, h

    final_state, states = jax.lax.scan(step, h0, (decay, kv))
    return jnp.moveaxis(states, 0, 2), final_state

