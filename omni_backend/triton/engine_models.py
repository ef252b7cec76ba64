"""Triton models driven by the step engine: the one-model pipeline and the transformer stage.

``execute`` validates each request, hands it to the engine and returns ``None``; the engine
thread answers every request later through its response sender (deferred responses), so the
instance keeps accepting requests while earlier ones denoise, over HTTP and gRPC alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from functools import partial
from typing import Any, ClassVar

import numpy as np
import triton_python_backend_utils as pb_utils

from omni_backend.engine.engine import DiffusionEngine
from omni_backend.engine.scheduler import QueueFullError
from omni_backend.pipelines.base import Component
from omni_backend.request import (
    DiffusionOutput,
    DiffusionRequest,
    InvalidRequestError,
    parse_prompt_request,
    parse_sampling_params,
)
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput
from omni_backend.triton import tensors
from omni_backend.triton.base import OmniModel


class _EngineModel(OmniModel):
    output: ClassVar[RunnerOutput]

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        self._ids = itertools.count()
        self.engine = DiffusionEngine(ModelRunner(self.stages, self.output), self.config.engine)

    def parse(self, request_id: str, arrays: Mapping[str, np.ndarray]) -> DiffusionRequest:
        raise NotImplementedError

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        for request in requests:
            # Client ids may be empty or repeated: the engine gets a unique one, logs show both.
            request_id = f"{next(self._ids)}:{request.request_id() or '-'}"
            try:
                parsed = self.parse(request_id, tensors.request_arrays(request))
                self.engine.submit(parsed, partial(self._respond, request))
            except InvalidRequestError as exc:
                self.log.info("request %s rejected: %s", request_id, exc)
                tensors.send_final(request, tensors.invalid_arg(exc))
            except QueueFullError as exc:
                self.log.warning("request %s refused: %s", request_id, exc)
                tensors.send_final(request, tensors.unavailable(str(exc)))
            except Exception as exc:
                self.log.exception("request %s failed before scheduling", request_id)
                tensors.send_final(request, tensors.internal(f"request {request_id}: {exc}"))
        return None

    def _respond(self, request: pb_utils.InferenceRequest, output: DiffusionOutput) -> None:
        if output.error is not None:
            tensors.send_final(request, tensors.internal(f"request {output.request_id}: {output.error}"))
        else:
            tensors.send_final(request, tensors.output_response(output.outputs))

    def finalize(self) -> None:
        self.engine.stop()


class PipelineModel(_EngineModel):
    """The whole pipeline as one model: prompt in, ``image`` out."""

    components = Component.ALL
    output = RunnerOutput.IMAGE

    def parse(self, request_id: str, arrays: Mapping[str, np.ndarray]) -> DiffusionRequest:
        return parse_prompt_request(request_id, arrays, self.stages.defaults, self.config.limits)


class TransformerStageModel(_EngineModel):
    """Ensemble stage: conditioning tensors + sampling params in, VAE-ready ``latents`` out."""

    components = Component.TRANSFORMER
    output = RunnerOutput.LATENTS

    def parse(self, request_id: str, arrays: Mapping[str, np.ndarray]) -> DiffusionRequest:
        return DiffusionRequest(
            request_id=request_id,
            params=parse_sampling_params(arrays, self.stages.defaults, self.config.limits),
            conditioning=self.stages.conditioning_from_arrays(arrays),
        )
