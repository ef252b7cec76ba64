"""Shim: LongCat-Image ensemble stage 3 (VAE decoder)."""

from omni_backend.triton import VaeStageModel as TritonPythonModel  # noqa: F401
