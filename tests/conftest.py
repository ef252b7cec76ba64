"""Shared fixtures: tiny checkpoints (one per family) and the diffusers reference pipelines they are compared with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_backend.testing import tiny
from omni_backend.testing.tiny import build_tiny_flux

DEMO_MODEL = "flux-shapes"  # the checkpoint name model_repository/'s FLUX models use


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model root holding ``tiny-flux``; other families are added on use.

    model_repository/ serves FLUX as ``flux-shapes`` (the trained demo in demo/): here that name is
    the tiny checkpoint, whose shapes (guidance embedding, 8x VAE, 512 T5 tokens) every FLUX test is
    written for. tests/e2e/test_demo_serving.py serves the trained one.
    """
    root = tmp_path_factory.mktemp("models")
    build_tiny_flux(root / "tiny-flux", seed=0)
    (root / DEMO_MODEL).symlink_to("tiny-flux", target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def tiny_flux(model_root: Path) -> Path:
    return model_root / "tiny-flux"


@pytest.fixture(scope="session")
def tiny_qwen_image(model_root: Path) -> Path:
    return tiny.build("qwen_image", model_root / "tiny-qwen-image", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen_image_edit(model_root: Path) -> Path:
    return tiny.build("qwen_image_edit", model_root / "tiny-qwen-image-edit", seed=0)


@pytest.fixture(scope="session")
def tiny_wan22_t2v(model_root: Path) -> Path:
    return tiny.build("wan22_t2v", model_root / "tiny-wan22-t2v", seed=0)


@pytest.fixture(scope="session")
def tiny_wan22_i2v(model_root: Path) -> Path:
    return tiny.build("wan22_i2v", model_root / "tiny-wan22-i2v", seed=0)


@pytest.fixture(scope="session")
def tiny_longcat_image(model_root: Path) -> Path:
    return tiny.build("longcat_image", model_root / "tiny-longcat-image", seed=0)


def _reference(pipeline_cls, checkpoint: Path, **components) -> Callable[..., np.ndarray]:
    """``render(prompt, seed, **kwargs)`` -> uint8 [H, W, 3] from the diffusers pipeline itself."""
    pipe = pipeline_cls.from_pretrained(checkpoint, dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)

    def render(prompt: str, seed: int, **kwargs) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        image = pipe(prompt=prompt, generator=generator, output_type="pil", **kwargs).images[0]
        return np.asarray(image)

    return render


@pytest.fixture(scope="session")
def flux_reference(tiny_flux: Path):
    from diffusers import FluxPipeline

    return _reference(FluxPipeline, tiny_flux)


@pytest.fixture(scope="session")
def qwen_image_reference(tiny_qwen_image: Path):
    from diffusers import QwenImagePipeline

    return _reference(QwenImagePipeline, tiny_qwen_image)


@pytest.fixture(scope="session")
def qwen_image_edit_reference(tiny_qwen_image_edit: Path):
    """QwenImageEditPipeline; ``render(prompt, seed, image=PIL.Image, ...)``. Its ``processor`` is passed in:
    transformers cannot load a Qwen2VLProcessor without torchvision (see pipelines/qwen_image_edit.py)."""
    from diffusers import QwenImageEditPipeline

    from omni_backend.pipelines.qwen_image_edit import load_processor

    return _reference(QwenImageEditPipeline, tiny_qwen_image_edit, processor=load_processor(str(tiny_qwen_image_edit)))


@pytest.fixture(scope="session")
def longcat_image_reference(tiny_longcat_image: Path):
    """LongCatImagePipeline with its prompt rewriter off (``enable_prompt_rewrite=False``), as the family serves it;
    its ``text_processor`` (the rewriter's only user, which needs torchvision) is not loaded."""
    from diffusers import LongCatImagePipeline

    render = _reference(LongCatImagePipeline, tiny_longcat_image, text_processor=None)
    return lambda prompt, seed, **kwargs: render(prompt, seed, enable_prompt_rewrite=False, **kwargs)


def _video_reference(pipeline_cls, checkpoint: Path) -> Callable[..., np.ndarray]:
    """``render(prompt, seed, **kwargs)`` -> uint8 [frames, H, W, 3] from the diffusers pipeline itself."""
    pipe = pipeline_cls.from_pretrained(checkpoint, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def render(prompt: str, seed: int, **kwargs) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        frames = pipe(prompt=prompt, generator=generator, output_type="np", **kwargs).frames[0]
        return (frames * 255).round().astype(np.uint8)  # what diffusers' export_to_video writes

    return render


@pytest.fixture(scope="session")
def wan22_t2v_reference(tiny_wan22_t2v: Path):
    """diffusers' WanPipeline: ``render(prompt, seed, **kwargs)`` -> uint8 [frames, H, W, 3]."""
    from diffusers import WanPipeline

    return _video_reference(WanPipeline, tiny_wan22_t2v)


@pytest.fixture(scope="session")
def wan22_i2v_reference(tiny_wan22_i2v: Path):
    """diffusers' WanImageToVideoPipeline: ``render(prompt, seed, image=PIL.Image, **kwargs)`` -> [frames, H, W, 3]."""
    from diffusers import WanImageToVideoPipeline

    return _video_reference(WanImageToVideoPipeline, tiny_wan22_i2v)
