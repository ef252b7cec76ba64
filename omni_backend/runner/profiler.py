"""A torch.profiler trace of the engine's steps, started and stopped by control ops.

One ``StepProfiler`` per process (each rank of a worker group has its own): ``start`` begins
recording CPU (and CUDA, when available) activity, ``step`` is called after every engine step and
stops the trace by itself after ``max_steps`` so a forgotten trace cannot fill the disk, ``stop``
writes the Chrome trace ``{directory}/{name}-rank{rank}-{timestamp}.json`` (chrome://tracing,
Perfetto) and returns the paths written since ``start``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)


class StepProfiler:
    def __init__(self, directory: str, name: str, rank: int = 0):
        self.directory = Path(directory)
        self.name = name
        self.rank = rank
        self._profile: profile | None = None
        self._steps_left = 0
        self._written: list[str] = []  # traces of this session (an automatic stop writes one too)

    @property
    def active(self) -> bool:
        return self._profile is not None

    def start(self, max_steps: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._profile = profile(activities=activities, record_shapes=True)
        self._profile.start()
        self._steps_left = max_steps
        self._written = []
        logger.info("profiling started (at most %d steps) -> %s", max_steps, self.directory)

    def step(self) -> None:
        if self._profile is None:
            return
        self._steps_left -= 1
        if self._steps_left <= 0:
            logger.info("profiling stopped after its step limit")
            self._finish()

    def stop(self) -> list[str]:
        """Stop (if still running) and return the traces written since ``start``."""
        if self._profile is not None:
            self._finish()
        written, self._written = self._written, []
        return written

    def _finish(self) -> None:
        assert self._profile is not None
        prof, self._profile = self._profile, None
        prof.stop()
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
        path = self.directory / f"{self.name}-rank{self.rank}-{stamp}.json"
        prof.export_chrome_trace(str(path))
        os.chmod(path, 0o640)
        self._written.append(str(path))
        logger.info("profile trace written to %s", path)
