"""Streaming generation for :class:`~omni_client.client.OmniClient` (gRPC bidirectional stream)."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, closing, suppress
from functools import partial
from typing import Any

from tritonclient.utils import InferenceServerException

from ._settings import ClientSettings
from .errors import GenerationCancelled, OmniClientError, StopGeneration
from .request import GenerationRequest, make_request
from .results import OutputFormat, check_output_format
from .stream import (
    FinalImage,
    StepUpdate,
    StreamAssembler,
    StreamItem,
    build_stream_inputs,
    check_stream_protocol,
    deadline_error,
    new_request_id,
)

#: Extra seconds to wait for the stream's own deadline error before giving up locally.
_DEADLINE_GRACE_S = 5.0
#: Seconds to wait for the callback's error when the stream broke before the request was sent.
_STREAM_ERROR_WAIT_S = 2.0


def _on_response(events: queue.Queue[tuple[Any, Any]], result: Any, error: Any) -> None:
    events.put((result, error))


def _stream_failure(events: queue.Queue[tuple[Any, Any]], exc: InferenceServerException) -> BaseException:
    """The cause of a failed ``async_stream_infer``: if the stream broke (e.g. server unreachable),
    tritonclient only says that the stream is invalid; the reason comes on the callback."""
    try:
        _, error = events.get(timeout=_STREAM_ERROR_WAIT_S)
    except queue.Empty:
        return exc
    return error if error is not None else exc


class StreamingMixin(ClientSettings):
    """``generate_stream`` and ``stream`` of :class:`~omni_client.client.OmniClient`.

    Each call opens its own gRPC connection and stream (tritonclient allows one stream per
    client), so calls may run concurrently from several threads.
    """

    def _errors(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _connect(self) -> Any:
        raise NotImplementedError

    def generate_stream(
        self,
        prompt: str | GenerationRequest,
        *,
        preview_every: int | None = None,
        model: str | None = None,
        on_progress: Callable[[StepUpdate], None] | None = None,
        output: OutputFormat = "pil",
        timeout: float | None = None,
        **params: Any,
    ) -> Any:
        """Generates one image (or video) with a streaming model, reporting progress as it goes (gRPC only).

        Args:
            prompt: Prompt text, or a complete :class:`GenerationRequest`.
            preview_every: Ask for a downscaled preview every N steps (int >= 1); None for none.
            model: Streaming model name (e.g. ``"flux_stream"``); None for the client's model.
            on_progress: Called with a :class:`StepUpdate` for every step, in the calling
                thread; raise :class:`StopGeneration` from it to cancel the generation.
            output: ``"pil"`` or ``"numpy"``, for the image and the previews.
            timeout: Seconds for the whole generation; None for the client's timeout.
            **params: Other :class:`GenerationRequest` fields (``height``, ``seed``, ...).

        Returns:
            The generated image (or video).

        Raises:
            InvalidRequestError: If the arguments are invalid or the client uses HTTP.
            GenerationCancelled: If ``on_progress`` raised :class:`StopGeneration`.
            OmniClientError: If the server cannot be reached or reports an error.
            KeyboardInterrupt: Re-raised after cancelling the request on the server.
        """
        items = self.stream(prompt, preview_every=preview_every, model=model, output=output, timeout=timeout, **params)
        with closing(items):  # on any exception, closing the generator cancels the request
            for item in items:
                if isinstance(item, FinalImage):
                    return item.image
                if on_progress is not None:
                    try:
                        on_progress(item)
                    except StopGeneration as exc:
                        raise GenerationCancelled("generation cancelled", "CANCELLED") from exc
        raise OmniClientError("the stream ended without an image")  # not reached: stream() ends with one

    def stream(
        self,
        prompt: str | GenerationRequest,
        *,
        preview_every: int | None = None,
        model: str | None = None,
        output: OutputFormat = "pil",
        timeout: float | None = None,
        **params: Any,
    ) -> Iterator[StreamItem]:
        """Streams a generation: yields :class:`StepUpdate` items, then one :class:`FinalImage`.

        Arguments are validated at once; the request is sent on the first ``next()``. Leaving
        the loop early (``break``, an exception) and closing the iterator (or letting it be
        garbage collected) cancels the request on the server.

        Args:
            prompt: Prompt text, or a complete :class:`GenerationRequest`.
            preview_every: Ask for a preview every N steps (int >= 1); None for none.
            model: Streaming model name; None for the client's model.
            output: ``"pil"`` or ``"numpy"``, for the image and the previews.
            timeout: Seconds for the whole generation; None for the client's timeout.
            **params: Other :class:`GenerationRequest` fields.

        Returns:
            An iterator of :class:`StepUpdate` and, last, :class:`FinalImage`.

        Raises:
            InvalidRequestError: If the arguments are invalid or the client uses HTTP.
            OmniClientError: While iterating, if the server cannot be reached or reports an error.
        """
        check_stream_protocol(self.protocol)
        if self._closed:
            raise OmniClientError("client is closed")
        output = check_output_format(output)
        inputs = build_stream_inputs(make_request(prompt, **params), preview_every)
        return self._stream_items(model or self.model, inputs, output, self.timeout if timeout is None else timeout)

    def _stream_items(
        self, model: str, inputs: list[Any], output: OutputFormat, timeout: float | None
    ) -> Iterator[StreamItem]:
        events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        assembler = StreamAssembler(output)
        deadline = None if timeout is None else time.monotonic() + timeout + _DEADLINE_GRACE_S
        triton = self._connect()
        finished = False
        try:
            with self._errors():
                triton.start_stream(partial(_on_response, events), stream_timeout=timeout)
                try:
                    triton.async_stream_infer(
                        model, inputs, request_id=new_request_id(), enable_empty_final_response=True
                    )
                except InferenceServerException as exc:
                    raise _stream_failure(events, exc) from None
            while True:
                items = assembler.feed(self._next_result(events, deadline, timeout))
                if assembler.done:
                    break
                yield from items
            finished = True
        finally:
            self._close_stream(triton, cancel=not finished)
        yield from items  # the FinalImage, once the stream is closed

    def _next_result(self, events: queue.Queue[tuple[Any, Any]], deadline: float | None, timeout: float | None) -> Any:
        try:
            result, error = events.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise OmniClientError(f"streaming request to {self.url} timed out after {timeout:g} s", "TIMEOUT") from None
        if error is not None:
            with self._errors():
                raise deadline_error(error, self.url, timeout) or error
        return result

    @staticmethod
    def _close_stream(triton: Any, cancel: bool) -> None:
        # Errors while closing are dropped: they would hide the one that ended the stream, if any.
        with suppress(Exception):
            triton.stop_stream(cancel_requests=cancel)
        with suppress(Exception):
            triton.close()
