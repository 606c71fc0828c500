"""Run metrics: one JSON record per line in `metrics.jsonl`, the same scalars as TensorBoard event files next to
it, and a loss-curve PNG drawn from the records."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from jaxgpt.errors import UserError
from jaxgpt.spec.config import ModelConfig

# bf16 dense matmul peak of one device, TFLOP/s, by a substring of jax's device_kind (first match wins)
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
TENSORBOARD_GLOB = "events.out.tfevents.*"  # the event files tensorboardX writes


class MetricsLog:
    """Append-only JSONL log (strict JSON: non-finite numbers are written as null); records get a `time`.

    Each record is appended, flushed and fsynced on its own, so a killed process loses at most the line it was
    writing; `read` drops such a torn line with a warning, and `truncate_after` replaces the file atomically.
    With `writes=False` (the processes of a multi-process run other than 0) the log is read but never written."""

    def __init__(self, path: str | Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        if writes:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if not self.writes:
            return
        record = {"time": round(time.time(), 3), **record}
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise UserError(f"writing {self.path} failed: {e.strerror}") from None

    def read(self) -> list[dict[str, Any]]:
        """The records; a line that is not a JSON object (a write cut off by a kill) is dropped with a warning."""
        if not self.path.exists():
            return []
        records, torn = [], []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                torn.append(n)
        if torn:
            print(f"warning: {self.path}: dropped line {', '.join(map(str, torn))} (not a complete JSON record)",
                  file=sys.stderr)
        return records

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Keep the records up to `step` (a resumed run rewrites the later ones); -> the records kept. The file
        is replaced atomically: written to a temporary sibling, fsynced, renamed over it."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        if not self.writes:
            return kept
        tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            with tmp.open("w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"rewriting {self.path} failed: {e.strerror}") from None
        return kept


class TensorBoard:
    """TensorBoard scalars of a run: one tensorboardX writer, its event files in the run folder. On resume,
    `purge_step` hides the events an earlier process logged at or after that step (TensorBoard's own mechanism),
    so a resumed curve has no duplicate points. With `writes=False` it writes nothing (no event file either)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None, writes: bool = True):
        self._writer = (_summary_writer_class()(logdir=str(logdir), purge_step=purge_step, flush_secs=30)
                        if writes else None)

    def scalars(self, prefix: str, step: int, values: dict[str, float | None]) -> None:
        """Write `values` as `<prefix>/<name>` at `step` (None and non-finite values are left out)."""
        if self._writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}/{name}", value, global_step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it can (only for
    torch tensor inputs, which this writer never gets), seconds of start-up in every training process."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # makes tensorboardX's `import torch` fail, as if torch were not installed
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter


def device_peak_tflops(device_kind: str) -> float | None:
    """The bf16 dense matmul peak of one device of this kind (PEAK_TFLOPS), or None if unknown (CPUs)."""
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_kind), None)


def plot_losses(records: list[dict[str, Any]], path: str | Path, title: str) -> None:
    """Training loss (per logged step) and train/val eval loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), color="tab:blue", alpha=0.35, lw=1, label="train loss (batch)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", color="tab:blue", label="train loss (eval)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red", label="val loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token, nanoGPT/PaLM estimate: 6N + 12 L H D T (attention scores)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.block_size


def model_label(model_size: str) -> str:
    """The benchmark's label in metric names: gpt2-345m -> gpt-345m."""
    return model_size.replace("gpt2-", "gpt-")
