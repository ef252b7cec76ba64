"""A PyTriton peer: the diffusers FluxPipeline behind ``pytriton.triton.Triton`` with ``@batch``.

Same interface as our ``flux`` model (prompt BYTES, height/width/num_inference_steps INT32, seed
INT64 -> image UINT8 [H, W, 3]); each batch runs ONE pipeline call on the batch's prompts with one
``torch.Generator("cpu").manual_seed(seed)`` per row (rows of a batch share height, width and steps:
a batch mixing them is split into groups).

    python -m benchmarks.pytriton_peer --checkpoint DIR --http-port 8010 --grpc-port 8011 --metrics-port 8012

Prints ``[pytriton-peer] ready`` once the model is served; SIGTERM / SIGINT stop it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import sysconfig
from pathlib import Path

import numpy as np

READY = "[pytriton-peer] ready"
MODEL = "flux_pytriton"


def peer_env(env: dict[str, str]) -> dict[str, str]:
    """What our launcher's ``server_env`` sets (PATH: this interpreter first; LD_LIBRARY_PATH: libpython)."""
    from omni_backend.serve import server_env

    env = server_env(env, wheel_libs=False)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        rest = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])
    return env


def make_infer(checkpoint: str, max_batch_size: int):  # noqa: ANN201 - pytriton-decorated callable
    import torch
    from diffusers import FluxPipeline
    from pytriton.decorators import batch

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    @batch
    def infer(prompt, height, width, num_inference_steps, seed):  # noqa: ANN001, ANN202
        prompts = [p[0].decode() if isinstance(p[0], bytes) else str(p[0]) for p in prompt]
        keys = [(int(h[0]), int(w[0]), int(s[0])) for h, w, s in zip(height, width, num_inference_steps, strict=True)]
        images: list[np.ndarray | None] = [None] * len(prompts)
        for key in dict.fromkeys(keys):
            rows = [i for i, k in enumerate(keys) if k == key]
            generators = [torch.Generator("cpu").manual_seed(int(seed[i][0])) for i in rows]
            out = pipe(
                [prompts[i] for i in rows], height=key[0], width=key[1], num_inference_steps=key[2],
                generator=generators, output_type="np",
            )  # fmt: skip
            for i, image in zip(rows, out.images, strict=True):
                images[i] = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        return {"image": np.stack(images)}

    return infer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--http-port", type=int, default=8010)
    parser.add_argument("--grpc-port", type=int, default=8011)
    parser.add_argument("--metrics-port", type=int, default=8012)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--queue-delay-us", type=int, default=1000)
    args = parser.parse_args()
    os.environ.update(peer_env(dict(os.environ)))

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    infer = make_infer(args.checkpoint, args.max_batch_size)
    config = TritonConfig(
        http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        exit_timeout_secs=5,
    )  # fmt: skip
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=infer,
            inputs=[
                Tensor(name="prompt", dtype=np.bytes_, shape=(1,)),
                Tensor(name="height", dtype=np.int32, shape=(1,)),
                Tensor(name="width", dtype=np.int32, shape=(1,)),
                Tensor(name="num_inference_steps", dtype=np.int32, shape=(1,)),
                Tensor(name="seed", dtype=np.int64, shape=(1,)),
            ],
            outputs=[Tensor(name="image", dtype=np.uint8, shape=(-1, -1, 3))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
            ),
            strict=True,
        )
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        triton.run()
        print(READY, flush=True)
        triton.serve()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
