"""The engine: a background thread that runs ``schedule -> execute -> update`` until stopped.

Callers ``submit`` a validated request with callbacks and return at once (Triton's deferred
responses); the callbacks run on the engine thread, also for requests the runner decodes on its
decode thread (they leave the running batch at once; their outputs are handed back here).
Between steps the engine drops requests whose client cancelled or whose queue deadline passed,
so nobody's slot burns compute for a client that is gone. When the launcher asks to drain
(serving/drain.py) the engine refuses new requests, fails the queued ones at once and the
running ones at the drain deadline, so that every client is answered before Triton's exit
timeout.

Control ops (engine/control.py: sleep, wake, profiling, status) queue here too and run on this
thread between steps, in arrival order, so none races a transformer call. ``sleep`` first lets the
running requests finish, admitting none (the queued ones wait); once asleep, waiting and new
requests get UNAVAILABLE "model is asleep", or wake the model with ``wake_on_request``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial

from omni_backend.config import ControlConfig, EngineConfig
from omni_backend.engine.control import WAITS_FOR_IDLE, ControlCall, ControlReply
from omni_backend.engine.observer import EngineObserver
from omni_backend.engine.scheduler import SCHEDULERS, QueueFullError, StepPlan, StepProgress, StepResult
from omni_backend.request import DiffusionOutput, DiffusionRequest, ErrorKind, InvalidRequestError
from omni_backend.runner.model_runner import ModelRunner
from omni_backend.serving.drain import POLL_S, DrainSignal

logger = logging.getLogger(__name__)

WAITING_POLL_S = 0.05  # how often queued (not running) requests are checked for cancellation and timeout

OutputCallback = Callable[[DiffusionOutput], None]
ProgressCallback = Callable[[StepProgress], None]


class ShuttingDownError(QueueFullError):
    """Refused because the server is shutting down: like a full queue, the client should go elsewhere."""


class ModelAsleepError(QueueFullError):
    """Refused because the model sleeps (control op ``sleep``) and ``wake_on_request`` is off."""


def _asleep_message(level: int) -> str:
    return f"model is asleep (sleep level {level}); wake it with the control op 'wake' or set wake_on_request"


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
        control: ControlConfig | None = None,
    ):
        self.runner = runner
        self.wake_on_request = (control or ControlConfig()).wake_on_request
        self._commands: deque[ControlCall] = deque()
        self._asleep = 0  # the sleep level the runner reported (0: awake)
        self.drain = drain or DrainSignal(None)
        self._draining = False
        self.config = config
        admits = runner.loras.admits if runner.loras is not None else None
        self.scheduler = SCHEDULERS[config.scheduling](config, runner.stages.batch_key, admits)
        self.observer = observer or EngineObserver()
        self._clients: dict[str, _Client] = {}
        self._decoded: deque[DiffusionOutput] = deque()  # from the decode thread, to deliver here
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
            if self._asleep and not self.wake_on_request:
                raise ModelAsleepError(_asleep_message(self._asleep))
            self.scheduler.add(request)
            self._clients[request.request_id] = _Client(request, on_output, on_progress, is_cancelled)
            self._wakeup.notify()

    def control(self, call: ControlCall) -> None:
        """Queue a validated control op; ``call.on_done`` answers it from the engine thread."""
        with self._wakeup:
            if not self._stopping:
                self._commands.append(call)
                self._wakeup.notify()
                return
        call.on_done(ControlReply(error="the model is being unloaded", error_kind=ErrorKind.UNAVAILABLE))

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poll = POLL_S if self.drain.path is not None else None  # wake up to look at the drain file
        while True:
            with self._wakeup:
                self._wakeup.wait_for(self._has_work, timeout=poll)
                if self._stopping:
                    return
            try:
                self._check_drain()
                self._iterate()
            except Exception as exc:  # an engine bug must fail what it holds, never leave clients hanging
                logger.exception("engine iteration failed; failing every request it holds")
                self._fail_all(f"internal error: {exc}", ErrorKind.INTERNAL)

    def _has_work(self) -> bool:
        return self._stopping or self.scheduler.has_work() or bool(self._commands) or bool(self._decoded)

    def _iterate(self) -> None:
        """One step: drop abandoned requests, run control ops, schedule, execute, report, deliver."""
        self._deliver_decoded()
        self._drop_abandoned()
        self._run_commands()
        self._serve_or_refuse_while_asleep()
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
        for decoding in result.decoding:
            decoding.outputs.add_done_callback(partial(self._on_decoded, decoding.request_ids))
        self._observe(self.observer.on_step, len(plan.running_ids))
        self._observe(self.observer.on_running, running)
        for client, output in finished:
            self._deliver(client, output)
        self._deliver_decoded()

    def _on_decoded(self, request_ids: list[str], future: Future[list[DiffusionOutput]]) -> None:
        """On the decode thread: queue the outputs for the engine thread to deliver."""
        try:
            outputs = future.result()
        except Exception as exc:  # the runner answers its faults; anything else must still answer
            outputs = [DiffusionOutput(i, error=f"internal error: {exc}") for i in request_ids]
        with self._wakeup:
            self._decoded.extend(outputs)
            self._wakeup.notify()

    def _deliver_decoded(self) -> None:
        """Answer the requests decoded in the background; one dropped meanwhile (cancelled) was answered then."""
        with self._wakeup:
            outputs, self._decoded = list(self._decoded), deque()
            pairs = [(c, o) for o in outputs if (c := self._clients.pop(o.request_id, None)) is not None]
        for client, output in pairs:
            self._deliver(client, output)

    # ------------------------------------------------------------------ control ops

    def _run_commands(self) -> None:
        """Run the queued control ops in order; one that waits for idle pauses admission until then."""
        while True:
            with self._wakeup:
                if not self._commands:
                    self.scheduler.paused = False
                    return
                call = self._commands[0]
                if call.op in WAITS_FOR_IDLE and self.scheduler.num_running:
                    self.scheduler.paused = True  # let the running requests finish; the queued ones wait
                    return
                self._commands.popleft()
            self._answer(call, self._run_command(call.op, call.args))

    def _run_command(self, op: str, args: dict) -> ControlReply:
        self.runner.wait_decoded()  # no op may move or drop weights under a decode
        try:
            result = self.runner.run_control(op, args)
        except InvalidRequestError as exc:
            return ControlReply(error=str(exc), error_kind=ErrorKind.INVALID_ARG)
        except Exception as exc:  # a failed op must be answered, and the engine keeps serving
            logger.exception("control op %s failed", op)
            return ControlReply(error=f"control op {op!r} failed: {exc}", error_kind=ErrorKind.INTERNAL)
        with self._wakeup:
            self._asleep = result.get("sleep_level", self._asleep) if op in ("sleep", "wake") else self._asleep
            if op == "status":
                result.update(running=self.scheduler.num_running, queued=len(self.scheduler.waiting))
        return ControlReply(result)

    @staticmethod
    def _answer(call: ControlCall, reply: ControlReply) -> None:
        try:
            call.on_done(reply)
        except Exception:  # a broken response path must not stop the engine
            logger.exception("answering control op %s failed", call.op)

    def _serve_or_refuse_while_asleep(self) -> None:
        """Asleep with requests waiting: wake for them (``wake_on_request``) or answer UNAVAILABLE."""
        with self._wakeup:
            waiting = [r.request_id for r in self.scheduler.waiting] if self._asleep else []
        if not waiting:
            return
        if self.wake_on_request:
            reply = self._run_command("wake", {})
            if reply.error is None:
                logger.info("woken by %d waiting requests (wake_on_request)", len(waiting))
                return
            message, kind = f"waking the model failed: {reply.error}", ErrorKind.INTERNAL
        else:
            message, kind = _asleep_message(self._asleep), ErrorKind.UNAVAILABLE
        self._drop([DiffusionOutput(i, error=message, error_kind=kind) for i in waiting])

    # ------------------------------------------------------------------ steps

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
            calls, self._commands = list(self._commands), deque()
        for call in calls:
            self._answer(call, ControlReply(error=message, error_kind=kind))
        self.runner.abort([c.request.request_id for c in clients])
        for client in clients:
            self._deliver(client, DiffusionOutput(client.request.request_id, error=message, error_kind=kind))
