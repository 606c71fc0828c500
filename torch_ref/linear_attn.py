"""FLA's linear-attention layers for torch_ref: the real `fla.layers` modules on CUDA, a Triton-free twin on CPU.

`GatedLinearAttention` and `DeltaNet` build `fla.layers.GatedLinearAttention` / `fla.layers.DeltaNet` (FLA 0.6.0)
when CUDA is available; their forward returns the output only (FLA returns (o, attentions, cache)). Without
CUDA, `fla.layers` cannot even be imported (Triton), so the layers are `NaiveGatedLinearAttention` /
`NaiveDeltaNet`: the same module tree and parameter names as FLA's (state dicts load either way), computing with
FLA's own naive PyTorch ops (torch_ref.fla_naive). Inputs on CPU always take that naive path, and so does an fp32
DeltaNet forward on CUDA (no autocast), which FLA's chunk_delta_rule refuses.

Decoding: every layer's forward takes an optional FLA cache (`new_fla_cache`: per layer the recurrent state and the
short convolutions' last W inputs, FLA's `past_key_values`), found by the layer's `layer_idx` and extended in place.
FLA's layers keep their own state in it; the twins theirs (`LayerState`), continuing the same recurrences.

Effective init: the harness re-draws the nn.Linear weights (N(0, 0.02), biases zero); ShortConvolution (a Conv1d)
keeps PyTorch's kaiming-uniform default, norm weights are ones.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.spec.config import ModelConfig
from jaxgpt.spec.constants import CONV_SIZE, FLA_NORM_EPS, GATE_LOGIT_NORMALIZER, GATE_LOW_RANK_DIM

from .fla_naive import load_fla_file, naive_delta_rule_l2, naive_gla
from .norms import RMSNorm, rms_normalize

if TYPE_CHECKING:
    from transformers import Cache


class ShortConvolution(nn.Conv1d):
    """Parameters of `fla.modules.ShortConvolution`: depthwise Conv1d weight [C, 1, W], optional bias."""

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False, activation: str | None = "silu"):
        super().__init__(hidden_size, hidden_size, kernel_size, padding=kernel_size - 1, groups=hidden_size, bias=bias)
        self.activation = activation


def short_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Causal depthwise conv of a ShortConvolution (FLA's or ours) + its activation: [B, T, C] -> [B, T, C]."""
    y = F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=conv.kernel_size[0] - 1, groups=conv.groups)
    y = y[..., : x.shape[1]].transpose(1, 2)
    return F.silu(y) if conv.activation is not None else y


def cached_short_conv(conv: nn.Conv1d, x: torch.Tensor,
                      state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`short_conv` of x [B, T, C] continuing the inputs before it: state [B, C, W] holds the last W of them (FLA's
    conv cache; None: zeros) -> (y [B, T, C], the state after x)."""
    W = conv.kernel_size[0]
    if state is None:
        state = x.new_zeros(x.shape[0], x.shape[2], W)
    xs = torch.cat([state[..., 1:].to(x.dtype), x.transpose(1, 2)], dim=-1)  # the W - 1 inputs before x, then x
    return short_conv(conv, xs.transpose(1, 2))[:, W - 1:], xs[..., -W:]


def new_fla_cache() -> Cache:
    """An empty cache of FLA's (fla.models.utils.Cache, a transformers Cache), loaded from its file alone (it needs
    only torch and transformers, so also without Triton)."""
    return load_fla_file("models/cache_utils.py").Cache()


class LayerState:
    """A linear-attention twin's state in an FLA cache (`cache[layer_idx]`: 'recurrent_state', 'conv_state' as FLA's
    layers keep them), read when made and written back by `save`. Without a cache: the training forward (short
    convolutions from zeros, the recurrence from a zero state)."""

    def __init__(self, cache: Cache | None, layer_idx: int | None):
        self.cache, self.layer_idx = cache, layer_idx
        saved: dict[str, Any] = cache[layer_idx] if cache is not None and len(cache) > layer_idx else {}
        self.recurrent_state = saved.get("recurrent_state")
        self.conv_state = saved.get("conv_state")

    def convs(self, *pairs: tuple[nn.Conv1d, torch.Tensor]) -> list[torch.Tensor]:
        """`short_conv` of each (conv, x), x [B, T, C], each continuing its own inputs in the cache."""
        if self.cache is None:
            return [short_conv(conv, x) for conv, x in pairs]
        out = [cached_short_conv(conv, x, state) for (conv, x), state in
               zip(pairs, self.conv_state or (None,) * len(pairs))]
        self.conv_state = tuple(state for _, state in out)
        return [y for y, _ in out]

    def recurrence(self, op: Any, *inputs: torch.Tensor) -> torch.Tensor:
        """o of a recurrence `op` (torch_ref.fla_naive) on inputs [B, T, H, ...] from the cached state."""
        o, state = op(*inputs, initial_state=self.recurrent_state)
        self.recurrent_state = state
        return o

    def save(self, T: int) -> None:
        """Write the states back after a call of T tokens."""
        if self.cache is not None:
            self.cache.update(recurrent_state=self.recurrent_state, conv_state=self.conv_state,
                              layer_idx=self.layer_idx, offset=T)


def state_v_first(op: Callable) -> Callable:
    """A recurrence of torch_ref.fla_naive (state [B, H, K, V]) taking and returning its state as [B, H, V, K], the
    layout FLA's HGRN2 (`state_v_first=True`) and Mamba2 layers keep in their cache."""

    def transposed(*inputs: torch.Tensor, initial_state: torch.Tensor | None = None):
        o, state = op(*inputs, initial_state=None if initial_state is None else initial_state.transpose(-1, -2))
        return o, state.transpose(-1, -2)

    return transposed


def head_norm(norm: nn.Module, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
    """FLA's per-head output norm `norm` (ours or FLA's module: its weight and eps) with the swish output gate g if
    given: x, g [..., D] -> x's dtype. Computed without calling `norm`, whose FLA forward needs Triton."""
    return rms_normalize(x, norm.weight, norm.eps, g).to(x.dtype)


class FLATwin(nn.Module):
    """A Triton-free twin of an FLA layer: FLA's module tree and parameter names, computing with FLA's naive ops.
    A subclass names the FLA layer (`FLA_NAME` in fla.layers), maps its constructor arguments to FLA's keyword
    arguments (`fla_options`) and sets `forward` to its naive forward, which runs on FLA's layer too."""

    FLA_NAME: ClassVar[str]

    @staticmethod
    def fla_options(hidden_size: int, num_heads: int) -> dict[str, Any]:
        """FLA's constructor arguments for the twin's; every other option is FLA's default."""
        return dict(hidden_size=hidden_size, num_heads=num_heads)

    @staticmethod
    def naive_only(x: torch.Tensor) -> bool:
        """Whether FLA's layer leaves x [B, T, C] to the twin's forward: inputs on the CPU (FLA computes in Triton)."""
        return not x.is_cuda

    @staticmethod
    def fla_init(layer: nn.Module) -> None:
        """What FLA's layer needs, after its constructor, for the twin's forward to run on it (nothing here)."""


@functools.cache
def mixer_class(twin: type[FLATwin]) -> type[nn.Module]:
    """The class of a linear mixer: without CUDA the twin (fla.layers cannot be imported without Triton); with CUDA
    FLA's own `fla.layers.<twin.FLA_NAME>`, built from the twin's constructor arguments, whose forward(x [B, T, C],
    cache) returns the output only (FLA returns (o, attentions, cache)) and gives the inputs `twin.naive_only` names
    to the twin's forward. fla.layers is imported by name: transformers' remote-code check requires every package an
    exported file names in an import statement, and only the linear mixers need FLA."""
    if not torch.cuda.is_available():
        return twin
    base = getattr(importlib.import_module("fla.layers"), twin.FLA_NAME)

    class FLALayer(base):
        def __init__(self, *args: Any):
            super().__init__(**twin.fla_options(*args))
            twin.fla_init(self)

        def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
            if twin.naive_only(x):
                return twin.forward(self, x, cache)
            return super().forward(x, past_key_values=cache, use_cache=cache is not None)[0]

    FLALayer.__name__ = FLALayer.__qualname__ = f"FLA{twin.FLA_NAME}"
    return FLALayer


def gla_naive_forward(m: nn.Module, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """What fla.layers.GatedLinearAttention.forward computes (x [B, T, C]), with FLA's naive recurrent GLA."""
    B, T, _ = x.shape
    state = LayerState(cache, m.layer_idx)
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    if m.use_short_conv:
        q, k, v = state.convs((m.q_conv1d, q), (m.k_conv1d, k), (m.v_conv1d, v))
    q, k, v, gk, g = (t.view(B, T, m.num_heads, -1) for t in (q, k, v, m.gk_proj(x), m.g_proj(x)))  # [B, T, H, D]
    gk = F.logsigmoid(gk) / GATE_LOGIT_NORMALIZER
    o = head_norm(m.g_norm_swish_gate, state.recurrence(naive_gla, q, k, v, gk), g)
    state.save(T)
    return m.o_proj(o.reshape(B, T, -1))


def deltanet_naive_forward(m: nn.Module, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """What fla.layers.DeltaNet.forward computes (x [B, T, C]), with FLA's naive (gated, g=0) delta rule."""
    B, T, _ = x.shape
    state = LayerState(cache, m.layer_idx)
    q, k, v = state.convs((m.q_conv1d, m.q_proj(x)), (m.k_conv1d, m.k_proj(x)), (m.v_conv1d, m.v_proj(x)))
    q, k, v = (t.view(B, T, m.num_heads, -1) for t in (q, k, v))  # [B, T, H, D]
    o = head_norm(m.o_norm, state.recurrence(naive_delta_rule_l2, q, k, v, m.b_proj(x).sigmoid()))
    state.save(T)
    return m.o_proj(o.reshape(B, T, -1))


class NaiveGatedLinearAttention(FLATwin):
    """fla.layers.GatedLinearAttention's module tree for the options the variants use (swish-gated fused norm)."""

    FLA_NAME = "GatedLinearAttention"

    @staticmethod
    def fla_options(hidden_size: int, num_heads: int, expand_k: float, use_short_conv: bool) -> dict[str, Any]:
        return dict(mode="chunk", hidden_size=hidden_size, num_heads=num_heads, expand_k=expand_k, expand_v=1.0,
                    use_output_gate=True, gate_fn="swish", use_short_conv=use_short_conv, conv_size=CONV_SIZE)

    def __init__(self, hidden_size: int, num_heads: int, expand_k: float, use_short_conv: bool):
        super().__init__()
        key_dim = round(hidden_size * expand_k)
        self.num_heads, self.use_short_conv, self.layer_idx = num_heads, use_short_conv, None
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, CONV_SIZE)
            self.k_conv1d = ShortConvolution(key_dim, CONV_SIZE)
            self.v_conv1d = ShortConvolution(hidden_size, CONV_SIZE)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, GATE_LOW_RANK_DIM, bias=False),
                                     nn.Linear(GATE_LOW_RANK_DIM, key_dim, bias=True))
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.g_norm_swish_gate = RMSNorm(hidden_size // num_heads, eps=FLA_NORM_EPS)

    forward = gla_naive_forward


class NaiveDeltaNet(FLATwin):
    """fla.layers.DeltaNet's module tree for the options the variants use (beta, short conv, no output gate)."""

    FLA_NAME = "DeltaNet"

    @staticmethod
    def fla_options(hidden_size: int, num_heads: int) -> dict[str, Any]:
        return dict(mode="chunk", hidden_size=hidden_size, num_heads=num_heads, use_beta=True, use_short_conv=True,
                    conv_size=CONV_SIZE, qk_activation="silu", qk_norm="l2")

    @staticmethod
    def naive_only(x: torch.Tensor) -> bool:
        """CPU inputs, and fp32 ones without autocast (the parity tests' reference), which FLA's chunk_delta_rule
        refuses."""
        return not x.is_cuda or (x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type))

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads, self.layer_idx = num_heads, None
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.q_conv1d = ShortConvolution(hidden_size, CONV_SIZE)
        self.k_conv1d = ShortConvolution(hidden_size, CONV_SIZE)
        self.v_conv1d = ShortConvolution(hidden_size, CONV_SIZE)
        self.o_norm = RMSNorm(hidden_size // num_heads, eps=FLA_NORM_EPS)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    forward = deltanet_naive_forward


def gated_linear_attention(cfg: ModelConfig, expand_k: float = 0.5, use_short_conv: bool = False) -> nn.Module:
    """fla.layers.GatedLinearAttention(mode='chunk', hidden_size=C, num_heads=H, expand_k, expand_v=1.0,
    use_output_gate=True, gate_fn='swish', use_short_conv, conv_size=4): [B, T, C] -> [B, T, C]."""
    return mixer_class(NaiveGatedLinearAttention)(cfg.n_embd, cfg.n_head, expand_k, use_short_conv)


def delta_net(cfg: ModelConfig) -> nn.Module:
    """fla.layers.DeltaNet(hidden_size=C, num_heads=H, use_beta=True, use_short_conv=True, conv_size=4,
    qk_activation='silu', qk_norm='l2'): [B, T, C] -> [B, T, C]."""
    return mixer_class(NaiveDeltaNet)(cfg.n_embd, cfg.n_head)
