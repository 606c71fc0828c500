"""Gated delta rule for GPUs: the delta rule's chunked WY kernels (`jaxgpt/ops/delta_rule/pallas.py`) run with a
per-head scalar decay, a hand-written backward (`jax.custom_vjp`), every per-chunk step in Pallas (Triton).

Per chunk of C steps, with G_i = g_1 + ... + g_i the cumulative log decay from the chunk's start (fp32; `chunk_cumsum`,
an XLA cumsum outside the kernels, whose autodiff turns the kernels' dL/dG into dg by a reverse cumulative sum):

forward
    A   = strict_tril(diag(beta) K K^T * exp(G_i - G_j))     T = (I + A)^{-1}
    W   = T diag(beta exp(G)) K                                U = T diag(beta) V
    V'_n = U_n - W_n S_n,   S_{n+1} = exp(G_last) S_n + K_n^T diag(exp(G_last - G)) V'_n
    O   = scale (diag(exp(G)) Q S_n + (tril(Q K^T) * exp(G_i - G_j)) V')
backward: the delta rule's, each product with the same decay factors, plus
    dL/dG_i = q_i . dq_i - k_i . dk_i (the state and intra-chunk parts of dk)            (`_dqkw`)
              + [i = last] (exp(G_last) <S_n, dS_{n+1}> + sum_j k_j . dk_state_j)
              + beta_i exp(G_i) k_i . (T^T dW)_i + rowsum(dA * A)_i - colsum(dA * A)_i   (`_wy_bwd`)

Same kernels, grids, tiling and precision rules as the delta rule (see that module and docs/kernels-gated-deltanet.md):
operands in the inputs' dtype with fp32 accumulation, T and the running state and its gradient in fp32, the gate and
every decay factor in fp32. L2 norm, padding and the gate's cumsum stay outside the custom_vjp (XLA autodiff).

Inputs the kernels do not take run `chunk_gated_delta_rule_xla` instead (`kernels_take`): head dims that are not
powers of two in [16, 256], chunk sizes other than 16, 32, 64, dtypes other than bf16 / fp16 / fp32 or mixed ones,
and T = 0.
"""

import functools

import jax
import jax.numpy as jnp

from jaxgpt.ops.delta_rule.pallas import (CHUNK_SIZES, DTYPES, F32, HEAD_DIMS, Options, chunk_bwd, chunk_cumsum,
                                          chunk_fwd, default_block_v)
from jaxgpt.ops.gated_delta_rule.chunk import chunk_gated_delta_rule_xla
from jaxgpt.ops.l2norm import l2norm
from jaxgpt.ops.utils import pad_time


def chunk_gated_delta_rule_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    g: jax.Array,
    beta: jax.Array,
    scale: float,
    initial_state: jax.Array | None,
    output_final_state: bool,
    use_qk_l2norm_in_kernel: bool,
    chunk_size: int,
    block_v: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """`chunk_gated_delta_rule` on the fast path; arguments as there (q, k [B, T, H, K], v [B, T, H, V], g and beta
    [B, T, H], initial_state [B, H, K, V]); inputs the kernels do not take (`kernels_take`) run the XLA path.

    block_v: state columns per recurrence program (a power of 2 >= 16 dividing V); None: the delta rule's heuristic.
    Off GPU the kernels run in Pallas's interpreter (slow; for tests).

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32, or None.
    """
    args = (q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, chunk_size)
    if not kernels_take(q, k, v, chunk_size):
        return chunk_gated_delta_rule_xla(*args)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if block_v is None:
        block_v = default_block_v(B * H, V)
    if block_v < 16 or block_v & (block_v - 1) or V % block_v:
        raise ValueError(f"block_v must be a power of two >= 16 dividing V={V}, got {block_v}")
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    gate = chunk_cumsum(g, chunk_size)
    q, k, v, beta = (pad_time(x, chunk_size) for x in (q, k, v, beta))
    h0 = jnp.zeros((B, H, K, V), F32) if initial_state is None else initial_state.astype(F32)
    options = Options(scale, chunk_size, block_v, "pallas", jax.default_backend() != "gpu")
    o, final_state = gated_delta_rule(q, k, v, gate, beta, h0, options)
    return o[:, :T], (final_state if output_final_state else None)


def kernels_take(q: jax.Array, k: jax.Array, v: jax.Array, chunk_size: int) -> bool:
    """Whether the kernels run these inputs (q, k [B, T, H, K], v [B, T, H, V]); else the XLA path does."""
    dtypes = {x.dtype for x in (q, k, v)}
    return (len(dtypes) == 1 and dtypes.pop() in DTYPES and q.shape[-1] in HEAD_DIMS and v.shape[-1] in HEAD_DIMS
            and chunk_size in CHUNK_SIZES and q.shape[1] > 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def gated_delta_rule(q, k, v, gate, beta, h0, options: Options):
    """Chunked gated delta rule on time-padded inputs.

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; gate: G [B, T, H] fp32 (`chunk_cumsum`); beta: [B, T, H];
        h0: [B, H, K, V] fp32 (T a multiple of options.chunk).

    Returns:
        o: [B, T, H, V] in q's dtype; final state [B, H, K, V] fp32.
    """
    return chunk_fwd(q, k, v, beta, gate, h0, options)[0]


def gated_delta_rule_fwd(q, k, v, gate, beta, h0, options: Options):
    return chunk_fwd(q, k, v, beta, gate, h0, options)


def gated_delta_rule_bwd(options: Options, residuals, cotangents):
    dq, dk, dv, dbeta, dgate, dh0 = chunk_bwd(options, residuals, cotangents)
    return dq, dk, dv, dgate, dbeta, dh0


gated_delta_rule.defvjp(gated_delta_rule_fwd, gated_delta_rule_bwd)
