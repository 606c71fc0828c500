"""Suite-wide: which device JAX runs on, and where a hung test hangs.

The suite's unmarked tests are CPU tests (fp32 parity at 1e-5, Pallas kernels in the interpreter, virtual CPU
devices); on a GPU, XLA's TF32 matmuls and the compiled kernels would fail their bounds. So JAX runs on the CPU
unless the run selects the `gpu` marker (`pytest -m gpu`) or JAX_PLATFORMS is set (e.g. `JAX_PLATFORMS=cuda pytest
tests/test_fused_layer_norm.py` checks the compiled kernels against XLA on a GPU).

pytest-timeout stops a test after `timeout` seconds (pyproject.toml, or the test's timeout mark) and its worker
exits; under xdist the stack dump it prints is lost with the worker's captured output. So each test also arms
faulthandler to write every thread's stack to a file in .pytest_cache/hangs/ a minute before that (the file is
deleted when the test ends), and the controller prints the files it finds at the end of the run.
"""

import contextlib
import faulthandler
import os
import re
from collections.abc import Callable
from pathlib import Path

import jax
import pytest

HANGS = Path(__file__).resolve().parent / ".pytest_cache" / "hangs"


def pytest_configure(config: pytest.Config) -> None:
    if "JAX_PLATFORMS" not in os.environ and not re.search(r"(?<!not )\bgpu\b", config.option.markexpr or ""):
        os.environ["JAX_PLATFORMS"] = "cpu"  # xdist workers and subprocesses inherit it
        jax.config.update("jax_platforms", "cpu")
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        HANGS.mkdir(parents=True, exist_ok=True)
        for old in HANGS.glob("*.txt"):
            old.unlink()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    marker = item.get_closest_marker("timeout")
    try:
        timeout = float(marker.args[0] if marker else item.config.getini("timeout") or 0)
    except ValueError:  # pytest-timeout is not installed
        timeout = 0.0
    if timeout <= 120:
        yield
        return
    HANGS.mkdir(parents=True, exist_ok=True)
    path = HANGS / f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}.txt"
    with open(path, "w") as log:
        log.write(f"{item.nodeid} was still running after {timeout - 60:.0f} s; every thread's stack:\n")
        log.flush()
        faulthandler.dump_traceback_later(timeout - 60, file=log)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
    path.unlink(missing_ok=True)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or not HANGS.exists():
        return
    for path in sorted(HANGS.glob("*.txt")):
        text = path.read_text()
        if text.count("\n") > 1:  # a stack was dumped (a bare header is a test another pytest is still running)
            terminalreporter.section(f"hung test ({path.name})")
            terminalreporter.write(text)


TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.fixture
def cuda_module() -> Callable[..., str]:
    """cuda_module(f, *shapes) -> the StableHLO text of jit(f) exported for CUDA, Triton calls allowed: a check that
    kernels lower (compiling them needs a GPU). The target is an abstract H100 (JAX >= 0.11 reads the GPU's kind
    from the abstract mesh when no GPU is present; earlier versions assume sm_90)."""

    def export(f: Callable, *shapes: jax.ShapeDtypeStruct) -> str:
        hopper = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=hopper)
        no_gpu = not any(d.platform == "gpu" for d in jax.devices())
        with jax.sharding.use_abstract_mesh(mesh) if no_gpu else contextlib.nullcontext():
            exported = jax.export.export(jax.jit(f), platforms=["cuda"],
                                         disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])
            return exported(*shapes).mlir_module()

    return export
