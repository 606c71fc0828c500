"""torch_ref's CPU Mamba2 twin against FLA 0.6.0's own PyTorch path, `fla.layers.Mamba2.torch_forward`, run from
FLA's source on the twin's parameters (fp32, CPU): the output and every gradient (FLA's chunk_size 256 chunked SSD
against the twin's recurrence), and decoding (a prompt, then single tokens) with the cached states in FLA's layouts.

`fla.layers.mamba2` cannot be imported without Triton (its module imports pull it in), so the method and the
module-level helpers it calls are executed on their own, as torch_ref.fla_naive does for FLA's naive ops. JAX
against the twin: test_mixer_parity.py; decoding in JAX: tests/test_generate.py.
"""

import ast
import functools
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

from jaxgpt.spec.config import ModelConfig
from parity_tests.helpers import rel_err
from torch_ref.fla_naive import fla_path
from torch_ref.linear_attn import new_fla_cache
from torch_ref.mamba2 import NaiveMamba2

TOL = 1e-5
CFG = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, dtype="float32")
FLA_CHUNK_SIZE = 256  # fla.layers.Mamba2's default


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
        body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == scope) if scope else tree.body
        nodes.append(next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name))
    namespace = {"torch": torch, "nn": nn, "F": nn.functional, "rearrange": einops.rearrange}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def fla_mamba2(twin: NaiveMamba2) -> types.SimpleNamespace:
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
        use_conv_bias=True, dt_limit=twin.dt_limit, chunk_size=FLA_CHUNK_SIZE, D_has_hdim=False, rmsnorm=True,
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


@pytest.mark.parametrize("T", [1, 65])
def test_twin_is_flas_torch_forward(T):
    twin = random_twin(T)
    fla = fla_mamba2(twin)
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
