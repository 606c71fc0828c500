"""Train several variants with the same seed, data and recipe; write a results table and a val-loss plot.

    python scripts/compare_variants.py --variants all --config gpt2-124m --max-iters 600 \
        --set batch_size=8 --set grad_accum=1 --out docs/variants-gpt2-124m

Each variant's summary is written to OUT/<variant>.json as soon as it finishes, and variants whose summary
exists are skipped, so a comparison can be split over several calls (`--variants a,b` then `--variants c,d`);
the table (`results.md`, `results.json`) and plot (`val_loss.png`) always cover every summary in OUT.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from jaxgpt.errors import UserError, cli_main
from jaxgpt.metrics import MetricsLog
from jaxgpt.train import build_config, parser as train_parser, train
from jaxgpt.spec.variants import PRESETS


def run_variant(variant: str, train_args: list[str], runs_dir: Path) -> dict:
    """Train one variant (fresh run folder) and summarise its eval records."""
    run = runs_dir / variant
    shutil.rmtree(run, ignore_errors=True)
    cfg = build_config(train_parser().parse_args([*train_args, "--variant", variant, "--out", str(run)]))
    train(cfg)
    records = MetricsLog(run / "metrics.jsonl").read()
    evals = [r for r in records if r["kind"] == "eval"]
    steady = [r for r in records if r["kind"] == "train" and r["step"] > 1]
    return {
        "variant": variant,
        "axes": {a: getattr(cfg.model, a) for a in ("embedding", "norm", "loss", "mixer")},
        "model_size": cfg.model_size,
        "max_iters": cfg.max_iters,
        "tokens_per_iter": cfg.tokens_per_iter,
        "final_val_loss": evals[-1]["val_loss"],
        "best_val_loss": min(r["val_loss"] for r in evals),
        "final_train_loss": evals[-1]["train_loss"],
        "ms_per_iter": sorted(r["ms_per_iter"] for r in steady)[len(steady) // 2] if steady else None,
        "curve": [(r["step"], r["val_loss"]) for r in evals],
    }


def write_report(out: Path) -> list[dict]:
    results = sorted((json.loads(p.read_text()) for p in out.glob("*.json") if p.name != "results.json"),
                     key=lambda r: r["final_val_loss"])
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| variant | embedding | norm | loss | mixer | final val loss | best val loss | final train loss | ms/iter |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        a = r["axes"]
        ms = f"{r['ms_per_iter']:.1f}" if r["ms_per_iter"] else "-"
        lines.append(f"| {r['variant']} | {a['embedding']} | {a['norm']} | {a['loss']} | {a['mixer']} | "
                     f"{r['final_val_loss']:.4f} | {r['best_val_loss']:.4f} | {r['final_train_loss']:.4f} | {ms} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in results:
        steps, losses = zip(*r["curve"])
        ax.plot(steps[1:], losses[1:], marker=".", label=f"{r['variant']} ({r['final_val_loss']:.3f})")
    if results:
        ax.set_title(f"validation loss, {results[0]['model_size']}, {results[0]['tokens_per_iter']:,} tokens/iter")
    ax.set(xlabel="step", ylabel="val loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "val_loss.png", dpi=120)
    plt.close(fig)
    return results


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="all", help=f"comma-separated presets or 'all' ({', '.join(PRESETS)})")
    p.add_argument("--out", required=True, help="folder for the per-variant summaries, table and plot")
    p.add_argument("--runs", help="folder for the run folders (default: a temporary folder, deleted)")
    args, train_args = p.parse_known_args(argv)
    variants = list(PRESETS) if args.variants == "all" else args.variants.split(",")
    unknown = [v for v in variants if v not in PRESETS]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(PRESETS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="compare-variants-"))
    try:
        for v in variants:
            if (out / f"{v}.json").exists():
                print(f"== {v}: summary exists, skipped")
                continue
            print(f"== {v}", flush=True)
            (out / f"{v}.json").write_text(json.dumps(run_variant(v, train_args, runs_dir), indent=1) + "\n")
    finally:
        if not args.runs:
            shutil.rmtree(runs_dir, ignore_errors=True)
    for r in write_report(out):
        print(f"{r['variant']:>24}  val {r['final_val_loss']:.4f}  (best {r['best_val_loss']:.4f})")


if __name__ == "__main__":
    sys.exit(main())
