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
