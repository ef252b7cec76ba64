"""Quality check of the demo checkpoint: does it draw what the prompt asks for?

    python -m omni_backend.demo.quality --checkpoint DIR [--n 100] [--steps 20] [--seed 0] [--grid FILE.png]
        [--true-cfg-scale S] [--word-effect]
    python -m omni_backend.demo.quality --url localhost:8001 [--protocol grpc] [--model flux] ...
    python -m omni_backend.demo.quality --checkpoint DIR --renoise   # where sampling decides what

For ``n`` random captions of the grammar, each with a random seed, it renders a 64x64 picture
(in-process with diffusers' ``FluxPipeline``, or through a served model with ``omni_client``) and
reads it back with the data set's classifiers (``shapes.classify``): background, shape color and
shape. Prints the three accuracies; ``--grid`` also saves the first pictures as a captioned grid.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from omni_backend.demo.shapes import SHAPES, SIZE, Accuracy, Reading, Scene, classify, random_scene

Render = Callable[[str, int], np.ndarray]  # (prompt, seed) -> uint8 [H, W, 3]


def cfg_params(true_cfg_scale: float) -> dict[str, object]:
    """True CFG against the empty caption (what caption dropout trains), as FluxPipeline takes it; none at 1."""
    return {"negative_prompt": "", "true_cfg_scale": true_cfg_scale} if true_cfg_scale > 1 else {}


def local_renderer(checkpoint: str | Path, steps: int, true_cfg_scale: float = 1.0) -> Render:
    """diffusers' own FluxPipeline on the CPU in float32, as the served model computes it."""
    import torch
    from diffusers import FluxPipeline

    from omni_backend.demo.train import MAX_SEQUENCE_LENGTH

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def render(prompt: str, seed: int) -> np.ndarray:
        image = pipe(
            prompt,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            generator=torch.Generator("cpu").manual_seed(seed),
            **cfg_params(true_cfg_scale),
        ).images[0]
        return np.asarray(image)

    return render


def served_renderer(url: str, protocol: str, model: str, steps: int, true_cfg_scale: float = 1.0) -> Render:
    """The same request through a running tritonserver (no height/width: the model's default is 64)."""
    from omni_client import OmniClient

    client = OmniClient(url, protocol=protocol, model=model)

    def render(prompt: str, seed: int) -> np.ndarray:
        params = cfg_params(true_cfg_scale)
        return client.generate(prompt, num_inference_steps=steps, seed=seed, output="numpy", **params)

    return render


@dataclass
class Report:
    accuracy: Accuracy = field(default_factory=Accuracy)
    samples: list[tuple[Scene, np.ndarray, Reading]] = field(default_factory=list)
    seconds: float = 0.0


def evaluate(render: Render, n: int, seed: int) -> Report:
    """Render ``n`` random captions with random seeds (both drawn from ``seed``) and score them."""
    rng = np.random.default_rng(seed)
    report = Report()
    start = time.perf_counter()
    for _ in range(n):
        scene = random_scene(rng)
        image = render(scene.caption, int(rng.integers(2**31)))
        report.samples.append((scene, image, report.accuracy.add(scene, image)))
    report.seconds = time.perf_counter() - start
    return report


def shape_word_effect(render: Render, n: int, seed: int) -> float:
    """How often the drawn shape follows the shape word: each of ``n`` random prompts is drawn twice
    with the same seed, with its shape word and with the next shape's; the fraction of pairs whose
    classified shapes differ. A model that reads the word scores near 1; one that ignores it scores
    only what the other words' small pull on its blobs gives (the 6000-step checkpoint: 24%), while
    its shape accuracy sits at chance (1/3) or below."""
    rng = np.random.default_rng(seed)
    changed = 0
    for _ in range(n):
        scene, image_seed = random_scene(rng), int(rng.integers(2**31))
        other = replace(scene, shape=SHAPES[(SHAPES.index(scene.shape) + 1) % len(SHAPES)])
        first, second = (classify(render(s.caption, image_seed)).shape for s in (scene, other))
        changed += first != second
    return changed / n


def renoised_rates(
    checkpoint: str | Path, n: int, seed: int, steps: int, swap_shape_word: bool = False
) -> list[tuple[float, dict[str, float]]]:
    """The data set's own pictures noised to the sigma of five evenly spaced steps of the ``steps``-step
    schedule (the first: pure noise) and sampled back from there by diffusers' FluxPipeline (its shifted
    schedule, float32): the rates per starting sigma t0 say from which noise level on the model loses
    what. ``swap_shape_word`` captions each picture with the next shape's word: rates that stay where
    they were mean the word is not read."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from omni_backend.demo.train import MAX_SEQUENCE_LENGTH, packed_latents, pictures

    pipe = FluxPipeline.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    x, scenes = pictures(n, seed=seed)
    captions = [
        replace(s, shape=SHAPES[(SHAPES.index(s.shape) + 1) % len(SHAPES)]).caption if swap_shape_word else s.caption
        for s in scenes
    ]
    x0 = packed_latents(pipe, x)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    conf = pipe.scheduler.config
    mu = calculate_shift(x0.shape[1], conf.base_image_seq_len, conf.max_image_seq_len, conf.base_shift, conf.max_shift)
    unshifted = np.linspace(1.0, 1 / steps, steps)  # FluxPipeline's default sigmas, before the scheduler's shift
    rows = []
    for start in range(0, steps, max(1, steps // 5)):
        sigmas = unshifted[start:].tolist()
        pipe.scheduler.set_timesteps(sigmas=sigmas, mu=mu)  # as the pipeline will: its first sigma is t0
        t0 = float(pipe.scheduler.sigmas[0])
        images = pipe(
            captions,
            height=SIZE,
            width=SIZE,
            sigmas=sigmas,
            latents=(1 - t0) * x0 + t0 * noise,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type="np",
        ).images
        accuracy = Accuracy()
        for scene, image in zip(scenes, images, strict=True):
            accuracy.add(scene, (image * 255).round().astype(np.uint8))
        rows.append((t0, accuracy.rates()))
    return rows


def save_grid(samples: list[tuple[Scene, np.ndarray, Reading]], path: Path, columns: int = 6) -> None:
    """Pictures at 2x with their prompt underneath (red text where a classifier disagrees)."""
    width, height = 150, 2 * SIZE + 34  # room for "purple triangle" / "orange background"
    rows = (len(samples) + columns - 1) // columns
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    draw = ImageDraw.Draw(grid)
    for i, (scene, image, reading) in enumerate(samples):
        x, y = (i % columns) * width, (i // columns) * height
        picture = Image.fromarray(image).resize((2 * SIZE, 2 * SIZE), Image.NEAREST)
        grid.paste(picture, (x + (width - 2 * SIZE) // 2, y + 2))
        ok = (reading.background, reading.color, reading.shape) == (scene.background, scene.color, scene.shape)
        for line, text in enumerate((f"{scene.color} {scene.shape}", f"on {scene.background}")):
            draw.text((x + (width - 2 * SIZE) // 2, y + 2 * SIZE + 4 + 13 * line), text, fill="black" if ok else "red")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m omni_backend.demo.quality", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="render in-process with diffusers' FluxPipeline")
    source.add_argument("--url", help="render through a served model, e.g. localhost:8001")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model", default="flux", help="served model name (default flux)")
    parser.add_argument("--n", type=int, default=100, help="number of prompts (default 100)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="draws the prompts and their seeds (default 0)")
    parser.add_argument(
        "--true-cfg-scale", type=float, default=1.0, help="true CFG against the empty caption when > 1 (default 1)"
    )
    parser.add_argument("--grid", type=Path, help="save the first --grid-count pictures here (PNG)")
    parser.add_argument("--grid-count", type=int, default=24)
    parser.add_argument(
        "--word-effect", action="store_true", help="also measure how often the shape follows the shape word"
    )
    parser.add_argument(
        "--renoise",
        action="store_true",
        help="instead: the data set's pictures noised to several sigmas and sampled back, with their own and a "
        "swapped shape word (--checkpoint only)",
    )
    args = parser.parse_args(argv)
    if args.renoise:
        if args.checkpoint is None:
            parser.error("--renoise needs --checkpoint")
        print(f"{args.n} pictures noised to t0 and sampled back ({args.steps}-step schedule), {args.checkpoint}:")
        own, swapped = (renoised_rates(args.checkpoint, args.n, args.seed, args.steps, swap) for swap in (False, True))
        for (t0, rates), (_, other) in zip(own, swapped, strict=True):
            line = "  ".join(f"{name} {rate:.0%}" for name, rate in rates.items())
            print(f"t0 {t0:.2f}: {line}  (shape word swapped: shape {other['shape']:.0%})")
        return 0
    if args.checkpoint is not None:
        render = local_renderer(args.checkpoint, args.steps, args.true_cfg_scale)
    else:
        render = served_renderer(args.url, args.protocol, args.model, args.steps, args.true_cfg_scale)
    report = evaluate(render, args.n, args.seed)
    if args.grid is not None:
        save_grid(report.samples[: args.grid_count], args.grid)
    rates = report.accuracy.rates()
    where = args.checkpoint or f"{args.model} at {args.url} ({args.protocol})"
    cfg = f", true CFG {args.true_cfg_scale:g}" if args.true_cfg_scale > 1 else ""
    seconds = report.seconds / args.n
    print(f"{args.n} prompts, {args.steps} steps{cfg}, seed {args.seed}, {where}: {seconds:.2f} s/image")
    print("  ".join(f"{name} accuracy {rate:.0%}" for name, rate in rates.items()))
    if args.word_effect:
        effect = shape_word_effect(render, args.n, args.seed)
        print(f"swapping the shape word changes the drawn shape in {effect:.0%} of {args.n} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
