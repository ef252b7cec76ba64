"""Streaming generation with decoupled models (e.g. ``flux_stream``, ``wan22_t2v_stream``) over gRPC.

Protocol of a streaming model, per request: one response per denoising step with ``step``
(steps done, 1..N) and ``total_steps`` (INT32 ``[1, 1]``), plus a preview on the steps where one
was asked (input ``preview_every``, INT32 ``[1, 1]``): ``preview`` (UINT8 ``[1, h, w, 3]``) from
image models, ``preview_video`` (UINT8 ``[1, frames, h, w, 3]``) from video models; then a last
response with ``image`` (UINT8 ``[1, H, W, 3]``) or ``video`` (UINT8 ``[1, F, H, W, 3]``),
flagged final. Errors end the request. Only gRPC can stream (Triton's HTTP endpoint cannot).

:class:`StreamAssembler` turns these raw responses into :class:`StepUpdate` and
:class:`FinalImage` items; the clients use it with ``tritonclient``'s stream APIs.
"""

from __future__ import annotations

import numbers
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.utils import InferenceServerException

from .errors import InvalidRequestError, OmniClientError
from .request import GenerationRequest, build_inputs
from .results import OUTPUT_RANKS, GenerationOutput, OutputFormat, convert_output, unbatch_rgb

#: The extra input of streaming models: a preview every N steps (0 or absent: none).
PREVIEW_EVERY_INPUT = "preview_every"
#: Preview output names and the rank of one (unbatched) preview, as ``OUTPUT_RANKS`` for the outputs.
PREVIEW_RANKS: dict[str, int] = {"preview_video": 4, "preview": 3}


@dataclass(frozen=True)
class StepUpdate:
    """Progress of a streaming generation.

    Attributes:
        step: Number of denoising steps done (1..``total_steps``).
        total_steps: Total number of denoising steps.
        preview: Downscaled preview on the steps where one was asked, else None: an image
            (``PIL.Image``, or ``uint8 [h, w, 3]`` with ``output="numpy"``) or, from a video
            model, a video (a list of ``PIL.Image`` frames, or ``uint8 [frames, h, w, 3]``).
    """

    step: int
    total_steps: int
    preview: GenerationOutput | None = None


@dataclass(frozen=True)
class FinalImage:
    """The result of a streaming generation: the last item of :meth:`OmniClient.stream`.

    Attributes:
        image: The generated image (``PIL.Image``, or ``uint8 [H, W, 3]`` with ``output="numpy"``),
            or video from a video model (a list of ``PIL.Image`` frames, or ``uint8 [F, H, W, 3]``).
        total_steps: Number of denoising steps, if the server reported it.
    """

    image: GenerationOutput
    total_steps: int | None = None


StreamItem = StepUpdate | FinalImage


@dataclass(frozen=True)
class StreamResponse:
    """One raw response of a streaming model, parsed (see :func:`parse_stream_response`).

    Attributes:
        step: ``step`` output, or None if absent.
        total_steps: ``total_steps`` output, or None if absent.
        preview: ``preview`` as ``uint8 [h, w, 3]`` or ``preview_video`` as ``uint8 [frames, h, w, 3]``, or None.
        image: ``image`` as ``uint8 [H, W, 3]`` or ``video`` as ``uint8 [F, H, W, 3]``, or None.
        final: The ``triton_final_response`` flag, or None if the response does not carry it.
    """

    step: int | None = None
    total_steps: int | None = None
    preview: np.ndarray | None = None
    image: np.ndarray | None = None
    final: bool | None = None


def check_stream_protocol(protocol: str) -> None:
    """Raises :class:`InvalidRequestError` unless ``protocol`` is ``"grpc"``."""
    if protocol != "grpc":
        raise InvalidRequestError(
            f"streaming needs protocol='grpc' (got {protocol!r}): Triton's HTTP endpoint cannot stream responses"
        )


def check_preview_every(value: Any) -> int | None:
    """Validates ``preview_every``: None (no previews) or an int >= 1.

    Raises:
        InvalidRequestError: For other values.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(f"preview_every must be an int >= 1 or None, got {type(value).__name__}")
    if not 1 <= int(value) <= np.iinfo(np.int32).max:
        raise InvalidRequestError(f"preview_every must be an int >= 1 (None for no previews), got {value}")
    return int(value)


def build_stream_inputs(request: GenerationRequest, preview_every: int | None = None) -> list[Any]:
    """Returns the ``tritonclient.grpc`` inputs of a streaming request.

    Args:
        request: The generation parameters.
        preview_every: Ask for a preview every N steps; None for none (the input is not sent).

    Raises:
        InvalidRequestError: If the request or ``preview_every`` is invalid.
    """
    preview_every = check_preview_every(preview_every)
    inputs = build_inputs(request, "grpc")
    if preview_every is not None:
        import tritonclient.grpc as triton

        tensor = triton.InferInput(PREVIEW_EVERY_INPUT, [1, 1], "INT32")
        tensor.set_data_from_numpy(np.array([[preview_every]], dtype=np.int32))
        inputs.append(tensor)
    return inputs


def deadline_error(error: Any, url: str, timeout: float | None) -> OmniClientError | None:
    """Returns a clear ``TIMEOUT`` error if ``error`` (from the stream) is its deadline expiring, else None."""
    status = error.status() if isinstance(error, InferenceServerException) else None
    if timeout is None or status != "StatusCode.DEADLINE_EXCEEDED":
        return None
    return OmniClientError(f"streaming request to {url} timed out after {timeout:g} s", "TIMEOUT")


def new_request_id() -> str:
    """Returns a fresh request id (shows up in the server's logs and traces)."""
    return f"omni-{uuid.uuid4().hex[:16]}"


def _scalar(result: Any, name: str) -> int | None:
    arr = result.as_numpy(name)
    if arr is None:
        return None
    if arr.size != 1:
        raise OmniClientError(f"expected one value in output {name!r}, got shape {list(arr.shape)}")
    return int(arr.reshape(-1)[0])


def final_flag(result: Any) -> bool | None:
    """Returns the ``triton_final_response`` parameter of a gRPC ``InferResult``, or None if absent."""
    try:
        parameters = result.get_response().parameters
    except (AttributeError, TypeError):
        return None
    if "triton_final_response" not in parameters:
        return None
    return bool(parameters["triton_final_response"].bool_param)


def parse_stream_response(result: Any) -> StreamResponse:
    """Parses one response of a streaming model.

    Args:
        result: ``tritonclient.grpc.InferResult``.

    Returns:
        Its ``step``, ``total_steps``, preview, image (or video) and final flag.

    Raises:
        OmniClientError: If an output has an unexpected shape or dtype.
    """
    return StreamResponse(
        step=_scalar(result, "step"),
        total_steps=_scalar(result, "total_steps"),
        preview=_pixels(result, PREVIEW_RANKS),
        image=_pixels(result, OUTPUT_RANKS),
        final=final_flag(result),
    )


def _pixels(result: Any, ranks: dict[str, int]) -> np.ndarray | None:
    """The first of the ``ranks`` outputs present in ``result``, unbatched and checked; None if none is."""
    for name, rank in ranks.items():
        arr = result.as_numpy(name)
        if arr is not None:
            return unbatch_rgb(arr, name, rank)
    return None


class StreamAssembler:
    """Turns the responses of one streaming request into :class:`StepUpdate` / :class:`FinalImage`.

    The request is over (``done``) on a response flagged final, or, when the response carries no
    final flag, on the one with the ``image``. A step already reported is not reported again
    (the image response repeats ``step = total_steps``) unless it brings a preview.

    Args:
        output: Format of previews and of the image (or video), ``"pil"`` or ``"numpy"``.
    """

    def __init__(self, output: OutputFormat = "pil") -> None:
        self.output = output
        self.done = False
        self._last_step: int | None = None
        self._total: int | None = None
        self._image: np.ndarray | None = None

    def feed(self, result: Any) -> list[StreamItem]:
        """Consumes one response; returns the items it yields (the last one a FinalImage when done).

        Raises:
            OmniClientError: On a malformed response, or one flagged final without any image.
        """
        if self.done:
            return []
        response = parse_stream_response(result)
        items: list[StreamItem] = []
        if response.total_steps is not None:
            self._total = response.total_steps
        if response.step is not None and (response.step != self._last_step or response.preview is not None):
            if self._total is None:
                raise OmniClientError("streaming response has a 'step' output but no 'total_steps'")
            preview = None if response.preview is None else convert_output(response.preview, self.output)
            items.append(StepUpdate(response.step, self._total, preview))
            self._last_step = response.step
        elif response.preview is not None and response.step is None:
            raise OmniClientError("streaming response has a preview output but no 'step'")
        if response.image is not None:
            self._image = response.image
        if response.final or (response.final is None and response.image is not None):
            items.extend(self.end())
        return items

    def end(self) -> list[StreamItem]:
        """Ends the request (final flag, or end of the stream); returns ``[FinalImage]``.

        Raises:
            OmniClientError: If no image (or video) was received.
        """
        if self.done:
            return []
        self.done = True
        if self._image is None:
            raise OmniClientError("the stream ended without an 'image' or 'video' output")
        return [FinalImage(convert_output(self._image, self.output), self._total)]
