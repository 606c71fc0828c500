"""Generation (jaxgpt.generate, jaxgpt.sample): decode mode against the full forward for every preset, sampling,
the CLI, and greedy tokens against transformers' generate() on exported models (CPU, fp32)."""

import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.checkpoint import Checkpointer, TrainState, checkpoint_dir
from jaxgpt.errors import UserError
from jaxgpt.generate import Decoder, Sampling, candidates, feed, generate, sample_logits
from jaxgpt.model import GPT
from jaxgpt.optim import make_optimizer
from jaxgpt.sample import read_prompts
from jaxgpt.spec.config import Config, ModelConfig
from jaxgpt.spec.variants import LINEAR_MIXERS, PRESETS, apply_variant
from parity_tests.helpers import inference_presets

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
PROMPT, STEPS = 13, 7  # decode: a prompt of PROMPT tokens, then STEPS single tokens


def tiny_config(variant: str, block_size: int = 32) -> Config:
    """A 2-layer, C 64 model of `variant`; linear mixers get block_size 16, shorter than the decode tests' 20
    tokens, which they run past."""
    mixer = PRESETS[variant].mixer
    model = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=16 if mixer in LINEAR_MIXERS else block_size)
    return apply_variant(Config(model=model, batch_size=2, eval_iters=1), variant)


def perturbed_model(cfg: Config, seed: int = 1) -> GPT:
    """The model with every parameter perturbed by N(0, 0.05) noise, so that no init value (zero heads, unit
    gains, constant scalars) can hide a mistake."""
    model = GPT(cfg.model, nnx.Rngs(params=0))
    leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape)
                                                   for x, k in zip(leaves, keys)]))
    return model


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def decode_logits(graphdef: nnx.GraphDef, params: nnx.State, cache: nnx.State, tokens: jax.Array) -> jax.Array:
    """Logits [B, T, V] at every position of tokens [B, T] fed to a decode-mode model: the first PROMPT at once,
    then one at a time."""
    logits, cache = feed(graphdef, params, cache, tokens[:, :PROMPT], every=True)

    def step(cache, token):
        logits, cache = feed(graphdef, params, cache, token[:, None], every=True)
        return cache, logits[:, 0]

    _, steps = jax.lax.scan(step, cache, tokens[:, PROMPT:].T)
    return jnp.concatenate([logits, jnp.moveaxis(steps, 0, 1)], axis=1)


@pytest.mark.parametrize("variant", inference_presets())
def test_decode_matches_forward(variant):
    """Prefill + one token at a time gives the full forward's logits at every position, for a full row and for a
    left-padded shorter one (each against its own forward)."""
    model = perturbed_model(tiny_config(variant))
    T, pad = PROMPT + STEPS, 3
    idx = np.random.default_rng(0).integers(0, 50257, size=(2, T))
    tokens = idx.copy()
    tokens[1, pad:], tokens[1, :pad] = idx[1, : T - pad], 7  # row 1: a prompt 3 tokens shorter, left-padded
    dec = Decoder(model, 2, T, start=np.array([0, pad]))
    got = np.asarray(jax.jit(partial(decode_logits, dec.graphdef))(dec.params, dec.cache, jnp.asarray(tokens)))
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(idx)))
    assert rel_err(got[0], full[0]) < TOL
    assert rel_err(got[1, pad:], full[1, : T - pad]) < TOL


def test_padding_is_masked():
    """The left-padding check above can fail: the same row without its start offset differs."""
    model = perturbed_model(tiny_config("ve_lcr"))
    idx = np.random.default_rng(0).integers(0, 50257, size=(1, 8))
    tokens = np.concatenate([np.full((1, 3), 7), idx], axis=1)
    want = np.asarray(model(jnp.asarray(idx)))[0, -1]
    for start, close in ((3, True), (0, False)):
        logits = Decoder(model, 1, 11, start=np.array([start])).feed(tokens)
        assert (rel_err(np.asarray(logits)[0], want) < TOL) == close


def test_sampling_same_seed_same_tokens():
    model = perturbed_model(tiny_config("gla_conv"))
    sampling = Sampling(temperature=1.0, top_k=50)
    runs = [generate(model, [[1, 2, 3], [4, 5, 6]], 12, sampling, seed=s, eot=None).tokens for s in (5, 5, 6)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_top_k_one_is_greedy():
    model = perturbed_model(tiny_config("baseline"))
    prompts = [[10, 20, 30, 40], [50, 60, 70, 80]]
    greedy = generate(model, prompts, 10, Sampling(temperature=0), eot=None).tokens
    top1 = generate(model, prompts, 10, Sampling(temperature=1.5, top_k=1), seed=3, eot=None).tokens
    np.testing.assert_array_equal(greedy, top1)


def test_top_p_keeps_the_nucleus():
    """Probabilities 0.5, 0.25, 0.125, ...: top_p 0.7 keeps the two most likely tokens (0.5 < 0.7 <= 0.75), top_p
    0.5 only the first; draws never leave the nucleus, and reach both of its tokens."""
    probs = np.array([0.03125, 0.5, 0.0625, 0.25, 0.125, 0.03125], np.float32)
    logits = jnp.log(jnp.asarray(probs))[None]
    for top_p, nucleus in ((0.7, {1, 3}), (0.5, {1}), (1.0, set(range(6)))):
        values, ids = candidates(logits, Sampling(top_p=top_p))
        assert set(np.asarray(ids)[np.isfinite(np.asarray(values))].tolist()) == nucleus
    keys = jax.random.split(jax.random.key(0), 400)
    draws = jax.vmap(lambda k: sample_logits(logits, k, Sampling(top_p=0.7)))(keys)
    assert set(np.asarray(draws).ravel().tolist()) == {1, 3}


def test_vocab_limit_and_eot():
    """Ids past the vocab limit are never drawn; a row stops at EOT (EOT after it) and the loop once all rows
    have."""
    logits = jnp.zeros((1, 8)).at[0, 7].set(10.0)
    assert int(sample_logits(logits, jax.random.key(0), Sampling(temperature=0, vocab_limit=7))[0]) != 7
    model = perturbed_model(tiny_config("gla"))
    free = generate(model, [[1, 2, 3]], 6, Sampling(temperature=0), eot=None)
    eot = int(free.tokens[0, 2])  # greedy: stopping at this token ends the row at step 3
    gen = generate(model, [[1, 2, 3]], 6, Sampling(temperature=0), eot=eot)
    assert gen.lengths.tolist() == [3] and gen.steps == 3
    np.testing.assert_array_equal(gen.tokens[0], list(free.tokens[0, :3]) + [eot] * 3)


def test_linear_mixers_run_past_block_size_softmax_does_not():
    from jaxgpt.errors import UserError

    assert generate(perturbed_model(tiny_config("deltanet")), [[1] * 10], 30, eot=None).tokens.shape == (1, 30)
    with pytest.raises(UserError, match="block_size 32"):
        generate(perturbed_model(tiny_config("baseline")), [[1] * 10], 30)
    with pytest.raises(UserError, match="empty prompt"):
        generate(perturbed_model(tiny_config("baseline")), [[]], 3)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def make_run(run: Path, variant: str, block_size: int = 32) -> Config:
    """A run folder with one checkpoint (step 3) of a perturbed tiny model."""
    cfg = tiny_config(variant, block_size)
    params = nnx.state(perturbed_model(cfg), nnx.Param)
    ckpt = Checkpointer(run / "checkpoints")
    ckpt.save(TrainState(params, make_optimizer(cfg).init(params), {"step": 3, "config": cfg.to_dict(),
                                                                     "variant": cfg.variant}))
    ckpt.wait()
    ckpt.close()
    return cfg


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sample") / "run"
    make_run(path, "baseline")
    return path


def sample_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "jaxgpt.sample", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_prints_samples_and_throughput(baseline_run):
    p = sample_cli(str(baseline_run), "--prompt", "Hello", "--prompt", "The cat", "--num-samples", "2",
                   "--max-new-tokens", "8", "--seed", "3")
    assert p.returncode == 0, p.stderr
    header, samples = p.stdout.split("\n", 1)
    *samples, report = samples.split("---------------\n")
    assert header == "baseline (step 3), 4 samples"
    prompts = ["Hello", "Hello", "The cat", "The cat"]
    assert len(samples) == 4 and all(s.startswith(p) and len(s) > len(p) + 1 for s, p in zip(samples, prompts))
    assert "decode" in report and "tokens/s" in report


@pytest.mark.parametrize("args, message", [
    (("--prompt", ""), "empty prompt"),
    (("--max-new-tokens", "40"), "exceeds block_size 32"),
    (("--step", "9"), "no checkpoint for step 9"),
    (("--top-p", "1.5"), "top_p must be in (0, 1]"),
    (("--top-k", "-3"), "--top-k must be >= 0 (0: all tokens)"),
], ids=["empty-prompt", "past-block-size", "missing-step", "bad-top-p", "bad-top-k"])
def test_cli_bad_input_is_one_line(baseline_run, args, message):
    p = sample_cli(str(baseline_run), *args)
    assert p.returncode != 0 and p.stderr.strip().count("\n") == 0 and message in p.stderr, p.stderr


@pytest.mark.parametrize("options, message", [
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"top_p": float("nan")}, "top_p must be in (0, 1]"),
])
def test_bad_sampling_options_are_refused(options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        Sampling(**options)


def test_bad_prompt_files_and_sources_are_one_line(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "file").write_text("x")
    for prompt_file, message in ((tmp_path / "latin1.txt", "is not UTF-8 text"), (tmp_path, "is a folder"),
                                 (tmp_path / "absent", "does not exist")):
        with pytest.raises(UserError, match=message):
            read_prompts(None, str(prompt_file))
    with pytest.raises(UserError, match="is a file, not a run folder"):
        checkpoint_dir(tmp_path / "file")


def test_cli_missing_folder_is_one_line(tmp_path):
    for src in (tmp_path / "absent", tmp_path):  # no folder; a folder without checkpoints
        p = sample_cli(str(src))
        assert p.returncode != 0 and p.stderr.strip().count("\n") == 0, p.stderr
        assert ("does not exist" if src != tmp_path else "no checkpoint") in p.stderr


# ---------------------------------------------------------------------------------------------------
# Exports: transformers' generate()
# ---------------------------------------------------------------------------------------------------

NEW_TOKENS = 32


@pytest.fixture(scope="module", params=["baseline", "ve_lcr", "gla_conv", "deltanet", "gated_deltanet", "mamba2"])
def exported(request, tmp_path_factory) -> tuple[Path, str]:
    """(an export folder of a perturbed tiny model, its variant): GPT2LMHeadModel for baseline, torch_ref else."""
    from jaxgpt.export import export

    root = tmp_path_factory.mktemp(request.param)
    make_run(root / "run", request.param, block_size=64)
    return export(root / "run", root / "hf"), request.param


def greedy_prompts() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50257, size=(2, 8))


def assert_same_greedy(ours: list[list[int]], theirs: np.ndarray) -> None:
    """jaxgpt's rows (each up to its EOT) against transformers' new tokens [B, N] (EOT-padded after a row's end)."""
    assert theirs.shape[1] == max(len(row) for row in ours)
    for mine, row in zip(ours, theirs):
        assert row[: len(mine)].tolist() == mine


def test_greedy_matches_transformers_generate(exported):
    """Greedy tokens of the export read back into JAX (the sampler's import path) equal transformers' generate() on
    the exported model (GPT2LMHeadModel, or torch_ref's JaxgptForCausalLM with its cache)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxgpt.sample import load_model
    from torch_ref.hf import JaxgptForCausalLM

    path, variant = exported
    model, cfg, _ = load_model(path)
    prompts = greedy_prompts()
    ours = generate(model, prompts, NEW_TOKENS, Sampling(temperature=0)).rows()
    model_class = transformers.GPT2LMHeadModel if variant == "baseline" else JaxgptForCausalLM
    hf = model_class.from_pretrained(path).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=50256)
    assert_same_greedy(ours, out[:, prompts.shape[1]:].numpy())
    assert min(len(row) for row in ours) == NEW_TOKENS  # no row ended early: all 32 tokens compared
    if model_class is JaxgptForCausalLM:  # generate() asks for the last position's logits only (logits_to_keep=1)
        assert hf._supports_logits_to_keep()
        ids = torch.tensor(prompts)
        with torch.no_grad():
            full, last = hf(ids).logits, hf(ids, logits_to_keep=1).logits
        assert last.shape == (2, 1, full.shape[-1])
        torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-6)


# A fresh process loading the export with transformers alone (trust_remote_code): greedy generate() of argv[2]'s
# prompts, new tokens saved to argv[3]; nothing asks whether to trust remote code. (transformers >= 5 reads the model
# config in AutoTokenizer too, so the tokenizer takes trust_remote_code as well; GPT2TokenizerFast needs none.)
STANDALONE_GENERATE = """
import builtins, sys
import numpy as np
prompts = []
builtins.input = lambda message="": prompts.append(message) or "n"
import torch, transformers as t
model = t.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__name__ == "JaxgptForCausalLM", type(model)
idx = torch.tensor(np.load(sys.argv[2]))
with torch.no_grad():
    out = model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=%d, do_sample=False,
                         pad_token_id=50256)
np.save(sys.argv[3], out[:, idx.shape[1]:].numpy())
for tok in (t.AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True),
            t.GPT2TokenizerFast.from_pretrained(sys.argv[1])):
    assert tok("Hello world")["input_ids"] == [15496, 995]
assert not prompts, prompts
""" % NEW_TOKENS


def test_export_generates_in_fresh_process(tmp_path):
    from jaxgpt.export import export
    from jaxgpt.sample import load_model

    make_run(tmp_path / "run", "gla_conv")
    path = export(tmp_path / "run", tmp_path / "hf")
    np.save(tmp_path / "prompts.npy", greedy_prompts())
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-c", STANDALONE_GENERATE, str(path), str(tmp_path / "prompts.npy"),
                    str(tmp_path / "tokens.npy")], check=True, env=env, cwd=tmp_path, timeout=300)
    model, _, _ = load_model(path)
    ours = generate(model, greedy_prompts(), NEW_TOKENS, Sampling(temperature=0)).rows()
    assert_same_greedy(ours, np.load(tmp_path / "tokens.npy"))
