"""Run whole denoising loops over a parallel group of spawned CPU processes (gloo), for tests and benchmarks.

``run_parallel(...)`` spawns ``world`` ranks; each loads the transformer stage from the checkpoint,
enables the parallel layout of each job in turn, prepares the same requests from the same
conditioning and runs every step through ``ParallelDenoiser``. Rank 0 sends back the final latents
(the layout ``decode`` takes) and the seconds the loop took.
"""

from __future__ import annotations

import os
import queue
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omni_backend.config import ParallelConfig
from omni_backend.distributed.denoiser import ParallelDenoiser
from omni_backend.distributed.groups import build_groups, init_process_group, rendezvous
from omni_backend.distributed.spec import resolve_spec
from omni_backend.distributed.validate import validate_parallel
from omni_backend.pipelines.base import Component, Conditioning, DenoiseState, PipelineStages
from omni_backend.registry import resolve_family
from omni_backend.request import DiffusionRequest


@dataclass
class LoopResult:
    latents: list[torch.Tensor]  # per request, as ``output_latents``
    seconds: float  # the denoising loop alone (prepare and load excluded)


Cases = list[tuple[DiffusionRequest, Conditioning]]  # requests with their text conditioning


def denoise_loop(
    stages: PipelineStages, denoise: Callable[[Sequence[DenoiseState]], list[torch.Tensor]], cases: Cases
) -> LoopResult:
    """All requests in one batch from the first step; finished ones leave, as the step scheduler does."""
    states = [stages.prepare(request, cond) for request, cond in cases]
    started = time.perf_counter()
    running = list(states)
    while running:
        stages.step(running, denoise(running))
        running = [s for s in running if not s.finished]
    latents = [stages.output_latents(s).clone() for s in states]  # under pipeline parallel: waits for the last
    return LoopResult(latents, time.perf_counter() - started)


def load_transformer_stage(
    family: str, checkpoint: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> PipelineStages:
    spec = resolve_family(family)
    return spec.load(checkpoint, Component.TRANSFORMER, dtype, torch.device(device), spec.options_cls())


def _put(results: mp.Queue, result: LoopResult) -> None:
    # numpy pickles by value: a tensor would travel as a file descriptor that dies with this rank
    results.put((result.seconds, [x.numpy() for x in result.latents]))


def _rank_main(
    rank: int,
    world: int,
    init_method: str,
    family: str,
    checkpoint: str,
    jobs: list[tuple[ParallelConfig | None, Cases]],
    results: mp.Queue,
    pin_cores: bool,
) -> None:
    if pin_cores:  # the benchmark's "one device per rank": one core, one thread
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank % len(os.sched_getaffinity(0))]})
    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_process_group(rank, world, device, init_method, timeout_s=900)
    try:
        for parallel, cases in jobs:
            stages = load_transformer_stage(family, checkpoint)
            if parallel is None:  # the baseline: rank 0 alone and in-process while the others wait
                dist.barrier()
                if rank == 0:
                    _put(results, denoise_loop(stages, stages.denoise, cases))
                dist.barrier()
                continue
            spec = resolve_spec(family)
            for transformer in spec.transformers(stages):
                validate_parallel(parallel, spec, dict(transformer.config), device)
            ParallelDenoiser(stages, spec, build_groups(parallel, device)).install()
            dist.barrier()
            result = denoise_loop(stages, stages.denoise, cases)
            if rank == 0:
                _put(results, result)
    finally:
        dist.destroy_process_group()


# the layouts the parallel tests cover per family (the "_uneven" ones run at a size the degree does not divide)
LAYOUTS_2 = {
    "cfg2": ParallelConfig(cfg_parallel_size=2),
    "ulysses2": ParallelConfig(ulysses_degree=2),
    "ring2": ParallelConfig(ring_degree=2),
    "tp2": ParallelConfig(tensor_parallel_size=2),
    "pp2": ParallelConfig(pipeline_parallel_size=2),
    "ulysses2_uneven": ParallelConfig(ulysses_degree=2),
}
LAYOUTS_4 = {
    "ulysses2_ring2": ParallelConfig(ulysses_degree=2, ring_degree=2),
    "cfg2_ulysses2": ParallelConfig(cfg_parallel_size=2, ulysses_degree=2),
    "cfg2_ulysses2_uneven": ParallelConfig(cfg_parallel_size=2, ulysses_degree=2),
}


def run_parallel(
    family: str, checkpoint: str, jobs: list[tuple[ParallelConfig | None, Cases]], pin_cores: bool = False
) -> list[LoopResult]:
    """One LoopResult per (layout, requests) job, run in turn by one spawned group (one world size).

    A ``None`` layout is the single-process baseline, run by rank 0 alone inside the same group (so a
    benchmark can interleave it with the parallel runs on a machine whose load changes).
    """
    worlds = {p.world_size for p, _ in jobs if p is not None}
    if len(worlds) != 1:
        raise ValueError("the layouts of one run_parallel call need one world size")
    world = worlds.pop()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="omni-group-") as directory:
        args = (world, rendezvous(directory), family, checkpoint, jobs, results, pin_cores)
        procs = mp.start_processes(_rank_main, args=args, nprocs=world, join=False, start_method="spawn")
        collected: list[LoopResult] = []
        while len(collected) < len(jobs):
            try:
                seconds, latents = results.get(timeout=1.0)
                collected.append(LoopResult([torch.from_numpy(x) for x in latents], seconds))
            except queue.Empty:
                procs.join(timeout=0)  # raises ProcessRaisedException with the rank's traceback if one died
        procs.join()
    return collected
