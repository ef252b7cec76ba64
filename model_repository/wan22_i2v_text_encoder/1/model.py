"""Shim: Wan2.2 I2V ensemble stage 1 (UMT5 text encoder + the VAE encoding of the input image)."""

from omni_backend.triton import TextEncoderStageModel as TritonPythonModel  # noqa: F401
