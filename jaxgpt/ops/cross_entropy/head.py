"""The LM head and the statistics of its logits as one custom VJP: the backward never touches the [N, V] logits except
through its two matmuls.

    logits   z = h @ w.T                             [N, V] in h's dtype (one matmul, as the plain head)
    forward  lse, z_target, z_mean of z               [N] fp32 each; every loss of jaxgpt.losses is a function of them
             (the [N, V] pass: reference.softmax_stats_xla or pallas.softmax_stats_pallas, which also leave the
             unnormalised softmax e = exp(z - max) and sum_exp, so softmax = e / sum_exp, as the residual)
    backward with cotangents g_lse, g_t, g_mean [N]:  dz = g_lse * softmax + g_t * onehot(target) + g_mean / V, never
             formed: with a = g_lse / sum_exp and u = g_mean / V,
                 dh = a * (e @ w) + g_t * w[target] + u * sum_v w[v]
                 dw = e.T @ (a * h) + scatter-add over the targets of g_t * h + sum_n u_n h_n (in every row)
The row scalings are on [N, C] tensors; the matmuls take e and h, w in h's dtype with fp32 accumulation and output.
The mean terms are skipped when z_mean is unused (a symbolic-zero cotangent): only label smoothing needs them.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jaxgpt.ops.cross_entropy.reference import SoftmaxStats, softmax_stats_xla
from jaxgpt.ops.cross_entropy.pallas import softmax_stats_pallas

f32 = jnp.float32


def _softmax_stats(logits: jax.Array, targets: jax.Array, kernel: str) -> SoftmaxStats:
    if kernel == "xla":
        return softmax_stats_xla(logits, targets)
    return softmax_stats_pallas(logits, targets, interpret=kernel == "pallas_interpret")


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def lm_head_stats(h: jax.Array, w: jax.Array, targets: jax.Array, kernel: str) -> tuple[jax.Array, ...]:
    """(lse, z_target, z_mean) [N] fp32 of the logits h @ w.T.   h [N, C], w [V, C] (cast to h's dtype), targets [N]
    int; kernel 'xla', 'pallas' or 'pallas_interpret' (Pallas's interpreter, tests)."""
    stats = _softmax_stats(h @ w.astype(h.dtype).T, targets, kernel)
    return stats.lse, stats.z_target, stats.z_mean


def _fwd(h, w, targets, kernel):
    h, w, targets = h.value, w.value, targets.value  # CustomVJPPrimal (symbolic_zeros=True)
    stats = _softmax_stats(h @ w.astype(h.dtype).T, targets, kernel)
    return (stats.lse, stats.z_target, stats.z_mean), (stats.e, stats.sum_exp, h, w, targets)


def _bwd(kernel, residuals, cotangents):
    e, sum_exp, h, w, targets = residuals
    g_lse, g_t, g_mean = cotangents
    g_lse, g_t = (jnp.zeros_like(sum_exp) if isinstance(g, SymbolicZero) else g for g in (g_lse, g_t))
    wc = w.astype(h.dtype)
    a = g_lse / sum_exp  # g_lse * softmax = a * e
    dh = a[:, None] * jnp.dot(e, wc, preferred_element_type=f32) + g_t[:, None] * wc[targets].astype(f32)
    ah = (a[:, None] * h.astype(f32)).astype(h.dtype)
    dw = jax.lax.dot_general(e, ah, (((0,), (0,)), ((), ())), preferred_element_type=f32)  # e.T @ (a * h)
    dw = dw.at[targets].add(g_t[:, None] * h.astype(f32))
    if not isinstance(g_mean, SymbolicZero):
        u = g_mean / e.shape[1]
        dh = dh + u[:, None] * wc.astype(f32).sum(0)
        dw = dw + (u[:, None] * h.astype(f32)).sum(0)
    return dh.astype(h.dtype), dw.astype(w.dtype), None


lm_head_stats.defvjp(_fwd, _bwd, symbolic_zeros=True)
