"""Unit tests of omni_client that need no server (unreachable cases use a closed local port)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from omni_client import (
    INPUT_DATATYPES,
    AsyncOmniClient,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    OmniClient,
    OmniClientError,
    build_input_arrays,
    build_inputs,
    convert_output,
    extract_output,
    normalize_url,
)
from omni_client.errors import translate_errors
from omni_client.models import parse_repository_index
from omni_client.request import make_request
from omni_client.urls import check_protocol, uses_tls

FULL = GenerationRequest(
    prompt="a fox",
    negative_prompt="blurry",
    height=512,
    width=768,
    num_inference_steps=4,
    guidance_scale=3.5,
    true_cfg_scale=1.0,
    guidance_scale_2=2.0,
    seed=2**40,
    input_image=np.zeros((8, 6, 3), dtype=np.uint8),
    num_frames=9,
    cache_threshold=0.25,
    lora_name="pixel-art",
    lora_scale=-0.5,
)

# --------------------------------------------------------------------------------------------- inputs


def test_only_set_fields_are_sent() -> None:
    assert list(build_input_arrays(GenerationRequest("a cat"))) == ["prompt"]
    arrays = build_input_arrays(GenerationRequest("a cat", seed=0, width=64))
    assert list(arrays) == ["prompt", "width", "seed"]


def test_full_request_names_dtypes_shapes() -> None:
    arrays = build_input_arrays(FULL)
    assert set(arrays) == set(INPUT_DATATYPES)
    expected_dtypes = {"BYTES": np.object_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32, "UINT8": np.uint8}
    for name, arr in arrays.items():
        assert arr.dtype == expected_dtypes[INPUT_DATATYPES[name]], name
        assert arr.shape == ((1, 8, 6, 3) if name == "input_image" else (1, 1)), name
    assert arrays["seed"][0, 0] == 2**40
    assert arrays["guidance_scale"][0, 0] == pytest.approx(3.5)
    assert arrays["negative_prompt"][0, 0] == b"blurry"
    assert arrays["lora_name"][0, 0] == b"pixel-art"
    assert (arrays["cache_threshold"][0, 0], arrays["lora_scale"][0, 0]) == (0.25, -0.5)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_build_inputs_tritonclient_objects(protocol: str) -> None:
    inputs = build_inputs(FULL, protocol)
    got = {i.name(): (i.datatype(), i.shape()) for i in inputs}
    assert got["prompt"] == ("BYTES", [1, 1])
    assert got["height"] == ("INT32", [1, 1])
    assert got["guidance_scale"] == ("FP32", [1, 1])
    assert got["seed"] == ("INT64", [1, 1])
    assert got["input_image"] == ("UINT8", [1, 8, 6, 3])
    assert len(inputs) == len(INPUT_DATATYPES)
    # Pre-built arrays are accepted too (reuse by end-to-end tests).
    assert [i.name() for i in build_inputs({"prompt": build_input_arrays(FULL)["prompt"]}, protocol)] == ["prompt"]


def test_non_ascii_prompt_is_utf8() -> None:
    prompt = "un renard roux, café — 一只狐狸 🦊"
    arrays = build_input_arrays(GenerationRequest(prompt, negative_prompt="ñö"))
    assert arrays["prompt"][0, 0] == prompt.encode("utf-8")
    assert arrays["negative_prompt"][0, 0].decode("utf-8") == "ñö"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P"])
def test_input_image_from_pil(mode: str) -> None:
    image = Image.new("RGB", (5, 4), (10, 20, 30)).convert(mode)
    arr = build_input_arrays(GenerationRequest("x", input_image=image))["input_image"]
    assert arr.shape == (1, 4, 5, 3) and arr.dtype == np.uint8
    if mode in ("RGB", "RGBA"):
        assert tuple(arr[0, 0, 0]) == (10, 20, 30)


def test_input_image_from_ndarray_non_contiguous() -> None:
    base = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    view = base[:, ::2]
    arr = build_input_arrays(GenerationRequest("x", input_image=view))["input_image"]
    assert arr.shape == (1, 4, 3, 3) and arr.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(arr[0], view)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"input_image": np.zeros((8, 8, 2), np.uint8)}, r"shape \[H, W, 3\]"),
        ({"input_image": np.zeros((8, 8), np.uint8)}, r"shape \[H, W, 3\]"),
        ({"input_image": np.zeros((1, 8, 8, 3), np.uint8)}, r"shape \[H, W, 3\]"),
        ({"input_image": np.zeros((8, 8, 3), np.float32)}, "uint8"),
        ({"input_image": np.zeros((0, 8, 3), np.uint8)}, "empty"),
        ({"input_image": [[0, 0, 0]]}, "PIL image or a numpy array"),
        ({"height": 0}, "positive"),
        ({"width": -64}, "positive"),
        ({"num_inference_steps": 2.5}, "int"),
        ({"height": "512"}, "int"),
        ({"num_frames": True}, "int"),
        ({"height": 2**31}, "int32"),
        ({"seed": 2**63}, "int64"),
        ({"guidance_scale": float("nan")}, "finite"),
        ({"true_cfg_scale": "4"}, "number"),
        ({"negative_prompt": 3}, "str"),
    ],
)
def test_obviously_wrong_args_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        build_input_arrays(GenerationRequest("a cat", **kwargs))


def test_prompt_validation_and_numpy_scalars() -> None:
    with pytest.raises(InvalidRequestError, match="prompt is required"):
        build_input_arrays(GenerationRequest(None))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="str"):
        build_input_arrays(GenerationRequest(b"bytes"))  # type: ignore[arg-type]
    arrays = build_input_arrays(GenerationRequest("x", height=np.int64(64), seed=-1, guidance_scale=np.float32(2)))
    assert arrays["height"].dtype == np.int32 and arrays["seed"][0, 0] == -1


def test_make_request_and_error_types() -> None:
    assert make_request("x", seed=1) == GenerationRequest("x", seed=1)
    assert make_request(FULL) is FULL
    with pytest.raises(InvalidRequestError, match="unknown generation parameter"):
        make_request("x", steps=4)
    with pytest.raises(InvalidRequestError, match="not both"):
        make_request(FULL, seed=1)
    assert issubclass(InvalidRequestError, ValueError) and issubclass(InvalidRequestError, OmniClientError)


def test_generate_validates_before_sending(closed_port: int) -> None:
    with OmniClient(f"127.0.0.1:{closed_port}") as client:
        with pytest.raises(InvalidRequestError, match="shape"):
            client.generate("x", input_image=np.zeros((4, 4, 2), np.uint8))
        with pytest.raises(InvalidRequestError, match="output"):
            client.generate("x", output="jpeg")  # type: ignore[arg-type]
        with pytest.raises(InvalidRequestError, match="positive"):
            client.generate_many([GenerationRequest("ok"), GenerationRequest("bad", height=-1)])


# ----------------------------------------------------------------------------------------------- urls


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        ("localhost:8001", "grpc", "localhost:8001"),
        ("http://localhost:8000", "http", "localhost:8000"),
        ("http://localhost:8000/", "http", "localhost:8000"),
        ("HTTP://Triton.example.com:9000", "http", "triton.example.com:9000"),
        ("localhost", "grpc", "localhost:8001"),
        ("localhost", "http", "localhost:8000"),
        (None, "grpc", "localhost:8001"),
        ("", "http", "localhost:8000"),
        ("grpc://10.0.0.2:9001", "grpc", "10.0.0.2:9001"),
        ("http://10.0.0.2:9001", "grpc", "10.0.0.2:9001"),
        ("[::1]:8001", "grpc", "[::1]:8001"),
        ("  example.com:81 ", "grpc", "example.com:81"),
        ("https://proxy:443/triton/", "http", "proxy:443/triton"),
    ],
)
def test_normalize_url(url: str | None, protocol: str, expected: str) -> None:
    assert normalize_url(url, protocol) == expected


@pytest.mark.parametrize(
    ("url", "protocol"),
    [
        ("localhost:abc", "grpc"),
        ("localhost:99999", "http"),
        ("localhost:0", "grpc"),
        ("localhost:", "grpc"),
        ("ftp://host:21", "http"),
        ("host:8001/path", "grpc"),
        ("host name:8001", "grpc"),
        ("user@host:8001", "grpc"),
    ],
)
def test_normalize_url_rejects_bad_urls(url: str, protocol: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid url"):
        normalize_url(url, protocol)


def test_protocol_and_tls() -> None:
    assert check_protocol("HTTP") == "http"
    with pytest.raises(InvalidRequestError, match="unsupported protocol"):
        check_protocol("tcp")
    assert uses_tls("https://h:1") and uses_tls("grpcs://h:1")
    assert not uses_tls("http://h:1") and not uses_tls("h:1") and not uses_tls(None)
    assert OmniClient("http://localhost:8000", protocol="http").url == "localhost:8000"
    assert OmniClient(protocol="http").url == "localhost:8000"
    assert AsyncOmniClient().url == "localhost:8001"


# ------------------------------------------------------------------------------ results, errors, index


class _Result:
    def __init__(self, **outputs: np.ndarray) -> None:
        self.outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


def test_extract_and_convert_outputs() -> None:
    image = extract_output(_Result(image=np.full((1, 4, 6, 3), 9, np.uint8)))
    assert image.shape == (4, 6, 3)
    pil = convert_output(image)
    assert isinstance(pil, Image.Image) and pil.size == (6, 4) and pil.mode == "RGB"
    video = extract_output(_Result(video=np.zeros((1, 5, 4, 6, 3), np.uint8)))
    assert video.shape == (5, 4, 6, 3)
    frames = convert_output(video, "pil")
    assert isinstance(frames, list) and len(frames) == 5 and frames[0].size == (6, 4)
    assert convert_output(video, "numpy") is video
    with pytest.raises(OmniClientError, match="neither"):
        extract_output(_Result(other=np.zeros(3)))
    with pytest.raises(OmniClientError, match="unexpected shape"):
        extract_output(_Result(image=np.zeros((1, 4, 6, 4), np.uint8)))
    with pytest.raises(OmniClientError, match="batch of 1"):
        extract_output(_Result(image=np.zeros((2, 4, 6, 3), np.uint8)))
    with pytest.raises(OmniClientError, match="dtype"):
        extract_output(_Result(image=np.zeros((1, 4, 6, 3), np.float32)))


def test_error_translation() -> None:
    exc = InferenceServerException("height must be a multiple of 16", "StatusCode.INVALID_ARGUMENT", "dbg")
    err = OmniClientError.from_triton(exc)
    assert err.message() == "height must be a multiple of 16"
    assert err.status() == "StatusCode.INVALID_ARGUMENT" and err.debug_details() == "dbg"
    assert str(err) == "[StatusCode.INVALID_ARGUMENT] height must be a multiple of 16"
    with pytest.raises(OmniClientError, match="cannot reach server at h:1") as info, translate_errors("h:1"):
        raise ConnectionRefusedError(111, "Connection refused")
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    with pytest.raises(OmniClientError, match="timed out"), translate_errors("h:1"):
        raise TimeoutError()


def test_parse_repository_index() -> None:
    http_index = [{"name": "flux", "version": "1", "state": "READY"}, {"name": "b", "state": "UNAVAILABLE"}]
    assert parse_repository_index(http_index) == [ModelInfo("b", "", "UNAVAILABLE"), ModelInfo("flux", "1", "READY")]
    assert parse_repository_index({"models": http_index})[1].ready
    assert parse_repository_index({}) == []


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_clients_unreachable(protocol: str, closed_port: int) -> None:
    url = f"127.0.0.1:{closed_port}"
    with OmniClient(url, protocol=protocol, timeout=5) as client, pytest.raises(OmniClientError) as info:
        client.is_ready()
    assert "cannot reach server" in info.value.message() and info.value.status()
    with OmniClient(url, protocol=protocol) as client:
        with pytest.raises(OmniClientError, match="cannot reach server"):
            client.generate_many(["a", "b", "c"], concurrency=2)
        outs = client.generate_many(["a", "b"], concurrency=2, return_exceptions=True)
        assert all(isinstance(o, OmniClientError) for o in outs)
        with pytest.raises(InvalidRequestError, match="concurrency"):
            client.generate_many(["a"], concurrency=0)

    async def run() -> None:
        async with AsyncOmniClient(url, protocol=protocol, timeout=5) as client:
            with pytest.raises(OmniClientError, match="cannot reach server"):
                await client.generate("x")

    asyncio.run(run())
