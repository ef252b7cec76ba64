"""The procedural "shapes" data set the demo checkpoint is trained on, and its classifiers.

64x64 RGB images of one flat-colored shape (circle, square, triangle) on a flat background of
another palette color, at a random position and size (shape height 20-45% of the image),
captioned ``"a {color} {shape} on a {background} background"``. Everything is drawn by numpy from
a seed: any amount of data, the same for the same seed.

The classifiers read a picture back into (background, color, shape) the way a person would: the
background is the palette color of the border, the shape color the palette color of the pixels
that differ from the background, the shape how much of its bounding box it fills (square ~1,
circle pi/4, triangle 1/2; a triangle's mass also sits low). They score the generator's own
images 100% (tested) and are what the quality check applies to generated pictures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

SIZE = 64
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (245, 140, 30),
    "purple": (140, 50, 190),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MIN_HEIGHT, MAX_HEIGHT = 0.20, 0.45  # shape height as a fraction of the image
_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # [8, 3]
_CAPTION = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")
# Fill ratio of the bounding box: square 1, circle pi/4 = 0.785, triangle 0.5; cut halfway between.
_SQUARE_MIN_FILL, _CIRCLE_MIN_FILL = 0.89, 0.64
_TRIANGLE_MIN_LOW = 0.58  # centroid depth in the box: triangle 2/3, square and circle 1/2


@dataclass(frozen=True)
class Scene:
    """What one picture shows."""

    color: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"

    @classmethod
    def parse(cls, caption: str) -> Scene:
        match = _CAPTION.match(caption.strip().lower())
        if match is None or match[1] not in PALETTE or match[2] not in SHAPES or match[3] not in PALETTE:
            raise ValueError(f"not a caption of the grammar: {caption!r}")
        return cls(color=match[1], shape=match[2], background=match[3])


def all_scenes() -> list[Scene]:
    """Every caption of the grammar: 8 colors x 3 shapes x 7 backgrounds = 168."""
    return [Scene(c, s, b) for c in COLORS for s in SHAPES for b in COLORS if b != c]


def random_scene(rng: np.random.Generator) -> Scene:
    color, background = rng.choice(len(COLORS), size=2, replace=False)
    return Scene(COLORS[color], SHAPES[rng.integers(len(SHAPES))], COLORS[background])


def shape_mask(shape: str, height: float, top: float, left: float, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of ``shape`` whose bounding box is height x height at (top, left).

    Pixel centers inside the shape are set (no anti-aliasing: the colors stay flat). The triangle
    is isosceles, apex up, base as wide as it is high.
    """
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    v, u = (y - top) / height, (x - left) / height  # coordinates in the unit bounding box
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "square":
        return inside
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25
    if shape == "triangle":
        return inside & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {shape!r}")


def shape_word_pixels(mask: np.ndarray) -> np.ndarray:
    """Pixels where a circle, a square and a triangle with ``mask``'s bounding box differ: what the
    shape word alone decides once position and size are known (training weighs them up)."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(rows) == 0:
        return np.zeros_like(mask)
    # the box read back from the pixels: a triangle's apex row may hold no pixel centre, so its box can
    # sit one pixel low (what the committed checkpoint was trained with)
    height = float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
    masks = [shape_mask(shape, height, float(rows[0]), float(cols[0]), mask.shape[0]) for shape in SHAPES]
    return np.logical_or.reduce(masks) & ~np.logical_and.reduce(masks)


def render(scene: Scene, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """uint8 [size, size, 3] picture of ``scene`` at a random position and size."""
    height = rng.uniform(MIN_HEIGHT, MAX_HEIGHT) * size
    top, left = rng.uniform(0, size - height, size=2)
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = PALETTE[scene.background]
    image[shape_mask(scene.shape, height, top, left, size)] = PALETTE[scene.color]
    return image


def sample(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random pictures (uint8 [n, size, size, 3]) and their scenes, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([render(scene, rng, size) for scene in scenes]), scenes


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """Palette index of each RGB pixel ([..., 3] -> [...])."""
    dist = ((pixels[..., None, :].astype(np.float32) - _RGB) ** 2).sum(-1)
    return dist.argmin(-1)


def _majority(indices: np.ndarray) -> str:
    return COLORS[int(np.bincount(indices.ravel(), minlength=len(COLORS)).argmax())]


def _drop_specks(mask: np.ndarray) -> np.ndarray:
    """Keep the pixels with at least two of their four neighbours set (removes isolated noise)."""
    padded = np.pad(mask, 1).astype(np.int8)
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return mask & (neighbours >= 2)


@dataclass(frozen=True)
class Reading:
    """What the classifiers see in a picture; ``color``/``shape`` are None when no shape stands out."""

    background: str
    color: str | None
    shape: str | None
    fill: float  # fraction of the shape's bounding box it covers


def classify(image: np.ndarray) -> Reading:
    """Read (background, shape color, shape) from a uint8 [H, W, 3] picture."""
    border = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])
    background = _majority(_nearest(border))
    labels = _nearest(image)
    mask = labels != COLORS.index(background)
    if mask.sum() < 4:
        return Reading(background, None, None, 0.0)
    color = _majority(labels[mask])
    # The shape is what is nearer its color than the background's: a soft edge is cut at its middle,
    # and its blend of the two colors (red + blue ~ purple) is not mistaken for a third color.
    pixels = image.astype(np.float32)
    to_color = ((pixels - _RGB[COLORS.index(color)]) ** 2).sum(-1)
    mask = to_color < ((pixels - _RGB[COLORS.index(background)]) ** 2).sum(-1)
    mask = _drop_specks(mask)  # one stray pixel far away would otherwise stretch the bounding box
    if not mask.any():
        return Reading(background, color, None, 0.0)
    rows, cols = np.nonzero(mask)
    height = rows.max() - rows.min() + 1
    fill = float(mask.sum() / (height * (cols.max() - cols.min() + 1)))
    # A triangle (apex up) also holds its mass low: its centroid sits 2/3 down its box, where a square's
    # or a circle's sits at 1/2. That survives the blunted apex of a blurry small triangle.
    low = (rows.mean() - rows.min() + 0.5) / height
    if fill < _CIRCLE_MIN_FILL or low > _TRIANGLE_MIN_LOW:
        shape = "triangle"
    else:
        shape = "square" if fill >= _SQUARE_MIN_FILL else "circle"
    return Reading(background, color, shape, fill)


@dataclass
class Accuracy:
    """Running counts of correct readings; ``rates`` gives the three fractions."""

    total: int = 0
    background: int = 0
    color: int = 0
    shape: int = 0

    def add(self, scene: Scene, image: np.ndarray) -> Reading:
        reading = classify(image)
        self.total += 1
        self.background += reading.background == scene.background
        self.color += reading.color == scene.color
        self.shape += reading.shape == scene.shape
        return reading

    def rates(self) -> dict[str, float]:
        n = max(self.total, 1)
        return {"background": self.background / n, "color": self.color / n, "shape": self.shape / n}
