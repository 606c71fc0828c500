"""AdamW as in the benchmark: decay on >=2-D parameters only, warmup + cosine schedule, global-norm clip."""

import jax
import jax.numpy as jnp
import optax

from jaxgpt.spec.config import Config


def learning_rate(cfg: Config, it: jax.Array | int) -> jax.Array:
    """jaxgpt.spec.schedule.learning_rate as a traced function of the step (what optax calls inside the jitted
    step): lr*(it+1)/(warmup+1) during warmup, cosine to min_lr at decay_iters, then min_lr."""
    it = jnp.asarray(it, jnp.float32)
    warmup = cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    ratio = jnp.clip((it - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters), 0.0, 1.0)
    cosine = cfg.min_lr + 0.5 * (1.0 + jnp.cos(jnp.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
    return jnp.where(it < cfg.warmup_iters, warmup, cosine)


def decay_mask(params: object) -> object:
    """A tree of bools over the parameter tree: weight decay on matrices and embeddings (ndim >= 2); none on
    biases, norm gains and scalars."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lambda count: learning_rate(cfg, count),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
