"""Stop a run cleanly on SIGINT or SIGTERM: the current step finishes, then the run saves and stops."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """While entered, SIGINT and SIGTERM (Ctrl-C, a scheduler's preemption) ask the run to stop after its current
    step instead of killing it mid-update; a second signal stops at once (``KeyboardInterrupt``)."""

    def __init__(self) -> None:
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Take SIGINT and SIGTERM over (a host whose hooks start and end the run, e.g. detectron2's)."""
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def uninstall(self) -> None:
        """Give the process's own handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __enter__(self) -> StopRequests:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._signal is not None:
            raise KeyboardInterrupt
        self._signal = signum

    def received(self, device: torch.device) -> int | None:
        """The stop signal received, if any. Under DDP every rank calls it after each step and gets the one any rank
        received, so that all stop after the same step."""
        if not (dist.is_available() and dist.is_initialized()):
            return self._signal
        flag = torch.tensor(self._signal or 0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag) or None
