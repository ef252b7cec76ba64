"""Applies a model's ``AccelerationConfig`` to its loaded pipeline stages, once, at load.

Order matters: offload first (it decides where weights live), then the step cache (its hooks run
inside the offloaded transformer), compilation (of the blocks, after cache hooks are in place),
and last the prompt-embedding cache around ``encode`` so that a hit never onloads the text
encoders. Compiled graphs are built by the warm-up the Triton model runs next (runner/warmup.py).
Stage verbs are wrapped on the instance, so the runner, the ensemble stages and the engine call the
same ``encode`` / ``denoise`` / ``decode`` as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_backend.cache.prompt_cache import PromptEmbedCache
from omni_backend.cache.step_cache import StepCaches, apply_step_cache
from omni_backend.config import ConfigError, ModelConfig
from omni_backend.engine.observer import AccelerationObserver
from omni_backend.offload.offload import ModelOffloader, _nbytes, apply_layerwise_offload
from omni_backend.pipelines.base import PipelineStages

# Which stage verb runs which group of modules (PipelineStages.module_groups).
_STAGE_GROUPS = {"encode": "text_encoder", "denoise": "transformer", "decode": "vae"}


@dataclass
class Acceleration:
    """What was applied (tests and benchmarks read the counters)."""

    offloader: ModelOffloader | None = None
    step_cache: StepCaches | None = None
    prompt_cache: PromptEmbedCache | None = None


def apply_acceleration(
    stages: PipelineStages, config: ModelConfig, device: torch.device, observer: AccelerationObserver
) -> Acceleration:
    accel = config.acceleration
    applied = Acceleration()
    try:
        if accel.offload != "none":
            applied.offloader = _apply_offload(stages, accel.offload, accel.offload_window, device, observer)
        if accel.vae_tiling or accel.vae_slicing:
            _apply_vae_options(stages, accel.vae_tiling, accel.vae_slicing)
        wants_transformer = config.step_cache is not None or accel.compile != "none"
        transformers = stages.module_groups().get("transformer", []) if wants_transformer else []
        if config.step_cache is not None and transformers:  # one cache per expert of a mixture (Wan2.2 A14B)
            adapter = stages.step_cache_adapter()
            applied.step_cache = apply_step_cache(transformers, adapter, config.step_cache, observer)
            stages.step_cache = applied.step_cache
        if accel.compile == "regional":
            for transformer in transformers:  # every expert of a mixture (Wan2.2 A14B)
                transformer.compile_repeated_blocks(fullgraph=False, dynamic=True)
        if accel.enable_prompt_embed_cache and "text_encoder" in stages.module_groups():
            cache = PromptEmbedCache(accel.prompt_embed_cache_size, stages.encode_key, observer)
            inner = stages.encode
            stages.encode = lambda requests: cache.encode(requests, inner)  # type: ignore[method-assign]
            applied.prompt_cache = cache
    except NotImplementedError as exc:  # the family lacks a hook the config asks for
        raise ConfigError(f"{config.family}: {exc}") from None
    return applied


def _apply_offload(
    stages: PipelineStages, mode: str, window: int, device: torch.device, observer: AccelerationObserver
) -> ModelOffloader:
    groups = stages.module_groups()
    if mode == "layerwise" and "transformer" in groups:
        transformers = groups["transformer"]
        # the hooks move the blocks; the offloader's transformer group stays empty so that denoising
        # still evicts the text encoders (without it they stayed on the device until decode)
        groups["transformer"] = []
        for transformer in transformers:  # every expert of a mixture (Wan2.2 A14B) sweeps its own window
            apply_layerwise_offload(transformer, device, window)
        size = _nbytes(transformers)
        inner_denoise = stages.denoise

        def denoise_layerwise(states):  # every transformer call sweeps all blocks through the window once
            preds = inner_denoise(states)
            observer.on_offload_bytes(size)
            return preds

        stages.denoise = denoise_layerwise  # type: ignore[method-assign]
    offloader = ModelOffloader(groups, device, observer)
    for verb, group in _STAGE_GROUPS.items():
        if group in groups:
            setattr(stages, verb, offloader.wrap(group, getattr(stages, verb)))
    return offloader


def _apply_vae_options(stages: PipelineStages, tiling: bool, slicing: bool) -> None:
    for vae in stages.module_groups().get("vae", []):
        if tiling:
            vae.enable_tiling()
        if slicing:
            vae.enable_slicing()
