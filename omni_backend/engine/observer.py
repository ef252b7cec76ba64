"""What the engine reports as it runs (the Triton layer turns it into Prometheus metrics)."""

from __future__ import annotations


class EngineObserver:
    """No-op base: subclasses override what they record. Called on the engine thread."""

    def on_admitted(self, queue_wait_s: float) -> None:
        """A request left the queue and joins the running batch."""

    def on_step(self, batch_size: int) -> None:
        """One transformer call served ``batch_size`` requests."""

    def on_running(self, running: int) -> None:
        """``running`` requests are in flight now (after a step, a cancellation, a timeout)."""

    def on_finished(self, latency_s: float) -> None:
        """A request completed successfully, ``latency_s`` after it arrived."""


class AccelerationObserver:
    """No-op base for what the acceleration features report (step caches, prompt cache, offload)."""

    def on_cache_steps(self, skipped: int, computed: int) -> None:
        """A step cache served ``skipped`` rows from cache and ran the transformer for ``computed`` rows."""

    def on_prompt_cache(self, hits: int, misses: int) -> None:
        """The prompt-embedding cache answered ``hits`` prompts and sent ``misses`` to the text encoders."""

    def on_offload_bytes(self, moved: int) -> None:
        """Offloading moved ``moved`` bytes of weights between host and device."""

    def on_lora_resident(self, resident: int) -> None:
        """``resident`` LoRA adapters are loaded on the transformer now."""
