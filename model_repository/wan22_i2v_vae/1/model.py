"""Shim: Wan2.2 I2V ensemble stage 3 (VAE decoder, latents -> video)."""

from omni_backend.triton import VaeStageModel as TritonPythonModel  # noqa: F401
