"""SIGTERM / SIGINT (preemption, Ctrl-C) as a request to stop at the next step boundary.

Inside ``with StopSignals() as stop:`` the two signals only set ``stop.signum``; the training loop
checks it between steps, writes a checkpoint and returns. A second signal gives up waiting: the
previous handlers are restored and the signal is delivered again (Ctrl-C twice stops at once).
The previous handlers are restored on exit. Outside the main thread (where Python cannot install
handlers) it does nothing. Processes forked meanwhile (data-loader workers) inherit the handlers and
ignore the signals: the main process finishes its step and shuts them down.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("swav_fast")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: ``signum`` is set (and nothing else happens) when SIGTERM or SIGINT arrives."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked worker: the main process decides
            return
        if self.signum is not None:
            log.warning("second %s: stopping now", signal.Signals(signum).name)
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        log.warning("received %s: writing a checkpoint and stopping after the current step "
                    "(send it again to stop at once)", self.name)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()
