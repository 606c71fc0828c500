"""Variant axes (docs/variants.md): losses vs NumPy formulas, effective init on both sides, the bigram hash,
value-embedding placement, the registry and its CLI. Model-level parity lives in parity_tests/."""

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxgpt.losses as jl
import torch_ref.losses as tl
from jaxgpt import variants as variants_cli
from jaxgpt.spec import variants
from jaxgpt.spec.config import Config, ModelConfig
from jaxgpt.spec.constants import MAMBA2_CONV_KERNEL
from jaxgpt.errors import UserError
from jaxgpt.layers import block as jblock
from jaxgpt.layers import embedding as jemb
from jaxgpt.layers import mixers as jmix
from jaxgpt.model import init_model
from torch_ref import block as tblock
from torch_ref import embedding as temb
from torch_ref import mixers as tmix
from torch_ref.model import build_model

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, dtype="float32")


# --- losses -----------------------------------------------------------------------------------------------


def _np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_lse(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]


def _np_smoothed_ce(z: np.ndarray, y: np.ndarray, eps: float) -> float:
    """CE against the smoothed target distribution q = (1-eps)*onehot + eps/V."""
    q = np.full(z.shape, eps / z.shape[-1])
    np.put_along_axis(q, y[..., None], q[..., :1] + (1 - eps), axis=-1)
    return float(-(q * _np_log_softmax(z)).sum(-1).mean())


def _np_p_target(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.exp(_np_log_softmax(z))
    return np.take_along_axis(p, y[..., None], -1)[..., 0]


def _np_tanh_cap_ls_z(z: np.ndarray, y: np.ndarray) -> float:
    capped = 30 * np.tanh(z / 30)
    return _np_smoothed_ce(capped, y, 0.1) + 1e-4 * float((_np_lse(capped) ** 2).mean())


NP_LOSSES = {
    "ce": lambda z, y: _np_smoothed_ce(z, y, 0.0),
    "label_smoothing": lambda z, y: _np_smoothed_ce(z, y, 0.05),
    "z_loss": lambda z, y: _np_smoothed_ce(z, y, 0.0) + 1e-4 * float((_np_lse(z) ** 2).mean()),
    "softcap_ce": lambda z, y: _np_smoothed_ce(z, y, 0.0),  # the cap is in the model output
    "poly_ls_z": lambda z, y: _np_smoothed_ce(z, y, 0.05)
    + float((1 - _np_p_target(z, y)).mean())
    + 1e-4 * float((_np_lse(z) ** 2).mean()),
    "tanh_cap_ls_z": _np_tanh_cap_ls_z,
}


@pytest.mark.parametrize("name", list(variants.AXES["loss"]))
def test_loss_matches_numpy_formula(name):
    rng = np.random.default_rng(0)
    z = rng.normal(0, 20, size=(2, 5, 13))  # large logits: the caps matter
    y = rng.integers(0, 13, size=(2, 5))
    want = NP_LOSSES[name](z, y)
    got_jax = float(jl.LOSSES[name](jnp.asarray(z, jnp.float32), jnp.asarray(y)))
    got_torch = tl.LOSSES[name](torch.tensor(z, dtype=torch.float32), torch.tensor(y)).item()
    assert got_jax == pytest.approx(want, rel=1e-5)
    assert got_torch == pytest.approx(want, rel=1e-5)


def test_a_loss_is_of_the_statistics_or_of_the_logits():
    assert not jl.LOSSES["poly_ls_z"].needs_logits and jl.LOSSES["tanh_cap_ls_z"].needs_logits  # its cap
    assert jl.Loss(of_logits=lambda z, y: z.mean()).needs_logits
    for bad in ({}, {"of_stats": jl.nll, "of_logits": lambda z, y: z.mean()}):
        with pytest.raises(ValueError, match="either the logit statistics"):
            jl.Loss(**bad)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(variants.AXES["loss"]))
def test_loss_gradient_matches_torch_autograd(name, dtype):
    """The custom VJP of jaxgpt.losses.logit_stats vs PyTorch autograd of the same loss, in fp64 from the same
    (bf16-rounded) logits; the bf16 gradient is rounded once, to bf16."""
    import jax

    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(0, 5, size=(3, 7, 61)), dtype)
    y = rng.integers(0, 61, size=(3, 7))
    got = np.asarray(jax.grad(jl.LOSSES[name])(z, jnp.asarray(y)).astype(jnp.float32), np.float64)
    zt = torch.tensor(np.asarray(z.astype(jnp.float32)), dtype=torch.float64, requires_grad=True)
    tl.LOSSES[name](zt, torch.tensor(y)).backward()
    want = zt.grad.numpy()
    tol = 1e-5 if dtype == "float32" else 8e-3  # bf16: one rounding of each element (2^-8 relative)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def _adversarial_rows(V: int, rng: np.random.Generator) -> np.ndarray:
    """Rows for the online logsumexp: random, one huge logit (first / last), ties, large negative and positive
    offsets, and sorted rows (the running max changes at every element, or never)."""
    rows = [rng.normal(0, 1, V), rng.normal(0, 20, V), np.full(V, 3.25), np.zeros(V), rng.normal(-1e4, 1, V),
            np.full(V, -1e4), rng.normal(1e4, 1, V)]
    for i in (0, V // 3, V - 1):
        rows.append(rng.normal(0, 1, V))
        rows[-1][i] = 1e4 if i != V - 1 else 80.0
    return np.stack(rows + [np.linspace(-20, 20, V), np.linspace(20, -20, V)])  # the sorted rows last


@pytest.mark.parametrize("V", [1, 37, 50304])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_online_logsumexp_matches_jax(V, dtype):
    """jl.online_max_sum_exp (one variadic reduce) vs jax.nn.logsumexp in fp32 on the same (rounded) logits, and
    its z_max exactly; rows with -inf entries stay NaN-free. On the CPU the reduce accumulates each row in order,
    so a sorted row of 50304 gathers ~3e-6 relative rounding; the other rows stay under ~2e-7."""
    import jax

    z = jnp.asarray(_adversarial_rows(V, np.random.default_rng(0)), dtype).astype(jnp.float32)
    z_max, sum_exp = jax.jit(jl.online_max_sum_exp)(z)
    got = np.asarray(z_max + jnp.log(sum_exp))[..., 0]
    want = np.asarray(jax.nn.logsumexp(z, axis=-1))
    assert np.array_equal(np.asarray(z_max)[..., 0], np.asarray(z.max(-1)))
    np.testing.assert_allclose(got[:-2], want[:-2], rtol=1e-6)
    np.testing.assert_allclose(got[-2:], want[-2:], rtol=1e-5 if V > 1000 else 1e-6)

    inf = -np.inf
    z = jnp.asarray([[inf, inf, inf], [inf, 0.0, inf], [0.0, inf, 1.0]], jnp.float32)
    z_max, sum_exp = jl.online_max_sum_exp(z)
    np.testing.assert_allclose(np.asarray(z_max + jnp.log(sum_exp))[..., 0], [-np.inf, 0.0, np.log1p(np.e)])


def test_loss_logit_stats_reads_bf16_logits_once():
    """The CUDA lowering (shape-only, no GPU needed) of the CE loss and its gradient reduces bf16 logits [B, T, V]
    in one variadic reduce (max, sum of exp); fp32 logits keep the two-pass form (see jl.two_pass_max_sum_exp)."""
    import jax

    y = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    f = jax.jit(jax.value_and_grad(jl.cross_entropy))
    for dtype, want in ((jnp.bfloat16, ["(tensor<2x8x37xf32>, tensor<2x8x37xf32>, tensor<f32>, tensor<f32>)"]),
                        (jnp.float32, ["(tensor<2x8x37xf32>, tensor<f32>)"] * 2)):
        text = jax.export.export(f, platforms=["cuda"])(jax.ShapeDtypeStruct((2, 8, 37), dtype), y).mlir_module()
        reduces = [line for line in text.splitlines() if "stablehlo.reduce" in line and "x37x" in line]
        assert [line.split(" : ", 1)[1].split(" -> ")[0] for line in reduces] == want, (dtype, reduces)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 3e-3)])
def test_gelu_and_its_custom_vjp_match_torch(dtype, tol):
    """jaxgpt's exact GELU (fp32 math, recompute backward) vs torch's in fp64 on the same inputs."""
    import jax

    rng = np.random.default_rng(0)
    x, dy = (jnp.asarray(rng.normal(0, 3, 4096), dtype) for _ in range(2))
    y, vjp = jax.vjp(jblock.gelu, x)
    xt = torch.tensor(np.asarray(x.astype(jnp.float32)), dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.gelu(xt)
    yt.backward(torch.tensor(np.asarray(dy.astype(jnp.float32)), dtype=torch.float64))
    for got, want in ((y, yt.detach().numpy()), (vjp(dy)[0], xt.grad.numpy())):
        got = np.asarray(got.astype(jnp.float32), np.float64)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 3e-3)])
def test_layer_norm_and_its_custom_vjp_match_torch(dtype, tol, bias):
    """jaxgpt's LayerNorm (fp32 math, torch's backward from saved mean / rstd) vs torch's in fp64: y, dx, dw, db."""
    import jax

    rng = np.random.default_rng(0)
    C = 96
    cfg = dataclasses.replace(TINY, n_embd=C, bias=bias)
    ln = jblock.layer_norm(cfg, nnx.Rngs(0))
    ln.scale[...] = jnp.asarray(rng.normal(1, 0.5, C), jnp.float32)
    if bias:
        ln.bias[...] = jnp.asarray(rng.normal(0, 0.5, C), jnp.float32)
    x = jnp.asarray(rng.normal(0.3, 2, (3, 5, C)), dtype)
    dy = jnp.asarray(rng.normal(0, 1, (3, 5, C)), jnp.float32)
    graphdef, params = nnx.split(ln)
    y, vjp = jax.vjp(lambda p, x: nnx.merge(graphdef, p)(x), params, x)
    dparams, dx = vjp(dy)
    assert y.dtype == jnp.float32 and dx.dtype == x.dtype

    t = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True)
         for k, v in (("x", x.astype(jnp.float32)), ("w", ln.scale[...])) + ((("b", ln.bias[...]),) if bias else ())}
    yt = torch.nn.functional.layer_norm(t["x"], (C,), t["w"], t.get("b"), eps=1e-5)
    yt.backward(torch.tensor(np.asarray(dy), dtype=torch.float64))
    pairs = [(y, yt), (dx, t["x"].grad), (dparams["scale"][...], t["w"].grad)]
    pairs += [(dparams["bias"][...], t["b"].grad)] if bias else []
    for got, want in pairs:
        got, want = np.asarray(got.astype(jnp.float32), np.float64), want.detach().numpy()
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < tol


def test_softcap_output_transform():
    z = np.linspace(-200, 200, 41)
    want = 30 / (1 + np.exp(-z / 7.5))
    np.testing.assert_allclose(np.asarray(jl.OUTPUT_TRANSFORMS["softcap_ce"](jnp.asarray(z, jnp.float32))), want,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tl.OUTPUT_TRANSFORMS["softcap_ce"](torch.tensor(z)).numpy(), want, rtol=1e-5, atol=1e-6)
    assert set(jl.OUTPUT_TRANSFORMS) == set(tl.OUTPUT_TRANSFORMS) == {"softcap_ce"}


@pytest.mark.parametrize("loss", ["softcap_ce", "tanh_cap_ls_z"])
def test_eval_is_plain_ce_of_model_logits(loss):
    model = init_model(dataclasses.replace(TINY, loss=loss), seed=0)
    idx = np.arange(2 * TINY.block_size, dtype=np.int32).reshape(2, -1)
    targets = (idx + 1) % 97
    logits = np.asarray(model(idx), np.float64)
    if loss == "softcap_ce":
        assert 0 < logits.min() and logits.max() < 30
    assert float(model.loss(idx, targets, train=False)) == pytest.approx(NP_LOSSES["ce"](logits, targets), rel=1e-5)
    assert float(model.loss(idx, targets)) == pytest.approx(NP_LOSSES[loss](logits, targets), rel=1e-5)


# --- effective init ---------------------------------------------------------------------------------------

CONSTANT_INIT = {
    "embedding.bigram_lambda": 0.1,
    "embedding.ve_lambda": 0.5,
    "embedding.ve_beta": 0.1,
    "embedding.lm_head": 0.0,  # ve_lcr_cyclic_untied's raw zero head (`untied` has embedding.lm_head.weight)
    "attn_gate": 1 / math.sqrt(2),
    "mlp_gate": 1 / math.sqrt(2),
}


def expected_init(name: str, shape: tuple, n_layer: int) -> tuple[str, float]:
    """The harness's effective init of a parameter: ("const", value), ("normal", std) or
    ("uniform", bound): FLA's ShortConvolution is a Conv1d and keeps PyTorch's U(-1/sqrt(W), 1/sqrt(W)), as does
    Mamba2's conv1d, bias included (W = 4); or ("fla_decay", 0): Gated DeltaNet's and Mamba2's A_log and dt_bias
    keep FLA's random init."""
    for suffix, value in CONSTANT_INIT.items():
        if name == suffix or name.endswith("." + suffix):
            return "const", value
    if name.endswith("conv1d.weight"):
        return "uniform", 1 / math.sqrt(shape[-1])
    if name.endswith("conv1d.bias"):
        return "uniform", 1 / math.sqrt(MAMBA2_CONV_KERNEL)
    if name.endswith(("A_log", "dt_bias")):
        return "fla_decay", 0.0
    if name.endswith("bias"):
        return "const", 0.0
    if len(shape) == 1:  # norm gains
        return "const", 1.0
    return "normal", 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02


STRUCTURAL = [v for v in variants.PRESETS.values() if v.loss == "ce"]  # losses add no parameters


@pytest.mark.parametrize("variant", STRUCTURAL, ids=lambda v: v.name)
def test_effective_init_on_both_sides(variant):
    cfg = dataclasses.replace(TINY, **variant.axes)
    from jaxgpt.convert import jax_to_torch

    sides = {
        "jax": jax_to_torch(nnx.to_pure_dict(nnx.state(init_model(cfg, seed=0), nnx.Param))),
        "torch": {n: p.detach().numpy() for n, p in build_model(cfg, seed=0).named_parameters()},
    }
    assert sides["jax"].keys() == sides["torch"].keys()
    for side, params in sides.items():
        for name, a in params.items():
            kind, value = expected_init(name, a.shape, cfg.n_layer)
            if kind == "const":
                np.testing.assert_allclose(a, value, rtol=1e-6, err_msg=f"{side} {name}")
            elif kind == "fla_decay":  # within the support (the distribution: parity_tests/test_gated_delta_rule.py)
                u = np.exp(a) / 16 if name.endswith("A_log") else np.log(np.logaddexp(0.0, a) / 1e-3) / np.log(100)
                assert u.min() >= 0 and u.max() <= 1 + 1e-6, (side, name)
            elif kind == "uniform":  # the sample std's relative error is about 0.45/sqrt(n) (1/sqrt(2n) normal)
                assert np.abs(a).max() <= value, (side, name)
                assert abs(a.std() * math.sqrt(3) / value - 1) < max(0.1, 2 / math.sqrt(a.size)), (side, name)
            else:
                assert abs(a.std() / value - 1) < max(0.1, 4 / math.sqrt(2 * a.size)), (side, name)
                assert abs(a.mean()) < 5 * value / math.sqrt(a.size), (side, name)


# --- bigram hash and value embeddings ---------------------------------------------------------------------


def np_bigram_hash(idx: np.ndarray, num_buckets: int) -> np.ndarray:
    """Reference: products wrapped to int32 by hand (two's complement), Python modulo, t=0 -> last bucket."""

    def wrap32(x: np.ndarray) -> np.ndarray:
        return (x + 2**31) % 2**32 - 2**31

    cur = idx.astype(np.int64)
    prev = np.concatenate([np.zeros_like(cur[:, :1]), cur[:, :-1]], axis=1)
    h = np.mod(wrap32(36313 * cur) ^ wrap32(27191 * prev), num_buckets - 1)
    h[:, 0] = num_buckets - 1
    return h


def test_bigram_hash_matches_numpy_with_int32_overflow():
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.integers(0, 50304, size=(2, 64)), rng.integers(0, 2**31 - 1, size=(2, 64))])
    assert (36313 * idx.astype(np.int64) > 2**31 - 1).any()  # the wraparound path is exercised
    buckets = 5 * 50304
    want = np_bigram_hash(idx, buckets)
    assert want.min() >= 0 and want.max() == buckets - 1
    np.testing.assert_array_equal(np.asarray(jemb.bigram_hash(jnp.asarray(idx, jnp.int32), buckets)), want)
    np.testing.assert_array_equal(temb.bigram_hash(torch.from_numpy(idx), buckets).numpy(), want)


def test_value_embed_layers():
    assert variants.value_embed_layers(12, cyclic=False) == {1: (0,), 2: (1,), 9: (2,), 10: (3,), 11: (4,)}
    assert variants.value_embed_layers(4, cyclic=False) == {1: (0, 2), 2: (1, 3), 3: (4,)}
    assert variants.value_embed_layers(8, cyclic=True) == {i: ((i - 1) % 5,) for i in range(1, 8)}


@pytest.mark.parametrize("name", ["bigram_hash", "ve_lcr"])
def test_value_embed_formula(name):
    """value_embed(layer) against the formula of docs/variants.md on a module with random scalars."""
    cfg = dataclasses.replace(TINY, n_layer=12, embedding=name)
    emb = jemb.EMBEDDINGS[name](cfg, nnx.Rngs(0))
    rng = np.random.default_rng(1)
    idx = rng.integers(0, cfg.vocab_size, size=(2, 8))
    V = cfg.vocab_size
    if name == "bigram_hash":
        emb.bigram_lambda[...] = jnp.asarray(rng.normal(size=12), jnp.float32)
        lam, table = np.asarray(emb.bigram_lambda[...]), np.asarray(emb.bigram.embedding[...])
        want = {l: lam[l] * table[np_bigram_hash(idx, 5 * V)] for l in range(12)}
    else:
        emb.ve_lambda[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
        emb.ve_beta[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
        lam, beta, table = (np.asarray(a) for a in (emb.ve_lambda[...], emb.ve_beta[...], emb.value_embeds.embedding[...]))
        want = {}
        for j, layer in enumerate([1, 2, 9, 10, 11]):
            ve = table[idx + j * V]
            shifted = np.concatenate([np.zeros_like(ve[:, :1]), ve[:, :-1]], axis=1)
            want[layer] = lam[j] * ve + beta[j] * shifted
    for layer in range(12):
        got = emb.value_embed(layer, jnp.asarray(idx, jnp.int32))
        if layer not in want:
            assert got is None
        else:
            np.testing.assert_allclose(np.asarray(got), want[layer], rtol=1e-6, atol=1e-7)


# --- registry ---------------------------------------------------------------------------------------------


# Where each axis choice is implemented: axis -> ((JAX table, where), (torch_ref table, where)).
IMPLEMENTATIONS = {
    "embedding": ((jemb.EMBEDDINGS, "jaxgpt/layers/embedding.py EMBEDDINGS"),
                  (temb.EMBEDDINGS, "torch_ref/embedding.py EMBEDDINGS")),
    "norm": ((jblock.BLOCKS, "jaxgpt/layers/block.py BLOCKS"), (tblock.BLOCKS, "torch_ref/block.py BLOCKS")),
    "loss": ((jl.LOSSES, "jaxgpt/losses.py LOSSES"), (tl.LOSSES, "torch_ref/losses.py LOSSES")),
    "mixer": ((jmix.MIXERS, "jaxgpt/layers/mixers.py MIXERS"), (tmix.MIXERS, "torch_ref/mixers.py MIXERS")),
}
LAYER_TABLES = ((jmix.LINEAR_LAYERS, "jaxgpt module in jaxgpt/layers/mixers.py LINEAR_LAYERS"),
                (tmix.LINEAR_LAYERS, "torch_ref module in torch_ref/mixers.py LINEAR_LAYERS"))


def registry_gaps(axes: dict[str, dict[str, str]], linear_mixers: frozenset[str]) -> list[str]:
    """What is missing for the registry's choices, one line each: an axis choice without a JAX or torch_ref
    module, an implementation no choice names, and a linear mixer's layer kind without a layer on either side."""
    gaps = []
    for axis, choices in axes.items():
        for side, (table, where) in zip(("jaxgpt", "torch_ref"), IMPLEMENTATIONS[axis]):
            gaps += [f"{axis} {name!r}: no {side} module in {where}" for name in choices if name not in table]
            gaps += [f"{axis} {name!r}: in {where} but not in jaxgpt/spec/variants.py AXES"
                     for name in table if name not in choices]
    for mixer in sorted(linear_mixers):
        for n_layer in (1, 2, 12):
            for layer in range(n_layer):
                kind, _ = variants.linear_mixer_layer(mixer, layer, n_layer)
                gaps += [f"mixer {mixer!r}: layer kind {kind!r} has no {what}" for table, what in LAYER_TABLES
                         if kind not in table]
    return sorted(set(gaps))


def test_every_axis_choice_has_jax_and_torch_implementations():
    assert IMPLEMENTATIONS.keys() == variants.AXES.keys()
    gaps = registry_gaps(variants.AXES, variants.LINEAR_MIXERS)
    assert not gaps, "registry entries without both twins (docs/adding-a-variant.md):\n" + "\n".join(gaps)


def test_registry_gaps_name_the_missing_piece(monkeypatch):
    axes = {axis: dict(choices) for axis, choices in variants.AXES.items()}
    axes["mixer"]["foo"] = "a mixer with no implementation yet"
    axes["loss"].pop("z_loss")
    monkeypatch.delitem(tmix.LINEAR_LAYERS, "gla")
    gaps = registry_gaps(axes, variants.LINEAR_MIXERS)
    assert gaps[:4] == [
        "loss 'z_loss': in jaxgpt/losses.py LOSSES but not in jaxgpt/spec/variants.py AXES",
        "loss 'z_loss': in torch_ref/losses.py LOSSES but not in jaxgpt/spec/variants.py AXES",
        "mixer 'foo': no jaxgpt module in jaxgpt/layers/mixers.py MIXERS",
        "mixer 'foo': no torch_ref module in torch_ref/mixers.py MIXERS",
    ]
    gla_kind = "layer kind 'gla' has no torch_ref module in torch_ref/mixers.py LINEAR_LAYERS"
    assert {"gla", "gla_conv", "gla_deltanet", "gla_depth"} <= {g.split("'")[1] for g in gaps[4:]}
    assert all(g.endswith(gla_kind) for g in gaps[4:]) and not any("'deltanet'" in g for g in gaps)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UserError, match="valid: baseline, untied"):
        variants.apply_variant(Config(), "nope")
    with pytest.raises(UserError, match="unknown embedding 'nope'.*bigram_hash"):
        variants.apply_variant(Config(), "baseline", embedding="nope")
    with pytest.raises(UserError, match="unknown norm 'nope'.*rmsnorm_parallel_gated"):
        variants.Variant("x", "x", norm="nope")
    with pytest.raises(UserError, match="CONFIG_OVERRIDES may only set"):
        variants.Variant("x", "x", overrides={"n_layer": 2})


def test_axes_compose_and_name_the_run():
    cfg = variants.apply_variant(Config(), "ve_lcr", norm="rmsnorm_parallel_gated", loss="poly_ls_z")
    assert cfg.variant == "ve_lcr+norm=rmsnorm_parallel_gated+loss=poly_ls_z"
    assert (cfg.model.embedding, cfg.model.norm, cfg.model.loss) == ("ve_lcr", "rmsnorm_parallel_gated", "poly_ls_z")


def test_variants_cli_prints_a_row_per_preset(capsys):
    variants_cli.main(["--model-size", "tiny"])
    lines = capsys.readouterr().out.splitlines()
    for name, v in variants.PRESETS.items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert row.split()[1:5] == [v.embedding, v.norm, v.loss, v.mixer]
        assert row.split()[5].endswith("M")


# --- linear mixers ----------------------------------------------------------------------------------------


def test_linear_mixer_layer_stacks():
    def layers(mixer: str, n_layer: int) -> list[tuple[str, dict]]:
        return [variants.linear_mixer_layer(mixer, layer, n_layer) for layer in range(n_layer)]

    assert [kind for kind, _ in layers("gla_deltanet", 4)] == ["deltanet", "gla", "deltanet", "gla"]
    assert [o["expand_k"] for _, o in layers("gla_depth", 12)] == [
        0.5, 0.5, 0.625, 0.625, 0.625, 0.75, 0.75, 0.875, 0.875, 0.875, 1.0, 1.0
    ]
    assert layers("gla_depth", 1) == [("gla", {"use_short_conv": True, "expand_k": 0.5})]
    assert layers("gla_depth", 2)[1][1]["expand_k"] == 1.0
    assert variants.LINEAR_MIXERS == set(variants.AXES["mixer"]) - {"softmax"}
    with pytest.raises(ValueError, match="not a linear mixer"):
        variants.linear_mixer_layer("softmax", 0, 1)
