"""The fused LM head + cross-entropy statistics (jaxgpt.ops.cross_entropy.head).

`head_stats` picks the [N, V] pass explicitly by device: the Pallas (Triton) kernel of jaxgpt.ops.cross_entropy.pallas
on GPU (one read and one in-place write of the logits), XLA (jaxgpt.ops.cross_entropy.reference) elsewhere.
"""

import jax

from jaxgpt.ops.cross_entropy.head import lm_head_stats
from jaxgpt.ops.cross_entropy.reference import SoftmaxStats, softmax_stats_xla
from jaxgpt.ops.cross_entropy.pallas import softmax_stats_pallas
from jaxgpt.ops.utils import resolve_backend


def head_stats(
    h: jax.Array, w: jax.Array, targets: jax.Array, backend: str = "auto"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lse, z_target, z_mean) of the logits z = h @ w.T: logsumexp_v z, z[target] and mean_v z, fp32 [...] each.

    h [..., C] in the compute dtype (the logits' dtype), w [V, C] (any dtype: cast to h's for the matmuls, its
    gradient returned in its own dtype), targets [...] int, valid ids. backend 'auto': 'pallas' on GPU, 'xla'
    elsewhere (jaxgpt.ops.utils.resolve_backend; 'pallas' off GPU runs the kernel in Pallas's interpreter, for tests).
    """
    kernel = resolve_backend(backend)
    if kernel == "pallas" and jax.default_backend() != "gpu":
        kernel = "pallas_interpret"
    C = h.shape[-1]
    stats = lm_head_stats(h.reshape(-1, C), w, targets.reshape(-1), kernel)
    return tuple(s.reshape(targets.shape) for s in stats)


__all__ = ["SoftmaxStats", "head_stats", "lm_head_stats", "softmax_stats_pallas", "softmax_stats_xla"]
