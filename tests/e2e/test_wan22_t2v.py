"""Wan2.2 T2V end to end on its own tritonserver: `video` over gRPC and HTTP equals diffusers' WanPipeline."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from tests.e2e.conftest import RawClient, family_server, protocol_client, stream_responses
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


def stream_steps(responses: list[tuple]) -> tuple[list[int], dict[int, np.ndarray], np.ndarray]:
    """A successful stream of a video model: the step of each response, the previews by step, the video.

    Checks the wire contract on the way: ``total_steps`` on every response, previews only under
    ``preview_video`` (rank 4, never the image models' ``preview``), ``video`` only on the last response.
    """
    assert all(error is None for _, error in responses), [e for _, e in responses if e is not None]
    results = [r for r, _ in responses if r.get_response().outputs]  # the empty final response carries nothing
    total = {int(r.as_numpy("total_steps")[0, 0]) for r in results}
    steps = [int(r.as_numpy("step")[0, 0]) for r in results]
    assert len(total) == 1 and steps[-1] == total.pop()
    assert all(r.as_numpy("preview") is None for r in results)
    videos = [(s, r.as_numpy("preview_video")) for s, r in zip(steps, results, strict=True)]
    previews = {s: v[0] for s, v in videos if v is not None}
    assert all(r.as_numpy("video") is None for r in results[:-1])
    return steps, previews, results[-1].as_numpy("video")[0]


def test_stream_sends_every_step_video_previews_then_the_video(wan_server, wan22_t2v_reference):
    values = params(
        "a red circle", seed=21, negative_prompt="blurry", guidance_scale=np.float32(4.0),
        guidance_scale_2=np.float32(2.0), num_inference_steps=np.int32(5), preview_every=np.int32(2),
    )  # fmt: skip
    steps, previews, video = stream_steps(stream_responses(wan_server, "wan22_t2v_stream", values))
    assert steps == [1, 2, 3, 4, 5]
    assert sorted(previews) == [2, 4]  # the last step sends the video itself
    assert all(p.shape == (5, 32, 48, 3) and p.dtype == np.uint8 for p in previews.values())
    # the predicted clean video sharpens towards the final one as steps go by
    error = {s: np.abs(p.astype(int) - video.astype(int)).mean() for s, p in previews.items()}
    assert error[4] < error[2] and error[2] > 1, error
    one_model = RawClient(wan_server, "grpc")
    plain = {k: v for k, v in values.items() if k != "preview_every"}
    assert np.array_equal(video, one_model.infer("wan22_t2v", plain, output="video"))  # same engine, same video
    one_model.close()
    expected = wan22_t2v_reference(
        "a red circle", 21, negative_prompt="blurry", guidance_scale=4.0, guidance_scale_2=2.0,
        height=32, width=48, num_frames=5, num_inference_steps=5,
    )  # fmt: skip
    for frame in range(5):
        assert_same_image(video[frame], expected[frame])


@pytest.mark.parametrize("every", [-1, 501])
def test_stream_preview_every_out_of_range_is_refused_naming_it(wan_server, every):
    """The request's only response is the error naming the field and its range (max_steps: 500).

    A gRPC stream carries an error as a message only (ModelStreamInferResponse.error_message, no
    status code), so the INVALID_ARG status itself is not visible here; the message is the request
    parser's InvalidRequestError, which the model always answers as INVALID_ARG.
    """
    values = params("a cat", seed=1, preview_every=np.int32(every))
    responses = stream_responses(wan_server, "wan22_t2v_stream", values)
    (error,) = [e for _, e in responses if e is not None]
    assert not [r for r, _ in responses if r is not None and r.get_response().outputs], "the request ran"
    assert f"preview_every: {every} is outside the allowed range [0, 500]" in error.message()


def test_cli_streams_and_saves_video_previews_as_gifs(wan_server, tmp_path, wan22_t2v_reference):
    from PIL import Image

    from tests.e2e.test_client import cli

    argv = ["generate", "--url", wan_server.grpc_url, "--model", "wan22_t2v_stream", "--prompt", "a cat"]
    argv += ["--seed", "3", "--height", "32", "--width", "48", "--num-frames", "5", "--steps", "3"]
    argv += ["--stream", "--preview-every", "1", "--preview-dir", str(tmp_path / "previews")]
    done = cli(*argv, "--out", str(tmp_path / "v.npy"))
    assert done.returncode == 0, done.stderr
    assert "3/3 steps" in done.stderr  # the progress bar
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step_0001.gif", "step_0002.gif"]
    for path in (tmp_path / "previews").iterdir():
        with Image.open(path) as gif:
            assert (gif.n_frames, gif.size) == (5, (48, 32))
    expected = wan22_t2v_reference("a cat", 3, height=32, width=48, num_frames=5, num_inference_steps=3)
    assert_same_image(np.load(tmp_path / "v.npy"), expected)
