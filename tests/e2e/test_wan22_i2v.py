"""Wan2.2 I2V end to end on its own tritonserver: `video` over gRPC and HTTP equals WanImageToVideoPipeline's."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_client import OmniClient
from omni_client.cli import main as omni_client_main
from tests.e2e.conftest import (
    PROTOCOLS,
    REPOSITORY,
    RawClient,
    add_parameters,
    family_models,
    protocol_client,
    repository_of,
    serving,
    stream_responses,
)
from tests.e2e.test_bad_input import status_is_invalid_arg
from tests.test_parity_qwen_image_edit import input_image

pytestmark = pytest.mark.slow

MODELS = ("wan22_i2v", "wan22_i2v_ensemble")
CONTROLLED = ("wan22_i2v", "wan22_i2v_transformer")  # the models with the `control` input (README "Control")
# prompt, seed, input image (height, width, seed): sizes differ, both are resized to 32x48 (one batching key)
VIDEOS = [("a red circle rolls away", 21, (48, 64, 0)), ("a green square, 猫", 22, (40, 30, 1))]


@pytest.fixture(scope="module")
def i2v_server(tiny_wan22_i2v, model_root, tmp_path_factory):
    repository = repository_of(tmp_path_factory.mktemp("wan-i2v-repo"), family_models("wan22_i2v"))
    traces = tmp_path_factory.mktemp("wan-i2v-traces")
    entries = {"enable_control": "true", "profile_dir": str(traces)}
    extra = "".join(f'  {{ key: "{k}", value: {{ string_value: "{v}" }} }},\n' for k, v in entries.items())
    for name in CONTROLLED:  # control on (a loopback server needs no admin key); it changes no generation
        (repository / name).unlink()
        shutil.copytree(REPOSITORY / name, repository / name)
        add_parameters(repository, name, extra)
    with serving(repository, model_root) as process:
        process.traces = traces
        yield process


client = protocol_client("i2v_server")


def params(i: int, **extra) -> dict:
    prompt, seed, (height, width, image_seed) = VIDEOS[i]
    values = {
        "prompt": prompt,
        "input_image": input_image(height, width, image_seed),
        "negative_prompt": "blurry",
        "height": np.int32(32),
        "width": np.int32(48),
        "num_frames": np.int32(5),
        "num_inference_steps": np.int32(4),
        "guidance_scale": np.float32(4.0),
        "guidance_scale_2": np.float32(2.0),
        "seed": np.int64(seed),
    }
    return {**values, **extra}


@pytest.fixture(scope="module")
def expected(wan22_i2v_reference):
    """VIDEOS[i] as WanImageToVideoPipeline renders it (each computed once)."""

    @functools.cache
    def render(i: int) -> np.ndarray:
        values = params(i)
        return wan22_i2v_reference(
            values["prompt"], int(values["seed"]), image=Image.fromarray(values["input_image"]),
            negative_prompt="blurry", guidance_scale=4.0, guidance_scale_2=2.0,
            height=32, width=48, num_frames=5, num_inference_steps=4,
        )  # fmt: skip

    return render


def assert_same_video(video: np.ndarray, expected: np.ndarray) -> None:
    assert video.shape == expected.shape == (5, 32, 48, 3)
    for frame in range(len(expected)):
        assert_same_image(video[frame], expected[frame])


@pytest.mark.parametrize("model", MODELS)
def test_video_equals_diffusers_frame_for_frame(client, model, expected):
    assert_same_video(client.infer(model, params(0), output="video"), expected(0))


def test_concurrent_videos_share_steps_and_equal_diffusers(i2v_server, expected):
    """Two image-to-video requests at once on the one-model pipeline (one over gRPC, one over HTTP)."""
    clients = [RawClient(i2v_server, p) for p in PROTOCOLS]
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []

    def run(i: int) -> None:
        try:
            results[i] = clients[i].infer("wan22_i2v", params(i), output="video")
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(VIDEOS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i in range(len(VIDEOS)):
        assert_same_video(results[i], expected(i))
    for c in clients:
        c.close()


def test_client_and_cli_send_the_image_of_a_video(i2v_server, expected, tmp_path):
    values = params(1)
    with OmniClient(i2v_server.grpc_url, protocol="grpc", model="wan22_i2v_ensemble") as client:
        video = client.generate(
            values["prompt"], input_image=Image.fromarray(values["input_image"]), negative_prompt="blurry",
            output="numpy", height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=4.0,
            guidance_scale_2=2.0, seed=22,
        )  # fmt: skip
    assert_same_video(video, expected(1))
    source, out = tmp_path / "in.png", tmp_path / "out.npy"
    Image.fromarray(values["input_image"]).save(source)
    argv = ["generate", "--url", i2v_server.http_url, "--protocol", "http", "--timeout", "900", "--model", "wan22_i2v"]
    argv += ["--prompt", values["prompt"], "--image", str(source), "--negative-prompt", "blurry", "--seed", "22"]
    argv += ["--height", "32", "--width", "48", "--num-frames", "5", "--steps", "4"]
    argv += ["--guidance-scale", "4", "--guidance-scale-2", "2"]
    assert omni_client_main([*argv, "--out", str(out)]) == 0
    assert_same_video(np.load(out), expected(1))


def test_stream_sends_video_previews_then_the_video(i2v_server, expected):
    from tests.e2e.test_wan22_t2v import stream_steps

    responses = stream_responses(i2v_server, "wan22_i2v_stream", params(0, preview_every=np.int32(1)))
    steps, previews, video = stream_steps(responses)
    assert steps == [1, 2, 3, 4] and sorted(previews) == [1, 2, 3]
    assert all(p.shape == (5, 32, 48, 3) and p.dtype == np.uint8 for p in previews.values())
    # the predicted clean video sharpens towards the final one as steps go by
    error = {s: np.abs(p.astype(int) - video.astype(int)).mean() for s, p in previews.items()}
    assert error[3] < error[1] and error[1] > 1, error
    assert_same_video(video, expected(0))


BAD = {
    "missing_image": ({"input_image": None}, "input_image: is required"),
    "four_channels": ({"input_image": np.zeros((8, 8, 4), np.uint8)}, "input_image"),
    "not_uint8": ({"input_image": np.zeros((8, 8, 3), np.float32)}, "input_image"),
    "frames_not_4k_plus_1": ({"num_frames": np.int32(6)}, "num_frames: 6 is not 4k+1"),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_invalid_arg_naming_the_field(client, model, case):
    extra, message = BAD[case]
    values = {k: v for k, v in params(0, **extra).items() if v is not None}
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, values, output="video")
    assert status_is_invalid_arg(info.value), info.value.message()
    assert message in info.value.message()


def test_bad_image_condition_sent_to_the_transformer_stage_is_invalid_arg(client):
    """The transformer stage, called directly, names image_condition when it does not fit the request."""
    values = {k: v for k, v in params(0).items() if k not in ("prompt", "input_image", "negative_prompt")}
    values["prompt_embeds"] = np.zeros((512, 32), np.float32)
    values["image_condition"] = np.zeros((20, 3, 4, 6), np.float32)  # 3 latent frames: 9 frames, not 5
    with pytest.raises(InferenceServerException) as info:
        client.infer("wan22_i2v_transformer", values, output="latents")
    assert status_is_invalid_arg(info.value), info.value.message()
    assert "image_condition: shape [20, 3, 4, 6] does not match 5 frames of 32x48" in info.value.message()
    # the server keeps serving: the same model answers a good request right after
    values["image_condition"] = np.zeros((20, 2, 4, 6), np.float32)
    assert client.infer("wan22_i2v_transformer", values, output="latents").shape == (16, 2, 4, 6)


def test_control_status_profiling_sleep_and_wake(i2v_server, expected):
    """README feature table: status, profiling, sleep and wake work on the family's engine models."""
    client = RawClient(i2v_server, "grpc")

    def control(model: str, op: str, **args) -> dict:
        return json.loads(client.infer(model, {"control": json.dumps({"op": op, **args})}, "control_result")[0])

    for model in CONTROLLED:
        assert control(model, "status")["state"] == "awake"
    assert control("wan22_i2v", "profile_start", max_steps=10)["profiling"] is True
    assert_same_video(client.infer("wan22_i2v", params(0), output="video"), expected(0))
    [trace] = control("wan22_i2v", "profile_stop")["traces"]
    assert Path(trace).parent == i2v_server.traces and Path(trace).name.startswith("wan22_i2v-rank0-")
    assert control("wan22_i2v", "sleep", level=1)["state"] == "asleep"
    with pytest.raises(InferenceServerException) as info:  # asleep: refused, not queued forever
        client.infer("wan22_i2v", params(0), output="video")
    assert "model is asleep" in info.value.message()
    assert control("wan22_i2v", "wake")["state"] == "awake"
    assert_same_video(client.infer("wan22_i2v", params(0), output="video"), expected(0))
    client.close()
