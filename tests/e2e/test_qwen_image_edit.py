"""Qwen-Image-Edit end to end on its own tritonserver: one model, ensemble, stream, gRPC and HTTP, equal diffusers."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from omni_backend.testing.compare import assert_same_image
from omni_client import OmniClient
from omni_client.cli import main as omni_client_main
from tests.e2e.conftest import PROTOCOLS, RawClient, family_server, protocol_client
from tests.e2e.test_bad_input import status_is_invalid_arg
from tests.test_parity_qwen_image_edit import input_image

pytestmark = pytest.mark.slow

MODELS = ("qwen_image_edit", "qwen_image_edit_ensemble")
# instruction, seed, input image (height, width, seed): both images resize to 896x1184, one batching key
EDITS = [("make the disc red", 11, (48, 64, 0)), ("a night scene, 夜", 12, (96, 128, 1))]


edit_server = family_server("qwen_image_edit", "tiny_qwen_image_edit")
client = protocol_client("edit_server")


def params(i: int, **extra) -> dict:
    prompt, seed, (height, width, image_seed) = EDITS[i]
    values = {
        "prompt": prompt,
        "input_image": input_image(height, width, image_seed),
        "height": np.int32(64),
        "width": np.int32(96),
        "num_inference_steps": np.int32(2),
        "seed": np.int64(seed),
        "negative_prompt": "blurry",
        "true_cfg_scale": np.float32(4.0),
    }
    return {**values, **extra}


@pytest.fixture(scope="module")
def expected(qwen_image_edit_reference):
    """EDITS[i] as QwenImageEditPipeline renders it (each computed once: a tiny edit still VAE-encodes 1 MP)."""

    @functools.cache
    def render(i: int) -> np.ndarray:
        values = params(i)
        return qwen_image_edit_reference(
            values["prompt"],
            int(values["seed"]),
            image=Image.fromarray(values["input_image"]),
            negative_prompt=values["negative_prompt"],
            true_cfg_scale=4.0,
            height=64,
            width=96,
            num_inference_steps=2,
        )

    return render


@pytest.mark.parametrize("model", MODELS)
def test_edit_equals_diffusers(client, model, expected):
    assert_same_image(client.infer(model, params(0)), expected(0))


def test_concurrent_edits_share_steps_and_equal_diffusers(edit_server, expected):
    """Two different edits at once on the one-model pipeline (one over gRPC, one over HTTP)."""
    clients = [RawClient(edit_server, p) for p in PROTOCOLS]
    results: dict[int, np.ndarray] = {}
    errors: list[Exception] = []

    def run(i: int) -> None:
        try:
            results[i] = clients[i].infer("qwen_image_edit", params(i))
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(EDITS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i in range(len(EDITS)):
        assert_same_image(results[i], expected(i))
    for c in clients:
        c.close()


def test_stream_and_cli_give_the_same_edit(edit_server, expected, tmp_path):
    values = params(1)
    with OmniClient(edit_server.grpc_url, protocol="grpc", model="qwen_image_edit_stream") as client:
        image = client.generate_stream(
            values["prompt"], input_image=values["input_image"], negative_prompt="blurry", output="numpy",
            height=64, width=96, num_inference_steps=2, seed=12,
        )  # fmt: skip
    assert_same_image(image, expected(1))
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.fromarray(values["input_image"]).save(source)
    argv = ["generate", "--url", edit_server.http_url, "--protocol", "http", "--timeout", "900"]
    argv += ["--model", "qwen_image_edit_ensemble"]
    argv += ["--prompt", values["prompt"], "--image", str(source), "--negative-prompt", "blurry", "--seed", "12"]
    assert omni_client_main([*argv, "--height", "64", "--width", "96", "--steps", "2", "--out", str(out)]) == 0
    assert_same_image(np.asarray(Image.open(out)), expected(1))


BAD = {
    "missing": ({"input_image": None}, "input_image: is required"),
    "missing_prompt": ({"prompt": None}, "prompt"),  # optional in the config (control ops carry none)
    "four_channels": ({"input_image": np.zeros((8, 8, 4), np.uint8)}, "input_image"),
    "extreme_aspect": ({"input_image": np.zeros((1, 400, 3), np.uint8)}, "input_image: aspect ratio of 1x400"),
    "not_uint8": ({"input_image": np.zeros((8, 8, 3), np.float32)}, "input_image"),
}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_image_is_invalid_arg_naming_it(client, model, case):
    extra, message = BAD[case]
    values = {k: v for k, v in params(0, **extra).items() if v is not None}
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, values)
    assert status_is_invalid_arg(info.value), info.value.message()
    assert message in info.value.message()


@pytest.mark.parametrize("model", ["qwen_image_edit", "qwen_image_edit_transformer"])
def test_control_input_is_refused_unless_enabled(edit_server, model):
    """The engine models take the control channel (README "Control"); the shipped config keeps it off."""
    raw = RawClient(edit_server, "grpc")
    try:
        with pytest.raises(InferenceServerException) as info:
            raw.infer(model, {"control": '{"op": "status"}'}, "control_result")
        assert status_is_invalid_arg(info.value) and "enable_control" in info.value.message()
    finally:
        raw.close()
