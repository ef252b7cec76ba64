"""Shim: Qwen-Image-Edit ensemble stage 1 (Qwen2.5-VL text encoder with the image, VAE encoder)."""

from omni_backend.triton import TextEncoderStageModel as TritonPythonModel  # noqa: F401
