"""Unit tests of the ``omni-client`` command line (no server; unreachable cases use a closed port)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omni_client.cli import build_parser, main


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("generate", "health", "models"))
    for cmd in ("generate", "health", "models"):
        with pytest.raises(SystemExit) as info:
            main([cmd, "--help"])
        assert info.value.code == 0
        assert "--url" in capsys.readouterr().out


def test_cli_parsing() -> None:
    args = build_parser().parse_args(
        ["generate", "--prompt", "a fox", "--steps", "4", "--seed", "3", "--guidance-scale", "2.5", "--out", "o.png"]
    )
    assert (args.prompt, args.num_inference_steps, args.seed, args.guidance_scale) == ("a fox", 4, 3, 2.5)
    assert args.model == "flux" and args.url is None and args.protocol is None and args.height is None
    args = build_parser().parse_args(
        ["generate", "--prompt", "x", "--out", "o.png", "--cache-threshold", "0", "--lora", "ink", "--lora-scale", "-1"]
    )
    assert (args.cache_threshold, args.lora_name, args.lora_scale) == (0.0, "ink", -1.0)
    args = build_parser().parse_args(["health", "--url", "h:1", "--protocol", "http", "--model", "a", "--model", "b"])
    assert args.models == ["a", "b"] and args.protocol == "http"


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--out", "x.png"],  # missing --prompt
        ["generate", "--prompt", "x", "--out", "x.png", "--height", "big"],
        ["models", "--protocol", "tcp"],
        ["frobnicate"],
    ],
)
def test_cli_usage_errors_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_cli_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "--url", "localhost:notaport"]) == 2
    err = capsys.readouterr().err
    assert "invalid url" in err and "Traceback" not in err


def test_cli_invalid_local_args(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "x", "--height", "-8", "--out", str(tmp_path / "o.png")]) == 2
    assert "height must be a positive integer" in capsys.readouterr().err
    missing = tmp_path / "missing.png"
    assert main(["generate", "--prompt", "x", "--input-image", str(missing), "--out", str(tmp_path / "o.png")]) == 2
    assert "cannot read --image" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("command", [["health"], ["models"], ["generate", "--prompt", "x", "--out", "unused.png"]])
def test_cli_unreachable_server(
    command: list[str], protocol: str, closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main([*command, "--url", f"127.0.0.1:{closed_port}", "--protocol", protocol, "--timeout", "5"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"cannot reach server at 127.0.0.1:{closed_port}" in err and "Traceback" not in err


def test_cli_unreachable_server_subprocess(closed_port: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "omni_client.cli", "models", "--url", f"http://127.0.0.1:{closed_port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "omni-client: error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "cannot reach server" in proc.stderr


def test_video_saved_as_mp4_gif_npy_and_frames(tmp_path: Path) -> None:
    import av
    from PIL import Image

    from omni_client.cli import _save

    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(5, 18, 22, 3), dtype=np.uint8)
    path, size = _save(video, tmp_path / "v.mp4", fps=8.0)
    assert size == "5 frames 22x18"
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (18, 22, 3)
    with Image.open(_save(video, tmp_path / "v.gif", fps=8.0)[0]) as gif:
        assert gif.n_frames == 5 and gif.size == (22, 18)
    assert np.array_equal(np.load(_save(video, tmp_path / "v.npy", fps=8.0)[0]), video)
    first, _ = _save(video, tmp_path / "v.png", fps=8.0)
    assert first.name == "v_0000.png" and np.array_equal(np.asarray(Image.open(first)), video[0])
    assert len(list(tmp_path.glob("v_*.png"))) == 5
