"""Streaming generation for :class:`~omni_client.aio.AsyncOmniClient` (``tritonclient.grpc.aio``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractContextManager
from typing import Any

import grpc
from tritonclient.utils import InferenceServerException

from ._settings import ClientSettings
from .request import GenerationRequest, make_request
from .results import OutputFormat, check_output_format
from .stream import (
    StreamAssembler,
    StreamItem,
    build_stream_inputs,
    check_stream_protocol,
    deadline_error,
    new_request_id,
)


class AsyncStreamingMixin(ClientSettings):
    """``generate_stream`` of :class:`~omni_client.aio.AsyncOmniClient`."""

    def _errors(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def _client(self) -> Any:
        raise NotImplementedError

    def generate_stream(
        self,
        prompt: str | GenerationRequest,
        *,
        preview_every: int | None = None,
        model: str | None = None,
        output: OutputFormat = "pil",
        timeout: float | None = None,
        **params: Any,
    ) -> AsyncIterator[StreamItem]:
        """Streams a generation with a streaming model (gRPC only).

        Arguments are validated at once (this is not a coroutine); the request is sent when the
        iteration starts. Leaving the loop early cancels the request on the server once the
        iterator is closed: use ``contextlib.aclosing`` to close it at once.

        Example:
            >>> async with aclosing(client.generate_stream("a fox", model="flux_stream")) as items:  # doctest: +SKIP
            ...     async for item in items:
            ...         if isinstance(item, FinalImage):
            ...             item.image.save("fox.png")

        Args:
            prompt: Prompt text, or a complete :class:`GenerationRequest`.
            preview_every: Ask for a downscaled preview every N steps (int >= 1); None for none.
            model: Streaming model name (e.g. ``"flux_stream"``); None for the client's model.
            output: ``"pil"`` or ``"numpy"``, for the image and the previews.
            timeout: Seconds for the whole generation; None for the client's timeout.
            **params: Other :class:`GenerationRequest` fields.

        Returns:
            An async iterator of :class:`StepUpdate` items and, last, one :class:`FinalImage`.

        Raises:
            InvalidRequestError: If the arguments are invalid or the client uses HTTP.
            OmniClientError: While iterating, if the server cannot be reached or reports an error.
        """
        check_stream_protocol(self.protocol)
        output = check_output_format(output)
        inputs = build_stream_inputs(make_request(prompt, **params), preview_every)
        return self._stream_items(model or self.model, inputs, output, self.timeout if timeout is None else timeout)

    async def _stream_items(
        self, model: str, inputs: list[Any], output: OutputFormat, timeout: float | None
    ) -> AsyncIterator[StreamItem]:
        async def requests() -> AsyncIterator[dict[str, Any]]:
            # One request; then the client half-closes and the server ends the stream after it.
            yield {"model_name": model, "inputs": inputs, "request_id": new_request_id()}

        assembler = StreamAssembler(output)
        with self._errors():
            responses = self._client().stream_infer(requests(), stream_timeout=timeout)
        finished = False
        try:
            while True:
                with self._errors():
                    try:
                        result, error = await responses.__anext__()
                    except StopAsyncIteration:
                        items = assembler.end()  # no final flag seen: the image response was the last
                        break
                    except grpc.RpcError as exc:
                        error = InferenceServerException(
                            msg=exc.details(), status=str(exc.code()), debug_details=exc.debug_error_string()
                        )
                    if error is not None:
                        raise deadline_error(error, self.url, timeout) or error
                items = assembler.feed(result)
                if assembler.done:
                    break
                for item in items:
                    yield item
            finished = True
        finally:
            if not finished:
                responses.cancel()
        for item in items:  # the FinalImage
            yield item
