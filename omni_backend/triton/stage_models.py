"""Ensemble stages answered inside ``execute``: text encoder and VAE.

Each does one batched pass over the valid requests of the batch Triton's dynamic batcher
formed; an invalid request gets its own INVALID_ARG and never fails its neighbours.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from omni_backend.pipelines.base import Component
from omni_backend.request import InvalidRequestError
from omni_backend.runner.warmup import warm_up_text_encoder, warm_up_vae, warmup_sizes
from omni_backend.triton import tensors
from omni_backend.triton.base import OmniModel


class TextEncoderStageModel(OmniModel):
    """Ensemble stage: ``prompt`` / ``negative_prompt`` in, the family's conditioning tensors out."""

    components = Component.TEXT_ENCODER

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        warm_up_text_encoder(self.stages, warmup_sizes(self.config, self.stages), self.log)

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses: list[Any] = [None] * len(requests)
        valid = []
        for i, request in enumerate(requests):
            try:
                arrays = tensors.request_arrays(request)
                valid.append((i, self.stages.parse_request(str(i), arrays, self.config.limits)))
            except InvalidRequestError as exc:
                responses[i] = tensors.invalid_arg(exc)
        if valid:
            try:
                encoded = self.stages.encode([parsed for _, parsed in valid])
                for (i, _), conditioning in zip(valid, encoded, strict=True):
                    responses[i] = tensors.output_response(
                        {name: value.float().cpu().numpy() for name, value in conditioning.items()}
                    )
            except Exception as exc:
                self.log.exception("text encoding failed for a batch of %d", len(valid))
                for i, _ in valid:
                    responses[i] = tensors.internal(f"text encoding failed: {exc}")
        return responses


class VaeStageModel(OmniModel):
    """Ensemble stage: ``latents`` in, ``image`` (or ``video``) out; latents of one shape decode together."""

    components = Component.VAE

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        warm_up_vae(self.stages, warmup_sizes(self.config, self.stages), self.log)

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        responses: list[Any] = [None] * len(requests)
        by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for i, request in enumerate(requests):
            try:
                arrays = tensors.request_arrays(request)
                latents = self.stages.latents_from_array(arrays.get("latents"), self.config.limits)
                by_shape[tuple(latents.shape)].append((i, latents))
            except InvalidRequestError as exc:
                responses[i] = tensors.invalid_arg(exc)
        for group in by_shape.values():
            try:
                images = self.stages.decode([latents for _, latents in group])
                for (i, _), image in zip(group, images, strict=True):
                    responses[i] = tensors.output_response({self.stages.output_name: image})
            except Exception as exc:
                self.log.exception("decoding failed for a batch of %d", len(group))
                for i, _ in group:
                    responses[i] = tensors.internal(f"decoding failed: {exc}")
        return responses
