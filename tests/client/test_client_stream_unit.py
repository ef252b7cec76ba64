"""Unit tests of streaming generation in omni_client (no server).

Responses are real ``tritonclient.grpc.InferResult`` objects built from hand-made
``ModelInferResponse`` protobufs. End-to-end tests against the ``flux_stream`` model live with the
server tests.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from omni_client import (
    AsyncOmniClient,
    FinalImage,
    InvalidRequestError,
    OmniClient,
    OmniClientError,
    StepUpdate,
)
from omni_client.cli import build_parser, main
from omni_client.progress import ProgressBar, format_elapsed, render_progress
from omni_client.request import GenerationRequest
from omni_client.stream import (
    StreamAssembler,
    build_stream_inputs,
    check_preview_every,
    deadline_error,
    final_flag,
    parse_stream_response,
)


def make_result(final: bool | None = None, **outputs: np.ndarray) -> InferResult:
    """An InferResult as tritonclient's stream callback gets it, with raw output contents."""
    response = service_pb2.ModelInferResponse(model_name="flux_stream", id="omni-test")
    for name, arr in outputs.items():
        response.outputs.add(name=name, datatype=np_to_triton_dtype(arr.dtype), shape=list(arr.shape))
        response.raw_output_contents.append(np.ascontiguousarray(arr).tobytes())
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return InferResult(response)


def step(n: int, total: int, preview: np.ndarray | None = None, final: bool | None = False) -> InferResult:
    outputs = {"step": np.array([[n]], np.int32), "total_steps": np.array([[total]], np.int32)}
    if preview is not None:
        outputs["preview"] = preview
    return make_result(final, **outputs)


def rgb(h: int, w: int, value: int = 7) -> np.ndarray:
    return np.full((1, h, w, 3), value, np.uint8)


def image_response(total: int = 3, final: bool | None = True) -> InferResult:
    return make_result(
        final, image=rgb(8, 12, 200), step=np.array([[total]], np.int32), total_steps=np.array([[total]], np.int32)
    )


# ------------------------------------------------------------------------------------------ arguments


def test_http_clients_refuse_streaming() -> None:
    with OmniClient("localhost:1", protocol="http") as client:
        for call in (client.generate_stream, client.stream):
            with pytest.raises(InvalidRequestError, match="needs protocol='grpc'.*HTTP endpoint cannot stream"):
                call("a fox")
    with pytest.raises(InvalidRequestError, match="HTTP endpoint cannot stream"):
        AsyncOmniClient("localhost:1", protocol="http").generate_stream("a fox")  # raises before any await


@pytest.mark.parametrize("value", [0, -1, 2**31, 1.5, True, "2"])
def test_preview_every_rejected(value: object) -> None:
    with pytest.raises(InvalidRequestError, match="preview_every must be an int >= 1"):
        check_preview_every(value)
    with OmniClient("localhost:1") as client, pytest.raises(InvalidRequestError, match="preview_every"):
        client.stream("a fox", preview_every=value)  # checked before anything is sent


def test_preview_every_input() -> None:
    assert check_preview_every(None) is None and check_preview_every(np.int64(4)) == 4
    names = [t.name() for t in build_stream_inputs(GenerationRequest("a fox", seed=1))]
    assert names == ["prompt", "seed"]
    tensor = build_stream_inputs(GenerationRequest("a fox"), preview_every=3)[-1]
    assert (tensor.name(), tensor.datatype(), tensor.shape()) == ("preview_every", "INT32", [1, 1])
    assert np.frombuffer(tensor._get_content(), np.int32).tolist() == [3]


def test_stream_validates_before_sending() -> None:
    client = OmniClient("localhost:1")
    with pytest.raises(InvalidRequestError, match="unknown generation parameter"):
        client.stream("a fox", steps=4)
    with pytest.raises(InvalidRequestError, match="output must be"):
        client.generate_stream("a fox", output="jpeg")
    client.close()
    with pytest.raises(OmniClientError, match="client is closed"):
        client.stream("a fox")


def test_unreachable_server(closed_port: int) -> None:
    calls: list[StepUpdate] = []
    with OmniClient(f"127.0.0.1:{closed_port}", timeout=10) as client:
        with pytest.raises(OmniClientError, match=f"cannot reach server at 127.0.0.1:{closed_port}"):
            client.generate_stream("a fox", preview_every=1, on_progress=calls.append)
        with pytest.raises(OmniClientError, match="cannot reach server"):
            list(client.stream("a fox"))
    assert calls == []


def test_unreachable_server_aio(closed_port: int) -> None:
    async def run() -> None:
        async with AsyncOmniClient(f"127.0.0.1:{closed_port}", timeout=10) as client:
            async for _ in client.generate_stream("a fox", preview_every=2):
                pass

    with pytest.raises(OmniClientError, match=f"cannot reach server at 127.0.0.1:{closed_port}"):
        asyncio.run(run())


def test_deadline_error() -> None:
    expired = InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")
    error = deadline_error(expired, "h:1", 2.5)
    assert error is not None and error.status() == "TIMEOUT" and str(error).endswith("h:1 timed out after 2.5 s")
    assert deadline_error(expired, "h:1", None) is None
    assert deadline_error(InferenceServerException("boom", status="StatusCode.INTERNAL"), "h:1", 2.5) is None


# ------------------------------------------------------------------------------------------ responses


def test_parse_step_preview_and_image() -> None:
    parsed = parse_stream_response(step(2, 4))
    assert (parsed.step, parsed.total_steps, parsed.preview, parsed.image, parsed.final) == (2, 4, None, None, False)
    parsed = parse_stream_response(step(2, 4, preview=rgb(4, 6)))
    assert parsed.preview.shape == (4, 6, 3) and parsed.preview.dtype == np.uint8
    parsed = parse_stream_response(image_response(4))
    assert parsed.image.shape == (8, 12, 3) and (parsed.step, parsed.final) == (4, True)
    assert final_flag(make_result(image=rgb(2, 2))) is None


@pytest.mark.parametrize(
    ("outputs", "match"),
    [
        ({"preview": np.zeros((1, 4, 6, 3), np.float32)}, "unexpected dtype float32 for output 'preview'"),
        ({"image": rgb(4, 6)[..., :2]}, "unexpected shape"),
        ({"image": np.zeros((2, 4, 6, 3), np.uint8)}, "batch of 1"),
        ({"step": np.array([[1, 2]], np.int32)}, "expected one value in output 'step'"),
    ],
)
def test_parse_malformed(outputs: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(OmniClientError, match=match):
        parse_stream_response(make_result(**outputs))


def test_assembler_full_stream() -> None:
    assembler = StreamAssembler("pil")
    responses = [step(1, 3), step(2, 3, preview=rgb(4, 6)), step(3, 3), image_response(3)]
    items = [item for response in responses for item in assembler.feed(response)]
    assert [type(i).__name__ for i in items] == ["StepUpdate"] * 3 + ["FinalImage"]  # step 3 not repeated
    assert [(i.step, i.total_steps) for i in items[:3]] == [(1, 3), (2, 3), (3, 3)]
    assert items[0].preview is None and items[2].preview is None
    assert isinstance(items[1].preview, Image.Image) and items[1].preview.size == (6, 4)
    final = items[3]
    assert isinstance(final.image, Image.Image) and final.image.size == (12, 8) and final.total_steps == 3
    assert assembler.done and assembler.feed(step(9, 9)) == []


def test_assembler_numpy_output() -> None:
    assembler = StreamAssembler("numpy")
    (update,) = assembler.feed(step(1, 2, preview=rgb(4, 6, 9)))
    assert isinstance(update.preview, np.ndarray) and update.preview.shape == (4, 6, 3)
    update, final = assembler.feed(image_response(2))  # step 2 was not reported yet
    assert update == StepUpdate(2, 2, None)
    assert isinstance(final.image, np.ndarray) and final.image.shape == (8, 12, 3) and final.image[0, 0, 0] == 200


def test_assembler_end_of_request() -> None:
    # No final flag on the responses: the one with the image is the last.
    assembler = StreamAssembler("numpy")
    assert len(assembler.feed(step(1, 1, final=None))) == 1
    assert isinstance(assembler.feed(image_response(1, final=None))[-1], FinalImage) and assembler.done
    # Image not flagged final: wait for the (empty) final response.
    assembler = StreamAssembler("numpy")
    assert assembler.feed(image_response(1, final=False)) == [StepUpdate(1, 1, None)] and not assembler.done
    (final,) = assembler.feed(make_result(final=True))
    assert isinstance(final, FinalImage) and final.total_steps == 1
    # ... or for the end of the stream (aio).
    assembler = StreamAssembler("numpy")
    assembler.feed(image_response(1, final=False))
    assert isinstance(assembler.end()[0], FinalImage) and assembler.end() == []
    # A non-decoupled model over a stream: just the image.
    assert [type(i) for i in StreamAssembler().feed(make_result(final=True, image=rgb(2, 2)))] == [FinalImage]


def test_assembler_errors() -> None:
    with pytest.raises(OmniClientError, match="ended without an 'image'"):
        StreamAssembler().feed(step(3, 3, final=True))
    assembler = StreamAssembler()
    assembler.feed(step(1, 3))
    with pytest.raises(OmniClientError, match="ended without an 'image'"):
        assembler.end()
    with pytest.raises(OmniClientError, match="'step' output but no 'total_steps'"):
        StreamAssembler().feed(make_result(step=np.array([[1]], np.int32)))
    with pytest.raises(OmniClientError, match="preview output but no 'step'"):
        StreamAssembler().feed(make_result(preview=rgb(2, 2)))
    with pytest.raises(OmniClientError, match="preview output but no 'step'"):
        StreamAssembler().feed(make_result(preview_video=frames(2, 2, 2)))


def frames(n: int, h: int, w: int, value: int = 7) -> np.ndarray:
    """A batched video output [1, n, h, w, 3], frame i filled with value + i."""
    return (value + np.arange(n, dtype=np.uint8))[None, :, None, None, None] * np.ones((1, n, h, w, 3), np.uint8)


def video_step(n: int, total: int, preview: np.ndarray) -> InferResult:
    steps = {"step": np.array([[n]], np.int32), "total_steps": np.array([[total]], np.int32)}
    return make_result(False, preview_video=preview, **steps)


def video_response(total: int = 2, final: bool | None = True) -> InferResult:
    steps = {"step": np.array([[total]], np.int32), "total_steps": np.array([[total]], np.int32)}
    return make_result(final, video=frames(5, 8, 12, 100), **steps)


def test_video_stream_previews_and_video() -> None:
    """A video model's stream: ``preview_video`` [frames, h, w, 3] previews, then ``video``."""
    parsed = parse_stream_response(video_step(1, 2, frames(3, 4, 6)))
    assert parsed.preview.shape == (3, 4, 6, 3) and parsed.preview[2, 0, 0, 0] == 9
    parsed = parse_stream_response(video_response(2))
    assert parsed.image.shape == (5, 8, 12, 3) and (parsed.step, parsed.final) == (2, True)
    with pytest.raises(OmniClientError, match="unexpected shape .* for output 'preview_video'"):
        parse_stream_response(make_result(preview_video=rgb(4, 6)[0]))  # an image under the video name
    pil = StreamAssembler("pil")
    (update,) = pil.feed(video_step(1, 2, frames(3, 4, 6)))
    assert [f.size for f in update.preview] == [(6, 4)] * 3  # a list of PIL frames
    update, final = pil.feed(video_response(2))
    assert update == StepUpdate(2, 2, None) and isinstance(final, FinalImage) and len(final.image) == 5
    final = StreamAssembler("numpy").feed(video_response(2))[-1]
    assert final.image.shape == (5, 8, 12, 3) and final.image[4, 0, 0, 0] == 104


# ---------------------------------------------------------------------------------------- progress


def test_render_progress() -> None:
    assert render_progress(0, 10, 0.0, width=10) == "[----------]  0/10 steps 0.0s"
    assert render_progress(3, 10, 4.25, width=10) == "[###-------]  3/10 steps 4.2s"
    assert render_progress(10, 10, 75, width=10) == "[##########] 10/10 steps 1:15"
    assert render_progress(12, 10, 1, width=10).startswith("[##########] 10/10")  # clamped
    assert render_progress(1, 0, 1, width=4) == "[####] 1/1 steps 1.0s"
    assert len(render_progress(1, 28, 1.0)) == len(render_progress(28, 28, 1.0))  # fixed width: no jitter
    assert (format_elapsed(59.94), format_elapsed(3725)) == ("59.9s", "1:02:05")


def test_progress_bar_redraws_in_place() -> None:
    out = io.StringIO()
    bar = ProgressBar(out, width=4)
    bar.close()
    assert out.getvalue() == ""  # nothing drawn: no newline either
    bar.update(1, 2)
    bar.update(2, 2)
    bar.close()
    bar.close()
    lines = out.getvalue()
    assert lines.startswith("\r[##--] 1/2 steps ") and lines.count("\r") == 2 and lines.endswith("\n")
    assert "\r[####] 2/2 steps " in lines and lines.count("\n") == 1


# ------------------------------------------------------------------------------------------------ cli


def test_cli_stream_flags_parse() -> None:
    base = ["generate", "--prompt", "a fox", "--out", "o.png"]
    args = build_parser().parse_args([*base, "--stream", "--preview-every", "2", "--preview-dir", "prev"])
    assert args.stream and args.preview_every == 2 and str(args.preview_dir) == "prev"
    args = build_parser().parse_args(base)
    assert not args.stream and args.preview_every is None and args.preview_dir is None


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_cli_preview_every_invalid(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate", "--prompt", "x", "--out", "o.png", "--stream", "--preview-every", value])
    assert info.value.code == 2 and "--preview-every" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stream", "--protocol", "http"], "--stream needs gRPC"),
        (["--stream", "--url", "http://localhost:8000"], "--stream needs gRPC"),
        (["--preview-dir", "prev"], "need --stream"),
        (["--preview-every", "2"], "need --stream"),
        (["--stream", "--preview-every", "2"], "--preview-every needs --preview-dir"),
    ],
)
def test_cli_stream_invalid_combinations(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "x", "--out", "o.png", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_stream_unreachable(closed_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["generate", "--prompt", "x", "--out", str(tmp_path / "o.png"), "--stream", "--timeout", "10"]
    assert main([*argv, "--url", f"127.0.0.1:{closed_port}", "--preview-dir", str(tmp_path / "p")]) == 1
    assert f"cannot reach server at 127.0.0.1:{closed_port}" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_saves_video_previews_as_animated_gifs(tmp_path: Path) -> None:
    from omni_client.cli import _save_preview

    _save_preview(frames(3, 4, 6)[0], tmp_path / "step_0002", fps=8.0)
    _save_preview(rgb(4, 6)[0], tmp_path / "step_0004", fps=8.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0002.gif", "step_0004.png"]
    with Image.open(tmp_path / "step_0002.gif") as gif:
        assert (gif.n_frames, gif.size) == (3, (6, 4))
        gif.seek(2)
        assert np.asarray(gif.convert("RGB"))[0, 0].tolist() == [9, 9, 9]
