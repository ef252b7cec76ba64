"""``omni-client`` command line: ``generate`` (``--stream`` for streaming models), ``health``, ``models``, ``control``.

Exit codes: 0 success, 1 server/connection error or not ready, 2 invalid arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from . import __version__, control
from .client import OmniClient
from .errors import InvalidRequestError, OmniClientError
from .progress import ProgressBar
from .stream import StepUpdate
from .urls import DEFAULT_PORTS

PROG = "omni-client"
_SCHEME_PROTOCOLS = {"http": "http", "https": "http", "grpc": "grpc", "grpcs": "grpc"}


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Builds the argument parser.

    Returns:
        The ``omni-client`` parser with its subcommands.
    """
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection")
    conn.add_argument(
        "--url",
        help="server address HOST:PORT (an http:// or grpc:// prefix also selects the protocol); "
        f"default localhost:{DEFAULT_PORTS['grpc']} for grpc, localhost:{DEFAULT_PORTS['http']} for http",
    )
    conn.add_argument("--protocol", choices=("grpc", "http"), help="transport (default: grpc)")
    conn.add_argument("--timeout", type=_positive_float, help="client-side timeout in seconds")
    conn.add_argument("--verbose", action="store_true", help="print tritonclient requests and responses")

    parser = argparse.ArgumentParser(prog=PROG, description="Client for omni-triton diffusion models.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common], help="generate an image (or video)")
    gen.add_argument("--model", default="flux", help="model name (default: flux)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--steps", type=int, dest="num_inference_steps", help="number of inference steps")
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--true-cfg-scale", type=float)
    gen.add_argument("--guidance-scale-2", type=float, help="low-noise expert's guidance scale (Wan2.2)")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--num-frames", type=int, help="number of frames (video models)")
    gen.add_argument("--cache-threshold", type=float, help="this request's step-cache threshold (0: skip no step)")
    gen.add_argument("--lora", dest="lora_name", help="LoRA adapter (a folder under the model's lora_dir)")
    gen.add_argument("--lora-scale", type=float, help="the adapter's weight (server default 1.0)")
    gen.add_argument(
        "--image", "--input-image", type=Path, dest="input_image", help="input image (edit / image-to-video models)"
    )
    gen.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output file, e.g. out.png; for videos .mp4 (needs PyAV), .gif/.webp (animated), .npy, or numbered frames",
    )
    gen.add_argument("--fps", type=_positive_float, default=8.0, help="frame rate of animated output")
    stream = gen.add_argument_group("streaming (gRPC only; streaming models such as flux_stream)")
    stream.add_argument("--stream", action="store_true", help="stream the generation, with a progress bar on stderr")
    stream.add_argument(
        "--preview-every", type=_positive_int, metavar="N", help="ask for a preview every N steps (needs --preview-dir)"
    )
    stream.add_argument(
        "--preview-dir",
        type=Path,
        metavar="DIR",
        help="save previews as DIR/step_0003.png (video models: DIR/step_0003.gif; every step by default)",
    )
    gen.set_defaults(func=cmd_generate)

    health = sub.add_parser("health", parents=[common], help="server liveness/readiness and model readiness")
    health.add_argument(
        "--model", action="append", dest="models", help="model to check (repeatable; default: all in index)"
    )
    health.set_defaults(func=cmd_health)

    models = sub.add_parser("models", parents=[common], help="list the model repository index")
    models.set_defaults(func=cmd_models)

    control.add_parser(sub, common).set_defaults(func=cmd_control)
    return parser


def _protocol(args: argparse.Namespace) -> str:
    if args.protocol is not None:
        return args.protocol
    scheme = args.url.split("://", 1)[0].lower() if args.url and "://" in args.url else ""
    return _SCHEME_PROTOCOLS.get(scheme, "grpc")


def _connect(args: argparse.Namespace, model: str = "flux") -> OmniClient:
    return OmniClient(args.url, protocol=_protocol(args), model=model, timeout=args.timeout, verbose=args.verbose)


def check_stream_args(args: argparse.Namespace) -> None:
    """Checks the streaming options of ``generate``; raises InvalidRequestError (exit code 2)."""
    if not args.stream:
        if args.preview_every is not None or args.preview_dir is not None:
            raise InvalidRequestError("--preview-every and --preview-dir need --stream")
        return
    if _protocol(args) != "grpc":
        raise InvalidRequestError("--stream needs gRPC (Triton's HTTP endpoint cannot stream); drop --protocol http")
    if args.preview_every is not None and args.preview_dir is None:
        raise InvalidRequestError("--preview-every needs --preview-dir (where to save the previews)")


def _generate_streaming(client: OmniClient, args: argparse.Namespace, params: dict[str, object]) -> np.ndarray:
    """Streams the generation with a progress bar on stderr; saves previews to --preview-dir."""
    preview_dir: Path | None = args.preview_dir
    if preview_dir is not None:
        preview_dir.mkdir(parents=True, exist_ok=True)
    bar = ProgressBar(sys.stderr)

    def on_progress(update: StepUpdate) -> None:
        if preview_dir is not None and update.preview is not None:
            _save_preview(np.asarray(update.preview), preview_dir / f"step_{update.step:04d}", args.fps)
        bar.update(update.step, update.total_steps)

    every = args.preview_every or (1 if preview_dir is not None else None)
    try:
        return client.generate_stream(
            args.prompt, preview_every=every, on_progress=on_progress, output="numpy", **params
        )
    finally:
        bar.close()


def _save_preview(preview: np.ndarray, stem: Path, fps: float) -> None:
    """An image preview as ``stem.png``; a video preview (``preview_video``) as an animated ``stem.gif``."""
    if preview.ndim == 3:
        Image.fromarray(preview, "RGB").save(stem.with_suffix(".png"))
    else:
        _save(preview, stem.with_suffix(".gif"), fps)


def _save(result: Image.Image | list[Image.Image] | np.ndarray, out: Path, fps: float) -> tuple[Path, str]:
    """Saves an image or video; returns the written path (first one) and a size description."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(result, Image.Image):
        result.save(out)
        return out, f"{result.width}x{result.height}"
    frames = np.asarray(result)
    size = f"{frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]}"
    suffix = out.suffix.lower()
    if suffix == ".npy":
        np.save(out, frames)
        return out, size
    if suffix == ".mp4":
        _save_mp4(frames, out, fps)
        return out, size
    images = [Image.fromarray(frame, "RGB") for frame in frames]
    if suffix in (".gif", ".webp"):
        images[0].save(out, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return out, size
    paths = [out.with_name(f"{out.stem}_{i:04d}{out.suffix or '.png'}") for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    return paths[0], size + f" (as {len(paths)} files)"


def _save_mp4(frames: np.ndarray, out: Path, fps: float) -> None:
    """H.264 MP4 through PyAV (FFmpeg), an optional dependency: ``pip install 'omni-client[video]'``."""
    try:
        import av
    except ImportError:
        raise InvalidRequestError(
            "writing .mp4 needs PyAV (pip install av); save as .gif, .webp, .npy or .png frames instead"
        ) from None
    from fractions import Fraction

    # H.264 with yuv420p wants even sides: pad by one edge pixel rather than resample
    height, width = frames.shape[1] + frames.shape[1] % 2, frames.shape[2] + frames.shape[2] % 2
    padded = np.pad(frames, ((0, 0), (0, height - frames.shape[1]), (0, width - frames.shape[2]), (0, 0)), mode="edge")
    with av.open(str(out), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in padded:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def cmd_generate(args: argparse.Namespace) -> int:
    """Runs ``omni-client generate``."""
    check_stream_args(args)
    params = {
        key: getattr(args, key)
        for key in (
            "negative_prompt", "height", "width", "num_inference_steps",
            "guidance_scale", "true_cfg_scale", "guidance_scale_2", "seed", "num_frames",
            "cache_threshold", "lora_name", "lora_scale",
        )
        if getattr(args, key) is not None
    }  # fmt: skip
    if args.input_image is not None:
        try:
            with Image.open(args.input_image) as image:
                params["input_image"] = image.convert("RGB")
        except OSError as exc:
            raise InvalidRequestError(f"cannot read --image {args.input_image}: {exc}") from None
    with _connect(args, args.model) as client:
        start = time.perf_counter()
        if args.stream:
            result = _generate_streaming(client, args, params)
        else:
            result = client.generate(args.prompt, output="numpy", **params)
        elapsed = time.perf_counter() - start
    image = Image.fromarray(result, "RGB") if result.ndim == 3 else result
    path, size = _save(image, args.out, args.fps)
    print(f"saved {path} ({size}) in {elapsed:.2f} s")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Runs ``omni-client health``; returns 1 unless the server and the checked models are ready."""
    with _connect(args) as client:
        print(f"server  {client.url} ({client.protocol})")
        live, ready = client.is_live(), client.is_ready()
        print(f"live    {'yes' if live else 'no'}")
        print(f"ready   {'yes' if ready else 'no'}")
        index = {m.name: m for m in client.models()}
        names = args.models or sorted(index)
        healthy = live and ready
        for name in names:
            model_ready = client.is_model_ready(name)
            healthy = healthy and model_ready
            info = index.get(name)
            state = info.state if info and info.state else ("READY" if model_ready else "UNKNOWN")
            reason = f" ({info.reason})" if info and info.reason else ""
            version = f" v{info.version}" if info and info.version else ""
            print(f"model   {name}{version}: {'ready' if model_ready else 'NOT READY'} [{state}]{reason}")
        if not names:
            print("model   (none in repository index)")
    return 0 if healthy else 1


def cmd_models(args: argparse.Namespace) -> int:
    """Runs ``omni-client models``: prints the repository index as a table."""
    with _connect(args) as client:
        models = client.models()
    if not models:
        print("(no models in repository index)")
        return 0
    rows = [("NAME", "VERSION", "STATE", "REASON")] + [(m.name, m.version, m.state, m.reason) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    """Runs ``omni-client control``: prints the model's JSON answer."""
    return control.cmd_control(args, _connect(args, args.model))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``omni-client`` console script.

    Args:
        argv: Arguments (without the program name); None reads ``sys.argv``.

    Returns:
        The process exit code.
    """
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InvalidRequestError as exc:
        print(f"{PROG}: error: {exc.message()}", file=sys.stderr)
        return 2
    except OmniClientError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the output file cannot be written
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
