"""The launcher tells the models it is shutting down, and by when their requests must be answered.

Triton 2.51 gives a model no notice of shutdown: on SIGTERM it waits ``--exit-timeout-secs`` for
in-flight requests, then exits without finalizing the models still busy, and their clients see a
dropped connection. So the launcher, before forwarding SIGTERM, writes a drain file holding a
deadline (a little inside the exit timeout); the path reaches every stub through the environment
variable ``OMNI_DRAIN_FILE``. The engine polls it between steps: from then on it refuses new
requests, fails the ones still queued, lets running ones finish, and fails whatever still runs at
the deadline, so every client gets an answer and Triton can finalize the models in time.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

ENV = "OMNI_DRAIN_FILE"
POLL_S = 0.25  # how often the engine looks at the file


def request_drain(path: str | os.PathLike[str], deadline: float) -> None:
    """Ask the models to drain by ``deadline`` (``time.time()`` seconds); atomic for the readers."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps({"deadline": deadline}))
    os.replace(tmp, target)


class DrainSignal:
    """Read side, in the model: ``deadline()`` is None until the launcher asks to drain."""

    def __init__(self, path: str | os.PathLike[str] | None):
        self.path = Path(path) if path else None
        self._deadline: float | None = None
        self._next_poll = 0.0

    @classmethod
    def from_env(cls) -> DrainSignal:
        return cls(os.environ.get(ENV))

    def deadline(self) -> float | None:
        """The drain deadline as ``time.monotonic()``, once asked; polls the file at most every POLL_S."""
        if self._deadline is not None or self.path is None:
            return self._deadline
        now = time.monotonic()
        if now < self._next_poll:
            return None
        self._next_poll = now + POLL_S
        try:
            wall_deadline = float(json.loads(self.path.read_text())["deadline"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not asked yet (or mid-write: the next poll sees it)
        self._deadline = now + (wall_deadline - time.time())
        return self._deadline
