"""Small, learnable MNIST look-alikes written as real IDX files, so tests stay fast and offline.

Each digit is drawn as seven-segment strokes with a random offset, scale, stroke width and noise: a model can
learn it in seconds, every image is unique, and the pixel statistics resemble MNIST (white ink on black).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from training.mnist_idx import MNIST_FILES, write_idx

# Segments a..g of a seven-segment display: (row0, col0, row1, col1) in a 20x12 glyph box.
_SEGMENTS = {
    "a": (0, 0, 2, 12),
    "b": (0, 10, 10, 12),
    "c": (10, 10, 20, 12),
    "d": (18, 0, 20, 12),
    "e": (10, 0, 20, 2),
    "f": (0, 0, 10, 2),
    "g": (9, 0, 11, 12),
}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def render_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    image = np.zeros((28, 28), dtype=np.float32)
    top, left = rng.integers(2, 7), rng.integers(5, 12)
    widen = rng.integers(0, 2)
    for segment in _DIGITS[label]:
        r0, c0, r1, c1 = _SEGMENTS[segment]
        image[top + r0 : top + r1 + widen, left + c0 : left + c1 + widen] = rng.uniform(180, 255)
    image += rng.normal(0, 12, image.shape) * (image > 0)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_mnist(directory: str | Path, n_train: int = 600, n_test: int = 100, seed: int = 0) -> dict[str, str]:
    """Write the four MNIST files (balanced classes) into ``directory``; return their MD5 sums by file name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    md5 = {}
    for split, count in (("train", n_train), ("test", n_test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.stack([render_digit(int(label), rng) for label in labels])
        for role, array in ((f"{split}_images", images), (f"{split}_labels", labels)):
            path = write_idx(directory / MNIST_FILES[role], array)
            md5[path.name] = hashlib.md5(path.read_bytes()).hexdigest()
    return md5
