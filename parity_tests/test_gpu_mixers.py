"""bf16 GPU parity of the linear-attention layers: jaxgpt (bf16 compute, fp32 params) vs the real FLA 0.6.0 Triton
layers (`fla.layers.GatedLinearAttention` / `DeltaNet` / `HGRN2Attention` / `MultiScaleRetention` /
`LinearAttention`, fp32 params under bf16 autocast), B=8, C=768, H=12, T=1024 and 4096, forward output and the
gradients w.r.t. the input and every parameter, for both op backends (`xla`, the chunked reference, and `pallas`,
the fused kernels). `gla_depth_0.75` is a gla_depth middle layer (key head dim 48, which the Pallas path zero-pads
to 64).

Errors are relative RMS (||a-b|| / ||b||), thresholds as in parity_tests/test_gpu_parity.py: jaxgpt vs FLA bf16
within FLA's own thresholds (4e-3 forward, 8e-3 gradients) or, where bf16 rounding alone puts FLA's bf16 result
further than that from its fp32 result (the noise floor), within 1.5x that noise; and jaxgpt as close to FLA's fp32
result as FLA's bf16 is (within 25%) or within FLA's threshold of it (the gate bias's gradient, one sum over B*T
tokens per entry, lands at 1.28x FLA's own error at T=4096). FLA's fp32 reference runs its fused recurrent
kernels (its chunk_delta_rule refuses fp32); MultiScaleRetention runs chunk_retention whenever gradients are on,
in fp32 too. `fla.layers.GatedDeltaNet` has its own test at the end (FLA has no fp32 gradient path for it).
On the device: `pytest -m gpu parity_tests/test_gpu_mixers.py`.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxgpt.spec.config import ModelConfig
from jaxgpt.convert import jax_to_torch
from jaxgpt.layers.mixers import LINEAR_LAYERS as JAX_LAYERS
from parity_tests.helpers import fla_gated_backward, rel_err
from parity_tests.test_gpu_parity import ACCURACY_FACTOR, FWD_TOL, GRAD_TOL, NOISE_FACTOR
from parity_tests.test_mixer_parity import LAYERS, jax_layer_vjp
from torch_ref.mixers import LINEAR_LAYERS as TORCH_LAYERS

B = 8
CFG = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=4096, dtype="bfloat16")


def fla_outputs(layer: torch.nn.Module, x: np.ndarray, dy: np.ndarray, autocast: bool):
    """FLA layer output and gradients (input and every parameter) as fp32 numpy arrays."""
    layer.zero_grad(set_to_none=True)
    tx = torch.tensor(x, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = layer(tx)
    (y.float() * torch.from_numpy(dy).cuda()).sum().backward()
    grads = {"x": tx.grad} | {n: p.grad for n, p in layer.named_parameters()}
    return y.float().detach().cpu().numpy(), {n: g.float().cpu().numpy() for n, g in grads.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1024, 4096])
@pytest.mark.parametrize("layer_id", ["gla", "gla_conv", "gla_depth_0.75", "deltanet", "hgrn2", "retnet",
                                      "linear_attn"])
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_bf16_layer_parity_with_fla(layer_id, T, backend):
    import fla.layers

    kind, options = LAYERS[layer_id]
    cfg = dataclasses.replace(CFG, linear_attn_backend=backend)
    jlayer = JAX_LAYERS[kind](cfg, nnx.Rngs(0), **options)  # the harness's effective init
    params = nnx.to_pure_dict(nnx.state(jlayer, nnx.Param))
    tlayer = TORCH_LAYERS[kind](CFG, **options).cuda()
    assert isinstance(tlayer, (fla.layers.GatedLinearAttention, fla.layers.DeltaNet, fla.layers.HGRN2Attention,
                               fla.layers.MultiScaleRetention, fla.layers.LinearAttention))
    tlayer.load_state_dict({n: torch.from_numpy(np.array(w)) for n, w in jax_to_torch(params).items()}, strict=True)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((B, T, CFG.n_embd), np.float32)
    dy = rng.standard_normal((B, T, CFG.n_embd), np.float32)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tlayer.mode = "fused_recurrent"  # fp32 reference: FLA's chunk_delta_rule refuses fp32, its recurrent kernels don't
    ref_y, ref_grads = fla_outputs(tlayer, x, dy, autocast=False)
    tlayer.mode = "chunk"
    t_y, t_grads = fla_outputs(tlayer, x, dy, autocast=True)
    y, dparams, dx = jax_layer_vjp(layer_id, cfg)(params, jnp.asarray(x), jnp.asarray(dy))
    j_y = np.asarray(y, np.float32)
    j_grads = {n: np.asarray(g, np.float32) for n, g in ({"x": dx} | jax_to_torch(dparams)).items()}

    report = {
        "layer": layer_id, "T": T, "backend": backend,
        "y": {"jax_vs_fla": rel_err(j_y, t_y), "jax_vs_fp32": rel_err(j_y, ref_y), "fla_vs_fp32": rel_err(t_y, ref_y)},
        "grads": {n: {"jax_vs_fla": rel_err(j_grads[n], t_grads[n]), "jax_vs_fp32": rel_err(j_grads[n], ref_grads[n]),
                      "fla_vs_fp32": rel_err(t_grads[n], ref_grads[n])} for n in t_grads},
    }
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"gpu_mixer_parity_{layer_id}_{backend}_T{T}.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    for name, e, tol in [("y", report["y"], FWD_TOL)] + [(n, e, GRAD_TOL) for n, e in report["grads"].items()]:
        assert e["jax_vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["jax_vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1024, 4096])
def test_bf16_gated_deltanet_layer_parity_with_fla(T):
    """jaxgpt's Gated DeltaNet layer (bf16 compute, the Pallas kernels) against `fla.layers.GatedDeltaNet` (fp32 params
    under bf16 autocast), with the thresholds above. FLA has no fp32 path with gradients for this layer (its
    fused_recurrent op has no backward), so the fp32 reference is jaxgpt's XLA layer in fp32 at the highest matmul
    precision, which matches FLA's naive ops within 1e-5 on the CPU (parity_tests/test_gated_delta_rule.py). Where FLA
    refuses its gated backward (Hopper under Triton 3.4 to 3.7.0, FLA issue #640), only its output is compared and
    jaxgpt's gradients are held to the fp32 reference within 1.25x FLA's usual bf16 error."""
    import fla.layers

    params = nnx.to_pure_dict(nnx.state(JAX_LAYERS["gated_deltanet"](CFG, nnx.Rngs(0)), nnx.Param))
    tlayer = TORCH_LAYERS["gated_deltanet"](CFG).cuda()
    assert isinstance(tlayer, fla.layers.GatedDeltaNet)
    tlayer.load_state_dict({n: torch.from_numpy(np.array(w)) for n, w in jax_to_torch(params).items()}, strict=True)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((B, T, CFG.n_embd), np.float32)
    dy = rng.standard_normal((B, T, CFG.n_embd), np.float32)

    with fla_gated_backward() as fla:
        t_y, t_grads = fla_outputs(tlayer, x, dy, autocast=True)
    if fla.refused:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            t_y, t_grads = tlayer(torch.tensor(x, device="cuda")).float().cpu().numpy(), None

    def jax_results(cfg):
        y, dparams, dx = jax_layer_vjp("gated_deltanet", cfg)(params, jnp.asarray(x), jnp.asarray(dy))
        return np.asarray(y, np.float32), {n: np.asarray(g, np.float32)
                                           for n, g in ({"x": dx} | jax_to_torch(dparams)).items()}

    with jax.default_matmul_precision("highest"):
        ref_y, ref_grads = jax_results(dataclasses.replace(CFG, dtype="float32", linear_attn_backend="xla"))
    j_y, j_grads = jax_results(dataclasses.replace(CFG, linear_attn_backend="pallas"))

    def errors(j, t, ref):
        return {"jax_vs_fp32": rel_err(j, ref)} | ({} if t is None else {"jax_vs_fla": rel_err(j, t),
                                                                         "fla_vs_fp32": rel_err(t, ref)})

    report = {"layer": "gated_deltanet", "T": T, "backend": "pallas", "fla_gradients": t_grads is not None,
              "y": errors(j_y, t_y, ref_y),
              "grads": {n: errors(j_grads[n], None if t_grads is None else t_grads[n], ref_grads[n])
                        for n in ref_grads}}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"gpu_mixer_parity_gated_deltanet_pallas_T{T}.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    assert "jax_vs_fla" in report["y"] and set(ref_grads) == {"x"} | set(dict(tlayer.named_parameters()))
    for name, e, tol in [("y", report["y"], FWD_TOL)] + [(n, e, GRAD_TOL) for n, e in report["grads"].items()]:
        if "jax_vs_fla" not in e:
            assert e["jax_vs_fp32"] <= ACCURACY_FACTOR * tol, (name, e)
            continue
        assert e["jax_vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["jax_vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)
