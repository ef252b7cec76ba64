"""Serving overhead: a gRPC request to a family's one-model pipeline vs its in-process diffusers pipeline.

Both run the same tiny checkpoint with the same prompt, size, steps and seed, on the same
machine in the same session, alternating call by call so that drift in machine load hits both.
The ratio of medians is the overhead (target <= 1.05). The served image (or video) is also
checked against the in-process one, so the two sides provably did the same work.

    python -m benchmarks.overhead [--family flux|qwen_image|qwen_image_edit|wan22_t2v|wan22_i2v|longcat_image]
                                  [--ensemble]  # <family>_ensemble instead of the one model (target <= 1.10)
                                  [--size 768] [--steps 8] [--frames 9] [--repeats 15]

Families conditioned on ``input_image`` (edit, image-to-video) get the same seeded 96x128 RGB picture on both sides.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpcclient
from PIL import Image

from omni_backend.testing.compare import fraction_close
from omni_backend.testing.server import TritonServerProcess
from omni_backend.testing.tiny import build

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a blue background"
INPUT_IMAGE = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)


def _edit_processor(checkpoint: str) -> dict:
    from omni_backend.pipelines.qwen_image_edit import load_processor  # its processor needs no torchvision

    return {"processor": load_processor(checkpoint)}


@dataclass(frozen=True)
class Family:
    pipeline: str  # the diffusers pipeline class
    checkpoint: str  # the name model_repository/ uses
    output: str  # "image" or "video"
    # what the in-process pipeline needs beyond the common arguments to do what the served family does
    load_kwargs: Callable[[str], dict] = lambda checkpoint: {}  # from_pretrained, given the checkpoint
    call_kwargs: dict = field(default_factory=dict)  # __call__
    input_image: bool = False  # conditioned on INPUT_IMAGE (``input_image`` served, ``image=`` in-process)


FAMILIES = {
    "flux": Family("FluxPipeline", "flux-shapes", "image"),  # the tiny FLUX, under the served name
    "qwen_image": Family("QwenImagePipeline", "tiny-qwen-image", "image"),
    "qwen_image_edit": Family(
        "QwenImageEditPipeline", "tiny-qwen-image-edit", "image", _edit_processor, input_image=True
    ),
    "wan22_t2v": Family("WanPipeline", "tiny-wan22-t2v", "video"),
    "wan22_i2v": Family("WanImageToVideoPipeline", "tiny-wan22-i2v", "video", input_image=True),
    # the family serves LongCat-Image with its prompt rewriter off, and never loads the rewriter's processor
    "longcat_image": Family(
        "LongCatImagePipeline",
        "tiny-longcat-image",
        "image",
        lambda checkpoint: {"text_processor": None},
        {"enable_prompt_rewrite": False},
    ),
}


def grpc_inputs(
    size: int, steps: int, seed: int, frames: int | None = None, image: bool = False
) -> list[grpcclient.InferInput]:
    values = [
        ("prompt", np.array([[PROMPT.encode()]], dtype=object), "BYTES"),
        ("height", np.array([[size]], np.int32), "INT32"),
        ("width", np.array([[size]], np.int32), "INT32"),
        ("num_inference_steps", np.array([[steps]], np.int32), "INT32"),
        ("seed", np.array([[seed]], np.int64), "INT64"),
    ]
    if frames is not None:
        values.append(("num_frames", np.array([[frames]], np.int32), "INT32"))
    if image:
        values.append(("input_image", INPUT_IMAGE[None], "UINT8"))
    inputs = []
    for name, array, dtype in values:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="flux")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=9, help="num_frames of video families")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--ensemble", action="store_true", help="serve <family>_ensemble (target <= 1.10)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/overhead[_FAMILY][_ensemble].json")
    args = parser.parse_args()
    family = FAMILIES[args.family]
    video = family.output == "video"
    frames = args.frames if video else None
    served_model = f"{args.family}_ensemble" if args.ensemble else args.family
    stages = [f"{args.family}_{stage}" for stage in ("text_encoder", "transformer", "vae")] if args.ensemble else []
    suffix = ("" if args.family == "flux" else f"_{args.family}") + ("_ensemble" if args.ensemble else "")
    out = args.out or ROOT / "benchmarks" / "results" / f"overhead{suffix}.json"

    import diffusers

    with tempfile.TemporaryDirectory() as models:
        checkpoint = build(args.family, Path(models) / family.checkpoint, seed=0)
        pipe = getattr(diffusers, family.pipeline).from_pretrained(
            checkpoint, dtype=torch.float32, **family.load_kwargs(str(checkpoint))
        )
        pipe.set_progress_bar_config(disable=True)

        def in_process(seed: int) -> np.ndarray:
            generator = torch.Generator("cpu").manual_seed(seed)
            kwargs = {"num_frames": frames, "output_type": "np"} if video else {}
            kwargs.update(family.call_kwargs)
            if family.input_image:
                kwargs["image"] = Image.fromarray(INPUT_IMAGE)
            result = pipe(  # prompt by keyword: the edit pipeline's first positional is ``image``
                prompt=PROMPT,
                height=args.size,
                width=args.size,
                num_inference_steps=args.steps,
                generator=generator,
                **kwargs,
            )
            if video:  # what diffusers' export_to_video writes
                return (result.frames[0] * 255).round().astype(np.uint8)
            return np.asarray(result.images[0])

        server = TritonServerProcess(
            ROOT / "model_repository",
            env_extra={"OMNI_MODEL_ROOT": models},
            extra_args=["--model-control-mode=explicit", *(f"--load-model={m}" for m in [*stages, served_model])],
        )
        with server.start(timeout=600):
            client = grpcclient.InferenceServerClient(server.grpc_url)

            def served(seed: int) -> np.ndarray:
                inputs = grpc_inputs(args.size, args.steps, seed, frames, family.input_image)
                return client.infer(served_model, inputs).as_numpy(family.output)[0]

            for seed in (0, 1):  # warm-up both sides (allocator, thread pools)
                in_process(seed), served(seed)
            local_times, served_times, agreement = [], [], []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                expected = in_process(i)
                t1 = time.perf_counter()
                actual = served(i)
                t2 = time.perf_counter()
                local_times.append(t1 - t0)
                served_times.append(t2 - t1)
                agreement.append(fraction_close(actual, expected))
            client.close()

    local, remote = statistics.median(local_times), statistics.median(served_times)
    result = {
        "benchmark": f"serving overhead (gRPC {served_model} / in-process {family.pipeline})",
        "checkpoint": f"{family.checkpoint} (omni_backend.testing.tiny, seed 0), float32",
        "size": args.size,
        "steps": args.steps,
        **({"frames": frames} if video else {}),
        "repeats": args.repeats,
        "in_process_median_s": round(local, 4),
        "grpc_median_s": round(remote, 4),
        "overhead_ratio": round(remote / local, 4),
        "min_pixel_agreement": round(min(agreement), 6),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.processor() or 'cpu'}",
        "torch": torch.__version__,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
