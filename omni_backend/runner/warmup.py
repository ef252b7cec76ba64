"""Warm-up at load: the configured shapes run through the model's real path before Triton marks it READY.

The first call of a shape pays one-time costs that a client would otherwise wait for: oneDNN
primitives on the CPU, CUDA context, cuBLAS/cuDNN heuristics and allocator growth on a GPU, and the
graphs of ``compile: regional``. ``initialize`` returns (and Triton reports READY) only after this.

Why not Triton's own ``model_warmup``: it sends whole requests through the dynamic batcher, which
cannot ask for "two requests in one transformer step" (step batching's second graph), needs sample
files for the prompt, and never reaches the ranks of a worker group. Here the warm-up requests go
through the same runner (``ModelRunner`` or the group's ``ParallelRunner``) that serves requests,
each size alone and as a pair, for a couple of steps, and their outputs are dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from omni_backend.config import ConfigError, ModelConfig
from omni_backend.engine.scheduler import StepPlan
from omni_backend.pipelines.base import PipelineStages
from omni_backend.request import DiffusionRequest

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "warm-up"


def warmup_sizes(config: ModelConfig, stages: PipelineStages) -> list[tuple[int, int]]:
    """``warmup_sizes`` as (height, width) pairs; with ``compile`` and none given, the default size."""
    sizes = config.acceleration.warmup_sizes
    if sizes:
        pairs = [(int(h), int(w)) for h, w in (size.split("x") for size in sizes.split(","))]
    elif config.acceleration.compile != "none":
        pairs = [(stages.defaults.height, stages.defaults.width)]
    else:
        return []
    multiple, limits = stages.defaults.size_multiple, config.limits
    for height, width in pairs:
        if height % multiple or width % multiple or not 0 < height * width <= limits.max_pixels:
            raise ConfigError(
                f"warmup_sizes: {height}x{width} is not a size this model serves "
                f"(multiples of {multiple}, at most {limits.max_pixels} pixels)"
            )
    return pairs


def _requests(stages: PipelineStages, height: int, width: int, count: int, encode: bool) -> list[DiffusionRequest]:
    """``count`` warm-up requests; with ``encode`` they carry prompts (the text encoders run too)."""
    requests = []
    for i in range(count):
        request, conditioning = _family_request(stages, height, width)
        if encode:  # distinct prompts: a prompt-embedding cache must not answer the second one
            request = replace(request, conditioning=None, prompt=f"{WARMUP_PROMPT} {i}")
        requests.append(replace(request, request_id=f"warm-up-{height}x{width}-{count}-{i}"))
    return requests


def _family_request(stages: PipelineStages, height: int, width: int) -> tuple[DiffusionRequest, dict]:
    try:
        return stages.warmup_request(height, width)
    except NotImplementedError as exc:
        raise ConfigError(f"warmup_sizes: {exc}") from None


def warm_up_runner(
    runner, stages: PipelineStages, sizes: list[tuple[int, int]], encode: bool, log: logging.Logger = logger
) -> None:
    """Each size alone and as a pair through ``runner`` (a ModelRunner or ParallelRunner), to the end.

    Batch 1 and batch >= 2 are what a shape needs (compiled graphs specialise a dimension of size 1;
    larger step batches reuse the second). A failure fails the load: a model that cannot serve its
    configured shapes should not turn READY.
    """
    for height, width in sizes:
        started = time.perf_counter()
        for count in (1, 2):
            requests = _requests(stages, height, width, count, encode)
            pending = {r.request_id for r in requests}
            plan = StepPlan(admitted=requests, running_ids=sorted(pending))
            while pending:
                result = runner.execute(plan)
                for output in result.finished + [o for d in result.decoding for o in d.outputs.result()]:
                    if output.error is not None:
                        raise RuntimeError(f"warm-up at {height}x{width} failed: {output.error}")
                    pending.discard(output.request_id)
                plan = StepPlan(running_ids=sorted(pending))
        log.info("warmed up %dx%d in %.2f s", height, width, time.perf_counter() - started)


def warm_up_text_encoder(stages: PipelineStages, sizes: list[tuple[int, int]], log: logging.Logger = logger) -> None:
    """The text-encoder stage: one and two prompts (its output does not depend on the size)."""
    if sizes:
        for count in (1, 2):
            stages.encode(_requests(stages, *sizes[0], count, encode=True))
        log.info("warmed up the text encoders")


def warm_up_vae(stages: PipelineStages, sizes: list[tuple[int, int]], log: logging.Logger = logger) -> None:
    """The VAE stage: one and two latents of each size."""
    for height, width in sizes:
        try:
            latents = stages.warmup_latents(height, width)
        except NotImplementedError as exc:
            raise ConfigError(f"warmup_sizes: {exc}") from None
        for count in (1, 2):
            stages.decode([latents] * count)
        log.info("warmed up the VAE for %dx%d", height, width)
