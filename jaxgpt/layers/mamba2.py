"""Mamba2 layer: `fla.layers.Mamba2` (FLA 0.6.0) in JAX.

The harness builds `Mamba2(hidden_size=C, num_heads=H, head_dim=expand * C / H)`, all else FLA's defaults
(docs/variants.md): FLA requires num_heads * head_dim == expand * C, and its default head_dim 64 would refuse
num_heads=H (at C=768, H=12: 12 * 64 != 1536), so the head dim P follows from H. Defaults: expand 2 (inner width
I = 2C), state_size N = 128, n_groups 1, conv_kernel 4 with bias, SiLU, D per head, the gated RMSNorm over all of I
with the gate before the norm (norm_before_gate=False, group_size I), dt_limit (0, inf), no projection biases.

What FLA's PyTorch path (`Mamba2.torch_forward`) computes, x [B, T, C]:
    z, xBC, dt = split(in_proj(x), [I, I + 2N, H])
    xs, b, c   = split(SiLU(conv1d(xBC)), [I, N, N])               causal depthwise conv, kernel 4, bias
    dt         = clamp(softplus(dt + dt_bias), dt_limit)            [B, T, H], fp32
    h_t = exp(dt_t A) h_{t-1} + b_t (dt_t xs_t)^T;   y_t = h_t^T c_t + D xs_t      A = -exp(A_log), per head
    out = out_proj(RMSNorm_I(y * SiLU(z)))
The SSD is scalar-decay linear attention: `chunk_simple_gla` with q = c, k = b (shared by all heads), v = dt * xs,
g = dt * A and scale 1. FLA's own chunking (chunk_size 256) only changes the rounding.
Parameter names: in_proj, conv1d, dt_bias, A_log, norm, D, out_proj.

Decode mode: RecurrentCache's state [B, H, N, P] and the convolution's last inputs. Left padding: the input is
zeroed there, and so is the convolution's output, whose bias would otherwise feed the state.

Effective init: the harness re-draws in_proj and out_proj N(0, 0.02); conv1d keeps PyTorch's Conv1d default
(weight and bias U(-1/2, 1/2)), the norm weight and D are ones, A_log = log U(1, 16) and dt_bias as FLA draws them.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.layers.cache import DecodeContext, RecurrentCache
from jaxgpt.layers.common import linear
from jaxgpt.layers.fla_modules import RMSNorm, ShortConvolution
from jaxgpt.layers.gated_deltanet import dt_bias_init
from jaxgpt.ops import chunk_simple_gla, naive_recurrent_simple_gla
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import (
    FLA_NORM_EPS,
    MAMBA2_A_INIT_RANGE,
    MAMBA2_CONV_KERNEL,
    MAMBA2_DT_LIMIT,
    MAMBA2_EXPAND,
    MAMBA2_STATE_SIZE,
)


class Mamba2(RecurrentCache, nnx.Module):
    """x [B, T, C] -> [B, T, C]; H heads of P = 2C / H, state size N = 128. Decode mode: RecurrentCache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        C, H, N = cfg.n_embd, cfg.n_head, MAMBA2_STATE_SIZE
        inner = MAMBA2_EXPAND * C
        if inner % H:
            raise ValueError(f"{MAMBA2_EXPAND} * n_embd = {inner} must be divisible by n_head {H}")
        self.n_head, self.backend = H, cfg.linear_attn_backend
        self.head_dim, self.state_size = inner // H, N
        self.in_proj = linear(cfg, C, 2 * inner + 2 * N + H, rngs, bias=False)  # z, xBC, dt
        self.conv1d = ShortConvolution(inner + 2 * N, MAMBA2_CONV_KERNEL, rngs, bias=True)
        self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), H))
        self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (H,), jnp.float32, *MAMBA2_A_INIT_RANGE)))
        self.norm = RMSNorm(inner, eps=FLA_NORM_EPS)
        self.D = nnx.Param(jnp.ones((H,), jnp.float32))
        self.out_proj = linear(cfg, inner, C, rngs, bias=False)

    def state_dims(self) -> tuple[int, int]:
        return self.state_size, self.head_dim

    def init_cache(self, context: DecodeContext, max_length: int) -> None:
        super().init_cache(context, max_length)
        self.conv1d.init_cache(context.start.shape[0], self.in_proj.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, T, _ = x.shape
        H, P, N = self.n_head, self.head_dim, self.state_size
        inner = H * P
        x = self.mask_padding(x)
        z, xBC, dt = jnp.split(self.in_proj(x), [inner, 2 * inner + 2 * N], axis=-1)
        xBC = self.mask_padding(self.conv1d(xBC))
        xs, b, c = jnp.split(xBC, [inner, inner + N], axis=-1)
        dt = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...]), *MAMBA2_DT_LIMIT)  # [B, T, H]
        g = -jnp.exp(self.A_log[...]) * dt  # log decays
        xs = xs.reshape(B, T, H, P).astype(jnp.float32)
        q, k = (jnp.broadcast_to(t[:, :, None], (B, T, H, N)) for t in (c, b))  # one group: shared by all heads
        v = (xs * dt[..., None]).astype(c.dtype)
        y = self.linear_attention(chunk_simple_gla, naive_recurrent_simple_gla, q, k, v, g, scale=1.0)
        y = y.astype(jnp.float32) + self.D[...][:, None] * xs  # [B, T, H, P]
        return self.out_proj(self.norm(y.reshape(B, T, inner) * jax.nn.silu(z.astype(jnp.float32))))
