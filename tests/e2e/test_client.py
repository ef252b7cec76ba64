"""omni_client and the omni-client CLI against the real tritonserver."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from omni_backend.testing.compare import assert_same_image
from omni_client import AsyncOmniClient, GenerationRequest, OmniClient, OmniClientError

pytestmark = pytest.mark.slow

PARAMS = {"height": 32, "width": 48, "num_inference_steps": 2}


def url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_equals_diffusers(server, protocol, flux_reference):
    expected = flux_reference("a red circle", 3, **PARAMS)
    with OmniClient(url(server, protocol), protocol=protocol, model="flux") as client:
        image = client.generate("a red circle", seed=3, **PARAMS)
        array = client.generate("a red circle", seed=3, output="numpy", model="flux_ensemble", **PARAMS)
    assert isinstance(image, Image.Image) and image.size == (48, 32)
    assert_same_image(np.asarray(image), expected)
    assert_same_image(array, expected)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_generate_many_keeps_order_and_reports_each_failure(server, protocol, flux_reference):
    requests = [
        GenerationRequest("a cat", seed=1, **PARAMS),
        GenerationRequest("a dog", seed=2, **{**PARAMS, "height": 40}),  # not a multiple of 16
        GenerationRequest("a bird", seed=3, **PARAMS),
    ]
    with OmniClient(url(server, protocol), protocol=protocol) as client:
        outputs = client.generate_many(requests, concurrency=3, output="numpy", return_exceptions=True)
        assert isinstance(outputs[1], OmniClientError) and "height" in str(outputs[1])
        with pytest.raises(OmniClientError, match="height"):
            client.generate_many(requests, concurrency=2)
        assert client.is_ready()
    assert_same_image(outputs[0], flux_reference("a cat", 1, **PARAMS))
    assert_same_image(outputs[2], flux_reference("a bird", 3, **PARAMS))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client(server, protocol, flux_reference):
    async def run():
        async with AsyncOmniClient(url(server, protocol), protocol=protocol) as client:
            assert await client.is_ready()
            names = {m.name for m in await client.models()}
            images = await asyncio.gather(
                *(client.generate("a square", seed=s, output="numpy", **PARAMS) for s in (4, 5))
            )
            return names, images

    names, images = asyncio.run(run())
    assert {"flux", "flux_ensemble", "flux_transformer"} <= names
    for seed, image in zip((4, 5), images, strict=True):
        assert_same_image(image, flux_reference("a square", seed, **PARAMS))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "omni_client.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_generate_health_models(server, tmp_path, flux_reference):
    out = tmp_path / "out.png"
    done = cli(
        "generate", "--url", server.http_url, "--protocol", "http", "--model", "flux_ensemble",
        "--prompt", "a red circle", "--height", "32", "--width", "48", "--steps", "2", "--seed", "8",
        "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    assert_same_image(np.asarray(Image.open(out)), flux_reference("a red circle", 8, **PARAMS))

    health = cli("health", "--url", server.grpc_url)
    assert health.returncode == 0, health.stderr
    assert "flux_ensemble" in health.stdout
    models = cli("models", "--url", server.grpc_url)
    assert models.returncode == 0 and "READY" in models.stdout


def test_cli_server_error_is_clean(server, tmp_path):
    done = cli(
        "generate", "--url", server.grpc_url, "--model", "flux", "--prompt", "x",
        "--height", "40", "--out", str(tmp_path / "x.png"),
    )  # fmt: skip
    assert done.returncode == 1
    assert "height" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_cli_stream_shows_progress_and_saves_previews(server, tmp_path, flux_reference):
    out, previews = tmp_path / "out.png", tmp_path / "previews"
    done = cli(
        "generate", "--url", server.grpc_url, "--model", "flux_stream", "--stream", "--preview-every", "2",
        "--preview-dir", str(previews), "--prompt", "a red circle", "--height", "32", "--width", "48",
        "--steps", "5", "--seed", "8", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "5/5" in done.stderr  # the progress bar reached the end
    assert sorted(p.name for p in previews.iterdir()) == ["step_0002.png", "step_0004.png"]
    assert_same_image(
        np.asarray(Image.open(out)), flux_reference("a red circle", 8, **{**PARAMS, "num_inference_steps": 5})
    )
