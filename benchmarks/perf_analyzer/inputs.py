"""The perf_analyzer ``--input-data`` files of every family, written by code so they cannot drift.

    python -m benchmarks.perf_analyzer.inputs        # rewrites inputs/*.json

Each family gets ``<family>.json`` (a mix of sizes and step counts, one seed per request, so a count
window of ``len(data)`` requests always holds the same mix) and ``<family>_smoke.json`` (one small
request); FLUX keeps its historical names ``flux.json``, ``flux_stream.json`` (previews every 2
steps) and ``smoke.json``. Sizes suit the tiny checkpoints on a CPU; pass your own file with
``--input-data`` for real ones. The models have ``max_batch_size: 8``, so perf_analyzer runs with
``-b 1`` and the shapes leave the batch dimension out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

INPUTS = Path(__file__).resolve().parent / "inputs"
PROMPTS = ("a red circle on a blue background", "a cat sitting on a windowsill",
           "a lighthouse at dusk, oil painting", "a bowl of ramen, studio photo")  # fmt: skip
EDITS = ("make the background blue", "add a hat", "turn it into a watercolor", "make it night")


def _tensor(value: Any, shape: list[int] | None = None) -> dict[str, Any]:
    content = value if isinstance(value, list) else [value]
    return {"content": content, "shape": shape or [1]}


def _image(seed: int, size: int = 16) -> dict[str, Any]:
    """A seeded RGB picture, flattened row-major as perf_analyzer reads UINT8 content."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return _tensor(pixels.reshape(-1).tolist(), [size, size, 3])


def _request(prompt: str, size: int, steps: int, seed: int, **extra: Any) -> dict[str, Any]:
    data = {"prompt": _tensor(prompt), "height": _tensor(size), "width": _tensor(size),
            "num_inference_steps": _tensor(steps), "seed": _tensor(seed)}  # fmt: skip
    return data | {name: value if isinstance(value, dict) else _tensor(value) for name, value in extra.items()}


def _mix(sizes: tuple[int, ...], steps: tuple[int, ...], prompts: tuple[str, ...], **extra: Any) -> list[dict]:
    """Every prompt at the first size for each step count, then two prompts at each larger size."""
    requests = []
    for size in sizes:
        for n in steps:
            for prompt in prompts if size == sizes[0] else prompts[:2]:
                requests.append((prompt, size, n))
    return [_request(p, size, n, seed, **extra) for seed, (p, size, n) in enumerate(requests)]


def _with_image(requests: list[dict]) -> list[dict]:
    return [r | {"input_image": _image(int(r["seed"]["content"][0]))} for r in requests]


def files() -> dict[str, dict[str, list[dict]]]:
    """File name -> perf_analyzer input data."""
    flux = _mix((256, 512), (4, 8), PROMPTS)
    true_cfg = {"negative_prompt": " ", "true_cfg_scale": 4.0}
    video = {"num_frames": 9}
    families: dict[str, list[dict]] = {
        "qwen_image": _mix((64, 128), (4, 8), PROMPTS, **true_cfg),
        "qwen_image_edit": _with_image(_mix((64,), (4, 8), EDITS, **true_cfg)),
        "longcat_image": _mix((64, 128), (4, 8), PROMPTS),
        "wan22_t2v": _mix((64,), (4, 8), PROMPTS, **video),
        "wan22_i2v": _with_image(_mix((64,), (4, 8), PROMPTS, **video)),
    }
    out = {
        "flux.json": flux,
        "flux_stream.json": [r | {"preview_every": _tensor(2)} for r in flux],
        "smoke.json": [_request("a red circle", 256, 4, 7)],
    }
    for family, requests in families.items():
        out[f"{family}.json"] = requests
        smoke = requests[0] | {"num_inference_steps": _tensor(2)}
        out[f"{family}_smoke.json"] = [smoke | ({"num_frames": _tensor(5)} if "num_frames" in smoke else {})]
    return {name: {"data": data} for name, data in out.items()}


def render(data: dict[str, list[dict]]) -> str:
    return json.dumps(data, indent=1) + "\n"


def main() -> int:
    INPUTS.mkdir(exist_ok=True)
    for name, data in files().items():
        (INPUTS / name).write_text(render(data))
        print(f"wrote {INPUTS / name} ({len(data['data'])} requests)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
