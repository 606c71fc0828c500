"""Loss axis (the benchmark's `compute_loss`). Training losses only: evaluation is always plain CE.

Most losses are functions of three per-token statistics of the logits z [..., V] (`LogitStats`, fp32 [...] each):
lse = logsumexp_v z, z_target = z[target] and z_mean = mean_v z (label smoothing). `Loss` pairs that function with
the logits it is taken of: from the logits (`Loss.__call__(logits, targets)`, through `logit_stats`), or, where the
loss needs no transform of the logits, straight from the LM head (GPT.loss: jaxgpt.ops.cross_entropy.head_stats, which
never forms the logits' gradient). A loss that needs more of the distribution than these statistics (its entropy,
say) is a function of the full logits instead (`Loss.of_logits`): the model materialises the logits for it.
`OUTPUT_TRANSFORMS` holds the loss variants whose logit transform is part of the model output (also at eval): those
take the logits path too.
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgpt.spec.constants import (
    LABEL_SMOOTHING,
    LOGIT_CAP,
    SIGMOID_CAP_SCALE,
    TANH_CAP_SMOOTHING,
    Z_WEIGHT,
)


class LogitStats(NamedTuple):
    """Per-token statistics of logits z [..., V], fp32 [...] each."""

    lse: jax.Array  # logsumexp_v z
    z_target: jax.Array  # z[target]
    z_mean: jax.Array  # mean_v z


def logit_stats(logits: jax.Array, targets: jax.Array) -> LogitStats:
    """LogitStats of logits [..., V] (any dtype) and int targets [...]. lse and z_target through `lse_and_target`'s
    custom VJP; z_mean by autodiff (unused, it costs nothing: XLA drops it and its gradient is a symbolic zero)."""
    lse, z_target = lse_and_target(logits, targets)
    return LogitStats(lse, z_target, logits.astype(jnp.float32).mean(-1))


@jax.custom_vjp
def lse_and_target(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """lse = logsumexp(z) and z_target = z[target], fp32 [B, T] each, from logits z [B, T, V] of any dtype.

    The logits path of `logit_stats`. The custom VJP keeps the [B, T, V] work to fused passes over the logits in
    their own dtype: fp32 reductions forward (for 16-bit logits one, `online_max_sum_exp`; for fp32 logits two,
    `two_pass_max_sum_exp`), and backward dz = g_lse * softmax(z) + g_target * onehot(target), written straight in
    the logits' dtype. Plain autodiff would materialise the fp32 logits and their fp32 softmax.
    """
    return _lse_and_target(logits, targets)[:2]


def _lse_and_target(logits, targets):
    z_target = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0].astype(jnp.float32)
    max_sum_exp = two_pass_max_sum_exp if jnp.finfo(logits.dtype).bits >= 32 else online_max_sum_exp
    z_max, sum_exp = max_sum_exp(logits)  # fp32 inside the reductions; the gather above takes the raw logits
    return (z_max + jnp.log(sum_exp))[..., 0], z_target, z_max, sum_exp


def two_pass_max_sum_exp(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`online_max_sum_exp` as two reductions (two reads of z), for fp32 logits, where accuracy comes first.

    The online pair's accuracy depends on the backend's reduction order: XLA's CPU loop for the variadic reduce
    keeps one sequential accumulator per row, and at V = 50304 (N(0, 1) rows) its sum_exp is off by ~2.5e-6
    relative on average against ~3e-8 here. The backward's softmax = exp(z - max) / sum_exp carries that into
    every gradient: enough to take a scalar gate's ill-conditioned fp32 gradient past parity_tests' 1e-5 bound
    (rmsnorm_parallel_gated, 1.1e-5). For 16-bit logits such errors are far below the logits' own rounding.
    """
    z = z.astype(jnp.float32)
    z_max = z.max(-1, keepdims=True)
    return z_max, jnp.exp(z - z_max).sum(-1, keepdims=True)


def _max_sum_exp_combine(a, b):
    """Merge two (m, s) pairs, each standing for s * exp(m): m = max(m1, m2), s = s_hi + s_lo * exp(m_lo - m_hi).

    One exp per element. The exponent is 0 where m_lo == m_hi, which covers both -inf (exp(-inf - -inf) would be
    NaN; the pair then stands for 0 whatever s is) and ties, where the sum is s1 + s2 exactly.
    """
    (m1, s1), (m2, s2) = a, b
    first_hi = m1 >= m2
    m_hi, m_lo = jnp.maximum(m1, m2), jnp.minimum(m1, m2)
    d = jax.lax.select(m_lo == m_hi, jnp.zeros_like(m_hi), m_lo - m_hi)
    return m_hi, jax.lax.select(first_hi, s1, s2) + jax.lax.select(first_hi, s2, s1) * jnp.exp(d)


def online_max_sum_exp(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(max(z), sum(exp(z - max(z)))) over the last axis, keepdims, fp32: one variadic reduce (online logsumexp).

    The two-pass form (z.max, then sum(exp(z - max))) is two reductions, and XLA's GPU emitter reads the logits
    [B, T, V] once for each; this reduce carries the running (max, sum) pair, so the logits are read once. Its
    accuracy depends on the backend's reduction order: see `two_pass_max_sum_exp`.
    """
    z = z.astype(jnp.float32)
    init = (jnp.float32(-jnp.inf), jnp.float32(0))
    m, s = jax.lax.reduce((z, jnp.ones_like(z)), init, _max_sum_exp_combine, (z.ndim - 1,))
    return m[..., None], s[..., None]


def _lse_and_target_fwd(logits, targets):
    lse, z_target, z_max, sum_exp = _lse_and_target(logits, targets)
    return (lse, z_target), (logits, targets, z_max, sum_exp)


def _lse_and_target_bwd(residuals, cotangents):
    logits, targets, z_max, sum_exp = residuals
    g_lse, g_target = cotangents
    # softmax as exp(z - max) / sum, not exp(z - lse): lse's rounding (~|lse| ulp) would scale whole rows
    softmax = jnp.exp(logits.astype(jnp.float32) - z_max) / sum_exp
    onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    dz = g_lse[..., None] * softmax + jnp.where(onehot, g_target[..., None], 0.0)
    return dz.astype(logits.dtype), None


lse_and_target.defvjp(_lse_and_target_fwd, _lse_and_target_bwd)


def nll(stats: LogitStats, smoothing: float = 0.0) -> jax.Array:
    """Mean token cross-entropy, against (1-eps)*onehot + eps/V if `smoothing` = eps (torch's rule):
    lse - (1-eps) z_target - eps z_mean."""
    loss = stats.lse - stats.z_target
    if smoothing:
        loss = loss - smoothing * (stats.z_mean - stats.z_target)
    return loss.mean()


def z_penalty(lse: jax.Array) -> jax.Array:
    """Z_WEIGHT * mean(lse^2), lse = logsumexp(logits) [B, T] in fp32."""
    return Z_WEIGHT * jnp.square(lse).mean()


def nll_z(stats: LogitStats, smoothing: float = 0.0) -> jax.Array:
    """`nll` + the z-loss (z_loss; tanh_cap_ls_z on the capped logits)."""
    return nll(stats, smoothing) + z_penalty(stats.lse)


def poly_ls_z(stats: LogitStats) -> jax.Array:
    """CE with label smoothing 0.05 + PolyLoss-1 term mean(1 - p_target) + z-loss of the raw logits."""
    p_target = jnp.exp(stats.z_target - stats.lse)
    return nll(stats, LABEL_SMOOTHING) + (1 - p_target).mean() + z_penalty(stats.lse)


def tanh_cap(logits: jax.Array) -> jax.Array:
    """`tanh_cap_ls_z`'s cap inside the loss: 30*tanh(logits/30), in fp32."""
    return LOGIT_CAP * jnp.tanh(logits.astype(jnp.float32) / LOGIT_CAP)


def sigmoid_cap(logits: jax.Array) -> jax.Array:
    """`softcap_ce` model output: 30*sigmoid(logits/7.5), in fp32."""
    return LOGIT_CAP * jax.nn.sigmoid(logits.astype(jnp.float32) / SIGMOID_CAP_SCALE)


@dataclass(frozen=True)
class Loss:
    """One loss of the axis, of the logits after `transform` if it has one: either `of_stats` (LogitStats ->
    scalar) or `of_logits` ((logits [B, T, V], int targets [B, T]) -> scalar), for a loss the statistics do not
    determine."""

    of_stats: Callable[[LogitStats], jax.Array] | None = None
    transform: Callable[[jax.Array], jax.Array] | None = None  # logits -> logits, inside the loss only
    of_logits: Callable[[jax.Array, jax.Array], jax.Array] | None = None

    def __post_init__(self):
        if (self.of_stats is None) == (self.of_logits is None):
            raise ValueError("a Loss is a function of either the logit statistics (of_stats) or the logits (of_logits)")

    @property
    def needs_logits(self) -> bool:
        """Whether the loss takes the materialised logits (GPT.loss), not the fused head's statistics."""
        return self.of_logits is not None or self.transform is not None

    def __call__(self, logits: jax.Array, targets: jax.Array) -> jax.Array:
        """The loss of logits [B, T, V] and int targets [B, T]: a scalar, fp32."""
        if self.transform is not None:
            logits = self.transform(logits)
        if self.of_logits is not None:
            return self.of_logits(logits, targets)
        return self.of_stats(logit_stats(logits, targets))


LOSSES: dict[str, Loss] = {
    "ce": Loss(nll),
    "label_smoothing": Loss(partial(nll, smoothing=LABEL_SMOOTHING)),
    "z_loss": Loss(nll_z),
    "softcap_ce": Loss(nll),  # on the capped model output
    "poly_ls_z": Loss(poly_ls_z),
    "tanh_cap_ls_z": Loss(partial(nll_z, smoothing=TANH_CAP_SMOOTHING), transform=tanh_cap),
}
cross_entropy = LOSSES["ce"]  # evaluation's loss: cross_entropy(logits, targets), mean token CE in fp32

OUTPUT_TRANSFORMS: dict[str, Callable[[jax.Array], jax.Array]] = {"softcap_ce": sigmoid_cap}
