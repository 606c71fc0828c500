"""GPT: the composition of the four variant axes (embedding, norm/block, mixer, loss; docs/variants.md)."""

import jax
from flax import nnx

from jaxgpt.spec.config import ModelConfig
from jaxgpt.layers.block import BLOCKS, LayerNorm
from jaxgpt.layers.cache import DecodeContext
from jaxgpt.layers.common import compute_dtype
from jaxgpt.layers.embedding import EMBEDDINGS
from jaxgpt.losses import LOSSES, OUTPUT_TRANSFORMS, LogitStats, cross_entropy
from jaxgpt.ops.cross_entropy import head_stats


class GPT(nnx.Module):
    """nanoGPT-style decoder: embedding -> n_layer blocks -> final norm -> head (via the embedding).

    Decode mode (`init_cache`, jaxgpt.layers.cache): each call continues the sequence of the calls before it.
    """

    context: DecodeContext | None = None  # set by init_cache

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        block, final_norm = BLOCKS[cfg.norm]
        self.embedding = EMBEDDINGS[cfg.embedding](cfg, rngs)
        self.h = nnx.List([block(cfg, i, rngs) for i in range(cfg.n_layer)])
        self.ln_f = final_norm(cfg, rngs)

    def __call__(self, idx: jax.Array) -> jax.Array:
        """idx [B, T] int -> logits [B, T, V] in the compute dtype."""
        return self.logits(*self.head_inputs(idx))

    def logits(self, x: jax.Array, w: jax.Array) -> jax.Array:
        """The model output of the head's operands (`head_inputs`): x [..., C] @ w.T [C, V], transformed as the
        loss axis says (softcap_ce)."""
        logits = x @ w.astype(x.dtype).T
        transform = OUTPUT_TRANSFORMS.get(self.cfg.loss)
        return logits if transform is None else transform(logits)

    def init_cache(self, batch_size: int, max_length: int, start: jax.Array | None = None) -> None:
        """Decode mode for `batch_size` rows of at most `max_length` tokens (the softmax KV cache's size), each
        row's first real token at `start` [B] (left padding; default 0)."""
        self.context = DecodeContext(batch_size, start)
        self.embedding.init_cache(self.context)
        for block in self.h:
            block.attn.init_cache(self.context, max_length)

    def head_inputs(self, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The LM head's operands: the final normed hidden states x [B, T, C] in the compute dtype and the head
        weight [V, C] (its parameter dtype); logits = x @ w.T."""
        # The residual stream is x + r: r is the last MLP output, added by the next layer norm's kernel when the
        # next block fuses it (Block.fused), else added here first.
        x, r = self.embedding(idx), None
        for i, block in enumerate(self.h):
            ve = self.embedding.value_embed(i, idx)
            if ve is not None:
                x, r = _settle(x, r) + ve, None
            if getattr(block, "fuses_residual", False):
                x, r = block.fused(x, r)
            else:
                x, r = block(_settle(x, r)), None
        if isinstance(self.ln_f, LayerNorm):
            x = self.ln_f.add(x, r, residual_out=False)[1]
        else:
            x = self.ln_f(_settle(x, r))
        if self.context is not None:
            self.context.advance(idx)
        return x.astype(compute_dtype(self.cfg)), self.embedding.lm_head_weight()

    def loss(self, idx: jax.Array, targets: jax.Array, train: bool = True) -> jax.Array:
        """Training loss of the loss axis (train=True) or plain cross-entropy (evaluation).

        A loss of the raw logits' statistics takes them from the fused head (jaxgpt.ops.cross_entropy.head_stats),
        which never forms the logits' gradient; a loss that needs the logits (`Loss.needs_logits`: of the full
        logits, or of transformed ones like tanh_cap_ls_z's cap) or of a transformed model output (softcap_ce)
        takes the materialised logits.
        """
        loss = LOSSES[self.cfg.loss] if train else cross_entropy
        if loss.needs_logits or self.cfg.loss in OUTPUT_TRANSFORMS:
            return loss(self(idx), targets)
        return loss.of_stats(LogitStats(*head_stats(*self.head_inputs(idx), targets)))


def _settle(x: jax.Array, r: jax.Array | None) -> jax.Array:
    """The residual stream x + r as one array (r None: x)."""
    return x if r is None else x + r


def num_params(model: GPT, exclude_pos: bool = True) -> int:
    """Parameter count; like nanoGPT/the benchmark, position parameters are excluded by default."""
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return n - model.embedding.num_pos_params() if exclude_pos else n


def init_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """Build a GPT with the harness's effective initialisation from an integer seed."""
    return GPT(cfg, nnx.Rngs(params=seed))
