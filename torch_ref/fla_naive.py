"""FLA's pure-PyTorch reference ops, loaded without Triton (for CPU).

Importing `fla.ops` (or `fla.layers`, `fla.modules`) pulls in Triton, which a CPU machine lacks, so the naive
reference files are executed on their own, on first use (FLA is an optional dependency). Used by torch_ref's CPU
linear-attention layers and the parity tests.
"""

import ast
import functools
import importlib.util
import pathlib
from collections.abc import Callable
from types import ModuleType

import torch

from jaxgpt.spec.constants import L2_NORM_EPS


def fla_path(relpath: str) -> pathlib.Path:
    """The path of one file of the installed FLA package."""
    fla = importlib.util.find_spec("fla")
    if fla is None:
        raise ImportError("torch_ref's linear-attention layers need FLA 0.6.0: pip install 'jaxgpt[fla]'")
    return pathlib.Path(fla.submodule_search_locations[0]) / relpath


@functools.cache
def load_fla_file(relpath: str) -> ModuleType:
    """Execute one file of the installed FLA package, e.g. 'ops/gla/naive.py', as a stand-alone module."""
    path = fla_path(relpath)
    spec = importlib.util.spec_from_file_location(f"fla_naive_{relpath.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def load_fla_function(relpath: str, name: str, *helpers: str) -> Callable:
    """One top-level PyTorch function of an FLA file whose imports need Triton (e.g. 'ops/gated_delta_rule/gate.py'):
    only its definition and those of the top-level functions `helpers` it calls are executed, with `torch`, `F`
    (torch.nn.functional) and einops' `rearrange` and `repeat` in scope (einops by name: FLA's dependency, not the
    export's; transformers' remote-code check requires every package an exported file names in an import)."""
    einops = importlib.import_module("einops")
    path = fla_path(relpath)
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in (name, *helpers)}
    missing = {name, *helpers} - set(nodes)
    if missing:
        raise ImportError(f"{path} defines no function {', '.join(sorted(missing))}")
    namespace = {"torch": torch, "F": torch.nn.functional, "rearrange": einops.rearrange, "repeat": einops.repeat}
    exec(compile(ast.Module(body=list(nodes.values()), type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def l2norm(x: torch.Tensor, eps: float = L2_NORM_EPS) -> torch.Tensor:
    """FLA's l2norm convention over the last axis: x / sqrt(sum(x^2) + eps)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# The recurrences take the state before their first step, initial_state [B, H, K, V] (None: zeros), and return
# (o, the state after their last step [B, H, K, V] fp32), as FLA's do with output_final_state=True.


def naive_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor,
              initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA's naive_recurrent_gla: q, k, gk [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V] (scale K^-0.5), state."""
    return load_fla_file("ops/gla/naive.py").naive_recurrent_gla(q, k, v, gk, initial_state, output_final_state=True)


def naive_simple_gla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA's naive_recurrent_simple_gla: q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] log decays -> o [B, T, H, V]
    in q's dtype (scale K^-0.5), state."""
    simple_gla = load_fla_file("ops/simple_gla/naive.py").naive_recurrent_simple_gla
    return simple_gla(q, k, v, g, initial_state=initial_state, output_final_state=True)


def naive_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA's naive_recurrent_linear_attn without normalisation: q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V]
    in q's dtype (scale K^-0.5), state."""
    linear_attn = load_fla_file("ops/linear_attn/naive.py").naive_recurrent_linear_attn
    return linear_attn(q, k, v, initial_state=initial_state, output_final_state=True)


def naive_delta_rule_l2(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                        initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta rule with FLA's in-kernel L2 norm of q and k (use_qk_l2norm_in_kernel=True), through FLA's naive
    gated delta rule with zero log-decay: q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] -> o [B, T, H, V],
    state."""
    return naive_gated_delta_rule_l2(q, k, v, torch.zeros_like(beta), beta, initial_state)


def naive_gated_delta_rule_l2(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLA's naive_recurrent_gated_delta_rule with the in-kernel L2 norm of q and k (use_qk_l2norm_in_kernel=True):
    q, k [B, T, H, K], v [B, T, H, V], g (log decays) and beta [B, T, H] -> o [B, T, H, V] in v's dtype, state."""
    gated_delta_rule = load_fla_file("ops/gated_delta_rule/naive.py").naive_recurrent_gated_delta_rule
    o, state = gated_delta_rule(l2norm(q), l2norm(k), v, beta, g, initial_state=initial_state,
                                output_final_state=True)
    return o.to(v.dtype), state


def naive_gdn_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None) -> torch.Tensor:
    """FLA's naive_gdn_gate (the reference of its `use_gate_in_kernel` gate): fp32 -exp(A_log) * softplus(a + dt_bias),
    a [..., H], A_log and dt_bias [H]."""
    return load_fla_function("ops/gated_delta_rule/gate.py", "naive_gdn_gate")(a, A_log, dt_bias)
