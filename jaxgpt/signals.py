"""SIGINT and SIGTERM during training: stop after the current step with one checkpoint save.

The first signal only sets `requested`; the training loop finishes its step, saves once and stops. A second
signal prints that the step and its save are being finished; a third ends the process at once (exit 128 + the
signal's number) without waiting for the save. The handlers write with os.write: a handler runs between two
bytecodes of the main thread, which may be inside a print.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager that installs the handlers (main thread only; elsewhere it does nothing) and restores the
    previous ones on exit. `abort_note()` ends the message of the third signal (e.g. the last checkpoint)."""

    def __init__(self, abort_note: Callable[[], str]):
        self._abort_note = abort_note
        self.signum: int | None = None  # the first signal received
        self._count = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> str | None:
        """The name of the signal that asked the run to stop, or None."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1
        name = signal.Signals(signum).name
        if self._count == 1:
            self.signum = signum
            _say(f"{name}: stopping after this step, with a checkpoint save")
        elif self._count == 2:
            _say(f"{name} again: finishing this step and its checkpoint save; a third signal aborts it")
        else:
            try:
                sys.stdout.flush()
            except Exception:  # the main thread may be inside a write to it
                pass
            _say(f"{name} a third time: aborted without finishing the checkpoint save. {self._abort_note()}")
            os._exit(128 + signum)


def _say(line: str) -> None:
    os.write(2, f"\n{line}\n".encode())
