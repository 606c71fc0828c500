"""Training as several processes through jax.distributed, with real processes on this machine: 2 processes x 2
virtual CPU devices each, connected over localhost (coordination service and gloo CPU collectives), against one
process x 4 devices; a process killed mid-run; resuming with 2 processes and with 1.

A 2-process run that fails shows every process's output: a jaxlib without CPU collectives (gloo) fails there, in
the runs, with its own error. The port of each run's coordinator is a free one the OS hands out.

Tolerances: 2 x 2 and 1 x 4 devices run the same per-device programs; they differ in how the gradient
all-reduce adds the 4 partial sums (gloo across processes, in-process otherwise), which moves fp32 results by a
few ulps. Measured over these 4 steps: losses agree to 1.8e-7 relative (2 ulps of ~10.8), parameters and Adam
moments to 3.3e-7 (norm of the difference over the norm). The bounds are those of test_sharding.py (losses 1e-6,
state 1e-5): a wrong row layout or a batch that differs from the one-process batch changes the losses by orders of
magnitude more. Resuming with the same 2 processes repeats the same programs on the same data: exact.
"""

import argparse
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest

from cli_runs import ROOT, SCHEDULE, TINY, assert_trees_equal, locked, restore, shared_dir, train_env
from jaxgpt.checkpoint import MANIFEST
from jaxgpt.data import BatchSampler
from jaxgpt.distributed import DEFAULT_HEARTBEAT_SECONDS, Launch, add_arguments, launch_from
from jaxgpt.errors import UserError
from jaxgpt.metrics import MetricsLog
from jaxgpt.train import build_config, parser, train

LOSS_RTOL = 1e-6
STATE_RTOL = 1e-5
RECIPE = ["--max-iters", "4", *TINY, *SCHEDULE]  # checkpoints at steps 2 and 4, evaluations at 0, 2 and 4
HEARTBEAT = 5  # seconds without a heartbeat after which the killed process counts as dead
STOP_WITHIN = HEARTBEAT + 25  # the survivor's exit after the kill: the heartbeat timeout plus a loaded machine's slack


# ---------------------------------------------------------------------------------------------------
# launching processes
# ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Finished:
    """A finished run of one or more processes: its folder, exit codes and each process's output, in the files
    `<out>.<label>.<process>.<stream>`."""

    out: Path
    label: str
    codes: list[int]

    def log(self, i: int, stream: str) -> str:
        return Path(f"{self.out}.{self.label}.{i}.{stream}").read_text()

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in MetricsLog(self.out / "metrics.jsonl").read() if r["kind"] == "train"}

    def check(self) -> "Finished":
        if any(self.codes):
            logs = "\n".join(f"--- process {i} (exit {c}) stderr:\n{self.log(i, 'stderr')[-3000:]}"
                             for i, c in enumerate(self.codes))
            pytest.fail(f"a {len(self.codes)}-process run failed (several processes on CPU need jaxlib's gloo "
                        f"collectives, jax_cpu_collectives_implementation=gloo):\n{logs}")
        return self


@dataclass
class Running:
    out: Path
    label: str
    procs: list[subprocess.Popen]

    def wait(self, timeout: float = 240) -> Finished:
        deadline = time.monotonic() + timeout
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in self.procs]
        return Finished(self.out, self.label, codes)

    def check(self) -> Finished:
        return self.wait().check()


STARTED: list[subprocess.Popen] = []  # every process this module started, killed at its end if still running


@pytest.fixture(scope="module", autouse=True)
def no_process_left():
    yield
    for p in STARTED:
        if p.poll() is None:
            p.kill()
            p.wait()


def start(cache: Path, out: Path, *args: str, processes: int = 2, devices: int = 2,
          heartbeat: int = DEFAULT_HEARTBEAT_SECONDS, label: str = "run",
          only: dict[int, list[str]] | None = None) -> Running:
    """`python -m jaxgpt.train ARGS --out OUT` as `processes` processes of `devices` CPU devices each; process i
    gets the arguments `only[i]` too."""
    only = only or {}
    port, procs = free_port(), []
    out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(processes):
        cluster = [] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes),
                                             "--process-id", str(i), "--heartbeat-seconds", str(heartbeat)]
        with open(f"{out}.{label}.{i}.stdout", "w") as stdout, open(f"{out}.{label}.{i}.stderr", "w") as stderr:
            argv = [sys.executable, "-m", "jaxgpt.train", *args, *only.get(i, []), "--out", str(out), *cluster]
            procs.append(subprocess.Popen(argv, cwd=ROOT, env=train_env(cache, devices), stdout=stdout, stderr=stderr))
    STARTED.extend(procs)
    return Running(out, label, procs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return shared_dir(tmp_path_factory, "jax-compilation-cache")


@dataclass
class Killed:
    """A run whose process 1 was killed: the survivor's time to exit after the kill, and the training losses
    process 0 had logged (the steps after the checkpoint that a resume repeats among them)."""

    run: Finished
    seconds: float
    losses: dict[int, float]


def kill_process_1_after(running: Running, step: int, checkpoint: int) -> Killed:
    """SIGKILL process 1 once process 0 has logged training step `step` and checkpoint `checkpoint` is committed
    (saves run in the background); wait for process 0 to stop."""
    so_far = Finished(running.out, running.label, [])
    metrics, committed = running.out / "metrics.jsonl", running.out / "checkpoints" / str(checkpoint)
    deadline = time.monotonic() + 180
    while not (metrics.exists() and max(so_far.losses(), default=0) >= step and committed.is_dir()):
        if time.monotonic() > deadline or any(p.poll() is not None for p in running.procs):
            running.check()
            pytest.fail(f"the run ended or stalled before step {step}")
        time.sleep(0.05)
    running.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        running.procs[0].wait(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"process 0 still ran {STOP_WITHIN} s after process 1 was killed:\n"
                    f"{so_far.log(0, 'stderr')[-3000:]}")
    seconds = time.monotonic() - killed_at
    return Killed(running.wait(), seconds, so_far.losses())


def damage_a_copy(step_dir: Path, copy: Path) -> None:
    """A copy of a checkpoint with its largest file cut in half: it fails its checksums."""
    shutil.copytree(step_dir, copy)
    largest = max((f for f in copy.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])


def run_all(root: Path, cache: Path, data: Path) -> dict:
    """The 4-step recipe, all at once: as 1 process x 4 devices (data parallel), as 2 processes x 2 devices (data
    parallel), and as 2 x 2 with FSDP over all 4 devices (its all-gathers and reduce-scatters cross the
    processes). The FSDP run is given 400 steps (the lr schedule of the first 4 is the same: lr_decay_iters pins
    it); its process 1 is killed once step 3 is logged and the step-2 checkpoint committed, and 2 processes resume
    it from that checkpoint for the recipe's 4 steps (a later one that the kill did not prevent is removed first,
    and a damaged step 3 put in its way).
    -> {"1x4": Finished, "2x2": Finished, "killed": Killed, "2x2 fsdp": the resumed run, Finished}."""
    args, fsdp = ["--data", str(data), *RECIPE], ["--mesh", "fsdp=4"]
    running = {"1x4": start(cache, root / "one", *args, processes=1, devices=4),
               "2x2": start(cache, root / "dp", *args),
               "killed": start(cache, root / "fsdp", *args, *fsdp, "--max-iters", "400", heartbeat=HEARTBEAT)}
    killed = kill_process_1_after(running["killed"], 3, checkpoint=2)
    checkpoints = root / "fsdp" / "checkpoints"
    for later in (p for p in checkpoints.iterdir() if p.name.isdigit() and int(p.name) > 2):
        shutil.rmtree(later)
    damage_a_copy(checkpoints / "2", checkpoints / "3")
    resumed = start(cache, root / "fsdp", *args, *fsdp, "--resume", label="resumed")
    return {"1x4": running["1x4"].check(), "2x2": running["2x2"].check(), "killed": killed, "2x2 fsdp": resumed.check()}


@pytest.fixture(scope="module")
def runs(cache, default_corpus, tmp_path_factory) -> dict:
    """`run_all`'s runs, made once per pytest invocation (the first xdist worker to get here runs them, the
    others read its record)."""
    root = shared_dir(tmp_path_factory, "multiprocess")
    with locked(root / "lock"):
        record = root / "runs.json"
        if not record.exists():
            record.write_text(json.dumps(run_all(root, cache, default_corpus), default=_jsonable))
        saved = json.loads(record.read_text())
    runs = {name: Finished(Path(r["out"]), r["label"], r["codes"]) for name, r in saved.items() if name != "killed"}
    k = saved["killed"]
    runs["killed"] = Killed(Finished(Path(k["run"]["out"]), k["run"]["label"], k["run"]["codes"]), k["seconds"],
                            {int(step): loss for step, loss in k["losses"].items()})
    return runs


def _jsonable(x: object) -> object:
    return str(x) if isinstance(x, Path) else asdict(x)


# ---------------------------------------------------------------------------------------------------
# start-up flags and per-process rows
# ---------------------------------------------------------------------------------------------------


def launch(argv: list[str], environ: dict[str, str]) -> Launch | None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return launch_from(p.parse_args(argv), environ)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "1"}


@pytest.mark.parametrize("argv, environ, want", [
    ([], {}, None),  # one process: nothing to initialise
    (["--num-processes", "1"], {}, None),
    ([], {**SLURM, "SLURM_NTASKS": "1"}, None),  # a one-task SLURM job is a one-process run
    ([], {**SLURM, "SLURM_NTASKS": "2"}, Launch(None, None, None)),  # jax.distributed reads SLURM's variables
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "1", "--heartbeat-seconds", "9",
      "--connect-seconds", "8"], {}, Launch("h:1", 2, 1, 9, 8)),
    (["--num-processes", "2", "--process-id", "0"], {"JAX_COORDINATOR_ADDRESS": "h:1"}, Launch(None, 2, 0)),
])
def test_launch_from_flags_and_environment(argv, environ, want):
    assert launch(argv, environ) == want


@pytest.mark.parametrize("argv, needle", [
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "h:1"], "--process-id must be in 0..1, got 2"),
    (["--num-processes", "0"], "--num-processes must be >= 1"),
    (["--num-processes", "2", "--process-id", "0"], "needs --coordinator"),
    (["--coordinator", "h:1", "--num-processes", "2"], "needs --process-id"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--heartbeat-seconds", "0"],
     "--heartbeat-seconds must be >= 1"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0", "--connect-seconds", "0"],
     "--connect-seconds must be >= 1"),
])
def test_bad_launch_flags(argv, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        launch(argv, {})


@pytest.mark.parametrize("address, process, needle", [
    ("127.0.0.1:{port}", 1, "no coordinator answered at 127.0.0.1:{port} within 1 s (--connect-seconds)"),
    ("127.0.0.1", 1, "the coordinator address must be HOST:PORT, got '127.0.0.1'"),
    ("127.0.0.1:{port}", 0, "not all 2 processes joined within 1 s (--connect-seconds)"),
])
def test_processes_that_do_not_join_stop_with_one_line(address, process, needle, tmp_path):
    """A process whose coordinator never answers (nothing listens on the port), whose address is malformed, or
    (process 0, the coordinator) whose peers never join stops after --connect-seconds with one line, not with
    jax.distributed's SIGABRT and stack trace."""
    port = free_port()
    p = subprocess.run([sys.executable, "-m", "jaxgpt.train", "--coordinator", address.format(port=port),
                        "--num-processes", "2", "--process-id", str(process), "--connect-seconds", "1", "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=120,
                       env=train_env(tmp_path / "cache"))
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().startswith(f"error: {needle.format(port=port)}"), p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_sampler_rows_are_rows_of_the_whole_batch(default_corpus):
    sampler = BatchSampler(default_corpus, "train", 16, vocab_size=50304, seed=3)
    x, y = sampler.get(5, 8)
    rows = np.array([2, 3, 6, 7])
    xr, yr = sampler.get(5, 8, rows)
    np.testing.assert_array_equal(xr, x[rows])
    np.testing.assert_array_equal(yr, y[rows])


# ---------------------------------------------------------------------------------------------------
# 2 processes x 2 devices == 1 process x 4 devices; a killed process; resuming with 2 processes and with 1
# ---------------------------------------------------------------------------------------------------


def assert_close_run(run_dir: Path, ref_dir: Path) -> None:
    """The same steps logged, losses within LOSS_RTOL, the step-4 parameters and Adam moments within STATE_RTOL
    (loaded on this process's one device, as export and evaluation load a checkpoint)."""
    got, want = (MetricsLog(d / "metrics.jsonl").read() for d in (run_dir, ref_dir))
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    assert [r["step"] for r in got if r["kind"] == "train"] == [1, 2, 3, 4]
    for a, b in zip(got, want):
        for key in ("loss", "train_loss", "val_loss"):
            if key in b:
                assert abs(a[key] - b[key]) / b[key] < LOSS_RTOL, (key, a, b)
    _, params, opt_state = restore(run_dir, 4)
    _, ref_params, ref_opt = restore(ref_dir, 4)
    assert_trees_equal(params, ref_params, rtol=STATE_RTOL)
    assert_trees_equal(opt_state, ref_opt, rtol=STATE_RTOL)


@pytest.mark.parametrize("name", ["2x2", "2x2 fsdp"])
def test_two_processes_reproduce_one_process(runs, name):
    run = runs[name]
    assert_close_run(run.out, runs["1x4"].out)
    # process 0 alone prints the run and writes its files
    out0, out1 = run.log(0, "stdout"), run.log(1, "stdout")
    assert "2 processes x 4x cpu" in out0 and "TRAIN_METRICS: step=4" in out0 and "Final metrics" in out0
    assert "TRAIN_METRICS" not in out1 and "step " not in out1 and "Final metrics" not in out1
    assert (run.out / "loss.png").is_file()
    # process 0 wrote the manifest after process 1's shards were on disk: it covers them
    manifest = json.loads((run.out / "checkpoints" / "4" / MANIFEST).read_text())["files"]
    assert any("process_1" in name for name in manifest), sorted(manifest)


def assert_stopped_for_a_lost_peer(run: Finished, i: int) -> None:
    """Process i ended with jax.distributed's missed-heartbeat message, or with the one-line error of a
    collective that lost its connection to the dead process, whichever came first."""
    assert run.codes[i] != 0
    stderr = run.log(i, "stderr")
    assert ("another task died" in stderr
            or re.search(rf"^error: process {i} of 2 failed: JaxRuntimeError: .*another process may have stopped",
                         stderr, re.M)), stderr[-3000:]


def test_killed_process_stops_the_other(runs):
    killed = runs["killed"]
    assert killed.run.codes[1] == -signal.SIGKILL
    assert_stopped_for_a_lost_peer(killed.run, 0)
    assert killed.seconds < STOP_WITHIN


def test_an_error_in_one_process_stops_the_other(cache, default_corpus, tmp_path):
    """Process 1 finds no data folder: it prints its error and exits at once; process 0, which waits for it in a
    collective, ends within the heartbeat timeout."""
    run = start(cache, tmp_path / "run", *RECIPE, heartbeat=HEARTBEAT,
                only={0: ["--data", str(default_corpus)], 1: ["--data", str(tmp_path / "missing")]}).wait(timeout=120)
    assert run.codes[1] == 2, run.codes
    assert run.log(1, "stderr").strip().splitlines()[-1].startswith("error: process 1: data directory ")
    assert_stopped_for_a_lost_peer(run, 0)


def test_resume_with_two_processes_continues_exactly(runs):
    """The resumed run sets the damaged step 3 aside (process 0 renames it and reports it) and repeats the steps
    after its step-2 checkpoint with the very losses the killed run logged."""
    killed, resumed = runs["killed"], runs["2x2 fsdp"]
    stdout = resumed.log(0, "stdout")
    assert "resumed from" in stdout and "at step 2" in stdout, stdout
    report = "checkpoint step 3 is damaged"
    assert report in resumed.log(0, "stderr") and "moved it to 3.damaged" in resumed.log(0, "stderr")
    assert report not in resumed.log(1, "stderr")
    assert (resumed.out / "checkpoints" / "3.damaged").is_dir()
    repeated = [step for step in killed.losses if step > 2]
    assert repeated, killed.losses
    assert {step: resumed.losses()[step] for step in repeated} == {step: killed.losses[step] for step in repeated}


def test_two_process_checkpoint_resumes_on_one_process(runs, default_corpus, tmp_path):
    ref = runs["2x2"]
    out = tmp_path / "run"
    shutil.copytree(ref.out, out)
    shutil.rmtree(out / "checkpoints" / "4")
    train(build_config(parser().parse_args(["--data", str(default_corpus), *RECIPE, "--out", str(out)])), resume=True)
    assert_close_run(out, ref.out)
