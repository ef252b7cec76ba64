"""What a streamed Wan2.2 video preview costs at full size, against the denoising step it rides on.

A preview (``wan22_t2v_stream`` / ``wan22_i2v_stream`` with ``preview_every``) decodes the clean
latents predicted at that step with the Wan VAE (``WanT2VStages.decode``, as the final video) and
downscales every frame to at most 256 px (``downscale_preview``). This times both, and one call of
a 14B expert with CFG (2 rows) at the same size, on random weights (timing does not depend on
them) built directly on the device in the benchmark dtype, as ``benchmarks.full_size`` does.

    python -m benchmarks.preview_cost [--height 480 --width 832 --frames 81 --repeats 3]
    python -m benchmarks.preview_cost --smoke --device cpu --dtype float32   # reduced configs, a CPU

Prints one JSON object (seconds are medians over ``--repeats`` after a warm-up call) and writes it
to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from benchmarks.full_size import default_device_and_dtype
from omni_backend.pipelines.wan import MAX_SEQUENCE_LENGTH, WanT2VStages
from omni_backend.runner.model_runner import downscale_preview

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# width/depth-reduced configs for --smoke (the full ones are diffusers' defaults: Wan2.1's VAE, a 14B expert)
SMOKE_VAE = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 1, 1, 1]}
SMOKE_EXPERT = {"num_attention_heads": 2, "attention_head_dim": 12, "text_dim": 32, "freq_dim": 16,
                "ffn_dim": 32, "num_layers": 1}  # fmt: skip


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def measure(height: int, width: int, frames: int, device: torch.device, dtype: torch.dtype, smoke: bool,
            repeats: int) -> dict[str, Any]:  # fmt: skip
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.video_processor import VideoProcessor

    with default_device_and_dtype(device, dtype):
        vae = AutoencoderKLWan(**(SMOKE_VAE if smoke else {})).eval()
        expert = WanTransformer3DModel(**(SMOKE_EXPERT if smoke else {})).eval()
    latent_shape = (vae.config.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(1, *latent_shape, device=device)
    # the stages' own decode on a stand-in holding only what it reads
    stages = SimpleNamespace(pipe=SimpleNamespace(vae=vae, video_processor=VideoProcessor(vae_scale_factor=8)),
                             device=device)  # fmt: skip
    decode_s, (video,) = _median_seconds(lambda: WanT2VStages.decode(stages, [latents]), device, repeats)
    downscale_s, preview = _median_seconds(lambda: downscale_preview(video), device, repeats)
    rows = {"hidden_states": torch.randn(2, *latent_shape, device=device, dtype=dtype),
            "timestep": torch.tensor([900.0, 900.0], device=device),
            "encoder_hidden_states": torch.randn(2, MAX_SEQUENCE_LENGTH, expert.config.text_dim, device=device,
                                                 dtype=dtype)}  # fmt: skip
    with torch.inference_mode():
        step_s, _ = _median_seconds(lambda: expert(**rows, return_dict=False)[0], device, repeats)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "smoke": smoke,
        "video": list(video.shape),
        "preview": list(preview.shape),
        "preview_mb": round(preview.nbytes / 1e6, 2),
        "decode_s": round(decode_s, 4),
        "downscale_s": round(downscale_s, 4),
        "cfg_step_s": round(step_s, 4),
        "preview_per_step": round((decode_s + downscale_s) / step_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16")
    parser.add_argument("--smoke", action="store_true", help="width/depth-reduced VAE and expert")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preview_cost.json")
    args = parser.parse_args(argv)
    result = measure(args.height, args.width, args.frames, torch.device(args.device), _DTYPES[args.dtype],
                     args.smoke, args.repeats)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
