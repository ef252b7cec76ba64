"""Parallel sizes are parsed with the config and checked against the model at load, naming the parameter."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from omni_backend.config import ConfigError, ParallelConfig, parse_model_config
from omni_backend.distributed.pipeline import split_blocks
from omni_backend.distributed.spec import resolve_spec
from omni_backend.distributed.validate import validate_parallel
from omni_backend.pipelines.base import Component

# the tiny checkpoint's transformer: 2 heads, 1 + 1 blocks
TINY = {"num_attention_heads": 2, "num_layers": 1, "num_single_layers": 1}
CPU = torch.device("cpu")


def test_parallel_sizes_parse_and_multiply():
    config = parse_model_config(
        {"family": "flux", "model": "/m", "cfg_parallel_size": "2", "ulysses_degree": "2", "ring_degree": "3"}
    )
    assert config.parallel == ParallelConfig(cfg_parallel_size=2, ulysses_degree=2, ring_degree=3)
    assert config.parallel.world_size == 12
    assert parse_model_config({"family": "flux", "model": "/m"}).parallel.world_size == 1


@pytest.mark.parametrize("key", ["cfg_parallel_size", "ulysses_degree", "pipeline_parallel_size"])
def test_zero_size_fails_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"^{key}: must be at least 1"):
        parse_model_config({"family": "flux", "model": "/m", key: "0"})


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        (ParallelConfig(ulysses_degree=4), "ulysses_degree: 4 does not divide the 2 attention heads"),
        (ParallelConfig(tensor_parallel_size=3), "tensor_parallel_size: 3 does not divide the 2 attention heads"),
        (ParallelConfig(pipeline_parallel_size=3), "pipeline_parallel_size: 3 stages for 2 transformer blocks"),
        (ParallelConfig(tensor_parallel_size=2, ring_degree=2), "tensor_parallel_size: cannot be combined"),
        (ParallelConfig(pipeline_parallel_size=2, ulysses_degree=2), "pipeline_parallel_size: combines only"),
    ],
)
def test_bad_layout_fails_naming_the_parameter(parallel, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate_parallel(parallel, resolve_spec("flux"), TINY, CPU)


def test_world_larger_than_the_gpus_fails():
    available = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"^world size {available + 1} .* this machine has {available}"):
        validate_parallel(ParallelConfig(ring_degree=available + 1), resolve_spec("flux"), TINY, torch.device("cuda:0"))


def test_good_layouts_pass():
    for parallel in (ParallelConfig(cfg_parallel_size=2, ulysses_degree=2), ParallelConfig(pipeline_parallel_size=2)):
        validate_parallel(parallel, resolve_spec("flux"), TINY, CPU)


def test_blocks_split_contiguous_and_balanced():
    assert split_blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert split_blocks(2, 2) == [range(0, 1), range(1, 2)]
    assert [len(r) for r in split_blocks(57, 4)] == [15, 14, 14, 14]


def _inputs(text: int, image: int) -> dict:
    return {
        "encoder_hidden_states": torch.zeros(1, text, 32), "txt_ids": torch.zeros(text, 3),
        "hidden_states": torch.ones(1, image, 64), "img_ids": torch.ones(image, 3),
    }  # fmt: skip


def test_uneven_sequences_are_padded_and_this_ranks_padding_masked():
    padded, length = resolve_spec("flux").pad_sequences(_inputs(8, 9), ulysses=2, ring=1, ulysses_rank=1)
    assert length == 9 and padded["hidden_states"].shape == (1, 10, 64) and padded["img_ids"].shape == (10, 3)
    mask = padded["joint_attention_kwargs"]["attention_mask"]  # rank 1: text tokens 4..7, image tokens 5..9
    assert mask.tolist() == [[True] * 4 + [True] * 4 + [False]]


def test_even_sequences_pass_unchanged_and_uneven_ring_fails_naming_it():
    inputs = _inputs(8, 16)
    assert resolve_spec("flux").pad_sequences(inputs, ulysses=2, ring=2, ulysses_rank=0) == (inputs, 16)
    with pytest.raises(ValueError, match="^ring_degree 2: 8 text and 9 image tokens"):
        resolve_spec("flux").pad_sequences(_inputs(8, 9), ulysses=1, ring=2, ulysses_rank=0)


# the tiny Wan2.2 checkpoints' experts: 2 heads, 2 blocks each
TINY_WAN = {"num_attention_heads": 2, "num_layers": 2}


@pytest.mark.parametrize("family", ["wan22_t2v", "wan22_i2v"])
@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        (ParallelConfig(ulysses_degree=4), "ulysses_degree: 4 does not divide the 2 attention heads"),
        (ParallelConfig(tensor_parallel_size=4), "tensor_parallel_size: 4 does not divide the 2 attention heads"),
        (ParallelConfig(pipeline_parallel_size=3), "pipeline_parallel_size: 3 stages for 2 transformer blocks"),
    ],
)
def test_bad_wan_layout_fails_naming_the_parameter(family, parallel, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate_parallel(parallel, resolve_spec(family), TINY_WAN, CPU)


def test_wan_uneven_video_tokens_with_ring_fail_naming_it(tiny_wan22_t2v):
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel.from_pretrained(tiny_wan22_t2v, subfolder="transformer")
    video = torch.zeros(1, 16, 1, 6, 6)  # 1 latent frame of 3 x 3 patches
    inputs = {"hidden_states": video, "timestep": torch.tensor([999]), "encoder_hidden_states": torch.zeros(1, 8, 32)}
    with pytest.raises(ValueError, match="^ring_degree 2: 9 video tokens must be a multiple of"):
        resolve_spec("wan22_t2v").sequence_parallel_forward(transformer, inputs, ulysses=1, ring=2, ulysses_rank=0)


# family -> its tiny checkpoint's fixture; heads and blocks are read from the checkpoint's transformer config
IMAGE_FAMILIES = {
    "longcat_image": "tiny_longcat_image",
    "qwen_image": "tiny_qwen_image",
    "qwen_image_edit": "tiny_qwen_image_edit",
}


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_bad_degree_fails_naming_the_parameter_for_each_family(family, request):
    checkpoint = request.getfixturevalue(IMAGE_FAMILIES[family])
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    spec = resolve_spec(family)
    heads, blocks = spec.num_heads(config), spec.num_blocks(config)
    assert heads == 2, "the cases below are written for the tiny checkpoints' 2 heads"
    bad = {
        "ulysses_degree": ParallelConfig(ulysses_degree=4),
        "tensor_parallel_size": ParallelConfig(tensor_parallel_size=3),
        "pipeline_parallel_size": ParallelConfig(pipeline_parallel_size=blocks + 1),
    }
    for name, parallel in bad.items():
        with pytest.raises(ConfigError, match=f"^{name}: "):
            validate_parallel(parallel, spec, config, CPU)
    validate_parallel(ParallelConfig(cfg_parallel_size=2, ulysses_degree=2), spec, config, CPU)


def test_longcat_pads_like_flux_and_its_forward_routes_the_mask_to_attention(tiny_longcat_image):
    from omni_backend.pipelines.longcat_image import LongCatImageStages

    spec = resolve_spec("longcat_image")
    padded, length = spec.pad_sequences(_inputs(8, 9), ulysses=2, ring=1, ulysses_rank=1)
    assert length == 9 and padded["hidden_states"].shape == (1, 10, 64)
    with pytest.raises(ValueError, match="^ring_degree 2: 8 text and 9 image tokens"):
        spec.pad_sequences(_inputs(8, 9), ulysses=2, ring=2, ulysses_rank=1)
    # the forward takes FLUX's joint_attention_kwargs once prepared: a mask hiding every image key changes
    # the output, one hiding none does not
    stages = LongCatImageStages.load(
        str(tiny_longcat_image), Component.TRANSFORMER, torch.float32, CPU, LongCatImageStages.options_cls()
    )
    [transformer] = spec.transformers(stages)
    # LongCat's preparation reads only the layout: no process group is needed to check the routing
    spec.prepare_model_parallel(transformer, SimpleNamespace(parallel=ParallelConfig(ulysses_degree=2)))
    inputs = {
        "hidden_states": torch.randn(1, 4, 64), "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, 6, transformer.config.joint_attention_dim),
        "txt_ids": torch.zeros(6, 3), "img_ids": torch.zeros(4, 3),
    }  # fmt: skip
    plain = transformer(**inputs, return_dict=False)[0]
    keep_all = torch.ones(1, 10, dtype=torch.bool)
    same = transformer(**inputs, joint_attention_kwargs={"attention_mask": keep_all}, return_dict=False)[0]
    torch.testing.assert_close(same, plain)
    keep_text = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).bool()
    masked = transformer(**inputs, joint_attention_kwargs={"attention_mask": keep_text}, return_dict=False)[0]
    assert not torch.allclose(masked, plain)


def _qwen_inputs(text: int, image: int, mask: list[int] | None = None) -> dict:
    lengths = torch.tensor(mask) if mask is not None else None
    return {
        "encoder_hidden_states": torch.ones(len(mask or [0]), text, 8), "hidden_states": torch.ones(1, image, 64),
        "encoder_hidden_states_mask": None if lengths is None else (torch.arange(text) < lengths[:, None]).long(),
    }  # fmt: skip


def test_qwen_text_and_image_are_padded_and_masked_and_bad_ring_lengths_fail_naming_the_degree():
    spec = resolve_spec("qwen_image")
    padded, length = spec.pad_sequences(_qwen_inputs(7, 8), ulysses=2, ring=1, ulysses_rank=0)
    assert length == 8 and padded["encoder_hidden_states"].shape == (1, 8, 8) and "attention_kwargs" not in padded
    assert padded["encoder_hidden_states_mask"].tolist() == [[1] * 7 + [0]]
    padded, _ = spec.pad_sequences(_qwen_inputs(7, 8, mask=[7, 5]), ulysses=2, ring=1, ulysses_rank=1)
    assert padded["encoder_hidden_states_mask"].tolist() == [[1] * 7 + [0], [1] * 5 + [0] * 3]
    padded, length = spec.pad_sequences(_qwen_inputs(8, 9), ulysses=2, ring=1, ulysses_rank=1)
    assert length == 9 and padded["hidden_states"].shape == (1, 10, 64)  # rank 1: image tokens 5..9
    assert padded["attention_kwargs"]["image_mask"].tolist() == [[True] * 4 + [False]]
    inputs = _qwen_inputs(8, 8)
    assert spec.pad_sequences(inputs, ulysses=2, ring=2, ulysses_rank=0) == (inputs, 8)
    with pytest.raises(ValueError, match=r"^ring_degree 2: text of \[8\] tokens .* and 9 image tokens must be"):
        spec.pad_sequences(_qwen_inputs(8, 9), ulysses=1, ring=2, ulysses_rank=0)
    with pytest.raises(ValueError, match=r"^ring_degree 2: text of \[7\] tokens"):
        spec.pad_sequences(_qwen_inputs(7, 8), ulysses=1, ring=2, ulysses_rank=0)
    with pytest.raises(ValueError, match=r"^ring_degree 2: text of \[6, 8\] tokens"):
        spec.pad_sequences(_qwen_inputs(8, 8, mask=[8, 6]), ulysses=1, ring=2, ulysses_rank=0)


def test_qwen_image_masked_processor_equals_diffusers_on_the_unpadded_tokens(tiny_qwen_image):
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    from omni_backend.pipelines.qwen_image_parallel import ImageMaskedAttnProcessor

    transformer = QwenImageTransformer2DModel.from_pretrained(tiny_qwen_image, subfolder="transformer")
    attn, inner = transformer.transformer_blocks[0].attn, transformer.inner_dim
    torch.manual_seed(0)
    image, text = torch.randn(2, 6, inner), torch.randn(2, 3, inner)
    text_mask = torch.tensor([[True, True, True], [True, True, False]])
    image_freqs, text_freqs = transformer.pos_embed([(1, 2, 3)] * 2, max_txt_seq_len=3, device=torch.device("cpu"))
    expected = QwenDoubleStreamAttnProcessor2_0()(attn, image, text, text_mask, None, (image_freqs, text_freqs))
    padded = torch.cat([image, torch.randn(2, 2, inner)], dim=1)
    padded_freqs = torch.cat([image_freqs, image_freqs[:2]])  # any rotation: the padded keys are masked
    image_mask = torch.tensor([[True] * 6 + [False] * 2] * 2)
    processor = ImageMaskedAttnProcessor()
    got = processor(attn, padded, text, text_mask, None, (padded_freqs, text_freqs), image_mask=image_mask)
    torch.testing.assert_close(got[0][:, :6], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    every_key = torch.ones_like(image_mask)
    unmasked = processor(attn, padded, text, text_mask, None, (padded_freqs, text_freqs), image_mask=every_key)
    assert not torch.allclose(unmasked[1], expected[1]), "the padded keys must matter when not masked"
