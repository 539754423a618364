"""Statistics per class and split that format checks cannot see: what each digit looks like on average, where its
ink sits, how it slants, how often an image repeats, and whether its labels agree with its pixels.

A dataset is compared with a reference (the same statistics of a dataset known to be sound: the official MNIST's
ship in ``mnist_reference.json``). A relabelled, swapped, mirrored, shifted, dimmed or duplicated copy moves these
numbers far more than the official training and test splits differ from each other.

None of them depends on the order of the images: a copy whose images and labels are shuffled together has exactly
the statistics of the original. Every sum of pixels is taken over integers, which float64 holds exactly below 2**53
(a class's summed pixels times a pixel, over 784 pixels, stays below that up to ~10**8 images of a class), so no
summation order can change it; means of per-image figures use ``math.fsum``, which is exactly rounded; and nothing
is picked by position.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from data_checks import SPLITS
from data_checks.image_table import pixel_hashes

OFFICIAL_REFERENCE = Path(__file__).with_name("mnist_reference.json")
CLASSES = range(10)
# Images per chunk when moments and distances are computed: bounds the float64 copy (10,000 images: 63 MB).
_CHUNK = 10_000
_ROWS = np.arange(28, dtype=np.float64)
# A class's nearest-centroid recall may fall this far below the reference's: between the official training and test
# splits it differs by 0.035 at most; a 20% share of a split's labels reassigned at random drops it by 0.11 or more in
# every class of the split (a 10% share by 0.05-0.1).
RECALL_DROP_MAX = 0.1
# In a class too small to measure a share to within that, it may fall by this many standard errors of the difference
# of two shares (at most 0.5 * sqrt(1/n + 1/n_reference)): in a class of ten images, one or two images that change
# move the recall by 0.1 or 0.2 by chance alone. A class of 450 images or more, here and in the reference (every one
# of the official MNIST's), is held to RECALL_DROP_MAX.
RECALL_CHANCE_ERRORS = 3


def _moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: centre of mass (row, column) and slant, the column shift of the ink per row down
    (mu11 / mu20; a right-leaning digit has a negative slant, a mirrored one the opposite sign).

    They come from the raw moments (sums of pixel times row and column powers: integers, so exact), each image's
    figure one division of exact integers: the same bits wherever the image sits in the split."""
    rows, cols, slants = [], [], []
    for start in range(0, len(images), _CHUNK):
        x = images[start : start + _CHUNK].astype(np.float64)
        by_row, by_col = x.sum(axis=2), x.sum(axis=1)
        m00 = by_row.sum(axis=1)
        m10, m01, m20 = by_row @ _ROWS, by_col @ _ROWS, by_row @ _ROWS**2
        m11 = (x @ _ROWS) @ _ROWS
        mass = np.maximum(m00, 1.0)  # a blank image has its own check; no division by zero here
        # mu11 / mu20 = (m11 m00 - m10 m01) / (m20 m00 - m10^2); the denominator is 0 only when all ink is on one
        # row, and then so is the numerator: no slant.
        spread, shear = m20 * m00 - m10**2, m11 * m00 - m10 * m01
        rows.append(m10 / mass)
        cols.append(m01 / mass)
        slants.append(np.divide(shear, spread, out=np.zeros_like(shear), where=spread > 0))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(slants)


def _class_sums(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class: the sum of its images (10 x 784, exact integers as float64) and its number of images."""
    flat = images.reshape(len(images), -1)
    counts = np.array([np.count_nonzero(labels == k) for k in CLASSES])
    sums = np.stack([flat[labels == k].sum(axis=0, dtype=np.int64) for k in CLASSES]).astype(np.float64)
    return sums, counts


def _centroid_recall(images: np.ndarray, labels: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per class: the share of its images that the nearest class centroid puts in their labelled class, each image
    left out of its own class's centroid (leave-one-out: every image is scored, none by a centroid it is part of, and
    no split by position, whose figure would move with the order). Labels reassigned at random pull it down for
    every class; a consistent swap of two classes does not (the mean images catch that).

    Distances are compared less the image's own squared norm, which all classes share: to centroid S_k / n_k that
    leaves |S_k|^2 / n_k^2 - 2 x.S_k / n_k, and to its own class without it (S_y - x) / (n_y - 1). The dot products
    and norms are exact integers, so each image's prediction is the same bits in any order."""
    norms = (sums**2).sum(axis=1)  # of the class sums alone, so the same in any order (and exact here: 2.3e15 at most)
    present = counts > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        to_others = np.where(present, norms / counts.astype(np.float64) ** 2, np.inf)
    hits = np.zeros(len(CLASSES), dtype=np.int64)
    for start in range(0, len(images), _CHUNK):
        y = labels[start : start + _CHUNK]
        in_class = (y >= 0) & (y < len(CLASSES))  # a label out of range is the format checks' to name
        x, y = images[start : start + _CHUNK][in_class].reshape(-1, sums.shape[1]).astype(np.float64), y[in_class]
        dots = x @ sums.T
        with np.errstate(divide="ignore", invalid="ignore"):
            distances = to_others - 2 * dots / np.where(present, counts, 1)
            own_dot, own_norm, others = dots[np.arange(len(y)), y], (x * x).sum(axis=1), counts[y] - 1.0
            # A class of one image has no centroid without it: that image cannot be recalled.
            own = np.where(
                others > 0,
                (norms[y] - 2 * own_dot + own_norm) / others**2 - 2 * (own_dot - own_norm) / others,
                np.inf,
            )
        distances[np.arange(len(y)), y] = own
        hits += np.bincount(y[distances.argmin(axis=1) == y], minlength=len(CLASSES))[: len(CLASSES)]
    return np.where(present, hits / np.maximum(counts, 1), 0.0)


def _repeats(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per image: whether it repeats another image of the split. Of identical images, the one with the smallest
    label is the original and the rest repeats, so that which class a repeat counts against does not depend on
    which copy comes first."""
    hashes = pixel_hashes(images)
    order = np.lexsort((labels, hashes))
    repeat = np.zeros(len(hashes), dtype=bool)
    repeat[order[1:]] = hashes[order[1:]] == hashes[order[:-1]]
    return repeat


def _mean(values: np.ndarray) -> float:
    """The mean of per-image figures, exactly rounded (math.fsum): the same in any order."""
    return math.fsum(values.tolist()) / len(values)


def class_statistics(arrays: dict[str, np.ndarray]) -> dict[str, list[dict]]:
    """Per split, one record per class 0..9: its mean image (28x28, rounded to integers), mean intensity, centre of
    mass, mean slant, share of images that repeat another of the split, and nearest-centroid recall."""
    statistics = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].astype(np.int64)
        row, col, slant = _moments(images)
        repeat = _repeats(images, labels)
        sums, counts = _class_sums(images, labels)
        recall = _centroid_recall(images, labels, sums, counts)
        records = []
        for k in CLASSES:
            members = labels == k
            count = int(counts[k])
            mean_image = (sums[k] / count).reshape(28, 28) if count else np.zeros((28, 28))
            records.append(
                {
                    "label": k,
                    "images": count,
                    "mean_image": np.rint(mean_image).astype(int).tolist(),
                    "intensity": round(float(mean_image.mean()), 3),
                    "centre_row": round(_mean(row[members]), 3) if count else 0.0,
                    "centre_col": round(_mean(col[members]), 3) if count else 0.0,
                    "slant": round(_mean(slant[members]), 4) if count else 0.0,
                    "repeat_share": round(float(repeat[members].mean()), 5) if count else 0.0,
                    "centroid_recall": round(float(recall[k]), 4),
                }
            )
        statistics[split] = records
    return statistics


def comparison_table(statistics: dict[str, list[dict]], reference: dict[str, list[dict]]):
    """A pandas DataFrame, one row per split and class, of how far each statistic lies from the reference's:
    mean_image_corr (Pearson, of the two mean images), intensity_ratio, centre_shift (pixels), slant_shift,
    repeat_share, recall_drop (the reference's nearest-centroid recall minus this one) and recall_allowed (how far it
    may drop: RECALL_DROP_MAX, or more for a class too small to measure it to that)."""
    import pandas as pd

    rows = []
    for split in SPLITS:
        for ours, theirs in zip(statistics[split], reference[split], strict=True):
            a = np.asarray(ours["mean_image"], dtype=np.float64).ravel()
            b = np.asarray(theirs["mean_image"], dtype=np.float64).ravel()
            corr = float(np.corrcoef(a, b)[0, 1]) if a.std() and b.std() else 0.0
            shift = (ours["centre_row"] - theirs["centre_row"], ours["centre_col"] - theirs["centre_col"])
            rows.append(
                {
                    "split": split,
                    "label": ours["label"],
                    "mean_image_corr": round(corr, 4),
                    "intensity_ratio": round(ours["intensity"] / theirs["intensity"], 4)
                    if theirs["intensity"]
                    else 0.0,
                    "centre_shift": round(float(np.hypot(*shift)), 3),
                    "slant_shift": round(abs(ours["slant"] - theirs["slant"]), 4),
                    "repeat_share": ours["repeat_share"],
                    "recall_drop": round(theirs["centroid_recall"] - ours["centroid_recall"], 4),
                    "recall_allowed": round(_recall_allowed(ours["images"], theirs["images"]), 4),
                }
            )
    return pd.DataFrame(rows)


def _recall_allowed(images: int, reference_images: int) -> float:
    """How far a class's recall may fall below the reference's: RECALL_DROP_MAX, or RECALL_CHANCE_ERRORS standard
    errors of the difference of two shares measured on these numbers of images where that is more."""
    if not images or not reference_images:
        return RECALL_DROP_MAX  # a missing class has its own check
    return max(RECALL_DROP_MAX, RECALL_CHANCE_ERRORS * 0.5 * math.sqrt(1 / images + 1 / reference_images))


def load_reference(path: str | Path | None = None) -> dict[str, list[dict]]:
    """A reference written by ``write_reference`` (the official MNIST's by default); an unreadable or malformed one
    is an error that names the file."""
    path = Path(path) if path else OFFICIAL_REFERENCE
    try:
        reference = json.loads(path.read_text())
        classes = reference["classes"]
        if [len(classes[split]) for split in SPLITS] != [10, 10]:
            raise ValueError("expected 10 classes per split")
        return classes
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"MNIST reference statistics {path}: {type(error).__name__}: {error}") from error


def write_reference(arrays: dict[str, np.ndarray], path: str | Path, source: dict | str) -> Path:
    """Write the class statistics of a dataset known to be sound, as the reference later datasets are held to."""
    path = Path(path)
    document = {"source": source, "classes": class_statistics(arrays)}
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(document, separators=(",", ":")) + "\n")
    temporary.replace(path)
    return path
