"""Bounded-concurrency request runner for the synchronous client."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from .errors import OmniClientError

ErrorScope = Callable[[], AbstractContextManager[None]]


def run_many(
    infer: Callable[[list[Any]], Any],
    all_inputs: list[list[Any]],
    concurrency: int,
    keep: bool,
    errors: ErrorScope,
) -> list[Any]:
    """Runs ``infer(inputs)`` for every request on ``concurrency`` threads.

    Plain blocking calls on a thread pool, rather than tritonclient's callback-based
    ``async_infer``: every call returns or raises, so nothing can wait for a callback that never
    comes, and the HTTP client's gevent greenlets (which print tracebacks on failure) stay out.

    Args:
        infer: Sends one request and returns its ``InferResult``; must be thread-safe.
        all_inputs: ``InferInput`` lists, one per request.
        concurrency: Maximum in-flight requests.
        keep: Keep going after a failure (``return_exceptions``) instead of stopping.
        errors: Factory of the error-translating context manager.

    Returns:
        ``InferResult`` or :class:`OmniClientError` per request, in order.

    Raises:
        OmniClientError: The first failure, unless ``keep``.
    """
    results: list[Any] = [None] * len(all_inputs)
    failed = threading.Event()

    def work(index: int, inputs: list[Any]) -> None:
        if failed.is_set() and not keep:
            return
        try:
            with errors():
                results[index] = infer(inputs)
        except OmniClientError as exc:
            results[index] = exc
            failed.set()

    with ThreadPoolExecutor(concurrency, thread_name_prefix="omni-client") as pool:
        for future in [pool.submit(work, i, inputs) for i, inputs in enumerate(all_inputs)]:
            future.result()
    if not keep:
        for item in results:
            if isinstance(item, OmniClientError):
                raise item
    return results
