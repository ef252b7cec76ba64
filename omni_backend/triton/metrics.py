"""Engine metrics as Triton custom metrics (``pb_utils.MetricFamily``), served on Triton's /metrics."""

from __future__ import annotations

from typing import ClassVar

import triton_python_backend_utils as pb_utils

from omni_backend.engine.observer import AccelerationObserver, EngineObserver

_SECONDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
_BATCH = [1, 2, 4, 8, 16, 32, 64]


_families: list = []  # a Metric fails once its MetricFamily is garbage-collected: keep them for the process


def _metric(name: str, description: str, kind: int, labels: dict[str, str], buckets: list | None = None):
    family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
    _families.append(family)
    return family.Metric(labels=labels, buckets=buckets) if buckets is not None else family.Metric(labels=labels)


class TritonEngineMetrics(EngineObserver):
    """The engine's events as Prometheus series labelled ``model``."""

    def __init__(self, model_name: str):
        labels = {"model": model_name}
        histogram, gauge, counter = (
            pb_utils.MetricFamily.HISTOGRAM,
            pb_utils.MetricFamily.GAUGE,
            pb_utils.MetricFamily.COUNTER,
        )
        self.queue_wait = _metric(
            "omni_queue_wait_seconds", "Time requests waited before joining a batch", histogram, labels, _SECONDS
        )
        self.running = _metric("omni_running_requests", "Requests in flight in the engine", gauge, labels)
        self.steps = _metric("omni_denoise_steps_total", "Denoising steps taken, summed over requests", counter, labels)
        self.batch_size = _metric(
            "omni_step_batch_size", "Requests served by one transformer call", histogram, labels, _BATCH
        )
        self.latency = _metric(
            "omni_request_latency_seconds", "Arrival to completion of successful requests", histogram, labels, _SECONDS
        )

    def on_admitted(self, queue_wait_s: float) -> None:
        self.queue_wait.observe(queue_wait_s)

    def on_step(self, batch_size: int) -> None:
        self.steps.increment(batch_size)
        self.batch_size.observe(batch_size)

    def on_running(self, running: int) -> None:
        self.running.set(running)

    def on_finished(self, latency_s: float) -> None:
        self.latency.observe(latency_s)


class TritonAccelerationMetrics(AccelerationObserver):
    """Step cache, prompt-embedding cache and offload counters, labelled ``model``.

    Step-cache counts are per transformer row (a true-CFG request takes two rows per step).
    """

    _SERIES: ClassVar[dict[str, str]] = {
        "omni_cache_skipped_steps_total": "Transformer rows a step cache served without the full transformer",
        "omni_cache_computed_steps_total": "Transformer rows a step cache ran through the full transformer",
        "omni_prompt_embed_cache_hits_total": "Prompts answered by the prompt-embedding cache",
        "omni_prompt_embed_cache_misses_total": "Prompts sent to the text encoders by the prompt-embedding cache",
        "omni_offload_bytes_total": "Bytes of weights copied from host to device by offloading",
    }

    def __init__(self, model_name: str):
        labels, counter = {"model": model_name}, pb_utils.MetricFamily.COUNTER
        self._metrics = {name: _metric(name, text, counter, labels) for name, text in self._SERIES.items()}
        self._lora_resident = _metric(
            "omni_lora_resident", "LoRA adapters loaded on the transformer", pb_utils.MetricFamily.GAUGE, labels
        )

    def _add(self, name: str, value: int) -> None:
        if value:
            self._metrics[name].increment(value)

    def on_cache_steps(self, skipped: int, computed: int) -> None:
        self._add("omni_cache_skipped_steps_total", skipped)
        self._add("omni_cache_computed_steps_total", computed)

    def on_prompt_cache(self, hits: int, misses: int) -> None:
        self._add("omni_prompt_embed_cache_hits_total", hits)
        self._add("omni_prompt_embed_cache_misses_total", misses)

    def on_offload_bytes(self, moved: int) -> None:
        self._add("omni_offload_bytes_total", moved)

    def on_lora_resident(self, resident: int) -> None:
        self._lora_resident.set(resident)
