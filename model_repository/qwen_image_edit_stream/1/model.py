"""Shim: Qwen-Image-Edit with per-step streaming (decoupled)."""

from omni_backend.triton import StreamingPipelineModel as TritonPythonModel  # noqa: F401
