"""Shim: the whole Wan2.2 image-to-video pipeline as one Triton model."""

from omni_backend.triton import PipelineModel as TritonPythonModel  # noqa: F401
