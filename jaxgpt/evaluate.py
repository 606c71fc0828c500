"""Evaluate an exported model with lm-evaluation-harness and print the benchmark's `Final metrics` line.

    python -m jaxgpt.evaluate OUT_DIR [--tasks mlsbench|local|NAME,...] [--limit N] [--val-loss X]

`mlsbench` is the benchmark suite: wikitext (word perplexity -> wikitext2_ppl), lambada_openai (perplexity ->
lambada_ppl), arc_easy, hellaswag, piqa, winogrande (acc -> <task>_acc). Those datasets come from the
Hugging Face hub; offline (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE set) `mlsbench` falls back to `local`.

`local` tasks are generated at run time (into --tasks-dir, or a temporary folder) from the held-out val split
of the default corpus, decoded with the GPT-2 tokenizer; nothing is fetched:
  jaxgpt_wikitext  loglikelihood_rolling over documents of whole lines, each at most max_length tokens, so
                   lm-eval scores every document in one window: [EOT] + tokens[:-1] -> tokens, which is exactly
                   jaxgpt's plain CE on that sequence. word_perplexity = exp(total NLL / total words), words =
                   len(re.split(r"\\s+", doc)) (documents are stripped) -> wikitext2_ppl.
  jaxgpt_lambada   the same documents with whitespace collapsed to single spaces and cut after their last
                   alphabetic word; loglikelihood of ' ' + last word given the rest (LAMBADA's format)
                   -> lambada_ppl.
The val loss comes from --val-loss, else from the export's jaxgpt.json (the run's logged val loss at the
exported step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxgpt.data import ensure_default_corpus, load_tokens, split_files
from jaxgpt.errors import UserError, cli_main
from jaxgpt.metrics import model_label
from jaxgpt.tokenizer import EOT, get_tokenizer

# lm-eval task -> (benchmark metric name, lm-eval metric)
MLSBENCH: dict[str, tuple[str, str]] = {
    "wikitext": ("wikitext2_ppl", "word_perplexity"),
    "lambada_openai": ("lambada_ppl", "perplexity"),
    "arc_easy": ("arc_easy_acc", "acc"),
    "hellaswag": ("hellaswag_acc", "acc"),
    "piqa": ("piqa_acc", "acc"),
    "winogrande": ("winogrande_acc", "acc"),
}
LOCAL: dict[str, tuple[str, str]] = {
    "jaxgpt_wikitext": ("wikitext2_ppl", "word_perplexity"),
    "jaxgpt_lambada": ("lambada_ppl", "perplexity"),
}

WIKITEXT_YAML = """task: jaxgpt_wikitext
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""
LAMBADA_YAML = """task: jaxgpt_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def val_text(data_dir: Path) -> list[str]:
    """The val split's documents (EOT-separated in the shards), decoded."""
    tokens = np.concatenate([load_tokens(f) for f in split_files(data_dir, "val")]).astype(np.int64)
    cuts = np.flatnonzero(tokens == EOT)
    enc = get_tokenizer()
    docs = (d[d != EOT] for d in np.split(tokens, cuts))
    return [enc.decode(d.tolist()) for d in docs if len(d)]


def line_documents(texts: list[str], max_tokens: int) -> Iterator[str]:
    """Consecutive whole lines grouped into stripped documents of at most `max_tokens` tokens each
    (lines longer than that on their own are skipped)."""
    enc = get_tokenizer()
    for text in texts:
        doc: list[str] = []
        for line in text.splitlines():
            if len(enc.encode_ordinary("\n".join(doc + [line]).strip())) <= max_tokens:
                doc.append(line)
                continue
            if "\n".join(doc).strip():
                yield "\n".join(doc).strip()
            doc = [line] if len(enc.encode_ordinary(line.strip())) <= max_tokens else []
        if "\n".join(doc).strip():
            yield "\n".join(doc).strip()


def lambada_document(doc: str) -> str | None:
    """A document as a LAMBADA item: single spaces, ending in an alphabetic last word (None if impossible)."""
    text = re.sub(r"[^A-Za-z]+$", "", " ".join(doc.split()))
    return text if " " in text and text.split(" ")[-1].isalpha() else None


def write_local_tasks(folder: Path, max_tokens: int, data_dir: Path | None = None) -> list[str]:
    """Write the local tasks' YAML and JSON Lines files into `folder` (lm-eval --include_path); returns names."""
    docs = list(line_documents(val_text(data_dir or ensure_default_corpus()), max_tokens))
    lambada = [d for d in map(lambada_document, docs) if d]
    folder.mkdir(parents=True, exist_ok=True)
    for name, yaml, items in (("jaxgpt_wikitext", WIKITEXT_YAML, docs), ("jaxgpt_lambada", LAMBADA_YAML, lambada)):
        data = (folder / f"{name}.jsonl").resolve()
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
        (folder / f"{name}.yaml").write_text(yaml.format(path=json.dumps(str(data))))
    return list(LOCAL)


def offline() -> bool:
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def check_weights(path: Path) -> None:
    """UserError unless `path` is a safetensors file whose header is intact and covers the file (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


def model_info(model_dir: Path) -> tuple[int, str, float | None]:
    """(context length, benchmark label, logged val loss) of an exported folder."""
    if (model_dir / "checkpoints").is_dir():
        raise UserError(f"{model_dir} is a training run folder, not an exported model folder; export it first: "
                        f"python -m jaxgpt.export {model_dir} OUT")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not an exported model folder (no config.json); see python -m jaxgpt.export")
    if not (model_dir / "model.safetensors").is_file():
        raise UserError(f"{model_dir} is not an exported model folder (no model.safetensors); "
                        "see python -m jaxgpt.export")
    check_weights(model_dir / "model.safetensors")
    meta_path = model_dir / "jaxgpt.json"
    try:
        config = json.loads((model_dir / "config.json").read_text())
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except ValueError as e:  # a file cut short or overwritten
        raise UserError(f"{model_dir} is not a readable export: {e}") from None
    block = config.get("n_positions") or config.get("max_position_embeddings")
    if not isinstance(block, int) or block < 1:
        raise UserError(f"{model_dir / 'config.json'} has no context length (n_positions or max_position_embeddings)")
    size = meta.get("config", {}).get("model_size", model_dir.name)
    return block, model_label(size), meta.get("val_loss")


def task_names(tasks: str) -> list[str]:
    """The lm-eval task names `--tasks` stands for: mlsbench's, the local ones, or a comma-separated list (none
    empty)."""
    if tasks in ("mlsbench", "local"):
        return list(MLSBENCH if tasks == "mlsbench" else LOCAL)
    names = [name.strip() for name in tasks.split(",")]
    if not all(names):
        raise UserError(f"--tasks {tasks!r} has an empty task name; give mlsbench, local or comma-separated "
                        f"lm-eval task names (local ones: {', '.join(LOCAL)})")
    return names


def devices() -> list[str]:
    """The torch devices that lm-eval's hf model is placed on as given, among those this machine has."""
    import torch

    cuda = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = ["mps", "mps:0"] if torch.backends.mps.is_available() else []
    return ["cpu"] + (["cuda", *cuda] if cuda else []) + mps


def check_arguments(limit: int | None, val_loss: float | None, tasks_dir: Path | None, batch_size: int) -> None:
    """UserError for an option out of range: --limit or --batch-size below 1, a non-finite or negative --val-loss,
    a --tasks-dir that is (or lies under) a file."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive integer (documents per task), got {limit}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be a positive integer, got {batch_size}")
    if val_loss is not None and not (math.isfinite(val_loss) and val_loss >= 0):
        raise UserError(f"--val-loss must be a finite number >= 0, got {val_loss}")
    if tasks_dir is not None:
        existing = next(p for p in (tasks_dir, *tasks_dir.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"--tasks-dir {tasks_dir} must be a folder ({existing} is a file)")


def final_line(label: str, val_loss: float | None, metrics: dict[str, float]) -> str:
    parts = [] if val_loss is None else [f"val_loss_{label}={val_loss:.4f}"]
    for name, value in metrics.items():
        parts.append(f"{name}_{label}={value:.2f}" if name.endswith("_ppl") else f"{name}_{label}={value:.4f}")
    return f"Final metrics ({label}): " + ", ".join(parts)


def evaluate(
    model_dir: str | Path,
    tasks: str = "mlsbench",
    limit: int | None = None,
    val_loss: float | None = None,
    tasks_dir: str | Path | None = None,
    device: str | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Run lm-eval on an exported folder; returns {benchmark metric: value} and prints the Final metrics line.
    Bad arguments raise UserError before the model is loaded."""
    tasks_dir = None if tasks_dir is None else Path(tasks_dir)
    check_arguments(limit, val_loss, tasks_dir, batch_size)
    names = task_names(tasks)
    model_dir = Path(model_dir).resolve()
    block, label, logged = model_info(model_dir)
    if device is not None and device not in (valid := devices()):
        raise UserError(f"--device {device!r} is not available here; choose from {', '.join(valid)}")

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    if tasks == "mlsbench" and offline():
        print("offline: using the local tasks instead of the mlsbench suite")
        names = list(LOCAL)
    with tempfile.TemporaryDirectory() as tmp:
        include = tasks_dir or Path(tmp)
        if set(names) & set(LOCAL):
            write_local_tasks(include, block)
        task_manager = TaskManager(include_path=str(include))
        unknown = sorted(set(names) - set(task_manager.all_tasks))
        if unknown:
            raise UserError(f"--tasks: unknown task {', '.join(unknown)}; give mlsbench, local, the local tasks "
                            f"({', '.join(LOCAL)}) or lm-eval task names (list them: lm-eval ls tasks)")
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "trust_remote_code": True, "max_length": block},
            tasks=names,
            task_manager=task_manager,
            limit=limit,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
            batch_size=batch_size,
            log_samples=False,
            bootstrap_iters=0,  # no stderr: lm-eval's bootstrap forks a pool, which can deadlock a process running JAX
        )["results"]
    metrics = {}
    for name in names:
        bench, metric = (MLSBENCH | LOCAL).get(name, (f"{name}_acc", "acc"))
        metrics[bench] = float(results[name][f"{metric},none"])
    print(final_line(label, val_loss if val_loss is not None else logged, metrics))
    return metrics


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m jaxgpt.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="folder written by python -m jaxgpt.export")
    p.add_argument("--tasks", default="mlsbench", help="mlsbench | local | comma-separated lm-eval task names")
    p.add_argument("--limit", type=int, help="at most N documents per task")
    p.add_argument("--val-loss", type=float, help="val loss to report (default: the run's, from jaxgpt.json)")
    p.add_argument("--tasks-dir", help="write the local tasks here (kept) instead of a temporary folder")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    evaluate(args.model_dir, args.tasks, args.limit, args.val_loss, args.tasks_dir, args.device, args.batch_size)


if __name__ == "__main__":
    main()
