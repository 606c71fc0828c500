"""CPU fp32 parity of the linear-attention layers: jaxgpt (chunked ops) vs torch_ref (FLA's module tree with FLA's
naive ops), outputs and the gradients w.r.t. the input and every parameter, rel err < 1e-5.

Full models of every mixer variant are compared in test_model_parity.py (parametrized over all presets).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxgpt.spec.config import ModelConfig
from jaxgpt.convert import jax_to_torch, torch_to_jax
from jaxgpt.layers.mixers import LINEAR_LAYERS as JAX_LAYERS
from parity_tests.helpers import rel_err
from torch_ref.mixers import LINEAR_LAYERS as TORCH_LAYERS

TOL = 1e-5
CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=128, dtype="float32")
LAYERS = {  # id -> (layer kind, options): every layer the mixer variants stack
    "gla": ("gla", {}),
    "gla_conv": ("gla", {"use_short_conv": True}),
    "gla_depth_0.75": ("gla", {"use_short_conv": True, "expand_k": 0.75}),
    "deltanet": ("deltanet", {}),
    "gated_deltanet": ("gated_deltanet", {}),  # its cases: parity_tests/test_gated_delta_rule.py
    "hgrn2": ("hgrn2", {}),
    "mamba2": ("mamba2", {}),
    "retnet": ("retnet", {}),
    "linear_attn": ("linear_attn", {}),
}
GATE_BIAS = {"weak": 0.0, "strong": -6.0}  # gk_proj.1 bias: per-step log decays about -0.04 / -0.38
# At T = 1 each head's output is c * v (c = scale * q.k, times beta for DeltaNet), and the per-head RMSNorm removes
# |c|: the gradients reaching q, k, beta and the gate are eps-level (about 1e-6 of the others) and pure fp32 noise
# (FLA's fp32 and fp64 results differ by ~5% there). At T = 1 those are judged on the scale of the whole gradient.
SCALE_FREE_AT_T1 = ("q_", "k_", "b_proj", "gk_proj")


def random_params(model: nnx.Module, rng: np.random.Generator, gate_bias: float) -> dict[str, np.ndarray]:
    """Torch-named weights with O(1) activations: matrices N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2),
    conv kernels U(-0.5, 0.5), the GLA gate bias `gate_bias`, Gated DeltaNet's A_log and dt_bias as initialised (FLA's
    random init: per-step decays from ~1 to ~e^-1.6)."""
    params = {}
    for name, p in jax_to_torch(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items():
        if name == "gk_proj.1.bias":
            params[name] = np.full(p.shape, gate_bias, np.float32)
        elif name in ("A_log", "dt_bias"):
            params[name] = np.array(p)
        elif "conv1d" in name:
            params[name] = rng.uniform(-0.5, 0.5, p.shape).astype(np.float32)
        elif p.ndim == 1:
            params[name] = (1 + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)
        else:
            params[name] = (rng.standard_normal(p.shape) / np.sqrt(p.shape[1])).astype(np.float32)
    return params


@functools.cache
def jax_layer_vjp(layer_id: str, cfg: ModelConfig = CFG):
    """A jitted (params, x, dy) -> (y, grads w.r.t. params, dx) for the JAX layer; one compile per shape."""
    kind, options = LAYERS[layer_id]
    graphdef, _ = nnx.split(JAX_LAYERS[kind](cfg, nnx.Rngs(0), **options), nnx.Param)

    @jax.jit
    def run(params, x, dy):
        y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
        return y, *vjp(dy.astype(y.dtype))  # y is in the compute dtype

    return run


CASES = (  # (layer, gate, T); T not a multiple of the chunk size 64, one step, and more than one chunk
    [(name, "weak", T) for name in ("gla", "gla_conv", "deltanet") for T in (1, 63, 65)]
    + [("gla_depth_0.75", "weak", 65), ("gla", "strong", 65), ("gla_conv", "strong", 130)]
    + [("hgrn2", "weak", T) for T in (1, 65)]  # its forget gates are strong already: logsigmoid(N(0, 1))
    + [("mamba2", "weak", T) for T in (1, 65)]  # its log decays dt * A: from about -0.001 to -6 per step
    + [("retnet", "weak", T) for T in (1, 65)]  # fixed decays; rotary positions past one chunk
    + [("linear_attn", "weak", T) for T in (7, 65)]  # no decay (at T = 1 the feature maps' gradients are scale-free)
)


@pytest.mark.parametrize("layer_id,gate,T", CASES)
def test_layer_parity(layer_id, gate, T):
    kind, options = LAYERS[layer_id]
    B, C = 2, CFG.n_embd
    rng = np.random.default_rng(T)
    jlayer = JAX_LAYERS[kind](CFG, nnx.Rngs(0), **options)
    tlayer = TORCH_LAYERS[kind](CFG, **options)
    weights = random_params(jlayer, rng, GATE_BIAS[gate])
    tlayer.load_state_dict({n: torch.from_numpy(w) for n, w in weights.items()}, strict=True)
    x = rng.standard_normal((B, T, C), np.float32)
    dy = rng.standard_normal((B, T, C), np.float32)

    tx = torch.tensor(x, requires_grad=True)
    ty = tlayer(tx)
    (ty * torch.from_numpy(dy)).sum().backward()

    template = nnx.to_pure_dict(nnx.state(jlayer, nnx.Param))
    params = jax.tree.map(jnp.asarray, torch_to_jax(weights, template))
    y, dparams, dx = jax_layer_vjp(layer_id)(params, jnp.asarray(x), jnp.asarray(dy))
    errors = {"y": rel_err(y, ty.detach()), "dx": rel_err(dx, tx.grad)}
    j_grads = jax_to_torch(dparams)
    t_grads = {n: p.grad.numpy() for n, p in tlayer.named_parameters()}
    assert set(j_grads) == set(t_grads)
    total = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in t_grads.values()))
    for n, g in t_grads.items():
        scale_free = T == 1 and n.startswith(SCALE_FREE_AT_T1)
        errors[f"d{n}"] = np.linalg.norm(j_grads[n] - g) / total if scale_free else rel_err(j_grads[n], g)
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{worst}: {errors[worst]:.2e} (all: {errors})"
