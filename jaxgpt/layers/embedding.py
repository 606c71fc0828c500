"""Embedding axis (the benchmark's `TokenEmbedding`): tokens (+ positions) in, residual stream out.

Interface of every embedding: `__call__(idx [B, T]) -> x [B, T, C]` (fp32), `lm_head_weight() -> [V, C]`,
`num_pos_params() -> int`, `value_embed(layer, idx) -> [B, T, C] | None` (added to the residual stream
just before block `layer`), `init_cache(context)` (decode mode, jaxgpt.layers.cache: positions, the previous
token of bigram_hash and the shift of ve_lcr continue from the tokens fed before).

Effective init (torch_ref.embedding declares the same module types): every table that is an
nn.Embedding / nn.Linear in the harness is N(0, 0.02) whatever the variant declares; raw parameters
(scalars, the zero head of `ve_lcr_cyclic_untied`) keep their declared init.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.layers.cache import DecodeContext
from jaxgpt.layers.common import embed
from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import BIGRAM_LAMBDA_INIT, HASH_CUR, HASH_PREV, NUM_TABLES, VE_BETA_INIT, VE_LAMBDA_INIT
from jaxgpt.spec.variants import LINEAR_MIXERS, value_embed_layers


class TokenEmbedding(nnx.Module):
    """`default`: wte + learned absolute wpe (dropped for linear mixers), head tied to wte.

    Init: wte, wpe N(0, 0.02) (nn.Embedding).
    """

    context: DecodeContext | None = None  # set by init_cache

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.wte = embed(cfg.vocab_size, cfg.n_embd, rngs)
        self.wpe = embed(cfg.block_size, cfg.n_embd, rngs) if cfg.mixer not in LINEAR_MIXERS else None

    def __call__(self, idx: jax.Array) -> jax.Array:
        x = self.wte(idx)
        if self.wpe is not None:
            T = idx.shape[1]
            x = x + self.wpe(jnp.arange(T)[None] if self.context is None else self.context.positions(T))
        return x

    def init_cache(self, context: DecodeContext) -> None:
        """Decode mode: read positions and the tokens fed before from `context`."""
        self.context = context

    def lm_head_weight(self) -> jax.Array:
        return self.wte.embedding[...]

    def num_pos_params(self) -> int:
        return 0 if self.wpe is None else self.wpe.embedding.size

    def value_embed(self, layer: int, idx: jax.Array) -> jax.Array | None:
        return None


class UntiedEmbedding(TokenEmbedding):
    """`untied`: as `default` with a separate head `lm_head` [V, C] (an nn.Linear in torch: N(0, 0.02))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.lm_head = embed(cfg.vocab_size, cfg.n_embd, rngs)

    def lm_head_weight(self) -> jax.Array:
        return self.lm_head.embedding[...]


def bigram_hash(idx: jax.Array, num_buckets: int, prev: jax.Array | None = None,
                first: jax.Array | None = None) -> jax.Array:
    """[B, T] tokens -> [B, T] bucket ((36313*cur) XOR (27191*prev)) mod (B-1) in wrapping int32; first token -> B-1.

    prev [B, T]: each token's previous token (default: idx shifted right); first [B, T] bool: the tokens that
    start a sequence (default: t=0).
    """
    cur = idx.astype(jnp.int32)
    prev = jnp.pad(cur[:, :-1], ((0, 0), (1, 0))) if prev is None else prev.astype(jnp.int32)
    h = ((HASH_CUR * cur) ^ (HASH_PREV * prev)) % (num_buckets - 1)
    return h.at[:, 0].set(num_buckets - 1) if first is None else jnp.where(first, num_buckets - 1, h)


class BigramHashEmbedding(TokenEmbedding):
    """`bigram_hash`: `default` + a hashed-bigram table added before every block, scaled per layer.

    Init: `bigram` [5V, C] is an nn.Embedding declared zero, effective N(0, 0.02); `bigram_lambda` [L]
    is a raw parameter, 0.1.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        self.bigram = embed(NUM_TABLES * cfg.vocab_size, cfg.n_embd, rngs)
        self.bigram_lambda = nnx.Param(jnp.full((cfg.n_layer,), BIGRAM_LAMBDA_INIT, jnp.float32))

    def value_embed(self, layer: int, idx: jax.Array) -> jax.Array:
        ctx, n = self.context, self.bigram.num_embeddings
        if ctx is None:
            buckets = bigram_hash(idx, n)
        else:
            buckets = bigram_hash(idx, n, ctx.shift_right(idx, ctx.last[...]), ctx.first(idx.shape[1]))
        return self.bigram_lambda[layer] * self.bigram(buckets)


class ValueEmbedding(TokenEmbedding):
    """`value_embed`, `ve_lcr`, `ve_lcr_cyclic_untied`: `default` + per-layer token tables (value embeddings).

    Table j is rows j*V..(j+1)*V of the joint table `value_embeds` [5V, C]; before its layer it adds
    `ve_lambda[j] * ve_j(idx)` (+ `ve_beta[j] * shift(ve_j(idx))` with `local_residual`, shift = one step
    right with zeros at t=0). Layer placement: jaxgpt.spec.variants.value_embed_layers.
    Init: `value_embeds` is an nn.Embedding declared N(0, 0.01), effective N(0, 0.02); raw parameters
    `ve_lambda` [5] 0.5, `ve_beta` [5] 0.1; with `zero_head` a raw untied head `lm_head` [V, C] of zeros.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, local_residual: bool = False, cyclic: bool = False,
                 zero_head: bool = False):
        super().__init__(cfg, rngs)
        self.vocab_size = cfg.vocab_size
        self.tables = value_embed_layers(cfg.n_layer, cyclic)
        self.value_embeds = embed(NUM_TABLES * cfg.vocab_size, cfg.n_embd, rngs)
        self.ve_lambda = nnx.Param(jnp.full((NUM_TABLES,), VE_LAMBDA_INIT, jnp.float32))
        self.ve_beta = nnx.Param(jnp.full((NUM_TABLES,), VE_BETA_INIT, jnp.float32)) if local_residual else None
        self.lm_head = nnx.Param(jnp.zeros((cfg.vocab_size, cfg.n_embd), jnp.float32)) if zero_head else None

    def lm_head_weight(self) -> jax.Array:
        return super().lm_head_weight() if self.lm_head is None else self.lm_head[...]

    def value_embed(self, layer: int, idx: jax.Array) -> jax.Array | None:
        if layer not in self.tables:
            return None
        out = 0.0
        for j in self.tables[layer]:
            ve = self.value_embeds(idx + j * self.vocab_size)
            out = out + self.ve_lambda[j] * ve
            if self.ve_beta is not None:
                out = out + self.ve_beta[j] * self.shift_right(ve, j)
        return out

    def shift_right(self, ve: jax.Array, j: int) -> jax.Array:
        """shift(ve_j(idx)) for ve = ve_j(idx) [B, T, C]: one step right, zeros at each row's first token."""
        if self.context is None:
            return jnp.pad(ve[:, :-1], ((0, 0), (1, 0), (0, 0)))
        return self.context.shift_right(ve, self.value_embeds(self.context.last[...] + j * self.vocab_size))


EMBEDDINGS: dict[str, Callable[[ModelConfig, nnx.Rngs], nnx.Module]] = {
    "default": TokenEmbedding,
    "untied": UntiedEmbedding,
    "bigram_hash": BigramHashEmbedding,
    "value_embed": ValueEmbedding,
    "ve_lcr": partial(ValueEmbedding, local_residual=True),
    "ve_lcr_cyclic_untied": partial(ValueEmbedding, local_residual=True, cyclic=True, zero_head=True),
}
