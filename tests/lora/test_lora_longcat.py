"""LoRA on LongCat-Image through the engine: each request of a mixed batch equals diffusers with its adapter."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tritonclient.utils import InferenceServerException

from omni_backend.config import LoraConfig
from omni_backend.lora.names import WEIGHTS_FILE
from omni_backend.lora.registry import LoraRegistry
from omni_backend.pipelines.base import Component
from omni_backend.pipelines.longcat_image import LongCatImageOptions, LongCatImageStages
from omni_backend.request import DiffusionRequest, LoraSelection, SamplingParams
from omni_backend.testing.compare import assert_same_image
from omni_backend.testing.tiny_lora import build_tiny_lora
from tests.e2e.conftest import PROTOCOLS, REPOSITORY, RawClient, serving
from tests.e2e.test_bad_input import status_is_invalid_arg
from tests.lora.test_lora_e2e import configure
from tests.lora.test_lora_engine import image, serve

pytestmark = pytest.mark.slow

PROMPT, SIZE, STEPS, GUIDANCE = "a red circle on a blue background", 64, 3, 4.5
ADAPTERS = ("style1", "style2")


@pytest.fixture(scope="module")
def longcat_lora_dir(tiny_longcat_image, tmp_path_factory):
    root = tmp_path_factory.mktemp("longcat-loras")
    for seed, name in enumerate(ADAPTERS, start=1):
        build_tiny_lora(tiny_longcat_image, root / name, seed=seed)
    return root


@pytest.fixture(scope="module")
def render(tiny_longcat_image, longcat_lora_dir):
    """LongCatImagePipeline, its transformer given the adapters through diffusers' PEFT integration."""
    from diffusers import LongCatImagePipeline

    pipe = LongCatImagePipeline.from_pretrained(tiny_longcat_image, dtype=torch.float32, text_processor=None)
    pipe.set_progress_bar_config(disable=True)
    for name in ADAPTERS:
        pipe.transformer.load_lora_adapter(
            str(longcat_lora_dir / name), weight_name=WEIGHTS_FILE, prefix="transformer", adapter_name=name
        )

    def run(seed: int, lora: tuple[str, float] | None) -> np.ndarray:
        if lora is None:
            pipe.transformer.disable_lora()
        else:
            pipe.transformer.enable_lora()
            pipe.transformer.set_adapters([lora[0]], [lora[1]])
        result = pipe(
            PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(seed), enable_prompt_rewrite=False,
        )  # fmt: skip
        return np.asarray(result.images[0])

    return run


def test_mixed_batch_equals_diffusers_with_each_adapter(tiny_longcat_image, longcat_lora_dir, render):
    stages = LongCatImageStages.load(
        str(tiny_longcat_image), Component.ALL, torch.float32, torch.device("cpu"), LongCatImageOptions()
    )
    loras = LoraRegistry(LoraConfig(str(longcat_lora_dir), 4, ""), stages.lora_adapter())
    mix = [None, ("style1", 1.0), ("style2", 0.7), None]
    requests = [
        DiffusionRequest(
            str(i), SamplingParams(SIZE, SIZE, STEPS, GUIDANCE, 1.0, 10 + i), prompt=PROMPT,
            lora=LoraSelection(*lora) if lora else None,
        )
        for i, lora in enumerate(mix)
    ]  # fmt: skip
    outputs, calls = serve(stages, loras, requests)
    for i, lora in enumerate(mix):
        expected = render(10 + i, lora)
        assert_same_image(image(outputs[str(i)]), expected)
        if lora is not None:
            assert np.abs(expected.astype(int) - render(10 + i, None).astype(int)).mean() > 3, f"{lora} changes nothing"
    assert max(calls) == 2 and sum(calls) == len(mix) * STEPS  # the two base requests share calls


MODELS = ("longcat_image", "longcat_image_ensemble")
STAGES = ("longcat_image_text_encoder", "longcat_image_transformer", "longcat_image_vae")


@pytest.fixture(scope="module")
def longcat_lora_server(tmp_path_factory, model_root, tiny_longcat_image, longcat_lora_dir):
    repository = tmp_path_factory.mktemp("longcat-lora-repository")
    for model in MODELS + STAGES:
        shutil.copytree(REPOSITORY / model, repository / model)
    for model in ("longcat_image", "longcat_image_transformer"):
        configure(repository, model, lora_dir=str(longcat_lora_dir))
    with serving(repository, model_root) as process:
        yield process


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("model", MODELS)
def test_served_adapter_equals_diffusers(longcat_lora_server, render, protocol, model):
    client = RawClient(longcat_lora_server, protocol)
    base = {
        "prompt": PROMPT, "height": np.int32(SIZE), "width": np.int32(SIZE), "num_inference_steps": np.int32(STEPS),
        "guidance_scale": np.float32(GUIDANCE), "seed": np.int64(21),
    }  # fmt: skip
    adapted = client.infer(model, {**base, "lora_name": "style2", "lora_scale": np.float32(0.7)})
    assert_same_image(adapted, render(21, ("style2", 0.7)))
    assert_same_image(client.infer(model, base), render(21, None))
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, {**base, "lora_name": "missing"})
    assert status_is_invalid_arg(info.value) and "lora_name" in info.value.message(), info.value.message()
    client.close()
