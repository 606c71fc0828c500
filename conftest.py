"""Suite-wide: where a hung test hangs.

pytest-timeout stops a test after `timeout` seconds (pyproject.toml, or the test's timeout mark) and its worker
exits; under xdist the stack dump it prints is lost with the worker's captured output. So each test also arms
faulthandler to write every thread's stack to a file in .pytest_cache/hangs/ a minute before that (the file is
deleted when the test ends), and the controller prints the files it finds at the end of the run.
"""

import faulthandler
import os
from pathlib import Path

import pytest

HANGS = Path(__file__).resolve().parent / ".pytest_cache" / "hangs"


def pytest_configure(config: pytest.Config) -> None:
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
    path.unlink()


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if hasattr(config, "workerinput") or not HANGS.exists():
        return
    for path in sorted(HANGS.glob("*.txt")):
        terminalreporter.section(f"hung test ({path.name})")
        terminalreporter.write(path.read_text())
