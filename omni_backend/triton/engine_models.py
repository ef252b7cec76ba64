"""Triton models driven by the step engine: the one-model pipeline, its streaming twin, the transformer stage.

``execute`` validates each request, hands it to the engine and returns ``None``; the engine
thread answers every request later through its response sender (deferred responses), so the
instance keeps accepting requests while earlier ones denoise, over HTTP and gRPC alike.
Cancellation (``request.is_cancelled()``) is polled by the engine between steps.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, ClassVar

import numpy as np
import triton_python_backend_utils as pb_utils

from omni_backend.cache.config import check_cache_threshold
from omni_backend.distributed.worker import make_runner
from omni_backend.engine.control import FIELD as CONTROL
from omni_backend.engine.control import ControlCall, ControlReply, parse_control
from omni_backend.engine.engine import DiffusionEngine
from omni_backend.engine.scheduler import QueueFullError, StepProgress
from omni_backend.lora.registry import validate_lora
from omni_backend.pipelines.base import Component
from omni_backend.request import (
    DiffusionOutput,
    DiffusionRequest,
    ErrorKind,
    InvalidRequestError,
    parse_int,
    parse_lora,
    parse_text,
)
from omni_backend.runner.model_runner import RunnerOutput
from omni_backend.runner.warmup import warm_up_runner, warmup_sizes
from omni_backend.serving.drain import DrainSignal
from omni_backend.triton import control, tensors
from omni_backend.triton.base import OmniModel
from omni_backend.triton.metrics import TritonEngineMetrics


def _error_code(kind: ErrorKind) -> int:
    # pb_utils.TritonError exists only once the stub has started: look it up per call
    return getattr(pb_utils.TritonError, kind.name)


class _EngineModel(OmniModel):
    output: ClassVar[RunnerOutput]

    def initialize(self, args: dict[str, Any]) -> None:
        super().initialize(args)
        self._ids = itertools.count()
        runner = make_runner(
            self.stages, self.config, self.components, self.output, self.device, self.model_name, self.loras
        )
        # before the engine starts: Triton marks the model READY only once initialize returns
        sizes = warmup_sizes(self.config, self.stages)
        warm_up_runner(runner, self.stages, sizes, Component.TEXT_ENCODER in self.components, self.log)
        metrics = TritonEngineMetrics(self.model_name)
        drain = DrainSignal.from_env()
        self.engine = DiffusionEngine(runner, self.config.engine, metrics, drain, self.config.control)
        self._control_key = control.control_key()

    def parse(self, request_id: str, arrays: Mapping[str, np.ndarray]) -> DiffusionRequest:
        raise NotImplementedError

    def progress_callback(self, request: pb_utils.InferenceRequest) -> Callable[[StepProgress], None] | None:
        """Streaming models send each step; the others stay silent until the end."""
        return None

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> None:
        for request in requests:
            # Client ids may be empty or repeated: the engine gets a unique one, logs show both.
            request_id = f"{next(self._ids)}:{request.request_id() or '-'}"
            try:
                arrays = tensors.request_arrays(request)
                if CONTROL in arrays:
                    self._control(request, request_id, arrays)
                    continue
                parsed = self.parse(request_id, arrays)
                parsed.lora = parse_lora(arrays, self.config.limits)
                validate_lora(self.loras, parsed.lora)
                check_cache_threshold(self.config.acceleration.cache_backend, parsed.params.cache_threshold)
                parsed.queue_deadline = self._queue_deadline(request, parsed.arrival_time)
                callbacks = (
                    partial(self._respond, request, parsed),
                    self.progress_callback(request),
                    request.is_cancelled,
                )
                self.engine.submit(parsed, *callbacks)
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

    def _control(self, request: pb_utils.InferenceRequest, request_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        """Validate a control op and queue it on the engine, which answers between steps."""
        control.check_access(request, self.config.control, self._control_key)
        control.check_alone(arrays)
        op, args = parse_control(parse_text(arrays, CONTROL, self.config.limits) or "", self.config.control)
        self.log.info("request %s: control op %s %s", request_id, op, args)
        self.engine.control(ControlCall(op, args, partial(self._respond_control, request, request_id)))

    def _respond_control(self, request: pb_utils.InferenceRequest, request_id: str, reply: ControlReply) -> None:
        if reply.error is not None:
            self.log.info("request %s: control op refused: %s", request_id, reply.error)
            tensors.send_final(request, tensors.error_response(reply.error, _error_code(reply.error_kind)))
        else:
            tensors.send_final(request, tensors.output_response(control.result_outputs(reply)))

    def _queue_deadline(self, request: pb_utils.InferenceRequest, arrival: float) -> float | None:
        """A client's own timeout (microseconds, Triton's ``timeout``) wins over ``queue_timeout_s``."""
        timeout_us = request.timeout()
        if timeout_us > 0:
            return arrival + timeout_us / 1e6
        limit = self.config.engine.queue_timeout_s
        return arrival + limit if limit > 0 else None

    def _respond(self, request: pb_utils.InferenceRequest, parsed: DiffusionRequest, output: DiffusionOutput) -> None:
        if output.error is not None:
            message = f"request {output.request_id}: {output.error}"
            tensors.send_final(request, tensors.error_response(message, _error_code(output.error_kind)))
        else:
            tensors.send_final(request, tensors.output_response(self.final_outputs(parsed, output)))

    def final_outputs(self, parsed: DiffusionRequest, output: DiffusionOutput) -> dict[str, np.ndarray]:
        return output.outputs

    def finalize(self) -> None:
        self.engine.stop()
        self.engine.runner.close()


class PipelineModel(_EngineModel):
    """The whole pipeline as one model: prompt in, ``image`` out."""

    components = Component.ALL
    output = RunnerOutput.IMAGE

    def parse(self, request_id: str, arrays: Mapping[str, np.ndarray]) -> DiffusionRequest:
        return self.stages.parse_request(request_id, arrays, self.config.limits)


class StreamingPipelineModel(PipelineModel):
    """Decoupled twin of ``PipelineModel`` (gRPC streaming): a response per step, then the image.

    Each step sends ``step`` / ``total_steps`` and, every ``preview_every`` steps, a small preview
    decoded from the clean latents predicted at that step, under the family's ``preview_name``
    (``preview`` image, or ``preview_video`` for video families). The last response carries the
    output (``image`` or ``video``, with ``step`` = ``total_steps``) and the final flag.
    """

    def initialize(self, args: dict[str, Any]) -> None:
        if not pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"])):
            raise ValueError(f"{args['model_name']}: a streaming model needs model_transaction_policy decoupled: true")
        super().initialize(args)

    def parse(self, request_id: str, arrays: Mapping[str, np.ndarray]) -> DiffusionRequest:
        parsed = super().parse(request_id, arrays)
        parsed.preview_every = parse_int(arrays, "preview_every", 0, 0, self.config.limits.max_steps)
        return parsed

    def progress_callback(self, request: pb_utils.InferenceRequest) -> Callable[[StepProgress], None]:
        sender = request.get_response_sender()
        preview_name = self.stages.preview_name

        def send(progress: StepProgress) -> None:
            if progress.step == progress.total_steps:
                return  # the final response carries the last step with the image
            outputs = _step_outputs(progress.step, progress.total_steps)
            if progress.preview is not None:
                outputs[preview_name] = progress.preview
            sender.send(tensors.output_response(outputs))

        return send

    def final_outputs(self, parsed: DiffusionRequest, output: DiffusionOutput) -> dict[str, np.ndarray]:
        return {**output.outputs, **_step_outputs(parsed.num_steps, parsed.num_steps)}


def _step_outputs(step: int, total: int) -> dict[str, np.ndarray]:
    return {"step": np.array([step], np.int32), "total_steps": np.array([total], np.int32)}


class TransformerStageModel(_EngineModel):
    """Ensemble stage: conditioning tensors + sampling params in, VAE-ready ``latents`` out."""

    components = Component.TRANSFORMER
    output = RunnerOutput.LATENTS

    def parse(self, request_id: str, arrays: Mapping[str, np.ndarray]) -> DiffusionRequest:
        return self.stages.parse_conditioned_request(request_id, arrays, self.config.limits)
