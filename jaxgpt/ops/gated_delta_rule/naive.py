"""Reference gated delta rule (Gated DeltaNet): the plain recurrence, fp32, one `lax.scan` step per time step."""

import jax
import jax.numpy as jnp

from jaxgpt.ops.l2norm import l2norm
from jaxgpt.ops.utils import accumulation_dtype


def naive_recurrent_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Gated delta rule by recurrence over time (FLA's `naive_recurrent_gated_delta_rule`, arguments in the order
    of `chunk_gated_delta_rule`):

        S'_t = exp(g_t) S_{t-1}                            S_t: [K, V]
        u_t  = beta_t (v_t - S'_t^T k_t)
        S_t  = S'_t + k_t u_t^T
        o_t  = scale * S_t^T q_t

    Args:
        q, k: [B, T, H, K] queries and keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log decays (<= 0 for a decaying state).
        beta: [B, T, H] write strengths.
        scale: score scale; defaults to K ** -0.5.
        initial_state: [B, H, K, V] state S_0, or None for zeros.
        output_final_state: whether to return S_T.
        use_qk_l2norm_in_kernel: L2-normalise q and k first (FLA's flag; eps 1e-6 inside the sqrt).

    Returns:
        o: [B, T, H, V] in q's dtype; S_T: [B, H, K, V] fp32, or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    dtype, acc = q.dtype, accumulation_dtype(q.dtype)
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    q, k, v, g, beta = (jnp.moveaxis(x.astype(acc), 1, 0) for x in (q, k, v, g, beta))  # time first
    h0 = jnp.zeros((B, H, K, V), acc) if initial_state is None else initial_state.astype(acc)

    def step(h, inputs):
        q_t, k_t, v_t, g_t, beta_t = inputs
        h = h * jnp.exp(g_t)[..., None, None]
        u_t = beta_t[..., None] * (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, h))
        h = h + k_t[..., None] * u_t[..., None, :]
        o_t = jnp.einsum("bhk,bhkv->bhv", q_t * scale, h)
        return h, o_t

    h, o = jax.lax.scan(step, h0, (q, k, v, g, beta))
    return jnp.moveaxis(o, 0, 1).astype(dtype), (h if output_final_state else None)
