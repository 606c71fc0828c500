"""Simple GLA on the GPU: the delta rule's chunk kernels (`jaxgpt/ops/delta_rule/pallas.py`) without the WY step.

Simple GLA is the gated delta rule with W = 0 and U = V (nothing is subtracted before a write), so per chunk of C
steps, with G_i the cumulative log decay from the chunk's start (`chunk_cumsum`, in XLA outside the kernels):

forward   S_{n+1} = exp(G_last) S_n + K_n^T diag(exp(G_last - G)) V_n                         `_state_fwd`
          O = scale (diag(exp(G)) Q S_n + (tril(Q K^T) * exp(G_i - G_j)) V)                      `_output_fwd`
backward  dV = scale (triu(K Q^T) * exp(G_i - G_j)) dO + diag(exp(G_last - G)) K dS_{n+1}      `_dv_local`,
          dS_n = exp(G_last) dS_{n+1} + scale (diag(exp(G)) Q)^T dO                               `_state_bwd`
          dQ, dK, dL/dG_i = q_i . dq_i - k_i . dk_i (+ the carried state's term at a last row)     `_dqkw`

Without a decay (linear attention) the kernels run their ungated code. The decay is one [C, C] matrix per head and
chunk, so the intra-chunk scores are one product Q K^T (no per-key-dimension decay as in GLA). Head dims that are
not powers of two in [16, 256] are zero-padded to one (exact: zero key and query columns add nothing, zero value
columns are sliced off); dtypes the kernels do not take, mixed dtypes, and head dims over 256 run the XLA path.
"""

import functools

import jax
import jax.numpy as jnp

from jaxgpt.ops.delta_rule.pallas import (CHUNK_SIZES, DTYPES, F32, HEAD_DIMS, Options, chunk_cumsum, default_block_v,
                                          dqkw_bwd, dv_local_bwd, output_fwd, state_bwd, state_fwd)
from jaxgpt.ops.utils import pad_time, pad_trailing, pow2_dim

__all__ = ["CHUNK_SIZES", "chunk_simple_gla_pallas", "kernels_take"]


def kernels_take(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether the kernels run these inputs (q, k [B, T, H, K], v [B, T, H, V]), head dims padded; else XLA does."""
    dtypes = {x.dtype for x in (q, k, v)}
    return (len(dtypes) == 1 and dtypes.pop() in DTYPES and max(q.shape[-1], v.shape[-1]) <= HEAD_DIMS[-1]
            and q.shape[1] > 0)


def chunk_simple_gla_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array | None,
    scale: float,
    initial_state: jax.Array | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array | None]:
    """Simple GLA through the kernels; arguments as `chunk_simple_gla` (q, k [B, T, H, K], v [B, T, H, V], g
    [B, T, H] log decays or None, initial_state [B, H, K, V]); chunk_size in CHUNK_SIZES; the caller checks
    `kernels_take`. Off GPU the kernels run in Pallas's interpreter (slow; for tests).

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32, or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    Kp, Vp = pow2_dim(K), pow2_dim(V)
    h0 = jnp.zeros((B, H, Kp, Vp), F32) if initial_state is None else pad_trailing(initial_state.astype(F32), Kp, Vp)
    q, k = (pad_trailing(pad_time(x, chunk_size), Kp) for x in (q, k))
    v = pad_trailing(pad_time(v, chunk_size), Vp)
    gate = None if g is None else chunk_cumsum(g, chunk_size)
    options = Options(scale, chunk_size, default_block_v(B * H, Vp), "pallas", jax.default_backend() != "gpu")
    o, final_state = simple_gla(q, k, v, gate, h0, options)
    return o[:, :T, :, :V], (final_state[:, :, :K, :V] if output_final_state else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def simple_gla(q, k, v, gate, h0, options: Options):
    """Chunked simple GLA on time- and head-dim-padded inputs.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; gate: G [B, T, H] fp32 (`chunk_cumsum`) or None (no decay);
        h0: [B, H, K, V] fp32 (T a multiple of options.chunk; K, V in HEAD_DIMS).

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32.
    """
    return simple_gla_fwd(q, k, v, gate, h0, options)[0]


def simple_gla_fwd(q, k, v, gate, h0, options: Options):
    states, _, final_state = state_fwd(k, None, v, h0, options, gate)
    o = output_fwd(q, k, states, v, options, gate)
    return (o, final_state), (q, k, v, gate, states)


def simple_gla_bwd(options: Options, residuals, cotangents):
    q, k, v, gate, states = residuals
    do, dht = cotangents
    do = do.astype(q.dtype)
    dv_local = dv_local_bwd(q, k, do, options, gate)
    dstates, dv, dh0 = state_bwd(q, k, None, do, dv_local, dht.astype(F32), options, gate)
    dq, dk, _, dgate = dqkw_bwd(q, k, v, do, states, dstates, dv, options, gate, wy=False)
    return dq, dk, dv, None if gate is None else jnp.sum(dgate, axis=0), dh0


simple_gla.defvjp(simple_gla_fwd, simple_gla_bwd)
