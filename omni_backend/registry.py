"""Family name -> pipeline stages class, imported lazily (a family's imports cost seconds)."""

from __future__ import annotations

import importlib

from omni_backend.pipelines.base import PipelineStages

# family -> "module:Class"; an unknown family raises instead of guessing
_FAMILIES: dict[str, str] = {
    "flux": "omni_backend.pipelines.flux:FluxStages",
    "qwen_image": "omni_backend.pipelines.qwen_image:QwenImageStages",
    "qwen_image_edit": "omni_backend.pipelines.qwen_image_edit:QwenImageEditStages",
    "wan22_t2v": "omni_backend.pipelines.wan:WanT2VStages",
    "wan22_i2v": "omni_backend.pipelines.wan_i2v:WanI2VStages",
    "longcat_image": "omni_backend.pipelines.longcat_image:LongCatImageStages",
}


def known_families() -> list[str]:
    return sorted(_FAMILIES)


def resolve_family(family: str) -> type[PipelineStages]:
    """The stages class of ``family``; ValueError naming the known ones if it is unknown."""
    try:
        target = _FAMILIES[family]
    except KeyError:
        raise ValueError(f"family: unknown pipeline family {family!r} (known: {', '.join(known_families())})") from None
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)
