"""Reference scalar-decay linear attention ("simple GLA"): the plain recurrence, fp32, one `lax.scan` step per time
step."""

import jax
import jax.numpy as jnp

from jaxgpt.ops.utils import accumulation_dtype


def naive_recurrent_simple_gla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None = None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Simple GLA by recurrence over time (what `fla.ops.simple_gla.naive.naive_recurrent_simple_gla` computes).

        S_t = exp(g_t) S_{t-1} + k_t v_t^T        S_t: [K, V], g_t a scalar per head
        o_t = scale * S_t^T q_t

    Args:
        q, k: [B, T, H, K] queries and keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log-space decays (<= 0), one per head and step; None: no decay (plain linear attention).
        scale: score scale; defaults to K ** -0.5.
        initial_state: [B, H, K, V] state S_0, or None for zeros.
        output_final_state: whether to return S_T.

    Returns:
        o: [B, T, H, V] in q's dtype; S_T: [B, H, K, V] fp32, or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    if g is None:
        g = jnp.zeros((B, T, H), acc)
    q, k, v, g = (jnp.moveaxis(x.astype(acc), 1, 0) for x in (q, k, v, g))  # [T, B, H, ...]
    h0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)

    def step(h, inputs):
        q_t, k_t, v_t, g_t = inputs
        h = h * jnp.exp(g_t)[..., None, None] + k_t[..., None] * v_t[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, h)
        return h, o_t

    h, o = jax.lax.scan(step, h0, (q, k, v, g))
    return jnp.moveaxis(o, 0, 1).astype(dtype), (h if output_final_state else None)
