"""Shim: Wan2.2 text-to-video with per-step streaming (decoupled)."""

from omni_backend.triton import StreamingPipelineModel as TritonPythonModel  # noqa: F401
