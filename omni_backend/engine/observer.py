"""What the engine reports as it runs (the Triton layer turns it into Prometheus metrics)."""

from __future__ import annotations


class EngineObserver:
    """No-op base: subclasses override what they record. Called on the engine thread."""

    def on_admitted(self, queue_wait_s: float) -> None:
        """A request left the queue and joins the running batch."""

    def on_step(self, batch_size: int, running: int) -> None:
        """One transformer call served ``batch_size`` requests; ``running`` are in flight after it."""

    def on_finished(self, latency_s: float) -> None:
        """A request completed successfully, ``latency_s`` after it arrived."""
