"""Worker group: the ranks of a parallel model instance as spawned processes, driven like a ModelRunner.

``ParallelRunner`` has the ModelRunner's verbs (``execute(plan) -> StepResult``, ``abort(ids)``)
so the engine drives world size > 1 exactly like world size 1, which stays in-process
(``make_runner``). The driver only passes control messages: each rank receives the same StepPlan
(requests, with their conditioning when the ensemble sent it), holds the per-request state in its
own ModelRunner and runs ``denoise`` through a ParallelDenoiser (under pipeline parallel, only the
last stage steps the schedulers: async_latents.py); rank 0 sends the StepResult back.
Tensors cross processes through torch.multiprocessing queues, i.e. shared memory (a file descriptor
is pickled, never the data); output images are turned into tensors for that.

A rank that dies (OOM kill, segfault) is noticed within ``POLL_S`` while the driver waits: the step
fails with a WorkerDiedError naming the rank (the engine fails every request in flight with it),
the rest of the group is stopped and the next step starts a fresh group (the states were lost).

Only rank 0 answers a step, but a fault can hit one rank alone (pipeline parallel's last stage runs
the scheduler steps; a device runs out of memory). Such a rank reports the requests it failed; one
that rank 0 kept (or rank 0 still not answering that step DIVERGENCE_GRACE_S later) means the ranks'
states disagree and a collective would wait for a peer that never comes (until COLLECTIVE_TIMEOUT_S):
the driver stops the group and fails the step with a RanksDivergedError naming the rank and its
error, as for a dead rank. Requests rank 0 failed
alone are aborted on the other ranks, so none keeps their state.
The launcher, seeing the rank gone, also takes the model out of service for a reload
(serving/supervisor.py): Triton 2.51 offers a Python model no way to report itself unready.
"""

from __future__ import annotations

import logging
import multiprocessing as std_mp
import os
import queue
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from omni_backend.config import ConfigError, ModelConfig
from omni_backend.distributed.denoiser import ParallelDenoiser
from omni_backend.distributed.groups import (
    build_groups,
    cpu_threads_per_rank,
    init_process_group,
    rank_device,
    rendezvous,
)
from omni_backend.distributed.spec import resolve_spec
from omni_backend.distributed.validate import validate_parallel
from omni_backend.engine.control import ControlRefusedError
from omni_backend.engine.scheduler import StepPlan, StepResult
from omni_backend.lora.registry import LoraRegistry
from omni_backend.pipelines.base import Component
from omni_backend.runner.control import RunnerControl
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput, load_stages
from omni_backend.testing import faults

logger = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting driver checks that every rank is alive
COLLECTIVE_TIMEOUT_S = 60.0  # a survivor blocked on a dead peer gives up after this (it is stopped anyway)
# a rank reported failing requests in a step rank 0 has not answered: if rank 0 failed them too (the same
# fault on every rank) it answers about as soon; if it waits on that rank's part, it never does
DIVERGENCE_GRACE_S = 10.0


class WorkerDiedError(RuntimeError):
    """A rank of the worker group exited; the requests in flight are lost."""


class RanksDivergedError(RuntimeError):
    """A rank failed requests that rank 0 kept: the ranks' states no longer agree (the group restarts)."""


@dataclass
class _RankSetup:
    config: ModelConfig
    components: Component
    output: RunnerOutput
    base_device: str  # the instance's device; rank r uses the r-th GPU from it, or the CPU
    init_method: str  # the group's rendezvous (groups.rendezvous)
    name: str  # the Triton model's name (profile trace file names)


def _to_shared(result: StepResult) -> StepResult:
    """numpy arrays -> tensors, so the queue moves them through shared memory instead of the pipe."""
    for output in result.finished:
        output.outputs = {k: torch.from_numpy(v) for k, v in output.outputs.items()}  # type: ignore[misc]
    for progress in result.progress:
        if isinstance(progress.preview, np.ndarray):
            progress.preview = torch.from_numpy(progress.preview)
    return result


def _from_shared(result: StepResult) -> StepResult:
    for output in result.finished:
        output.outputs = {k: v.numpy() for k, v in output.outputs.items()}  # type: ignore[union-attr]
    for progress in result.progress:
        if isinstance(progress.preview, torch.Tensor):
            progress.preview = progress.preview.numpy()
    return result


def _rank_main(rank: int, world: int, setup: _RankSetup, commands: Any, results: Any) -> None:
    device = rank_device(torch.device(setup.base_device), rank)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(world))
    init_process_group(rank, world, device, setup.init_method, COLLECTIVE_TIMEOUT_S)
    try:
        spec = resolve_spec(setup.config.family)
        stages = load_stages(setup.config, setup.components, device)
        for transformer in spec.transformers(stages):
            validate_parallel(setup.config.parallel, spec, dict(transformer.config), device)
        denoiser = ParallelDenoiser(stages, spec, build_groups(setup.config.parallel, device))
    except Exception as exc:
        if rank == 0:
            results.put(("error", exc))
        commands.get()  # stay alive until the driver stops the group, so it sees the error, not a death
        return
    # the runner calls stages.denoise (and step): on a rank, the distributed calls (instance attributes)
    denoiser.install()
    stages = faults.maybe_inject_on_rank(stages, rank, world)
    # only rank 0 answers, so only rank 0 decodes images
    control = RunnerControl(lambda: stages, setup.config, setup.components, setup.name, rank)
    runner = ModelRunner(stages, setup.output if rank == 0 else RunnerOutput.LATENTS, control=control)
    if rank == 0:
        results.put(("ready", os.getpid()))
    steps = 0
    while (command := commands.get()) is not None:
        verb, payload = command
        if verb == "execute":
            steps += 1
            result = runner.execute(payload)
            if rank == 0:
                results.put(("result", _to_shared(result)))
            elif failed := [output for output in result.finished if output.error is not None]:
                report = (rank, steps, [output.request_id for output in failed], failed[0].error)
                results.put(("failed", report))
        elif verb == "abort":
            runner.abort(payload)
        elif verb == "control":  # every rank answers: each has its own profiler (and trace file)
            try:
                results.put(("control", (rank, runner.run_control(*payload))))
            except Exception as exc:
                results.put(("control", (rank, exc)))


class ParallelRunner:
    """The driver of a worker group; a drop-in for ModelRunner in the engine."""

    loras = None  # LoRA is not supported with a worker group (config.py rejects lora_dir there)

    def __init__(
        self,
        stages: Any,
        config: ModelConfig,
        components: Component,
        output: RunnerOutput,
        device: str,
        name: str = "model",
    ):
        self.stages = stages  # the driver's own copy: batch keys and request parsing only
        self.output = output
        self._setup = (config, components, output, device, name)
        self._procs: list[std_mp.process.BaseProcess] = []
        self._steps = 0  # steps of the current group, numbered as every rank numbers them
        self._failed_on_rank0: dict[int, set[str]] = {}  # step -> the requests rank 0 failed in it
        self._reports: list[tuple[float, int, int, list[str], str]] = []  # (arrival, rank, step, failed, why)
        self._start()

    def _start(self) -> None:
        config, components, output, device, name = self._setup
        self._rendezvous_dir = tempfile.TemporaryDirectory(prefix="omni-group-")
        setup = _RankSetup(config, components, output, device, rendezvous(self._rendezvous_dir.name), name)
        world = config.parallel.world_size
        ctx = mp.get_context("spawn")
        self._commands = [ctx.Queue() for _ in range(world)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(target=_rank_main, args=(rank, world, setup, self._commands[rank], self._results), daemon=True)
            for rank in range(world)
        ]
        for proc in self._procs:
            proc.start()
        kind, payload = self._receive()
        if kind == "error":
            self.close()
            raise ConfigError(str(payload)) if isinstance(payload, ConfigError) else payload
        logger.info("worker group of %d ranks ready (pids %s)", world, [p.pid for p in self._procs])

    def _receive(self) -> tuple[str, Any]:
        while True:
            try:
                message = self._results.get(timeout=POLL_S)
            except queue.Empty:
                self._check_alive()
                self._check_reports()
                continue
            # rank 0 may answer because a collective failed on the dead peer: report the death, not that
            self._check_alive()
            if message[0] == "failed":
                self._reports.append((time.monotonic(), *message[1]))
                self._check_reports()
                continue
            return message

    def _check_reports(self) -> None:
        """Raise RanksDivergedError once another rank failed a request that rank 0 kept in the same step."""
        waiting = []
        for arrival, rank, step, failed, why in self._reports:
            known = self._failed_on_rank0.get(step)
            if known is None and time.monotonic() - arrival < DIVERGENCE_GRACE_S:
                waiting.append((arrival, rank, step, failed, why))  # rank 0 is still on that step
            elif known is None or set(failed) - known:
                logger.error("parallel worker rank %d failed requests %s that rank 0 kept: %s", rank, failed, why)
                self.close()
                raise RanksDivergedError(
                    f"parallel worker rank {rank} failed where rank 0 did not ({why}); "
                    "the group restarts and its requests are lost"
                )
        self._reports = waiting

    def _check_alive(self) -> None:
        dead = [(rank, p.exitcode) for rank, p in enumerate(self._procs) if not p.is_alive()]
        if dead:
            rank, code = dead[0]
            logger.error("parallel worker rank %d (pid %s) died, exit code %s", rank, self._procs[rank].pid, code)
            self.close()
            raise WorkerDiedError(f"parallel worker rank {rank} died (exit code {code}); its requests are lost")

    def _broadcast(self, verb: str, payload: Any) -> None:
        for commands in self._commands:
            commands.put((verb, payload))

    def execute(self, plan: StepPlan) -> StepResult:
        if not self._procs:  # the previous group died: its states are gone, start afresh
            self._start()
        self._steps += 1
        self._broadcast("execute", plan)
        kind, payload = self._receive()
        result = _from_shared(payload)
        failed = {output.request_id for output in result.finished if output.error is not None}
        self._failed_on_rank0[self._steps] = failed
        self._failed_on_rank0.pop(self._steps - 64, None)  # a report comes within a step or two
        self._check_reports()
        if failed:  # the other ranks may still hold them (a fault on rank 0 alone)
            for commands in self._commands[1:]:
                commands.put(("abort", sorted(failed)))
        return result

    def abort(self, request_ids: list[str]) -> None:
        if self._procs:
            self._broadcast("abort", list(request_ids))

    def run_control(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Every rank runs the op (sleep and wake move each rank's own weights, shards included); rank 0's
        answer, with every rank's traces and statuses."""
        parallel = self._setup[0].parallel
        if op == "sleep" and args["level"] == 2 and parallel.tensor_parallel_size * parallel.pipeline_parallel_size > 1:
            # a reload is the whole checkpoint; a rank holds shards (tensor) or some blocks (pipeline) of it
            message = "sleep level 2 is not supported with tensor_parallel_size or pipeline_parallel_size > 1"
            raise ControlRefusedError("control.level", message)
        if not self._procs:
            self._start()
        self._broadcast("control", (op, args))
        replies: dict[int, Any] = {}
        while len(replies) < len(self._procs):
            kind, (rank, reply) = self._receive()
            replies[rank] = reply
        for rank in sorted(replies):
            if isinstance(replies[rank], Exception):
                raise replies[rank]
        merged = dict(replies[0])
        if "traces" in merged:
            merged["traces"] = [trace for rank in sorted(replies) for trace in replies[rank]["traces"]]
        if op in ("status", "sleep", "wake"):
            merged["ranks"] = [replies[rank] for rank in sorted(replies)]
        return merged

    def wait_decoded(self) -> None:
        """Nothing to wait for: rank 0 decodes in its own step (ModelRunner's engine-thread path)."""

    def close(self) -> None:
        """Stop every rank (ours: started by _start) and forget them."""
        for commands, proc in zip(self._commands, self._procs, strict=True):
            if proc.is_alive():
                commands.put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():  # blocked in a collective with a dead peer
                proc.kill()
                proc.join()
        self._procs = []
        self._steps, self._failed_on_rank0, self._reports = 0, {}, []
        self._rendezvous_dir.cleanup()


def make_runner(
    stages: Any,
    config: ModelConfig,
    components: Component,
    output: RunnerOutput,
    device: torch.device,
    name: str = "model",
    loras: LoraRegistry | None = None,
) -> ModelRunner | ParallelRunner:
    """World size 1 runs in-process; larger worlds in a worker group."""
    if config.parallel.world_size == 1:
        control = RunnerControl(lambda: stages, config, components, name, loras=loras)
        synchronize = config.engine.log_stage_timings
        wanted = config.engine.background_decode == "true" or (
            config.engine.background_decode == "auto" and device.type == "cuda"
        )
        background_decode = wanted and config.acceleration.offload == "none"
        return ModelRunner(stages, output, synchronize, control, loras, background_decode)
    return ParallelRunner(stages, config, components, output, str(device), name)
