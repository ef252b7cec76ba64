"""The trained demo checkpoint (demo/flux-shapes) served by model_repository/ as it ships, the model
`make serve` starts: it draws what the prompt asks for, and what diffusers' FluxPipeline draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omni_backend.demo.quality import evaluate, served_renderer
from omni_backend.demo.shapes import SIZE, classify
from omni_backend.testing.compare import assert_same_image
from tests.e2e.conftest import FLUX_MODELS, RawClient, repository_of, serving

pytestmark = pytest.mark.slow

DEMO_ROOT = Path(__file__).resolve().parents[2] / "demo"  # holds flux-shapes, the name the repository serves
PROMPTS = 16  # random captions of the grammar with random seeds, drawn from seed 2026: not hand-picked
# What the committed checkpoint has learned (README: background 100%, color 98%, shape 53% on 100 prompts;
# on these 16: 100%, 100%, 56%), with room for pictures near a classifier's cut that another CPU's float
# rounding could flip: shape >= 7 of 16 (the checkpoint before it drew shapes at chance, ~1/3).
MIN_RATES = {"background": 0.9, "color": 0.9, "shape": 0.4}


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    with serving(repository_of(tmp_path_factory.mktemp("demo-repo"), FLUX_MODELS), DEMO_ROOT) as process:
        yield process


@pytest.mark.parametrize(("model", "protocol"), [("flux", "grpc"), ("flux", "http"), ("flux_ensemble", "grpc")])
def test_served_pictures_show_what_the_prompt_asks_for(demo_server, model, protocol):
    url = demo_server.grpc_url if protocol == "grpc" else demo_server.http_url
    report = evaluate(served_renderer(url, protocol, model, steps=20), PROMPTS, seed=2026)
    rates = report.accuracy.rates()
    assert all(rates[name] >= low for name, low in MIN_RATES.items()), rates


def test_served_image_equals_diffusers_flux_pipeline(demo_server):
    from diffusers import FluxPipeline

    prompt, seed = "a red circle on a blue background", 7
    client = RawClient(demo_server, "grpc")
    try:  # no height / width: the checkpoint's own size (its VAE's sample_size), 64
        served = client.infer("flux", {"prompt": prompt, "num_inference_steps": np.int32(20), "seed": np.int64(seed)})
    finally:
        client.close()
    pipe = FluxPipeline.from_pretrained(DEMO_ROOT / "flux-shapes", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(  # the checkpoint's T5 tokenizer declares 8 tokens; FluxPipeline must be told
        prompt,
        height=SIZE,
        width=SIZE,
        num_inference_steps=20,
        max_sequence_length=8,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    assert served.shape == (SIZE, SIZE, 3)
    assert_same_image(served, np.asarray(expected))
    assert classify(served).background == "blue"
