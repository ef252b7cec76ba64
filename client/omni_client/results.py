"""Decoding of inference results into numpy arrays and PIL images."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from PIL import Image

from .errors import InvalidRequestError, OmniClientError

OutputFormat = Literal["pil", "numpy"]
#: What ``generate`` returns: a PIL image, a list of PIL frames (video) or an array.
GenerationOutput = Image.Image | list[Image.Image] | np.ndarray

#: Output tensor names and the rank of one (unbatched) item.
OUTPUT_RANKS: dict[str, int] = {"video": 4, "image": 3}


def check_output_format(output: str) -> OutputFormat:
    """Validates the ``output`` argument of ``generate``.

    Args:
        output: ``"pil"`` or ``"numpy"``.

    Returns:
        The validated value.

    Raises:
        InvalidRequestError: For other values.
    """
    if output not in ("pil", "numpy"):
        raise InvalidRequestError(f"output must be 'pil' or 'numpy', got {output!r}")
    return output  # type: ignore[return-value]


def extract_output(result: Any) -> np.ndarray:
    """Extracts the generated image or video from a tritonclient ``InferResult``.

    Args:
        result: ``InferResult`` from tritonclient (gRPC or HTTP, sync or aio).

    Returns:
        ``uint8`` array ``[H, W, 3]`` for an ``image`` output or ``[F, H, W, 3]`` for ``video``,
        with the batch dimension removed.

    Raises:
        OmniClientError: If the response has no ``image``/``video`` output or an unexpected shape.
    """
    for name, rank in OUTPUT_RANKS.items():
        arr = result.as_numpy(name)
        if arr is not None:
            return unbatch_rgb(arr, name, rank)
    raise OmniClientError("response has neither an 'image' nor a 'video' output")


def unbatch_rgb(arr: np.ndarray, name: str, rank: int = 3) -> np.ndarray:
    """Checks an RGB output tensor and removes its batch dimension of 1, if present.

    Args:
        arr: The output array, ``[1, ..., 3]`` or ``[..., 3]``.
        name: Output name, for error messages.
        rank: Rank of one item (3 for an image ``[H, W, 3]``, 4 for a video).

    Returns:
        The ``uint8`` array of rank ``rank``.

    Raises:
        OmniClientError: On a batch other than 1, a wrong shape or a wrong dtype.
    """
    if arr.ndim == rank + 1:
        if arr.shape[0] != 1:
            raise OmniClientError(f"expected a batch of 1 in output {name!r}, got {list(arr.shape)}")
        arr = arr[0]
    if arr.ndim != rank or arr.shape[-1] != 3:
        raise OmniClientError(f"unexpected shape {list(arr.shape)} for output {name!r}")
    if arr.dtype != np.uint8:
        raise OmniClientError(f"unexpected dtype {arr.dtype} for output {name!r}")
    return arr


def convert_output(arr: np.ndarray, output: OutputFormat = "pil") -> GenerationOutput:
    """Converts an array from :func:`extract_output` to the requested format.

    Args:
        arr: ``[H, W, 3]`` image or ``[F, H, W, 3]`` video.
        output: ``"pil"`` (image -> ``PIL.Image``, video -> list of ``PIL.Image``) or ``"numpy"``.

    Returns:
        The converted output.
    """
    if output == "numpy":
        return arr
    if arr.ndim == 4:
        return [Image.fromarray(np.ascontiguousarray(frame), "RGB") for frame in arr]
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def decode_result(result: Any, output: OutputFormat = "pil") -> GenerationOutput:
    """Shortcut for :func:`convert_output` of :func:`extract_output`.

    Args:
        result: tritonclient ``InferResult``.
        output: ``"pil"`` or ``"numpy"``.

    Returns:
        The generated image(s).
    """
    return convert_output(extract_output(result), output)
