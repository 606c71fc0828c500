"""The Gated DeltaNet decay gate (FLA's `use_gate_in_kernel=True`), computed in fp32.

    g = -exp(A_log) * softplus(a + dt_bias)

with softplus(x) = x above 20 and log(1 + exp(x)) otherwise (the threshold of FLA's kernels and of PyTorch's
`F.softplus`). g is the per-step log decay: the state is multiplied by exp(g) <= 1 before each write.
"""

import jax
import jax.numpy as jnp

SOFTPLUS_THRESHOLD = 20.0


def softplus(x: jax.Array) -> jax.Array:
    """log(1 + exp(x)), and x itself above the threshold (exp is clamped there, so the unused branch stays finite)."""
    return jnp.where(x > SOFTPLUS_THRESHOLD, x, jnp.log1p(jnp.exp(jnp.minimum(x, SOFTPLUS_THRESHOLD))))


def gdn_gate(a: jax.Array, A_log: jax.Array, dt_bias: jax.Array | None = None) -> jax.Array:
    """Log decays g = -exp(A_log) * softplus(a + dt_bias), every operand in fp32.

    Args:
        a: [..., H] gate logits (the layer's a_proj output).
        A_log: [H] log decay rates.
        dt_bias: [H] or None.

    Returns:
        g: [..., H] fp32.
    """
    x = a.astype(jnp.float32)
    if dt_bias is not None:
        x = x + dt_bias.astype(jnp.float32)
    return -jnp.exp(A_log.astype(jnp.float32)) * softplus(x)
