"""Speedup of the parallel modes over one process, each rank on one core with one thread.

The CPU stands in for a multi-GPU node: one pinned core per rank plays one device per rank, gloo
plays NCCL, and the baseline is one process pinned to one core. The transformer is a FLUX.1
architecture scaled so that compute dominates communication (``--heads``, ``--layers``); the
workload is two requests with true CFG (four transformer rows per step), so CFG-parallel splits the
branches and pipeline parallel has four micro-batches in flight.

    python -m benchmarks.parallel [--size 256 --steps 4 --heads 8 --layers 4,8] [--smoke]

Prints a markdown table (and writes ``--out`` JSON). Needs 2 cores. ``--gpu`` also times the same
loop in-process on one CUDA device (float32 and bfloat16): the single-GPU figures of this workload.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from omni_backend.request import DiffusionRequest, SamplingParams
from omni_backend.testing.parallel import LAYOUTS_2, denoise_loop, load_transformer_stage, run_parallel
from omni_backend.testing.tiny import build_tiny_flux

# the 2-rank layouts the parallel tests cover, at sizes the degree divides
LAYOUTS = {name: layout for name, layout in LAYOUTS_2.items() if not name.endswith("_uneven")}
TARGETS = {"cfg2": 1.8, "ulysses2": 1.6, "pp2": 1.5}


def build_checkpoint(out: Path, heads: int, double: int, single: int) -> Path:
    """The tiny FLUX checkpoint with a bigger transformer (head_dim 64, like FLUX.1)."""
    from diffusers import FluxTransformer2DModel

    build_tiny_flux(out)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=64,
        num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(16, 24, 24),
    )  # fmt: skip
    transformer.save_pretrained(out / "transformer")
    return out


def workload(size: int, steps: int, text_len: int) -> list:
    generator = torch.Generator().manual_seed(0)
    cases = []
    for i in range(2):
        params = SamplingParams(size, size, steps, 3.5, 4.0, i)
        request = DiffusionRequest(str(i), params, prompt="p", negative_prompt="n")
        cond = {
            name: torch.randn(*shape, generator=generator)
            for name, shape in (
                ("prompt_embeds", (text_len, 32)), ("pooled_prompt_embeds", (32,)),
                ("negative_prompt_embeds", (text_len, 32)), ("negative_pooled_prompt_embeds", (32,)),
            )
        }  # fmt: skip
        cases.append((request, cond))
    return cases


def gpu_seconds(checkpoint: str, cases: list, dtype: torch.dtype, repeats: int) -> float:
    """Fastest of ``repeats`` denoising loops on one CUDA device, after one warm-up loop."""
    stages = load_transformer_stage("flux", checkpoint, "cuda", dtype)
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        started = time.perf_counter()  # denoise_loop's own clock stops before queued kernels finish
        denoise_loop(stages, stages.denoise, cases)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (256: 256 image tokens)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=64, help="text tokens")
    parser.add_argument("--heads", type=int, default=8, help="attention heads of 64 dims")
    parser.add_argument("--layers", default="4,8", help="double-stream,single-stream blocks")
    parser.add_argument("--repeats", type=int, default=2, help="baseline + parallel pairs per mode")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks that it runs")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--gpu", action="store_true", help="also time the loop on one CUDA device")
    parser.add_argument("--modes", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS), help="default: all")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.text_len, args.heads, args.layers, args.repeats = 32, 1, 8, 2, "1,1", 1
    double, single = (int(x) for x in args.layers.split(","))
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(build_checkpoint(Path(tmp) / "flux", args.heads, double, single))
        cases = workload(args.size, args.steps, args.text_len)
        # one group of 2 ranks; each parallel run follows a baseline run (rank 0 alone), so both see
        # about the same machine load, and the speedup is the median of those pairs
        modes = [name for name in LAYOUTS if name in args.modes]
        jobs = [job for name in modes for _ in range(args.repeats) for job in ((None, cases), (LAYOUTS[name], cases))]
        runs = run_parallel("flux", checkpoint, jobs, pin_cores=True)
        gpu = {str(dtype).removeprefix("torch."): gpu_seconds(checkpoint, cases, dtype, args.repeats)
               for dtype in (torch.float32, torch.bfloat16)} if args.gpu else {}  # fmt: skip
    rows = {}
    for i, name in enumerate(modes):
        pairs = runs[2 * i * args.repeats : 2 * (i + 1) * args.repeats]
        base = [r.seconds for r in pairs[0::2]]
        mine = [r.seconds for r in pairs[1::2]]
        rows[name] = {"single_s": min(base), "parallel_s": min(mine),
                      "speedup": statistics.median(b / m for b, m in zip(base, mine, strict=True))}  # fmt: skip
    print(f"\n{platform.processor() or platform.machine()}, {cores} cores, torch {torch.__version__}, "
          f"{args.size}x{args.size}, {args.steps} steps, 2 requests x true CFG, {args.heads} heads x 64, "
          f"{double}+{single} blocks")  # fmt: skip
    print("\n| mode | world | single s | parallel s | speedup (median of pairs) | target |\n|---|---|---|---|---|---|")
    for name, row in rows.items():
        target = f">= {TARGETS[name]}" if name in TARGETS else "report"
        print(f"| {name} | {LAYOUTS[name].world_size} | {row['single_s']:.3f} | {row['parallel_s']:.3f} | "
              f"{row['speedup']:.2f}x | {target} |")  # fmt: skip
    for dtype, seconds in gpu.items():
        print(f"\nOne {torch.cuda.get_device_name()}, {dtype}, in-process: {seconds:.3f} s for the same loop")
    if args.out is not None:
        results = {"args": vars(args) | {"out": str(args.out)}, "modes": rows, "gpu_s": gpu}
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
