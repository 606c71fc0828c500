"""lm-eval on exported tiny models with the local (offline) tasks: perplexity equals JAX's on the same text."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_export import ROOT, apply_jax, make_run, subprocess_env

from jaxgpt.evaluate import evaluate, main, write_local_tasks
from jaxgpt.export import export, load_checkpoint
from jaxgpt.losses import cross_entropy
from jaxgpt.tokenizer import EOT, get_tokenizer

pytest.importorskip("lm_eval")
LIMIT = 12


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "run"
    make_run(path, bias=False)
    return path


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    """The tiny run, exported: the folder the rejected-argument tests point at."""
    return export(run, tmp_path_factory.mktemp("eval") / "export")


def jax_word_perplexity(run: Path, docs: list[str]) -> float:
    """exp(total NLL / total words): each doc scored as [EOT] + tokens with jaxgpt's eval loss (plain CE). The docs
    go through one forward, right-padded to block_size (causal: the padding changes no scored position)."""
    cfg, _, params = load_checkpoint(run)
    T = cfg.model.block_size
    seqs = [np.array([EOT] + get_tokenizer().encode_ordinary(doc)) for doc in docs]
    assert all(len(seq) - 1 <= T for seq in seqs)  # one lm-eval window each
    idx = np.stack([np.pad(seq[:-1], (0, T - len(seq) + 1), constant_values=EOT) for seq in seqs])
    logits = apply_jax(cfg, params, idx)  # [n, T, V]
    nll = sum(float(cross_entropy(logits[i, : len(seq) - 1], seq[1:])) * (len(seq) - 1)  # mean eval CE -> sum
              for i, seq in enumerate(seqs))
    words = sum(len(re.split(r"\s+", doc)) for doc in docs)
    return float(np.exp(nll / words))


def first_docs(tasks: Path, n: int) -> list[str]:
    return [json.loads(line)["text"] for line in (tasks / "jaxgpt_wikitext.jsonl").read_text().splitlines()[:n]]


def test_lm_eval_cli_word_perplexity_matches_jax(run, tmp_path, default_corpus):
    out = export(run, tmp_path / "remote", fmt="torch_ref")
    write_local_tasks(tmp_path / "tasks", max_tokens=32, data_dir=default_corpus)
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out},trust_remote_code=True",
           "--include_path", str(tmp_path / "tasks"), "--tasks", "jaxgpt_wikitext", "--device", "cpu",
           "--limit", str(LIMIT), "--output_path", str(tmp_path / "results")]
    subprocess.run(cmd, check=True, env=subprocess_env(tmp_path), cwd=tmp_path, capture_output=True)
    (result,) = (tmp_path / "results").rglob("results*.json")
    ppl = json.loads(result.read_text())["results"]["jaxgpt_wikitext"]["word_perplexity,none"]
    expected = jax_word_perplexity(run, first_docs(tmp_path / "tasks", LIMIT))
    print(f"lm_eval word perplexity {ppl:.6g} vs JAX {expected:.6g}: rel err {abs(ppl / expected - 1):.2e}")
    assert ppl == pytest.approx(expected, rel=1e-5)


def no_fork():
    raise AssertionError("os.fork() called in a process running JAX")


def test_evaluate_prints_final_metrics(run, tmp_path, default_corpus, capsys, monkeypatch):
    out = export(run, tmp_path / "hf")
    monkeypatch.setattr("jaxgpt.evaluate.ensure_default_corpus", lambda: default_corpus)
    monkeypatch.setattr("os.fork", no_fork)  # a fork after JAX's threads start can deadlock (lm-eval's bootstrap)
    metrics = evaluate(out, tasks="mlsbench", limit=LIMIT, val_loss=2.5, tasks_dir=tmp_path / "tasks", device="cpu")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    expected_line = r"Final metrics \(tiny\): val_loss_tiny=2\.5000, wikitext2_ppl_tiny=[\d.]+, lambada_ppl_tiny=[\d.]+"
    assert re.fullmatch(expected_line, line)
    expected = jax_word_perplexity(run, first_docs(tmp_path / "tasks", LIMIT))
    assert metrics["wikitext2_ppl"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_cli_bad_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jaxgpt.evaluate", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=subprocess_env(tmp_path), cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "not an exported model folder" in r.stderr


def reached(*args, **kwargs):
    raise AssertionError("rejected arguments reached lm-eval (task index, local tasks or model loading)")


@pytest.fixture
def no_slow_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building lm-eval's task index, writing the local tasks or running lm-eval fails the test."""
    monkeypatch.setattr("lm_eval.tasks.TaskManager", reached)
    monkeypatch.setattr("lm_eval.simple_evaluate", reached)
    monkeypatch.setattr("jaxgpt.evaluate.write_local_tasks", reached)


def cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """stderr of `python -m jaxgpt.evaluate ARGV`, run in process, which must be one error line and exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit must be a positive integer (documents per task), got 0"),
    (["--limit", "-1"], "--limit must be a positive integer (documents per task), got -1"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--val-loss", "nan"], "--val-loss must be a finite number >= 0, got nan"),
    (["--val-loss=-inf"], "--val-loss must be a finite number >= 0, got -inf"),
    (["--tasks", ""], "--tasks '' has an empty task name"),
    (["--tasks", "wikitext,,piqa"], "--tasks 'wikitext,,piqa' has an empty task name"),
    (["--device", "bogus"], "--device 'bogus' is not available here; choose from cpu"),
    (["--device", "cuda:99"], "--device 'cuda:99' is not available here"),
])
def test_evaluate_cli_rejects_bad_option(exported, no_slow_work, capsys, args, message):
    assert message in cli_error([str(exported), *args], capsys)


@pytest.mark.parametrize("under", ["", "sub"])
def test_evaluate_cli_rejects_tasks_dir_file(exported, no_slow_work, capsys, tmp_path, under):
    (tmp_path / "file").write_text("x")
    tasks_dir = tmp_path / "file" / under
    err = cli_error([str(exported), "--tasks", "local", "--tasks-dir", str(tasks_dir)], capsys)
    assert f"--tasks-dir {tasks_dir} must be a folder ({tmp_path / 'file'} is a file)" in err


def test_evaluate_cli_rejects_unknown_task(exported, no_slow_work, capsys, monkeypatch):
    class Registry:
        def __init__(self, include_path: str):
            self.all_tasks = ["piqa", "wikitext"]

    monkeypatch.setattr("lm_eval.tasks.TaskManager", Registry)
    err = cli_error([str(exported), "--tasks", "piqa,no_such_task"], capsys)
    assert "--tasks: unknown task no_such_task; " in err and "jaxgpt_wikitext" in err


def test_evaluate_cli_rejects_run_folder(run, no_slow_work, capsys):
    err = cli_error([str(run)], capsys)
    assert f"{run} is a training run folder" in err and f"python -m jaxgpt.export {run} OUT" in err


@pytest.mark.parametrize("cut", [5, 1000])
def test_evaluate_cli_rejects_damaged_weights(exported, no_slow_work, capsys, tmp_path, cut):
    damaged = shutil.copytree(exported, tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:cut])
    assert f"{weights} is not a readable safetensors file" in cli_error([str(damaged)], capsys)
