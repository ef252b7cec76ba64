"""The demo training script, on a few steps: seeded, writes a loadable FLUX.1 checkpoint and its loss curve."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omni_backend.demo.train import MAX_SEQUENCE_LENGTH, TrainConfig, build_components, lr_schedule, main, train

pytestmark = pytest.mark.slow

SMOKE = TrainConfig(
    vae_steps=2,
    vae_batch=4,
    latents=16,
    steps=3,
    batch=4,
    save_every=2,
    hidden=64,
    single_layers=1,
    vae_channels=(8, 8, 8, 8),
)


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}/{k}": t for f in sorted(ckpt.rglob("*.safetensors")) for k, t in load_file(f).items()}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("train") / "ckpt", SMOKE)


def test_writes_a_checkpoint_flux_pipeline_renders(smoke_run: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(smoke_run, dtype=torch.float32)
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.guidance_embeds is False
    image = pipe(
        "a red circle on a blue background",
        height=64,
        width=64,
        num_inference_steps=2,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    # FLUX's latent normalization was measured on the trained VAE, not left at its defaults
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) != (0.18215, None)


def test_writes_the_loss_curve(smoke_run: Path) -> None:
    lines = (smoke_run / "training" / "loss.csv").read_text().splitlines()
    assert lines[0] == "phase,step,loss"
    phases = [line.split(",")[0] for line in lines[1:]]
    assert phases == ["vae"] * SMOKE.vae_steps + ["transformer"] * SMOKE.steps
    assert all(np.isfinite(float(line.split(",")[2])) for line in lines[1:])
    assert (smoke_run / "training" / "loss.png").stat().st_size > 0


def test_same_seed_same_weights_other_seed_other_weights(smoke_run: Path, tmp_path: Path) -> None:
    again = _weights(train(tmp_path / "again", SMOKE))
    first = _weights(smoke_run)
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)
    other = _weights(train(tmp_path / "other", TrainConfig(**{**SMOKE.__dict__, "seed": 1})))
    assert not torch.equal(other["transformer/proj_out.weight"], first["transformer/proj_out.weight"])


def test_cli_rejects_a_missing_out(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([])
    assert "--out" in capsys.readouterr().err


def test_text_encoders_stay_frozen_unless_trained(smoke_run: Path, tmp_path: Path) -> None:
    """Frozen: the seeded random encoders are saved as built; --train-text (with caption dropout) moves them."""
    frozen = _weights(smoke_run)
    built = build_components(SMOKE)
    for folder in ("text_encoder", "text_encoder_2"):
        saved = {name: t for name, t in built[folder].state_dict().items() if f"{folder}/{name}" in frozen}
        assert len(saved) > 10
        assert all(torch.equal(frozen[f"{folder}/{name}"], tensor) for name, tensor in saved.items())
    trained = _weights(train(tmp_path / "text", replace(SMOKE, train_text=True, caption_dropout=0.5)))
    for folder in ("text_encoder", "text_encoder_2"):
        moved = [k for k in frozen if k.startswith(f"{folder}/") and not torch.equal(frozen[k], trained[k])]
        assert moved, f"{folder} did not train"


@pytest.mark.parametrize("cooldown", [0, 4])
def test_learning_rate_warms_up_holds_and_cools_down_to_zero(cooldown: int) -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_schedule(optimizer, warmup=2, total=10, cooldown=cooldown)
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    constant = [0.5] + [1.0] * 9
    # the cool-down leaves the steps before it untouched (snapshots there equal shorter runs)
    assert rates == (constant if cooldown == 0 else constant[:6] + [1.0, 0.75, 0.5, 0.25])
