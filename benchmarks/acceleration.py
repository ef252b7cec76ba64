"""Acceleration: speed-up against quality for every step cache, the prompt-embedding cache, offload.

In-process (no server: the features sit below the Triton layer), on ``--model PATH`` (a diffusers
FLUX.1 folder; default: the tiny checkpoint built in a tmp dir). Every figure compares with the
uncached, unoffloaded run of the same requests on the same machine, in the same process:

- step caches: each backend at three settings (TaylorSeer has no threshold: its cache_interval),
  ``--prompts`` requests alone, ``--steps`` steps at ``--size``: mean latency per request, speed-up,
  skipped fraction of transformer rows, PSNR and max pixel error to the uncached image; plus the
  cost of running diffusers' hooks one row per call: a step batch of all prompts at threshold 0
  against the uncached step batch;
- prompt-embedding cache: ``encode`` of one prompt, miss against hit;
- offload: latency per request and peak device memory per mode (CUDA only; on a CPU the modes
  only move bookkeeping, so only latency is reported).

    python -m benchmarks.acceleration [--model PATH] [--size 256] [--steps 28] [--prompts 3] [--smoke]
    python -m benchmarks.acceleration --model demo/flux-shapes --size 64 --steps 20 \
        --prompt "a red circle on a blue background" --prompt "a yellow triangle on a green background"

Writes acceleration.{csv,md} to ``--out-dir`` (default benchmarks/results)."""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from omni_backend.config import EngineConfig, parse_model_config
from omni_backend.engine.observer import AccelerationObserver
from omni_backend.engine.scheduler import StepScheduler
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.flux import FluxOptions
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.model_runner import ModelRunner, RunnerOutput, load_accelerated
from omni_backend.testing.tiny import build_tiny_flux

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox in the snow, photograph", "a lighthouse at dusk, oil painting", "a bowl of ramen, top view"]
SETTINGS = {  # three settings per backend, mild to aggressive
    "tea_cache": [{"rel_l1_thresh": t} for t in (0.2, 0.6, 1.5)],
    "first_block_cache": [{"threshold": t} for t in (0.05, 0.2, 0.5)],
    "mag_cache": [{"threshold": t} for t in (0.06, 0.2, 0.5)],
    "taylorseer": [{"cache_interval": n, "disable_cache_before_step": 2} for n in (2, 3, 5)],
}
FIELDS = ["feature", "setting", "latency_s", "speedup", "skipped_frac", "psnr_db", "max_err", "peak_mem_mib"]


class Counts(AccelerationObserver):
    def __init__(self) -> None:
        self.skipped = self.computed = 0

    def on_cache_steps(self, skipped: int, computed: int) -> None:
        self.skipped += skipped
        self.computed += computed


def load(model: Path, device: torch.device, **parameters: str):
    config = parse_model_config({"family": "flux", "model": str(model), **parameters}, FluxOptions)
    counts = Counts()
    stages, applied = load_accelerated(config, Component.ALL, device, counts)
    return stages, applied, counts


def generate(stages, requests: list[DiffusionRequest]) -> tuple[dict[str, np.ndarray], float]:
    """All ``requests`` step-batched to completion: (images or videos by id, wall seconds)."""
    runner = ModelRunner(stages, RunnerOutput.IMAGE, synchronize=True)
    scheduler = StepScheduler(EngineConfig(max_num_seqs=len(requests)), stages.batch_key)
    for request in requests:
        scheduler.add(request)
    images = {}
    started = time.perf_counter()
    while scheduler.has_work():
        plan = scheduler.schedule()
        result = runner.execute(plan)
        scheduler.update(plan, result)
        for output in result.finished:
            assert output.error is None, output.error
            images[output.request_id] = output.outputs[stages.output_name]  # image or video
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return images, time.perf_counter() - started


def requests(args: argparse.Namespace, tag: str) -> list[DiffusionRequest]:
    params = [SamplingParams(args.size, args.size, args.steps, 3.5, 1.0, seed) for seed in range(args.prompts)]
    prompts = args.prompt or PROMPTS
    return [DiffusionRequest(f"{tag}-{i}", p, prompt=prompts[i % len(prompts)]) for i, p in enumerate(params)]


def alone(stages, args: argparse.Namespace, tag: str) -> tuple[list[np.ndarray], float]:
    """Each request alone, best of ``--rounds`` (a shared machine only ever adds time); (images, mean latency)."""
    images, total = [], 0.0
    for request in requests(args, tag):
        best = float("inf")
        for round_ in range(args.rounds):
            out, seconds = generate(stages, [replace(request, request_id=f"{request.request_id}-{round_}")])
            best = min(best, seconds)
        images.append(out[f"{request.request_id}-{round_}"])
        total += best
    return images, total / args.prompts


def quality(images: list[np.ndarray], reference: list[np.ndarray]) -> tuple[float, int]:
    diffs = [a.astype(np.float64) - b.astype(np.float64) for a, b in zip(images, reference, strict=True)]
    mse = float(np.mean([np.mean(d**2) for d in diffs]))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    return psnr, int(max(np.abs(d).max() for d in diffs))


def step_cache_rows(args, device, reference, base_latency) -> list[dict]:
    rows = []
    for backend, settings in SETTINGS.items():
        for setting in settings[:1] if args.smoke else settings:
            stages, _, counts = load(args.model, device, cache_backend=backend, cache_config=json.dumps(setting))
            alone(stages, args, "warm")  # first-call costs out of the measurement
            counts.skipped = counts.computed = 0
            images, latency = alone(stages, args, backend)
            psnr, max_err = quality(images, reference)
            rows.append({
                "feature": backend, "setting": json.dumps(setting), "latency_s": latency,
                "speedup": base_latency / latency, "skipped_frac": counts.skipped / (counts.skipped + counts.computed),
                "psnr_db": psnr, "max_err": max_err,
            })  # fmt: skip
    return rows


def per_row_cost(args, device) -> list[dict]:
    """diffusers' hooks run one call per row: a step batch of all prompts at threshold 0, vs uncached."""
    plain, _, _ = load(args.model, device)
    generate(plain, requests(args, "warm"))
    _, batched = generate(plain, requests(args, "b"))
    hooks, _, _ = load(args.model, device, cache_backend="first_block_cache", cache_config='{"threshold": 0}')
    generate(hooks, requests(args, "warm"))
    _, per_row = generate(hooks, requests(args, "r"))
    return [{"feature": f"step batch of {args.prompts}, first_block_cache threshold 0 (one call per row)",
             "setting": "{}", "latency_s": per_row, "speedup": batched / per_row}]  # fmt: skip


def prompt_cache_rows(args, device) -> list[dict]:
    stages, applied, _ = load(args.model, device, enable_prompt_embed_cache="true")
    request = requests(args, "p")[:1]
    timings = {}
    for label in ("miss", "hit"):
        if label == "miss":
            applied.prompt_cache._entries.clear()
        started = time.perf_counter()
        for _ in range(args.repeat):
            if label == "miss":
                applied.prompt_cache._entries.clear()
            stages.encode(request)
        timings[label] = (time.perf_counter() - started) / args.repeat
    return [{"feature": "prompt_embed_cache encode", "setting": label, "latency_s": timings[label],
             "speedup": timings["miss"] / timings[label]} for label in ("miss", "hit")]  # fmt: skip


def offload_rows(args, device, reference, base_latency) -> list[dict]:
    rows = []
    for mode, extra in (("none", {}), ("model", {}), ("layerwise", {"offload_window": "1"})):
        params = {"offload": mode, **extra} if mode != "none" else {}
        stages, _, _ = load(args.model, device, **params)
        alone(stages, args, "warm")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        images, latency = alone(stages, args, mode)
        psnr, max_err = quality(images, reference)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        rows.append({
            "feature": f"offload {mode}", "setting": json.dumps(extra), "latency_s": latency,
            "speedup": base_latency / latency, "psnr_db": psnr, "max_err": max_err, "peak_mem_mib": peak,
        })  # fmt: skip
        del stages
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write(rows: list[dict], out_dir: Path, header: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "acceleration.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fmt = {"latency_s": "{:.3f} s", "speedup": "{:.2f}x", "skipped_frac": "{:.0%}", "psnr_db": "{:.1f}",
           "peak_mem_mib": "{:.0f}"}  # fmt: skip
    lines = [header, "", "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for row in rows:
        cells = [fmt.get(k, "{}").format(row[k]) if k in row else "" for k in FIELDS]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "acceleration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="FLUX.1 checkpoint folder (default: a tiny one, built now)")
    parser.add_argument("--prompt", action="append", help="prompts to cycle through (repeatable; default: 3 photos)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10, help="encode calls per prompt-cache timing")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each request; the fastest counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="64x64, 4 steps, 1 prompt, one setting per cache")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.prompts, args.repeat, args.rounds = 64, 4, 1, 2, 1
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = build_tiny_flux(Path(tmp) / "tiny-flux", seed=0)
        device = torch.device(args.device)
        plain, _, _ = load(args.model, device)
        alone(plain, args, "warm")
        reference, base_latency = alone(plain, args, "base")
        del plain
        rows = [{"feature": "uncached", "setting": "{}", "latency_s": base_latency, "speedup": 1.0}]
        rows += step_cache_rows(args, device, reference, base_latency)
        rows += per_row_cost(args, device)
        rows += prompt_cache_rows(args, device)
        rows += offload_rows(args, device, reference, base_latency)
    header = (f"model {args.model.name}, {args.size}x{args.size}, {args.steps} steps, {args.prompts} prompts, "
              f"{args.device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})")  # fmt: skip
    write(rows, args.out_dir, header)


if __name__ == "__main__":
    main()
