"""Step scheduler: decides, between denoising steps, which requests run the next step.

Policy only: it holds requests and ids, never tensors (those live in the runner), so it is
unit-tested on CPU with hand-built results. One transformer call per step serves the running
batch: requests with the same batching key, at most ``max_num_seqs`` of them, each at its own
step index. New requests of that key join between steps; a request of another key waits until
the running batch drains, and same-key requests that arrived after it do not overtake it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from omni_backend.config import EngineConfig
from omni_backend.request import DiffusionOutput, DiffusionRequest


class QueueFullError(RuntimeError):
    """The engine already holds ``max_queue_size`` waiting requests."""


@dataclass
class StepPlan:
    """What the runner does in one engine step."""

    admitted: list[DiffusionRequest] = field(default_factory=list)  # join now: encode + prepare first
    running_ids: list[str] = field(default_factory=list)  # take one denoising step (admitted included)


@dataclass
class StepResult:
    """What one engine step produced."""

    finished: list[DiffusionOutput] = field(default_factory=list)  # done or failed; leave the batch


class StepScheduler:
    def __init__(self, config: EngineConfig, batch_key: Callable[[DiffusionRequest], Hashable]):
        self.config = config
        self.batch_key = batch_key
        self.waiting: deque[tuple[Hashable, DiffusionRequest]] = deque()  # FIFO by arrival
        self.running: dict[str, DiffusionRequest] = {}
        self.running_key: Hashable | None = None

    def add(self, request: DiffusionRequest) -> None:
        if len(self.waiting) >= self.config.max_queue_size:
            raise QueueFullError(f"the queue is full ({self.config.max_queue_size} requests waiting); retry later")
        self.waiting.append((self.batch_key(request), request))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        if not self.running and self.waiting:
            self.running_key = self.waiting[0][0]
        plan = StepPlan()
        free = self.config.max_num_seqs - len(self.running)
        # FIFO across keys: admit from the front while it has the running key, so nobody
        # overtakes an older request of another key
        while free > 0 and self.waiting and self.waiting[0][0] == self.running_key:
            _, request = self.waiting.popleft()
            self.running[request.request_id] = request
            plan.admitted.append(request)
            free -= 1
        plan.running_ids = list(self.running)
        return plan

    def update(self, plan: StepPlan, result: StepResult) -> None:
        for output in result.finished:
            self.running.pop(output.request_id, None)
        if not self.running:
            self.running_key = None

    def drain(self) -> list[DiffusionRequest]:
        """Remove and return every request (engine shutdown)."""
        requests = [r for _, r in self.waiting] + list(self.running.values())
        self.waiting.clear()
        self.running.clear()
        self.running_key = None
        return requests
