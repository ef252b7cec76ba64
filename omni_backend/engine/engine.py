"""The engine: a background thread that runs ``schedule -> execute -> update`` until stopped.

Callers ``submit`` a validated request with a completion callback and return at once (Triton's
deferred responses); the callback runs on the engine thread with the request's output.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from omni_backend.config import EngineConfig
from omni_backend.engine.scheduler import StepResult, StepScheduler
from omni_backend.request import DiffusionOutput, DiffusionRequest
from omni_backend.runner.model_runner import ModelRunner

logger = logging.getLogger(__name__)

OutputCallback = Callable[[DiffusionOutput], None]


class DiffusionEngine:
    def __init__(self, runner: ModelRunner, config: EngineConfig):
        self.runner = runner
        self.scheduler = StepScheduler(config, runner.stages.batch_key)
        self._callbacks: dict[str, OutputCallback] = {}
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="omni-engine", daemon=True)
        self._thread.start()

    def submit(self, request: DiffusionRequest, on_output: OutputCallback) -> None:
        """Queue a request; raises QueueFullError (nothing queued) when the queue is full."""
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the model is shutting down")
            self.scheduler.add(request)
            self._callbacks[request.request_id] = on_output
            self._wakeup.notify()

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                self._wakeup.wait_for(lambda: self._stopping or self.scheduler.has_work())
                if self._stopping:
                    return
                plan = self.scheduler.schedule()
            try:
                result = self.runner.execute(plan)
            except Exception as exc:  # a runner bug must fail the step's requests, never hang them
                logger.exception("engine step failed")
                self.runner.abort(plan.running_ids)
                result = StepResult([DiffusionOutput(i, error=f"internal error: {exc}") for i in plan.running_ids])
            with self._wakeup:
                self.scheduler.update(plan, result)
                callbacks = [(self._callbacks.pop(o.request_id), o) for o in result.finished]
            for callback, output in callbacks:
                self._deliver(callback, output)

    @staticmethod
    def _deliver(callback: OutputCallback, output: DiffusionOutput) -> None:
        try:
            callback(output)
        except Exception:  # a broken response path must not stop the engine for everyone else
            logger.exception("delivering the output of request %s failed", output.request_id)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; every request still held is answered with an error."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)
        with self._wakeup:
            pending = self.scheduler.drain()
            callbacks = [(self._callbacks.pop(r.request_id), r.request_id) for r in pending]
        self.runner.abort([request_id for _, request_id in callbacks])
        for callback, request_id in callbacks:
            self._deliver(
                callback,
                DiffusionOutput(request_id, error="the model was unloaded before this request finished"),
            )
