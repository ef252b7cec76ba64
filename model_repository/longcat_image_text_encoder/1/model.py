"""Shim: LongCat-Image ensemble stage 1 (Qwen2.5-VL text encoder)."""

from omni_backend.triton import TextEncoderStageModel as TritonPythonModel  # noqa: F401
