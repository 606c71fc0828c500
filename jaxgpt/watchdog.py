"""A watchdog for the training loop: a step that takes far longer than the recent ones ends the process.

A hung step (a deadlock in a library, a device that stops answering) otherwise blocks forever. The loop calls
`beat()` each time a step has finished; a background thread compares the time since the last beat with the median
of the last `window` intervals between beats. Past `factor` times that median and at least `min_seconds`, it prints
one line, then every Python thread's stack (faulthandler), and exits with code EXIT_CODE. Checkpoints are committed
atomically, so the last one on disk is intact and `--resume` continues from it.

Not timed: the steps before the first beat (compilation), the first `MIN_SAMPLES` intervals (no median yet), and
what the loop runs inside `paused()` (evaluation, checkpoint saves).
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

EXIT_CODE = 3
MIN_SAMPLES = 3


@dataclass(frozen=True)
class WatchdogLimits:
    """A step stalls when it has run for more than `factor` x the median of the last `window` steps and at least
    `min_seconds`; `min_seconds` <= 0 turns the watchdog off."""

    factor: float = 10.0
    min_seconds: float = 300.0
    window: int = 20


class Watchdog:
    """Ends the process when the loop's next `beat()` is overdue (see the module docstring); `context()` gives
    the end of the stall message (e.g. where the last checkpoint is)."""

    def __init__(self, limits: WatchdogLimits, context: Callable[[], str]):
        self.limits, self._context = limits, context
        self._intervals: deque[float] = deque(maxlen=limits.window)
        self._last: float | None = None  # time of the last beat; None: nothing is timed
        self._step = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = None
        if limits.min_seconds > 0:
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """Step `step` has finished."""
        now = time.monotonic()
        with self._lock:
            if self._last is not None:
                self._intervals.append(now - self._last)
            self._last, self._step = now, step

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing inside is timed; the next interval starts when it ends."""
        with self._lock:
            timed, self._last = self._last is not None, None
        try:
            yield
        finally:
            with self._lock:
                self._last = time.monotonic() if timed else None

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()

    def _limit(self) -> tuple[float, float] | None:
        """-> (median interval, the limit) once there are enough intervals, else None."""
        if len(self._intervals) < MIN_SAMPLES:
            return None
        median = statistics.median(self._intervals)
        return median, max(self.limits.min_seconds, self.limits.factor * median)

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.limits.min_seconds / 10)):
            with self._lock:
                last, step, limit = self._last, self._step, self._limit()
            if last is None or limit is None:
                continue
            elapsed = time.monotonic() - last
            if elapsed > limit[1]:
                self._stall(step, elapsed, *limit)

    def _stall(self, step: int, elapsed: float, median: float, limit: float) -> None:
        try:
            sys.stdout.flush()
        except Exception:  # the main thread may be inside a write to it
            pass
        sys.stderr.write(
            f"watchdog: no step has finished for {elapsed:.0f} s since step {step}, over {self.limits.factor:g} x "
            f"the median step time ({median:.3g} s) and {self.limits.min_seconds:g} s; stopping. {self._context()} Every thread's "
            "stack follows.\n"
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_CODE)
