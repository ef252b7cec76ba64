"""Qwen-Image-Edit on the stage API, over diffusers' ``QwenImageEditPipeline`` components.

Qwen-Image (``qwen_image.py``, whose stages this extends) conditioned on ``input_image`` the way
``QwenImageEditPipeline.__call__`` does it, with the pipeline's own methods:

1. the image is resized to about 1024x1024 pixels at its own aspect ratio (``calculate_dimensions``,
   sides multiples of 32), whatever the output size;
2. encode: that image goes with the instruction through Qwen2.5-VL (the edit chat template has an
   image placeholder), so the prompt embeddings hold the image's vision tokens; and it is
   VAE-encoded (latent mode, normalized): ``image_latents`` [16, 1, h, w];
3. denoise: the packed image latents follow the noisy latents in every transformer call (RoPE
   ``img_shapes`` of both) and the noise prediction is read from the noisy part.

``image_latents`` travels with the prompt embeddings from the ensemble's encoder stage (which loads
the VAE too) to its transformer stage. Requests share a transformer call when the output size and
the resized input-image size agree (the batching key); prompts of any length are padded and masked
as in Qwen-Image. The output size defaults to the resized input image's, as in diffusers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import QwenImageEditPipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor

from omni_backend.config import RequestLimits
from omni_backend.pipelines.base import Component, Conditioning, load_pipeline
from omni_backend.pipelines.common import embeddings_from_arrays, input_image_key, with_vae_in_encode
from omni_backend.pipelines.qwen_image import QwenImageStages, QwenImageState
from omni_backend.request import (
    DiffusionRequest,
    InvalidRequestError,
    parse_input_image,
    parse_prompt_request,
    parse_sampling_params,
)

CONDITION_AREA = 1024 * 1024  # QwenImageEditPipeline resizes the input image to about this many pixels


@dataclass(frozen=True)
class QwenImageEditOptions:
    """config.pbtxt parameters specific to Qwen-Image-Edit."""

    # The longest conditioning sequence (instruction + the image's vision tokens) the transformer stage
    # accepts from the encoder stage. QwenImageEditPipeline does not truncate the instruction.
    max_sequence_length: int = 16384


class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor, which transformers builds only with torchvision.

    The edit pipeline hands its processor text and images, never videos: nothing else changes.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def load_processor(checkpoint: str) -> Qwen2VLProcessor:
    """The pipeline's ``processor`` from the checkpoint's ``processor/`` folder (image processor + tokenizer).

    ``Qwen2VLProcessor.from_pretrained`` (what ``QwenImageEditPipeline.from_pretrained`` calls) also
    builds a video processor and fails without torchvision, so our loader, and the parity tests'
    reference pipeline, pass this one instead. ``AutoImageProcessor`` picks the image processor
    class as the full processor would (torchvision's where installed, else the PIL one).
    """
    return _ImageOnlyQwen2VLProcessor(
        image_processor=AutoImageProcessor.from_pretrained(checkpoint, subfolder="processor"),
        tokenizer=AutoTokenizer.from_pretrained(checkpoint, subfolder="processor"),
    )


def resized_size(height: int, width: int) -> tuple[int, int]:
    """(height, width) QwenImageEditPipeline resizes an input image of this size to."""
    resized_width, resized_height, _ = calculate_dimensions(CONDITION_AREA, width / height)
    return int(resized_height), int(resized_width)


class QwenImageEditStages(QwenImageStages):
    options_cls = QwenImageEditOptions
    pipeline_cls = QwenImageEditPipeline
    max_sequence_cap = 65536

    @classmethod
    def load_pipe(cls, checkpoint: str, components: Component, dtype: torch.dtype, device: torch.device) -> Any:
        loaded = {}
        if Component.TEXT_ENCODER in components:
            components |= Component.VAE  # the encoder stage VAE-encodes the input image too
            loaded["processor"] = load_processor(checkpoint)
        text_modules = ("text_encoder", "tokenizer", "processor")
        return load_pipeline(cls.pipeline_cls, checkpoint, components, dtype, device, text_modules, loaded=loaded)

    # ------------------------------------------------------------------ requests

    def parse_request(
        self, request_id: str, arrays: Mapping[str, np.ndarray], limits: RequestLimits
    ) -> DiffusionRequest:
        image = parse_input_image(arrays, limits)
        height, width = self._checked_resize(image.shape[0], image.shape[1], limits)
        defaults = dataclasses.replace(self.defaults, height=height, width=width)
        request = parse_prompt_request(request_id, arrays, defaults, limits)
        request.input_image = image
        return request

    def _checked_resize(self, height: int, width: int, limits: RequestLimits) -> tuple[int, int]:
        resized = resized_size(height, width)
        low = self.defaults.size_multiple
        if not all(low <= side <= limits.max_side for side in resized):
            raise InvalidRequestError(
                "input_image",
                f"aspect ratio of {height}x{width} is too extreme: the model resizes it to "
                f"{resized[0]}x{resized[1]}, each side must be in [{low}, {limits.max_side}]",
            )
        return resized

    def conditioning_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Conditioning:
        text = ("sequence length", 1, self.options.max_sequence_length)
        # the resize keeps about CONDITION_AREA pixels: a latent side is at most that area over the shortest side
        side = ("latent side", 2, CONDITION_AREA // (self.vae_scale_factor * 32))
        shapes = {name: (text, self.joint_attention_dim) for name in ("prompt_embeds", "negative_prompt_embeds")}
        shapes["image_latents"] = (self.latent_channels, 1, side, side)
        conditioning = embeddings_from_arrays(arrays, shapes, required=("prompt_embeds", "image_latents"))
        if any(side % 2 for side in conditioning["image_latents"].shape[-2:]):
            raise InvalidRequestError("image_latents", "latent height and width must be even (2x2 packing)")
        return conditioning

    def parse_conditioned_request(
        self, request_id: str, arrays: Mapping[str, np.ndarray], limits: RequestLimits
    ) -> DiffusionRequest:
        conditioning = self.conditioning_from_arrays(arrays)
        height, width = (side * self.vae_scale_factor for side in conditioning["image_latents"].shape[-2:])
        defaults = dataclasses.replace(self.defaults, height=height, width=width)
        params = parse_sampling_params(arrays, defaults, limits)
        return DiffusionRequest(request_id=request_id, params=params, conditioning=conditioning)

    def batch_key(self, request: DiffusionRequest) -> Hashable:
        # the input image's latents are part of the transformer's sequence: their size must match too
        return (request.params.height, request.params.width, self._resized_of(request))

    def _resized_of(self, request: DiffusionRequest) -> tuple[int, int]:
        if request.conditioning is not None:  # the transformer stage: the size is in the latents
            latent_height, latent_width = request.conditioning["image_latents"].shape[-2:]
            return latent_height * self.vae_scale_factor, latent_width * self.vae_scale_factor
        assert request.input_image is not None  # parse_request requires it
        return resized_size(*request.input_image.shape[:2])

    # ------------------------------------------------------------------ acceleration

    def module_groups(self) -> dict[str, list[torch.nn.Module]]:
        return with_vae_in_encode(super().module_groups(), self.pipe.vae)

    def encode_key(self, request: DiffusionRequest) -> Hashable:
        # encode reads the input image too (resized by its own size alone, whatever the output size)
        return (*super().encode_key(request), *input_image_key(request.input_image))

    def warmup_request(self, height: int, width: int) -> tuple[DiffusionRequest, Conditioning]:
        # an input image of the output size, as a client editing its own picture sends
        request, conditioning = super().warmup_request(height, width)
        resized_height, resized_width = resized_size(height, width)
        scale = self.vae_scale_factor
        conditioning["image_latents"] = torch.zeros(
            self.latent_channels, 1, resized_height // scale, resized_width // scale
        )
        request.input_image = np.zeros((height, width, 3), dtype=np.uint8)
        return request, conditioning

    # ------------------------------------------------------------------ 1. encode

    @torch.inference_mode()
    def encode(self, requests: Sequence[DiffusionRequest]) -> list[Conditioning]:
        processor = self.pipe.image_processor
        images = []
        for request in requests:
            height, width = resized_size(*request.input_image.shape[:2])
            images.append(processor.resize(Image.fromarray(request.input_image), height, width))
        out = self._encode_prompts(requests, images)
        vae = self.pipe.vae
        for conditioning, image in zip(out, images, strict=True):
            pixels = processor.preprocess(image, image.height, image.width).unsqueeze(2)
            # latent mode ("argmax"): no random draw, the generator is unused
            latents = self.pipe._encode_vae_image(pixels.to(self.device, vae.dtype), generator=None)
            conditioning["image_latents"] = latents[0]
        return out

    # ------------------------------------------------------------------ 2. prepare

    @torch.inference_mode()
    def prepare(self, request: DiffusionRequest, conditioning: Conditioning) -> QwenImageState:
        state = super().prepare(request, conditioning)
        image_latents = state.conditioning["image_latents"][None]
        _, channels, _, height, width = image_latents.shape
        state.image_latents = self.pipe._pack_latents(image_latents, 1, channels, height, width)
        state.img_shapes.append((1, height // 2, width // 2))
        return state

    def _initial_latents(self, height: int, width: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
        # the edit pipeline's prepare_latents also encodes an image; given none, it only draws the noise
        channels = self.pipe.transformer.config.in_channels // 4
        return self.pipe.prepare_latents(None, 1, channels, height, width, dtype, self.device, generator)[0]
