"""Light client for the omni-triton diffusion pipelines served by NVIDIA Triton Inference Server.

Example:
    >>> from omni_client import OmniClient
    >>> with OmniClient("localhost:8001", model="flux") as client:  # doctest: +SKIP
    ...     image = client.generate("a watercolor fox", height=512, width=512, seed=0)
"""

from .aio import AsyncOmniClient
from .client import OmniClient
from .errors import GenerationCancelled, InvalidRequestError, OmniClientError, StopGeneration
from .models import ModelInfo
from .request import INPUT_DATATYPES, GenerationRequest, build_input_arrays, build_inputs, image_to_array
from .results import GenerationOutput, convert_output, decode_result, extract_output
from .stream import FinalImage, StepUpdate
from .urls import DEFAULT_PORTS, normalize_url

__version__ = "0.1.0"

__all__ = [
    "AsyncOmniClient",
    "DEFAULT_PORTS",
    "FinalImage",
    "GenerationCancelled",
    "GenerationOutput",
    "GenerationRequest",
    "INPUT_DATATYPES",
    "InvalidRequestError",
    "ModelInfo",
    "OmniClient",
    "OmniClientError",
    "StepUpdate",
    "StopGeneration",
    "build_input_arrays",
    "build_inputs",
    "convert_output",
    "decode_result",
    "extract_output",
    "image_to_array",
    "normalize_url",
    "__version__",
]
