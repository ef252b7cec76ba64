"""Where the step engine's time goes under load: the engine in this process (no Triton), profiled.

The same checkpoint and closed-loop mix as ``benchmarks.step_batching`` (``--clients`` threads, each
cycling through a seeded shuffle of (short | long steps) x two ``--sizes``), but the clients submit
straight to a ``DiffusionEngine`` in this process, so what is measured is the engine and the runner
alone. Per ``--modes`` (none / request / step, as step_batching's three copies of ``flux``): a
window of ``--requests`` completions after ``--warmup``, then a ``torch.profiler`` window of
``--profile-requests`` more. It prints throughput and the short class's p50, the share of the
profiled window in which the device ran kernels, the host time of the engine's phases (labels put
around the runner's methods here, not in the library), and the host's waits for the device
(stream / device synchronizations and blocking copies). ``--trace DIR`` keeps the Chrome traces.

    python -m benchmarks.engine_profile --checkpoint wide --device cuda --dtype bfloat16 --sizes 256 512
    python -m benchmarks.engine_profile --sizes 128 256   # the same on a CPU
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.overhead import PROMPT
from benchmarks.step_batching import CLASSES, MODES, build_checkpoint, client_plan, run_clients
from omni_backend.config import EngineConfig
from omni_backend.engine.engine import DiffusionEngine
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions, FluxStages
from omni_backend.request import DiffusionOutput, DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput

# (object attribute, label): the engine's phases, as the profiler's table names them
PHASES = (
    ("engine._execute", "engine: one step, all of it"),
    ("engine._drop_abandoned", "engine: drop abandoned"),
    ("engine._deliver_decoded", "engine: deliver decoded"),
    ("runner._admit", "runner: encode + prepare joiners"),
    ("stages.denoise", "stages: transformer call"),
    ("stages.step", "stages: scheduler steps"),
    ("runner._finish", "runner: finish (hand to decode)"),
    ("runner._decode", "runner: VAE decode"),
)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync")


def label(owner: Any, name: str, text: str) -> None:
    """Wrap ``owner.name`` in a profiler label (instance attribute: the library's classes are untouched)."""
    method = getattr(owner, name)

    @functools.wraps(method)
    def labelled(*args: Any, **kwargs: Any) -> Any:
        with record_function(text):
            return method(*args, **kwargs)

    setattr(owner, name, labelled)


def closed_loop(engine: DiffusionEngine, args: argparse.Namespace, count: int, seed: int) -> dict[str, Any]:
    """``count`` completions of ``args.clients`` closed-loop clients; wall time and latencies per class."""
    lock, finished = threading.Lock(), threading.Event()
    latencies: dict[str, list[float]] = {cls: [] for cls in CLASSES}
    done, errors = [0], list[str]()

    def client(index: int) -> None:
        plan = client_plan(args, seed, index)
        n = 0
        while not finished.is_set():
            cls, steps, size = plan[n % len(plan)]
            answered = threading.Event()
            outputs: list[DiffusionOutput] = []
            params = SamplingParams(size, size, steps, 3.5, 1.0, seed * 100000 + index * 1000 + n)
            request = DiffusionRequest(f"{seed}-{index}-{n}", params, prompt=PROMPT)
            start = time.perf_counter()
            engine.submit(request, lambda o, out=outputs, ev=answered: (out.append(o), ev.set()))
            answered.wait()
            n += 1
            with lock:
                if outputs[0].error is not None:
                    errors.append(outputs[0].error)
                latencies[cls].append(time.perf_counter() - start)
                done[0] += 1
                if done[0] >= count:
                    finished.set()

    started = time.perf_counter()
    run_clients(args.clients, client)
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    return {"seconds": time.perf_counter() - started, "latencies": latencies}


def device_busy_share(prof: profile, seconds: float) -> float:
    """Share of the window in which at least one device kernel ran (union of kernel intervals)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start
    )
    busy, end = 0.0, -1.0
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e6 / seconds  # profiler times are in microseconds


def report(mode: str, measured: dict[str, Any], profiled: dict[str, Any], prof: profile, requests: int) -> None:
    short = np.median(measured["latencies"]["short"])
    long = np.median(measured["latencies"]["long"])
    print(f"\n== {mode}: {requests / measured['seconds']:.2f} req/s; p50 short {short:.3f} s, long {long:.3f} s")
    seconds = profiled["seconds"]
    events = {e.key: e for e in prof.key_averages()}
    if torch.cuda.is_available():
        print(f"   profiled window {seconds:.2f} s; device busy {device_busy_share(prof, seconds):.0%} of it")
    else:
        print(f"   profiled window {seconds:.2f} s")
    for _, text in PHASES:
        if text in events:
            e = events[text]
            print(f"   {text:<36} {e.count:>6} calls {e.cpu_time_total / 1e3:>9.1f} ms host")
    for name in WAITS:
        if name in events:
            e = events[name]
            print(f"   {name:<36} {e.count:>6} calls {e.cpu_time_total / 1e3:>9.1f} ms host")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs=2, default=[128, 256])
    for name, default in (("short-steps", 4), ("long-steps", 24), ("clients", 8), ("warmup", 8), ("requests", 48),
                          ("profile-requests", 16)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--checkpoint", choices=("tiny", "wide"), default="tiny")
    parser.add_argument("--wide-layers", default="4,8", help="double,single blocks of --checkpoint wide")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--background-decode", default="auto", choices=("auto", "true", "false"))
    parser.add_argument("--trace", type=Path, help="write each mode's Chrome trace here")
    args = parser.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    background = args.background_decode == "true" or (args.background_decode == "auto" and device.type == "cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        layers = tuple(int(n) for n in args.wide_layers.split(","))
        checkpoint = build_checkpoint(args.checkpoint, Path(tmp) / "flux", layers, args.device, dtype)
        stages = FluxStages.load(str(checkpoint), Component.ALL, dtype, device, FluxOptions())
    print(f"{args.checkpoint} checkpoint, {args.dtype} on {device}, background decode {background}, "
          f"{args.clients} clients, sizes {args.sizes}")  # fmt: skip
    for name, text in PHASES:
        if name.startswith("stages."):  # shared by every mode's runner: labelled once
            label(stages, name.split(".")[1], text)
    for mode in args.modes:
        params = MODES[mode]
        config = EngineConfig(max_num_seqs=int(params["max_num_seqs"]), scheduling=params.get("scheduling", "step"))
        runner = ModelRunner(stages, RunnerOutput.IMAGE, background_decode=background)
        engine = DiffusionEngine(runner, config)
        for name, text in PHASES:
            owner = {"engine": engine, "runner": runner}.get(name.split(".")[0])
            if owner is not None:
                label(owner, name.split(".")[1], text)
        try:
            closed_loop(engine, args, args.warmup, seed=1)
            measured = closed_loop(engine, args, args.requests, seed=2)
            # the engine and decode threads run before the profile starts: record every thread
            every_thread = torch.profiler._ExperimentalConfig(profile_all_threads=True)
            with profile(activities=activities, experimental_config=every_thread) as prof:
                profiled = closed_loop(engine, args, args.profile_requests, seed=3)
        finally:
            engine.stop()
            runner.close()
        report(mode, measured, profiled, prof, args.requests)
        if args.trace is not None:
            args.trace.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(args.trace / f"engine_{mode}.json"))


if __name__ == "__main__":
    main()
