"""Layer norm with torch's backward, and the residual add fused into it (pre-LN blocks).

`add_layer_norm` picks the implementation explicitly by device: the Pallas (Triton) kernels of
jaxgpt.ops.layernorm.pallas on GPU (one pass each way), XLA (jaxgpt.ops.layernorm.reference) elsewhere.
"""

import jax
import jax.numpy as jnp

from jaxgpt.ops.layernorm.reference import add_layer_norm_xla, layer_norm_xla, scaled_normalize
from jaxgpt.ops.layernorm.pallas import add_layer_norm_pallas
from jaxgpt.ops.utils import resolve_backend


def add_layer_norm(
    x: jax.Array,
    r: jax.Array | None,
    scale: jax.Array,
    bias: jax.Array | None,
    eps: float,
    out_dtype: jnp.dtype,
    residual_out: bool = True,
    backend: str = "auto",
) -> tuple[jax.Array | None, jax.Array]:
    """(x_new, y): x_new = x + r (x itself if r is None), y = layer_norm(x_new) * scale + bias over the last axis.

    backend 'auto': 'pallas' on GPU, 'xla' elsewhere (jaxgpt.ops.utils.resolve_backend; 'pallas' off GPU runs the
    kernels in Pallas's interpreter, for tests). The pallas path writes y in `out_dtype`; the xla path returns it in
    fp32, the precision it is computed in (its consumers, matmuls in the compute dtype, cast it either way).
    `residual_out=False` returns (None, y).
    """
    if resolve_backend(backend) == "pallas":
        return add_layer_norm_pallas(x, r, scale, bias, eps, out_dtype, residual_out,
                                     interpret=jax.default_backend() != "gpu")
    x_new, y = add_layer_norm_xla(x, r, scale, bias, eps)
    return (x_new if residual_out else None), y


__all__ = ["add_layer_norm", "add_layer_norm_pallas", "add_layer_norm_xla", "layer_norm_xla", "scaled_normalize"]
