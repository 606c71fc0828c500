"""Shared building blocks: compute dtype and the harness's effective initialisation.

Effective init (DESIGN §1): the benchmark re-initialises every nn.Linear / nn.Embedding after construction
(nanoGPT's `_init_weights`): weights N(0, 0.02), biases zero; `c_proj` weights N(0, 0.02/sqrt(2*n_layer)).
Modules that are not Linear/Embedding in PyTorch (norms, convolutions, raw parameters) keep their own init.
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import ModelConfig

INIT_STD = 0.02


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


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def split_heads3(x: jax.Array, n_head: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B, T, 3C] -> q, k, v [B, T, H, C/H] each (thirds of the last axis), as `jnp.split` + reshape.

    The backward concatenates dq, dk, dv once (`optimization_barrier`); left to itself XLA builds the
    concatenation twice, once for each of its two consumer matmuls (H200, gpt2-124m B=12: copies 1.17 -> 0.85 ms
    per step).
    """
    B, T, C3 = x.shape
    return tuple(t.reshape(B, T, n_head, C3 // 3 // n_head) for t in jnp.split(x, 3, axis=-1))


def _split_heads3_fwd(x, n_head):
    return split_heads3(x, n_head), None


def _split_heads3_bwd(n_head, _, grads):
    B, T, H, D = grads[0].shape
    return (jax.lax.optimization_barrier(jnp.concatenate([g.reshape(B, T, H * D) for g in grads], axis=-1)),)


split_heads3.defvjp(_split_heads3_fwd, _split_heads3_bwd)
