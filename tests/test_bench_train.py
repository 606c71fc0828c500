"""scripts/bench_train.py on the tiny model (CPU): both sides timed, rows and JSON consistent, failures contained."""

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's globals through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def run(bench, tmp_path: Path, *args: str, steps: int = 2) -> dict:
    out = tmp_path / "bench.json"
    report = bench.main([*args, "--warmup", "1", "--steps", str(steps), "--peak-tflops", "1", "--torch-mode", "eager",
                         "--set", "model.n_layer=1", "--out", str(out)])  # one layer: compiles fast on CPU
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    return report


def rows_by(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["side"], r["phase"]): r for r in report["rows"]}


def check_timed(row: dict, repeats: int, steps: int = 2) -> None:
    assert row["error"] is None
    assert len(row["step_ms"]) == repeats and all(len(r) == steps for r in row["step_ms"])
    assert all(t > 0 for r in row["step_ms"] for t in r) and all(t > 0 for t in row["pipelined_ms"])
    assert row["p10_ms"] <= row["median_ms"] <= row["p90_ms"]
    assert math.isclose(row["tokens_per_s"], row["tokens_per_step"] / (row["median_ms"] / 1e3))
    assert math.isclose(row["mfu"], row["tokens_per_s"] * row["flops_per_token"] * bench_fraction(row) / 1e12)


def bench_fraction(row: dict) -> float:
    return {"fwd": 1 / 3, "fwd+bwd": 1.0, "step": 1.0}[row["phase"]]


def test_baseline_breakdown(bench, tmp_path, capsys):
    report = run(bench, tmp_path, "--runs", "tiny:2:32", "--breakdown", steps=1)
    rows = rows_by(report)
    assert set(rows) == {(side, phase) for side in ("jax", "torch-eager") for phase in ("fwd", "fwd+bwd", "step")}
    for row in rows.values():
        check_timed(row, repeats=2, steps=1)
        assert (row["model"], row["variant"], row["batch"], row["T"]) == ("tiny", "baseline", 2, 32)
    for phase in ("fwd", "fwd+bwd", "step"):
        jax_row, torch_row = rows["jax", phase], rows["torch-eager", phase]
        assert jax_row["n_params"] == torch_row["n_params"] > 0
        assert math.isclose(torch_row["ratio_jax_over_torch"], jax_row["tokens_per_s"] / torch_row["tokens_per_s"])
    printed = capsys.readouterr().out
    assert "where the time goes" in printed and printed.rstrip().splitlines()[-1].startswith("tiny  | baseline")


def test_linear_mixer_with_sequence_length(bench, tmp_path):
    report = run(bench, tmp_path, "--runs", "tiny:2:16", "--variant", "gla", "--repeats", "1")
    rows = rows_by(report)
    assert set(rows) == {("jax", "step"), ("torch-eager", "step")}
    for row in rows.values():
        check_timed(row, repeats=1)
        assert (row["variant"], row["T"], row["tokens_per_step"]) == ("gla", 16, 32)
    assert math.isclose(rows["torch-eager", "step"]["ratio_jax_over_torch"],
                        rows["jax", "step"]["tokens_per_s"] / rows["torch-eager", "step"]["tokens_per_s"])


def test_failing_torch_side_keeps_jax_rows(bench, tmp_path, monkeypatch, capsys):
    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("compile exploded")

    monkeypatch.setattr(bench, "TorchSide", Broken)
    report = run(bench, tmp_path, "--runs", "tiny:1:16", "--repeats", "1")
    rows = rows_by(report)
    check_timed(rows["jax", "step"], repeats=1)
    broken = rows["torch-eager", "step"]
    assert "compile exploded" in broken["error"] and "median_ms" not in broken
    assert "FAILED: setup: RuntimeError: compile exploded" in capsys.readouterr().out


@pytest.mark.parametrize("runs", ["tiny", "tiny:0x", "tiny:2:3:4", ""])
def test_bad_runs_are_user_errors(bench, runs):
    with pytest.raises(bench.UserError):
        bench.parse_runs(runs)


def test_bench_dispatch_smoke():
    """scripts/bench_dispatch.py times both ways of passing the state and prints one line with both."""
    p = subprocess.run([sys.executable, "scripts/bench_dispatch.py", "--model", "tiny", "--calls", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    m = re.search(r"trees ([\d.]+), leaf lists ([\d.]+)", p.stdout)
    assert m and all(float(v) > 0 for v in m.groups()), p.stdout
