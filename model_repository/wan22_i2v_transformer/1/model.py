"""Shim: Wan2.2 I2V ensemble stage 2 (the two transformer experts, step-batched)."""

from omni_backend.triton import TransformerStageModel as TritonPythonModel  # noqa: F401
