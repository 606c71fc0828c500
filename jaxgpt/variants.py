"""The variant registry: names of every axis choice, and the named presets over them (DESIGN §2).

Both implementations (jaxgpt.layers / torch_ref) provide a module for every name listed here; the tests
check that they agree. `python -m jaxgpt.variants` prints the table of presets.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from jaxgpt.config import MODEL_PRESETS, OVERRIDABLE_BY_VARIANT, Config, ModelConfig
from jaxgpt.errors import UserError, cli_main

AXES: dict[str, dict[str, str]] = {
    "embedding": {"default": "wte + learned wpe, head tied to wte"},
    "norm": {"layernorm": "Pre-LN LayerNorm blocks"},
    "loss": {"ce": "cross-entropy"},
    "mixer": {"softmax": "causal multi-head softmax attention"},
}

# Mixers that encode position themselves: the model drops the learned position embedding.
LINEAR_MIXERS: frozenset[str] = frozenset()


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


def _count_params(model_cfg: ModelConfig) -> int:
    from flax import nnx

    from jaxgpt.model import GPT, num_params

    return num_params(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))))


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="List the variant presets and axis choices.")
    p.add_argument("--model-size", default="gpt2-124m", choices=list(MODEL_PRESETS))
    args = p.parse_args(argv)
    base = ModelConfig(**MODEL_PRESETS[args.model_size])
    rows = [("name", "embedding", "norm", "loss", "mixer", f"params ({args.model_size}, no pos)", "description")]
    for v in PRESETS.values():
        n = _count_params(dataclasses.replace(base, **v.axes))
        rows.append((v.name, v.embedding, v.norm, v.loss, v.mixer, f"{n / 1e6:.2f}M", v.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print("\naxis choices (combine with --embedding/--norm/--loss/--mixer):")
    for axis, choices in AXES.items():
        print(f"  {axis}: " + "; ".join(f"{k} ({d})" for k, d in choices.items()))


if __name__ == "__main__":
    main()
