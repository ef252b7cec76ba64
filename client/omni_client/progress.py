"""A plain-text progress bar redrawn in place (``\\r``), for ``omni-client generate --stream``."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_elapsed(seconds: float) -> str:
    """Returns ``12.3s`` below a minute, else ``m:ss`` (``h:mm:ss`` from an hour)."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def render_progress(step: int, total: int, elapsed: float, width: int = 30) -> str:
    """Renders one line of the progress bar, e.g. ``[#########---------------------]  3/10 steps 4.2s``.

    Args:
        step: Steps done (clamped to ``0..total``).
        total: Total steps (values < 1 are taken as 1).
        elapsed: Seconds since the start.
        width: Number of cells of the bar.

    Returns:
        The line, without ``\\r`` or newline.
    """
    total = max(int(total), 1)
    step = min(max(int(step), 0), total)
    filled = width * step // total
    digits = len(str(total))
    return f"[{'#' * filled}{'-' * (width - filled)}] {step:>{digits}}/{total} steps {format_elapsed(elapsed)}"


class ProgressBar:
    """Draws :func:`render_progress` lines in place on a text stream (stderr by default).

    Args:
        stream: Where to draw.
        width: Number of cells of the bar.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = time.perf_counter()
        self._shown = 0  # length of the line on screen, 0 when none

    def update(self, step: int, total: int) -> None:
        """Redraws the bar at ``step`` of ``total``."""
        line = render_progress(step, total, time.perf_counter() - self.start, self.width)
        self.stream.write("\r" + line.ljust(self._shown))
        self.stream.flush()
        self._shown = len(line)

    def close(self) -> None:
        """Ends the bar's line (if one was drawn); idempotent."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = 0
