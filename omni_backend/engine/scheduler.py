"""Step scheduler: decides, between denoising steps, which requests run the next step.

Policy only: it holds requests and ids, never tensors (those live in the runner), so it is
unit-tested on CPU with hand-built results.

- Admission is FIFO across all keys: whenever fewer than ``max_num_seqs`` requests are running,
  the oldest waiting request joins, whatever its key, so nobody is overtaken.
- Each step serves ONE batching key: every running request with that key takes one step in a
  single transformer call, whatever its step index and total step count.
- Keys take turns round robin, one step each, so a short 256x256 request is never stuck
  behind a long 1024x1024 batch (no head-of-line blocking across keys).
- A request's LoRA adapter (name and scale) is part of its key: one transformer call runs one
  adapter setting. An optional admission gate (the model's LoRA registry) holds the oldest waiting
  request back while its adapter could not be resident next to those of the running requests.

``RequestLevelScheduler`` is the classic alternative (Triton's dynamic batching inside the
model): a batch is formed only when nothing is running and runs to completion. It exists to be
measured against (benchmarks/) and for deployments that want it (``scheduling: request``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field

from omni_backend.config import EngineConfig
from omni_backend.request import DiffusionOutput, DiffusionRequest


class QueueFullError(RuntimeError):
    """The engine already holds ``max_queue_size`` waiting requests, or requests come faster than allowed."""


class RateLimiter:
    """Token bucket: ``rate`` requests per second on average, bursts of up to ``max(1, rate)``."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.clock = clock
        self.tokens = self.capacity
        self.updated = clock()

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class StepPlan:
    """What the runner does in one engine step: one transformer call for one batching key."""

    admitted: list[DiffusionRequest] = field(default_factory=list)  # join now: encode + prepare first
    running_ids: list[str] = field(default_factory=list)  # take one denoising step (admitted included)


@dataclass
class StepProgress:
    """One request's progress after a step (streamed to clients that asked)."""

    request_id: str
    step: int  # steps done, 1..total_steps
    total_steps: int
    preview: object | None = None  # uint8 numpy image [h, w, 3] (video: [frames, h, w, 3]) when a preview was due


@dataclass
class Decoding:
    """Requests that left the batch and are being decoded on the runner's decode thread."""

    request_ids: list[str]
    outputs: Future[list[DiffusionOutput]]  # one per request, errors included


@dataclass
class StepResult:
    """What one engine step produced."""

    finished: list[DiffusionOutput] = field(default_factory=list)  # done or failed; leave the batch
    progress: list[StepProgress] = field(default_factory=list)  # every request that took the step
    decoding: list[Decoding] = field(default_factory=list)  # done denoising; leave the batch, answered later


AdmissionGate = Callable[[DiffusionRequest, Collection[DiffusionRequest]], bool]  # (request, running) -> may join


class StepScheduler:
    def __init__(
        self,
        config: EngineConfig,
        batch_key: Callable[[DiffusionRequest], Hashable],
        admits: AdmissionGate | None = None,
    ):
        self.config = config
        self.family_key = batch_key
        self.admits = admits
        self.waiting: deque[DiffusionRequest] = deque()  # FIFO by arrival
        self.running: dict[Hashable, dict[str, DiffusionRequest]] = {}  # key -> requests, in turn order
        self.joining: dict[Hashable, list[DiffusionRequest]] = {}  # admitted, not yet prepared by the runner
        self.rate = RateLimiter(config.max_request_rate) if config.max_request_rate > 0 else None
        self.paused = False  # admit nobody (a control op waits for the running requests to finish)

    @property
    def num_running(self) -> int:
        return sum(len(batch) for batch in self.running.values())

    def add(self, request: DiffusionRequest) -> None:
        if len(self.waiting) >= self.config.max_queue_size:
            raise QueueFullError(f"the queue is full ({self.config.max_queue_size} requests waiting); retry later")
        if self.rate is not None and not self.rate.allow():
            raise QueueFullError(f"over the rate limit of {self.config.max_request_rate:g} requests/s; retry later")
        self.waiting.append(request)

    def batch_key(self, request: DiffusionRequest) -> Hashable:
        return (self.family_key(request), request.lora)

    def _may_join(self, request: DiffusionRequest) -> bool:
        if self.admits is None:
            return True
        return self.admits(request, [r for batch in self.running.values() for r in batch.values()])

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        if not self.paused:
            self._admit()
        if not self.running:
            return StepPlan()
        key = next(iter(self.running))
        self.running[key] = self.running.pop(key)  # to the back of the round-robin order
        return StepPlan(admitted=self.joining.pop(key, []), running_ids=list(self.running[key]))

    def _admit(self) -> None:
        # FIFO: a held-back oldest request holds back the rest, so nobody overtakes it
        while self.waiting and self.num_running < self.config.max_num_seqs and self._may_join(self.waiting[0]):
            self._join(self.waiting.popleft())

    def _join(self, request: DiffusionRequest) -> None:
        key = self.batch_key(request)
        self.running.setdefault(key, {})[request.request_id] = request
        self.joining.setdefault(key, []).append(request)

    def update(self, plan: StepPlan, result: StepResult) -> None:
        leaving = [output.request_id for output in result.finished]
        self.remove(leaving + [i for decoding in result.decoding for i in decoding.request_ids])

    def remove(self, request_ids: Iterable[str]) -> list[DiffusionRequest]:
        """Take requests out wherever they are (finished, cancelled, timed out); return those found."""
        ids = set(request_ids)
        removed = [r for r in self.waiting if r.request_id in ids]
        self.waiting = deque(r for r in self.waiting if r.request_id not in ids)
        for key in list(self.running):
            batch = self.running[key]
            removed += [batch.pop(i) for i in ids & batch.keys()]
            if key in self.joining:
                self.joining[key] = [r for r in self.joining[key] if r.request_id not in ids]
            if not batch:
                del self.running[key]
                self.joining.pop(key, None)
        return removed

    def drain(self) -> list[DiffusionRequest]:
        """Remove and return every request (engine shutdown)."""
        requests = list(self.waiting) + [r for batch in self.running.values() for r in batch.values()]
        self.waiting.clear()
        self.running.clear()
        self.joining.clear()
        return requests


class RequestLevelScheduler(StepScheduler):
    """Whole-request batching: a batch forms only when nothing runs, and runs to completion."""

    def _admit(self) -> None:
        if self.running or not self.waiting:
            return
        # no admission gate needed: a batch forms when nothing runs and holds one key, so one adapter
        key = self.batch_key(self.waiting[0])
        for request in [r for r in self.waiting if self.batch_key(r) == key][: self.config.max_num_seqs]:
            self.waiting.remove(request)
            self._join(request)


SCHEDULERS: dict[str, type[StepScheduler]] = {"step": StepScheduler, "request": RequestLevelScheduler}
