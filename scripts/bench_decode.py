"""Decode speed: jaxgpt.generate against transformers' generate() on the same exported models, side by side.

    python scripts/bench_decode.py [--variants baseline,gla_conv,deltanet,gated_deltanet] [--batches 1,32]
                                   [--contexts 1024,8192,32768] [--new-tokens 64] [--model-size gpt2-124m]
                                   [--sides jax,hf] [--out results.json] [--plot decode.png] [--tiny]

For every variant, batch size B and context length L: a model of the harness's initialisation (random weights;
block_size large enough for the longest context, so the softmax baseline has learned positions that far), a
random prompt of L tokens per row, then greedy decoding of --new-tokens tokens without stopping at EOT.
  jax  jaxgpt.generate.generate (bf16 on a GPU): the prompt prefilled in pieces, then the jitted decode loop;
       per step = the decode loop's time / (tokens drawn - 1) (the first token comes from the prefill's logits).
  hf   the same weights exported as jaxgpt.export does it (GPT2LMHeadModel for baseline, torch_ref's
       JaxgptForCausalLM with FLA's layers on CUDA otherwise), in bf16, `model.generate(min_new_tokens=N,
       max_new_tokens=N, do_sample=False)`; per step = (time for N new tokens - time for 1) / (N - 1), which
       leaves the prefill out.
Reported per row: ms per decode step (all B rows advance together) and tokens/s = B / step time. A plot of the
step time against the context length (one panel per batch size, one line per variant and side) goes to --plot.

--tiny runs a 2-layer model (C 64) with contexts 32 and 64, batches 1 and 2 and 8 new tokens, on whatever device
is there: a smoke check of the script on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

# JAX and PyTorch share the GPU: JAX allocates what it uses when it uses it (no 75% up front) and frees it after.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jaxgpt.convert import jax_to_torch  # noqa: E402
from jaxgpt.export import gpt2_model, is_plain_gpt2, torch_ref_model  # noqa: E402
from jaxgpt.generate import Sampling, generate  # noqa: E402
from jaxgpt.model import GPT, init_model  # noqa: E402
from jaxgpt.spec.config import MODEL_PRESETS, ModelConfig  # noqa: E402
from jaxgpt.spec.variants import LINEAR_MIXERS, PRESETS  # noqa: E402
from jaxgpt.tokenizer import EOT  # noqa: E402

PREFILL_SCORES_BYTES = 2**32  # the most the softmax prefill's fp32 scores [B, H, piece, max_length] may take
LINEAR_PREFILL_PIECE = 4096  # linear mixers prefill in pieces of this many tokens (the state carries over)
TINY = dict(n_layer=2, n_head=2, n_embd=64)


def model_config(variant: str, size: str | None, max_length: int) -> ModelConfig:
    """The variant at `size` (None: the tiny model) with block_size = max_length (learned positions that far)."""
    dims = TINY if size is None else MODEL_PRESETS[size]
    return ModelConfig(**{**dims, "block_size": max_length}, **PRESETS[variant].axes)


def prefill_piece(cfg: ModelConfig, batch: int, context: int, max_length: int) -> int:
    """Prompt tokens per prefill call: a power of two dividing the context, small enough for the softmax scores."""
    if cfg.mixer in LINEAR_MIXERS:
        piece = LINEAR_PREFILL_PIECE
    else:
        piece = 2 ** int(math.log2(max(1, PREFILL_SCORES_BYTES // (batch * cfg.n_head * max_length * 4))))
    return math.gcd(context, piece)


def time_jax(model: GPT, prompts: np.ndarray, new_tokens: int, piece: int) -> float:
    """Seconds per decode step of jaxgpt.generate."""
    gen = generate(model, prompts, new_tokens, Sampling(temperature=0), eot=None, prefill_chunk=piece)
    return gen.decode_seconds / (gen.steps - 1)


def hf_model(cfg: ModelConfig, model: GPT, device: str):
    """The model as jaxgpt.export exports it (same weights), on `device`, bf16 on a GPU."""
    import torch

    torch_sd = jax_to_torch(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    hf = gpt2_model(cfg, torch_sd) if is_plain_gpt2(cfg) else torch_ref_model(cfg, torch_sd)
    return hf.to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32).eval()


def time_hf(hf, prompts: np.ndarray, new_tokens: int) -> float:
    """Seconds per decode step of transformers' generate(): (N new tokens - 1 new token) / (N - 1)."""
    import torch

    idx = torch.tensor(prompts, device=hf.device)

    def run(n: int) -> float:
        if idx.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(idx, attention_mask=torch.ones_like(idx), min_new_tokens=n, max_new_tokens=n,
                        do_sample=False, pad_token_id=EOT)
        if idx.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(2)  # warm-up: kernels, Triton autotuning
    return (run(new_tokens) - run(1)) / (new_tokens - 1)


def plot(rows: list[dict], path: Path) -> None:
    """Step time against context length, one panel per batch size, one line per variant and side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for key in sorted({(r["variant"], r["side"]) for r in rows if r["batch"] == batch}):
            pts = sorted((r["context"], r["ms_per_step"]) for r in rows
                         if (r["variant"], r["side"]) == key and r["batch"] == batch and r["ms_per_step"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if key[1] == "jax" else "--", label=" ".join(key))
        ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
               title=f"batch {batch}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="baseline,gla_conv,deltanet,gated_deltanet")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--contexts", default="1024,8192,32768")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--model-size", default="gpt2-124m", choices=list(MODEL_PRESETS))
    p.add_argument("--sides", default="jax,hf", help="comma-separated subset of jax,hf")
    p.add_argument("--out", metavar="FILE", help="write the rows as JSON")
    p.add_argument("--plot", metavar="FILE", default="bench_decode.png", help="step time vs context (png)")
    p.add_argument("--tiny", action="store_true", help="2-layer model, contexts 32,64, batches 1,2, 8 new tokens")
    args = p.parse_args(argv)
    if args.tiny:
        args.batches, args.contexts, args.new_tokens, size = "1,2", "32,64", 8, None
    else:
        size = args.model_size
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in PRESETS]
    if unknown:
        p.error(f"unknown variants {unknown}; presets: {', '.join(PRESETS)}")
    batches, contexts, sides = parse_ints(args.batches), parse_ints(args.contexts), args.sides.split(",")
    max_length = max(contexts) + args.new_tokens
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; torch device {device}; "
          f"{args.model_size if size else 'tiny'}; {args.new_tokens} new tokens", flush=True)

    meta = dict(device=jax.devices()[0].device_kind, model=args.model_size if size else "tiny",
                config={k: v for k, v in dataclasses.asdict(model_config(variants[0], size, max_length)).items()
                        if k in ("n_layer", "n_head", "n_embd", "block_size")})
    rows = []
    print(f"{'variant':16s} {'side':4s} {'batch':>5s} {'context':>7s} {'ms/step':>9s} {'tokens/s':>10s}", flush=True)
    for variant in variants:
        cfg = model_config(variant, size, max_length)
        model = init_model(cfg, seed=0)
        hf = hf_model(cfg, model, device) if "hf" in sides else None
        for batch, context in ((b, c) for b in batches for c in contexts):
            prompts = np.random.default_rng(context).integers(0, EOT, size=(batch, context))
            for side in sides:
                row = dict(variant=variant, side=side, batch=batch, context=context, new_tokens=args.new_tokens,
                           ms_per_step=None, tokens_per_s=None)
                try:
                    if side == "jax":
                        step = time_jax(model, prompts, args.new_tokens, prefill_piece(cfg, batch, context, max_length))
                    else:
                        step = time_hf(hf, prompts, args.new_tokens)
                    row.update(ms_per_step=step * 1e3, tokens_per_s=batch / step)
                    shown = f"{step * 1e3:9.3f} {batch / step:10.1f}"
                except Exception as e:  # noqa: BLE001 - an out-of-memory row is reported and the sweep goes on
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    traceback.print_exc(limit=2)
                    if side == "hf" and device == "cuda":
                        import torch

                        torch.cuda.empty_cache()
                    shown = f"{'n/a':>9s} {'':>10s} {row['error'][:60]}"
                print(f"{variant:16s} {side:4s} {batch:5d} {context:7d} {shown}", flush=True)
                rows.append(row)
                if args.out:  # after every row, so a run cut off by a time limit keeps what it measured
                    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        del model, hf

    if args.plot:
        plot(rows, Path(args.plot))
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
