"""The training CLI end to end on a 1-layer, 32-wide model: outputs, resume exactness, data parallelism over
2 virtual CPU devices, gradient accumulation, bad input and divergence.

Most runs go through `python -m jaxgpt.train` in a subprocess (a fresh process per run, as a user runs it).
One 4-step reference run is shared by several tests and, under pytest-xdist, by all workers (`reference`).
The subprocesses share a JAX persistent compilation cache (runs with the same model, batch and schedule compile
the same programs), which only saves compile time: the cache is keyed on the compiled program.
"""

import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from jaxgpt.checkpoint import Checkpointer
from jaxgpt.spec.config import available_configs
from jaxgpt.errors import UserError
from jaxgpt.optim import learning_rate
from jaxgpt.train import build_config, parser, train
from cli_runs import SCHEDULE, TINY, Run, assert_trees_equal, leaves, restore
from jaxgpt.spec.variants import AXES, PRESETS


def one_error_line(run: Run) -> str:
    """A user error: exit code 2 and exactly one line `error: ...` on stderr, no traceback."""
    assert "Traceback" not in run.stderr + run.stdout, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert run.returncode == 2, (run.returncode, run.stderr)
    return lines[0]



# ---------------------------------------------------------------------------------------------------
# what a run writes and prints
# ---------------------------------------------------------------------------------------------------


def test_run_folder_and_progress_output(reference, default_corpus):
    out = reference.out
    # config.json is the config the command line describes
    args = ["--data", str(default_corpus), "--max-iters", "4", *TINY, *SCHEDULE, "--out", str(out)]
    cfg = build_config(parser().parse_args(args))
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    # metrics.jsonl: a train record per step (log_interval=1) and eval records at 0, eval_interval and the end
    train_recs, evals = reference.records("train"), reference.records("eval")
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in train_recs:
        assert math.isfinite(r["loss"]) and 9.0 < r["loss"] < 12.0  # ~ln(50304) = 10.83 at init
        assert r["grad_norm"] > 0 and r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0
        assert r["lr"] == pytest.approx(float(learning_rate(cfg, r["step"] - 1)), rel=1e-6)
    for r in evals:
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # 4 steps at lr 3e-3 already help
    # loss.png is a real PNG image
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    import matplotlib.image

    img = matplotlib.image.imread(out / "loss.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0
    # checkpoints at ckpt_interval and the end
    ckpt = Checkpointer(out / "checkpoints")
    try:
        assert ckpt.steps() == [2, 4]
    finally:
        ckpt.close()
    # stdout: the header, per-step progress, the benchmark's TRAIN_METRICS lines and the Final metrics line
    lines = reference.stdout.splitlines()
    assert "1x cpu" in lines[0] and f"{cfg.tokens_per_iter:,} tokens/iter" in lines[0]
    metrics = [ln for ln in lines if ln.startswith("TRAIN_METRICS:")]
    pattern = re.compile(r"TRAIN_METRICS: step=(\d+), train_loss=(\d+\.\d{4}), val_loss=(\d+\.\d{4})$")
    assert len(metrics) == 3
    for line, r in zip(metrics, evals):
        m = pattern.match(line)
        assert m, line
        assert int(m[1]) == r["step"]
        assert float(m[2]) == round(r["train_loss"], 4) and float(m[3]) == round(r["val_loss"], 4)
    assert sum(bool(re.match(r"step +\d+/4 \| loss \d+\.\d+ \| lr ", ln)) for ln in lines) == 4
    final = [ln for ln in lines if ln.startswith("Final metrics (")]
    assert final == [f"Final metrics (tiny): val_loss_tiny={evals[-1]['val_loss']:.4f}"]
    assert lines.index(final[0]) > lines.index(metrics[-1])


# ---------------------------------------------------------------------------------------------------
# resume: 2 steps + resume + 2 steps == 4 straight steps
# ---------------------------------------------------------------------------------------------------


def test_resume_continues_the_exact_trajectory(cli, reference, default_corpus, tmp_path):
    out = tmp_path / "split"
    common = ["--data", str(default_corpus), *TINY, *SCHEDULE]
    first = cli(out, *common, "--max-iters", "2").check()
    assert [r["step"] for r in first.records("train")] == [1, 2]
    meta, _, _ = restore(out)
    assert meta["step"] == 2 and meta["data"]["next_batch_index"] == 2
    # a second process continues from the step-2 checkpoint to step 4
    second = cli(out, *common, "--max-iters", "4", "--resume").check()
    assert f"resumed from {(out / 'checkpoints').resolve()} at step 2" in second.stdout
    steps_run = [int(m) for m in re.findall(r"^step +(\d+)/4 ", second.stdout, re.M)]
    assert steps_run == [3, 4]  # it did not redo steps 1-2
    # every per-step loss, the evals and the final params and optimizer state are identical
    assert second.losses() == reference.losses()
    assert len(second.losses()) == 4
    ref_evals = [(r["step"], r["train_loss"], r["val_loss"]) for r in reference.records("eval")]
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in second.records("eval")] == ref_evals
    meta_a, params_a, opt_a = restore(reference.out, 4)
    meta_b, params_b, opt_b = restore(out, 4)
    assert meta_a["step"] == meta_b["step"] == 4
    assert_trees_equal(params_b, params_a)
    assert_trees_equal(opt_b, opt_a)
    # and the trajectory really moved: the params at step 4 differ from those at step 2
    _, params_2, _ = restore(reference.out, 2)
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(params_2).values(), leaves(params_a).values()))


def test_resume_refuses_a_different_model(reference, default_corpus, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference.out, run)
    args = ["--data", str(default_corpus), "--out", str(run), "--max-iters", "6", *TINY, *SCHEDULE]
    cfg = build_config(parser().parse_args(args + ["--set", "model.n_layer=2"]))
    with pytest.raises(UserError, match="differs from the checkpoint's in n_layer 1 -> 2$"):
        train(cfg, resume=True)
    assert (run / "metrics.jsonl").read_text() == (reference.out / "metrics.jsonl").read_text()


# ---------------------------------------------------------------------------------------------------
# data parallel over 2 virtual CPU devices == 1 device
# ---------------------------------------------------------------------------------------------------


def test_data_parallel_matches_single_device(cli, reference, default_corpus, tmp_path):
    dp = cli(tmp_path / "dp", "--data", str(default_corpus), "--max-iters", "4", *TINY, *SCHEDULE, devices=2).check()
    header = dp.stdout.splitlines()[0]
    assert "2x cpu" in header, header
    assert "1x cpu" in reference.stdout.splitlines()[0]
    ref, got = reference.losses(), dp.losses()
    assert got.keys() == ref.keys() == {1, 2, 3, 4}
    for step in ref:
        assert abs(got[step] - ref[step]) / abs(ref[step]) < 1e-5, (step, got[step], ref[step])
    ref_grad = {r["step"]: r["grad_norm"] for r in reference.records("train")}
    for r in dp.records("train"):
        assert r["grad_norm"] == pytest.approx(ref_grad[r["step"]], rel=1e-4)
    for a, b in zip(dp.records("eval"), reference.records("eval")):
        assert a["step"] == b["step"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
    _, params_dp, _ = restore(dp.out, 4)
    _, params_ref, _ = restore(reference.out, 4)
    assert_trees_equal(params_dp, params_ref, rtol=1e-4)


def test_batch_must_divide_over_devices(cli, default_corpus, tmp_path):
    run = cli(tmp_path / "odd", "--data", str(default_corpus), "--max-iters", "1", *TINY, "--set", "batch_size=3",
              devices=2)
    line = one_error_line(run)
    assert "batch_size 3" in line and "2" in line


# ---------------------------------------------------------------------------------------------------
# gradient accumulation: batch 4 x accum 2 == batch 8 x accum 1
# ---------------------------------------------------------------------------------------------------


def test_grad_accumulation_matches_the_larger_batch(default_corpus, tmp_path):
    """In-process train(): batch 4 x grad_accum 2 sees the same 8 rows per step as batch 8 x grad_accum 1."""

    def run(name: str, batch: int, accum: int) -> tuple[list[dict], dict]:
        args = ["--data", str(default_corpus), "--out", str(tmp_path / name), "--max-iters", "3", *TINY,
                "--set", f"batch_size={batch}", "--set", f"grad_accum={accum}", "--set", "learning_rate=3e-3",
                "--set", "warmup_iters=0", "--set", "eval_interval=100", "--set", "eval_iters=1"]
        cfg = build_config(parser().parse_args(args))
        assert cfg.tokens_per_iter == 8 * 32
        result = train(cfg)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(ln) for ln in lines]
        # train() returns the final evaluation
        last_eval = [r for r in records if r["kind"] == "eval"][-1]
        assert result == {"step": 3, "train_loss": last_eval["train_loss"], "val_loss": last_eval["val_loss"]}
        return [r for r in records if r["kind"] == "train"], result

    (accum, accum_final), (big, big_final) = run("accum", 4, 2), run("big", 8, 1)
    assert [r["step"] for r in accum] == [r["step"] for r in big] == [1, 2, 3]
    for a, b in zip(accum, big):
        assert abs(a["loss"] - b["loss"]) / b["loss"] < 1e-5, (a, b)
        # the gradient is the mean over micro-batches, not their sum
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert len({r["loss"] for r in big}) == 3  # the steps saw different data / params
    # evaluation uses batch_size rows per batch, so only compare it loosely (different eval batches)
    assert math.isfinite(accum_final["val_loss"]) and math.isfinite(big_final["val_loss"])


# ---------------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, no traceback
# ---------------------------------------------------------------------------------------------------

BAD_INPUT = {
    "variant": (["--variant", "nope"], ["nope", *PRESETS]),
    "mixer": (["--mixer", "nope"], ["nope", *AXES["mixer"]]),
    "config": (["--config", "nope"], ["nope", *available_configs()]),
    "set_key": (["--set", "nope=1"], ["nope", "batch_size", "learning_rate", "model.n_layer", "model_size"]),
    "set_type": (["--set", "batch_size=four"], ["batch_size", "int", "four"]),
    "heads": (["--set", "model.n_embd=30", "--set", "model.n_head=4"], ["n_embd", "30", "n_head", "4"]),
    "data": (["--data", "{tmp}/no_such_dir"], ["no_such_dir", "prepare"]),
    "resume_nothing": (["--resume"], ["resume", "no checkpoint"]),
    "recipe": (["--set", "learning_rate=nan"], ["learning_rate", "finite", "nan"]),
    "out_is_a_file": (["--out", "{tmp}/a_file/run"], ["a_file", "is a file"]),
    "out_unwritable": (["--out", "/proc/jaxgpt/run"], ["--out /proc/jaxgpt/run"]),  # refused by bits or the kernel
    "no_val_split": (["--data", "{tmp}/train_only"], ["val", "train_only"]),
}


def test_bad_input_is_one_clear_line(cli, default_corpus, tmp_path):
    """Every bad command exits with code 2 and one `error: ...` line naming the valid choices, and leaves no run
    folder behind; the commands run concurrently (each fails during the CLI's start-up)."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "train_only").mkdir()
    for f in default_corpus.glob("train_*.bin"):
        shutil.copy(f, tmp_path / "train_only")

    def one(name: str) -> tuple[str, Run]:
        args = [a.replace("{tmp}", str(tmp_path)) for a in BAD_INPUT[name][0]]
        data = [] if "--data" in args else ["--data", str(default_corpus)]
        # the bad arguments come last, so that they are what the command line ends up with
        out = None if "--out" in args else tmp_path / name
        return name, cli(out, *data, "--max-iters", "1", *TINY, *args, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = dict(pool.map(one, BAD_INPUT))
    failures = []
    for name, run in runs.items():
        try:
            line = one_error_line(run)
            for needle in BAD_INPUT[name][1]:
                assert needle in line, f"{needle!r} missing"
            assert run.out is None or not run.out.exists(), "it left a run folder"
        except AssertionError as e:
            failures.append(f"{name}: {e}\n  rc={run.returncode} stderr={run.stderr[-600:]!r}")
    assert not failures, "\n".join(failures)


INVALID_RECIPES = {  # arguments -> the error
    "lr_zero": (["--set", "learning_rate=0"], "learning_rate must be a finite number > 0, got 0.0"),
    "lr_negative": (["--set", "learning_rate=-3e-4"], "learning_rate must be a finite number > 0, got -0.0003"),
    "lr_inf": (["--set", "learning_rate=inf"], "learning_rate must be a finite number > 0, got inf"),
    "min_lr_nan": (["--set", "min_lr=nan"], "min_lr must be a finite number >= 0, got nan"),
    "min_lr_above_lr": (["--set", "min_lr=0.01"], "min_lr (0.01) must be <= learning_rate (0.002)"),
    "warmup_past_max_iters": (["--set", "max_iters=10"], "warmup_iters (40) must be <= max_iters (10); set it with "
                                                     "--set warmup_iters=N"),
    "decay_before_warmup": (["--set", "lr_decay_iters=20"], "lr_decay_iters (20) must be 0 (max_iters) or >= "
                                                            "warmup_iters (40)"),
    "batch_zero": (["--set", "batch_size=0"], "batch_size must be >= 1, got 0"),
    "iters_zero": (["--max-iters", "0"], "max_iters must be >= 1, got 0"),
    "accum_negative": (["--set", "grad_accum=-2"], "grad_accum must be >= 1, got -2"),
    "eps_zero": (["--set", "eps=0"], "eps must be a finite number > 0, got 0.0"),
    "beta2_one": (["--set", "beta2=1"], "beta2 must be in [0, 1), got 1.0"),
    "weight_decay_negative": (["--set", "weight_decay=-0.1"], "weight_decay must be a finite number >= 0, got -0.1"),
    "grad_clip_nan": (["--set", "grad_clip=nan"], "grad_clip must be a finite number >= 0, got nan"),
    "set_variant": (["--set", "variant=gla"], "--set variant=... would rename the run without changing its model; "
                                              "use --variant NAME"),
    "peak_tflops": (["--peak-tflops", "-1"], "--peak-tflops must be positive, got -1.0"),
    "watchdog": (["--watchdog-seconds", "-5"], "--watchdog-seconds must be >= 0 (0: no watchdog), got -5.0"),
}


@pytest.mark.parametrize("name", INVALID_RECIPES)
def test_invalid_recipe_is_rejected_when_parsed(name):
    argv, message = INVALID_RECIPES[name]
    with pytest.raises(UserError) as e:
        build_config(parser().parse_args(argv))
    assert str(e.value) == message


def test_existing_run_is_not_overwritten(cli, reference, default_corpus):
    before = {p: p.read_bytes() for p in reference.out.iterdir() if p.is_file()}
    run = cli(reference.out, "--data", str(default_corpus), "--max-iters", "4", *TINY, *SCHEDULE)
    line = one_error_line(run)
    assert "--resume" in line and str(reference.out) in line
    assert {p: p.read_bytes() for p in reference.out.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------------------------------------------
# a diverging run stops with a message naming its last verified checkpoint
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt_interval", [1, 2])
def test_non_finite_loss_stops_the_run(cli, default_corpus, tmp_path, ckpt_interval):
    """lr 1e6 without warmup or clipping: the first update blows the weights up and a later one turns them into
    NaN. Saving every step, the NaN parameters are caught by the check before a save; saving every other step,
    by the non-finite loss of the next step. Either way the run stops and the last checkpoint is a good one."""
    out = tmp_path / "diverge"
    max_iters = 8
    run = cli(out, "--data", str(default_corpus), "--max-iters", str(max_iters), *TINY, "--set", "learning_rate=1e6",
              "--set", "warmup_iters=0", "--set", "grad_clip=0", "--set", f"ckpt_interval={ckpt_interval}",
              "--set", "keep_checkpoints=10", "--set", "eval_interval=100", "--set", "eval_iters=1")
    assert run.returncode != 0
    line = one_error_line(run)
    assert re.search(r"non-finite|nan|inf", line), line
    diverged = int(re.search(r"at step (\d+)", line)[1])
    assert 1 <= diverged < max_iters
    assert "Final metrics" not in run.stdout
    ckpt = Checkpointer(out / "checkpoints")
    try:
        steps = ckpt.steps()
    finally:
        ckpt.close()
    assert steps and max(steps) < diverged
    assert f"Last verified checkpoint: step {max(steps)} in " in line
    meta, params, opt_state = restore(out)
    assert meta["step"] == max(steps)
    for name, leaf in {**leaves(params), **leaves(opt_state)}.items():
        assert np.all(np.isfinite(leaf)), name
    # the losses logged up to the last checkpoint were finite, and nothing was logged past the divergence
    losses = run.losses()
    assert all(math.isfinite(v) for s, v in losses.items() if s <= max(steps))
    assert max(losses) <= diverged
