"""omni_client against in-process fake Triton servers (real gRPC / HTTP wire protocols, no Triton)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from omni_client import AsyncOmniClient, GenerationRequest, ModelInfo, OmniClient, OmniClientError
from omni_client.cli import main
from omni_client_fakes import FakeServer
from PIL import Image


def test_generate_image_and_wire_format(fake_server: FakeServer) -> None:
    prompt = "un renard — 一只狐狸 🦊"
    image = np.arange(5 * 4 * 3, dtype=np.uint8).reshape(5, 4, 3)
    with OmniClient(fake_server.url, protocol=fake_server.protocol, timeout=30) as client:
        out = client.generate(prompt, height=32, width=48, seed=300, guidance_scale=3.5, input_image=image)
        assert isinstance(out, Image.Image) and out.size == (48, 32) and out.getpixel((0, 0)) == (44, 44, 44)
        arr = client.generate("plain", output="numpy")
    assert arr.shape == (16, 24, 3) and arr.dtype == np.uint8
    model, tensors = fake_server.backend.requests[0]
    assert model == "flux"
    assert {k: (v[0], list(v[1])) for k, v in tensors.items()} == {
        "prompt": ("BYTES", [1, 1]),
        "height": ("INT32", [1, 1]),
        "width": ("INT32", [1, 1]),
        "guidance_scale": ("FP32", [1, 1]),
        "seed": ("INT64", [1, 1]),
        "input_image": ("UINT8", [1, 5, 4, 3]),
    }
    assert tensors["prompt"][2][0, 0].decode("utf-8") == prompt
    np.testing.assert_array_equal(tensors["input_image"][2][0], image)
    assert list(fake_server.backend.requests[1][1]) == ["prompt"]


def test_generate_video(fake_server: FakeServer) -> None:
    with OmniClient(fake_server.url, protocol=fake_server.protocol, model="wan") as client:
        frames = client.generate("waves", num_frames=3, height=8, width=8)
        video = client.generate(GenerationRequest("waves", num_frames=2), output="numpy")
    assert isinstance(frames, list) and len(frames) == 3 and frames[0].size == (8, 8)
    assert [f.getpixel((0, 0))[0] for f in frames] == [7, 8, 9]
    assert video.shape == (2, 16, 24, 3) and video.dtype == np.uint8


def test_server_errors_carry_message(fake_server: FakeServer) -> None:
    with OmniClient(fake_server.url, protocol=fake_server.protocol) as client:
        with pytest.raises(OmniClientError, match="pipeline error: cannot render 'fail now'") as info:
            client.generate("fail now")
        assert info.value.status()
        with pytest.raises(OmniClientError, match="unknown model: 'nope'"):
            client.generate("x", model="nope")


def test_health_and_models(fake_server: FakeServer) -> None:
    with OmniClient(fake_server.url, protocol=fake_server.protocol) as client:
        assert client.is_live() and client.is_ready()
        assert client.is_model_ready() and not client.is_model_ready("broken") and not client.is_model_ready("nope")
        client.wait_until_ready(timeout=5, models=["flux"])
        with pytest.raises(OmniClientError, match="not ready after"):
            client.wait_until_ready(timeout=0.2, poll_interval=0.05, models=["broken"])
        models = client.models()
    assert models == [
        ModelInfo("broken", "", "UNAVAILABLE", "failed to load: out of memory"),
        ModelInfo("flux", "1", "READY"),
        ModelInfo("wan", "1", "READY"),
    ]


def test_generate_many_is_concurrent_and_ordered(fake_server: FakeServer) -> None:
    requests = [GenerationRequest(f"slow {i}", seed=i, height=4, width=4) for i in range(6)]
    with OmniClient(fake_server.url, protocol=fake_server.protocol) as client:
        start = time.perf_counter()
        outs = client.generate_many(requests, concurrency=3, output="numpy")
        elapsed = time.perf_counter() - start
        assert [int(o[0, 0, 0]) for o in outs] == list(range(6))
        assert fake_server.backend.max_in_flight == 3
        assert elapsed < 6 * 0.2  # sequential would take >= 1.2 s
        fake_server.backend.max_in_flight = 0
        assert len(client.generate_many(["a", "b"], concurrency=1)) == 2
        assert fake_server.backend.max_in_flight == 1


def test_generate_many_errors(fake_server: FakeServer) -> None:
    with OmniClient(fake_server.url, protocol=fake_server.protocol) as client:
        outs = client.generate_many(["a", "fail b", "c"], concurrency=2, return_exceptions=True)
        assert isinstance(outs[0], Image.Image) and isinstance(outs[2], Image.Image)
        assert isinstance(outs[1], OmniClientError) and "fail b" in str(outs[1])
        with pytest.raises(OmniClientError, match="fail b"):
            client.generate_many(["a", "fail b", "c"], concurrency=2)
        assert client.is_ready()  # still usable afterwards


def test_async_client(fake_server: FakeServer) -> None:
    async def run() -> None:
        async with AsyncOmniClient(fake_server.url, protocol=fake_server.protocol) as client:
            assert await client.is_live() and await client.is_ready()
            assert await client.is_model_ready("flux") and not await client.is_model_ready("broken")
            await client.wait_until_ready(timeout=5, models=["flux"])
            assert [m.name for m in await client.models()] == ["broken", "flux", "wan"]
            image = await client.generate("a cat", height=8, width=12, seed=5)
            assert image.size == (12, 8) and image.getpixel((0, 0)) == (5, 5, 5)
            video = await client.generate("waves", model="wan", output="numpy", num_frames=4)
            assert video.shape == (4, 16, 24, 3)
            start = time.perf_counter()
            outs = await client.generate_many([f"slow {i}" for i in range(4)], concurrency=4, output="numpy")
            assert len(outs) == 4 and time.perf_counter() - start < 4 * 0.2
            assert fake_server.backend.max_in_flight == 4
            mixed = await client.generate_many(["a", "fail"], return_exceptions=True)
            assert isinstance(mixed[1], OmniClientError)
            with pytest.raises(OmniClientError, match="pipeline error"):
                await client.generate("fail")
        with pytest.raises(OmniClientError, match="closed"):
            await client.is_ready()

    asyncio.run(run())


def test_cli_generate(fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sub" / "fox.png"
    src = tmp_path / "in.png"
    Image.new("RGB", (6, 5), (1, 2, 3)).save(src)
    common = ["--url", fake_server.url, "--protocol", fake_server.protocol]
    argv = ["generate", *common, "--prompt", "a fox", "--height", "32", "--width", "40", "--steps", "2"]
    assert main([*argv, "--seed", "9", "--input-image", str(src), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert f"saved {out} (40x32) in " in stdout and stdout.rstrip().endswith(" s")
    assert Image.open(out).size == (40, 32)
    _, tensors = fake_server.backend.requests[0]
    assert tensors["num_inference_steps"][2][0, 0] == 2 and tensors["input_image"][1] == [1, 5, 6, 3]

    gif = tmp_path / "waves.gif"
    assert main(["generate", *common, "--model", "wan", "--prompt", "w", "--num-frames", "3", "--out", str(gif)]) == 0
    assert "3 frames 24x16" in capsys.readouterr().out and Image.open(gif).n_frames == 3

    assert main(["generate", *common, "--prompt", "fail please", "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "pipeline error: cannot render 'fail please'" in err and "Traceback" not in err


def test_cli_health_and_models(fake_server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--url", fake_server.url, "--protocol", fake_server.protocol]
    assert main(["health", *common, "--model", "flux"]) == 0
    out = capsys.readouterr().out
    assert "live    yes" in out and "ready   yes" in out and "flux v1: ready [READY]" in out
    assert main(["health", *common]) == 1  # "broken" is not ready
    assert "broken: NOT READY [UNAVAILABLE] (failed to load: out of memory)" in capsys.readouterr().out
    assert main(["models", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "STATE", "REASON"]
    assert lines[2].split() == ["flux", "1", "READY"] and "out of memory" in lines[1]


def test_cli_protocol_from_url_scheme(capsys: pytest.CaptureFixture[str], fake_server: FakeServer) -> None:
    # No --protocol: the http:// or grpc:// prefix selects it.
    assert main(["models", "--url", f"{fake_server.protocol}://{fake_server.url}"]) == 0
    assert "flux" in capsys.readouterr().out
