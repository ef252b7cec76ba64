"""Synchronous client over ``tritonclient.grpc`` / ``tritonclient.http``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

from ._concurrent import run_many
from ._stream_sync import StreamingMixin
from .errors import InvalidRequestError, OmniClientError, translate_errors
from .models import ModelInfo, parse_repository_index
from .request import GenerationRequest, build_inputs, make_request
from .results import GenerationOutput, OutputFormat, check_output_format, decode_result


class OmniClient(StreamingMixin):
    """Blocking client for the omni-triton diffusion models.

    Args:
        url: Server address (``host:port``, optionally ``http://``-prefixed); None means
            localhost with the protocol's default port (gRPC 8001, HTTP 8000).
        protocol: ``"grpc"`` or ``"http"``.
        model: Default model name used by :meth:`generate`.
        timeout: Client-side timeout in seconds for each call; None waits forever.
        ssl: Use TLS; None infers it from an ``https://`` / ``grpcs://`` url.
        verbose: Let tritonclient print requests and responses.

    Raises:
        InvalidRequestError: If the url or protocol is invalid.

    A gRPC client may be shared between threads; an HTTP one may not (tritonclient.http is not
    thread-safe), use one per thread or :meth:`generate_many`. Streaming models (gRPC only): see
    :meth:`generate_stream` and :meth:`stream`.

    Example:
        >>> with OmniClient("localhost:8001", model="flux") as client:  # doctest: +SKIP
        ...     client.generate("a red fox", seed=0).save("fox.png")
    """

    def _open(self) -> Any:
        return self._connect()

    # -- plumbing -------------------------------------------------------------------------------
    def _errors(self) -> AbstractContextManager[None]:
        return translate_errors(self.url)

    def _connect(self) -> Any:
        with self._errors():
            if self.protocol == "grpc":
                import tritonclient.grpc as triton_grpc

                return triton_grpc.InferenceServerClient(self.url, verbose=self._verbose, ssl=self._ssl)
            import tritonclient.http as triton_http

            return triton_http.InferenceServerClient(
                self.url,
                verbose=self._verbose,
                connection_timeout=self.timeout or 60.0,
                network_timeout=self.timeout,
                ssl=self._ssl,
            )

    def _kwargs(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout} if self.protocol == "grpc" else {}

    # -- health / metadata ---------------------------------------------------------------------
    def is_live(self) -> bool:
        """Returns whether the server is live. Raises OmniClientError if it cannot be reached."""
        with self._errors():
            return bool(self._triton.is_server_live(**self._kwargs()))

    def is_ready(self) -> bool:
        """Returns whether the server is ready. Raises OmniClientError if it cannot be reached."""
        with self._errors():
            return bool(self._triton.is_server_ready(**self._kwargs()))

    def is_model_ready(self, model: str | None = None) -> bool:
        """Returns whether ``model`` (default: the client's model) is loaded and ready.

        Args:
            model: Model name; None for the client's default model.

        Returns:
            True if ready; False if unknown or not ready.
        """
        with self._errors():
            return bool(self._triton.is_model_ready(model or self.model, **self._kwargs()))

    def models(self) -> list[ModelInfo]:
        """Returns the server's model repository index (name, version, state, reason)."""
        with self._errors():
            if self.protocol == "grpc":
                index = self._triton.get_model_repository_index(as_json=True, **self._kwargs())
            else:
                index = self._triton.get_model_repository_index()
        return parse_repository_index(index)

    def wait_until_ready(self, timeout: float = 60.0, poll_interval: float = 0.5, models: Sequence[str] = ()) -> None:
        """Blocks until the server and the given models are ready.

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
                if self.is_ready():
                    pending = [m for m in models if not self.is_model_ready(m)]
                    if not pending:
                        return
                    last = f"model(s) not ready: {', '.join(pending)}"
            except OmniClientError as exc:
                last = str(exc)
            if time.monotonic() >= deadline:
                raise OmniClientError(f"not ready after {timeout:g} s: {last}", "TIMEOUT")
            time.sleep(poll_interval)

    # -- control --------------------------------------------------------------------------------
    def control(self, op: str, *, model: str | None = None, admin_key: str | None = None, **args: Any) -> dict:
        """Runs a control op (``status``, ``sleep``, ``wake``, ``profile_start``, ``profile_stop``).

        Args:
            op: The op name.
            model: Model name; None for the client's default model.
            admin_key: The server's ``admin-key`` header value (needed off loopback).
            **args: The op's arguments (``level`` for sleep, ``max_steps`` for profile_start).

        Returns:
            The model's JSON answer.

        Raises:
            OmniClientError: If the model refuses the op (e.g. ``enable_control`` off).
        """
        from .control import run_control

        return run_control(self, op, model, admin_key, **args)

    # -- generation -----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | GenerationRequest,
        *,
        model: str | None = None,
        output: OutputFormat = "pil",
        **params: Any,
    ) -> GenerationOutput:
        """Generates one image (or video).

        Args:
            prompt: Prompt text, or a complete :class:`GenerationRequest`.
            model: Model name; None for the client's default model.
            output: ``"pil"`` (``PIL.Image``; list of frames for video) or ``"numpy"``
                (``uint8`` ``[H, W, 3]``, or ``[F, H, W, 3]`` for video).
            **params: Other :class:`GenerationRequest` fields (``height``, ``seed``, ...).

        Returns:
            The generated image or video.

        Raises:
            InvalidRequestError: If the arguments are invalid (nothing is sent).
            OmniClientError: If the server cannot be reached or reports an error.
        """
        output = check_output_format(output)
        inputs = build_inputs(make_request(prompt, **params), self.protocol)
        with self._errors():
            result = self._triton.infer(model or self.model, inputs, **self._kwargs())
        return decode_result(result, output)

    def generate_many(
        self,
        requests: Iterable[GenerationRequest | str],
        concurrency: int = 4,
        *,
        model: str | None = None,
        output: OutputFormat = "pil",
        return_exceptions: bool = False,
    ) -> list[GenerationOutput | OmniClientError]:
        """Sends several requests with up to ``concurrency`` of them in flight at once.

        All requests are validated before the first one is sent.

        Args:
            requests: Requests (or bare prompts).
            concurrency: Maximum number of requests in flight.
            model: Model name; None for the client's default model.
            output: ``"pil"`` or ``"numpy"``, as for :meth:`generate`.
            return_exceptions: Put an :class:`OmniClientError` in the result list for failed
                requests instead of raising the first failure.

        Returns:
            Outputs in the order of ``requests``.

        Raises:
            InvalidRequestError: If any request is invalid (nothing is sent).
            OmniClientError: On the first failed request, unless ``return_exceptions``.
        """
        output = check_output_format(output)
        if concurrency < 1:
            raise InvalidRequestError(f"concurrency must be >= 1, got {concurrency}")
        all_inputs = [build_inputs(make_request(r), self.protocol) for r in requests]
        name = model or self.model
        if self.protocol == "grpc":  # the gRPC client is thread-safe: share it

            def infer(inputs: list[Any]) -> Any:
                return self._triton.infer(name, inputs, **self._kwargs())

        else:  # tritonclient.http clients are not: one connection per request

            def infer(inputs: list[Any]) -> Any:
                triton = self._connect()
                try:
                    return triton.infer(name, inputs, **self._kwargs())
                finally:
                    triton.close()

        raw = run_many(infer, all_inputs, concurrency, return_exceptions, self._errors)
        outputs: list[GenerationOutput | OmniClientError] = []
        for item in raw:
            if isinstance(item, OmniClientError):
                outputs.append(item)
            else:
                try:
                    outputs.append(decode_result(item, output))
                except OmniClientError as exc:
                    if not return_exceptions:
                        raise
                    outputs.append(exc)
        return outputs

    # -- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the connection; idempotent."""
        if not self._closed:
            self._closed = True
            with self._errors():
                self._triton.close()

    def __enter__(self) -> OmniClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OmniClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"
