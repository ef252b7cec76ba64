"""Triton tensors <-> numpy, and Triton responses. The only module family-agnostic glue needs."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from omni_backend.request import InvalidRequestError


def request_arrays(request: pb_utils.InferenceRequest) -> dict[str, np.ndarray]:
    """A request's inputs by name, the batch dimension removed (one image per request)."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in request.inputs():
        name = tensor.name()
        array = tensor.as_numpy()
        if array.ndim == 0 or array.shape[0] != 1:
            raise InvalidRequestError(
                name, f"batch dimension must be 1 (one generation per request), got shape {list(array.shape)}"
            )
        arrays[name] = array[0]
    return arrays


def output_response(outputs: dict[str, np.ndarray]) -> pb_utils.InferenceResponse:
    """A response holding each output with a batch dimension of 1."""
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(array[None])) for name, array in outputs.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)


def error_response(message: str, code: int) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def invalid_arg(exc: Exception) -> pb_utils.InferenceResponse:
    return error_response(str(exc), pb_utils.TritonError.INVALID_ARG)


def unavailable(message: str) -> pb_utils.InferenceResponse:
    return error_response(message, pb_utils.TritonError.UNAVAILABLE)


def internal(message: str) -> pb_utils.InferenceResponse:
    return error_response(message, pb_utils.TritonError.INTERNAL)


def send_final(request: pb_utils.InferenceRequest, response: pb_utils.InferenceResponse) -> None:
    """Answer a deferred request: exactly one response, flagged final."""
    request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
