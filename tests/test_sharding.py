"""Multi-device training: mesh specs, the FSDP layout rule, FSDP training == 1-device training, checkpoints
that move between meshes and device counts (N -> M), the batch prefetcher, remat and the scaling benchmark.

Multi-device runs use virtual CPU devices (`--xla_force_host_platform_device_count`, read when JAX starts),
so they run in subprocesses; the 1-device reference run (`reference`, conftest.py) and the subprocess helpers
(cli_runs.py) are shared with tests/test_train.py, compilation cache included.

Tolerances: the runs differ only in the order of floating-point reductions (per-device partial sums, the
gradient all-reduce), which moves fp32 results by a few ulps. Measured over these 4 steps: per-step losses
agree to ~1e-7 relative (1 ulp of ~10.8 is 1e-6 / 10.8 ~ 1e-7), parameters and Adam moments to ~1.5e-6 relative
(norm of the difference over the norm). The bounds below are about 10x those: a wrong layout, a missing or
doubled gradient reduction or a restore onto the wrong shard changes them by orders of magnitude more.
"""

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from cli_runs import SCHEDULE, TINY, assert_trees_equal, leaves, locked, restore, shared_dir

from jaxgpt.checkpoint import load_run
from jaxgpt.spec.config import Config, ModelConfig, apply_overrides
from jaxgpt.errors import UserError
from jaxgpt.metrics import flops_per_token
from jaxgpt.model import init_model
from jaxgpt.optim import make_optimizer
from jaxgpt.sharding import MIN_FSDP_SIZE, fsdp_spec, make_mesh, mesh_shape, state_shardings
from jaxgpt.steps import make_train_step, replicate, shard_batch
from jaxgpt.train import Prefetcher

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-6
STATE_RTOL = 1e-5
WTE = "['embedding']['wte']['embedding']"  # the one array of the test model above MIN_FSDP_SIZE (50304 x 32)


# ---------------------------------------------------------------------------------------------------
# mesh specs and the FSDP layout rule
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, n, want", [
    ("", 4, (4, 1)),
    ("fsdp=4", 4, (1, 4)),
    ("data=2,fsdp=2", 4, (2, 2)),
    (" fsdp = 2 , data = -1 ", 8, (4, 2)),
    ("data=-1", 2, (2, 1)),
    ("fsdp=-1", 1, (1, 1)),
])
def test_mesh_shape(spec, n, want):
    assert mesh_shape(spec, n, batch_size=8) == {"data": want[0], "fsdp": want[1]}


@pytest.mark.parametrize("spec, n, batch, needles", [
    ("model=2", 2, 8, ["'model'", "data, fsdp"]),
    ("data=2", 4, 8, ["data=2", "2 devices", "4 are visible"]),
    ("data=2,fsdp=4", 4, 8, ["8 devices", "4 are visible"]),
    ("data=-1,fsdp=-1", 4, 8, ["at most one"]),
    ("data=-1,fsdp=3", 4, 12, ["do not divide"]),
    ("fsdp=two", 2, 8, ["'two'"]),
    ("fsdp", 2, 8, ["axis=size"]),
    ("fsdp=0", 2, 8, [">= 1"]),
    ("data=1,data=2", 2, 8, ["twice"]),
    ("data=2,fsdp=2", 4, 6, ["batch_size 6", "data x fsdp = 4"]),
])
def test_bad_mesh_specs(spec, n, batch, needles):
    with pytest.raises(UserError) as e:
        mesh_shape(spec, n, batch_size=batch)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_make_mesh_on_this_process():
    mesh = make_mesh(4)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1}


def test_fsdp_spec_rule():
    assert fsdp_spec((50304, 768), 2) == P("fsdp", None)  # the largest divisible dimension
    assert fsdp_spec((768, 3072), 4) == P(None, "fsdp")
    assert fsdp_spec((1600, 4800), 3) == P(None, "fsdp")  # 1600 is not divisible by 3
    assert fsdp_spec((1025, 1023), 2) == P()  # nothing divisible: replicated
    assert fsdp_spec((768,), 2) == P() and fsdp_spec((), 2) == P()  # small: replicated
    assert fsdp_spec((MIN_FSDP_SIZE,), 2) == P("fsdp")
    assert fsdp_spec((50304, 768), 1) == P()


def test_fsdp_layout_of_gpt2_124m():
    """On fsdp=4 every matrix of gpt2-124m (and its Adam moments) is sharded, every vector replicated."""
    cfg = apply_overrides(Config(), {"model_size": "gpt2-124m"})
    params = nnx.state(nnx.eval_shape(lambda: init_model(cfg.model, cfg.seed)), nnx.Param)
    opt_state = jax.eval_shape(make_optimizer(cfg).init, params)
    for tree in (params, opt_state):
        specs = [(x.shape, fsdp_spec(x.shape, 4)) for x in jax.tree.leaves(tree)]
        assert all((spec != P()) == (len(shape) == 2) for shape, spec in specs), specs
        sharded = sum(np.prod(shape) for shape, spec in specs if spec != P())
        assert sharded / sum(np.prod(shape) for shape, _ in specs) > 0.999
    # state_shardings applies the same rule to a mesh (here fsdp=1: replicated)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(state_shardings(params, make_mesh(1))))


# ---------------------------------------------------------------------------------------------------
# FSDP over 4 virtual devices == 1 device; its checkpoints resume on 2 and on 1 device
# ---------------------------------------------------------------------------------------------------


def state_mib(stdout: str, devices: str) -> float:
    """The per-device state size in a run's header line, which must describe `devices`."""
    header = next(ln for ln in stdout.splitlines() if " params | " in ln)
    assert f"| {devices}" in header, header
    return float(re.search(r"params \+ optimizer state ([\d,.]+) MiB/device", header)[1].replace(",", ""))


def assert_losses_close(got, ref, steps):
    assert sorted(got) == sorted(steps), (sorted(got), steps)
    for step in steps:
        assert abs(got[step] - ref[step]) / abs(ref[step]) < LOSS_RTOL, (step, got[step], ref[step])


@pytest.fixture(scope="module")
def fsdp_run(cli, default_corpus, tmp_path_factory, request):
    """The reference's 4 steps on 4 devices, mesh data=2 x fsdp=2 (checkpoints at 2 and 4); the 1-device
    reference runs meanwhile (if this session has not run it yet)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    with ThreadPoolExecutor(max_workers=1) as pool:
        run = pool.submit(cli, out, "--data", str(default_corpus), "--max-iters", "4", *TINY, *SCHEDULE,
                          "--mesh", "data=2,fsdp=2", devices=4)
        request.getfixturevalue("reference")
        return run.result().check()


def test_fsdp_matches_single_device(fsdp_run, reference):
    # the state really is sharded: each device holds half of the embedding and its Adam moments
    fsdp_mib, ref_mib = state_mib(fsdp_run.stdout, "4x cpu (mesh data=2,fsdp=2)"), state_mib(reference.stdout, "1x cpu")
    wte_mib = 3 * 50304 * 32 * 4 / 2**20
    assert fsdp_mib == pytest.approx(ref_mib - wte_mib / 2, abs=0.1), (fsdp_mib, ref_mib)
    assert_losses_close(fsdp_run.losses(), reference.losses(), [1, 2, 3, 4])
    ref_grad = {r["step"]: r["grad_norm"] for r in reference.records("train")}
    for r in fsdp_run.records("train"):
        assert r["grad_norm"] == pytest.approx(ref_grad[r["step"]], rel=STATE_RTOL)
    for a, b in zip(fsdp_run.records("eval"), reference.records("eval"), strict=True):
        assert a["step"] == b["step"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=LOSS_RTOL)
    _, params, opt_state = restore(fsdp_run.out, 4)
    _, ref_params, ref_opt = restore(reference.out, 4)
    assert_trees_equal(params, ref_params, rtol=STATE_RTOL)
    assert_trees_equal(opt_state, ref_opt, rtol=STATE_RTOL)


def test_fsdp_checkpoint_resumes_on_fewer_devices(cli, fsdp_run, default_corpus, tmp_path):
    """Step 2 of the 4-device FSDP run, resumed on 2 devices (fsdp=2) and on 1, continues its trajectory."""

    def resume(name: str, devices: int, *mesh: str):
        out = tmp_path / name
        shutil.copytree(fsdp_run.out, out)
        shutil.rmtree(out / "checkpoints" / "4")  # the latest checkpoint is now step 2
        return cli(out, "--data", str(default_corpus), "--max-iters", "4", *TINY, *SCHEDULE, "--resume", *mesh,
                   devices=devices).check()

    with ThreadPoolExecutor(max_workers=2) as pool:
        two = pool.submit(resume, "two", 2, "--mesh", "fsdp=2")
        one = pool.submit(resume, "one", 1)
        runs = {"fsdp=2": two.result(), "1 device": one.result()}
    _, params_4, opt_4 = restore(fsdp_run.out, 4)
    for name, run in runs.items():
        assert "at step 2" in run.stdout, name
        assert_losses_close(run.losses(), fsdp_run.losses(), [1, 2, 3, 4])
        _, params, opt_state = restore(run.out, 4)
        assert_trees_equal(params, params_4, rtol=STATE_RTOL)
        assert_trees_equal(opt_state, opt_4, rtol=STATE_RTOL)
    assert state_mib(runs["fsdp=2"].stdout, "2x cpu (mesh data=1,fsdp=2)") < state_mib(runs["1 device"].stdout, "1x cpu")


RESTORE_ON_MESH = """
import pickle, sys
import jax
from jaxgpt.checkpoint import load_run
from jaxgpt.sharding import make_mesh
_, state = load_run(sys.argv[1], 2, mesh=make_mesh(4, sys.argv[2]))
tree = {"params": state.params, "opt_state": state.opt_state}
out = {jax.tree_util.keystr(k): (jax.device_get(v), str(v.sharding.spec), len(v.sharding.device_set),
                                 [s.data.shape for s in v.addressable_shards])
       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
pickle.dump(out, open(sys.argv[3], "wb"))
"""


def test_restore_onto_another_mesh_is_exact(fsdp_run, tmp_path):
    """The 4-device checkpoint restored onto fsdp=2 (2 devices) holds exactly the saved values, sharded as the
    training layout says."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    p = subprocess.run([sys.executable, "-c", RESTORE_ON_MESH, str(fsdp_run.out), "fsdp=2", str(tmp_path / "o.pkl")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = pickle.loads((tmp_path / "o.pkl").read_bytes())
    _, saved = load_run(fsdp_run.out, 2)
    want = leaves({"params": saved.params, "opt_state": saved.opt_state})
    assert got.keys() == want.keys()
    sharded = {k for k in got if WTE in k}
    assert len(sharded) == 3  # the parameter and its two Adam moments
    for k, (value, spec, n_devices, shard_shapes) in got.items():
        np.testing.assert_array_equal(value, want[k], err_msg=k)
        assert n_devices == 2, k
        if k in sharded:
            assert spec == str(P("fsdp", None)) and shard_shapes == [(50304 // 2, 32)] * 2, (k, spec, shard_shapes)
        else:
            assert spec == str(P()) and shard_shapes == [value.shape] * 2, (k, spec, shard_shapes)


# ---------------------------------------------------------------------------------------------------
# the batch prefetcher
# ---------------------------------------------------------------------------------------------------


def test_prefetcher_keeps_order_and_runs_ahead():
    fetched = []
    ahead = threading.Event()

    def fetch(i):
        fetched.append(i)
        if i == 12:
            ahead.set()
        return i * i

    batches = Prefetcher(fetch, range(10, 20), depth=2)
    try:
        it = iter(batches)
        assert next(it) == (10, 100)
        # while the consumer holds item 10, the thread prepares the next ones without being asked
        assert ahead.wait(5)
        assert list(it) == [(i, i * i) for i in range(11, 20)]
        assert fetched == list(range(10, 20))
    finally:
        batches.close()


def test_prefetcher_raises_the_fetch_error_in_order_and_closes_while_full():
    def fetch(i):
        if i == 3:
            raise ValueError("bad batch 3")
        return i

    batches = Prefetcher(fetch, range(10))
    got = []
    with pytest.raises(ValueError, match="bad batch 3"):
        for item in batches:
            got.append(item)
    assert got == [(0, 0), (1, 1), (2, 2)]
    batches.close()
    # a consumer that stops early: close() returns although the thread is blocked on a full queue
    batches = Prefetcher(lambda i: i, range(1000), depth=2)
    next(iter(batches))
    time.sleep(0.05)
    t0 = time.time()
    batches.close()
    assert time.time() - t0 < 2 and not batches._thread.is_alive()


# ---------------------------------------------------------------------------------------------------
# remat; the step API without shardings (as scripts/bench_train.py uses it)
# ---------------------------------------------------------------------------------------------------


def test_remat_step_equals_plain_step():
    """make_train_step(graphdef, tx) on replicated params and a batch sharded over B, and the remat step with
    explicit shardings, take the same step; the remat one really recomputes (remat in its jaxpr)."""
    cfg = apply_overrides(Config(), {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2,
                                     "model.block_size": 32, "warmup_iters": 0})
    graphdef, params = nnx.split(init_model(cfg.model, cfg.seed), nnx.Param)
    params = jax.device_get(params)  # host copies: the steps donate the device arrays made from them
    tx = make_optimizer(cfg)
    mesh = make_mesh(2)
    tokens = np.random.default_rng(0).integers(0, 50257, (2, 2, 33), dtype=np.int32)
    x, y = shard_batch(tokens[..., :-1], mesh), shard_batch(tokens[..., 1:], mesh)

    plain = make_train_step(graphdef, tx, params, jax.eval_shape(tx.init, params))
    p1, _, m1 = plain(replicate(params, mesh), replicate(tx.init(params), mesh), x, y)

    param_sh = state_shardings(params, mesh)
    opt_sh = state_shardings(jax.eval_shape(tx.init, params), mesh)
    rematted = make_train_step(graphdef, tx, params, tx.init(params), param_shardings=param_sh, opt_shardings=opt_sh,
                               remat=True)
    args = (jax.device_put(params, param_sh), jax.device_put(tx.init(params), opt_sh), x, y)
    assert "remat" in str(jax.make_jaxpr(rematted.jitted)(*rematted.leaves(*args[:2]), x, y))
    p2, _, m2 = rematted(*args)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=LOSS_RTOL)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=STATE_RTOL)
    assert_trees_equal(p2, p1, rtol=STATE_RTOL)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(p1).values(), leaves(params).values()))


# ---------------------------------------------------------------------------------------------------
# scripts/bench_scaling.py on 2 virtual devices
# ---------------------------------------------------------------------------------------------------


def test_bench_scaling_smoke(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path / "bench.json"
    small = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
             "--set", "model.block_size=32"]
    p = subprocess.run([sys.executable, "scripts/bench_scaling.py", "--model", "tiny", *small, "--per-device-batch", "2",
                        "--steps", "3", "--warmup", "1", "--mesh-kind", "fsdp", "--devices", "1,2", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["devices"] for r in results] == [1, 2]
    assert [r["mesh"] for r in results] == ["data=1,fsdp=1", "data=1,fsdp=2"]
    assert [r["global_batch"] for r in results] == [2, 4]
    for r in results:
        assert r["ms_per_step"] > 0 and np.isfinite(r["loss"])
        assert r["tokens_per_s"] == pytest.approx(r["global_batch"] * 32 / (r["ms_per_step"] / 1e3))
        model = ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=32)
        assert r["model_tflops_per_device"] == pytest.approx(
            r["tokens_per_s"] * flops_per_token(model, r["params"]) / r["devices"] / 1e12)
    assert results[0]["scaling_efficiency"] == 1.0
    assert results[1]["scaling_efficiency"] == pytest.approx(results[1]["tokens_per_s"] / (2 * results[0]["tokens_per_s"]))
    assert results[0]["collectives"] == {"all-gather": 0, "reduce-scatter": 0, "all-reduce": 0}
    assert results[1]["collectives"]["all-gather"] >= 1  # the sharded embedding is gathered
    table = p.stdout[p.stdout.index("devices  mesh"):p.stdout.index("wrote ")]
    assert len(table.strip().splitlines()) == 3 and "data=1,fsdp=2" in table
    for n in (1, 2):  # each worker's progress reaches the terminal while it runs
        assert f"[{n} devices] compiled in" in p.stderr


# ---------------------------------------------------------------------------------------------------
# gradient accumulation on a mesh: one reduction per step after the micro-batch loop, same step as on one device
# ---------------------------------------------------------------------------------------------------

# argv: "devices:mesh spec" pairs. Prints {"devices:mesh spec": {loss, grad_norm, params, collectives}} for 1 device
# ("1:") and each pair, on the first `devices` of the process's virtual devices. The step that runs is the compiled
# executable whose HLO is counted.
ACCUM_SCRIPT = """
import json, re, sys
import jax, numpy as np
from flax import nnx
from jaxgpt.spec.config import Config, apply_overrides
from jaxgpt.model import init_model
from jaxgpt.optim import make_optimizer
from jaxgpt.sharding import batch_sharding, make_mesh, state_shardings
from jaxgpt.steps import make_train_step


def count(op, texts):
    return sum(len(re.findall(op + r"(?:-start)?\\(", t)) for t in texts)


cfg = apply_overrides(Config(), {"model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.block_size": 16,
                                 "batch_size": 4, "grad_accum": 3})
rng = np.random.default_rng(0)
x, y = (rng.integers(0, 50257, (3, 4, 16), dtype=np.int32) for _ in range(2))
out = {}
for key in ("1:", *sys.argv[1:]):
    n, spec = key.split(":")
    mesh = make_mesh(4, spec, devices=jax.devices()[:int(n)])
    graphdef, params = nnx.split(init_model(cfg.model), nnx.Param)
    tx = make_optimizer(cfg)
    opt_state = tx.init(params)
    ps, os_ = state_shardings(params, mesh), state_shardings(opt_state, mesh)
    step = make_train_step(graphdef, tx, params, opt_state, param_shardings=ps, opt_shardings=os_)
    args = (*step.leaves(jax.device_put(params, ps), jax.device_put(opt_state, os_)),
            *(jax.device_put(a, batch_sharding(mesh, 3)) for a in (x, y)))
    compiled = step.jitted.lower(*args).compile()
    hlo = compiled.as_text()
    computations = hlo.split("\\n\\n")
    nested = [c for c in computations if not c.lstrip().startswith(("ENTRY", "HloModule"))]  # loop bodies etc.
    p, o, metrics = compiled(*args)
    new_params, _ = step.trees(p, o)
    out[key] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                "params": [np.asarray(p).ravel().tolist()[:64] for p in jax.tree.leaves(new_params)],
                "collectives": {op: {"total": count(op, [hlo]), "nested": count(op, nested)}
                                for op in ("all-reduce", "reduce-scatter", "all-gather")}}
print(json.dumps(out))
"""
ACCUM_MESHES = {"data parallel": "2:", "fsdp": "4:data=2,fsdp=2"}


@pytest.fixture(scope="module")
def accumulation_steps(tmp_path_factory) -> dict[str, dict]:
    """The grad_accum=3 step on 1 device and on each of ACCUM_MESHES, in one process of 4 virtual devices, run once
    per pytest invocation (the first xdist worker to get here runs it, the others read its result)."""
    root = shared_dir(tmp_path_factory, "accumulation")
    with locked(root / "lock"):
        record = root / "steps.json"
        if not record.exists():
            env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
                       PYTHONPATH=str(ROOT))
            p = subprocess.run([sys.executable, "-c", ACCUM_SCRIPT, *ACCUM_MESHES.values()], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr[-3000:]
            record.write_text(p.stdout.strip().splitlines()[-1])
        return json.loads(record.read_text())


def accumulation_step_collectives(steps: dict[str, dict], mesh: str) -> dict[str, dict[str, int]]:
    """The grad_accum=3 step on ACCUM_MESHES[mesh] equals the 1-device step; -> the counts of its collectives,
    {op: {"total": in the whole HLO, "nested": outside the entry computation (in the micro-batch loop's body)}}."""
    one, many = steps["1:"], steps[ACCUM_MESHES[mesh]]
    assert all(c["total"] == 0 for c in one["collectives"].values()), one["collectives"]
    assert abs(many["loss"] - one["loss"]) / one["loss"] < LOSS_RTOL
    assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=STATE_RTOL)
    for a, b in zip(many["params"], one["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=STATE_RTOL, atol=1e-7)
    return many["collectives"]


def test_data_parallel_accumulation_reduces_once_and_matches_one_device(accumulation_steps):
    """grad_accum=3 on 2 devices: the gradients are all-reduced once, after the micro-batch loop (not once per
    micro-batch inside it), and the step equals the 1-device step."""
    all_reduce = accumulation_step_collectives(accumulation_steps, "data parallel")["all-reduce"]
    assert all_reduce["total"] >= 1 and all_reduce["nested"] == 0


def test_fsdp_accumulation_reduces_over_data_once_and_matches_one_device(accumulation_steps):
    """grad_accum=3 on 4 devices, mesh data=2,fsdp=2: each micro-batch's gradient shard is reduce-scattered over
    fsdp inside the loop, but the sums over data (and over both axes for the replicated params and the loss)
    are all-reduced once, after the loop; the step equals the 1-device step."""
    collectives = accumulation_step_collectives(accumulation_steps, "fsdp")
    assert collectives["all-gather"]["total"] >= 1  # the sharded embedding (XLA may hoist it out of the loop)
    assert collectives["reduce-scatter"]["nested"] >= 1
    assert collectives["all-reduce"]["total"] >= 1 and collectives["all-reduce"]["nested"] == 0
