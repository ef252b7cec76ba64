"""Full size through our own path: the step scheduler, the runner and the family's stages, in process.

``benchmarks.full_size --ours`` calls this on the pipeline it has just timed with diffusers, so both
sides run the very same weights on the same device: the ratio of our median to diffusers' is the
cost of our stage API and scheduler at full size (the serving layer on top is measured by
``benchmarks.overhead`` and ``benchmarks.compare``). Each ``--offload`` mode applies our offload
policy to those weights and records latency and peak device memory, the figures issue 5 asks for
(field target: ``layerwise`` within 1.10x of resident latency at <= 25% of its device memory).
"""

from __future__ import annotations

import argparse
import platform
import statistics
from typing import Any

import numpy as np
import torch

from benchmarks.acceleration import generate
from omni_backend.config import parse_model_config
from omni_backend.engine.observer import AccelerationObserver
from omni_backend.registry import resolve_family
from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.runner.acceleration import apply_acceleration
from omni_backend.testing.compare import fraction_close

OFFLOAD_MODES = ("none", "model", "layerwise")
# the families this path drives, and the options that make their stages match the diffusers call
# (FluxPipeline's default T5 length is 512; the tiny tokenizer would otherwise declare its own)
STAGE_OPTIONS: dict[str, dict[str, Any]] = {"flux": {"max_sequence_length": 512}, "wan22_t2v": {}}


def _batch(mode: str, call: dict[str, Any], prompt: str, seed: int, size: int) -> list[DiffusionRequest]:
    """``size`` requests for one step batch; the first has ``seed`` and the id ``{mode}-{seed}``."""
    requests = []
    for i in range(size):
        params = SamplingParams(
            call["height"], call["width"], call["num_inference_steps"], call["guidance_scale"], 1.0, seed + 100 * i,
            num_frames=call.get("num_frames", 1), guidance_scale_2=call.get("guidance_scale_2"),
        )  # fmt: skip
        requests.append(DiffusionRequest(f"{mode}-{seed}" + (f"-{i}" if i else ""), params, prompt=prompt))
    return requests


def time_stages(
    family: str, pipe: Any, call: dict[str, Any], prompt: str, reference: np.ndarray, args: argparse.Namespace
) -> list[dict]:
    """One row per offload mode: median latency of ``args.repeats`` step batches of ``args.batch``
    requests after a warm-up, peak memory, and the max pixel error of seed 1's image (the first of its
    batch) to diffusers' alone (``reference``, floats in [0, 1]).

    Modes run in the order of ``OFFLOAD_MODES``; each wraps the same modules in fresh stages (an
    offload mode only ever moves weights to host memory, which the next mode starts from)."""
    stages_cls = resolve_family(family)
    options = stages_cls.options_cls(**STAGE_OPTIONS[family])
    device = torch.device(args.device)
    rows = []
    for mode in args.offload:
        stages = stages_cls(pipe, "full-size", options, device)
        parameters = {"family": family, "model": "full-size", "offload": mode}
        config = parse_model_config(parameters, stages_cls.options_cls)
        if mode == "none":
            for modules in stages.module_groups().values():
                for module in modules:
                    module.to(device)  # back from an earlier mode's host memory
        apply_acceleration(stages, config, device, AccelerationObserver())
        generate(stages, _batch(f"{mode}-warm", call, prompt, 0, args.batch))
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times, images = [], {}
        for seed in range(1, args.repeats + 1):
            out, seconds = generate(stages, _batch(mode, call, prompt, seed, args.batch))
            times.append(seconds)
            images.update(out)
        expected = (np.clip(reference, 0, 1) * 255).round().astype(np.uint8)  # diffusers' numpy_to_pil
        max_err = int(np.abs(images[f"{mode}-1"].astype(int) - expected.astype(int)).max())
        within = fraction_close(images[f"{mode}-1"], expected)  # DESIGN section 4's measure of "the same image"
        peak_gb = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
        rows.append({
            "family": family, "path": f"ours, offload {mode}",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": args.dtype, "height": call["height"], "width": call["width"],
            "frames": call.get("num_frames", 1), "steps": call["num_inference_steps"], "batch": args.batch,
            "median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "s_per_output": round(statistics.median(times) / args.batch, 3), "peak_gb": round(peak_gb, 2),
            "max_err_vs_diffusers": max_err,
            "torch": torch.__version__, "within_1_level": round(within, 4),
        })  # fmt: skip
        print(", ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
        del stages
    return rows
