"""Exceptions raised by :mod:`omni_client` and helpers that translate transport errors."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from tritonclient.utils import InferenceServerException


class OmniClientError(Exception):
    """Error talking to the server, or an error reported by the server.

    Args:
        message: Human readable message (for server errors: the server's own message).
        status: Status reported by the server or transport (e.g. ``"StatusCode.INVALID_ARGUMENT"``
            for gRPC, ``"400"`` for HTTP), if any.
        debug_details: Extra details from tritonclient, if any.
    """

    def __init__(self, message: str, status: str | None = None, debug_details: str | None = None) -> None:
        super().__init__(message)
        self._message = message
        self._status = status
        self._debug_details = debug_details

    def message(self) -> str:
        """Returns the error message without the status prefix."""
        return self._message

    def status(self) -> str | None:
        """Returns the status code reported by the server/transport, or None."""
        return self._status

    def debug_details(self) -> str | None:
        """Returns the debug details reported by tritonclient, or None."""
        return self._debug_details

    def __str__(self) -> str:
        if self._status:
            return f"[{self._status}] {self._message}"
        return self._message

    @classmethod
    def from_triton(cls, exc: InferenceServerException) -> OmniClientError:
        """Builds an error from a tritonclient ``InferenceServerException``.

        Args:
            exc: The tritonclient exception.

        Returns:
            An ``OmniClientError`` carrying the server's message and status.
        """
        msg = exc.message() if exc.message() is not None else str(exc)
        status = exc.status()
        return cls(str(msg), None if status is None else str(status), exc.debug_details())


class InvalidRequestError(OmniClientError, ValueError):
    """A request argument is invalid; detected locally before anything is sent."""


@contextmanager
def translate_errors(target: str, extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Re-raises transport and server errors as :class:`OmniClientError`.

    Args:
        target: Description of the server (e.g. ``"localhost:8001"``) used in connection errors.
        extra: Additional exception types (e.g. ``aiohttp.ClientError``) to translate.

    Yields:
        Nothing; wraps the body of the ``with`` statement.
    """
    try:
        yield
    except OmniClientError:
        raise
    except InferenceServerException as exc:
        error = OmniClientError.from_triton(exc)
        if error.status() == "StatusCode.UNAVAILABLE":
            error = OmniClientError(f"cannot reach server at {target}: {error.message()}", error.status())
        raise error from exc
    except (TimeoutError, asyncio.TimeoutError) as exc:
        raise OmniClientError(f"request to {target} timed out", "TIMEOUT") from exc
    except (OSError, *extra) as exc:
        detail = str(exc) or type(exc).__name__
        raise OmniClientError(f"cannot reach server at {target}: {detail}", "UNAVAILABLE") from exc


class GenerationCancelled(OmniClientError):
    """A streaming generation was cancelled (on the server too) at the caller's request."""


class StopGeneration(Exception):
    """Raise from an ``on_progress`` callback to cancel a streaming generation.

    ``generate_stream`` then cancels the request on the server and raises
    :class:`GenerationCancelled`.
    """
