"""Helpers shared by the chunked ops: input checks, backend dispatch, padding the time axis and splitting it into
chunks, and reading a row of a value inside a Pallas kernel."""

import jax
import jax.numpy as jnp

SM_COUNT = 132  # streaming multiprocessors of an H100 / H200 (SXM): the kernels' grid heuristics fill them


def check_shapes(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    initial_state: jax.Array | None = None,
    *,
    per_head: dict[str, jax.Array | None] | None = None,
    per_key: dict[str, jax.Array | None] | None = None,
) -> None:
    """One-line ValueError unless q and k are [B, T, H, K], v [B, T, H, V], every array of `per_head` (name ->
    array; None skipped) [B, T, H], every one of `per_key` [B, T, H, K], and initial_state None or [B, H, K, V].
    (Padding T to whole chunks would otherwise line up inputs of different lengths without an error.)"""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {list(q.shape)} and {list(k.shape)}")
    B, T, H, K = q.shape
    if v.ndim != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V] like q, got {list(v.shape)}")
    for names, shape in ((per_head, (B, T, H)), (per_key, (B, T, H, K))):
        for name, x in (names or {}).items():
            if x is not None and x.shape != shape:
                raise ValueError(f"{name} must be {list(shape)} like q, got {list(x.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, K, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, K, V] = {[B, H, K, v.shape[-1]]}, "
                         f"got {list(initial_state.shape)}")


def pad_time(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pad axis 1 (time) of `x` [B, T, ...] up to a multiple of `multiple`."""
    pad = -x.shape[1] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths)


def pow2_dim(d: int) -> int:
    """A kernel's size for head dim d: the next power of two, at least 16 (Triton's block shapes)."""
    return max(16, 1 << (d - 1).bit_length())


def pad_trailing(x: jax.Array, *sizes: int) -> jax.Array:
    """Zero-pad the trailing len(sizes) axes of x [..., D1, ..., Dn] up to sizes [..., S1, ..., Sn]."""
    widths = [(0, 0)] * (x.ndim - len(sizes)) + [(0, n - d) for n, d in zip(sizes, x.shape[-len(sizes):])]
    return jnp.pad(x, widths)


def to_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, T, H, D] (T a multiple of chunk_size) -> [B, H, N, C, D] with N = T / C chunks of C steps."""
    B, T, H, D = x.shape
    return x.reshape(B, T // chunk_size, chunk_size, H, D).transpose(0, 3, 1, 2, 4)


def from_chunks(x: jax.Array, T: int) -> jax.Array:
    """[B, H, N, C, D] -> [B, T, H, D], dropping the padded steps beyond T."""
    B, H, N, C, D = x.shape
    return x.transpose(0, 2, 3, 1, 4).reshape(B, N * C, H, D)[:, :T]


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """fp32 for fp32 and narrower inputs; fp64 inputs stay fp64 (used to check the math)."""
    return jnp.promote_types(dtype, jnp.float32)


BACKENDS = ("auto", "xla", "pallas")


def resolve_backend(backend: str) -> str:
    """The implementation an op runs: 'xla' (the chunked reference, any device) or 'pallas' (fused GPU kernels).

    'auto' is 'pallas' on GPU and 'xla' elsewhere; an explicit name is honoured ('pallas' off GPU runs the kernels
    in Pallas's interpreter: tests only).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return backend


def value_row(x: jax.Array, j) -> jax.Array:
    """x[j] [D] of a value x [S, D] inside a Pallas Triton kernel, which cannot index a value's row: a masked
    sum, so exact."""
    return jnp.sum(jnp.where(jax.lax.broadcasted_iota(jnp.int32, x.shape, 0) == j, x, 0.0), axis=0)
