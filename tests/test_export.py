"""Export to Hugging Face folders and import back: logits parity, round trips, bad input (CPU, fp32)."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from jaxgpt import export as export_module
from jaxgpt.checkpoint import Checkpointer, TrainState
from jaxgpt.errors import UserError
from jaxgpt.export import MODELING_FILE, export, import_folder, load_checkpoint, modeling_sources
from jaxgpt.metrics import MetricsLog
from jaxgpt.model import GPT
from jaxgpt.optim import make_optimizer
from jaxgpt.spec.config import Config, ModelConfig
from jaxgpt.spec.variants import apply_variant
from parity_tests.helpers import inference_presets

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TOL = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Environment of a fresh process: offline, this checkout importable, HF caches in tmp_path."""
    paths = {"PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf_home"), "JAX_PLATFORMS": "cpu"}
    return os.environ | OFFLINE | paths


def make_run(run: Path, bias: bool, step: int = 7, variant: str = "baseline") -> Config:
    """A run folder with one checkpoint of a tiny model whose every parameter is randomly perturbed
    (non-zero biases, non-unit norm gains), so that no layout mistake can hide behind init values."""
    cfg = Config(model=ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=bias), max_iters=step + 1,
                 batch_size=2, eval_iters=1, eval_interval=1000, log_interval=1, out=str(run))
    cfg = apply_variant(cfg, variant)
    params = nnx.state(GPT(cfg.model, nnx.Rngs(params=0)), nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    ckpt = Checkpointer(run / "checkpoints")
    meta = {"step": step, "config": cfg.to_dict(), "variant": cfg.variant}
    ckpt.save(TrainState(params, make_optimizer(cfg).init(params), meta))
    ckpt.wait()
    ckpt.close()
    MetricsLog(run / "metrics.jsonl").write(kind="eval", step=step, train_loss=3.5, val_loss=3.25)
    return cfg


@pytest.fixture(scope="module", params=[False, True], ids=["nobias", "bias"])
def run(request, tmp_path_factory) -> tuple[Path, Config]:
    path = tmp_path_factory.mktemp("run") / "run"
    return path, make_run(path, bias=request.param)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("baseline") / "run"
    make_run(path, bias=False)
    return path


def tokens(cfg: Config) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50257, size=(2, cfg.model.block_size))


def jax_logits(run: Path, idx: np.ndarray) -> np.ndarray:
    cfg, _, params = load_checkpoint(run)
    return apply_jax(cfg, params, idx)


def apply_jax(cfg: Config, params: dict, idx: np.ndarray) -> np.ndarray:
    """JAX logits [B, T, V] (fp32 on CPU) of a model given as pure-dict params."""
    model = nnx.eval_shape(lambda: GPT(cfg.model, nnx.Rngs(0)))
    graphdef, state = nnx.split(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    forward = jax.jit(lambda state, idx: nnx.merge(graphdef, state)(idx))  # one compile, not op-by-op dispatch
    return np.asarray(forward(state, idx), np.float32)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def test_gpt2_export_matches_jax(run, tmp_path):
    path, cfg = run
    out = export(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    assert json.loads((out / "jaxgpt.json").read_text())["val_loss"] == 3.25  # the run's logged val loss
    model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = tokens(cfg)
    with torch.no_grad():
        logits = model(torch.tensor(idx)).logits.numpy()
    err = rel_err(logits, jax_logits(path, idx))
    print(f"gpt2 export rel err (bias={cfg.model.bias}): {err:.2e}")
    assert err < TOL
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("Hello world")["input_ids"] == [15496, 995]


# A fresh process that cannot import JAX, jaxgpt or torch_ref (a meta-path finder refuses them; the checkout is
# neither the working directory nor on PYTHONPATH): it loads each export folder of argv[1::3] with transformers
# alone, saves the logits of argv[2::3]'s tokens to argv[3::3] and fails if anything asked whether to trust remote
# code.
STANDALONE_LOAD = """
import builtins, importlib.abc, sys
import numpy as np

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "orbax", "jaxgpt", "torch_ref"):
            raise ImportError(f"{name} is not importable here")
        return None

sys.meta_path.insert(0, Refuse())
prompts = []
builtins.input = lambda message="": prompts.append(message) or "n"
import torch, transformers as t
for folder, idx, logits in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    model = t.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__name__ == "JaxgptForCausalLM", type(model)
    tok = t.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert not prompts, prompts
    with torch.no_grad():
        np.save(logits, model(torch.tensor(np.load(idx))).logits.numpy())
"""
STANDALONE_VARIANTS = ["baseline", "gla_conv", "value_embed"]  # gla_conv, value_embed: modules beyond the baseline's


def test_torch_ref_exports_stand_alone(tmp_path):
    """The folder carries its model code: a fresh process where JAX, jaxgpt and torch_ref cannot be imported loads
    the export of each of STANDALONE_VARIANTS and computes its JAX model's logits. One process loads all three
    (the folders hold the same modeling files, which transformers copies from each folder and fails on one that is
    missing there)."""
    argv, cfgs = [], {}
    for variant in STANDALONE_VARIANTS:
        run = tmp_path / variant / "run"
        cfgs[variant] = make_run(run, bias=False, variant=variant)
        out = export(run, tmp_path / variant / "hf", fmt="torch_ref")
        assert set(modeling_sources()) <= {p.name for p in out.iterdir()}
        tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
        assert "auto_map" not in tokenizer_config and tokenizer_config["tokenizer_class"].startswith("GPT2Tokenizer")
        np.save(tmp_path / variant / "idx.npy", tokens(cfgs[variant]))
        argv += [str(out), str(tmp_path / variant / "idx.npy"), str(tmp_path / variant / "logits.npy")]
    env = {k: v for k, v in subprocess_env(tmp_path).items() if k != "PYTHONPATH"}
    (tmp_path / "cwd").mkdir()
    subprocess.run([sys.executable, "-c", STANDALONE_LOAD, *argv], check=True, env=env, cwd=tmp_path / "cwd")
    for variant, cfg in cfgs.items():
        _, _, params = load_checkpoint(tmp_path / variant / "run")
        err = rel_err(np.load(tmp_path / variant / "logits.npy"), apply_jax(cfg, params, tokens(cfg)))
        print(f"stand-alone torch_ref export rel err ({variant}): {err:.2e}")
        assert err < TOL, variant


def test_modeling_sources_are_flat_and_import_only_each_other():
    sources = modeling_sources()
    assert {MODELING_FILE, "model.py", "config.py", "variants.py", "constants.py"} <= set(sources)
    assert "class JaxgptForCausalLM(PreTrainedModel, GenerationMixin)" in sources[MODELING_FILE]  # torch_ref/hf.py
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in sources, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not [m for m in modules if m.split(".")[0] in ("jaxgpt", "torch_ref")], (name, modules)


def test_modeling_sources_refuse_what_a_folder_cannot_hold(tmp_path, monkeypatch):
    """An import of jaxgpt outside jaxgpt.spec, and two modules with one flat name, are errors naming the file."""
    entry = tmp_path / "torch_ref" / "hf.py"
    entry.parent.mkdir()
    monkeypatch.setattr(export_module, "MODELING_ENTRY", entry)
    entry.write_text("from jaxgpt.model import GPT\n")
    with pytest.raises(ValueError, match=r"hf.py:1: an export folder cannot hold this import"):
        modeling_sources()
    entry.write_text("from .config import X\nfrom jaxgpt.spec.config import ModelConfig\n")
    (entry.parent / "config.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match=r"would both be config.py in an export folder"):
        modeling_sources()


@pytest.mark.parametrize("fmt", ["gpt2", "torch_ref"])
def test_export_import_round_trip(run, tmp_path, fmt):
    path, cfg = run
    out = export(path, tmp_path / "hf", fmt=fmt)
    back = import_folder(out, tmp_path / "imported")
    cfg0, meta0, params0 = load_checkpoint(path)
    cfg1, meta1, params1 = load_checkpoint(back)
    assert (cfg1, meta1["step"]) == (cfg0, meta0["step"])
    flat0, flat1 = jax.tree.leaves_with_path(params0), jax.tree.leaves_with_path(params1)
    assert [p for p, _ in flat0] == [p for p, _ in flat1]
    for (p, a), (_, b) in zip(flat0, flat1):
        assert a.dtype == b.dtype and np.array_equal(a, b), p


def test_import_foreign_gpt2_folder(baseline_run, tmp_path):
    """An HF GPT-2 folder without jaxgpt.json imports with bias=True (here all-zero) and the same function."""
    out = export(baseline_run, tmp_path / "hf")
    (out / "jaxgpt.json").unlink()
    cfg0, _, params0 = load_checkpoint(baseline_run)
    cfg1, meta1, params1 = load_checkpoint(import_folder(out, tmp_path / "imported"))
    assert cfg1.model.bias and meta1["step"] == 0
    assert not params1["h"][0]["attn"]["c_attn"]["bias"].any()
    idx = tokens(cfg0)
    assert rel_err(apply_jax(cfg1, params1, idx), apply_jax(cfg0, params0, idx)) < TOL


@pytest.mark.parametrize("variant", inference_presets())
def test_every_variant_exports_and_imports(variant, tmp_path):
    """torch_ref export of each preset (loaded in-process through trust_remote_code): logits and round trip."""
    cfg = make_run(tmp_path / "run", bias=False, variant=variant)
    out = export(tmp_path / "run", tmp_path / "hf", fmt="torch_ref")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    idx = tokens(cfg)
    with torch.no_grad():
        logits = model(torch.tensor(idx)).logits.numpy()
    _, _, params0 = load_checkpoint(tmp_path / "run")
    err = rel_err(logits, apply_jax(cfg, params0, idx))
    print(f"torch_ref export rel err ({variant}): {err:.2e}")
    assert err < TOL
    _, _, params1 = load_checkpoint(import_folder(out, tmp_path / "imported"))
    assert jax.tree.all(jax.tree.map(np.array_equal, params0, params1))


def test_imported_checkpoint_resumes_training(tmp_path, default_corpus):
    from jaxgpt.train import train

    cfg = make_run(tmp_path / "run", bias=False)
    back = import_folder(export(tmp_path / "run", tmp_path / "hf"), tmp_path / "imported")
    final = train(Config.from_dict(cfg.to_dict() | {"out": str(back), "data": str(default_corpus)}), resume=True)
    assert final["step"] == cfg.max_iters and np.isfinite(final["val_loss"])


def test_torch_ref_without_the_variant_is_refused(baseline_run, tmp_path, monkeypatch):
    import torch_ref.model
    from jaxgpt.errors import UserError

    monkeypatch.setattr(torch_ref.model, "BLOCKS", {})
    with pytest.raises(UserError, match="torch_ref has no implementation"):
        export(baseline_run, tmp_path / "out", fmt="torch_ref")
    assert list(tmp_path.iterdir()) == []


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxgpt.export", *map(str, args)], capture_output=True, text=True,
                          env=subprocess_env(tmp_path), cwd=ROOT)


def test_cli_bad_input(baseline_run, tmp_path):
    r = cli(tmp_path, tmp_path / "missing", tmp_path / "out")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: checkpoint directory {tmp_path / 'missing'} does not exist"
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    r = cli(tmp_path, baseline_run, tmp_path / "taken")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'taken'} exists; pass --force to replace it"
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    r = cli(tmp_path, "--import", tmp_path / "taken", tmp_path / "imported")
    assert r.returncode == 2 and "is not a Hugging Face model folder" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "imported").exists()


def test_force_replaces(baseline_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("x")
    export(baseline_run, tmp_path / "out", force=True)
    assert not (tmp_path / "out" / "stale.txt").exists() and (tmp_path / "out" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name or ".old" in p.name]


def test_damaged_export_folders_are_one_line(baseline_run, tmp_path):
    """--import (and sampling, which reads exports the same way) of a folder whose config.json, jaxgpt.json or
    model.safetensors is damaged stops with one line naming the file."""
    good = export(baseline_run, tmp_path / "good")
    cases = {"config.json": b"{not json", "jaxgpt.json": b"[1, 2]", "model.safetensors": b"\x05\x00\x00\x00junk"}
    for name, content in cases.items():
        bad = tmp_path / name
        shutil.copytree(good, bad)
        (bad / name).write_bytes(content)
        with pytest.raises(UserError, match=re.escape(str(bad / name))):
            import_folder(bad, tmp_path / f"run-{name}")
        assert not (tmp_path / f"run-{name}").exists()
