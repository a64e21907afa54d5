"""Stopping a run cleanly on SIGINT/SIGTERM: the loop finishes the step and writes a checkpoint."""
from __future__ import annotations

import signal
import threading


class StopFlag:
    """Within the `with` block, SIGINT/SIGTERM set `requested` instead of killing the run
    (in the main thread only; elsewhere signals keep their handlers)."""

    requested = False

    def __enter__(self):
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
