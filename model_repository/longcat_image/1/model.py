"""Shim: the whole LongCat-Image pipeline as one Triton model."""

from omni_backend.triton import PipelineModel as TritonPythonModel  # noqa: F401
