"""Shared building blocks: compute dtype and the harness's effective initialisation.

Effective init: the benchmark re-initialises every nn.Linear / nn.Embedding after construction
(nanoGPT's `_init_weights`): weights N(0, 0.02), biases zero; `c_proj` weights N(0, 0.02/sqrt(2*n_layer)).
Modules that are not Linear/Embedding in PyTorch (norms, convolutions, raw parameters) keep their own init.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import INIT_STD


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """bf16 matmuls on accelerators, fp32 on CPU, unless the config names one."""
    if cfg.dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(cfg.dtype)


def proj_std(cfg: ModelConfig) -> float:
    """nanoGPT's scaled init for residual output projections (`c_proj`)."""
    return INIT_STD / math.sqrt(2 * cfg.n_layer)


def linear(
    cfg: ModelConfig, d_in: int, d_out: int, rngs: nnx.Rngs, std: float = INIT_STD, bias: bool | None = None
) -> nnx.Linear:
    """nn.Linear twin: kernel [d_in, d_out] ~ N(0, std), zero bias (if `bias`, default cfg.bias), fp32 params,
    compute dtype."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=cfg.bias if bias is None else bias,
        dtype=compute_dtype(cfg),
        param_dtype=jnp.float32,
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


def embed(num: int, features: int, rngs: nnx.Rngs, std: float = INIT_STD) -> nnx.Embed:
    """nn.Embedding twin: table [num, features] ~ N(0, std), looked up in fp32."""
    return nnx.Embed(num, features, param_dtype=jnp.float32, embedding_init=nnx.initializers.normal(std), rngs=rngs)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def qkv_heads(x: jax.Array, w: jax.Array, n_head: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The fused qkv projection split into heads: x [B, T, C] @ w [C, 3C] -> q, k, v [B, T, H, C/H] each (thirds of
    w's columns), in x's dtype.

    Forward: one matmul per third, so q, k and v come out contiguous (as cuDNN attention needs them; slicing one
    [B, T, 3C] product would copy each third). Backward: dq, dk, dv are
    concatenated once (`optimization_barrier`) and feed one matmul for dx and one for dw, as the fused projection's
    would (left to itself XLA builds the concatenation twice, once per consumer matmul).
    """
    B, T, C = x.shape
    xs = jax.lax.optimization_barrier((x,) * 3)  # three operands: else XLA merges the matmuls back into one
    return tuple((x_i @ w_i).reshape(B, T, n_head, C // n_head) for x_i, w_i in zip(xs, jnp.split(w, 3, axis=1)))


def _qkv_heads_fwd(x, w, n_head):
    return qkv_heads(x, w, n_head), (x, w)


def _qkv_heads_bwd(n_head, residuals, grads):
    x, w = residuals
    B, T, H, D = grads[0].shape
    dqkv = jax.lax.optimization_barrier(jnp.concatenate([g.reshape(B * T, H * D) for g in grads], axis=-1))
    dx = (dqkv @ w.T).reshape(x.shape)
    return dx, x.reshape(B * T, -1).T @ dqkv


qkv_heads.defvjp(_qkv_heads_fwd, _qkv_heads_bwd)
