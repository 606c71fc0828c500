"""Build a jaxgpt model and its torch_ref twin with identical weights, and compare them."""

import contextlib
import dataclasses
from collections.abc import Iterator
from types import SimpleNamespace

import jax
import numpy as np
import torch
from flax import nnx

from jaxgpt.spec.config import Config, ModelConfig
from jaxgpt.convert import jax_to_torch
from jaxgpt.model import GPT, init_model
from jaxgpt.spec.variants import PRESETS, apply_variant
from torch_ref.model import build_model

SMALL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, dtype="float32")


@contextlib.contextmanager
def fla_gated_backward() -> Iterator[SimpleNamespace]:
    """Runs the block; if FLA 0.6.0 refuses its gated backward there (its RuntimeError naming FLA issue #640: Hopper
    under Triton 3.4 to 3.7.0, where that kernel's results are wrong), ends the block quietly with `.refused` True.
    Any other error propagates."""
    outcome = SimpleNamespace(refused=False)
    try:
        yield outcome
    except RuntimeError as e:
        if "#640" not in str(e):
            raise
        outcome.refused = True


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def variant_config(variant: str, base: ModelConfig = SMALL, **model_overrides) -> Config:
    cfg = Config(model=dataclasses.replace(base, **model_overrides))
    return apply_variant(cfg, variant)


def twin_models(model_cfg: ModelConfig, seed: int = 0, device: str = "cpu") -> tuple[GPT, torch.nn.Module]:
    """A JAX model and a torch_ref model holding the same (JAX-initialised) fp32 weights.

    All-zero matrices (e.g. the zero-init head of ve_lcr_cyclic_untied) are redrawn N(0, 0.02) first: with
    them the gradients upstream vanish, and Adam's first steps act like sign(g), so rounding-level
    differences would flip whole updates. The init itself is tested in tests/test_variants.py.
    """
    jmodel = init_model(model_cfg, seed)
    key = jax.random.key(seed)
    for path, p in nnx.iter_graph(jmodel):
        if isinstance(p, nnx.Param) and p.ndim >= 2 and not np.any(np.asarray(p[...])):
            p[...] = 0.02 * jax.random.normal(jax.random.fold_in(key, len(path)), p.shape)
    tmodel = build_model(model_cfg).to(device)
    state = {k: torch.from_numpy(np.array(v)) for k, v in jax_to_torch(params_of(jmodel)).items()}
    tmodel.load_state_dict(state, strict=True)
    return jmodel, tmodel


def params_of(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def jax_grads(model: GPT, idx: np.ndarray, targets: np.ndarray) -> tuple[float, dict]:
    """Training loss and its gradient w.r.t. every parameter, as a torch-named dict of numpy arrays."""
    loss, grads = jax_outputs(model, idx, targets, logits=False)
    return loss, grads


def jax_outputs(model: GPT, idx: np.ndarray, targets: np.ndarray, logits: bool = True) -> tuple:
    """(training loss, its gradient w.r.t. every parameter as torch-named numpy arrays) and, with `logits`, also
    the logits and the evaluation loss: (loss, grads, logits, eval loss). One jitted call: one compile instead of
    op-by-op dispatch (several times faster on CPU)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def outputs(params, rest):
        def loss_fn(p):
            return nnx.merge(graphdef, p, rest).loss(idx, targets)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        if not logits:
            return loss, grads
        m = nnx.merge(graphdef, params, rest)
        return loss, grads, m(idx), m.loss(idx, targets, train=False)

    loss, grads, *more = outputs(params, rest)
    return (float(loss), jax_to_torch(nnx.to_pure_dict(grads)), *(np.asarray(x) for x in more))


def random_batch(cfg: ModelConfig, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50257, size=(batch, cfg.block_size + 1), dtype=np.int64)
    return tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)


VARIANTS = list(PRESETS)


def inference_presets() -> list[str]:
    """One preset per distinct inference-time model: presets that differ only in a training-only loss (the loss
    axis outside OUTPUT_TRANSFORMS) run the same forward, decode and export as the first of them, so tests of
    those paths take each model once."""
    from jaxgpt.losses import OUTPUT_TRANSFORMS

    seen = {}
    for name, v in PRESETS.items():
        seen.setdefault((v.embedding, v.norm, v.mixer, v.loss if v.loss in OUTPUT_TRANSFORMS else None), name)
    return list(seen.values())
