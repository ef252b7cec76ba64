"""The procedural shapes data set and the classifiers that read pictures back."""

from __future__ import annotations

import numpy as np
import pytest

from omni_backend.demo import shapes
from omni_backend.demo.shapes import PALETTE, Accuracy, Scene, classify


def test_grammar_has_every_combination_once() -> None:
    scenes = shapes.all_scenes()
    assert len(scenes) == len(set(scenes)) == 8 * 3 * 7
    assert all(scene.color != scene.background for scene in scenes)
    assert Scene.parse("a red circle on a blue background") == Scene("red", "circle", "blue")
    assert all(Scene.parse(scene.caption) == scene for scene in scenes)


@pytest.mark.parametrize(
    "caption", ["a red circle", "a pink circle on a blue background", "a red star on a blue background"]
)
def test_parse_rejects_captions_outside_the_grammar(caption: str) -> None:
    with pytest.raises(ValueError, match="not a caption of the grammar"):
        Scene.parse(caption)


def test_sample_is_reproducible_and_seed_dependent() -> None:
    images, scenes = shapes.sample(16, seed=3)
    again, scenes_again = shapes.sample(16, seed=3)
    other, _ = shapes.sample(16, seed=4)
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and scenes == scenes_again
    assert not np.array_equal(images, other)


def test_pictures_are_two_flat_palette_colors_with_the_shape_inside() -> None:
    images, scenes = shapes.sample(200, seed=0)
    heights = []
    for image, scene in zip(images, scenes, strict=True):
        colors = {tuple(int(v) for v in c) for c in image.reshape(-1, 3)}
        assert colors == {PALETTE[scene.color], PALETTE[scene.background]}
        rows = np.nonzero((image == PALETTE[scene.color]).all(-1).any(1))[0]
        heights.append((rows.max() - rows.min() + 1) / 64)
    # shape height 20-45% of the image (+/- one pixel of rasterization)
    assert min(heights) >= 0.20 - 1 / 64 and max(heights) <= 0.45 + 1 / 64
    assert {scene.shape for scene in scenes} == set(shapes.SHAPES)


def test_shape_fill_ratios_are_far_from_the_cuts() -> None:
    """Square fills its box, circle pi/4, triangle 1/2: the classifier's cuts sit between them."""
    for shape, expected in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        mask = shapes.shape_mask(shape, height=40.0, top=10.0, left=12.0)
        assert mask.sum() / 40**2 == pytest.approx(expected, abs=0.03)


def test_classifiers_read_the_generators_own_pictures() -> None:
    accuracy = Accuracy()
    images, scenes = shapes.sample(1000, seed=1)
    for image, scene in zip(images, scenes, strict=True):
        accuracy.add(scene, image)
    assert accuracy.rates() == {"background": 1.0, "color": 1.0, "shape": 1.0}


def test_classifiers_tolerate_soft_edges_and_noise_like_a_decoder_makes() -> None:
    """A 3x3 blur (edges blend over 3 pixels) and a little noise must not change the reading."""
    rng = np.random.default_rng(0)
    accuracy = Accuracy()
    images, scenes = shapes.sample(200, seed=2)
    for image, scene in zip(images, scenes, strict=True):
        padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
        soft = sum(padded[i : i + 64, j : j + 64] for i in range(3) for j in range(3)) / 9
        soft += rng.normal(0, 4, soft.shape)
        accuracy.add(scene, np.clip(soft, 0, 255).astype(np.uint8))
    rates = accuracy.rates()
    assert rates["background"] == rates["color"] == 1.0
    assert rates["shape"] >= 0.95, rates


def test_classify_reports_no_shape_on_a_flat_picture() -> None:
    reading = classify(np.full((64, 64, 3), PALETTE["green"], dtype=np.uint8))
    assert (reading.background, reading.color, reading.shape) == ("green", None, None)


def test_wrong_picture_scores_zero() -> None:
    accuracy = Accuracy()
    image = shapes.render(Scene("red", "square", "blue"), np.random.default_rng(0))
    accuracy.add(Scene("yellow", "circle", "black"), image)
    assert accuracy.rates() == {"background": 0.0, "color": 0.0, "shape": 0.0}


def test_shape_word_pixels_are_where_the_three_shapes_differ() -> None:
    square = shapes.shape_mask("square", 20.0, 10.0, 30.0)
    decisive = shapes.shape_word_pixels(square)
    circle, triangle = shapes.shape_mask("circle", 20.0, 10.0, 30.0), shapes.shape_mask("triangle", 20.0, 10.0, 30.0)
    assert decisive[10, 30] and decisive[29, 49]  # corners: the square's alone
    assert not decisive[25, 40]  # low centre: inside all three
    assert not decisive[5, 5] and not decisive[10:30, 30:50].all()  # outside the box; not the whole box
    assert np.array_equal(decisive, (square | circle | triangle) & ~(square & circle & triangle))
    for shape in shapes.SHAPES:  # from the drawn pixels alone (the box read back to the pixel): nearly the same
        found = shapes.shape_word_pixels(shapes.shape_mask(shape, 20.0, 10.0, 30.0))
        assert (found & decisive).sum() / (found | decisive).sum() > (0.95 if shape != "triangle" else 0.75), shape
    assert not shapes.shape_word_pixels(np.zeros((64, 64), bool)).any()
