"""Device out-of-memory in a batched call: free the memory, retry each request alone once.

A batch that runs out of memory may fit one request at a time (activation memory grows with the
batch), so the runner does not fail a whole batch for it: it frees what the failed call held and
runs every request of the batch alone. A request that runs out of memory even alone fails with a
clear message; its neighbours go on. Anything else an alone call raises also fails only that
request. The model keeps serving either way.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class Failed:
    """One request's part of a batched call that failed; ``message`` goes to its client."""

    message: str


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError on every device


def free_device_memory() -> None:
    """Return cached blocks to the device once the failed call's tensors are unreachable."""
    gc.collect()  # an exception's traceback frames may still reference the tensors of the failed call
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_message(where: str, exc: BaseException, alone: bool = False) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    retried = " (also when run alone, after its batch ran out of memory)" if alone else ""
    return f"out of device memory during {where}{retried}: {first_line}"


def run_batched(fn: Callable[[Sequence[_T]], Sequence[Any]], items: Sequence[_T], where: str) -> list[Any]:
    """``fn(items)`` (one result per item); on OOM with several items, each item alone once.

    Raises what a batch of one raises (the caller fails that request); otherwise returns one
    result per item, a :class:`Failed` for those that failed alone.
    """
    try:
        return list(fn(items))
    except Exception as exc:
        if len(items) < 2 or not is_oom(exc):
            raise
        logger.warning("%s ran out of device memory for a batch of %d; retrying each request alone", where, len(items))
    free_device_memory()
    results: list[Any] = []
    for item in items:
        failure = None
        try:
            results.append(fn([item])[0])
        except Exception as exc:  # fails this request only
            failure = Failed(oom_message(where, exc, alone=True) if is_oom(exc) else f"{where} failed: {exc}")
        if failure is not None:
            free_device_memory()
            results.append(failure)
    return results
