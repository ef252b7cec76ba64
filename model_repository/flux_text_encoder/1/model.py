"""Shim: FLUX.1 ensemble stage 1 (text encoders)."""

from omni_backend.triton import TextEncoderStageModel as TritonPythonModel  # noqa: F401
