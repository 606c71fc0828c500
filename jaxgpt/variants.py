"""`python -m jaxgpt.variants`: the table of variant presets (jaxgpt.spec.variants) with the JAX model's
parameter counts, and the axis choices."""

import argparse
import dataclasses

from flax import nnx

from jaxgpt.errors import cli_main
from jaxgpt.model import GPT, num_params
from jaxgpt.spec.config import MODEL_PRESETS, ModelConfig
from jaxgpt.spec.variants import AXES, PRESETS


def count_params(model_cfg: ModelConfig) -> int:
    """Parameters of the model `model_cfg` describes, without position parameters (shapes only, no arrays)."""
    return num_params(nnx.eval_shape(lambda: GPT(model_cfg, nnx.Rngs(0))))


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="List the variant presets and axis choices.")
    p.add_argument("--model-size", default="gpt2-124m", choices=list(MODEL_PRESETS))
    args = p.parse_args(argv)
    base = ModelConfig(**MODEL_PRESETS[args.model_size])
    rows = [("name", "embedding", "norm", "loss", "mixer", f"params ({args.model_size}, no pos)", "description")]
    for v in PRESETS.values():
        n = count_params(dataclasses.replace(base, **v.axes))
        rows.append((v.name, v.embedding, v.norm, v.loss, v.mixer, f"{n / 1e6:.2f}M", v.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    print("\naxis choices (combine with --embedding/--norm/--loss/--mixer):")
    for axis, choices in AXES.items():
        print(f"  {axis}: " + "; ".join(f"{k} ({d})" for k, d in choices.items()))


if __name__ == "__main__":
    main()
