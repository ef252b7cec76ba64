"""Shim: LongCat-Image ensemble stage 2 (transformer, step-batched)."""

from omni_backend.triton import TransformerStageModel as TritonPythonModel  # noqa: F401
