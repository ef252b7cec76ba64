"""Tests for omni_backend.testing.tiny: tiny random-weight FLUX checkpoints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omni_backend.testing import tiny

WEIGHT_WARNINGS = ("missing", "unexpected", "newly initialized", "not initialized", "were not used")


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, keyed by ``<file path>:<tensor name>``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        for name, t in load_file(f).items():
            out[f"{f.relative_to(ckpt)}:{name}"] = t
    return out


@pytest.fixture(scope="module")
def flux_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_flux(tmp_path_factory.mktemp("tiny") / "flux", seed=0)


@pytest.fixture(scope="module")
def flux_pipe(flux_ckpt: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(flux_ckpt, dtype=torch.float32)


def test_layout_and_size(flux_ckpt: Path) -> None:
    for sub in ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer"):
        assert (flux_ckpt / sub).is_dir(), sub
    assert tiny.is_complete(flux_ckpt)
    assert sum(f.stat().st_size for f in flux_ckpt.rglob("*") if f.is_file()) < 5_000_000


def test_same_seed_same_weights_other_seed_differs(flux_ckpt: Path, tmp_path: Path) -> None:
    ref = _tensors(flux_ckpt)
    same = _tensors(tiny.build_tiny_flux(tmp_path / "same", seed=0))
    other = _tensors(tiny.build_tiny_flux(tmp_path / "other", seed=1))
    assert ref.keys() == same.keys() == other.keys() and ref
    for key, t in ref.items():
        assert torch.equal(t, same[key]), key
    assert any(not torch.equal(t, other[key]) for key, t in ref.items())
    for rel in ("tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json", "model_index.json"):
        assert (flux_ckpt / rel).read_bytes() == (tmp_path / "same" / rel).read_bytes(), rel


def test_loads_without_weight_warnings(flux_ckpt: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_ckpt, dtype=torch.float32)
    err = capfd.readouterr().err.lower()
    assert not [w for w in WEIGHT_WARNINGS if w in err], err
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer_2.model_max_length == 512
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer_2.eos_token_id == 1
    assert pipe.tokenizer_2.unk_token_id == 2
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)


def _generate(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    gen = torch.Generator("cpu").manual_seed(seed)
    out = pipe(prompt, height=64, width=64, num_inference_steps=2, generator=gen, output_type="np", **kwargs)
    return out.images[0]


def test_generates_deterministic_image(flux_pipe) -> None:
    a = _generate(flux_pipe, "a red circle", seed=0)
    b = _generate(flux_pipe, "a red circle", seed=0)
    c = _generate(flux_pipe, "a red circle", seed=1)
    assert a.shape == (64, 64, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_true_cfg_and_unicode_prompts(flux_pipe) -> None:
    cfg = _generate(flux_pipe, "a red circle", seed=0, negative_prompt="x", true_cfg_scale=2.0)
    uni = _generate(flux_pipe, "🐱 一只猫 ünïcödé ✨ " * 20, seed=0)
    assert cfg.shape == uni.shape == (64, 64, 3)
    assert np.isfinite(cfg).all() and np.isfinite(uni).all()


def test_load_with_components_skipped(flux_ckpt: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_ckpt, transformer=None, vae=None)
    assert pipe.transformer is None and pipe.vae is None
    prompt_embeds, pooled, _ = pipe.encode_prompt("a cat", prompt_2=None, max_sequence_length=512)
    assert tuple(prompt_embeds.shape) == (1, 512, 32) and tuple(pooled.shape) == (1, 32)


def test_cli_is_idempotent_and_force_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ckpt"
    assert tiny.main(["--family", "flux", "--out", str(out)]) == 0
    assert tiny.is_complete(out)
    marker = out / "marker"
    marker.write_text("kept unless rebuilt")
    capsys.readouterr()
    assert tiny.main(["--family", "flux", "--out", str(out)]) == 0
    assert "already" in capsys.readouterr().out and marker.exists()
    proc = subprocess.run(
        [sys.executable, "-m", "omni_backend.testing.tiny", "--family", "flux", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and "already" in proc.stdout, proc.stderr
    assert tiny.main(["--family", "flux", "--out", str(out), "--force", "--seed", "1"]) == 0
    assert tiny.is_complete(out) and not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no tmp/old leftovers


def test_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(out_dir: Path, seed: int) -> Path:
        (Path(out_dir) / "model_index.json").write_text("{}")
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(tiny.BUILDERS, "broken", broken)
    with pytest.raises(RuntimeError, match="killed"):
        tiny.build("broken", tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'nope'.*flux"):
        tiny.build("nope", tmp_path / "x")
    with pytest.raises(SystemExit) as exc:
        tiny.main(["--family", "nope", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists()
