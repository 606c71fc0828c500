"""CPU fp32 parity of the scalar-decay linear-attention op (jaxgpt.ops.simple_gla) against FLA 0.6.0's naive
PyTorch ops, loaded without Triton (torch_ref.fla_naive): `naive_recurrent_simple_gla` (input-dependent decay),
`naive_recurrent_linear_attn` (no decay) and `naive_retention` (the fixed per-head decay log(1 - 2^(-5-h))).
Outputs, final states and the gradients w.r.t. q, k, v, g and the initial state, within 1e-5, at ragged T (37 steps
in chunks of 16) and whole chunks; strong decays stay finite; the GPU path (the delta rule's chunk kernels without
the WY step) matches the XLA path in Pallas interpret mode and lowers to Triton.

GPU (`pytest -m gpu parity_tests/test_simple_gla.py` on the device): bf16, both backends, against FLA 0.6.0's Triton
`chunk_simple_gla`, `chunk_retention` and `chunk_linear_attn` (normalize=False, as the LinearAttention layer calls
it), B8 T1024 H12 D64, B2 T4096 H16 D64 and a ragged T = 65, with test_gpu_mixers.py's thresholds. Where FLA
refuses its gated backward (chunk_simple_gla's dq/dk/dg on Hopper under Triton 3.4 to 3.7.0, FLA issue #640), the
gradients are held to the fp32 reference within 1.25x FLA's usual bf16 error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxgpt.ops import chunk_simple_gla, naive_recurrent_simple_gla
from jaxgpt.ops.delta_rule import pallas as delta_pallas
from jaxgpt.ops.simple_gla import pallas as simple_gla_pallas
from jaxgpt.spec.constants import retention_log_decays
from parity_tests.helpers import fla_gated_backward, rel_err
from parity_tests.test_ops_parity import torch_outputs_and_grads
from torch_ref.fla_naive import load_fla_file

TOL = 1e-5
FAST_COMPILE = {"xla_backend_optimization_level": 0}
FLA_SIMPLE_GLA = load_fla_file("ops/simple_gla/naive.py")
FLA_LINEAR_ATTN = load_fla_file("ops/linear_attn/naive.py")
FLA_RETENTION = load_fla_file("ops/retention/naive.py")
NAMES = ("o", "ht", "dq", "dk", "dv", "dg", "dh0")


def random_inputs(rng, B, T, H, K, V, decay: bool = True, strength: float = 1.0):
    """(q, k, v, g or None, h0), (do, dht) in fp32; g = strength * logsigmoid(x), in (-inf, 0)."""
    q, k = (rng.standard_normal((B, T, H, K), np.float32) for _ in range(2))
    v = rng.standard_normal((B, T, H, V), np.float32)
    g = (strength * -np.logaddexp(0, -rng.standard_normal((B, T, H)))).astype(np.float32) if decay else None
    h0 = rng.standard_normal((B, H, K, V), np.float32)
    do = rng.standard_normal((B, T, H, V), np.float32)
    dht = rng.standard_normal((B, H, K, V), np.float32)
    return (q, k, v, g, h0), (do, dht)


def jax_outputs_and_grads(op, inputs, cotangents, compile_options: dict | None = FAST_COMPILE, **kwargs):
    """(o, h_T, dq, dk, dv, [dg,] dh0) of `op(q, k, v, g, initial_state=h0, output_final_state=True, **kwargs)`;
    dg only when g is given. Compiled at XLA's lowest backend optimisation level (compiling dominates)."""
    q, k, v, g, h0 = inputs
    args = [jnp.asarray(x) for x in (q, k, v, h0)] + ([] if g is None else [jnp.asarray(g)])

    def run(args, cotangents):
        def fn(q, k, v, h0, g=None):
            return op(q, k, v, g, initial_state=h0, output_final_state=True, **kwargs)

        (o, ht), vjp = jax.vjp(fn, *args)
        dq, dk, dv, dh0, *dg = vjp((cotangents[0].astype(o.dtype), cotangents[1]))  # o is in q's dtype
        return (o, ht, dq, dk, dv, *dg, dh0)

    cotangents = tuple(jnp.asarray(x) for x in cotangents)
    return jax.jit(run).lower(args, cotangents).compile(compile_options)(args, cotangents)


def fla_outputs_and_grads(inputs, cotangents):
    """The same through FLA's naive recurrences (simple GLA with g, linear attention without)."""
    q, k, v, g, h0 = inputs
    if g is None:
        def fn(q, k, v, h0):
            return FLA_LINEAR_ATTN.naive_recurrent_linear_attn(q, k, v, initial_state=h0, output_final_state=True)
        o, ht, (dq, dk, dv, dh0) = torch_outputs_and_grads(fn, [q, k, v, h0], *cotangents)
        return o, ht, dq, dk, dv, dh0

    def fn(q, k, v, g, h0):
        return FLA_SIMPLE_GLA.naive_recurrent_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o, ht, (dq, dk, dv, dg, dh0) = torch_outputs_and_grads(fn, [q, k, v, g, h0], *cotangents)
    return o, ht, dq, dk, dv, dg, dh0


def errors(got, ref, decay: bool) -> dict[str, float]:
    names = NAMES if decay else tuple(n for n in NAMES if n != "dg")
    assert len(got) == len(ref) == len(names)
    return {n: rel_err(a, b) for n, a, b in zip(names, got, ref)}


CASES = [  # (B, T, H, K, V), chunk_size, with decay
    ((2, 37, 2, 16, 32), 16, True),  # ragged: 3 chunks, the last padded
    ((2, 37, 2, 16, 32), 16, False),
    ((1, 64, 3, 32, 16), 64, True),  # one whole chunk, K > V
]


@pytest.mark.parametrize("shape,chunk_size,decay", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_chunk_and_naive_match_fla(shape, chunk_size, decay):
    inputs, cot = random_inputs(np.random.default_rng(0), *shape, decay=decay)
    ref = fla_outputs_and_grads(inputs, cot)
    chunk = jax_outputs_and_grads(chunk_simple_gla, inputs, cot, chunk_size=chunk_size, backend="xla")
    naive = jax_outputs_and_grads(naive_recurrent_simple_gla, inputs, cot)
    for label, got in (("chunk", chunk), ("naive", naive)):
        errs = errors(got, ref, decay)
        assert max(errs.values()) < TOL, f"{label}: {errs}"


def test_retention_decay_matches_fla_naive_retention():
    """chunk_simple_gla with g = log(1 - 2^(-5-h)) per head is FLA's retention (`naive_retention`, [B, H, T, D]
    layout, no state): outputs and the gradients of q, k, v."""
    rng = np.random.default_rng(1)
    B, T, H, K, V = 2, 40, 4, 16, 32
    (q, k, v, _, _), (do, _) = random_inputs(rng, B, T, H, K, V, decay=False)
    ts = [torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v)]
    o_ref = FLA_RETENTION.naive_retention(*ts)
    (o_ref * torch.from_numpy(do.transpose(0, 2, 1, 3))).sum().backward()
    ref = [o_ref.detach()] + [t.grad for t in ts]
    ref = [np.asarray(x).transpose(0, 2, 1, 3) for x in ref]

    g = jnp.broadcast_to(jnp.asarray(retention_log_decays(H), jnp.float32), (B, T, H))

    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: chunk_simple_gla(q, k, v, g, chunk_size=16, backend="xla")[0], q, k, v)
        return [o, *vjp(do)]

    got = run(q, k, v, do)
    errs = {n: rel_err(a, b) for n, a, b in zip(("o", "dq", "dk", "dv"), got, ref)}
    assert max(errs.values()) < TOL, errs


def test_strong_decay_is_finite_and_exact():
    """Decays of up to -30 per step (the chunk's cumulative log-decay reaches ~ -1e3): every exponent stays <= 0, so
    chunk and recurrence agree and nothing overflows. dg within 1e-4: at |G| ~ 1e3 the fp32 cumulative sum carries
    ~1e-4 absolute rounding into every decay exponent."""
    inputs, cot = random_inputs(np.random.default_rng(2), 1, 48, 2, 16, 16, strength=30.0)
    chunk = jax_outputs_and_grads(chunk_simple_gla, inputs, cot, chunk_size=48, backend="xla")
    naive = jax_outputs_and_grads(naive_recurrent_simple_gla, inputs, cot)
    assert all(np.isfinite(np.asarray(x)).all() for x in chunk)
    errs = errors(chunk, naive, True)
    assert errs.pop("dg") < 10 * TOL and max(errs.values()) < TOL, errs


@pytest.mark.parametrize("shape,chunk_size,decay,strength", [
    ((1, 40, 2, 16, 32), 16, True, 4.0),  # ragged T, K != V, strong decay
    ((1, 70, 2, 32, 16), 32, True, 1.0),  # a part-filled last chunk of 32
    ((2, 33, 1, 24, 40), 16, True, 1.0),  # head dims padded to 32 and 64
    ((1, 40, 2, 16, 16), 16, False, 1.0),  # no decay: the ungated kernels
], ids=lambda c: str(c).replace(" ", ""))
def test_pallas_interpret_matches_xla(shape, chunk_size, decay, strength):
    """The GPU path in Pallas interpret mode: output, final state and every gradient against the XLA path."""
    inputs, cot = random_inputs(np.random.default_rng(3), *shape, decay=decay, strength=strength)
    got = jax_outputs_and_grads(chunk_simple_gla, inputs, cot, chunk_size=chunk_size, backend="pallas")
    with jax.default_matmul_precision("highest"):
        ref = jax_outputs_and_grads(chunk_simple_gla, inputs, cot, chunk_size=chunk_size, backend="xla")
    errs = errors(got, ref, decay)
    assert max(errs.values()) < TOL, errs


def test_pallas_interpret_bf16_within_bf16_error():
    """The GPU path's bf16 operands and casts (interpreted): output, state and every gradient within the GPU tests'
    bf16 bound (8e-3) of the fp32 xla path, at RetNet's head dims (K 64, V 128) over three chunks."""
    inputs, cot = random_inputs(np.random.default_rng(5), 1, 130, 2, 64, 128)
    bf16 = tuple(jnp.asarray(x, jnp.bfloat16) for x in inputs[:3]) + inputs[3:]
    got = jax_outputs_and_grads(chunk_simple_gla, bf16, cot, backend="pallas")
    with jax.default_matmul_precision("highest"):
        ref = jax_outputs_and_grads(chunk_simple_gla, inputs, cot, backend="xla")
    errs = errors([np.asarray(x, np.float32) for x in got], ref, True)
    assert max(errs.values()) < 8e-3, errs


@pytest.mark.parametrize("K,V,decay", [(64, 128, True), (128, 128, True), (64, 64, False)])
def test_lowers_to_triton(K, V, decay, cuda_module):
    """The bf16 forward + backward export for CUDA: each kernel of the path lowers to Triton IR (compiling needs a
    GPU), and neither WY kernel runs. (64, 128) is RetNet's head dims, (128, 128) Mamba2's, no decay linear
    attention's."""
    options = delta_pallas.Options(scale=K**-0.5, chunk=64, block_v=32, tril_inverse="pallas", interpret=False)

    def fwd_bwd(q, k, v, gate, h0, do):
        (o, ht), vjp = jax.vjp(lambda *x: simple_gla_pallas.simple_gla(*x, options), q, k, v, gate, h0)
        return o, vjp((do, jnp.zeros_like(ht)))

    bf, f32 = jnp.bfloat16, jnp.float32
    B, T, H = 2, 192, 2
    args = [jax.ShapeDtypeStruct((B, T, H, K), bf)] * 2 + [jax.ShapeDtypeStruct((B, T, H, V), bf),
            jax.ShapeDtypeStruct((B, T, H), f32) if decay else None, jax.ShapeDtypeStruct((B, H, K, V), f32),
            jax.ShapeDtypeStruct((B, T, H, V), bf)]
    module = cuda_module(fwd_bwd, *args)
    kernels = ("_state_fwd_kernel", "_output_fwd_kernel", "_dv_local_kernel", "_state_bwd_kernel", "_dqkw_kernel")
    missing = [name for name in kernels if f'name = "{name}"' not in module]
    assert not missing, f"kernels that did not lower to a Triton call: {missing}"
    assert "_wy_" not in module


def test_options():
    x = jnp.zeros((1, 8, 1, 16))
    with pytest.raises(ValueError, match="backend"):
        chunk_simple_gla(x, x, x, backend="triton")
    with pytest.raises(ValueError, match="chunk_size in"):
        chunk_simple_gla(x, x, x, chunk_size=128, backend="pallas")
    assert simple_gla_pallas.kernels_take(x, x, jnp.zeros((1, 8, 1, 200)))  # padded to 256
    assert not simple_gla_pallas.kernels_take(x, x, jnp.zeros((1, 8, 1, 512)))  # V > 256
    assert not simple_gla_pallas.kernels_take(x, x.astype(jnp.bfloat16), x)  # mixed dtypes
    assert not simple_gla_pallas.kernels_take(x, x, x.astype(jnp.int32))
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_simple_gla(x, x, x, chunk_size=0, backend="xla")
    # auto off GPU (and any unsupported shape on GPU) is the xla path
    o_auto, _ = chunk_simple_gla(x + 1, x + 1, x + 1, chunk_size=16)
    o_xla, _ = chunk_simple_gla(x + 1, x + 1, x + 1, chunk_size=16, backend="xla")
    np.testing.assert_array_equal(o_auto, o_xla)


# ------------------------------------------------------------------------------------------------ GPU

GPU_SHAPES = [(8, 1024, 12, 64, 64), (2, 4096, 16, 64, 64), (2, 65, 4, 64, 64)]  # (B, T, H, K, V)
GPU_OPS = ("chunk_simple_gla", "chunk_retention", "chunk_linear_attn")


def fla_gpu_outputs_and_grads(op, inputs, cotangents):
    """FLA's Triton op in bf16 (q, k, v, do bf16; g and the states fp32): (o, h_T, dq, dk, dv, [dg,] dh0)."""
    from fla.ops.linear_attn import chunk_linear_attn
    from fla.ops.retention import chunk_retention
    from fla.ops.simple_gla import chunk_simple_gla as fla_chunk_simple_gla

    q, k, v, g, h0 = (None if x is None else torch.tensor(x, device="cuda") for x in inputs)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q, k, v))
    h0.requires_grad_()
    if op == "chunk_simple_gla":
        g.requires_grad_()
        o, ht = fla_chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    elif op == "chunk_retention":
        o, ht = chunk_retention(q, k, v, initial_state=h0, output_final_state=True)
    else:
        o, ht = chunk_linear_attn(q, k, v, initial_state=h0, output_final_state=True, normalize=False)
    do, dht = (torch.tensor(x, device="cuda") for x in cotangents)
    inputs = (q, k, v) + ((g,) if op == "chunk_simple_gla" else ()) + (h0,)
    grads = [None] * len(inputs)
    with fla_gated_backward():
        grads = torch.autograd.grad((o.float() * do.bfloat16().float()).sum() + (ht.float() * dht).sum(), inputs)
    return [None if t is None else t.detach().float().cpu().numpy() for t in (o, ht, *grads)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("op", GPU_OPS)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}_T{}_H{}_K{}_V{}".format(*s))
def test_bf16_parity_with_fla(shape, op, backend):
    """bf16 jaxgpt (q, k, v, do in bf16; g, states fp32) against FLA 0.6.0's Triton op, both against an fp32
    reference (jaxgpt's xla path in fp32, full-precision products, from the same bf16-rounded inputs), with
    test_gpu_mixers.py's thresholds. Retention's decay is jaxgpt.spec.constants.retention_log_decays (FLA's
    chunk_retention builds its own); linear attention has none."""
    from parity_tests.test_gpu_parity import ACCURACY_FACTOR, FWD_TOL, GRAD_TOL, NOISE_FACTOR

    B, T, H, K, V = shape
    rng = np.random.default_rng(T)
    (q, k, v, g, h0), (do, dht) = random_inputs(rng, B, T, H, K, V, decay=op == "chunk_simple_gla")
    q, k, v, do = (np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)) for x in (q, k, v, do))
    if op == "chunk_retention":
        g = np.broadcast_to(np.asarray(retention_log_decays(H), np.float32), (B, T, H)).copy()
    inputs, cot = (q, k, v, g, h0), (do, dht)

    def bf16(op_fn):
        def fn(q, k, v, g, **kw):
            return op_fn(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), g, **kw)
        return fn

    got = jax_outputs_and_grads(bf16(chunk_simple_gla), inputs, cot, None, backend=backend)
    with jax.default_matmul_precision("highest"):
        ref = jax_outputs_and_grads(chunk_simple_gla, inputs, cot, None, backend="xla")
    fla = fla_gpu_outputs_and_grads(op, (q, k, v, g if op == "chunk_simple_gla" else None, h0), cot)
    if op == "chunk_retention":  # the decay is a constant there: no dg to compare
        got, ref = [x for i, x in enumerate(got) if i != 5], [x for i, x in enumerate(ref) if i != 5]
    names = NAMES if op == "chunk_simple_gla" else tuple(n for n in NAMES if n != "dg")
    report = {n: {"jax_vs_fp32": rel_err(a, r)} | ({} if f is None else {"jax_vs_fla": rel_err(a, f),
                                                                          "fla_vs_fp32": rel_err(f, r)})
              for n, a, f, r in zip(names, got, fla, ref)}
    print(op, backend, shape, report)
    assert len(report) == len(names) and "jax_vs_fla" in report["o"]
    for name, e in report.items():
        tol = FWD_TOL if name in ("o", "ht") else GRAD_TOL
        if "jax_vs_fla" not in e:  # no FLA gradient on this machine (#640): FLA's usual bf16 error is the bound
            assert e["jax_vs_fp32"] <= ACCURACY_FACTOR * tol, (name, e)
            continue
        assert e["jax_vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["jax_vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)
