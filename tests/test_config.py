"""Configuration: config files, --set overrides, model presets, the lr schedule and the weight-decay mask."""

import dataclasses
import math
import re
import tomllib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.model import init_model
from jaxgpt.optim import decay_mask, learning_rate, make_optimizer
from jaxgpt.spec import schedule
from jaxgpt.spec.config import CONFIG_DIR, MODEL_PRESETS, Config, ModelConfig, available_configs
from jaxgpt.spec.variants import OVERRIDABLE_BY_VARIANT, PRESETS, Variant, apply_variant
from jaxgpt.train import build_config, parser


def cfg_from(*argv: str) -> Config:
    return build_config(parser().parse_args(list(argv)))


# ---------------------------------------------------------------------------------------------------
# config files
# ---------------------------------------------------------------------------------------------------


def test_config_dir_lists_the_benchmark_schedules():
    assert {"tiny", "gpt2-124m", "gpt2-345m", "gpt2-345m-embedding"} <= set(available_configs())


@pytest.mark.parametrize("name", available_configs())
def test_every_config_file_loads_and_applies_all_its_keys(name):
    cfg = cfg_from("--config", name)
    raw = tomllib.loads((CONFIG_DIR / f"{name}.toml").read_text())
    for key, value in raw.items():
        if key == "model":
            for mkey, mvalue in value.items():
                assert getattr(cfg.model, mkey) == mvalue, (name, mkey)
        else:
            assert getattr(cfg, key) == value, (name, key)
    # the architecture is the preset of model_size (unless the file sets [model] keys itself)
    preset = MODEL_PRESETS[cfg.model_size]
    for key, value in preset.items():
        if key not in raw.get("model", {}):
            assert getattr(cfg.model, key) == value, (name, key)
    # the config round-trips through its JSON form (what checkpoints and config.json hold)
    assert Config.from_dict(cfg.to_dict()) == cfg
    # a config file is also accepted as a path
    assert cfg_from("--config", str(CONFIG_DIR / f"{name}.toml")) == cfg


@pytest.mark.parametrize(
    "name, size, batch, accum, iters, layers, heads, width",
    [
        ("gpt2-124m", "gpt2-124m", 12, 5, 5000, 12, 12, 768),
        ("gpt2-345m", "gpt2-345m", 32, 16, 13535, 24, 16, 1024),
        ("gpt2-345m-embedding", "gpt2-345m", 96, 6, 12030, 24, 16, 1024),
    ],
)
def test_benchmark_schedules(name, size, batch, accum, iters, layers, heads, width):
    cfg = cfg_from("--config", name)
    assert (cfg.model_size, cfg.batch_size, cfg.grad_accum, cfg.max_iters) == (size, batch, accum, iters)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (layers, heads, width, 1024)
    assert cfg.tokens_per_iter == batch * accum * 1024
    assert cfg.model.vocab_size == 50304
    assert (cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay, cfg.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (cfg.learning_rate, cfg.min_lr) == (6e-4, 6e-5)
    assert cfg.decay_iters == iters  # cosine decays to min_lr at max_iters


def test_default_config_is_the_tiny_cpu_preset():
    cfg = cfg_from()
    assert cfg.model_size == "tiny"
    assert dataclasses.asdict(cfg.model) | MODEL_PRESETS["tiny"] == dataclasses.asdict(cfg.model)
    assert cfg.variant == "baseline"
    axes = (cfg.model.embedding, cfg.model.norm, cfg.model.loss, cfg.model.mixer)
    assert axes == ("default", "layernorm", "ce", "softmax")
    assert cfg.model.bias is False and cfg.model.dropout == 0.0


# ---------------------------------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------------------------------


def test_set_model_key_changes_only_that_key():
    base = cfg_from()
    cfg = cfg_from("--set", "model.n_layer=2")
    assert cfg.model.n_layer == 2
    assert cfg.model == dataclasses.replace(base.model, n_layer=2)
    assert dataclasses.replace(cfg, model=base.model) == base


def test_set_recipe_keys_are_typed():
    cfg = cfg_from("--set", "learning_rate=1e-3", "--set", "max_iters=2e3", "--set", "model.bias=true",
                   "--set", "batch_size= 8")
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.max_iters == 2000 and isinstance(cfg.max_iters, int)
    assert cfg.model.bias is True
    assert cfg.batch_size == 8


def test_model_size_switches_the_preset_and_keeps_the_axes():
    cfg = cfg_from("--set", "model_size=gpt2-124m")
    assert cfg.model_size == "gpt2-124m"
    assert cfg.model == dataclasses.replace(cfg_from().model, **MODEL_PRESETS["gpt2-124m"])
    # explicit model keys win over the preset, whatever their order on the command line
    for argv in (["--set", "model_size=gpt2-124m", "--set", "model.n_layer=2"],
                 ["--set", "model.n_layer=2", "--set", "model_size=gpt2-124m"]):
        cfg = cfg_from(*argv)
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) == (2, 768, 12)
    # a config file's size can be switched back on the command line
    cfg = cfg_from("--config", "gpt2-124m", "--set", "model_size=tiny")
    assert cfg.model == ModelConfig(**MODEL_PRESETS["tiny"])
    assert cfg.batch_size == 12  # the rest of the config file stays


def test_direct_options_override_config_and_set():
    cfg = cfg_from("--config", "gpt2-124m", "--set", "max_iters=7", "--set", "warmup_iters=2", "--max-iters", "3",
                   "--out", "x", "--data", "d")
    assert (cfg.max_iters, cfg.out, cfg.data) == (3, "x", "d")


def test_mesh_and_remat_keys():
    assert (Config().mesh, Config().remat) == ("", False)  # all devices on data, no remat
    cfg = cfg_from("--config", "gpt2-1.5b", "--set", "remat=true")
    assert (cfg.mesh, cfg.remat, cfg.model.n_layer) == ("fsdp=-1", True, 48)
    assert cfg_from("--set", "mesh=fsdp=4").mesh == "fsdp=4"
    assert cfg_from("--config", "gpt2-1.5b", "--set", "mesh=fsdp=4", "--mesh", "data=2,fsdp=2").mesh == "data=2,fsdp=2"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--set", "nope=1"], "nope"),
        (["--set", "model.nope=1"], "model.nope"),
        (["--set", "batch_size=abc"], "batch_size"),
        (["--set", "batch_size=2.5"], "batch_size"),
        (["--set", "max_iters=2.5e0"], "max_iters"),  # not an integer, even in exponent notation
        (["--set", "max_iters=1e999"], "max_iters"),
        (["--set", "model.bias=maybe"], "model.bias"),
        (["--set", "model_size=gpt2-7b"], "gpt2-124m"),
        (["--set", "model.n_embd=30", "--set", "model.n_head=4"], "divisible"),
        (["--set", "model.n_head=0"], "n_head"),
        (["--set", "batch_size=0"], "batch_size"),
        (["--set", "keep_checkpoints=0"], "keep_checkpoints"),
        (["--set", "model.vocab_size=100"], "vocab_size"),
        (["--set", "model.dropout=0.1"], "dropout"),
        (["--set", "noequals"], "key=value"),
        (["--config", "nope"], "gpt2-124m"),
        (["--variant", "nope"], "baseline"),
        (["--mixer", "nope"], "softmax"),
    ],
)
def test_bad_overrides_raise_user_errors(argv, needle):
    with pytest.raises(UserError, match=None) as e:
        cfg_from(*argv)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_toml_file_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = \n")
    with pytest.raises(UserError, match="bad.toml"):
        cfg_from("--config", str(bad))
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("batch_size = 4\nfoo = 1\n")
    with pytest.raises(UserError, match="foo"):
        cfg_from("--config", str(unknown))
    model_keys = tmp_path / "model.toml"
    model_keys.write_text("batch_size = 4\n[model]\nn_layer = 3\n")
    cfg = cfg_from("--config", str(model_keys))
    assert (cfg.batch_size, cfg.model.n_layer) == (4, 3)


def test_variant_and_axes_layering():
    cfg = cfg_from("--variant", "rmsnorm")
    assert (cfg.variant, cfg.model.norm, cfg.model.embedding) == ("rmsnorm", "rmsnorm", "default")
    cfg = cfg_from("--norm", "rmsnorm")
    assert (cfg.variant, cfg.model.norm) == ("baseline+norm=rmsnorm", "rmsnorm")
    # the axes survive a model_size switch and a config file
    cfg = cfg_from("--config", "gpt2-124m", "--variant", "rmsnorm", "--set", "model_size=gpt2-345m")
    assert (cfg.model.norm, cfg.model.n_layer, cfg.batch_size) == ("rmsnorm", 24, 12)


def test_variant_overrides_are_restricted_and_set_wins(monkeypatch):
    with pytest.raises(UserError, match="batch_size"):
        Variant("bad", "changes the batch", overrides={"batch_size": 4})
    for v in PRESETS.values():
        assert set(v.overrides) <= set(OVERRIDABLE_BY_VARIANT), v.name
    tuned = Variant("tuned", "a variant with CONFIG_OVERRIDES", norm="rmsnorm",
                    overrides={"learning_rate": 1e-3, "warmup_iters": 7})
    monkeypatch.setitem(PRESETS, "tuned", tuned)
    cfg = apply_variant(Config(), "tuned")
    assert (cfg.learning_rate, cfg.warmup_iters, cfg.model.norm) == (1e-3, 7, "rmsnorm")
    cfg = cfg_from("--variant", "tuned", "--set", "learning_rate=5e-4")
    assert (cfg.learning_rate, cfg.warmup_iters) == (5e-4, 7)  # --set is applied after the variant


# ---------------------------------------------------------------------------------------------------
# learning-rate schedule and AdamW
# ---------------------------------------------------------------------------------------------------


def nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT's train.py get_lr, written out independently."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # tiny defaults: warmup 60, decay at max_iters 600
        {"max_iters": 5000, "warmup_iters": 200},
        {"max_iters": 1000, "warmup_iters": 10, "lr_decay_iters": 700, "learning_rate": 1e-3, "min_lr": 1e-4},
    ],
)
def test_learning_rate_matches_nanogpt(overrides):
    cfg = cfg_from(*[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")])
    W, D = cfg.warmup_iters, cfg.decay_iters
    assert D == overrides.get("lr_decay_iters", cfg.max_iters)
    its = sorted({0, 1, W // 2, W - 1, W, W + 1, (W + D) // 3, (W + D) // 2, D - 1, D, D + 1, D + 50, cfg.max_iters})
    for it in its:
        want = nanogpt_get_lr(it, cfg.learning_rate, W, D, cfg.min_lr)
        got = float(learning_rate(cfg, it))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-12), it
        assert schedule.learning_rate(cfg, it) == pytest.approx(want, rel=1e-12, abs=1e-15), it  # the spec's, fp64
    # and it is a traced function too (what optax calls inside the jitted step)
    got = jax.jit(lambda i: learning_rate(cfg, i))(jnp.asarray(its))
    want = [nanogpt_get_lr(it, cfg.learning_rate, W, D, cfg.min_lr) for it in its]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def tiny_params(bias: bool = True, **axes: str):
    """The parameter tree of a 6-layer, 32-wide model, as shapes (no computation)."""
    cfg = ModelConfig(n_layer=6, n_head=2, n_embd=32, block_size=32, bias=bias, **axes)
    model = nnx.eval_shape(lambda: init_model(cfg, seed=0))
    return nnx.split(model, nnx.Param)[1]


@pytest.mark.parametrize("variant", list(PRESETS))
def test_weight_decay_mask_is_true_exactly_for_matrices_and_embeddings(variant):
    """AdamW decays >=2-D parameters (matrices, embeddings) only: never biases, norm gains or scalar gates."""
    params = tiny_params(bias=True, **PRESETS[variant].axes)
    mask = decay_mask(params)
    decayed = {}
    pairs = zip(jax.tree_util.tree_leaves_with_path(mask), jax.tree_util.tree_leaves_with_path(params), strict=True)
    for (path, m), (_, p) in pairs:
        name = jax.tree_util.keystr(path)
        decayed[name] = bool(m)
        assert bool(m) == (p.ndim >= 2), name
        # independent of shapes: linear kernels, embedding tables and head weights decay; biases, norm gains
        # and the variants' learnable scalars (gates, lambdas, betas) do not
        leaf = [k.key for k in path if hasattr(k, "key") and isinstance(k.key, str) and k.key != "value"][-1]
        if leaf in ("kernel", "embedding", "lm_head"):
            assert bool(m), name
        if re.search(r"bias|scale|gate|lambda|beta", leaf):
            assert not bool(m), name
    assert sum(decayed.values()) >= 6 and sum(not v for v in decayed.values()) >= 6


@pytest.mark.parametrize("count", [0, 3, 9])
def test_adamw_applies_schedule_and_decay_mask(count):
    """With zero gradients AdamW's only change is the decoupled weight decay p -= lr(count) * wd * p, on
    the masked parameters; every other parameter stays put."""
    cfg = cfg_from("--set", "warmup_iters=4", "--set", "max_iters=10", "--set", "weight_decay=0.5",
                   "--set", "learning_rate=0.1", "--set", "min_lr=0.01")
    rng = np.random.default_rng(0)
    shapes = {"kernel": (3, 4), "embedding": (5, 3), "conv": (2, 3, 4), "bias": (4,), "scale": (4,), "gate": ()}
    params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    tx = make_optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def run(params):
        state = tx.init(params)
        for _ in range(count):  # advance the optimizer's step counter
            _, state = tx.update(zeros, state, params)
        return tx.update(zeros, state, params)[0]

    updates = run(params)
    lr = nanogpt_get_lr(count, 0.1, 4, 10, 0.01)
    for name, p in params.items():
        want = -lr * 0.5 * np.asarray(p) if name in ("kernel", "embedding", "conv") else np.zeros(p.shape)
        np.testing.assert_allclose(np.asarray(updates[name]), want, rtol=1e-5, atol=1e-9, err_msg=name)


def two_updates(tx, params, grads):
    """The first update from `grads`, and the second one from zero gradients (same params)."""
    updates, state = tx.update(grads, tx.init(params), params)
    updates2, _ = tx.update(jax.tree.map(jnp.zeros_like, grads), state, params)
    return updates, updates2


def test_adamw_hyperparameters_and_clipping():
    """Known gradients through the optimizer: global-norm clip to grad_clip, Adam's bias-corrected moments
    with beta1 0.9 / beta2 0.95, eps, lr from the schedule, decoupled decay on matrices only."""
    params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((4,), 2.0)}
    grads = {"w": jnp.full((2, 2), -30.0), "b": jnp.full((4,), 40.0)}  # global norm sqrt(4*900 + 4*1600) = 100
    cfg = cfg_from("--set", "warmup_iters=0", "--set", "learning_rate=0.01", "--set", "weight_decay=0.1")
    assert (cfg.grad_clip, cfg.eps) == (1.0, 1e-8)
    tx = make_optimizer(cfg)
    updates, updates2 = jax.jit(lambda p, g: two_updates(tx, p, g))(params, grads)
    lr0, lr1 = float(learning_rate(cfg, 0)), float(learning_rate(cfg, 1))
    assert lr0 == pytest.approx(0.01)
    # first step: m_hat / sqrt(v_hat) = sign(g) (eps is negligible)
    np.testing.assert_allclose(updates["w"], -lr0 * (-1.0 + 0.1 * 2.0), rtol=1e-5)
    np.testing.assert_allclose(updates["b"], -lr0 * 1.0, rtol=1e-5)
    # second step from a zero gradient: the bias-corrected moments depend on beta1 and beta2
    g = 40.0 / 100.0  # b's gradient after clipping to global norm 1
    m_hat = 0.9 * g * (1 - 0.9) / (1 - 0.9**2)
    v_hat = 0.95 * g * g * (1 - 0.95) / (1 - 0.95**2)
    np.testing.assert_allclose(updates2["b"], -lr1 * m_hat / (math.sqrt(v_hat) + 1e-8), rtol=1e-5)
    # a large eps makes the update depend on the gradient's scale, which shows the clipping
    for clip, scale in ((1.0, 100.0), (0.5, 200.0), (0.0, 1.0)):
        cfg = cfg_from("--set", "warmup_iters=0", "--set", "learning_rate=0.01", "--set", "eps=0.5",
                       "--set", f"grad_clip={clip}")
        tx = make_optimizer(cfg)
        updates, _ = jax.jit(lambda p, g: two_updates(tx, p, g))(params, grads)
        gb = 40.0 / scale
        np.testing.assert_allclose(updates["b"], -0.01 * gb / (gb + 0.5), rtol=1e-5, err_msg=f"grad_clip={clip}")


def test_short_run_of_a_preset_warms_up_over_its_steps(capsys):
    cfg = cfg_from("--max-iters", "5")  # the tiny preset warms up over 40 steps
    assert (cfg.max_iters, cfg.warmup_iters) == (5, 5)
    assert "warming up over all 5 steps" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"warmup_iters \(10\) must be <= max_iters \(5\)"):
        cfg_from("--max-iters", "5", "--set", "warmup_iters=10")  # a warmup the user set is not shortened
