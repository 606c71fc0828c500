"""The softmax statistics of the logits in XLA: the reference for jaxgpt.ops.cross_entropy.pallas and the CPU path.

`softmax_stats_xla(z [N, V], targets [N]) -> SoftmaxStats`, the one pass over the [N, V] logits that the fused LM head
(jaxgpt.ops.cross_entropy.head) needs forward:
    e        = exp(z - max_v z)         [N, V] in z's dtype: the unnormalised softmax, softmax = e / sum_exp
    sum_exp  = sum_v exp(z - max_v z)   [N] fp32, summed before e is rounded to z's dtype
    lse      = max_v z + log(sum_exp)   [N] fp32
    z_target = z[n, targets[n]]         [N] fp32
    z_mean   = mean_v z                 [N] fp32
The statistics are reduced in fp32 in two passes (max, then the sum of exp(z - max)), the accuracy rule of
jaxgpt.losses.two_pass_max_sum_exp; the softmax is exp(z - max) / sum, not exp(z - lse) (lse's rounding, ~|lse| ulp,
would scale whole rows).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

f32 = jnp.float32


class SoftmaxStats(NamedTuple):
    """The forward statistics of logits z [N, V]: e [N, V] in z's dtype, the rest [N] fp32 (see the module doc)."""

    e: jax.Array
    sum_exp: jax.Array
    lse: jax.Array
    z_target: jax.Array
    z_mean: jax.Array


def softmax_stats_xla(logits: jax.Array, targets: jax.Array) -> SoftmaxStats:
    """SoftmaxStats of logits [N, V] (any float dtype) and int targets [N] (valid ids)."""
    z = logits.astype(f32)
    z_max = z.max(-1, keepdims=True)
    e = jnp.exp(z - z_max)
    sum_exp = e.sum(-1)
    z_target = jnp.take_along_axis(z, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
    return SoftmaxStats(e.astype(logits.dtype), sum_exp, z_max[:, 0] + jnp.log(sum_exp), z_target, z.mean(-1))
