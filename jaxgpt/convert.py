"""The one place where parameter names and layouts map between jaxgpt (Flax NNX) and torch_ref (PyTorch).

A JAX parameter path `h/0/attn/c_attn/kernel` is the torch name `h.0.attn.c_attn.weight`. Leaf rules:
  kernel    [in, out]  <->  weight [out, in]   (nnx.Linear vs nn.Linear)
  embedding [V, C]     <->  weight [V, C]      (nnx.Embed vs nn.Embedding)
  scale     [C]        <->  weight [C]         (norm gains)
  anything else (bias, raw parameters, conv weights stored in torch layout) keeps its name and layout.
Used by the parity tests, the exporter and the importer alike.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

# JAX leaf name -> (torch leaf name, transpose the two axes)
LEAF_RULES: dict[str, tuple[str, bool]] = {
    "kernel": ("weight", True),
    "embedding": ("weight", False),
    "scale": ("weight", False),
}


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def torch_name(path: tuple) -> tuple[str, bool]:
    """JAX parameter path -> (torch state-dict name, whether the layout is transposed)."""
    *parents, leaf = (str(p) for p in path)
    name, transpose = LEAF_RULES.get(leaf, (leaf, False))
    return ".".join(parents + [name]), transpose


def jax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Nested pure dict of JAX arrays (nnx.to_pure_dict) -> {torch name: numpy array in torch layout}."""
    out = {}
    for path, value in _flatten(params).items():
        name, transpose = torch_name(path)
        a = np.asarray(value)
        out[name] = a.T if transpose else a
    return out


def torch_to_jax(state_dict: Mapping[str, Any], template: Mapping) -> dict:
    """{torch name: tensor/array} -> nested pure dict shaped like `template` (e.g. from nnx.eval_shape).

    Strict: every template parameter must be present with the right shape and no torch key may be left over.
    """
    remaining = {k: _to_numpy(v) for k, v in state_dict.items()}
    out: dict = {}
    for path, like in _flatten(template).items():
        name, transpose = torch_name(path)
        if name not in remaining:
            raise KeyError(f"torch state dict has no {name!r} (for JAX {'/'.join(map(str, path))})")
        a = remaining.pop(name)
        a = a.T if transpose else a
        if tuple(a.shape) != tuple(like.shape):
            raise ValueError(f"{name}: torch shape {a.shape} does not match JAX {tuple(like.shape)}")
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = a.astype(np.float32)
    if remaining:
        raise KeyError(f"torch parameters with no JAX counterpart: {', '.join(sorted(remaining))}")
    return out


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch here
        return v.detach().float().cpu().numpy()
    return np.asarray(v)


# Hugging Face GPT2LMHeadModel <-> torch_ref (plain GPT-2 variants only). HF prefixes everything with
# `transformer.` (wte/wpe without our `embedding.`), keeps Linear weights as Conv1D [in, out], always has
# biases (zeros compute the same function as bias=False) and ties `lm_head.weight` to `wte`.


def _hf_gpt2_name(torch_name: str) -> str:
    return "transformer." + torch_name.removeprefix("embedding.")


def torch_to_hf_gpt2(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torch_ref state dict of a plain GPT-2 -> GPT2LMHeadModel state dict (biases filled with zeros)."""
    out = {}
    for name, a in state_dict.items():
        out[_hf_gpt2_name(name)] = a.T if name.startswith("h.") and a.ndim == 2 else a
        bias = name.removesuffix(".weight") + ".bias"
        if name.endswith(".weight") and not name.startswith("embedding.") and bias not in state_dict:
            out[_hf_gpt2_name(bias)] = np.zeros(a.shape[0], a.dtype)
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def hf_gpt2_to_torch(state_dict: Mapping[str, Any], bias: bool) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel state dict -> torch_ref state dict; with bias=False the (all-zero) biases are dropped."""
    out = {}
    for hf_name, v in state_dict.items():
        if hf_name == "lm_head.weight":  # tied to wte
            continue
        name = hf_name.removeprefix("transformer.")
        name = "embedding." + name if name.startswith(("wte.", "wpe.")) else name
        a = _to_numpy(v)
        if name.endswith(".bias") and not bias:
            if np.any(a != 0):
                raise ValueError(f"{hf_name} is non-zero but the model has bias=False")
            continue
        out[name] = a.T if name.startswith("h.") and a.ndim == 2 else a
    return out
