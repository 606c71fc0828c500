"""Residual add + layer norm as Pallas (Triton backend) kernels, with a hand-written backward (`jax.custom_vjp`).

    x_new = x + r                        (r optional: without it x_new is x itself, nothing is copied)
    y     = (x_new - mean) * rstd * scale + bias,     rstd = 1 / sqrt(var + eps), statistics over the last axis

One kernel each way, each tensor read or written once (what XLA's fusions do not emit: it splits the add from the
norm's statistics and writes the residual gradient and its bf16 copy in two passes):
    forward   _fwd_kernel   reads x, r; writes x_new (x's dtype), y (out_dtype, e.g. bf16 for the next matmul),
                            mean and rstd ([N] fp32, the backward's residuals with x_new)
    backward  _bwd_kernel   reads x_new, mean, rstd, dy and dx_new (the residual stream's gradient from above);
                            writes dx = dx_new + LN'(dy) in x's dtype and its copy in r's dtype (r's gradient), and
                            per-program partial sums of dy * x_hat and dy (scale / bias gradients, summed by XLA)
The backward is torch's: g = dy * scale, dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)).

Tiles: rows of C elements in a power-of-two width BC >= C, masked loads and stores (C = 768, 1024, 1600 ...);
R rows per program (`Tiles.row_elems` // BC), rows past N masked. The backward runs a bounded grid of programs (a few
per SM, `TILES`), each looping over consecutive row blocks and accumulating its weight-gradient partials in
registers, so the partial sums are a few [programs, C] rows. Everything is computed in fp32.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxgpt.ops.utils import SM_COUNT

f32 = jnp.float32


class Tiles(NamedTuple):
    """A kernel's launch shape."""

    row_elems: int  # elements per program's row block: R = row_elems // BC rows
    num_warps: int
    num_stages: int  # software-pipeline stages
    programs_per_sm: int = 0  # backward: the bounded grid's programs per SM


# Launch shapes per kernel, keyed by the smallest model width C each serves (the largest key <= C applies).
# scripts/profile_step.py picks these (docs/kernels-layernorm.md).
TILES = {
    "fwd": {0: Tiles(row_elems=1024, num_warps=8, num_stages=1)},
    "bwd": {0: Tiles(row_elems=1024, num_warps=4, num_stages=3, programs_per_sm=8),
            1024: Tiles(row_elems=2048, num_warps=4, num_stages=2, programs_per_sm=4)},
}


class Options(NamedTuple):
    """Static (hashable) options of `_add_ln`."""

    eps: float
    out_dtype: jnp.dtype  # y's dtype
    r_dtype: jnp.dtype | None  # None: no residual input (x_new is x)
    has_bias: bool
    residual_out: bool  # return x_new (and take its gradient in the backward)
    interpret: bool  # Pallas interpret mode (tests, off GPU)


def _width(C: int) -> int:
    return 1 << (C - 1).bit_length()


def _tiles(kind: str, C: int) -> Tiles:
    table = TILES[kind]
    return table[max(k for k in table if k <= C)]


def _rows(kind: str, C: int) -> int:
    return max(1, _tiles(kind, C).row_elems // _width(C))


def _params(interpret: bool, kind: str, C: int) -> dict:
    if interpret:
        return {"interpret": True}
    t = _tiles(kind, C)
    return {"compiler_params": plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)}


def _tile(row0, N: int, C: int, R: int):
    """Indexer and masks of rows [row0, row0 + R) x columns [0, BC)."""
    BC = _width(C)
    rmask = row0 + jnp.arange(R) < N
    cmask = jnp.arange(BC) < C
    return (pl.ds(row0, R), pl.ds(0, BC)), rmask, cmask, rmask[:, None] & cmask[None, :]


def _fwd_kernel(*refs, N, C, R, eps, has_r, has_bias):
    refs = list(refs)
    x_ref = refs.pop(0)
    r_ref = refs.pop(0) if has_r else None
    s_ref = refs.pop(0)
    b_ref = refs.pop(0) if has_bias else None
    xo_ref = refs.pop(0) if has_r else None
    y_ref, mean_ref, rstd_ref = refs

    row0 = pl.program_id(0) * R
    idx, rmask, cmask, mask = _tile(row0, N, C, R)
    x = plgpu.load(x_ref.at[idx], mask=mask, other=0).astype(f32)
    if has_r:
        xn = (x + plgpu.load(r_ref.at[idx], mask=mask, other=0).astype(f32)).astype(xo_ref.dtype)
        plgpu.store(xo_ref.at[idx], xn, mask=mask)
        x = xn.astype(f32)
    mean = jnp.sum(x, axis=1) / C
    xc = jnp.where(mask, x - mean[:, None], 0.0)
    rstd = jax.lax.rsqrt(jnp.sum(xc * xc, axis=1) / C + eps)
    cols = idx[1]
    y = xc * rstd[:, None] * plgpu.load(s_ref.at[cols], mask=cmask, other=0)[None, :]
    if has_bias:
        y = y + plgpu.load(b_ref.at[cols], mask=cmask, other=0)[None, :]
    plgpu.store(y_ref.at[idx], y.astype(y_ref.dtype), mask=mask)
    plgpu.store(mean_ref.at[idx[0]], mean, mask=rmask)
    plgpu.store(rstd_ref.at[idx[0]], rstd, mask=rmask)


def _bwd_kernel(*refs, N, C, R, blocks_per_program, has_dres, has_r, has_bias):
    refs = list(refs)
    xn_ref, s_ref, mean_ref, rstd_ref, dy_ref = refs[:5]
    refs = refs[5:]
    dres_ref = refs.pop(0) if has_dres else None
    dx_ref = refs.pop(0)
    dr_ref = refs.pop(0) if has_r else None
    ds_ref = refs.pop(0)
    db_ref = refs.pop(0) if has_bias else None

    p = pl.program_id(0)
    BC = _width(C)
    cols = pl.ds(0, BC)
    cmask = jnp.arange(BC) < C
    scale = plgpu.load(s_ref.at[cols], mask=cmask, other=0)

    def body(i, acc):
        ds, db = acc
        idx, rmask, _, mask = _tile((p * blocks_per_program + i) * R, N, C, R)
        mean = plgpu.load(mean_ref.at[idx[0]], mask=rmask, other=0)
        rstd = plgpu.load(rstd_ref.at[idx[0]], mask=rmask, other=0)
        x_hat = jnp.where(mask, (plgpu.load(xn_ref.at[idx], mask=mask, other=0).astype(f32) - mean[:, None])
                          * rstd[:, None], 0.0)
        dy = plgpu.load(dy_ref.at[idx], mask=mask, other=0).astype(f32)
        g = dy * scale[None, :]
        c_xg = jnp.sum(g * x_hat, axis=1) / C
        c_g = jnp.sum(g, axis=1) / C
        dx = rstd[:, None] * (g - c_g[:, None] - x_hat * c_xg[:, None])
        if has_dres:
            dx = dx + plgpu.load(dres_ref.at[idx], mask=mask, other=0).astype(f32)
        plgpu.store(dx_ref.at[idx], dx.astype(dx_ref.dtype), mask=mask)
        if has_r:
            plgpu.store(dr_ref.at[idx], dx.astype(dr_ref.dtype), mask=mask)
        return ds + jnp.sum(dy * x_hat, axis=0), db + jnp.sum(dy, axis=0)

    zero = jnp.zeros((BC,), f32)
    ds, db = jax.lax.fori_loop(0, blocks_per_program, body, (zero, zero))
    out = (pl.ds(p, 1), cols)
    plgpu.store(ds_ref.at[out], ds[None, :], mask=cmask[None, :])
    if has_bias:
        plgpu.store(db_ref.at[out], db[None, :], mask=cmask[None, :])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _add_ln(x, r, scale, bias, opts: Options):
    return _forward(x, r, scale, bias, opts)[0]


def _forward(x, r, scale, bias, opts: Options):
    N, C = x.shape
    R = _rows("fwd", C)
    has_r = r is not None
    shapes = [jax.ShapeDtypeStruct((N, C), x.dtype)] if has_r else []
    shapes += [jax.ShapeDtypeStruct((N, C), opts.out_dtype), jax.ShapeDtypeStruct((N,), f32),
               jax.ShapeDtypeStruct((N,), f32)]
    kernel = functools.partial(_fwd_kernel, N=N, C=C, R=R, eps=opts.eps, has_r=has_r, has_bias=opts.has_bias)
    outs = pl.pallas_call(kernel, out_shape=shapes, grid=(pl.cdiv(N, R),), name="add_layer_norm_fwd",
                          **_params(opts.interpret, "fwd", C))(*(t for t in (x, r, scale, bias) if t is not None))
    x_new, (y, mean, rstd) = (outs[0], outs[1:]) if has_r else (x, outs)
    return (x_new if opts.residual_out else None, y), (x_new, scale, mean, rstd)


def _add_ln_fwd(x, r, scale, bias, opts):
    return _forward(x, r, scale, bias, opts)


def _add_ln_bwd(opts: Options, residuals, cotangents):
    x_new, scale, mean, rstd = residuals
    dres, dy = cotangents
    N, C = x_new.shape
    R = _rows("bwd", C)
    blocks = pl.cdiv(N, R)
    per_program = pl.cdiv(blocks, _tiles("bwd", C).programs_per_sm * SM_COUNT)
    programs = pl.cdiv(blocks, per_program)
    has_r, has_dres = opts.r_dtype is not None, dres is not None
    shapes = [jax.ShapeDtypeStruct((N, C), x_new.dtype)]
    shapes += [jax.ShapeDtypeStruct((N, C), opts.r_dtype)] if has_r else []
    shapes += [jax.ShapeDtypeStruct((programs, C), f32)] * (2 if opts.has_bias else 1)
    kernel = functools.partial(_bwd_kernel, N=N, C=C, R=R, blocks_per_program=per_program, has_dres=has_dres,
                               has_r=has_r, has_bias=opts.has_bias)
    inputs = (x_new, scale, mean, rstd, dy) + ((dres,) if has_dres else ())
    outs = list(pl.pallas_call(kernel, out_shape=shapes, grid=(programs,), name="add_layer_norm_bwd",
                               **_params(opts.interpret, "bwd", C))(*inputs))
    dx = outs.pop(0)
    dr = outs.pop(0) if has_r else None
    dscale = outs.pop(0).sum(0).astype(scale.dtype)
    dbias = outs.pop(0).sum(0).astype(scale.dtype) if opts.has_bias else None
    return dx, dr, dscale, dbias


_add_ln.defvjp(_add_ln_fwd, _add_ln_bwd)


def add_layer_norm_pallas(
    x: jax.Array,
    r: jax.Array | None,
    scale: jax.Array,
    bias: jax.Array | None,
    eps: float,
    out_dtype: jnp.dtype,
    residual_out: bool = True,
    interpret: bool = False,
) -> tuple[jax.Array | None, jax.Array]:
    """(x + r, layer_norm(x + r) in out_dtype) over the last axis; r None: (x, layer_norm(x)).

    x, r [..., C] (r's shape is x's; any float dtypes; x_new takes x's), scale and bias [C] fp32 (bias optional).
    `residual_out=False` returns (None, y) (a final norm: no residual stream after it).
    """
    if r is not None and r.shape != x.shape:
        raise ValueError(f"r {r.shape} must have x's shape {x.shape}")
    C = x.shape[-1]
    opts = Options(float(eps), jnp.dtype(out_dtype), None if r is None else jnp.dtype(r.dtype), bias is not None,
                   residual_out, interpret)
    flat = (lambda t: None if t is None else t.reshape(-1, C))
    x_new, y = _add_ln(flat(x), flat(r), scale, bias, opts)
    return (None if x_new is None else x_new.reshape(x.shape)), y.reshape(x.shape)
