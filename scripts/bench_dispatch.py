"""Host time per call of a jitted step over a model's training state, passed as trees or as flat leaf lists.

    python scripts/bench_dispatch.py [--model gpt2-124m] [--calls 200]

jit flattens its arguments and unflattens its results at every call. nnx.State and optax's state trees do that
through Python callbacks; lists of arrays take jit's C++ path. This times a step that does no work (it returns
the state it is given, donated, as the real step does) so that only the per-call host cost is measured, for the
preset's params + AdamW state: the time the host needs before it can queue the next step.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxgpt.spec.config import MODEL_PRESETS, Config, apply_overrides  # noqa: E402
from jaxgpt.model import init_model  # noqa: E402
from jaxgpt.optim import make_optimizer  # noqa: E402


def per_call_ms(step, state: tuple, calls: int) -> float:
    """Median over 5 runs of the mean host ms per call of `calls` back-to-back calls."""
    runs = []
    for _ in range(6):  # the first run compiles and warms up
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(calls):
            state = step(*state)
        jax.block_until_ready(state)
        runs.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(runs[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2-124m", choices=list(MODEL_PRESETS))
    p.add_argument("--calls", type=int, default=200)
    args = p.parse_args()
    cfg = apply_overrides(Config(), {"model_size": args.model})
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: init_model(cfg.model, 0)), nnx.Param)
    tx = make_optimizer(cfg)

    def fresh_state() -> tuple:  # each timing donates its own buffers
        params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract)
        return params, tx.init(params), jnp.zeros(())

    step = jax.jit(lambda p, o, t: (p, o, t + 1), donate_argnums=(0, 1))
    trees = per_call_ms(step, fresh_state(), args.calls)
    params, opt_state, t = fresh_state()
    leaves = per_call_ms(step, (jax.tree.leaves(params), jax.tree.leaves(opt_state), t), args.calls)
    n = len(jax.tree.leaves((params, opt_state)))
    print(f"{args.model}: {n} state arrays on {jax.devices()[0].device_kind}; host ms per call: "
          f"trees {trees:.3f}, leaf lists {leaves:.3f} ({trees / leaves:.1f}x)")


if __name__ == "__main__":
    main()
