"""Wan2.2 image-to-video on the stage API, over diffusers' ``WanImageToVideoPipeline`` components.

Wan2.2 text-to-video (``wan.py``, whose stages this extends: two experts split at ``boundary_ratio``,
classic CFG with a per-expert scale) conditioned on ``input_image`` the way the A14B I2V checkpoint
is, with no CLIP image encoder:

1. encode: besides the prompts, the input image is resized to the output size
   (``video_processor.preprocess``), followed by ``num_frames - 1`` black frames, VAE-encoded
   (latent mode, normalized) and prefixed with a mask saying which frames are given: the pipeline's
   own ``prepare_latents`` builds this ``image_condition`` [4 + 16, latent frames, H/8, W/8];
2. prepare: the noise is drawn exactly as ``prepare_latents`` draws it (first, from the request's
   generator), so the seed gives diffusers' video;
3. denoise: every transformer call takes the noisy latents concatenated with ``image_condition``
   along the channels (36 input channels), for the CFG rows too.

``expand_timesteps`` (Wan2.2 TI2V-5B's first-frame replacement) is another model and is refused at
load. ``image_condition`` travels from the ensemble's encoder stage (which loads the VAE for it) to
its transformer stage, as ``image_latents`` does for Qwen-Image-Edit: encoding belongs with the
encoders, and the transformer stage then needs no VAE weights. Its shape follows from the output
size and frame count alone (the image is resized to the output size), which the batching key of
``wan.py`` already holds: input images of any size share a step.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import WanImageToVideoPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from omni_backend.config import ConfigError, RequestLimits
from omni_backend.pipelines.base import Component, Conditioning
from omni_backend.pipelines.common import input_image_key, tensor_from_array, with_vae_in_encode
from omni_backend.pipelines.wan import WanState, WanT2VStages
from omni_backend.pipelines.wan_cache import WAN_I2V_TEA_CACHE, WanCacheAdapter
from omni_backend.request import (
    DiffusionRequest,
    InvalidRequestError,
    SamplingParams,
    parse_input_image,
    parse_prompt_request,
)

CONDITION = "image_condition"  # the conditioning tensor's name (and the ensemble's tensor between stages)
# A bound for each free dimension of a received image_condition; parse_conditioned_request then
# requires the exact shape of the request's size and frame count, which the request limits bound.
MAX_LATENT_SIDE = 4096


class WanI2VStages(WanT2VStages):
    pipeline_cls = WanImageToVideoPipeline

    def __init__(self, pipe: Any, checkpoint: str, options: Any, device: torch.device):
        super().__init__(pipe, checkpoint, options, device)
        if pipe.config.expand_timesteps:
            raise ConfigError("model: expand_timesteps checkpoints (Wan2.2 TI2V-5B) are not the wan22_i2v family")
        # mask (one channel per frame of a temporal group) + the VAE-encoded video
        self.condition_channels = self.temporal_factor + self.latent_channels
        if self.in_channels != self.latent_channels + self.condition_channels:
            raise ConfigError(
                f"model: the transformer takes {self.in_channels} channels, not latents + image condition "
                f"({self.latent_channels} + {self.condition_channels}): not a Wan2.2 image-to-video checkpoint"
            )

    @classmethod
    def load_pipe(cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device) -> Any:
        if Component.TEXT_ENCODER in components:
            components |= Component.VAE  # the encoder stage VAE-encodes the input image too
        return super().load_pipe(checkpoint, components, dtype, device)

    def module_groups(self) -> dict[str, list[torch.nn.Module]]:
        return with_vae_in_encode(super().module_groups(), self.pipe.vae)

    def step_cache_adapter(self) -> WanCacheAdapter:
        return WanCacheAdapter(WAN_I2V_TEA_CACHE)

    def encode_key(self, request: DiffusionRequest) -> Hashable:
        # encode also builds the image condition: the image resized to the output size, over its frames
        params = request.params
        size = (params.height, params.width, params.num_frames)
        return (*super().encode_key(request), *size, *input_image_key(request.input_image))

    def warmup_request(self, height: int, width: int) -> tuple[DiffusionRequest, Conditioning]:
        request, conditioning = super().warmup_request(height, width)
        frames = (request.params.num_frames - 1) // self.temporal_factor + 1
        latent_size = (height // self.spatial_factor, width // self.spatial_factor)
        conditioning[CONDITION] = torch.zeros(self.condition_channels, frames, *latent_size)
        request.input_image = np.zeros((height, width, 3), np.uint8)  # when the warm-up encodes too
        return request, conditioning

    # ------------------------------------------------------------------ requests

    def parse_request(
        self, request_id: str, arrays: Mapping[str, np.ndarray], limits: RequestLimits
    ) -> DiffusionRequest:
        image = parse_input_image(arrays, limits)
        request = parse_prompt_request(request_id, arrays, self.defaults, limits)
        request.input_image = image
        return request

    def conditioning_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Conditioning:
        conditioning = super().conditioning_from_arrays(arrays)
        if CONDITION not in arrays:
            raise InvalidRequestError(CONDITION, "is required")
        free = [(name, 1, MAX_LATENT_SIDE) for name in ("latent frames", "H/8", "W/8")]
        conditioning[CONDITION] = tensor_from_array(CONDITION, arrays[CONDITION], (self.condition_channels, *free))
        return conditioning

    def parse_conditioned_request(
        self, request_id: str, arrays: Mapping[str, np.ndarray], limits: RequestLimits
    ) -> DiffusionRequest:
        request = super().parse_conditioned_request(request_id, arrays, limits)
        params = request.params
        expected = (self.condition_channels, *self._latent_shape(params))
        got = tuple(request.conditioning[CONDITION].shape)
        if got != expected:
            raise InvalidRequestError(
                CONDITION,
                f"shape {list(got)} does not match {params.num_frames} frames of {params.height}x{params.width} "
                f"(expected {list(expected)})",
            )
        return request

    def _latent_shape(self, params: SamplingParams) -> tuple[int, int, int]:
        frames = (params.num_frames - 1) // self.temporal_factor + 1
        return frames, params.height // self.spatial_factor, params.width // self.spatial_factor

    # ------------------------------------------------------------------ 1. encode

    @torch.inference_mode()
    def encode(self, requests: Sequence[DiffusionRequest]) -> list[Conditioning]:
        out = super().encode(requests)
        for conditioning, request in zip(out, requests, strict=True):
            conditioning[CONDITION] = self._image_condition(request)
        return out

    def _image_condition(self, request: DiffusionRequest) -> torch.Tensor:
        params = request.params
        assert request.input_image is not None  # parse_request requires it
        image = self.pipe.video_processor.preprocess(
            Image.fromarray(request.input_image), height=params.height, width=params.width
        ).to(self.device, torch.float32)
        # Given latents, prepare_latents draws no noise and only builds the condition (prepare draws the noise).
        placeholder = torch.empty(0, device=self.device, dtype=torch.float32)
        _, condition = self.pipe.prepare_latents(
            image,
            1,
            self.latent_channels,
            params.height,
            params.width,
            params.num_frames,
            torch.float32,
            self.device,
            None,
            placeholder,
        )
        return condition[0]

    # ------------------------------------------------------------------ 2. prepare / 3. denoise

    def _initial_latents(self, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
        # prepare_latents' first act: the noise for the VAE's channels (not the transformer's 36)
        shape = (1, self.latent_channels, *self._latent_shape(params))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def _model_input(self, state: WanState) -> torch.Tensor:
        assert state.conditioning is not None  # set by prepare
        condition = state.conditioning[CONDITION][None]
        return torch.cat([state.latents.to(condition.dtype), condition], dim=1)
