"""Shim: the whole FLUX.1 pipeline as one Triton model."""

from omni_backend.triton import PipelineModel as TritonPythonModel  # noqa: F401
