"""Whether the inputs an endpoint served drifted from the digits its model was trained on.

A window of captured requests (the images sent, raw MNIST pixels 0-255 with white ink on black, and the class
probabilities the model answered) is summarised by six figures, each held to bounds (``THRESHOLDS``):

- ``mean_image_corr``: the Pearson correlation of the window's mean image with the reference's class mean images
  mixed in the window's predicted proportions;
- ``intensity_ratio``: the window's mean pixel over the reference's;
- ``centre_shift``: how far (pixels) the window's mean centre of mass lies from the reference's;
- ``slant_shift``: how far the window's mean slant (mu11 / mu20, as ``class_stats`` measures it) lies from the
  reference's;
- ``class_psi``: the population stability index of the predicted classes against the training labels' shares;
- ``confidence_drop``: the model's mean top-class probability on the held-out test set less the window's.

Each image figure is compared with what the official training split (``class_stats.load_reference``) shows for the
classes the model predicted, in the window's proportions: each class's reference statistic weighted by its share
of the window. A window of only ones and sevens then keeps the image figures of a clean window (ones are thin and
upright, and an average over the whole training set would call them dim and slanted); its skew is named once, by
``class_psi``, rather than by every figure at once.

The mean image is compared as one image of the whole window rather than class by class (each predicted class's mean
image against the reference's, weighted by the classes' shares): a class's mean over a few dozen inputs is noisy,
so the per-class figure wanders further on clean windows, and on random clean windows the whole window's figure
parts every damage from them by a wider margin; against the training set's own blocks of few writers the two do
about equally well (bench/bench_drift.py, ``mean_image_alternatives``).

The atypical inputs, shown as samples in a report, are those least like the reference's mean image of the class the
model gave them (Pearson correlation): an input unlike any digit, or unlike the one it was taken for, ranks first.

Pure functions: nothing is read but the packaged reference (once, when none is given), and nothing is written but
the PNG that ``sample_grid_png`` is asked to write.
"""

from __future__ import annotations

import functools
import io
import math
import numbers
import os
from pathlib import Path

import numpy as np

from data_checks.class_stats import _moments, load_reference

SIDE = 28
CLASSES = 10
# The reference's split that a model is trained on, and so the one served inputs are held to.
REFERENCE_SPLIT = "train"
# Requests below which a window is not judged. Every figure's noise falls as the window grows, so the thresholds are
# set by the smallest window judged. On 1,000 random windows of 100 official test digits each, the predicted-class
# PSI reaches 0.35 (the common 0.25 rule for a significant change would fire on clean data); at 500 requests it stays
# below 0.07, under the common 0.1 rule with a margin, and the image figures' noise halves.
MIN_REQUESTS = 500
# The inputs shown as samples in a report.
ATYPICAL = 16
# A predicted class's share below this counts as this in the PSI: the logarithm of an empty bin is infinite. A
# window with a class missing then scores (0.1 - 1e-4) * ln(0.1 / 1e-4), about 0.69, for that class alone.
PSI_FLOOR = 1e-4
# How far a row of probabilities may sum from 1: float32's softmax and a JSON round trip stay far below it.
PROBABILITY_SUM_TOLERANCE = 1e-3
# Images per chunk when figures are computed: bounds the float64 copy (10,000 images: 63 MB).
_CHUNK = 10_000
# Decimal places of the figures and scores in a report.
_DECIMALS = 4

# Each figure's bounds: {"min": ...} and/or {"max": ...}; a figure outside them is drift. They come from
# bench/bench_drift.py (bench/results/drift.json), with seed_cnn trained on the official training set answering:
# 1,000 random windows of the official test digits at each of 100, 500 and 1,000 requests; every consecutive block
# of 500 digits of the training set (120) and of the test set (20); and 200 windows of 500 from each of fourteen
# damaged copies of the test set, and from its ones and sevens alone. MNIST keeps each writer's digits together, so a
# consecutive block holds few writers and its figures stray far further than a random window's. A block of the very
# digits the model was trained on is not drift, so each bound sits beyond the worst training block by about half
# again that block's distance from the reference (and beyond the test set's blocks, whose writers the training set
# lacks, by less), and inside every damaged window that it is there to catch. No clean window of 500 or more and no
# block crosses any bound; every window of every damage crosses at least one.
THRESHOLDS: dict[str, dict[str, float]] = {
    # Worst clean: 0.995 in random windows of 500, 0.960 in a training block. Rotated by 30 degrees: 0.92 at the
    # most; by 45: 0.86; mirrored: 0.92; shifted by 3 pixels: 0.61; inverted: -0.99. Dilated or eroded strokes stay
    # near 0.96-0.99 (their figure is the intensity), and so do digits rotated by 15 degrees.
    "mean_image_corr": {"min": 0.94},
    # Worst clean: 0.98-1.05 in random windows, 0.88-1.15 in training blocks, up to 1.24 in a test block. Dilated by
    # a 3x3 maximum: 1.94 at the least; eroded by a 2x2 minimum: 0.57 at the most (3x3: 0.23); dimmed to 60%: 0.63;
    # background noise of 0-60: 1.79; one input in ten inverted: 1.39.
    "intensity_ratio": {"min": 0.8, "max": 1.3},
    # Worst clean: 0.046 pixels in random windows, 0.039 in blocks. Shifted by 3 pixels: 4.1 at the least; rotated by
    # 15 degrees: 0.16 (the frame's centre, not the digit's, is the rotation's); eroded by 2x2: 0.70.
    "centre_shift": {"max": 0.15},
    # Worst clean: 0.049 in random windows, but 0.22 in a training block and 0.24 in a test block (writers slant
    # alike). Rotated by 30 degrees: 0.30 at the least; by 45: 0.42. A 15-degree rotation (0.15-0.20) leans no
    # further than some writers do, and is caught by its centre shift instead.
    "slant_shift": {"max": 0.27},
    # Worst clean: 0.061 in random windows of 500 (see MIN_REQUESTS), 0.036 in blocks; the common rule's 0.1 holds.
    # Only ones and sevens: 4.0 at the least.
    "class_psi": {"max": 0.1},
    # Worst clean: 0.012 in random windows of 500, 0.015 in blocks. Dilated: 0.030-0.062; eroded by 2x2: 0.042 at the
    # least; half the inputs rotated by 30 degrees: 0.046. It scales with how widely a model's confidence spreads,
    # so a model much less sure than seed_cnn at 98% accuracy may need a wider bound.
    "confidence_drop": {"max": 0.03},
}
_DESCRIPTIONS = {
    "mean_image_corr": "the window's mean image looks less like the reference's digits",
    "intensity_ratio": "the mean intensity differs from the reference's",
    "centre_shift": "the mean centre of mass lies away from the reference's (pixels)",
    "slant_shift": "the mean slant differs from the reference's",
    "class_psi": "the predicted classes are distributed unlike the training labels",
    "confidence_drop": "the model is less sure of its answers than on the test set",
}


class _Reference:
    """The training split's statistics as arrays: class mean images (10 x 784), label shares, intensities,
    centres and slants."""

    def __init__(self, records: list[dict]):
        if len(records) != CLASSES:
            raise ValueError(f"{len(records)} classes, expected {CLASSES}")
        self.mean_images = np.array([r["mean_image"] for r in records], dtype=np.float64).reshape(CLASSES, -1)
        if self.mean_images.shape[1] != SIDE * SIDE:
            raise ValueError(f"mean images of {self.mean_images.shape[1]} pixels, expected {SIDE * SIDE}")
        counts = np.array([r["images"] for r in records], dtype=np.float64)
        if (counts <= 0).any():
            raise ValueError("a class with no images")
        self.shares = counts / counts.sum()
        self.intensity = np.array([r["intensity"] for r in records], dtype=np.float64)
        self.centre = np.array([[r["centre_row"], r["centre_col"]] for r in records], dtype=np.float64)
        self.slant = np.array([r["slant"] for r in records], dtype=np.float64)
        # Centred and scaled to unit norm: an image's Pearson correlation with class k is then one dot product.
        centred = self.mean_images - self.mean_images.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(centred, axis=1, keepdims=True)
        self.unit_images = centred / np.where(norms > 0, norms, 1.0)


@functools.cache
def _official_reference() -> _Reference:
    return _Reference(load_reference()[REFERENCE_SPLIT])


def _reference_arrays(reference: dict | None) -> _Reference:
    if reference is None:
        return _official_reference()
    try:
        return _Reference(reference[REFERENCE_SPLIT])
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(
            f"reference: its {REFERENCE_SPLIT!r} split is not class statistics as load_reference gives them "
            f"({type(error).__name__}: {error})"
        ) from error


def _merged_thresholds(overrides: dict | None) -> dict[str, dict[str, float]]:
    """THRESHOLDS with the bounds that ``overrides`` names replaced; an unknown figure or bound, or a bound that is
    not a finite number, is an error naming it."""
    merged = {key: dict(bounds) for key, bounds in THRESHOLDS.items()}
    if overrides is None:
        return merged
    if not isinstance(overrides, dict):
        raise ValueError(f"thresholds: expected a dict of figures' bounds, got {type(overrides).__name__}")
    for key, bounds in overrides.items():
        if key not in THRESHOLDS:
            raise ValueError(f"thresholds: unknown figure {key!r}; the figures are {', '.join(THRESHOLDS)}")
        if not isinstance(bounds, dict):
            raise ValueError(f"thresholds[{key!r}]: expected bounds like {THRESHOLDS[key]}, got {bounds!r}")
        for bound, value in bounds.items():
            if bound not in THRESHOLDS[key]:
                raise ValueError(
                    f"thresholds[{key!r}]: unknown bound {bound!r}; {key} has {', '.join(THRESHOLDS[key])}"
                )
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"thresholds[{key!r}][{bound!r}]: expected a finite number, got {value!r}")
            merged[key][bound] = float(value)
        if merged[key].get("min", -math.inf) > merged[key].get("max", math.inf):
            raise ValueError(f"thresholds[{key!r}]: min {merged[key]['min']} is above max {merged[key]['max']}")
    return merged


def _first(mask: np.ndarray) -> int:
    """The first image (or row) that a mask flags anything in."""
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def _checked_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"images: expected shape (N, {SIDE}, {SIDE}), got {images.shape}")
    if images.dtype == bool or not np.issubdtype(images.dtype, np.number) or np.iscomplexobj(images):
        raise ValueError(f"images: expected raw pixels as numbers, got dtype {images.dtype}")
    if not len(images):
        return images
    if np.issubdtype(images.dtype, np.floating):
        bad = ~np.isfinite(images)
        if bad.any():
            raise ValueError(
                f"images: {int(bad.sum())} pixels are not finite (NaN or infinite), first in image {_first(bad)}"
            )
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise ValueError(
            f"images: expected raw pixels within 0-255, found {low:g} to {high:g} "
            f"(first in image {_first((images < 0) | (images > 255))})"
        )
    return images


def _checked_probabilities(probabilities, n: int) -> np.ndarray:
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != CLASSES:
        raise ValueError(f"probabilities: expected shape (N, {CLASSES}), got {probabilities.shape}")
    if len(probabilities) != n:
        raise ValueError(f"probabilities: {len(probabilities)} rows for {n} images")
    if (
        probabilities.dtype == bool
        or not np.issubdtype(probabilities.dtype, np.number)
        or np.iscomplexobj(probabilities)
    ):
        raise ValueError(f"probabilities: expected numbers, got dtype {probabilities.dtype}")
    probabilities = probabilities.astype(np.float64)
    bad = ~np.isfinite(probabilities)
    if bad.any():
        raise ValueError(
            f"probabilities: {int(bad.sum())} are not finite (NaN or infinite), first in row {_first(bad)}"
        )
    outside = (probabilities < 0) | (probabilities > 1)
    if outside.any():
        row = _first(outside)
        raise ValueError(
            f"probabilities: each must lie within 0-1; row {row} has {probabilities[row][outside[row]][0]:g}"
        )
    sums = probabilities.sum(axis=1)
    off = np.abs(sums - 1) > PROBABILITY_SUM_TOLERANCE
    if off.any():
        row = _first(off)
        raise ValueError(f"probabilities: each row must sum to 1; row {row} sums to {sums[row]:.6g}")
    return probabilities


def _whole(name: str, value, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name}: expected a whole number >= {least}, got {value!r}")
    return int(value)


def _window_sums(images: np.ndarray, predicted: np.ndarray, reference: _Reference) -> tuple[np.ndarray, np.ndarray]:
    """One pass over the window in chunks: its summed image (784 pixels, exact integers as float64 for integer
    pixels) and each input's Pearson correlation with its predicted class's reference image."""
    summed = np.zeros(SIDE * SIDE)
    correlation = np.empty(len(images))
    for start in range(0, len(images), _CHUNK):
        x = images[start : start + _CHUNK].reshape(-1, SIDE * SIDE).astype(np.float64)
        y = predicted[start : start + _CHUNK]
        summed += x.sum(axis=0)
        # The reference images are centred, so an input's own mean drops out of its dot product with them, and its
        # centred norm follows from its sums: no centred copy of the chunk is needed.
        dots = (x @ reference.unit_images.T)[np.arange(len(x)), y]
        totals = x.sum(axis=1)
        norms = np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x) - totals**2 / x.shape[1], 0.0))
        # A blank (uniform) input correlates with nothing: 0, as class_stats counts a blank mean image.
        correlation[start : start + len(x)] = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return summed, correlation


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """The Pearson correlation of two images; 0 where either is uniform (as class_stats counts a blank one)."""
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def _figures(images, probabilities, predicted, test_confidence, ref: _Reference):
    n = len(images)
    counts = np.bincount(predicted, minlength=CLASSES)
    shares = counts / n
    summed, per_input = _window_sums(images, predicted, ref)
    rows, cols, slants = _moments(images)
    centre = np.array([rows.mean(), cols.mean()]) - shares @ ref.centre
    observed = np.maximum(shares, PSI_FLOOR)
    figures = {
        "mean_image_corr": _pearson(summed / n, shares @ ref.mean_images),
        "intensity_ratio": float(summed.sum() / (n * SIDE * SIDE) / (shares @ ref.intensity)),
        "centre_shift": float(np.hypot(*centre)),
        "slant_shift": float(abs(slants.mean() - shares @ ref.slant)),
        "class_psi": float(((observed - ref.shares) * np.log(observed / ref.shares)).sum()),
        # Unknown where the model's test confidence is (a model registered without it): then not judged.
        "confidence_drop": None
        if test_confidence is None
        else float(test_confidence - probabilities.max(axis=1).mean()),
    }
    return figures, counts, per_input


def _reasons(figures: dict[str, float | None], thresholds: dict[str, dict[str, float]]) -> list[str]:
    reasons = []
    for key, value in figures.items():
        if value is None:
            continue  # not measured, so not judged
        low, high = thresholds[key].get("min", -math.inf), thresholds[key].get("max", math.inf)
        if value < low:
            reasons.append(f"{key} is {value:.4g}, below its minimum {low:g}: {_DESCRIPTIONS[key]}.")
        elif value > high:
            reasons.append(f"{key} is {value:.4g}, above its maximum {high:g}: {_DESCRIPTIONS[key]}.")
    return reasons


def drift_report(
    images,
    probabilities,
    *,
    test_confidence: float | None,
    reference: dict | None = None,
    thresholds: dict | None = None,
    min_requests: int = MIN_REQUESTS,
    atypical: int = ATYPICAL,
) -> dict:
    """Judge a window of captured requests against the training split's reference (the official MNIST's unless
    ``reference``, as ``class_stats.load_reference`` gives one, is passed).

    ``images``: (N, 28, 28) raw pixels 0-255 (any integer or float dtype); ``probabilities``: (N, 10), the model's
    answers; ``test_confidence``: the model's mean top-class probability on the held-out test set (None where it is
    not known: ``confidence_drop`` is then None and not judged); ``thresholds``:
    bounds that replace THRESHOLDS' for the figures named (e.g. ``{"class_psi": {"max": 0.2}}``); ``atypical``: how
    many of the most atypical inputs to name.

    Returns a JSON-ready dict: ``requests`` (N), ``min_requests``, ``verdict`` ("drift", "no drift", or "not enough
    data" when N < min_requests: then no figure is computed or judged, ``figures`` and ``reasons`` are empty, and
    ``predicted_counts`` and ``atypical`` are still given), ``figures``
    (the module docstring's six, rounded; None where not measured), ``thresholds`` (the bounds applied, same keys), ``reasons`` (one sentence
    per figure outside its bounds), ``predicted_counts`` (inputs per predicted class) and ``atypical``: the inputs
    least like the reference's mean image of their predicted class, most atypical first, each
    ``{"index", "score", "label", "confidence"}``; the score is 1 - their Pearson correlation (0: exactly the mean
    digit's shape; 1: unrelated; 2: its negative), ties broken by the lower index.

    Bad input (a shape, a dtype, NaN, pixels outside 0-255, probabilities outside 0-1 or rows not summing to 1,
    unknown thresholds) is a ValueError that names it."""
    images = _checked_images(images)
    probabilities = _checked_probabilities(probabilities, len(images))
    if test_confidence is not None:
        if isinstance(test_confidence, bool) or not isinstance(test_confidence, numbers.Real):
            raise ValueError(f"test_confidence: expected a number or None, got {test_confidence!r}")
        if not 0 < test_confidence <= 1:
            raise ValueError(
                f"test_confidence: a mean top-class probability lies within (0, 1], got {test_confidence!r}"
            )
        test_confidence = float(test_confidence)
    min_requests = _whole("min_requests", min_requests, 1)
    atypical = _whole("atypical", atypical, 0)
    bounds = _merged_thresholds(thresholds)
    ref = _reference_arrays(reference)

    n = len(images)
    report = {
        "requests": n,
        "min_requests": min_requests,
        "verdict": "not enough data",
        "figures": {},
        "thresholds": bounds,
        "reasons": [],
        "predicted_counts": [0] * CLASSES,
        "atypical": [],
    }
    if not n:
        return report
    predicted = probabilities.argmax(axis=1)
    figures, counts, per_input = _figures(images, probabilities, predicted, test_confidence, ref)
    scores = 1.0 - per_input
    # Most atypical first; of equal scores the lower index first, so that the same window names the same inputs.
    chosen = np.lexsort((np.arange(n), -scores))[:atypical]
    top = probabilities[chosen, predicted[chosen]]
    report["predicted_counts"] = counts.tolist()
    report["atypical"] = [
        {
            "index": int(i),
            "score": round(float(scores[i]), _DECIMALS),
            "label": int(predicted[i]),
            "confidence": round(float(p), _DECIMALS),
        }
        for i, p in zip(chosen, top, strict=True)
    ]
    if n < min_requests:
        return report
    report["figures"] = {key: None if value is None else round(value, _DECIMALS) for key, value in figures.items()}
    report["reasons"] = _reasons(figures, bounds)
    report["verdict"] = "drift" if report["reasons"] else "no drift"
    return report


def sample_grid_png(
    images, indices, path: str | os.PathLike | None = None, *, scale: int = 3, columns: int = 8
) -> bytes:
    """A PNG of the chosen inputs in a grid (``columns`` wide), each scaled up ``scale`` times (nearest pixel),
    with a 1-pixel grey line around and between them; returns its bytes and, given ``path``, writes them there
    (whole or not at all). Pixels are the raw 0-255 values, rounded."""
    images = _checked_images(images)
    scale, columns = _whole("scale", scale, 1), _whole("columns", columns, 1)
    chosen = np.asarray(indices)
    if chosen.ndim != 1 or not len(chosen):
        raise ValueError(f"indices: expected a non-empty list of image indices, got shape {chosen.shape}")
    if not np.issubdtype(chosen.dtype, np.integer):
        raise ValueError(f"indices: expected whole numbers, got dtype {chosen.dtype}")
    outside = chosen[(chosen < 0) | (chosen >= len(images))]
    if len(outside):
        raise ValueError(f"indices: {int(outside[0])} is not an index of the {len(images)} images")
    from PIL import Image  # only the grid needs it: the report's figures import numpy alone

    tiles = np.rint(images[chosen].astype(np.float64)).astype(np.uint8)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    side = SIDE * scale
    across = min(columns, len(tiles))
    down = -(-len(tiles) // across)
    grid = np.full((down * (side + 1) + 1, across * (side + 1) + 1), 128, dtype=np.uint8)
    for k, tile in enumerate(tiles):
        top, left = 1 + (k // across) * (side + 1), 1 + (k % across) * (side + 1)
        grid[top : top + side, left : left + side] = tile
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    data = buffer.getvalue()
    if path is not None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            temporary.write_bytes(data)
            temporary.replace(path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return data
