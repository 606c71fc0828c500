"""Unit-lower-triangular solves, the UT transform of the delta-rule family's chunked form.

On GPU (and TPU) this is XLA's `triangular_solve` (cuBLAS trsm). On the CPU it is forward substitution in plain
XLA ops: jaxlib's CPU LAPACK kernels (0.10.x) split a batched solve into tasks on XLA's intra-op thread pool and
block a pool thread until they finish, so two solves that the runtime starts at once on a two-thread pool wait for
each other forever (every thread idle in `BlockingCounter::Wait` under `lapack_strsm_ffi`).
"""

import jax
import jax.numpy as jnp


def unit_lower_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """X with L X = b, L the unit lower-triangular part of `a`; a's diagonal and upper triangle are ignored.

    Args:
        a: [..., C, C].
        b: [..., C, D] in a's dtype.

    Returns:
        X: [..., C, D]. Differentiable in both arguments; a's gradient is strictly lower-triangular.
    """
    return jax.lax.platform_dependent(a, b, cpu=_substitution_solve, default=_trsm)


def _trsm(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.lax.linalg.triangular_solve(a, b, left_side=True, lower=True, unit_diagonal=True)


def _forward_substitution(a: jax.Array, b: jax.Array) -> jax.Array:
    """Row i: x_i = b_i - sum_{j<i} a_ij x_j, one row per loop step (fp32 products at full precision)."""
    C = a.shape[-1]
    cols = jnp.arange(C)

    def row(i, x):
        a_i = jnp.where(cols < i, a[..., i, :], 0)  # [..., C]: only the rows of x already solved
        x_i = b[..., i, :] - jnp.einsum("...c,...cd->...d", a_i, x, precision=jax.lax.Precision.HIGHEST)
        return x.at[..., i, :].set(x_i)

    return jax.lax.fori_loop(1, C, row, b)


@jax.custom_vjp
def _substitution_solve(a: jax.Array, b: jax.Array) -> jax.Array:
    return _forward_substitution(a, b)


def _substitution_fwd(a: jax.Array, b: jax.Array):
    x = _forward_substitution(a, b)
    return x, (a, x)


def _substitution_bwd(res, dx: jax.Array):
    """db = L^{-T} dx (L^T reversed on both axes is unit lower-triangular again); da = -strict_tril(db x^T)."""
    a, x = res
    flip = lambda t: jnp.flip(t, axis=(-2, -1))  # noqa: E731
    db = jnp.flip(_forward_substitution(flip(jnp.swapaxes(a, -1, -2)), jnp.flip(dx, axis=-2)), axis=-2)
    da = -jnp.tril(jnp.einsum("...id,...jd->...ij", db, x, precision=jax.lax.Precision.HIGHEST), -1)
    return da.astype(a.dtype), db


_substitution_solve.defvjp(_substitution_fwd, _substitution_bwd)
