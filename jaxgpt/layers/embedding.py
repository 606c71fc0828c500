"""Embedding axis (the benchmark's `TokenEmbedding`): tokens (+ positions) in, residual stream out.

Interface of every embedding: `__call__(idx [B, T]) -> x [B, T, C]` (fp32), `lm_head_weight() -> [V, C]`,
`num_pos_params() -> int`, `value_embed(layer, idx) -> [B, T, C] | None` (added to the residual stream
just before block `layer`).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgpt.config import ModelConfig
from jaxgpt.layers.common import embed
from jaxgpt.variants import LINEAR_MIXERS


class TokenEmbedding(nnx.Module):
    """`default`: wte + learned absolute wpe (dropped for linear mixers), head tied to wte."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.wte = embed(cfg.vocab_size, cfg.n_embd, rngs)
        self.wpe = embed(cfg.block_size, cfg.n_embd, rngs) if cfg.mixer not in LINEAR_MIXERS else None

    def __call__(self, idx: jax.Array) -> jax.Array:
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(jnp.arange(idx.shape[1]))[None]
        return x

    def lm_head_weight(self) -> jax.Array:
        return self.wte.embedding[...]

    def num_pos_params(self) -> int:
        return 0 if self.wpe is None else self.wpe.embedding.size

    def value_embed(self, layer: int, idx: jax.Array) -> jax.Array | None:
        return None


EMBEDDINGS: dict[str, type[nnx.Module]] = {"default": TokenEmbedding}
