"""LoRA on Qwen-Image, Qwen-Image-Edit, Wan2.2 T2V and I2V through the engine: a step batch mixing an adapter
request with base requests equals each family's diffusers pipeline with ``load_lora_weights`` + ``set_adapters``.

Wan2.2's adapter holds one file per expert, loaded as diffusers loads them: ``load_lora_weights(folder)``
into the high-noise ``transformer``, ``load_lora_weights(folder, weight_name=..., load_into_transformer_2=True)``
into the low-noise ``transformer_2``; ``set_adapters([name], [scale])`` then runs both.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tritonclient.utils import InferenceServerException

from omni_backend.config import LoraConfig
from omni_backend.lora.names import TRANSFORMER_2_WEIGHTS_FILE
from omni_backend.lora.registry import LoraRegistry
from omni_backend.pipelines.base import Component
from omni_backend.registry import resolve_family
from omni_backend.request import DiffusionRequest, LoraSelection, SamplingParams
from omni_backend.testing.compare import assert_same_image, fraction_close
from omni_backend.testing.tiny_lora import build_tiny_lora
from tests.e2e.conftest import REPOSITORY, RawClient, repository_of, serving
from tests.e2e.test_bad_input import status_is_invalid_arg
from tests.lora.test_lora_e2e import configure
from tests.lora.test_lora_engine import serve
from tests.test_parity_qwen_image_edit import input_image

pytestmark = pytest.mark.slow

PROMPT, SEED, LORA = "a red circle on a blue background", 10, ("style", 0.8)
QWEN_STEPS = 2  # Qwen-Image-Edit conditions on a ~1024x1024 image: its steps are the costly ones
WAN_STEPS = 4  # with the tiny Wan2.2's boundary_ratio 0.875: 1 high-noise step, 3 low-noise steps
MIX = [None, LORA]  # the same seed: the adapter's output is compared with the base one too


def build_adapter(checkpoint: Path, root: Path, experts: tuple[str, ...] = ("transformer",)) -> Path:
    for seed, expert in enumerate(experts, start=1):
        build_tiny_lora(checkpoint, root / LORA[0], seed=seed, expert=expert)
    return root


def reference_pipeline(pipeline_cls: Any, checkpoint: Path, lora_dir: Path, **components: Any) -> Any:
    """The family's diffusers pipeline with the adapter loaded by ``load_lora_weights`` (both experts for Wan2.2)."""
    pipe = pipeline_cls.from_pretrained(checkpoint, dtype=torch.float32, **components)
    pipe.set_progress_bar_config(disable=True)
    folder = lora_dir / LORA[0]
    pipe.load_lora_weights(folder, adapter_name=LORA[0])
    if (folder / TRANSFORMER_2_WEIGHTS_FILE).is_file():
        pipe.load_lora_weights(
            folder, weight_name=TRANSFORMER_2_WEIGHTS_FILE, adapter_name=LORA[0], load_into_transformer_2=True
        )
    return pipe


def render(pipe: Any, lora: tuple[str, float] | None, **kwargs: Any) -> Any:
    if lora is None:
        pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([lora[0]], [lora[1]])
    return pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(SEED), **kwargs)


def assert_same_video(served: np.ndarray, want: np.ndarray) -> None:
    """Frame by frame (an image is one frame) at DESIGN section 4's tolerance."""
    assert served.shape == want.shape, (served.shape, want.shape)
    for frame_served, frame_wanted in zip(*((served, want) if want.ndim == 4 else ([served], [want])), strict=True):
        assert_same_image(frame_served, frame_wanted)


def check_mixed_batch(family: str, checkpoint: Path, lora_dir: Path, params: SamplingParams, expected, **request):
    """Serve MIX as one step batch; each output equals ``expected(lora)``, and the adapter changes it."""
    stages_cls = resolve_family(family)
    options = stages_cls.options_cls()
    stages = stages_cls.load(str(checkpoint), Component.ALL, torch.float32, torch.device("cpu"), options)
    loras = LoraRegistry(LoraConfig(str(lora_dir), 4, ""), stages.lora_adapter())
    requests = [
        DiffusionRequest(str(i), params, prompt=PROMPT, lora=LoraSelection(*lora) if lora else None, **request)
        for i, lora in enumerate(MIX)
    ]
    outputs, calls = serve(stages, loras, requests)
    wanted = {lora: expected(lora) for lora in MIX}
    for i, lora in enumerate(MIX):
        output = outputs[str(i)]
        assert output.error is None, output.error
        assert_same_video(output.outputs[stages.output_name], wanted[lora])
    # the comparison tells the two apart: an adapter left out (or applied to both) would fail it
    assert fraction_close(wanted[LORA], wanted[None]) < 0.9, "the adapter changes nothing"
    assert calls == [1] * len(MIX) * params.num_inference_steps  # one adapter setting per transformer call


def test_qwen_image_mixed_batch_equals_diffusers(tiny_qwen_image, tmp_path):
    from diffusers import QwenImagePipeline

    lora_dir = build_adapter(tiny_qwen_image, tmp_path)
    pipe = reference_pipeline(QwenImagePipeline, tiny_qwen_image, lora_dir)
    kwargs = {"height": 64, "width": 64, "num_inference_steps": QWEN_STEPS, "negative_prompt": "blurry"}

    def expected(lora: tuple[str, float] | None) -> np.ndarray:
        return np.asarray(render(pipe, lora, true_cfg_scale=3.0, **kwargs).images[0])

    params = SamplingParams(64, 64, QWEN_STEPS, 1.0, 3.0, SEED)
    check_mixed_batch("qwen_image", tiny_qwen_image, lora_dir, params, expected, negative_prompt="blurry")


def test_qwen_image_edit_mixed_batch_equals_diffusers(tiny_qwen_image_edit, tmp_path):
    from diffusers import QwenImageEditPipeline

    from omni_backend.pipelines.qwen_image_edit import load_processor

    lora_dir = build_adapter(tiny_qwen_image_edit, tmp_path)
    processor = load_processor(str(tiny_qwen_image_edit))
    pipe = reference_pipeline(QwenImageEditPipeline, tiny_qwen_image_edit, lora_dir, processor=processor)
    image = input_image(40, 56, 0)

    def expected(lora: tuple[str, float] | None) -> np.ndarray:
        result = render(
            pipe, lora, image=Image.fromarray(image), height=32, width=48, num_inference_steps=QWEN_STEPS,
            true_cfg_scale=1.0,
        )  # fmt: skip
        return np.asarray(result.images[0])

    params = SamplingParams(32, 48, QWEN_STEPS, 1.0, 1.0, SEED)
    check_mixed_batch("qwen_image_edit", tiny_qwen_image_edit, lora_dir, params, expected, input_image=image)


WAN_VIDEO = {"height": 32, "width": 48, "num_frames": 5, "num_inference_steps": WAN_STEPS, "guidance_scale": 4.0}


def wan_render(pipe: Any, **kwargs: Any):
    def expected(lora: tuple[str, float] | None) -> np.ndarray:
        frames = render(pipe, lora, output_type="np", **WAN_VIDEO, guidance_scale_2=2.0, **kwargs).frames[0]
        return (frames * 255).round().astype(np.uint8)

    return expected


WAN_PARAMS = SamplingParams(32, 48, WAN_STEPS, 4.0, 1.0, SEED, num_frames=5, guidance_scale_2=2.0)


@pytest.fixture(scope="module")
def wan_lora_dir(tiny_wan22_t2v, tmp_path_factory) -> Path:
    return build_adapter(tiny_wan22_t2v, tmp_path_factory.mktemp("wan-loras"), ("transformer", "transformer_2"))


@pytest.fixture(scope="module")
def wan_expected(tiny_wan22_t2v, wan_lora_dir):
    """``expected(lora)``: WanPipeline's video for WAN_PARAMS (each computed once)."""
    from diffusers import WanPipeline

    return functools.cache(wan_render(reference_pipeline(WanPipeline, tiny_wan22_t2v, wan_lora_dir)))


def test_wan22_t2v_mixed_batch_equals_diffusers_with_both_experts_adapted(tiny_wan22_t2v, wan_lora_dir, wan_expected):
    check_mixed_batch("wan22_t2v", tiny_wan22_t2v, wan_lora_dir, WAN_PARAMS, wan_expected)


WAN_MODELS = ("wan22_t2v_ensemble", "wan22_t2v_text_encoder", "wan22_t2v_transformer", "wan22_t2v_vae")


def test_served_wan22_t2v_ensemble_adapter_equals_diffusers(model_root, wan_lora_dir, wan_expected, tmp_path):
    """Over gRPC through the ensemble: lora_name / lora_scale reach the transformer stage, bad names are INVALID_ARG."""
    repository = repository_of(tmp_path / "repository", tuple(m for m in WAN_MODELS if m != "wan22_t2v_transformer"))
    shutil.copytree(REPOSITORY / "wan22_t2v_transformer", repository / "wan22_t2v_transformer")
    configure(repository, "wan22_t2v_transformer", lora_dir=str(wan_lora_dir))
    base = {
        "prompt": PROMPT, "height": np.int32(32), "width": np.int32(48), "num_frames": np.int32(5),
        "num_inference_steps": np.int32(WAN_STEPS), "guidance_scale": np.float32(4.0),
        "guidance_scale_2": np.float32(2.0), "seed": np.int64(SEED),
    }  # fmt: skip
    with serving(repository, model_root) as process:
        client, model = RawClient(process, "grpc"), WAN_MODELS[0]
        adapted = client.infer(model, {**base, "lora_name": LORA[0], "lora_scale": np.float32(LORA[1])}, "video")
        assert_same_video(adapted, wan_expected(LORA))
        assert_same_video(client.infer(model, base, "video"), wan_expected(None))
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, {**base, "lora_name": "missing"}, "video")
        assert status_is_invalid_arg(info.value) and "lora_name" in info.value.message(), info.value.message()
        client.close()


def test_wan22_i2v_mixed_batch_equals_diffusers_with_the_high_noise_expert_adapted(tiny_wan22_i2v, tmp_path):
    """An adapter with the high-noise expert's file alone: the low-noise expert runs its base weights."""
    from diffusers import WanImageToVideoPipeline

    lora_dir = build_adapter(tiny_wan22_i2v, tmp_path)
    pipe = reference_pipeline(WanImageToVideoPipeline, tiny_wan22_i2v, lora_dir)
    image = input_image(48, 64, 0)
    expected = wan_render(pipe, image=Image.fromarray(image))
    check_mixed_batch("wan22_i2v", tiny_wan22_i2v, lora_dir, WAN_PARAMS, expected, input_image=image)
