"""Simple GLA on the GPU through the fused GLA kernels (jaxgpt/ops/gla/pallas.py).

A scalar decay g [B, T, H] is GLA's per-key gate gk [B, T, H, K] with all K entries equal, so the GLA kernels
compute simple GLA exactly once g is broadcast along K (zeros for no decay). The broadcast's transpose sums the
kernels' gate gradient dgk over K into dg. This costs the GLA kernels' per-key-dimension decay work, which a
scalar-specialised kernel (one [C, C] decay matrix per head and chunk) would skip: docs/kernels-simple-gla.md.
"""

import jax
import jax.numpy as jnp

from jaxgpt.ops.gla import pallas as gla_pallas

CHUNK = gla_pallas.CHUNK  # the kernels' chunk size
supported = gla_pallas.supported  # head dims the kernels take

__all__ = ["CHUNK", "chunk_simple_gla_pallas", "supported"]


def chunk_simple_gla_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Simple GLA with the GLA Pallas kernels; arguments and results as `chunk_simple_gla` (q, k [B, T, H, K],
    v [B, T, H, V], g [B, T, H] or None, initial_state [B, H, K, V]; returns o [B, T, H, V] in q's dtype and the
    fp32 final state or None). `interpret=True` runs the kernels in Pallas interpret mode (any device; tests)."""
    gk = jnp.zeros(q.shape, jnp.float32) if g is None else jnp.broadcast_to(g.astype(jnp.float32)[..., None], q.shape)
    return gla_pallas.chunk_gla_pallas(q, k, v, gk, scale, initial_state, output_final_state, interpret)
