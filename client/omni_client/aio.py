"""Asyncio client over ``tritonclient.grpc.aio`` / ``tritonclient.http.aio``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from ._stream_aio import AsyncStreamingMixin
from .errors import InvalidRequestError, OmniClientError, translate_errors
from .models import ModelInfo, parse_repository_index
from .request import GenerationRequest, build_inputs, make_request
from .results import GenerationOutput, OutputFormat, check_output_format, decode_result


class AsyncOmniClient(AsyncStreamingMixin):
    """Asyncio counterpart of :class:`~omni_client.client.OmniClient` (same arguments and methods).

    The underlying tritonclient aio client is created lazily inside the running event loop, on
    the first call. For streaming models (gRPC only), :meth:`generate_stream` is an async
    iterator of step updates and the final image.

    Args:
        url: Server address (``host:port``, optionally ``http://``-prefixed); None means
            localhost with the protocol's default port (gRPC 8001, HTTP 8000).
        protocol: ``"grpc"`` or ``"http"``.
        model: Default model name used by :meth:`generate`.
        timeout: Client-side timeout in seconds for each call; None waits forever.
        ssl: Use TLS; None infers it from an ``https://`` / ``grpcs://`` url.
        verbose: Let tritonclient print requests and responses.

    Example:
        >>> async with AsyncOmniClient("localhost:8001") as client:  # doctest: +SKIP
        ...     images = await client.generate_many(["a fox", "a cat"], concurrency=2)
    """

    def _open(self) -> Any:
        return None  # created inside the running event loop, on the first call

    # -- plumbing -------------------------------------------------------------------------------
    def _errors(self) -> AbstractContextManager[None]:
        extra: tuple[type[BaseException], ...] = ()
        if self.protocol == "http":
            import aiohttp

            extra = (aiohttp.ClientError,)
        return translate_errors(self.url, extra)

    def _client(self) -> Any:
        if self._closed:
            raise OmniClientError("client is closed")
        if self._triton is None:
            with self._errors():
                if self.protocol == "grpc":
                    import tritonclient.grpc.aio as triton_grpc

                    self._triton = triton_grpc.InferenceServerClient(self.url, verbose=self._verbose, ssl=self._ssl)
                else:
                    import tritonclient.http.aio as triton_http

                    self._triton = triton_http.InferenceServerClient(
                        self.url, verbose=self._verbose, conn_timeout=self.timeout, ssl=self._ssl
                    )
        return self._triton

    def _kwargs(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    # -- health / metadata ---------------------------------------------------------------------
    async def is_live(self) -> bool:
        """Returns whether the server is live. Raises OmniClientError if it cannot be reached."""
        with self._errors():
            return bool(await self._client().is_server_live(**self._kwargs()))

    async def is_ready(self) -> bool:
        """Returns whether the server is ready. Raises OmniClientError if it cannot be reached."""
        with self._errors():
            return bool(await self._client().is_server_ready(**self._kwargs()))

    async def is_model_ready(self, model: str | None = None) -> bool:
        """Returns whether ``model`` (default: the client's model) is loaded and ready."""
        with self._errors():
            return bool(await self._client().is_model_ready(model or self.model, **self._kwargs()))

    async def models(self) -> list[ModelInfo]:
        """Returns the server's model repository index (name, version, state, reason)."""
        with self._errors():
            if self.protocol == "grpc":
                index = await self._client().get_model_repository_index(as_json=True, **self._kwargs())
            else:
                index = await self._client().get_model_repository_index()
        return parse_repository_index(index)

    async def wait_until_ready(
        self, timeout: float = 60.0, poll_interval: float = 0.5, models: Sequence[str] = ()
    ) -> None:
        """Waits until the server and the given models are ready.

        Args:
            timeout: Maximum number of seconds to wait.
            poll_interval: Seconds between checks.
            models: Model names that must be ready too.

        Raises:
            OmniClientError: If not ready within ``timeout`` (with the last error, if any).
        """
        deadline = time.monotonic() + timeout
        last = "server not ready"
        while True:
            try:
                if await self.is_ready():
                    pending = [m for m in models if not await self.is_model_ready(m)]
                    if not pending:
                        return
                    last = f"model(s) not ready: {', '.join(pending)}"
            except OmniClientError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise OmniClientError(f"not ready after {timeout:g} s: {last}", "TIMEOUT")
            await asyncio.sleep(poll_interval)

    # -- generation -----------------------------------------------------------------------------
    async def _infer(self, model: str, inputs: list[Any], output: OutputFormat) -> GenerationOutput:
        with self._errors():
            result = await self._client().infer(model, inputs, **self._kwargs())
        return decode_result(result, output)

    async def generate(
        self,
        prompt: str | GenerationRequest,
        *,
        model: str | None = None,
        output: OutputFormat = "pil",
        **params: Any,
    ) -> GenerationOutput:
        """Generates one image (or video); see :meth:`OmniClient.generate`.

        Args:
            prompt: Prompt text, or a complete :class:`GenerationRequest`.
            model: Model name; None for the client's default model.
            output: ``"pil"`` or ``"numpy"``.
            **params: Other :class:`GenerationRequest` fields.

        Returns:
            The generated image or video.

        Raises:
            InvalidRequestError: If the arguments are invalid (nothing is sent).
            OmniClientError: If the server cannot be reached or reports an error.
        """
        output = check_output_format(output)
        inputs = build_inputs(make_request(prompt, **params), self.protocol)
        return await self._infer(model or self.model, inputs, output)

    async def generate_many(
        self,
        requests: Iterable[GenerationRequest | str],
        concurrency: int = 4,
        *,
        model: str | None = None,
        output: OutputFormat = "pil",
        return_exceptions: bool = False,
    ) -> list[GenerationOutput | OmniClientError]:
        """Sends several requests with up to ``concurrency`` in flight; see
        :meth:`OmniClient.generate_many`.

        Args:
            requests: Requests (or bare prompts); all are validated before any is sent.
            concurrency: Maximum number of requests in flight.
            model: Model name; None for the client's default model.
            output: ``"pil"`` or ``"numpy"``.
            return_exceptions: Return failures in the list instead of raising the first one.

        Returns:
            Outputs in the order of ``requests``.

        Raises:
            InvalidRequestError: If any request is invalid (nothing is sent).
            OmniClientError: On the first failed request, unless ``return_exceptions``; the
                requests still in flight are then cancelled.
        """
        output = check_output_format(output)
        if concurrency < 1:
            raise InvalidRequestError(f"concurrency must be >= 1, got {concurrency}")
        all_inputs = [build_inputs(make_request(r), self.protocol) for r in requests]
        name = model or self.model
        slots = asyncio.Semaphore(concurrency)

        async def one(inputs: list[Any]) -> GenerationOutput | OmniClientError:
            async with slots:
                try:
                    return await self._infer(name, inputs, output)
                except OmniClientError as exc:
                    if return_exceptions:
                        return exc
                    raise

        tasks = [asyncio.ensure_future(one(inputs)) for inputs in all_inputs]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    # -- lifetime -------------------------------------------------------------------------------
    async def close(self) -> None:
        """Closes the connection; idempotent."""
        self._closed = True
        triton, self._triton = self._triton, None
        if triton is not None:
            with self._errors():
                await triton.close()

    async def __aenter__(self) -> AsyncOmniClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncOmniClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"
