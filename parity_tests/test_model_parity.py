"""fp32 CPU parity between jaxgpt and torch_ref: logits, loss, every gradient, and an AdamW trajectory."""

import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from jaxgpt.convert import jax_to_torch, torch_to_jax
from jaxgpt.optim import make_optimizer
from parity_tests.helpers import (
    VARIANTS,
    jax_grads,
    jax_outputs,
    params_of,
    random_batch,
    rel_err,
    twin_models,
    variant_config,
)

TOL = 1e-5
# bias=True only changes the Linear layers, which every variant shares: check it on the baseline.
GRADIENT_CASES = [(v, False) for v in VARIANTS] + [("baseline", True)]
# The optimizer path is variant-independent once gradients agree; its trajectory is checked on presets that
# cover each kind of parameter (matrices, tables, raw scalars, zero-init head, every loss family).
TRAJECTORY_VARIANTS = [
    v for v in ("baseline", "bigram_hash", "ve_lcr_cyclic_untied", "rmsnorm_parallel_gated", "poly_ls_z",
                "tanh_cap_ls_z", "gla_conv", "gla_deltanet", "gated_deltanet", "gla_gated_deltanet",
                "hgrn2", "retnet", "linear_attn", "mamba2")
    if v in VARIANTS
]


def torch_grads(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    model.zero_grad(set_to_none=True)
    model.loss(idx, targets).backward()
    return {n: p.grad.double().numpy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant,bias", GRADIENT_CASES)
def test_forward_loss_and_gradients(variant, bias):
    cfg = variant_config(variant, bias=bias).model
    jmodel, tmodel = twin_models(cfg, seed=1)
    idx, targets = random_batch(cfg, batch=3, seed=2)

    j_loss, j_grads, j_logits, j_eval_loss = jax_outputs(jmodel, idx, targets)
    t_idx, t_tgt = torch.from_numpy(idx).long(), torch.from_numpy(targets).long()
    t_logits = tmodel(t_idx)
    assert rel_err(j_logits, t_logits.detach().numpy()) < TOL

    for train, j in ((True, j_loss), (False, float(j_eval_loss))):
        t = tmodel.loss(t_idx, t_tgt, train=train).item()
        assert abs(j - t) / abs(t) < TOL, (train, j, t)

    t_grads = torch_grads(tmodel, t_idx, t_tgt)
    assert set(j_grads) == set(t_grads)
    errors = {n: rel_err(j_grads[n], t_grads[n]) for n in t_grads}
    suspects = [n for n, e in errors.items() if e >= TOL]
    bounds = dict.fromkeys(errors, TOL)
    if suspects:
        # Ill-conditioned sums (a scalar gate's gradient of cancelling terms): judge both sides against torch in
        # float64. jaxgpt must be within TOL of it, or at least as close as torch_ref's own fp32 gradient is
        # (rmsnorm_parallel_gated's h.1.mlp_gate: torch fp32 is 2.7e-5 from float64).
        t64 = torch_grads(copy.deepcopy(tmodel).double(), t_idx, t_tgt)
        errors |= {n: rel_err(j_grads[n], t64[n]) for n in suspects}
        bounds |= {n: max(TOL, rel_err(t_grads[n], t64[n])) for n in suspects}
    worst = max(errors, key=lambda n: errors[n] / bounds[n])
    assert errors[worst] < bounds[worst], f"{worst}: rel err {errors[worst]:.2e} (bound {bounds[worst]:.2e})"


@pytest.mark.parametrize("variant", TRAJECTORY_VARIANTS)
def test_adamw_trajectory(variant):
    """5 optimizer steps on the same batches give the same losses and parameters."""
    from torch_ref.optim import configure_optimizer, optimizer_step

    cfg = variant_config(variant)
    cfg = dataclasses.replace(cfg, warmup_iters=2, max_iters=5, learning_rate=1e-3, min_lr=1e-4)
    jmodel, tmodel = twin_models(cfg.model, seed=3)
    graphdef, params = nnx.split(jmodel, nnx.Param)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    topt = configure_optimizer(tmodel, cfg)

    @jax.jit
    def step(params, opt_state, idx, targets):
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p).loss(idx, targets))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t_init = copy.deepcopy(tmodel)
    for it in range(5):
        idx, targets = random_batch(cfg.model, batch=2, seed=100 + it)
        params, opt_state, j_loss = step(params, opt_state, idx, targets)
        t_loss = tmodel.loss(torch.from_numpy(idx).long(), torch.from_numpy(targets).long())
        t_loss.backward()
        optimizer_step(tmodel, topt, cfg, it)
        assert abs(float(j_loss) - t_loss.item()) / t_loss.item() < TOL, (it, float(j_loss), t_loss.item())

    t_params = {n: p.detach().numpy() for n, p in tmodel.named_parameters()}
    j_params = jax_to_torch(nnx.to_pure_dict(params))
    errors = {n: rel_err(j_params[n], t_params[n]) for n in t_params}
    suspects = [n for n, e in errors.items() if e >= TOL]
    bounds = dict.fromkeys(errors, TOL)
    if suspects:
        # Parameters that start at zero are their 5 updates alone, and carry the relative error of ill-conditioned
        # gradients (linear_attn's feature-map biases: torch_ref's fp32 recurrence ends 1.2e-5 from float64): as
        # in test_forward_loss_and_gradients, both sides are judged against torch_ref's trajectory in float64.
        t64 = t_init.double()
        topt64 = configure_optimizer(t64, cfg)
        for it in range(5):
            idx, targets = random_batch(cfg.model, batch=2, seed=100 + it)
            t64.loss(torch.from_numpy(idx).long(), torch.from_numpy(targets).long()).backward()
            optimizer_step(t64, topt64, cfg, it)
        p64 = {n: p.detach().numpy() for n, p in t64.named_parameters()}
        errors |= {n: rel_err(j_params[n], p64[n]) for n in suspects}
        bounds |= {n: max(TOL, rel_err(t_params[n], p64[n])) for n in suspects}
    worst = max(errors, key=lambda n: errors[n] / bounds[n])
    assert errors[worst] < bounds[worst], f"{worst}: rel err {errors[worst]:.2e} (bound {bounds[worst]:.2e})"


@pytest.mark.parametrize("variant", VARIANTS)
def test_conversion_round_trip(variant):
    cfg = variant_config(variant).model
    jmodel, tmodel = twin_models(cfg, seed=4)
    template = params_of(jmodel)
    back = torch_to_jax(tmodel.state_dict(), template)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), template, back)
    assert all(jax.tree.leaves(same))


def test_conversion_rejects_mismatch():
    cfg = variant_config("baseline").model
    jmodel, tmodel = twin_models(cfg)
    state = dict(tmodel.state_dict())
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(KeyError, match="extra.weight"):
        torch_to_jax(state, params_of(jmodel))
    state.pop("extra.weight")
    state["ln_f.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match="ln_f.weight"):
        torch_to_jax(state, params_of(jmodel))


CONFIDENCE_PENALTY = 0.1


def confidence_penalty_jax(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """CE - 0.1 * mean predictive entropy (Pereyra et al. 2017) of logits [B, T, V]: the entropy needs the whole
    distribution, more than LogitStats holds."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    ce = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1).mean()
    return ce + CONFIDENCE_PENALTY * (jnp.exp(logp) * logp).sum(-1).mean()


def confidence_penalty_torch(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(-1)
    ce = torch.nn.functional.nll_loss(logp.flatten(0, 1), targets.flatten())
    return ce + CONFIDENCE_PENALTY * (logp.exp() * logp).sum(-1).mean()


def test_loss_of_the_full_logits(monkeypatch):
    """A loss registered as a function of the full logits: the model computes it from the materialised logits (the
    fused head is never called) and matches torch_ref, loss and every gradient."""
    import jaxgpt.losses
    import jaxgpt.model
    import torch_ref.losses

    full_logits_loss = jaxgpt.losses.Loss(of_logits=confidence_penalty_jax)
    assert full_logits_loss.needs_logits
    monkeypatch.setitem(jaxgpt.losses.LOSSES, "confidence_penalty", full_logits_loss)
    monkeypatch.setitem(torch_ref.losses.LOSSES, "confidence_penalty", confidence_penalty_torch)

    def fused_head(*args):
        raise AssertionError("a loss of the full logits took the fused head's statistics")

    monkeypatch.setattr(jaxgpt.model, "head_stats", fused_head)
    cfg = dataclasses.replace(variant_config("baseline").model, loss="confidence_penalty")
    jmodel, tmodel = twin_models(cfg, seed=5)
    idx, targets = random_batch(cfg, batch=3, seed=6)
    t_idx, t_tgt = torch.from_numpy(idx).long(), torch.from_numpy(targets).long()
    j_loss, j_grads = jax_grads(jmodel, idx, targets)
    t_loss = tmodel.loss(t_idx, t_tgt).item()
    assert abs(j_loss - t_loss) / abs(t_loss) < TOL, (j_loss, t_loss)
    assert abs(t_loss - torch.nn.functional.cross_entropy(tmodel(t_idx).flatten(0, 1), t_tgt.flatten()).item()) > 1e-3
    t_grads = torch_grads(tmodel, t_idx, t_tgt)
    errors = {n: rel_err(j_grads[n], t_grads[n]) for n in t_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOL, f"{worst}: rel err {errors[worst]:.2e}"
