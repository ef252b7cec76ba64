"""Generation requests and their conversion to Triton input tensors.

The served models take batched tensors (``max_batch_size > 0``): each scalar parameter is sent as
shape ``[1, 1]``, ``input_image`` as ``[1, H, W, 3]``. :func:`build_input_arrays` gives the numpy
arrays (protocol independent, handy for tests) and :func:`build_inputs` the tritonclient
``InferInput`` objects.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from .errors import InvalidRequestError
from .urls import check_protocol

#: Triton datatype of every public input tensor of the text-to-image / video models.
INPUT_DATATYPES: dict[str, str] = {
    "prompt": "BYTES",
    "negative_prompt": "BYTES",
    "height": "INT32",
    "width": "INT32",
    "num_inference_steps": "INT32",
    "guidance_scale": "FP32",
    "true_cfg_scale": "FP32",
    "guidance_scale_2": "FP32",
    "seed": "INT64",
    "input_image": "UINT8",
    "num_frames": "INT32",
    "cache_threshold": "FP32",
    "lora_name": "BYTES",
    "lora_scale": "FP32",
}

_NUMPY_DTYPES: dict[str, Any] = {
    "BYTES": np.object_,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "UINT8": np.uint8,
}
_POSITIVE_INTS = ("height", "width", "num_inference_steps", "num_frames")
_FLOATS = ("guidance_scale", "true_cfg_scale", "guidance_scale_2", "cache_threshold", "lora_scale")

ImageLike = Image.Image | np.ndarray


@dataclass
class GenerationRequest:
    """Parameters of one generation; fields left as None are not sent (server defaults apply).

    Attributes:
        prompt: Text prompt (sent utf-8 encoded).
        negative_prompt: Negative prompt.
        height: Output height in pixels.
        width: Output width in pixels.
        num_inference_steps: Number of denoising steps.
        guidance_scale: (Distilled) guidance scale.
        true_cfg_scale: True classifier-free guidance scale.
        guidance_scale_2: Guidance scale of a second (low-noise) expert, e.g. Wan2.2 A14B.
        seed: Random seed (int64).
        input_image: Conditioning image for edit / image-to-video models: a PIL image (converted
            to RGB) or a ``uint8`` array of shape ``[H, W, 3]``.
        num_frames: Number of frames, for video models.
        cache_threshold: This request's step-cache threshold, overriding the model's configured one
            (models with a ``cache_backend``; 0 skips no step).
        lora_name: LoRA adapter to run with (a folder under the model's ``lora_dir``).
        lora_scale: The adapter's weight (default 1.0 on the server).
    """

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    guidance_scale_2: float | None = None
    seed: int | None = None
    input_image: ImageLike | None = None
    num_frames: int | None = None
    cache_threshold: float | None = None
    lora_name: str | None = None
    lora_scale: float | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Returns the wire arrays of this request; see :func:`build_input_arrays`."""
        return build_input_arrays(self)


def _check_string(name: str, value: Any) -> np.ndarray:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a str, got {type(value).__name__}")
    return np.array([[value.encode("utf-8")]], dtype=np.object_)


def _check_int(name: str, value: Any, dtype: Any, positive: bool) -> np.ndarray:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidRequestError(f"{name} must be an int, got {type(value).__name__}")
    info = np.iinfo(dtype)
    value = int(value)
    if positive and value <= 0:
        raise InvalidRequestError(f"{name} must be a positive integer, got {value}")
    if not info.min <= value <= info.max:
        raise InvalidRequestError(f"{name}={value} does not fit in {np.dtype(dtype).name}")
    return np.array([[value]], dtype=dtype)


def _check_float(name: str, value: Any) -> np.ndarray:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise InvalidRequestError(f"{name} must be finite, got {value}")
    return np.array([[float(value)]], dtype=np.float32)


def image_to_array(image: ImageLike) -> np.ndarray:
    """Validates an input image and returns it as a C-contiguous ``uint8`` array ``[H, W, 3]``.

    Args:
        image: PIL image (any mode; converted to RGB) or ``uint8`` array of shape ``[H, W, 3]``.

    Returns:
        The RGB image array.

    Raises:
        InvalidRequestError: If the image is not a PIL image or a ``uint8`` ``[H, W, 3]`` array.
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise InvalidRequestError(f"input_image must have shape [H, W, 3] (RGB), got {list(arr.shape)}")
        if arr.dtype != np.uint8:
            raise InvalidRequestError(
                f"input_image must have dtype uint8, got {arr.dtype} (convert with .astype(np.uint8))"
            )
    else:
        raise InvalidRequestError(f"input_image must be a PIL image or a numpy array, got {type(image).__name__}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidRequestError(f"input_image is empty: shape {list(arr.shape)}")
    return np.ascontiguousarray(arr)


def build_input_arrays(request: GenerationRequest) -> dict[str, np.ndarray]:
    """Validates a request and returns the arrays to send, keyed by input tensor name.

    Only fields that are set (not None) are included. Each array already carries the leading
    batch dimension of 1: scalars have shape ``[1, 1]``, ``input_image`` ``[1, H, W, 3]``.
    Strings are utf-8 encoded ``bytes`` in an object array (Triton ``BYTES``).

    Args:
        request: The request.

    Returns:
        Mapping of input name to array, in :data:`INPUT_DATATYPES` order.

    Raises:
        InvalidRequestError: If a field has an obviously wrong type or value.
    """
    if not isinstance(request, GenerationRequest):
        raise InvalidRequestError(f"expected a GenerationRequest, got {type(request).__name__}")
    arrays: dict[str, np.ndarray] = {}
    for field in fields(GenerationRequest):
        name = field.name
        value = getattr(request, name)
        if value is None:
            if name == "prompt":
                raise InvalidRequestError("prompt is required")
            continue
        datatype = INPUT_DATATYPES[name]
        if datatype == "BYTES":
            arrays[name] = _check_string(name, value)
        elif name in _FLOATS:
            arrays[name] = _check_float(name, value)
        elif name == "input_image":
            arrays[name] = image_to_array(value)[np.newaxis]
        else:
            arrays[name] = _check_int(name, value, _NUMPY_DTYPES[datatype], name in _POSITIVE_INTS)
    return arrays


def build_inputs(request: GenerationRequest | dict[str, np.ndarray], protocol: str = "grpc") -> list[Any]:
    """Builds tritonclient ``InferInput`` objects for a request.

    Args:
        request: A :class:`GenerationRequest`, or arrays from :func:`build_input_arrays`.
        protocol: ``"grpc"`` (``tritonclient.grpc.InferInput``) or ``"http"``
            (``tritonclient.http.InferInput``, binary data). The aio clients use the same classes.

    Returns:
        List of ``InferInput`` with data set.

    Raises:
        InvalidRequestError: If the request is invalid.
    """
    proto = check_protocol(protocol)
    if proto == "grpc":
        import tritonclient.grpc as triton
    else:
        import tritonclient.http as triton
    arrays = request if isinstance(request, dict) else build_input_arrays(request)
    inputs = []
    for name, arr in arrays.items():
        tensor = triton.InferInput(name, list(arr.shape), INPUT_DATATYPES[name])
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    return inputs


def make_request(prompt: str | GenerationRequest, **params: Any) -> GenerationRequest:
    """Returns a :class:`GenerationRequest` from a prompt and keyword parameters.

    Args:
        prompt: The prompt, or an existing request (then ``params`` must be empty).
        **params: Other :class:`GenerationRequest` fields.

    Returns:
        The request.

    Raises:
        InvalidRequestError: On unknown parameter names, or params given with a request.
    """
    if isinstance(prompt, GenerationRequest):
        if params:
            raise InvalidRequestError("pass either a GenerationRequest or keyword parameters, not both")
        return prompt
    unknown = sorted(set(params) - set(INPUT_DATATYPES))
    if unknown:
        raise InvalidRequestError(f"unknown generation parameter(s): {', '.join(unknown)}")
    return GenerationRequest(prompt=prompt, **params)
