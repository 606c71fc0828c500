"""The fast gated delta rule (`chunk_gated_delta_rule(..., backend='pallas')`: the delta-rule kernels with a gate,
hand-written backward).

CPU: in fp32 with the kernels interpreted it must match the 'xla' path (`chunk_gated_delta_rule_xla`, checked against
FLA's naive op in test_ops_parity.py) to rel < 1e-5 in the output, the final state and every gradient (q, k, v, g,
beta, h0), ragged T included. Inputs the kernels do not take must run the xla path. The bf16 forward + backward must
lower to Triton.
GPU (`pytest -m gpu`): in bf16 it must match FLA 0.6.0's Triton `chunk_gated_delta_rule` within FLA's thresholds (or
1.5x FLA's own bf16-vs-fp32 noise) and be as close to the fp32 reference as FLA's bf16 is (within 25%). Where FLA
refuses its gated backward (Hopper under Triton 3.4 to 3.7.0, FLA issue #640), the gradients are held to the fp32
reference within 1.25x FLA's usual bf16 error (8e-3).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.ops import chunk_gated_delta_rule, gdn_gate
from jaxgpt.ops.delta_rule import pallas as delta_pallas
from jaxgpt.ops.gated_delta_rule import pallas as gated_pallas
from parity_tests.helpers import fla_gated_backward
from parity_tests.test_ops_parity import TOL, random_qkv, rel_err

FWD_TOL, GRAD_TOL, NOISE_FACTOR, ACCURACY_FACTOR = 4e-3, 8e-3, 1.5, 1.25  # as parity_tests/test_gpu_parity.py
NAMES = ["o", "ht", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def gated_inputs(rng, B, T, H, K, V, strong=False):
    """[q, k, v, g, beta, h0], do, dht in fp32. g from the layer's gate (`gdn_gate`, FLA's initialisation: A_log =
    log U(1, 16), dt_bias = softplus^{-1}(dt) with dt log-uniform in [1e-3, 0.1]); strong: A_log = log 16 for every
    head and gate logits around +2 (per-step decays down to ~exp(-25); a chunk's decay underflows fp32)."""
    q, k, v, h0, do, dht = random_qkv(rng, B, T, H, K, V)
    a = rng.standard_normal((B, T, H), np.float32) + (2.0 if strong else 0.0)
    A_log = np.log(np.full(H, 16.0) if strong else rng.uniform(1, 16, H))
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.1), H))
    dt_bias = dt + np.log(-np.expm1(-dt))
    g = np.asarray(gdn_gate(jnp.asarray(a), jnp.asarray(A_log, jnp.float32), jnp.asarray(dt_bias, jnp.float32)))
    beta = (1 / (1 + np.exp(-rng.standard_normal((B, T, H))))).astype(np.float32)
    return [q, k, v, g, beta, h0], do, dht


@functools.cache
def jitted_vjp(backend: str, with_h0: bool, **kwargs):
    """A jitted (inputs, do, dht) -> [o, h_T, grads w.r.t. q, k, v, g, beta (and h0)] of `chunk_gated_delta_rule`."""

    def fn(q, k, v, g, beta, h0=None):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, backend=backend,
                                      **kwargs)

    @jax.jit
    def run(inputs, do, dht):
        (o, ht), vjp = jax.vjp(fn, *inputs)
        return [o, ht, *vjp((do, dht))]

    return lambda inputs, do, dht: run([jnp.asarray(x) for x in (inputs if with_h0 else inputs[:5])],
                                       jnp.asarray(do), jnp.asarray(dht))


def assert_matches_xla(inputs, do, dht, with_h0=True, **kwargs):
    ref = jitted_vjp("xla", with_h0, use_qk_l2norm_in_kernel=True, **kwargs)(inputs, do, dht)
    got = jitted_vjp("pallas", with_h0, use_qk_l2norm_in_kernel=True, **kwargs)(inputs, do, dht)
    errs = {name: rel_err(a, b) for name, a, b in zip(NAMES, got, ref)}
    assert len(errs) == (8 if with_h0 else 7) and max(errs.values()) < TOL, errs


@pytest.mark.parametrize("shape,with_h0,chunk_size,strong", [
    ((2, 130, 2, 16, 32), True, 64, False),
    ((1, 130, 1, 32, 16), False, 32, True),
    ((1, 70, 1, 128, 128), True, 64, False),
], ids=["B2T130H2K16V32-h0", "B1T130H1K32V16-C32-strong", "B1T70H1K128V128-h0"])
def test_pallas_matches_xla_fp32(shape, with_h0, chunk_size, strong):
    """Ragged T (a part-filled last chunk); V = 32 takes two recurrence programs per head (block_v 16); K = V = 128:
    the per-chunk kernels take the head dims in 64-column blocks (grid axes and loops)."""
    inputs, do, dht = gated_inputs(np.random.default_rng(shape[1]), *shape, strong=strong)
    assert_matches_xla(inputs, do, dht, with_h0, chunk_size=chunk_size)


@pytest.mark.parametrize("shape,chunk_size", [((1, 20, 2, 12, 16), 64), ((1, 20, 2, 16, 16), 8),
                                              ((1, 0, 2, 16, 16), 64)], ids=["K12", "C8", "T0"])
def test_inputs_the_kernels_do_not_take_run_xla(monkeypatch, shape, chunk_size):
    """A head dim that is not a power of two, a chunk size below the inverse's 16-row blocks, an empty sequence: the
    pallas backend hands them to the xla path, and no kernel is traced."""
    inputs, _, _ = gated_inputs(np.random.default_rng(0), *shape)
    calls = []

    def xla_path(*args):
        calls.append(args)
        return xla(*args)

    xla = gated_pallas.chunk_gated_delta_rule_xla
    monkeypatch.setattr(gated_pallas, "chunk_gated_delta_rule_xla", xla_path)
    monkeypatch.setattr(gated_pallas, "gated_delta_rule", None)  # fails if the kernels were used
    o, _ = jax.eval_shape(functools.partial(chunk_gated_delta_rule, chunk_size=chunk_size, backend="pallas"),
                          *inputs[:5])
    assert len(calls) == 1 and o.shape == inputs[2].shape


def test_kernels_take():
    bf, f32 = jnp.bfloat16, jnp.float32
    x = jax.ShapeDtypeStruct((1, 64, 2, 64), bf)
    assert gated_pallas.kernels_take(x, x, jax.ShapeDtypeStruct((1, 64, 2, 128), bf), 64)
    assert not gated_pallas.kernels_take(x, x, jax.ShapeDtypeStruct((1, 64, 2, 64), f32), 64)  # mixed dtypes
    assert not gated_pallas.kernels_take(x, x, jax.ShapeDtypeStruct((1, 64, 2, 512), bf), 64)  # V > 256
    assert not gated_pallas.kernels_take(x, x, x, 128)  # C > 64


KERNELS = ("_wy_fwd_kernel", "_state_fwd_kernel", "_output_fwd_kernel", "_dv_local_kernel", "_state_bwd_kernel",
           "_dqkw_kernel", "_wy_bwd_kernel")


@pytest.mark.parametrize("D", [64, 128, 256])
def test_lowers_to_triton(D, cuda_module):
    """The bf16 forward + backward (the custom_vjp, on the chunk-local cumulative gate) export for CUDA: every kernel
    lowers to Triton IR with the gate (compiling needs a GPU). D = 256: four 64-column key blocks in `_dqkw`, whose
    dG partial sums XLA adds."""
    options = delta_pallas.Options(scale=D**-0.5, chunk=64, block_v=32, tril_inverse="pallas", interpret=False)

    def fwd_bwd(q, k, v, gate, beta, h0, do):
        (o, ht), vjp = jax.vjp(lambda *x: gated_pallas.gated_delta_rule(*x, options), q, k, v, gate, beta, h0)
        return o, vjp((do, jnp.zeros_like(ht)))

    bf, f32 = jnp.bfloat16, jnp.float32
    B, T, H = 2, 192, 2
    args = [jax.ShapeDtypeStruct((B, T, H, D), bf) for _ in range(3)] + [
        jax.ShapeDtypeStruct((B, T, H), f32), jax.ShapeDtypeStruct((B, T, H), bf),
        jax.ShapeDtypeStruct((B, H, D, D), f32), jax.ShapeDtypeStruct((B, T, H, D), bf)]
    module = cuda_module(fwd_bwd, *args)
    missing = [name for name in KERNELS if f'name = "{name}"' not in module]
    assert not missing, f"kernels that did not lower to a Triton call: {missing}"
    assert not any(f"stablehlo.{op}" in module for op in ("transpose", "triangular_solve", "dot_general"))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 1024, 12, 64), (2, 4096, 16, 64), (1, 16384, 16, 128), (2, 1000, 12, 64)],
                         ids=lambda s: "B{}T{}H{}D{}".format(*s))
def test_bf16_pallas_vs_fla(shape):
    """o, the final state and every gradient (q, k, v, g, beta, h0), with an initial state and the final state's
    cotangent; g from the layer's gate. The ragged T has the first shape's H and D, so FLA's autotuning results
    (keyed by heads and head dims) serve both."""
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

    B, T, H, D = shape
    rng = np.random.default_rng(T)
    inputs, do, dht = gated_inputs(rng, B, T, H, D, D)
    bf16_values = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in inputs[:3] + [inputs[4], do]]
    inputs = bf16_values[:3] + [inputs[3], bf16_values[3], inputs[5]]  # q, k, v, g (fp32), beta, h0 (fp32)
    do = bf16_values[4]
    dtypes = [None, None, None, jnp.float32, None, jnp.float32]

    def jax_results(backend, dtype):
        fn = jitted_vjp(backend, True, use_qk_l2norm_in_kernel=True)
        xs = [jnp.asarray(x, t or dtype) for x, t in zip(inputs, dtypes)]
        return [np.asarray(x, np.float32) for x in fn(xs, jnp.asarray(do, dtype), jnp.asarray(dht))]

    with jax.default_matmul_precision("highest"):
        ref = jax_results("xla", jnp.float32)
    got = jax_results("pallas", jnp.bfloat16)
    ts = [torch.tensor(x, device="cuda", dtype=torch.float32 if t else torch.bfloat16, requires_grad=True)
          for x, t in zip(inputs, dtypes)]
    o, ht = fla_chunk_gated_delta_rule(*ts[:5], initial_state=ts[5], output_final_state=True,
                                       use_qk_l2norm_in_kernel=True)
    grads = [None] * len(ts)
    with fla_gated_backward():
        grads = torch.autograd.grad((o, ht), ts, (torch.tensor(do, device="cuda", dtype=torch.bfloat16),
                                                  torch.tensor(dht, device="cuda")))
    fla = [None if x is None else x.detach().float().cpu().numpy() for x in (o, ht, *grads)]
    report = {name: {"vs_fp32": rel_err(g, r)} | ({} if f is None else {"vs_fla": rel_err(g, f),
                                                                        "fla_vs_fp32": rel_err(f, r)})
              for name, g, r, f in zip(NAMES, got, ref, fla)}
    print(f"\nB{B} T{T} H{H} D{D} (pallas vs fp32 / pallas vs FLA / FLA vs fp32): " + "; ".join(
        f"{n} " + " / ".join(f"{x:.2e}" for x in e.values()) for n, e in report.items()))
    assert len(report) == len(NAMES) and "vs_fla" in report["o"]
    for name, e in report.items():
        tol = FWD_TOL if name in ("o", "ht") else GRAD_TOL
        if "vs_fla" not in e:  # no FLA gradient on this machine: FLA's usual bf16 error is the bound
            assert e["vs_fp32"] <= ACCURACY_FACTOR * tol, (name, e)
            continue
        assert e["vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)
