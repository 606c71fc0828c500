"""Decode mode: the state a model keeps between calls while it generates, in `nnx.Cache` variables.

`GPT.init_cache` puts a model in decode mode: it creates one `DecodeContext` shared by the embedding and every
mixer, and each mixer's own cache (a KV cache for softmax attention; the recurrent state and the short
convolutions' last inputs for the linear mixers). Each call then continues the sequence from where the previous
one stopped: the first call (prefill) takes the prompt, later ones one token each. Rows of a batch may have
prompts of different lengths, left-padded to a common length; `start` marks each row's first real token, and
padding never reaches a real token's output (attention masks it, linear mixers see zeros there).

Without `init_cache` no module has any of this state and every call is the training forward.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class DecodeContext(nnx.Module):
    """Where a decoding batch stands: `index` (scalar) the sequence index of the next input token (all rows
    advance together), `start` [B] each row's first real token, `last` [B] the last token fed (the previous
    token of bigram_hash and of ve_lcr's shift)."""

    def __init__(self, batch_size: int, start: jax.Array | None = None):
        self.index = nnx.Cache(jnp.zeros((), jnp.int32))
        self.start = nnx.Cache(jnp.zeros((batch_size,), jnp.int32) if start is None else start.astype(jnp.int32))
        self.last = nnx.Cache(jnp.zeros((batch_size,), jnp.int32))

    def times(self, T: int) -> jax.Array:
        """[T] sequence indices of a call's T input tokens."""
        return self.index[...] + jnp.arange(T, dtype=jnp.int32)

    def valid(self, T: int) -> jax.Array:
        """[B, T] whether each input token is a real token (not left padding)."""
        return self.times(T)[None] >= self.start[...][:, None]

    def positions(self, T: int) -> jax.Array:
        """[B, T] each input token's position in its row's sequence (0 at its first real token and on padding)."""
        return jnp.maximum(self.times(T)[None] - self.start[...][:, None], 0)

    def first(self, T: int) -> jax.Array:
        """[B, T] whether each input token is its row's first real token (padding counts as first too)."""
        return self.positions(T) == 0

    def mask_padding(self, x: jax.Array) -> jax.Array:
        """x [B, T, ...] with zeros at the padding positions."""
        valid = self.valid(x.shape[1]).reshape(x.shape[:2] + (1,) * (x.ndim - 2))
        return jnp.where(valid, x, jnp.zeros((), x.dtype))

    def shift_right(self, x: jax.Array, before: jax.Array) -> jax.Array:
        """x [B, T, ...] one step later: row t holds x at t-1, `before` [B, ...] (x of the last token fed) at t=0,
        zeros at each row's first token."""
        shifted = jnp.concatenate([before[:, None].astype(x.dtype), x[:, :-1]], axis=1)
        first = self.first(x.shape[1]).reshape(x.shape[:2] + (1,) * (x.ndim - 2))
        return jnp.where(first, jnp.zeros((), x.dtype), shifted)

    def advance(self, idx: jax.Array) -> None:
        """Record that the tokens idx [B, T] were fed."""
        self.index[...] += idx.shape[1]
        self.last[...] = idx[:, -1].astype(jnp.int32)


class RecurrentCache:
    """Decode mode of a linear-attention layer (mixed into the FLA layer twins, which share FLA's module names:
    q_proj, v_proj (or a `state_dims` of their own), optional q_conv1d / k_conv1d / v_conv1d, and n_head,
    backend): the recurrent state [B, H, K, V] (fp32) in `recurrent_state`, and each short convolution's last
    inputs."""

    context: DecodeContext | None = None  # set by init_cache
    recurrent_state: nnx.Cache | None = None

    def state_dims(self) -> tuple[int, int]:
        """(K, V): the recurrent state's size per head, q_proj's and v_proj's widths per head."""
        return self.q_proj.out_features // self.n_head, self.v_proj.out_features // self.n_head

    def init_cache(self, context: DecodeContext, max_length: int) -> None:
        """Decode mode from a zero state; the state's size does not depend on `max_length` (any length goes)."""
        B, H = context.start.shape[0], self.n_head
        self.context = context
        K, V = self.state_dims()
        self.recurrent_state = nnx.Cache(jnp.zeros((B, H, K, V), jnp.float32))
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            if hasattr(self, name):
                getattr(self, name).init_cache(B, self.q_proj.dtype)

    def mask_padding(self, x: jax.Array) -> jax.Array:
        """The layer's input x [B, T, C], zero at left padding in decode mode: a zero input leaves the state and the
        convolutions' inputs as an absent token would (k = v = 0; decay of a zero state)."""
        return x if self.context is None else self.context.mask_padding(x)

    def linear_attention(self, chunk: Callable, recurrent: Callable, *inputs: jax.Array, **options) -> jax.Array:
        """The output o [B, T, H, V] of a linear-attention op on `inputs` (q, k, v, gates: [B, T, H, ...]).

        Training: the chunked op `chunk` from a zero state. Decode mode: from the state held in
        `recurrent_state`, which is replaced by the final one; one token takes one step of the recurrence
        `recurrent` (FLA's fused_recurrent: the same math as the chunked form), a longer input the chunked form.
        """
        state = self.recurrent_state
        if state is None:
            return chunk(*inputs, backend=self.backend, **options)[0]
        if inputs[0].shape[1] == 1:
            o, state[...] = recurrent(*inputs, initial_state=state[...], output_final_state=True, **options)
        else:
            o, state[...] = chunk(*inputs, initial_state=state[...], output_final_state=True, backend=self.backend,
                                  **options)
        return o
