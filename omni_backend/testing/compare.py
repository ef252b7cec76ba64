"""Image comparison at the tolerance DESIGN section 4 promises (used by tests and benchmarks)."""

from __future__ import annotations

import numpy as np


def fraction_close(actual: np.ndarray, expected: np.ndarray, levels: int = 1) -> float:
    """Fraction of pixels whose every channel is within ``levels`` intensity levels."""
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    return float((diff <= levels).all(axis=-1).mean())


def assert_same_image(actual: np.ndarray, expected: np.ndarray) -> None:
    """At most 1 intensity level apart on at least 99.9% of pixels, same shape, uint8."""
    assert actual.dtype == np.uint8, actual.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert expected.std() > 1.0, "the reference is flat: the comparison would prove nothing"
    close = fraction_close(actual, expected)
    assert close >= 0.999, f"only {close:.4%} of pixels within 1 level"
