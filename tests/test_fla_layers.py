"""torch_ref's CUDA path, checked without a GPU: `mixer_class` builds each linear mixer from the `fla.layers` class
its twin names, with the FLA options docs/variants.md lists, returns FLA's output alone, and hands the inputs FLA
cannot take to the twin's forward. A stand-in `fla.layers` (FLA's real one needs Triton) records what each class
is given."""

import sys
import types

import pytest
import torch
import torch.nn as nn

from jaxgpt.spec.config import ModelConfig
from torch_ref.linear_attn import FLATwin, mixer_class
from torch_ref.mixers import LINEAR_LAYERS

C, H = 64, 4
CFG = ModelConfig(n_layer=2, n_head=H, n_embd=C, block_size=32, dtype="float32")
EXPECTED = {  # (torch_ref layer kind, options) -> (fla.layers class, its keyword arguments at C 64, H 4)
    ("gla", False): ("GatedLinearAttention", dict(mode="chunk", hidden_size=C, num_heads=H, expand_k=0.5, expand_v=1.0,
                                                  use_output_gate=True, gate_fn="swish", use_short_conv=False,
                                                  conv_size=4)),
    ("gla", True): ("GatedLinearAttention", dict(mode="chunk", hidden_size=C, num_heads=H, expand_k=0.5, expand_v=1.0,
                                                 use_output_gate=True, gate_fn="swish", use_short_conv=True,
                                                 conv_size=4)),
    ("deltanet", None): ("DeltaNet", dict(mode="chunk", hidden_size=C, num_heads=H, use_beta=True, use_short_conv=True,
                                          conv_size=4, qk_activation="silu", qk_norm="l2")),
    ("gated_deltanet", None): ("GatedDeltaNet", dict(mode="chunk", hidden_size=C, num_heads=H, head_dim=C // H,
                                                     expand_v=1.0, use_gate=True, use_short_conv=True, conv_size=4)),
    ("hgrn2", None): ("HGRN2Attention", dict(hidden_size=C, num_heads=H, expand_ratio=None)),
    ("mamba2", None): ("Mamba2", dict(hidden_size=C, num_heads=H, head_dim=2 * C // H)),
    ("retnet", None): ("MultiScaleRetention", dict(hidden_size=C, num_heads=H)),
    ("linear_attn", None): ("LinearAttention", dict(hidden_size=C, num_heads=H)),
}


class StandIn(nn.Module):
    """An fla.layers class: keeps its keyword arguments; forward returns FLA's (o, attentions, cache)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs, self.activation, self.conv1d = kwargs, "silu", types.SimpleNamespace()

    def forward(self, x, past_key_values=None, use_cache=False):
        return ("FLA's output", None, past_key_values)


@pytest.fixture
def fake_cuda(monkeypatch):
    fla, layers = types.ModuleType("fla"), types.ModuleType("fla.layers")
    for name, _ in EXPECTED.values():
        setattr(layers, name, type(name, (StandIn,), {}))
    monkeypatch.setitem(sys.modules, "fla", fla)
    monkeypatch.setitem(sys.modules, "fla.layers", layers)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mixer_class.cache_clear()
    yield
    mixer_class.cache_clear()  # the stand-in classes must not outlive the test


def on_cuda(dtype: torch.dtype) -> types.SimpleNamespace:
    """What the layers read of a CUDA tensor x [B, T, C]."""
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda"))


def twins() -> dict[str, type]:
    """FLA class name -> torch_ref's twin of it."""
    found, todo = {}, [FLATwin]
    while todo:
        for sub in todo.pop().__subclasses__():
            found[sub.FLA_NAME] = sub
            todo.append(sub)
    return found


@pytest.mark.parametrize("kind, conv", list(EXPECTED), ids=str)
def test_fla_layer_options_and_dispatch(fake_cuda, monkeypatch, kind, conv):
    name, options = EXPECTED[kind, conv]
    layer = LINEAR_LAYERS[kind](CFG, **({} if conv is None else {"use_short_conv": conv}))
    assert type(layer).__name__ == f"FLA{name}" and type(layer).__mro__[1].__name__ == name
    assert layer.kwargs == options
    assert layer(on_cuda(torch.bfloat16)) == "FLA's output"

    naive_inputs = []
    monkeypatch.setattr(twins()[name], "forward", lambda m, x, cache=None: naive_inputs.append(x) or "naive output")
    x = torch.zeros(1, 2, C)
    assert layer(x) == "naive output" and naive_inputs == [x]  # a CPU input takes the twin's forward
    # FLA's chunk_delta_rule refuses fp32 inputs: an fp32 DeltaNet forward without autocast takes the twin's
    assert layer(on_cuda(torch.float32)) == ("naive output" if kind == "deltanet" else "FLA's output")
    if kind == "mamba2":
        assert layer.conv1d.activation == "silu"  # what the twin's short_conv reads


def test_without_cuda_the_layers_are_the_twins():
    mixer_class.cache_clear()
    assert set(twins()) == {name for name, _ in EXPECTED.values()}
    for kind in LINEAR_LAYERS:
        assert type(LINEAR_LAYERS[kind](CFG)) is twins()[EXPECTED[kind, False if kind == "gla" else None][0]]


def test_exports_do_not_require_fla(tmp_path):
    """transformers' remote-code loader requires every package that a file of an export names in an import
    statement (its get_imports). FLA is optional (an export of a softmax preset runs without it), so no file of an
    export names it: the linear mixers import fla.layers by name."""
    from transformers.dynamic_module_utils import get_imports

    from jaxgpt.export import modeling_sources

    sources = modeling_sources()
    assert {"linear_attn.py", "retnet.py", "gated_deltanet.py"} <= set(sources)
    for name, text in sources.items():
        (tmp_path / name).write_text(text)
        assert "fla" not in get_imports(str(tmp_path / name)), name
