"""Graceful stop on SIGINT / SIGTERM: the first signal sets a flag the training loop polls
(it finishes the step, writes a checkpoint and returns); a second one aborts at once.

    with StopOnSignal() as stop:
        while ...:
            train_step()
            if stop.requested:          # "SIGINT" / "SIGTERM" / None
                save(); break
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["StopOnSignal"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager installing the handlers (main thread only; elsewhere it does nothing)
    and restoring the previous ones on exit. ``requested`` names the first signal seen;
    ``announce=False`` keeps the first signal's message off stderr."""

    def __init__(self, message: str = "finishing the current step and saving a checkpoint",
                 announce: bool = True) -> None:
        self.requested: str | None = None
        self.message = message
        self.announce = announce  # print the message (under torchrun: rank 0 only)
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # the second signal: stop now
            raise KeyboardInterrupt(f"second {name}")
        self.requested = name
        if not self.announce:
            return
        # os.write: safe even if the main thread was inside a print to stderr
        os.write(2, f"\nmoelab: {name} received: {self.message} (press Ctrl-C again to "
                    "abort at once)\n".encode())

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in _SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()
