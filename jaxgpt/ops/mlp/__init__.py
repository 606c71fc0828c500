"""The GPT-2 MLP without biases, y = gelu(x @ w_fc) @ w_proj (exact GELU), with its backward's first matmul and
GELU's derivative fused into one kernel.

`mlp` picks the implementation explicitly by device: on GPU the custom VJP below, whose forward is XLA's (cuBLAS
matmuls and the GELU fusion) and whose backward computes du = (dy @ w_proj^T) * gelu'(u) in one Pallas
Mosaic GPU kernel (jaxgpt.ops.mlp.pallas); elsewhere (and for shapes or dtypes the kernel does not take) XLA
autodiff of `mlp_xla` (jaxgpt.ops.mlp.reference).
"""

from functools import partial

import jax
import jax.numpy as jnp

from jaxgpt.ops.mlp.reference import gelu, gelu_bwd, mlp_xla
from jaxgpt.ops.mlp.pallas import dgrad_gelu_pallas, supported
from jaxgpt.ops.utils import resolve_backend


def mlp(x: jax.Array, w_fc: jax.Array, w_proj: jax.Array, backend: str = "auto") -> jax.Array:
    """gelu(x @ w_fc) @ w_proj.   x [..., C], w_fc [C, F], w_proj [F, C], all in the compute dtype.

    backend 'auto': 'pallas' on GPU, 'xla' elsewhere (jaxgpt.ops.utils.resolve_backend; 'pallas' off GPU runs the
    kernel in Pallas's GPU interpreter, for tests). The pallas path needs 16-bit operands and whole kernel tiles
    (`jaxgpt.ops.mlp.pallas.supported`); other inputs take the xla path. Both round u = x @ w_fc and g = gelu(u)
    to the compute dtype and keep them for the backward.
    """
    C, F = w_fc.shape
    M = x.size // C
    if resolve_backend(backend) == "pallas" and supported(M, C, F, x.dtype) and w_fc.dtype == w_proj.dtype == x.dtype:
        y = _mlp(x.reshape(M, C), w_fc, w_proj, jax.default_backend() != "gpu")
        return y.reshape(x.shape)
    return mlp_xla(x, w_fc, w_proj)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _mlp(x, w_fc, w_proj, interpret):
    return _mlp_fwd(x, w_fc, w_proj, interpret)[0]


def _mlp_fwd(x, w_fc, w_proj, interpret):
    u = jnp.dot(x, w_fc)
    g = gelu(u)
    return jnp.dot(g, w_proj), (x, w_fc, w_proj, u, g)


def _mlp_bwd(interpret, residuals, dy):
    x, w_fc, w_proj, u, g = residuals
    dw_proj = jnp.dot(g.T, dy)
    du = dgrad_gelu_pallas(dy, w_proj, u, interpret=interpret)
    return jnp.dot(du, w_fc.T), jnp.dot(x.T, du), dw_proj


_mlp.defvjp(_mlp_fwd, _mlp_bwd)

__all__ = ["dgrad_gelu_pallas", "gelu", "gelu_bwd", "mlp", "mlp_xla", "supported"]
