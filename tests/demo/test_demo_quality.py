"""The quality check's bookkeeping, with the data set's own pictures standing in for a model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from omni_backend.demo import shapes
from omni_backend.demo.quality import evaluate, renoised_rates, save_grid, shape_word_effect


def draw_the_caption(prompt: str, seed: int) -> np.ndarray:
    return shapes.render(shapes.Scene.parse(prompt), np.random.default_rng(seed))


def test_a_perfect_model_scores_100_and_prompts_follow_the_seed() -> None:
    report = evaluate(draw_the_caption, n=40, seed=5)
    assert report.accuracy.rates() == {"background": 1.0, "color": 1.0, "shape": 1.0}
    again = evaluate(draw_the_caption, n=40, seed=5)
    assert [s for s, _, _ in again.samples] == [s for s, _, _ in report.samples]
    assert len({s for s, _, _ in report.samples}) > 30  # random captions, not one repeated


def test_a_model_ignoring_the_prompt_scores_low() -> None:
    def always_red_square(prompt: str, seed: int) -> np.ndarray:
        return draw_the_caption("a red square on a blue background", seed)

    rates = evaluate(always_red_square, n=60, seed=0).accuracy.rates()
    assert all(rate < 0.5 for rate in rates.values()), rates


def test_grid_has_one_cell_per_picture(tmp_path: Path) -> None:
    report = evaluate(draw_the_caption, n=8, seed=0)
    save_grid(report.samples, tmp_path / "grid.png", columns=4)
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (4 * 150, 2 * (2 * 64 + 34))
    # the first picture sits in the top-left cell, at 2x
    first = np.asarray(grid)[2 : 2 + 128 : 2, 11 : 11 + 128 : 2]
    assert np.array_equal(first, report.samples[0][1])


def test_the_shape_word_effect_tells_a_reader_from_a_model_ignoring_the_word() -> None:
    assert shape_word_effect(draw_the_caption, n=30, seed=2) == 1.0

    def ignores_the_shape_word(prompt: str, seed: int) -> np.ndarray:
        scene = shapes.Scene.parse(prompt)
        return draw_the_caption(f"a {scene.color} circle on a {scene.background} background", seed)

    assert shape_word_effect(ignores_the_shape_word, n=30, seed=2) == 0.0


@pytest.mark.slow
def test_renoised_pictures_come_back_from_low_noise_and_degrade_from_pure_noise() -> None:
    """On the committed checkpoint: sampled back from the schedule's last levels, the data set's pictures
    keep what they show (the noising, the shifted sigmas and the decode line up); from t0 = 1 nothing of
    the picture is left, so the rates are the model's own."""
    checkpoint = Path(__file__).resolve().parents[2] / "demo" / "flux-shapes"
    rows = renoised_rates(checkpoint, n=12, seed=3, steps=10)
    levels = [t0 for t0, _ in rows]
    assert len(levels) == 5 and round(levels[0], 2) == 1.0 and levels == sorted(levels, reverse=True), levels
    _, last = rows[-1]
    assert last["background"] == last["color"] == 1.0 and last["shape"] >= 0.9, last
    assert rows[0][1]["shape"] < last["shape"], rows
