"""Fault injection: training processes killed (SIGKILL at random moments, during saves too), stopped (SIGTERM;
SIGINT twice and three times), refused a write during a save, or hung; run folders damaged (checkpoint files
truncated, garbled, bit-flipped, deleted or emptied; metrics.jsonl torn); non-finite numbers injected. Each ends
in an exact resume, a one-line fallback or a one-line error, with the last checkpoint intact.

One clean 8-step run (`base`, trained in this process, every checkpoint kept) is the reference. Faults go into
copies of its folder or into subprocesses that train the same recipe; resumes run in this process.
"""

import dataclasses
import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

import jaxgpt.train as train_module
from cli_runs import ROOT, TINY, assert_trees_equal, restore, shared_dir, tensorboard_scalars, train_env
from jaxgpt.checkpoint import MANIFEST, TMP_GLOB, Checkpointer, damage, load_run
from jaxgpt.data import staging_dir
from jaxgpt.errors import UserError
from jaxgpt.export import main as export_main
from jaxgpt.metrics import MetricsLog
from jaxgpt.train import TrainingDiverged, build_config, parser, train

STEPS = 8
RECIPE = [*TINY, "--set", "warmup_iters=1", "--set", "lr_decay_iters=8", "--set", "learning_rate=3e-3",
          "--set", "eval_interval=4", "--set", "ckpt_interval=2", "--set", "keep_checkpoints=10"]
PEAK_TFLOPS = 1e-3  # a made-up device peak, so that the runs log MFU on the CPU


def args(data: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--max-iters", str(steps), *RECIPE, *extra]


def run_here(data: Path, out: Path, *extra: str, resume: bool = False, steps: int = STEPS) -> dict:
    """train() in this process."""
    return train(build_config(parser().parse_args(args(data, out, *extra, steps=steps))), resume=resume,
                 peak_tflops=PEAK_TFLOPS)


def curve(run_dir: Path) -> list[tuple]:
    """The run's records without their timings: (kind, step, losses) in file order."""
    return [(r["kind"], r["step"], r.get("loss"), r.get("train_loss"), r.get("val_loss"))
            for r in MetricsLog(run_dir / "metrics.jsonl").read()]


def assert_same_run(run_dir: Path, base: Path) -> None:
    """The same records (no gap, no duplicate) and the same final params and optimizer state as `base`."""
    assert curve(run_dir) == curve(base)
    _, params, opt_state = restore(run_dir, STEPS)
    _, base_params, base_opt = restore(base, STEPS)
    assert_trees_equal(params, base_params)
    assert_trees_equal(opt_state, base_opt)


def steps_on_disk(run_dir: Path) -> list[str]:
    return sorted((p.name for p in (run_dir / "checkpoints").iterdir()), key=lambda n: (len(n), n))


def copy_run(base: Path, dst: Path, upto: int = STEPS) -> Path:
    """A copy of the base run as it stood after its checkpoint `upto` (later checkpoints left out)."""
    shutil.copytree(base, dst, ignore=lambda d, names: [n for n in names if n.isdigit() and int(n) > upto])
    return dst


@pytest.fixture(scope="module")
def base(default_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    run_here(default_corpus, out)
    return out


# ---------------------------------------------------------------------------------------------------
# subprocesses
# ---------------------------------------------------------------------------------------------------


class Training:
    """A training subprocess (`python -m jaxgpt.train`, or `script` wrapping jaxgpt.train.main) writing its
    stdout and stderr to files."""

    def __init__(self, tmp: Path, cache: Path, argv: list[str], script: str | None = None):
        self.stdout_path, self.stderr_path = tmp / "stdout.txt", tmp / "stderr.txt"
        if script is None:
            cmd = [sys.executable, "-m", "jaxgpt.train", *argv]
        else:
            (tmp / "wrapper.py").write_text(script)
            cmd = [sys.executable, str(tmp / "wrapper.py"), *argv]
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(cache), stdout=out, stderr=err)

    def wait_for(self, pattern: str, timeout: float = 150) -> re.Match:
        """Until `pattern` appears in stdout (fails if the process ends first)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if m := re.search(pattern, self.stdout_path.read_text(), re.M):
                return m
            if self.proc.poll() is not None:
                pytest.fail(f"exited with {self.proc.returncode} before {pattern!r}:\n{self.output()}")
            time.sleep(0.01)
        self.proc.kill()
        pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.output()}")

    def wait_for_signal_lines(self, n: int, timeout: float = 60) -> None:
        """Until stderr holds n lines of the stop handler (`SIGINT: ...`, `SIGTERM again: ...`), or the process has
        ended. The next signal must not be sent before: Python runs a handler once for several deliveries of one
        signal that arrive while the main thread is inside a C call."""
        deadline = time.time() + timeout
        while self.proc.poll() is None:
            lines = self.stderr_path.read_text().splitlines()
            if sum(ln.startswith(("SIGINT", "SIGTERM")) for ln in lines) >= n:
                return
            assert time.time() < deadline, self.output()
            time.sleep(0.01)

    def finish(self, timeout: float = 150) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout)
        finally:
            self.proc.kill()
        return rc, self.stdout_path.read_text(), self.stderr_path.read_text()

    def output(self) -> str:
        return f"{self.stdout_path.read_text()[-3000:]}\n{self.stderr_path.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return shared_dir(tmp_path_factory, "jax-compilation-cache")


# ---------------------------------------------------------------------------------------------------
# SIGKILL at random moments
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_then_resume_is_exact(seed, base, default_corpus, cache, tmp_path):
    """A run saving every step, keeping 3, is SIGKILLed at a random moment after its checkpoint k (random):
    right after (the save commits, rotates an old step out, the next starts) or later. Every step folder left
    is intact, and a resume finishes the exact clean trajectory with nothing else left in checkpoints/."""
    rng = random.Random(seed)
    k = rng.randrange(1, STEPS - 1)
    delay = rng.uniform(0, 0.02) if rng.random() < 0.5 else rng.uniform(0.02, 0.5)
    out = tmp_path / "run"
    every_step = ["--set", "ckpt_interval=1", "--set", "keep_checkpoints=3"]
    run = Training(tmp_path, cache, args(default_corpus, out, *every_step))
    deadline = time.time() + 150
    while not (out / "checkpoints" / str(k)).is_dir():
        assert run.proc.poll() is None and time.time() < deadline, run.output()
        time.sleep(0.002)
    time.sleep(delay)
    run.proc.send_signal(signal.SIGKILL)
    rc, _, _ = run.finish()
    context = f"seed {seed}: killed {delay:.3f} s after checkpoint {k} (rc {rc}); left {steps_on_disk(out)}"
    ckpt = Checkpointer(out / "checkpoints")
    try:
        left = ckpt.steps()
        assert left and max(left) >= k, context
        assert all(ckpt.damage(s) is None for s in left), context
    finally:
        ckpt.close()
    run_here(default_corpus, out, *every_step, resume=True)
    assert_same_run(out, base)
    assert steps_on_disk(out) == [str(s) for s in range(STEPS - 2, STEPS + 1)], context


# ---------------------------------------------------------------------------------------------------
# damaged checkpoints: fallback to the newest intact one, or one error line
# ---------------------------------------------------------------------------------------------------


def largest_array_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(data)


def garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 3
    data[at:at + 64] = bytes(random.Random(0).randrange(256) for _ in range(64))
    path.write_bytes(data)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


DAMAGE = {  # name: (what to do to step 8, the reason the message gives)
    "array_truncated": (lambda d: truncate(largest_array_file(d)), r"state/.+ has \d+ bytes, \d+ written"),
    "array_garbled": (lambda d: garble(largest_array_file(d)), r"state/.+ does not match its checksum"),
    "array_bit_flip": (lambda d: flip_bit(largest_array_file(d)), r"state/.+ does not match its checksum"),
    "METADATA_truncated": (lambda d: truncate(d / "state" / "_METADATA"), r"state/_METADATA has \d+ bytes, \d+ written"),
    "METADATA_deleted": (lambda d: (d / "state" / "_METADATA").unlink(), r"state/_METADATA is missing"),
    "meta_truncated": (lambda d: truncate(d / "meta" / "metadata"), r"meta/metadata has \d+ bytes, \d+ written"),
    "meta_deleted": (lambda d: (d / "meta" / "metadata").unlink(), r"meta/metadata is missing"),
    "manifest_deleted": (lambda d: (d / MANIFEST).unlink(), rf"no {MANIFEST}"),
    "manifest_truncated": (lambda d: truncate(d / MANIFEST), rf"unreadable {MANIFEST}"),
    "empty_folder": (empty, r"empty step folder"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_latest_checkpoint_falls_back(kind, base, tmp_path, capfd):
    """What `--resume` and the export/evaluate loaders do with a damaged latest step: the resume reports it in
    one line, uses step 6 and moves step 8 aside (Orbax no longer lists it); load_run reports it and reads
    step 6, touching nothing; asking load_run for step 8 itself is a one-line error."""
    do, reason = DAMAGE[kind]
    run = copy_run(base, tmp_path / "run")
    do(run / "checkpoints" / str(STEPS))
    line = rf"checkpoint step {STEPS} is damaged \({reason}\); "

    _, state = load_run(run)
    assert state.step == STEPS - 2
    assert re.fullmatch(line + rf"using step {STEPS - 2}\n", capfd.readouterr().err)
    with pytest.raises(UserError, match=rf"checkpoint step {STEPS} in .+ is damaged \({reason}\)$"):
        load_run(run, STEPS)
    assert str(STEPS) in steps_on_disk(run)  # the loaders leave it

    ckpt = Checkpointer(run / "checkpoints", keep=3)
    try:
        assert ckpt.select(set_aside=True, action="resuming from") == STEPS - 2
        assert ckpt.steps() == [2, 4, 6]
    finally:
        ckpt.close()
    err = capfd.readouterr().err
    assert re.fullmatch(line + rf"resuming from step {STEPS - 2}; moved it to {STEPS}\.damaged\n", err), err
    assert steps_on_disk(run) == ["2", "4", "6", f"{STEPS}.damaged"]


def test_no_intact_checkpoint_is_one_error_line(base, default_corpus, tmp_path):
    run = copy_run(base, tmp_path / "run", upto=4)
    flip_bit(largest_array_file(run / "checkpoints" / "4"))
    (run / "checkpoints" / "2" / MANIFEST).unlink()
    with pytest.raises(UserError) as e:
        run_here(default_corpus, run, resume=True)
    message = str(e.value)
    assert "\n" not in message
    assert re.fullmatch(r"no intact checkpoint in \S+: step 4 is damaged \(state/.+ does not match its checksum\); "
                        rf"step 2 is damaged \(no {MANIFEST}\)", message), message
    assert steps_on_disk(run) == ["2", "4"]  # nothing is moved or deleted


def test_cli_resume_past_a_bit_flip_and_a_torn_metrics_line(base, default_corpus, cache, tmp_path):
    """`--resume` with one bit flipped in step 8's largest array file and metrics.jsonl cut mid-record: one line
    for each, then steps 7-8 again from step 6; the records, the TensorBoard curves and the final state are the
    clean run's."""
    run = copy_run(base, tmp_path / "run")
    flip_bit(largest_array_file(run / "checkpoints" / str(STEPS)))
    log = run / "metrics.jsonl"
    log.write_bytes(log.read_bytes()[:-40])
    rc, stdout, stderr = Training(tmp_path, cache, args(default_corpus, run, "--resume",
                                                          "--peak-tflops", str(PEAK_TFLOPS))).finish()
    assert rc == 0, stderr
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr
    assert re.fullmatch(rf"checkpoint step {STEPS} is damaged \(state/.+ does not match its checksum\); resuming "
                        rf"from step {STEPS - 2}; moved it to {STEPS}\.damaged", lines[0]), lines[0]
    assert lines[1] == f"warning: {log}: dropped line {len(curve(base))} (not a complete JSON record)"
    assert f"at step {STEPS - 2}" in stdout
    assert_same_run(run, base)
    got, want = tensorboard_scalars(run), tensorboard_scalars(base)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "eval/train_loss", "eval/val_loss"):
        assert got[tag] == want[tag], tag


# ---------------------------------------------------------------------------------------------------
# run files
# ---------------------------------------------------------------------------------------------------


def test_torn_metrics_line_is_dropped_and_the_rewrite_is_atomic(tmp_path, capfd):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 4):
        log.write(kind="train", step=step, loss=float(step))
    whole = log.path.read_bytes()
    log.path.write_bytes(whole[:-10])  # a kill in the middle of the third record
    assert [r["step"] for r in log.read()] == [1, 2]
    assert capfd.readouterr().err == f"warning: {log.path}: dropped line 3 (not a complete JSON record)\n"
    kept = log.truncate_after(1)
    assert [r["step"] for r in kept] == [1] and [r["step"] for r in log.read()] == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    assert log.path.read_text().endswith("\n")


def test_resume_after_the_final_save_adds_no_record(base, default_corpus, tmp_path):
    """A process killed right after its final save left every record; resuming it evaluates nothing again and
    returns the logged final evaluation."""
    run = copy_run(base, tmp_path / "run")
    final = run_here(default_corpus, run, resume=True)
    assert curve(run) == curve(base)
    last = MetricsLog(base / "metrics.jsonl").read()[-1]
    assert final == {"step": STEPS, "train_loss": last["train_loss"], "val_loss": last["val_loss"]}


def test_tensorboard_events(base):
    """The run's scalars read back from its event files: every logged value of metrics.jsonl, at its step."""
    scalars = tensorboard_scalars(base)
    records = MetricsLog(base / "metrics.jsonl").read()
    train_records = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    for name in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert scalars[f"train/{name}"] == pytest.approx({r["step"]: r[name] for r in train_records}, rel=1e-6)
    assert all(r["mfu"] == pytest.approx(r["tflops"] / PEAK_TFLOPS) for r in train_records)
    for name in ("train_loss", "val_loss"):
        assert scalars[f"eval/{name}"] == pytest.approx({r["step"]: r[name] for r in evals}, rel=1e-6)
    assert sorted(scalars["eval/val_loss"]) == [0, 4, 8]


# ---------------------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------------------


SLOW_SAVES = """\
import sys, time
import jaxgpt.checkpoint
from jaxgpt.train import main

write_manifest = jaxgpt.checkpoint.write_manifest

def slow_write_manifest(step_dir):  # every save takes a second more, so that later signals arrive during one
    time.sleep(1)
    write_manifest(step_dir)

jaxgpt.checkpoint.write_manifest = slow_write_manifest
main(sys.argv[1:])
"""


def stop_with(signals: list[signal.Signals], gap: float, default_corpus: Path, cache: Path, tmp_path: Path,
              script: str | None = None):
    """Send `signals` once step 3 is logged and checkpoint 2 committed, each `gap` seconds after the run
    acknowledged the one before; -> (rc, stdout, stderr, run folder)."""
    out = tmp_path / "run"
    run = Training(tmp_path, cache, args(default_corpus, out, steps=40), script=script)
    run.wait_for(r"^step +3/40 ")
    deadline = time.time() + 60
    while not (out / "checkpoints" / "2").is_dir():
        assert run.proc.poll() is None and time.time() < deadline, run.output()
        time.sleep(0.01)
    for i, sig in enumerate(signals):
        run.proc.send_signal(sig)
        run.wait_for_signal_lines(i + 1)
        time.sleep(gap)
    return *run.finish(), out


def signal_lines(stderr: str) -> list[str]:
    """stderr without blank lines and Orbax's note that a save waited for the one before (the saves are slow)."""
    return [ln for ln in stderr.splitlines() if ln and not ln.startswith("WARNING:absl:Waiting for previous save")]


def assert_complete_records(out: Path, upto: int) -> None:
    """metrics.jsonl holds one train record for every step up to `upto` and no later one."""
    steps = [r["step"] for r in MetricsLog(out / "metrics.jsonl").read() if r["kind"] == "train"]
    assert steps == list(range(1, upto + 1)), steps


def test_sigterm_saves_once_and_the_resume_is_exact(base, default_corpus, cache, tmp_path):
    rc, stdout, stderr, out = stop_with([signal.SIGTERM], 0, default_corpus, cache, tmp_path)
    assert rc == 128 + signal.SIGTERM, stderr
    assert stderr.strip() == "SIGTERM: stopping after this step, with a checkpoint save"
    step = int(re.search(r"^stopped by SIGTERM: saved step (\d+) to \S+; continue with --resume$", stdout, re.M)[1])
    assert 3 <= step < STEPS
    assert max(int(s) for s in steps_on_disk(out)) == step and damage(out / "checkpoints" / str(step)) is None
    assert_complete_records(out, step)
    run_here(default_corpus, out, resume=True)
    assert_same_run(out, base)


def test_second_sigint_finishes_the_save(default_corpus, cache, tmp_path):
    rc, stdout, stderr, out = stop_with([signal.SIGINT] * 2, 0.3, default_corpus, cache, tmp_path, SLOW_SAVES)
    assert rc == 128 + signal.SIGINT, stderr
    assert signal_lines(stderr) == [
        "SIGINT: stopping after this step, with a checkpoint save",
        "SIGINT again: finishing this step and its checkpoint save; a third signal aborts it",
    ]
    step = int(re.search(r"^stopped by SIGINT: saved step (\d+) ", stdout, re.M)[1])
    assert max(int(s) for s in steps_on_disk(out)) == step and damage(out / "checkpoints" / str(step)) is None
    assert_complete_records(out, step)


def test_third_sigint_aborts_and_the_last_checkpoint_resumes(base, default_corpus, cache, tmp_path):
    rc, stdout, stderr, out = stop_with([signal.SIGINT] * 3, 0.3, default_corpus, cache, tmp_path, SLOW_SAVES)
    assert rc == 128 + signal.SIGINT, stderr
    lines = signal_lines(stderr)
    assert len(lines) == 3 and "stopped by" not in stdout
    last = re.fullmatch(r"SIGINT a third time: aborted without finishing the checkpoint save\. Last checkpoint: step "
                        r"(\d+) in \S+ \(continue with --resume\)\.", lines[2])
    assert last, lines[2]
    ckpt = Checkpointer(out / "checkpoints")  # opening it removes what the aborted save left
    try:
        assert ckpt.steps()[-1] == int(last[1]) and ckpt.damage(int(last[1])) is None
    finally:
        ckpt.close()
    assert not list((out / "checkpoints").glob(TMP_GLOB))
    run_here(default_corpus, out, resume=True)
    assert_same_run(out, base)


# ---------------------------------------------------------------------------------------------------
# a write refused during a save; a hung step; non-finite numbers
# ---------------------------------------------------------------------------------------------------

FILE_SIZE_LIMIT = """\
import resource, signal, sys
import jaxgpt.checkpoint
from jaxgpt.train import main

save = jaxgpt.checkpoint.Checkpointer.save

def save_with_limit(self, state):  # from step 4 on, no file may grow past 1 MiB (the arrays are ~6 MiB)
    if state.step >= 4:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
    return save(self, state)

jaxgpt.checkpoint.Checkpointer.save = save_with_limit
main(sys.argv[1:])
"""


def test_refused_write_during_a_save(base, default_corpus, cache, tmp_path):
    """Orbax's array writer fails mid-save (EFBIG from RLIMIT_FSIZE: the file system refusing a write, as on a
    full disk): one error line naming the step and the OS error, no temporary folder, step 2 intact, and
    `--resume` in place continues exactly."""
    out = tmp_path / "run"
    rc, stdout, stderr = Training(tmp_path, cache, args(default_corpus, out), script=FILE_SIZE_LIMIT).finish()
    assert rc == 2, stderr
    assert stderr.splitlines() == [f"error: saving checkpoint step 4 to {out / 'checkpoints'} failed: "
                                   f"{os.strerror(errno.EFBIG)}"], stderr
    assert steps_on_disk(out) == ["2"] and damage(out / "checkpoints" / "2") is None
    # it stopped when the failure surfaced (the next step, or the next save at the latest)
    assert max(r["step"] for r in MetricsLog(out / "metrics.jsonl").read()) <= 6, stdout
    run_here(default_corpus, out, resume=True)
    assert_same_run(out, base)


HANG = """\
import dataclasses, sys, time
import jaxgpt.train

make_train_step = jaxgpt.train.make_train_step

def hanging(*args, **kwargs):  # the 6th call of the train step never returns
    step = make_train_step(*args, **kwargs)
    calls = []

    def jitted(*a):
        calls.append(1)
        if len(calls) == 6:
            time.sleep(3600)
        return step.jitted(*a)

    return dataclasses.replace(step, jitted=jitted)

jaxgpt.train.make_train_step = hanging
jaxgpt.train.main(sys.argv[1:])
"""


def test_watchdog_stops_a_hung_step(base, default_corpus, cache, tmp_path):
    out = tmp_path / "run"
    rc, _, stderr = Training(tmp_path, cache, args(default_corpus, out, "--watchdog-seconds", "2"), script=HANG).finish()
    assert rc == 3, stderr
    first, *stacks = stderr.splitlines()
    assert re.fullmatch(r"watchdog: no step has finished for \d+ s since step 4, over 10 x the median step time \(\S+ s\) "
                        r"and 2 s; stopping\. "
                        r"Last checkpoint: step 4 in \S+ \(continue with --resume\)\. Every thread's stack follows\.",
                        first), first
    assert any(ln.startswith("Thread 0x") for ln in stacks) and any("in jitted" in ln for ln in stacks)
    assert damage(out / "checkpoints" / "4") is None
    run_here(default_corpus, out, resume=True)
    assert_same_run(out, base)


def inject(monkeypatch, at_call: int, key: str, value: float) -> None:
    """Make the train step's `at_call`-th call (of this process) report metrics[key] = value."""
    make_train_step = train_module.make_train_step

    def injecting(*a, **k):
        step = make_train_step(*a, **k)
        calls = []

        def jitted(*args):
            p, o, metrics = step.jitted(*args)
            calls.append(1)
            if len(calls) == at_call:
                metrics = {**metrics, key: jnp.asarray(value, metrics[key].dtype)}
            return p, o, metrics

        return dataclasses.replace(step, jitted=jitted)

    monkeypatch.setattr(train_module, "make_train_step", injecting)


def test_infinite_grad_norm_stops_and_names_the_last_verified_checkpoint(base, default_corpus, tmp_path,
                                                                          monkeypatch, capfd):
    """Resumed past a damaged step 8 (so from 6), a finite loss with an infinite gradient norm at step 7 stops the
    run; the message names step 6, never the damaged step."""
    run = copy_run(base, tmp_path / "run")
    truncate(largest_array_file(run / "checkpoints" / str(STEPS)))
    inject(monkeypatch, 1, "grad_norm", float("inf"))
    with pytest.raises(TrainingDiverged, match=rf"^grad norm is inf at step 7; stopping\. Last verified checkpoint: "
                                               rf"step 6 in {re.escape(str(run / 'checkpoints'))}\.$"):
        run_here(default_corpus, run, resume=True)
    assert "step 8 is damaged" in capfd.readouterr().err


def test_nan_validation_loss_stops_the_run(base, default_corpus, tmp_path, monkeypatch):
    run = copy_run(base, tmp_path / "run", upto=2)
    monkeypatch.setattr(train_module.Evaluator, "__call__", lambda self, params: {"train": 3.0, "val": float("nan")})
    with pytest.raises(TrainingDiverged, match=r"^validation loss is nan at step 4; stopping\. Last verified "
                                               r"checkpoint: step 2 in "):
        run_here(default_corpus, run, resume=True)
    assert not [r for r in MetricsLog(run / "metrics.jsonl").read() if r["step"] > 4]


# ---------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------


def test_export_refuses_a_file_in_the_way_and_a_damaged_checkpoint(base, tmp_path, capsys):
    """`python -m jaxgpt.export` with a file at or above the output folder, or from a run whose only checkpoint is
    truncated or an empty folder (also with --force over a good export): one error line each, and nothing
    written or replaced."""

    def error(*argv: Path | str) -> str:
        with pytest.raises(SystemExit) as e:
            export_main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        return err.strip().removeprefix("error: ")

    file = tmp_path / "file"
    file.write_text("x")
    assert error(base, file) == f"OUT {file}: {file} is a file, not a directory"
    assert error(base, file / "hf") == f"OUT {file / 'hf'}: {file} is a file, not a directory"
    run = copy_run(base, tmp_path / "run", upto=2)
    truncate(largest_array_file(run / "checkpoints" / "2"))
    assert re.fullmatch(r"no intact checkpoint in \S+: step 2 is damaged \(state/\S+ has \d+ bytes, \d+ written\)",
                        error(run, tmp_path / "hf"))
    empty(run / "checkpoints" / "2")
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text("{}")
    assert re.fullmatch(r"no intact checkpoint in \S+: step 2 is damaged \(empty step folder\)",
                        error(run, good, "--force"))
    assert [p.name for p in good.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "good", "run"]


def test_staging_folder_of_a_killed_writer_is_removed(tmp_path):
    """Exports, imports and data preparation write into `OUT.tmp-<pid>` and rename it: the next writer of OUT
    removes such a folder whose process is gone, and leaves one whose process still runs."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    stale, running = tmp_path / f"out.tmp-{gone.pid}", tmp_path / f"out.tmp-{os.getppid()}"
    for folder in (stale, running):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    with staging_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", running.name]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.json"]
