"""Wan2.2 T2V end to end on its own tritonserver: `video` over gRPC and HTTP equals diffusers' WanPipeline."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from tests.e2e.conftest import family_server, protocol_client
from tests.e2e.test_bad_input import status_is_invalid_arg

pytestmark = pytest.mark.slow

MODELS = ("wan22_t2v", "wan22_t2v_ensemble")
wan_server = family_server("wan22_t2v", "tiny_wan22_t2v")
client = protocol_client("wan_server")


def params(prompt: str, seed: int, **extra) -> dict:
    values = {
        "prompt": prompt,
        "height": np.int32(32),
        "width": np.int32(48),
        "num_frames": np.int32(5),
        "num_inference_steps": np.int32(4),
        "seed": np.int64(seed),
    }
    return {**values, **extra}


@pytest.mark.parametrize("model", MODELS)
def test_video_equals_diffusers_frame_for_frame(client, model, wan22_t2v_reference):
    values = params(
        "a red circle", seed=21, negative_prompt="blurry", guidance_scale=np.float32(4.0),
        guidance_scale_2=np.float32(2.0),
    )  # fmt: skip
    video = client.infer(model, values, output="video")
    assert video.shape == (5, 32, 48, 3)
    expected = wan22_t2v_reference(
        "a red circle", 21, negative_prompt="blurry", guidance_scale=4.0, guidance_scale_2=2.0,
        height=32, width=48, num_frames=5, num_inference_steps=4,
    )  # fmt: skip
    for frame in range(5):
        assert_same_image(video[frame], expected[frame])


@pytest.mark.parametrize("model", MODELS)
def test_frame_count_the_vae_cannot_take_is_invalid_arg(client, model):
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, params("a cat", seed=1, num_frames=np.int32(6)), output="video")
    assert status_is_invalid_arg(info.value), info.value.message()
    assert "num_frames" in info.value.message() and "4k+1" in info.value.message()


def test_cli_writes_the_video_as_npy_and_mp4(wan_server, tmp_path, wan22_t2v_reference):
    import av

    from tests.e2e.test_client import cli

    common = ["generate", "--url", wan_server.grpc_url, "--model", "wan22_t2v", "--prompt", "a cat", "--seed", "3"]
    common += ["--height", "32", "--width", "48", "--num-frames", "5", "--steps", "2", "--guidance-scale-2", "1.5"]
    done = cli(*common, "--out", str(tmp_path / "v.npy"))
    assert done.returncode == 0, done.stderr
    expected = wan22_t2v_reference(
        "a cat", 3, height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale_2=1.5
    )
    assert_same_image(np.load(tmp_path / "v.npy"), expected)
    done = cli(*common, "--out", str(tmp_path / "v.mp4"))
    assert done.returncode == 0, done.stderr
    with av.open(str(tmp_path / "v.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (32, 48, 3)
