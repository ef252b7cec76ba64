"""Triton Python-backend model classes. The ONLY package that imports triton_python_backend_utils.

A repository's ``model.py`` is a shim: ``from omni_backend.triton import PipelineModel as TritonPythonModel``.
"""

from omni_backend.triton.engine_models import PipelineModel, StreamingPipelineModel, TransformerStageModel
from omni_backend.triton.stage_models import TextEncoderStageModel, VaeStageModel

__all__ = ["PipelineModel", "StreamingPipelineModel", "TextEncoderStageModel", "TransformerStageModel", "VaeStageModel"]
