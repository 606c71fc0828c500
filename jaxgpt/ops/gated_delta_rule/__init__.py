"""Gated delta rule (Gated DeltaNet) ops (FLA layout [B, T, H, D]) and the one dispatch between their backends:
'xla' is `chunk.chunk_gated_delta_rule_xla` (fp32, autodiff, any device), 'pallas' the fused GPU path
`pallas.chunk_gated_delta_rule_pallas` (interpreted off GPU: tests only)."""

import jax

from jaxgpt.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_xla
from jaxgpt.ops.gated_delta_rule.gate import gdn_gate
from jaxgpt.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from jaxgpt.ops.gated_delta_rule.pallas import chunk_gated_delta_rule_pallas
from jaxgpt.ops.utils import check_shapes, resolve_backend

__all__ = ["chunk_gated_delta_rule", "gdn_gate", "naive_recurrent_gated_delta_rule"]


def chunk_gated_delta_rule(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float | None = None,
    initial_state: jax.Array | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[jax.Array, jax.Array | None]:
    """FLA 0.6.0's `chunk_gated_delta_rule` for the options Gated DeltaNet uses (g already in log space, beta
    already through its sigmoid, equal numbers of q/k and v heads, state [K, V]).

        S_t = exp(g_t) S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - (exp(g_t) S_{t-1})^T k_t),   o_t = scale S_t^T q_t

    Args:
        q, k: [B, T, H, K] queries and keys.
        v: [B, T, H, V] values.
        g: [B, T, H] log decays (e.g. `gdn_gate`'s output).
        beta: [B, T, H] write strengths.
        scale: score scale; defaults to K ** -0.5.
        initial_state: [B, H, K, V] state, or None for zeros.
        output_final_state: whether to return the final state.
        use_qk_l2norm_in_kernel: L2-normalise q and k first (FLA's flag; eps 1e-6 inside the sqrt).
        chunk_size: steps per chunk, a power of two; any T works (padded internally).
        backend: 'auto' | 'xla' | 'pallas' (`jaxgpt.ops.utils.resolve_backend`: 'auto' is pallas on GPU, xla
            elsewhere).

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32, or None.
    """
    check_arguments(q, k, v, g, beta, initial_state, chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, chunk_size)
    if resolve_backend(backend) == "pallas":
        return chunk_gated_delta_rule_pallas(*args)
    return chunk_gated_delta_rule_xla(*args)


def check_arguments(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    initial_state: jax.Array | None,
    chunk_size: int,
) -> None:
    """One-line ValueError for shapes that do not fit together or a chunk size that is not a power of two."""
    if not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size!r}")
    check_shapes(q, k, v, initial_state, per_head={"g": g, "beta": beta})
