"""The MLP backward's first matmul with GELU's derivative fused into its epilogue, as a Pallas Mosaic GPU (Hopper)
kernel:

    du = bf16(dy @ w_proj^T) * gelu'(u)          dy [M, C], w_proj [F, C] (c_proj's kernel), u [M, F] = x @ w_fc

dg = dy @ w_proj^T is rounded to bf16 before the product, as the unfused path (a bf16 matmul, then GELU's backward
on its bf16 output) does; gelu'(u) = Phi(u) + u * phi(u) in fp32, with an erf that needs no division (below).
Unfused, XLA writes dg and reads it back with u in a separate fusion; here u is read in the epilogue and only du
is written (docs/kernels-mlp.md).

Kernel: persistent (one program per SM, `plgpu.nd_loop` over output tiles in a planar snake order), warp
specialized: a memory warpgroup streams [tile_k]-deep slabs of dy and w_proj through a `STAGES`-deep TMA pipeline
into shared memory, two compute warpgroups each accumulate a [TILE_M, TILE_N] fp32 block with wgmma (the CTA tile
is [TILE_M, 2 TILE_N]). Each compute warpgroup starts the TMA load of its u block before its main loop and applies
the epilogue per 64 x 64 sub-tile, writing du over u in shared memory and storing it with TMA.

There is no forward counterpart (c_fc + GELU in one kernel): it is no faster than cuBLAS + XLA's GELU fusion,
because its epilogue's arithmetic is not overlapped with the tensor cores and this kernel's main loop is slower
than cuBLAS's.

Only bf16 / fp16 operands with M % TILE_M == 0, F % (2 TILE_N) == 0 and C % TILE_K == 0 are supported
(`supported`); the caller falls back to XLA otherwise.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxgpt.ops.utils import SM_COUNT

f32 = jnp.float32
# Tiles and pipeline depth (4 stages do not fit in shared memory beside the u tiles; why: docs/kernels-mlp.md).
# scripts/profile_step.py (mlp_dgrad_gelu's time in the train step) picks these.
TILE_M, TILE_N, TILE_K, EPI = 128, 128, 64, 64
STAGES = 3
SNAKE_WIDTH = 4

# erf(z) ~ z * P(z^2) / Q(z^2) on z in [-4, 4] (|error| < 5e-7 in fp32; erf(+-4) rounds to +-1) (Eigen's rational
# approximation). Q < 0 on [0, 16], so 1 / Q = -rsqrt(Q^2): one MUFU instruction instead of an IEEE division.
_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
      -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
      -1.42647390514189e-02)


def _horner(coefs, t):
    p = coefs[0] * t + coefs[1]
    for c in coefs[2:]:
        p = p * t + c
    return p


def erf_fast(z: jax.Array) -> jax.Array:
    """erf in fp32 without a division (|error| < 1e-6)."""
    z = jnp.minimum(jnp.maximum(z, -4.0), 4.0)
    t = z * z
    q = _horner(_Q, t)
    return -(z * _horner(_P, t)) * lax.rsqrt(q * q)


def gelu_grad(u: jax.Array) -> jax.Array:
    """GELU'(u) = Phi(u) + u * phi(u), fp32."""
    cdf = 0.5 + 0.5 * erf_fast(u * (1 / math.sqrt(2)))
    return cdf + u * (jnp.exp2(u * u * (-0.5 / math.log(2))) * (1 / math.sqrt(2 * math.pi)))


def supported(M: int, C: int, F: int, dtype) -> bool:
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and M % TILE_M == 0
            and F % (2 * TILE_N) == 0 and C % TILE_K == 0)


def dgrad_gelu_pallas(dy: jax.Array, w_proj: jax.Array, u: jax.Array, interpret: bool = False) -> jax.Array:
    """du = bf16(dy @ w_proj^T) * gelu'(u) in u's dtype.   dy [M, C], w_proj [F, C], u [M, F] (2-D, `supported`).

    interpret: Pallas's GPU interpreter (tests, off GPU); it takes w_proj transposed in XLA (its shared-memory
    model has no transposed views), the GPU kernel reads w_proj as stored and transposes its tiles for wgmma.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    M, C = dy.shape
    F = w_proj.shape[0]
    if not supported(M, C, F, dy.dtype) or w_proj.shape != (F, C) or u.shape != (M, F):
        raise ValueError(f"unsupported shapes or dtype: dy {dy.shape} {dy.dtype}, w_proj {w_proj.shape}, u {u.shape}")
    dt = dy.dtype
    b = w_proj.T if interpret else w_proj  # [C, F] or [F, C]
    cta_n = 2 * TILE_N
    m_iters, n_iters, k_iters = M // TILE_M, F // cta_n, C // TILE_K
    swizzle = plgpu.find_swizzle(TILE_K * jnp.dtype(dt).itemsize * 8)
    tf = (plgpu.TilingTransform((8, swizzle // jnp.dtype(dt).itemsize)), plgpu.SwizzleTransform(swizzle))
    epi_swizzle = plgpu.find_swizzle(EPI * jnp.dtype(dt).itemsize * 8)
    epi_tf = (plgpu.TilingTransform((8, epi_swizzle // jnp.dtype(dt).itemsize)), plgpu.SwizzleTransform(epi_swizzle))
    sub_m, sub_n = TILE_M // EPI, TILE_N // EPI

    if interpret:
        b_spec = plgpu.BlockSpec((TILE_K, cta_n), lambda k: (k, 0), transforms=tf, memory_space=plgpu.SMEM)
    else:
        b_spec = plgpu.BlockSpec((cta_n, TILE_K), lambda k: (0, k), transforms=tf, memory_space=plgpu.SMEM)

    def pipeline(mma, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            mma, grid=(k_iters,), memory_registers=40,
            in_specs=[plgpu.BlockSpec((TILE_M, TILE_K), lambda k: (0, k), transforms=tf, memory_space=plgpu.SMEM),
                      b_spec],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=STAGES, compute_context=compute_context)

    def mlp_dgrad_gelu(dy_gmem, b_gmem, u_gmem, du_gmem):  # the kernel's name in profiles (+ _mosaic_gpu_kernel)
        noop = lambda *_, **__: None  # noqa: E731  (the allocations do not depend on the body)

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(noop, noop).get_allocations(dy_gmem, b_gmem),
            u_smem=plgpu.SMEM((2, sub_m, sub_n, EPI, EPI), dt, transforms=epi_tf),  # per warpgroup: its u block
            u_bar=plgpu.Barrier(num_arrivals=sub_m * sub_n, num_barriers=2),
            collective_axes="wg",
        )
        def _scope(allocs, u_smem, u_bar):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _tile(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 0, SNAKE_WIDTH)
                rows = pl.ds(mi * TILE_M, TILE_M)
                cols = pl.ds(ni * cta_n, cta_n)
                wg_cols = pl.ds(wg * TILE_N, TILE_N)

                def gmem_sub(ref, i, j):  # this warpgroup's (i, j) 64 x 64 sub-tile of an [M, F] array
                    return ref.at[rows, cols].at[:, wg_cols].at[pl.ds(i * EPI, EPI), pl.ds(j * EPI, EPI)]

                def compute_context(run_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((TILE_M, TILE_N), f32))
                    def _acc(acc_ref):
                        # u_smem is free once the previous tile's du stores have read it
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for i in range(sub_m):
                            for j in range(sub_n):
                                plgpu.copy_gmem_to_smem(gmem_sub(u_gmem, i, j), u_smem.at[wg, i, j], u_bar.at[wg])
                        run_pipeline(acc_ref)
                        acc = acc_ref[...]
                        plgpu.barrier_wait(u_bar.at[wg])
                        for i in range(sub_m):
                            for j in range(sub_n):
                                dg = acc[i * EPI:(i + 1) * EPI, j * EPI:(j + 1) * EPI].astype(dt).astype(f32)
                                uu = u_smem[wg, i, j].astype(f32)
                                u_smem[wg, i, j] = (dg * gelu_grad(uu)).astype(dt)
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(u_smem.at[wg, i, j], gmem_sub(du_gmem, i, j))

                def mma(_, a_smem, b_smem, acc_ref):
                    if interpret:
                        b_tile = b_smem.at[:, wg_cols]
                    else:
                        b_tile = b_smem.at[wg_cols, :].transpose((1, 0))
                    plgpu.wgmma(acc_ref, a_smem, b_tile)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                b_block = b_gmem.at[:, cols] if interpret else b_gmem.at[cols, :]
                pipeline(mma, compute_context)(dy_gmem.at[rows, :], b_block, allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        interpret_params, programs = InterpretGPUParams(), 2
    else:
        interpret_params, programs = None, SM_COUNT
    kernel = plgpu.kernel(
        mlp_dgrad_gelu, out_type=jax.ShapeDtypeStruct((M, F), u.dtype), grid=(programs,), grid_names=("sm",),
        num_threads=3, thread_name="wg", interpret=interpret_params,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup, approx_math=True))
    return kernel(dy, b, u)
