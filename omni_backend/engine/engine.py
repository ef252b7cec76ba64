"""The engine: a background thread that runs ``schedule -> execute -> update`` until stopped.

Callers ``submit`` a validated request with callbacks and return at once (Triton's deferred
responses); the callbacks run on the engine thread. Between steps the engine drops requests
whose client cancelled or whose queue deadline passed, so nobody's slot burns compute for a
client that is gone. When the launcher asks to drain (serving/drain.py) the engine refuses new
requests, fails the queued ones at once and the running ones at the drain deadline, so that every
client is answered before Triton's exit timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from omni_backend.config import EngineConfig
from omni_backend.engine.observer import EngineObserver
from omni_backend.engine.scheduler import SCHEDULERS, QueueFullError, StepPlan, StepProgress, StepResult
from omni_backend.request import DiffusionOutput, DiffusionRequest, ErrorKind
from omni_backend.runner.model_runner import ModelRunner
from omni_backend.serving.drain import POLL_S, DrainSignal

logger = logging.getLogger(__name__)

WAITING_POLL_S = 0.05  # how often queued (not running) requests are checked for cancellation and timeout

OutputCallback = Callable[[DiffusionOutput], None]
ProgressCallback = Callable[[StepProgress], None]


class ShuttingDownError(QueueFullError):
    """Refused because the server is shutting down: like a full queue, the client should go elsewhere."""


@dataclass
class _Client:
    """How to reach the client of one request."""

    request: DiffusionRequest
    on_output: OutputCallback  # exactly once
    on_progress: ProgressCallback | None = None  # after every step it takes
    is_cancelled: Callable[[], bool] | None = None  # polled between steps
    admitted_at: float | None = None  # when it joined the running set


class DiffusionEngine:
    def __init__(
        self,
        runner: ModelRunner,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        drain: DrainSignal | None = None,
    ):
        self.runner = runner
        self.drain = drain or DrainSignal(None)
        self._draining = False
        self.config = config
        admits = runner.loras.admits if runner.loras is not None else None
        self.scheduler = SCHEDULERS[config.scheduling](config, runner.stages.batch_key, admits)
        self.observer = observer or EngineObserver()
        self._clients: dict[str, _Client] = {}
        self._wakeup = threading.Condition()
        self._stopping = False
        self._next_waiting_poll = 0.0
        self._thread = threading.Thread(target=self._loop, name="omni-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        request: DiffusionRequest,
        on_output: OutputCallback,
        on_progress: ProgressCallback | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """Queue a request; raises QueueFullError (nothing queued) when the queue is full."""
        with self._wakeup:
            if self._stopping or self._draining:
                raise ShuttingDownError("the server is shutting down; retry on another instance")
            self.scheduler.add(request)
            self._clients[request.request_id] = _Client(request, on_output, on_progress, is_cancelled)
            self._wakeup.notify()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poll = POLL_S if self.drain.path is not None else None  # wake up to look at the drain file
        while True:
            with self._wakeup:
                self._wakeup.wait_for(lambda: self._stopping or self.scheduler.has_work(), timeout=poll)
                if self._stopping:
                    return
            try:
                self._check_drain()
                self._iterate()
            except Exception as exc:  # an engine bug must fail what it holds, never leave clients hanging
                logger.exception("engine iteration failed; failing every request it holds")
                self._fail_all(f"internal error: {exc}", ErrorKind.INTERNAL)

    def _iterate(self) -> None:
        """One step: drop abandoned requests, schedule, execute, report, deliver."""
        self._drop_abandoned()
        with self._wakeup:
            plan = self.scheduler.schedule()
        if not plan.running_ids:
            return
        result = self._execute(plan)
        self._report_progress(result.progress)
        with self._wakeup:
            self.scheduler.update(plan, result)
            finished = [(self._clients.pop(o.request_id), o) for o in result.finished]
            running = self.scheduler.num_running
        self._observe(self.observer.on_step, len(plan.running_ids))
        self._observe(self.observer.on_running, running)
        for client, output in finished:
            self._deliver(client, output)

    def _execute(self, plan: StepPlan) -> StepResult:
        now = time.monotonic()
        for request in plan.admitted:
            if (client := self._clients.get(request.request_id)) is not None:
                client.admitted_at = now
            self._observe(self.observer.on_admitted, now - request.arrival_time)
        try:
            return self.runner.execute(plan)
        except Exception as exc:  # a runner bug must fail the step's requests, never hang them
            logger.exception("engine step failed")
            self.runner.abort(plan.running_ids)
            return StepResult([DiffusionOutput(i, error=f"internal error: {exc}") for i in plan.running_ids])

    def _drop_abandoned(self) -> None:
        """Fail requests whose client cancelled or whose queue deadline passed, wherever they are.

        Running requests are polled before every step (at most ``max_num_seqs`` of them), so a
        cancelled one stops at the next step boundary; waiting ones, possibly hundreds, every
        ``WAITING_POLL_S`` only: each ``is_cancelled`` is a round trip to the Triton server.
        """
        now = time.monotonic()
        poll_waiting = now >= self._next_waiting_poll
        if poll_waiting:
            self._next_waiting_poll = now + WAITING_POLL_S
        with self._wakeup:
            clients = list(self._clients.values())
            waiting = {r.request_id for r in self.scheduler.waiting}
        dropped: list[DiffusionOutput] = []
        for client in clients:
            request = client.request
            is_waiting = request.request_id in waiting
            if is_waiting and not poll_waiting:
                continue
            if client.is_cancelled is not None and client.is_cancelled():
                dropped.append(DiffusionOutput(request.request_id, error="cancelled", error_kind=ErrorKind.CANCELLED))
            elif request.queue_deadline is not None and is_waiting and now > request.queue_deadline:
                waited = now - request.arrival_time
                message = f"timed out after waiting {waited:.1f} s in the queue (queue_timeout_s)"
                dropped.append(DiffusionOutput(request.request_id, error=message, error_kind=ErrorKind.UNAVAILABLE))
        self._drop(dropped)

    def _drop(self, dropped: list[DiffusionOutput]) -> None:
        """Take these requests out of the engine and answer them with their error."""
        if not dropped:
            return
        with self._wakeup:
            self.scheduler.remove(o.request_id for o in dropped)
            pairs = [(self._clients.pop(o.request_id), o) for o in dropped]
            running = self.scheduler.num_running
        self._observe(self.observer.on_running, running)
        self.runner.abort([o.request_id for o in dropped])
        for client, output in pairs:
            logger.info("request %s dropped: %s", output.request_id, output.error)
            self._deliver(client, output)

    def _check_drain(self) -> None:
        """Shutdown asked: refuse new requests and fail the queued ones now, the running ones at the deadline."""
        deadline = self.drain.deadline()
        if deadline is None:
            return
        if not self._draining:
            with self._wakeup:
                self._draining = True
                waiting = [r.request_id for r in self.scheduler.waiting]
            logger.warning("draining: failing %d queued requests; running ones have until the deadline", len(waiting))
            message = "the server is shutting down; this request had not started"
            self._drop([DiffusionOutput(i, error=message, error_kind=ErrorKind.UNAVAILABLE) for i in waiting])
        if time.monotonic() >= deadline:
            self._fail_all("the server shut down before this request finished", ErrorKind.UNAVAILABLE)

    def _report_progress(self, progress: list[StepProgress]) -> None:
        for update in progress:
            client = self._clients.get(update.request_id)
            if client is not None and client.on_progress is not None:
                try:
                    client.on_progress(update)
                except Exception:
                    logger.exception("progress update of request %s failed", update.request_id)

    @staticmethod
    def _observe(event: Callable[..., None], *args: float) -> None:
        try:
            event(*args)
        except Exception:  # metrics are never worth a request
            logger.exception("engine observer failed")

    def _deliver(self, client: _Client, output: DiffusionOutput) -> None:
        if output.error is None:
            self._observe(self.observer.on_finished, time.monotonic() - client.request.arrival_time)
            if output.timings is not None and client.admitted_at is not None:
                output.timings.queue_s = client.admitted_at - client.request.arrival_time
                if self.config.log_stage_timings:
                    logger.info("request %s: %s", output.request_id, output.timings.summary())
        try:
            client.on_output(output)
        except Exception:  # a broken response path must not stop the engine for everyone else
            logger.exception("delivering the output of request %s failed", output.request_id)

    # ------------------------------------------------------------------ shutdown

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; every request still held is answered with an error."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)
        self._fail_all("the model was unloaded before this request finished", ErrorKind.UNAVAILABLE)

    def _fail_all(self, message: str, kind: ErrorKind) -> None:
        with self._wakeup:
            self.scheduler.drain()
            clients = list(self._clients.values())
            self._clients.clear()
        self.runner.abort([c.request.request_id for c in clients])
        for client in clients:
            self._deliver(client, DiffusionOutput(client.request.request_id, error=message, error_kind=kind))
