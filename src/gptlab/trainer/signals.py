"""SIGTERM / SIGINT handling for ``gptlab train``, importable without torch.

``gptlab train`` installs the handler before it imports anything heavy, so a signal during start-up
(imports, data preparation, model build) is recorded and the run stops cleanly before its first step
instead of dying with -15.
"""

from __future__ import annotations

import signal
import sys
from typing import Any


class StopFlag:
    """Set by SIGTERM / SIGINT: finish the current step, checkpoint, exit 0. A second signal aborts."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        import threading

        if self._previous or threading.current_thread() is not threading.main_thread():
            return  # installed already, or not the main thread (signal handlers can only be set there)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"\n{self.reason}: stopping after this step (checkpoint, then exit)", file=sys.stderr, flush=True)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
