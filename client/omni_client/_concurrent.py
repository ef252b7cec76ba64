"""Bounded-concurrency request runners for the synchronous client (tritonclient ``async_infer``)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from .errors import OmniClientError

ErrorScope = Callable[[], AbstractContextManager[None]]


def _check_failures(results: list[Any], keep: bool) -> list[Any]:
    if not keep:
        for item in results:
            if isinstance(item, OmniClientError):
                raise item
    return results


def run_many_grpc(
    triton: Any,
    model: str,
    all_inputs: list[list[Any]],
    concurrency: int,
    keep: bool,
    kwargs: dict[str, Any],
    errors: ErrorScope,
) -> list[Any]:
    """Runs gRPC ``async_infer`` calls with at most ``concurrency`` in flight.

    Args:
        triton: ``tritonclient.grpc.InferenceServerClient`` (thread-safe).
        model: Model name.
        all_inputs: ``InferInput`` lists, one per request.
        concurrency: Maximum in-flight requests.
        keep: Keep going after a failure (``return_exceptions``) instead of stopping.
        kwargs: Extra keyword arguments for ``async_infer`` (timeouts).
        errors: Factory of the error-translating context manager.

    Returns:
        ``InferResult`` or :class:`OmniClientError` per request, in order.

    Raises:
        OmniClientError: The first failure, unless ``keep``.
    """
    results: list[Any] = [None] * len(all_inputs)
    slots = threading.Semaphore(concurrency)
    failed = threading.Event()

    def callback(index: int, result: Any, error: Any) -> None:
        try:
            if error is not None:
                try:
                    with errors():  # same translation as for synchronous calls
                        raise error
                except OmniClientError as exc:
                    results[index] = exc
                failed.set()
            else:
                results[index] = result
        finally:
            slots.release()

    for index, inputs in enumerate(all_inputs):
        slots.acquire()
        if failed.is_set() and not keep:
            slots.release()
            break
        try:
            with errors():
                # tritonclient calls callback(result=..., error=...)
                triton.async_infer(model, inputs, functools.partial(callback, index), **kwargs)
        except OmniClientError as exc:
            results[index] = exc
            failed.set()
            slots.release()
    for _ in range(concurrency):  # wait until nothing is in flight
        slots.acquire()
    return _check_failures(results, keep)


def run_many_http(
    connect: Callable[[], Any],
    model: str,
    all_inputs: list[list[Any]],
    concurrency: int,
    keep: bool,
    errors: ErrorScope,
) -> list[Any]:
    """Runs HTTP ``infer`` calls on ``concurrency`` worker threads.

    ``tritonclient.http`` clients are not thread-safe, so every request uses its own client from
    ``connect`` (a new connection costs far less than a diffusion step). Plain threads are used
    rather than the client's gevent ``async_infer``, whose failed greenlets print tracebacks.

    Args:
        connect: Returns a new ``tritonclient.http.InferenceServerClient``.
        model: Model name.
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
                triton = connect()
                try:
                    results[index] = triton.infer(model, inputs)
                finally:
                    triton.close()
        except OmniClientError as exc:
            results[index] = exc
            failed.set()

    with ThreadPoolExecutor(concurrency, thread_name_prefix="omni-client") as pool:
        for future in [pool.submit(work, i, inputs) for i, inputs in enumerate(all_inputs)]:
            future.result()
    return _check_failures(results, keep)
