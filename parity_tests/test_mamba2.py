"""Mamba2 against FLA 0.6.0. CPU (fp32): torch_ref's twin against FLA's own PyTorch path,
`fla.layers.Mamba2.torch_forward`, run from FLA's source on the twin's parameters: the output and every gradient
(FLA's chunk_size 256 chunked SSD against the twin's recurrence), and decoding (a prompt, then single tokens) with
the cached states in FLA's layouts. GPU (bf16, `pytest -m gpu parity_tests/test_mamba2.py` on the device): jaxgpt
against FLA's real layer, as parity_tests/test_gpu_mixers.py does for the other layers.

`fla.layers.mamba2` cannot be imported without Triton (its module imports pull it in), so the method and the
module-level helpers it calls are executed on their own, as torch_ref.fla_naive does for FLA's naive ops. JAX
against the twin: test_mixer_parity.py; decoding in JAX: tests/test_generate.py.
"""

import ast
import dataclasses
import functools
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn
from flax import nnx

from jaxgpt.convert import jax_to_torch
from jaxgpt.layers.mamba2 import Mamba2
from jaxgpt.spec.config import ModelConfig
from parity_tests.helpers import rel_err
from torch_ref.fla_naive import fla_path
from torch_ref.linear_attn import new_fla_cache
from torch_ref.mamba2 import NaiveMamba2, mamba2

TOL = 1e-5
CFG = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, dtype="float32")
FLA_CHUNK_SIZE = 256  # fla.layers.Mamba2's default chunk_size


@functools.cache
def fla_definitions(relpath: str, names: tuple[str, ...]) -> dict:
    """Top-level functions and `Class.method`s of one FLA file, executed without the file's imports, with torch,
    nn and einops' rearrange in scope."""
    import einops

    path = fla_path(relpath)
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = []
    for name in names:
        scope, _, name = name.rpartition(".")
        classes = {n.name: n.body for n in tree.body if isinstance(n, ast.ClassDef)}
        body = classes[scope] if scope else tree.body
        nodes.append(next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name))
    namespace = {"torch": torch, "nn": nn, "F": nn.functional, "rearrange": einops.rearrange}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def fla_mamba2(twin: NaiveMamba2, chunk_size: int = FLA_CHUNK_SIZE) -> types.SimpleNamespace:
    """An object holding the twin's parameters under fla.layers.Mamba2's attribute names, with FLA's torch_forward
    and its RMSNormGated (rms_norm_ref: the gate before the norm, one group of the whole inner width)."""
    mamba2 = fla_definitions("layers/mamba2.py", (
        "apply_mask_to_padding_states", "pad_tensor_by_size", "reshape_into_chunks", "segment_sum",
        "Mamba2.torch_forward", "Mamba2._get_D"))
    rms_norm_ref = fla_definitions("modules/norm/layernorm_gated.py", ("rms_norm_ref",))["rms_norm_ref"]
    inner = twin.intermediate_size
    m = types.SimpleNamespace(
        in_proj=twin.in_proj, conv1d=twin.conv1d, dt_bias=twin.dt_bias, A_log=twin.A_log, D=twin.D,
        out_proj=twin.out_proj, act=nn.SiLU(), intermediate_size=inner, conv_dim=twin.conv1d.in_channels, n_groups=1,
        ssm_state_size=twin.ssm_state_size, num_heads=twin.num_heads, head_dim=twin.head_dim, conv_kernel_size=4,
        use_conv_bias=True, dt_limit=twin.dt_limit, chunk_size=chunk_size, D_has_hdim=False, rmsnorm=True,
        norm=lambda y, z: rms_norm_ref(y, twin.norm.weight, None, z, twin.norm.eps, inner, norm_before_gate=False),
    )
    m._get_D = functools.partial(mamba2["_get_D"], m)
    m.torch_forward = functools.partial(mamba2["torch_forward"], m)
    return m


def random_twin(seed: int) -> NaiveMamba2:
    """The twin with O(1) activations: matrices N(0, 1/fan_in), conv U(-0.5, 0.5), D and the norm weight around 1,
    A_log and dt_bias as FLA draws them."""
    torch.manual_seed(seed)
    twin = NaiveMamba2(CFG.n_embd, CFG.n_head)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.startswith("conv1d"):
                p.uniform_(-0.5, 0.5)
            elif name in ("D", "norm.weight"):
                p.normal_(1.0, 0.1)
            elif p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return twin


@pytest.mark.parametrize("T,chunk_size", [(1, FLA_CHUNK_SIZE), (64, FLA_CHUNK_SIZE), (64, 16)])
def test_twin_is_flas_torch_forward(T, chunk_size):
    """Chunk size 16: FLA's inter-chunk recurrence too (its default 256 puts these T in one chunk)."""
    twin = random_twin(T)
    fla = fla_mamba2(twin, chunk_size)
    x = torch.randn(2, T, CFG.n_embd)
    dy = torch.randn(2, T, CFG.n_embd)
    grads = {}
    for name, forward in (("fla", lambda x: fla.torch_forward(x)[0]), ("twin", twin)):
        twin.zero_grad(set_to_none=True)
        tx = x.clone().requires_grad_(True)
        y = forward(tx)
        (y * dy).sum().backward()
        grads[name] = {"y": y.detach(), "x": tx.grad} | {n: p.grad for n, p in twin.named_parameters()}
    errors = {n: rel_err(grads["twin"][n], g) for n, g in grads["fla"].items()}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{worst}: {errors[worst]:.2e} (all: {errors})"


def test_twin_decodes_as_fla():
    """A 13-token prompt, then 4 single tokens: FLA's torch_forward (its prefill, then its one-token decode path)
    and the twin through an FLA cache give the same outputs and keep the same states."""
    twin = random_twin(0)
    fla = fla_mamba2(twin)
    x = torch.randn(2, 17, CFG.n_embd)
    cache = new_fla_cache()
    twin.layer_idx = 0
    with torch.no_grad():
        want, conv_state, ssm_state = fla.torch_forward(x[:, :13], None, True)
        got = twin(x[:, :13], cache)
        errors = [rel_err(got, want)]
        for t in range(13, 17):
            y, conv_state, ssm_state = fla.torch_forward(
                x[:, t:t + 1], {"conv_state": conv_state.clone(), "recurrent_state": ssm_state.clone()}, True)
            errors.append(rel_err(twin(x[:, t:t + 1], cache), y))
        errors += [rel_err(cache[0]["conv_state"], conv_state), rel_err(cache[0]["recurrent_state"], ssm_state)]
    assert max(errors) < TOL, errors
    assert np.isfinite(errors).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_bf16_layer_parity_with_fla(backend):
    """jaxgpt (bf16 compute, fp32 params) against fla.layers.Mamba2 (fp32 params under bf16 autocast) at gpt2-124m
    width (C 768, H 12: P 128, N 128), B 4, T 1024: output and the gradients w.r.t. the input and every parameter,
    with test_gpu_mixers.py's thresholds against FLA's bf16 and fp32 results. FLA runs mamba_ssm's kernels when that
    is installed and its torch_forward otherwise (whose chunked SSD materialises [B, T/256, 256, 256, H, N]
    products: hence B 4); the report names which."""
    import fla.layers
    import fla.layers.mamba2 as fla_mamba2

    from parity_tests.test_gpu_mixers import CFG, fla_outputs
    from parity_tests.test_gpu_parity import ACCURACY_FACTOR, FWD_TOL, GRAD_TOL, NOISE_FACTOR
    from parity_tests.test_mixer_parity import jax_layer_vjp

    B, T = 4, 1024
    cfg = dataclasses.replace(CFG, linear_attn_backend=backend)
    params = nnx.to_pure_dict(nnx.state(Mamba2(cfg, nnx.Rngs(0)), nnx.Param))  # the harness's effective init
    tlayer = mamba2(CFG).cuda()
    assert isinstance(tlayer, fla.layers.Mamba2)
    tlayer.load_state_dict({n: torch.from_numpy(np.array(w)) for n, w in jax_to_torch(params).items()}, strict=True)
    rng = np.random.default_rng(T)
    x = rng.standard_normal((B, T, CFG.n_embd), np.float32)
    dy = rng.standard_normal((B, T, CFG.n_embd), np.float32)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref_y, ref_grads = fla_outputs(tlayer, x, dy, autocast=False)
    t_y, t_grads = fla_outputs(tlayer, x, dy, autocast=True)
    y, dparams, dx = jax_layer_vjp("mamba2", cfg)(params, jnp.asarray(x), jnp.asarray(dy))
    j_y = np.asarray(y, np.float32)
    j_grads = {n: np.asarray(g, np.float32) for n, g in ({"x": dx} | jax_to_torch(dparams)).items()}

    def errors(j, t, ref):
        return {"jax_vs_fla": rel_err(j, t), "jax_vs_fp32": rel_err(j, ref), "fla_vs_fp32": rel_err(t, ref)}

    report = {"layer": "mamba2", "T": T, "backend": backend,
              "fla_path": "mamba_ssm" if fla_mamba2.is_fast_path_available else "torch_forward",
              "y": errors(j_y, t_y, ref_y),
              "grads": {n: errors(j_grads[n], t_grads[n], ref_grads[n]) for n in t_grads}}
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"gpu_mixer_parity_mamba2_{backend}_T{T}.json"), "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    for name, e, tol in [("y", report["y"], FWD_TOL)] + [(n, e, GRAD_TOL) for n, e in report["grads"].items()]:
        assert e["jax_vs_fp32"] <= ACCURACY_FACTOR * max(e["fla_vs_fp32"], tol), (name, e)
        assert e["jax_vs_fla"] <= max(tol, NOISE_FACTOR * e["fla_vs_fp32"]), (name, e)
