"""Pipeline parallel's communication: only the last stage runs the scheduler step and sends the latents
back; the first stage posts the receive and goes on without waiting (AsyncLatents, async_latents.py).

- Two ranks step one batch by hand. The last rank may run a scheduler step only after rank 0 has
  returned from its own ``step`` (an event between the processes): rank 0 must not wait for the
  new latents there, or the two deadlock (the wait gives up after a minute: a failure, not a timing).
  Rank 0 never runs a scheduler step, nobody broadcasts, and rank 0's final latents equal one process's.
- The worker group (pp2) under a hand-written plan sequence, against the in-process runner: a request
  joining mid-way, previews, a cancelled request whose latents were in flight; equal progress,
  previews and images.
- cfg2 x pp2: each cfg rank's pipeline carries its share of the rows; the last stages all-gather.
- The pipeline does not drain between steps: the last rank holds request 1's row of step 1 until
  rank 0 has started request 0's rows of step 2 (an event between the processes). That needs the last
  stage to have stepped request 0 and sent its latents early, and rank 0 to wait for request 1's
  latents only when request 1 is next; if either waited for the whole step, the ranks would deadlock.
"""

from __future__ import annotations

import queue
import tempfile
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import FlowMatchEulerDiscreteScheduler

from omni_backend.config import ParallelConfig, parse_model_config
from omni_backend.distributed.async_latents import AsyncLatents
from omni_backend.distributed.denoiser import ParallelDenoiser
from omni_backend.distributed.groups import build_groups, init_process_group, rendezvous
from omni_backend.distributed.spec import resolve_spec
from omni_backend.distributed.worker import ParallelRunner
from omni_backend.engine.scheduler import StepPlan, StepResult
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput
from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.parallel import denoise_loop, load_transformer_stage, run_parallel

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

WAIT_S = 60.0  # a guard against a deadlock, never a timing assertion


def request(i: int, negative: str | None, cfg: float, steps: int, preview_every: int = 0) -> DiffusionRequest:
    params = SamplingParams(64, 64, steps, 3.5, cfg, i)
    return DiffusionRequest(str(i), params, f"prompt {i}", negative, preview_every=preview_every)


@pytest.fixture(scope="module")
def flux(tiny_flux) -> FluxStages:
    return FluxStages.load(str(tiny_flux), Component.ALL, torch.float32, torch.device("cpu"), FluxOptions())


@pytest.fixture(scope="module")
def cases(flux) -> list:
    requests = [request(0, "blurry", 3.0, 3), request(1, None, 1.0, 2)]
    return list(zip(requests, flux.encode(requests), strict=True))


def _rank_main(rank: int, init_method: str, checkpoint: str, cases: list, stepped: Any, results: Any) -> None:
    torch.set_num_threads(1)
    init_process_group(rank, 2, torch.device("cpu"), init_method, timeout_s=120)
    counts = {"scheduler_steps": 0, "broadcasts": 0}
    scheduler_step = FlowMatchEulerDiscreteScheduler.step

    def counted_step(self, *args, **kwargs):
        if rank == 1 and not stepped.wait(WAIT_S):  # rank 0 first returns from its step, unblocked
            raise RuntimeError("rank 0 did not return from its step before the last stage's latents were sent")
        counts["scheduler_steps"] += 1
        return scheduler_step(self, *args, **kwargs)

    def counted_broadcast(*args, **kwargs):
        counts["broadcasts"] += 1
        return broadcast(*args, **kwargs)

    broadcast = dist.broadcast
    FlowMatchEulerDiscreteScheduler.step = counted_step
    dist.broadcast = counted_broadcast
    try:
        stages = load_transformer_stage("flux", checkpoint)
        parallel = ParallelConfig(pipeline_parallel_size=2)
        denoiser = ParallelDenoiser(stages, resolve_spec("flux"), build_groups(parallel, torch.device("cpu")))
        denoiser.install()
        states = [stages.prepare(r, c) for r, c in cases]
        stages.step(states, stages.denoise(states))  # the first step by hand
        if rank == 0:
            posted = sorted(denoiser.stepper.pending)
            in_flight = [isinstance(s.latents, AsyncLatents) for s in states]
            stepped.set()
        running = [s for s in states if not s.finished]
        while running:
            stages.step(running, stages.denoise(running))
            running = [s for s in running if not s.finished]
        latents = [stages.output_latents(s).numpy() for s in states]
        if rank == 0:
            results.put((counts, posted, in_flight, latents, sorted(denoiser.stepper.pending)))
        else:
            results.put(counts)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(rank_main: Any, checkpoint: str, cases: list, replies: int) -> list:
    """Spawn two ranks running ``rank_main(rank, init_method, checkpoint, cases, event, results)`` (the event
    is shared between them) and collect ``replies`` results."""
    ctx = mp.get_context("spawn")
    event, results = ctx.Event(), ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="omni-group-") as directory:
        args = (rendezvous(directory), checkpoint, cases, event, results)
        procs = mp.start_processes(rank_main, args=args, nprocs=2, join=False, start_method="spawn")
        collected: list = []
        while len(collected) < replies:
            try:
                collected.append(results.get(timeout=1.0))
            except queue.Empty:  # raises with a rank's traceback if one failed (the deadlock guard included)
                procs.join(timeout=0)
        procs.join()
    return collected


def test_first_stage_posts_the_receive_and_only_the_last_stage_steps(tiny_flux, flux, cases):
    expected = denoise_loop(flux, flux.denoise, cases).latents
    replies = _run_two_ranks(_rank_main, str(tiny_flux), cases, replies=2)
    (first, posted, in_flight, latents, left), last = sorted(replies, key=lambda r: isinstance(r, dict))
    assert posted == ["0", "1"] and in_flight == [True, True]  # both receives posted, neither waited for
    assert left == []  # every receive was waited for by the end
    assert first == {"scheduler_steps": 0, "broadcasts": 0}
    assert last == {"scheduler_steps": 3 + 2, "broadcasts": 0}  # each request's steps, on the last stage
    for i, (want, got) in enumerate(zip(expected, latents, strict=True)):
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4, msg=f"request {i}")


def test_cfg2_pp2_matches_single_process(tiny_flux, flux, cases):
    expected = denoise_loop(flux, flux.denoise, cases).latents
    layout = ParallelConfig(cfg_parallel_size=2, pipeline_parallel_size=2)
    (result,) = run_parallel("flux", str(tiny_flux), [(layout, cases)])
    for i, (want, got) in enumerate(zip(expected, result.latents, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=f"request {i}")


def _run(runner: Any, plans: list[tuple[StepPlan, list[str]]]) -> tuple[list, dict]:
    """Execute each plan, then abort its listed ids; every step's (id, step, preview) and the outputs."""
    progress, outputs = [], {}
    for plan, aborted in plans:
        result: StepResult = runner.execute(plan)
        progress += [(p.request_id, p.step, p.preview) for p in result.progress]
        outputs.update({o.request_id: o for o in result.finished})
        if aborted:
            runner.abort(aborted)
    return progress, outputs


def test_worker_group_pp2_joins_previews_and_cancels_like_one_process(tiny_flux, flux, flux_reference):
    a, b, c = request(0, "blurry", 3.0, 3, preview_every=1), request(1, None, 1.0, 2), request(2, "dark", 2.0, 3)
    plans = [
        (StepPlan(admitted=[a, c], running_ids=["0", "2"]), ["2"]),  # c is cancelled with its latents in flight
        (StepPlan(admitted=[b], running_ids=["0", "1"]), []),  # b joins at a's second step
        (StepPlan(running_ids=["0", "1"]), []),  # both finish
    ]
    expected_progress, expected = _run(ModelRunner(flux, RunnerOutput.IMAGE), plans)
    config = parse_model_config({"family": "flux", "model": str(tiny_flux), "pipeline_parallel_size": "2"}, FluxOptions)
    runner = ParallelRunner(flux, config, Component.ALL, RunnerOutput.IMAGE, "cpu")
    try:
        progress, outputs = _run(runner, plans)
    finally:
        runner.close()
    assert [(i, s) for i, s, _ in progress] == [(i, s) for i, s, _ in expected_progress]
    previews = [(p, q) for (_, _, p), (_, _, q) in zip(progress, expected_progress, strict=True) if q is not None]
    assert len(previews) == 2  # a's steps 1 and 2 (the last step sends the image instead)
    for got, want in previews:
        assert isinstance(got, np.ndarray)
        assert_same_image(got, want)
    assert sorted(outputs) == ["0", "1"]
    for r in (a, b):
        assert outputs[r.request_id].error is None, outputs[r.request_id].error
        assert_same_image(outputs[r.request_id].outputs["image"], expected[r.request_id].outputs["image"])
        p = r.params
        reference = flux_reference(
            r.prompt, p.seed, negative_prompt=r.negative_prompt, true_cfg_scale=p.true_cfg_scale, height=p.height,
            width=p.width, num_inference_steps=p.num_inference_steps,
        )  # fmt: skip
        assert_same_image(outputs[r.request_id].outputs["image"], reference)


def _overlap_rank_main(rank: int, init_method: str, checkpoint: str, cases: list, started: Any, results: Any) -> None:
    torch.set_num_threads(1)
    init_process_group(rank, 2, torch.device("cpu"), init_method, timeout_s=120)
    try:
        stages = load_transformer_stage("flux", checkpoint)
        parallel = ParallelConfig(pipeline_parallel_size=2)
        denoiser = ParallelDenoiser(stages, resolve_spec("flux"), build_groups(parallel, torch.device("cpu")))
        denoiser.install()
        rows = [0]  # micro-batches this rank's stage has started: 3 per step (request 0 with CFG, request 1)

        def on_row(*_: Any) -> None:
            rows[0] += 1
            if rank == 0 and rows[0] == 4:  # request 0's first row of step 2
                started.set()
            if rank == 1 and rows[0] == 3 and not started.wait(WAIT_S):  # request 1's row of step 1
                raise RuntimeError("rank 0 did not start step 2 while the last stage was still in step 1")

        denoiser.pipelines[0].blocks[0].register_forward_pre_hook(on_row)
        result = denoise_loop(stages, stages.denoise, cases)
        if rank == 0:
            results.put([x.numpy() for x in result.latents])
    finally:
        dist.destroy_process_group()


def test_first_stage_starts_the_next_step_before_the_last_stage_ends_this_one(tiny_flux, flux, cases):
    expected = denoise_loop(flux, flux.denoise, cases).latents
    (latents,) = _run_two_ranks(_overlap_rank_main, str(tiny_flux), cases, replies=1)
    for i, (want, got) in enumerate(zip(expected, latents, strict=True)):
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4, msg=f"request {i}")
