"""The variant registry: names of every axis choice, and the named presets over them (docs/variants.md).

Both implementations (jaxgpt.layers / torch_ref) provide a module for every name listed here; the tests
check that they agree. `python -m jaxgpt.variants` prints the table of presets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import OVERRIDABLE_BY_VARIANT, Config
from .constants import NUM_TABLES
from .errors import UserError

AXES: dict[str, dict[str, str]] = {
    "embedding": {
        "default": "wte + learned wpe, head tied to wte",
        "untied": "wte + wpe, separate head N(0, 0.02)",
        "bigram_hash": "+ hashed-bigram table (5V rows) before every block, per-layer scalar 0.1",
        "value_embed": "+ 5 value-embedding tables at layers [1, 2, L-3, L-2, L-1], scalars 0.5",
        "ve_lcr": "value_embed + local context residual beta*shift(ve), beta 0.1",
        "ve_lcr_cyclic_untied": "ve_lcr with the 5 tables cycled over layers 1..L-1, zero-init untied head",
    },
    "norm": {
        "layernorm": "Pre-LN LayerNorm blocks",
        "rmsnorm": "Pre-LN RMSNorm blocks (fp32, eps 1e-6), RMSNorm final norm",
        "rmsnorm_parallel": "RMSNorm, parallel attn + MLP from one norm",
        "rmsnorm_post": "RMSNorm sandwich: norm before and after each branch",
        "rmsnorm_parallel_gated": "RMSNorm, parallel branches with own norms and scalar gates 1/sqrt(2)",
    },
    "loss": {
        "ce": "cross-entropy",
        "label_smoothing": "CE with label smoothing 0.05",
        "z_loss": "CE + 1e-4 * mean(logsumexp^2)",
        "softcap_ce": "model output 30*sigmoid(logits/7.5) (also at eval), CE",
        "poly_ls_z": "CE (smoothing 0.05) + mean(1 - p_target) + 1e-4 z-loss",
        "tanh_cap_ls_z": "30*tanh(logits/30) in training: CE (smoothing 0.1) + 1e-4 z-loss; eval on raw logits",
    },
    "mixer": {
        "softmax": "causal multi-head softmax attention",
        "gla": "Gated Linear Attention (FLA GatedLinearAttention, expand_k 0.5, swish output gate)",
        "gla_conv": "gla + short convolutions (conv_size 4) on q, k, v",
        "gla_deltanet": "DeltaNet (short conv, beta, L2 qk norm) in even layers, gla in odd layers",
        "gla_depth": "gla_conv with expand_k growing from 0.5 (first layer) to 1.0 (last), in steps of 1/8",
        "deltanet": "DeltaNet in every layer",
        "gated_deltanet": "Gated DeltaNet (FLA GatedDeltaNet: decay gate, short conv, L2 qk norm, swish output gate)",
        "gla_gated_deltanet": "Gated DeltaNet in even layers, gla in odd layers",
        "hgrn2": "HGRN2 (FLA HGRN2Attention with num_heads=H: expand_ratio C/H, GLA with k = 1 - forget gate)",
        "mamba2": "Mamba2 (FLA Mamba2 with num_heads=H: head_dim 2C/H, state 128, SSD as scalar-decay GLA)",
        "retnet": "RetNet (FLA MultiScaleRetention: fixed per-head decay, RoPE, expand_v 2, swish output gate)",
        "linear_attn": "linear attention (FLA LinearAttention: Hadamard feature maps on q and k, no decay, RMSNorm)",
    },
}

# Mixers that encode position themselves: the model drops the learned position embedding.
LINEAR_MIXERS: frozenset[str] = frozenset(
    {"gla", "gla_conv", "gla_deltanet", "gla_depth", "deltanet", "gated_deltanet", "gla_gated_deltanet", "hgrn2",
     "mamba2", "retnet", "linear_attn"}
)


def gla_depth_expand_k(layer: int, n_layer: int) -> float:
    """`gla_depth`: expand_k(l) = round((0.5 + 0.5 * l / (L - 1)) * 8) / 8; 0.5 for a one-layer model."""
    depth = layer / (n_layer - 1) if n_layer > 1 else 0.0
    return round((0.5 + 0.5 * depth) * 8) / 8


def linear_mixer_layer(mixer: str, layer: int, n_layer: int) -> tuple[str, dict[str, Any]]:
    """The FLA layer (a `LINEAR_LAYERS` kind: 'gla', 'deltanet', 'gated_deltanet', 'hgrn2', 'mamba2', 'retnet',
    'linear_attn') and its options that a linear mixer puts at `layer` (0-based).

    One definition for jaxgpt and torch_ref, so both stack the same layers.
    """
    if mixer == "deltanet" or (mixer == "gla_deltanet" and layer % 2 == 0):
        return "deltanet", {}
    if mixer == "gated_deltanet" or (mixer == "gla_gated_deltanet" and layer % 2 == 0):
        return "gated_deltanet", {}
    if mixer == "gla_conv":
        return "gla", {"use_short_conv": True}
    if mixer == "gla_depth":
        return "gla", {"use_short_conv": True, "expand_k": gla_depth_expand_k(layer, n_layer)}
    if mixer in ("gla", "gla_deltanet", "gla_gated_deltanet"):
        return "gla", {}
    if mixer in ("hgrn2", "mamba2", "retnet", "linear_attn"):
        return mixer, {}
    raise ValueError(f"{mixer!r} is not a linear mixer; linear mixers: {', '.join(sorted(LINEAR_MIXERS))}")


def value_embed_layers(n_layer: int, cyclic: bool) -> dict[int, tuple[int, ...]]:
    """The value embeddings' placement: block index -> the tables added to the residual stream just before it.

    Plain: tables 0..4 at layers [1, 2, L-3, L-2, L-1] (for L < 6 coinciding layers add several tables and
    layers outside 0..L-1 are skipped). Cyclic: layer i in 1..L-1 uses table (i-1) mod 5.
    """
    if cyclic:
        return {i: ((i - 1) % NUM_TABLES,) for i in range(1, n_layer)}
    layers = [1, 2, n_layer - 3, n_layer - 2, n_layer - 1]
    return {i: tuple(j for j, l in enumerate(layers) if l == i) for i in sorted(set(layers)) if 0 <= i < n_layer}


def check_choice(axis: str, name: str) -> None:
    if name not in AXES[axis]:
        raise UserError(f"unknown {axis} {name!r}; valid: {', '.join(AXES[axis])}")


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    embedding: str = "default"
    norm: str = "layernorm"
    loss: str = "ce"
    mixer: str = "softmax"
    overrides: dict[str, Any] = field(default_factory=dict)  # the benchmark's CONFIG_OVERRIDES

    def __post_init__(self):
        for axis in AXES:
            check_choice(axis, getattr(self, axis))
        bad = set(self.overrides) - set(OVERRIDABLE_BY_VARIANT)
        if bad:
            raise UserError(
                f"variant {self.name!r}: CONFIG_OVERRIDES may only set {', '.join(OVERRIDABLE_BY_VARIANT)}; "
                f"got {', '.join(sorted(bad))}"
            )

    @property
    def axes(self) -> dict[str, str]:
        return {axis: getattr(self, axis) for axis in AXES}


PRESETS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("baseline", "GPT-2 as in nanoGPT: LayerNorm, softmax attention, wte+wpe, CE"),
        Variant("untied", "untied output head", embedding="untied"),
        Variant("bigram_hash", "hashed-bigram embeddings injected at every layer", embedding="bigram_hash"),
        Variant("value_embed", "value embeddings at 5 layers", embedding="value_embed"),
        Variant("ve_lcr", "value embeddings with local context residual (submission)", embedding="ve_lcr"),
        Variant("ve_lcr_cyclic_untied", "cyclic value embeddings with LCR, zero-init untied head",
                embedding="ve_lcr_cyclic_untied"),
        Variant("rmsnorm", "RMSNorm instead of LayerNorm", norm="rmsnorm"),
        Variant("rmsnorm_parallel", "RMSNorm, parallel attention/MLP block", norm="rmsnorm_parallel"),
        Variant("rmsnorm_post", "RMSNorm sandwich (pre + post branch norms)", norm="rmsnorm_post"),
        Variant("rmsnorm_parallel_gated", "RMSNorm, gated parallel block (submission)", norm="rmsnorm_parallel_gated"),
        Variant("label_smoothing", "CE with label smoothing 0.05", loss="label_smoothing"),
        Variant("z_loss", "CE + 1e-4 z-loss", loss="z_loss"),
        Variant("softcap_ce", "sigmoid logit soft-cap 30*sigmoid(x/7.5)", loss="softcap_ce"),
        Variant("poly_ls_z", "label smoothing + PolyLoss-1 + z-loss (submission)", loss="poly_ls_z"),
        Variant("tanh_cap_ls_z", "tanh logit cap + label smoothing 0.1 + z-loss (training only)", loss="tanh_cap_ls_z"),
        Variant("gla", "Gated Linear Attention, no position embedding", mixer="gla"),
        Variant("gla_conv", "GLA + short convolutions (submission)", mixer="gla_conv"),
        Variant("gla_deltanet", "DeltaNet / GLA hybrid (DeltaNet in even layers)", mixer="gla_deltanet"),
        Variant("gla_depth", "GLA + short conv, key dim growing with depth", mixer="gla_depth"),
        Variant("deltanet", "DeltaNet in every layer", mixer="deltanet"),
        Variant("gated_deltanet", "Gated DeltaNet in every layer", mixer="gated_deltanet"),
        Variant("gla_gated_deltanet", "Gated DeltaNet / GLA hybrid (Gated DeltaNet in even layers)",
                mixer="gla_gated_deltanet"),
        Variant("hgrn2", "HGRN2 in every layer", mixer="hgrn2"),
        Variant("mamba2", "Mamba2 in every layer", mixer="mamba2"),
        Variant("retnet", "RetNet (multi-scale retention) in every layer", mixer="retnet"),
        Variant("linear_attn", "linear attention (no decay) in every layer", mixer="linear_attn"),
    ]
}


def get_variant(name: str) -> Variant:
    if name not in PRESETS:
        raise UserError(f"unknown variant {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_variant(cfg: Config, name: str | None = None, **axes: str | None) -> Config:
    """Set the variant preset (axes + CONFIG_OVERRIDES) on `cfg`, then any single axes given explicitly.

    A run with explicitly set axes is named after them (e.g. `baseline+mixer=gla`).
    """
    variant = get_variant(name or cfg.variant)
    chosen = variant.axes | {k: v for k, v in axes.items() if v is not None}
    for axis, choice in chosen.items():
        check_choice(axis, choice)
    label = variant.name + "".join(f"+{k}={v}" for k, v in chosen.items() if v != variant.axes[k])
    model = dataclasses.replace(cfg.model, **chosen)
    return dataclasses.replace(cfg, variant=label, model=model, **variant.overrides)


def base_variant_name(label: str) -> str:
    return label.split("+", 1)[0]
