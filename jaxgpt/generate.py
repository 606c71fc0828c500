"""Text generation in JAX for every variant: prefill the prompt, then one token per step from the decode state.

The model runs in decode mode (`GPT.init_cache`, jaxgpt.layers.cache): the prompt goes through the training
forward's ops (chunked linear attention, attention over the prompt) and leaves each layer's state behind: the
recurrent state and the short convolutions' last inputs of a linear mixer, the keys and values (a KV cache
preallocated to the final length) of softmax attention, and the embedding's position and previous token. Every
further token is one jitted step: one step of the recurrence (constant time whatever the context) or one query
against the KV cache. The steps run inside one `lax.while_loop`, which stops once every row has sampled EOT.

How long a row can get (`max_context`): softmax variants learn absolute positions (wpe) for `block_size`
positions, so prompt plus new tokens must fit in `block_size`; the linear mixers have no position embedding and
their state has a fixed size, so they run past `block_size` (the context length they were trained on), however
well they extrapolate.

Prompts of different lengths are left-padded to a common length; padding never reaches a real token's output
(jaxgpt.layers.cache), so each row generates what it would alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.tokenizer import EOT


@dataclass(frozen=True)
class Sampling:
    """How a token is drawn from the logits (nanoGPT's conventions).

    temperature: logits are divided by it; 0 means greedy (argmax). top_k: keep the k largest logits (None: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (nucleus; None: all).
    vocab_limit: token ids >= vocab_limit are never drawn (the rows that pad vocab_size beyond the tokenizer's).
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    vocab_limit: int | None = None

    def __post_init__(self):
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")


def candidates(logits: jax.Array, sampling: Sampling) -> tuple[jax.Array, jax.Array]:
    """The tokens a draw can pick from logits [B, V] (fp32): (their logits divided by the temperature [B, K], their
    ids [B, K]), most likely first, -inf outside the nucleus (top_p); K = top_k, or V without one (a full sort)."""
    values, ids = jax.lax.top_k(logits / sampling.temperature, min(sampling.top_k or logits.shape[-1],
                                                                     logits.shape[-1]))
    if sampling.top_p is not None and sampling.top_p < 1:
        probs = jax.nn.softmax(values, axis=-1)
        outside = jnp.cumsum(probs, axis=-1) - probs >= sampling.top_p  # the mass before it already reaches p
        values = jnp.where(outside, -jnp.inf, values)
    return values, ids


def sample_logits(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row from logits [B, V] -> [B] int32, never one at or past the vocab limit: the argmax at
    temperature 0, else a draw from the softmax over the `candidates` (over all logits without top_k and top_p)."""
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    if sampling.vocab_limit is not None and sampling.vocab_limit < V:
        logits = jnp.where(jnp.arange(V) < sampling.vocab_limit, logits, -jnp.inf)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampling.top_k is None and sampling.top_p is None:
        return jax.random.categorical(key, logits / sampling.temperature, axis=-1).astype(jnp.int32)
    values, ids = candidates(logits, sampling)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def max_context(model: GPT) -> int | None:
    """The most tokens (prompt + generated) a row can hold: block_size with learned positions (wpe), None (no
    limit) without them (the linear mixers)."""
    return None if model.embedding.wpe is None else model.cfg.block_size


def left_pad(prompts: Sequence[Sequence[int]] | np.ndarray, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of token ids -> (tokens [B, T] int32 left-padded with 0 to a common length T, a multiple of
    `multiple`; start [B], each row's first real token)."""
    rows = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise UserError("empty prompt: every prompt needs at least one token")
    T = -(-max(len(r) for r in rows) // multiple) * multiple
    tokens = np.zeros((len(rows), T), np.int32)
    for row, r in zip(tokens, rows):
        row[T - len(r):] = r
    return tokens, np.array([T - len(r) for r in rows], np.int32)


class Decoder:
    """A model in decode mode for `batch_size` rows of at most `max_length` tokens (start [B]: each row's first
    real token): its graph, parameters and decode state (`cache`, replaced by each call). The model passed in is
    left as it was."""

    def __init__(self, model: GPT, batch_size: int, max_length: int, start: np.ndarray | None = None):
        decoder = nnx.merge(*nnx.split(model))  # a second module over the same parameters
        decoder.init_cache(batch_size, max_length, None if start is None else jnp.asarray(start))
        self.graphdef, self.cache, self.params = nnx.split(decoder, nnx.Cache, ...)
        # The graph is closed over, not a static argument: it need not be hashable (value_embed's layer table).
        self.jit_feed = jax.jit(partial(feed, self.graphdef), static_argnames="every", donate_argnames="cache")
        self.jit_sample = jax.jit(partial(sample, self.graphdef), static_argnames=("steps", "sampling", "eot"),
                                  donate_argnames="cache")

    def feed(self, tokens: jax.Array, every: bool = False) -> jax.Array:
        """Continue the rows with tokens [B, T] -> fp32 logits of the next token [B, V] (every: at each of the T
        positions, [B, T, V])."""
        logits, self.cache = self.jit_feed(self.params, self.cache, jnp.asarray(tokens, jnp.int32), every=every)
        return logits


def feed(graphdef: nnx.GraphDef, params: nnx.State, cache: nnx.State, tokens: jax.Array,
         every: bool = False) -> tuple[jax.Array, nnx.State]:
    """The decode-mode model (graphdef, params, cache) fed tokens [B, T] -> (fp32 logits of the next token [B, V],
    or [B, T, V] at every position; the new cache)."""
    model = nnx.merge(graphdef, cache, params)
    x, w = model.head_inputs(tokens)
    logits = model.logits(x if every else x[:, -1], w)
    return logits.astype(jnp.float32), nnx.state(model, nnx.Cache)


def sample(graphdef: nnx.GraphDef, params: nnx.State, cache: nnx.State, logits: jax.Array, key: jax.Array, *,
           steps: int, sampling: Sampling, eot: int | None) -> tuple[jax.Array, jax.Array, nnx.State]:
    """Draw up to `steps` tokens per row, the first from `logits` [B, V], each next one from the decode-mode model
    fed the one before; a row ends at `eot` (None: never), and the loop once every row has.

    Returns tokens [B, steps] (eot after a row's end), the number of tokens drawn per row (a scalar array) and the
    new cache.
    """
    first = sample_logits(logits, jax.random.fold_in(key, 0), sampling)
    fill = 0 if eot is None else eot  # after a row's end
    tokens = jnp.full((logits.shape[0], steps), fill, jnp.int32).at[:, 0].set(first)
    ended = (lambda token: token == eot) if eot is not None else (lambda token: jnp.zeros(token.shape, bool))

    def running(carry):
        i, _, _, done = carry
        return (i < steps) & ~jnp.all(done)

    def step(carry):
        i, cache, tokens, done = carry
        logits, cache = feed(graphdef, params, cache, jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1))
        token = jnp.where(done, fill, sample_logits(logits, jax.random.fold_in(key, i), sampling))
        return i + 1, cache, tokens.at[:, i].set(token), done | ended(token)

    drawn, cache, tokens, _ = jax.lax.while_loop(running, step, (jnp.int32(1), cache, tokens, ended(first)))
    return tokens, drawn, cache


@dataclass
class Generation:
    """What `generate` returns: tokens [B, N] (N = max_new_tokens; after a row's EOT, EOT again), lengths [B] (new
    tokens per row, its EOT included), steps (tokens drawn per row before all rows ended), prompt_tokens (the
    left-padded prompt length T) and wall times in seconds (compilation apart)."""

    tokens: np.ndarray
    lengths: np.ndarray
    steps: int
    prompt_tokens: int
    compile_seconds: float
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens drawn per second over all rows in the decode loop (after the prefill)."""
        return self.tokens.shape[0] * self.steps / self.decode_seconds

    def rows(self) -> list[list[int]]:
        """Each row's new tokens, up to and including its EOT."""
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def generate(model: GPT, prompts: Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0, eot: int | None = EOT,
             prefill_chunk: int | None = None) -> Generation:
    """Generate up to `max_new_tokens` tokens after each prompt (token ids; rows may differ in length).

    The prompt is fed in pieces of `prefill_chunk` tokens (None: at once; rows are left-padded to a multiple of
    it), which bounds the softmax prefill's [T, max_length] scores for long prompts. The same seed gives the same
    tokens. Raises UserError for an empty prompt or a row longer than the model's `max_context`.
    """
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tokens, start = left_pad(prompts, prefill_chunk or 1)
    (B, T), longest = tokens.shape, tokens.shape[1] - int(start.min())
    limit = max_context(model)
    if limit is not None and longest + max_new_tokens > limit:
        raise UserError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds block_size {limit}, "
                        f"the positions the model learned ({model.cfg.mixer} attention needs a position embedding)")
    decoder = Decoder(model, B, T + max_new_tokens, start)
    pieces = np.split(tokens, T // (prefill_chunk or T), axis=1)
    key = jax.random.key(seed)
    args = decoder.params, decoder.cache

    t0 = time.perf_counter()  # compile first, so that the times below are the steady state's
    prefill = decoder.jit_feed.lower(*args, pieces[0]).compile()
    logits = jax.ShapeDtypeStruct((B, model.cfg.vocab_size), jnp.float32)
    draw = decoder.jit_sample.lower(*args, logits, key, steps=max_new_tokens, sampling=sampling, eot=eot).compile()
    t1 = time.perf_counter()
    cache = decoder.cache
    for piece in pieces:
        logits, cache = prefill(decoder.params, cache, piece)
    logits.block_until_ready()
    t2 = time.perf_counter()
    new, drawn, _ = draw(decoder.params, cache, logits, key)
    new, drawn = np.asarray(new), int(drawn)
    t3 = time.perf_counter()

    ended = new == eot if eot is not None else np.zeros(new.shape, bool)
    lengths = np.where(ended.any(axis=1), ended.argmax(axis=1) + 1, drawn)
    return Generation(new, lengths, drawn, T, t1 - t0, t2 - t1, t3 - t2)
