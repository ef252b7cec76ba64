"""Shim: Wan2.2 T2V ensemble stage 1 (UMT5 text encoder)."""

from omni_backend.triton import TextEncoderStageModel as TritonPythonModel  # noqa: F401
