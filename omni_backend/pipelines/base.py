"""The pipeline stage API every family implements (DESIGN section 2).

The one-model pipeline, the ensemble stages and the step-batching engine all drive a family
through these five verbs, so a family is written once:

    encode(requests)            -> one Conditioning per request (text-encoder stage)
    prepare(request, cond)      -> DenoiseState: latents, timesteps, its own scheduler
    denoise(states)             -> ONE transformer call for the current step of many requests
    step(states, noise_preds)   -> scheduler update per request
    decode(latents)             -> uint8 pixels (VAE stage)

``output_latents(state)`` hands the finished latents over, in the layout ``decode`` takes:
that tensor is what travels between the ensemble's transformer and VAE stages.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from omni_backend.config import RequestLimits
from omni_backend.request import (
    DiffusionRequest,
    SamplingDefaults,
    StageTimings,
    parse_prompt_request,
    parse_sampling_params,
)

# Per-request text conditioning, keyed by the family's tensor names (no batch dimension).
Conditioning = dict[str, torch.Tensor]


class Component(enum.Flag):
    """Which parts of a pipeline a Triton model loads (an ensemble stage loads one)."""

    TEXT_ENCODER = enum.auto()
    TRANSFORMER = enum.auto()
    VAE = enum.auto()
    ALL = TEXT_ENCODER | TRANSFORMER | VAE


@dataclass
class DenoiseState:
    """Engine-owned state of one request between steps. Families subclass it for their extras."""

    request: DiffusionRequest
    latents: torch.Tensor  # the family's working layout, batch dimension 1
    timesteps: torch.Tensor  # the full schedule of this request
    scheduler: Any  # this request's own scheduler instance (schedulers are stateful)
    step_index: int = 0  # next step to run
    timings: StageTimings = field(default_factory=StageTimings)

    @property
    def finished(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def preview_due(self) -> bool:
        """Whether the step being taken now sends a preview (the last step sends the output instead)."""
        every = self.request.preview_every
        step = self.step_index + 1  # 1-based
        return every > 0 and step % every == 0 and step < len(self.timesteps)


class PipelineStages(ABC):
    """A diffusion family on the stage API. Subclasses live in ``pipelines/<family>.py``."""

    # The family's own config.pbtxt options (a dataclass), or None.
    options_cls: ClassVar[type | None] = None
    # Name of the decoded output: "image" (uint8 [H, W, 3]) or "video" (uint8 [frames, H, W, 3]); DESIGN section 4.
    output_name: ClassVar[str] = "image"
    # Name of a streaming model's preview output: "preview" for images, "preview_video" for videos
    # (a tensor name never changes rank, as image/video in DESIGN section 4).
    preview_name: ClassVar[str] = "preview"
    # Set by omni_backend.runner.acceleration when cache_backend is configured; ``denoise`` calls
    # ``step_cache.forward(rows, inputs)`` instead of the transformer (``forward(rows, inputs, expert)`` for
    # one of several transformers; omni_backend/cache/step_cache.py).
    step_cache: Any = None
    device: torch.device  # where the stages compute (set by ``load``; offload loads to the host first)

    # ------------------------------------------------------------------ acceleration (optional per family)

    def module_groups(self) -> dict[str, list[torch.nn.Module]]:
        """The loaded modules per stage: ``text_encoder`` (encode), ``transformer`` (denoise), ``vae`` (decode)."""
        raise NotImplementedError(f"{type(self).__name__} does not support offload or VAE options")

    def encode_key(self, request: DiffusionRequest) -> Hashable:
        """Everything that decides ``encode``'s output for ``request``: the prompt-embedding cache key."""
        raise NotImplementedError(f"{type(self).__name__} does not support the prompt-embedding cache")

    def step_cache_adapter(self) -> Any:
        """The family's StepCacheAdapter (omni_backend/cache/base.py)."""
        raise NotImplementedError(f"{type(self).__name__} does not support step caches")

    def lora_adapter(self) -> Any:
        """The family's LoraAdapter over its transformer (omni_backend/lora/registry.py)."""
        raise NotImplementedError(f"{type(self).__name__} does not support LoRA adapters")

    def warmup_request(self, height: int, width: int) -> tuple[DiffusionRequest, Conditioning]:
        """A short request of this size with placeholder conditioning, run at load (runner/warmup.py)."""
        raise NotImplementedError(f"{type(self).__name__} does not support warm-up")

    def warmup_latents(self, height: int, width: int) -> torch.Tensor:
        """Placeholder latents of this size in the layout ``decode`` takes, to warm the VAE stage."""
        raise NotImplementedError(f"{type(self).__name__} does not support warm-up of its VAE stage")

    def release(self, request_ids: Sequence[str]) -> None:
        """Forget per-request acceleration state of requests that ended (finished, failed, aborted)."""
        if self.step_cache is not None:
            self.step_cache.release(request_ids)

    @classmethod
    @abstractmethod
    def load(
        cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device, options: Any
    ) -> PipelineStages:
        """Load only ``components`` of ``checkpoint`` with diffusers' ``from_pretrained``."""

    @property
    @abstractmethod
    def defaults(self) -> SamplingDefaults:
        """Defaults and size step of this checkpoint."""

    def parse_request(
        self, request_id: str, arrays: Mapping[str, np.ndarray], limits: RequestLimits
    ) -> DiffusionRequest:
        """A request of the one-model pipeline or the encoder stage (InvalidRequestError if bad)."""
        return parse_prompt_request(request_id, arrays, self.defaults, limits)

    def parse_conditioned_request(
        self, request_id: str, arrays: Mapping[str, np.ndarray], limits: RequestLimits
    ) -> DiffusionRequest:
        """A request of the transformer stage: sampling params and the encoder stage's conditioning."""
        return DiffusionRequest(
            request_id=request_id,
            params=parse_sampling_params(arrays, self.defaults, limits),
            conditioning=self.conditioning_from_arrays(arrays),
        )

    @abstractmethod
    def batch_key(self, request: DiffusionRequest) -> Hashable:
        """Requests with equal keys can share one transformer call."""

    @abstractmethod
    def encode(self, requests: Sequence[DiffusionRequest]) -> list[Conditioning]:
        """Encode the prompts of many requests in one text-encoder pass."""

    @abstractmethod
    def conditioning_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Conditioning:
        """Validate conditioning received from the text-encoder stage (InvalidRequestError if bad)."""

    @abstractmethod
    def prepare(self, request: DiffusionRequest, conditioning: Conditioning) -> DenoiseState:
        """Initial latents (seeded like diffusers), timesteps and a scheduler of the request's own."""

    @abstractmethod
    def denoise(self, states: Sequence[DenoiseState]) -> list[torch.Tensor]:
        """One transformer call for the current step of every state; one noise prediction each."""

    @torch.inference_mode()
    def step(self, states: Sequence[DenoiseState], noise_preds: Sequence[torch.Tensor]) -> None:
        """Advance each request's own scheduler by one step."""
        for state, noise_pred in zip(states, noise_preds, strict=True):
            t = state.timesteps[state.step_index]
            state.latents = state.scheduler.step(noise_pred, t, state.latents, return_dict=False)[0]
            state.step_index += 1

    @abstractmethod
    def predicted_clean_latents(self, state: DenoiseState, noise_pred: torch.Tensor) -> torch.Tensor:
        """The clean latents the model predicts at the current step (for previews), as ``output_latents``."""

    @abstractmethod
    def output_latents(self, state: DenoiseState) -> torch.Tensor:
        """The finished latents in the layout ``decode`` takes (batch dimension 1)."""

    @abstractmethod
    def latents_from_array(self, array: np.ndarray | None, limits: RequestLimits) -> torch.Tensor:
        """Validate latents received from the transformer stage (InvalidRequestError if bad)."""

    @abstractmethod
    def decode(self, latents: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """Decode latents of equal shape in one VAE pass; uint8 [H, W, 3] (video: [frames, H, W, 3]) each."""


def load_pipeline(
    pipeline_cls: Any,
    checkpoint: str,
    components: Component,
    dtype: torch.dtype,
    device: torch.device,
    text_modules: Sequence[str] = ("text_encoder", "tokenizer"),
    transformer_modules: Sequence[str] = ("transformer",),
    loaded: Mapping[str, Any] | None = None,
) -> Any:
    """``pipeline_cls.from_pretrained`` loading only ``components`` (an ensemble stage loads one), on ``device``.

    ``loaded``: modules the family builds itself, handed to ``from_pretrained`` as they are.
    """
    skip: dict[str, None] = {}
    if Component.TEXT_ENCODER not in components:
        skip.update(dict.fromkeys(text_modules))
    if Component.TRANSFORMER not in components:
        skip.update(dict.fromkeys(transformer_modules))
    if Component.VAE not in components:
        skip["vae"] = None
    pipe = pipeline_cls.from_pretrained(checkpoint, dtype=dtype, **skip, **(loaded or {}))
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
