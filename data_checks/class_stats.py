"""Statistics per class and split that format checks cannot see: what each digit looks like on average, where its
ink sits, how it slants, how often an image repeats, and whether its labels agree with its pixels.

A dataset is compared with a reference (the same statistics of a dataset known to be sound: the official MNIST's
ship in ``mnist_reference.json``). A shuffled, swapped, mirrored, shifted, dimmed or duplicated copy moves these
numbers far more than the official training and test splits differ from each other.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_checks import SPLITS
from data_checks.image_table import pixel_hashes

OFFICIAL_REFERENCE = Path(__file__).with_name("mnist_reference.json")
CLASSES = range(10)
# Images per chunk when the moments are computed: bounds the float32 copy (10,000 images: 31 MB).
_CHUNK = 10_000
_ROWS = np.arange(28, dtype=np.float64)


def _moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: centre of mass (row, column) and slant, the column shift of the ink per row down
    (mu11 / mu20; a right-leaning digit has a negative slant, a mirrored one the opposite sign)."""
    rows, cols, slants = [], [], []
    for start in range(0, len(images), _CHUNK):
        x = images[start : start + _CHUNK].astype(np.float64)
        mass = np.maximum(x.sum(axis=(1, 2)), 1.0)  # a blank image has its own check; no division by zero here
        by_row, by_col = x.sum(axis=2), x.sum(axis=1)
        row = by_row @ _ROWS / mass
        col = by_col @ _ROWS / mass
        dr = _ROWS[None, :] - row[:, None]
        dc = _ROWS[None, :] - col[:, None]
        mu20 = (by_row * dr**2).sum(axis=1) / mass
        mu11 = np.einsum("nij,ni,nj->n", x, dr, dc) / mass
        rows.append(row)
        cols.append(col)
        slants.append(mu11 / np.maximum(mu20, 1e-6))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(slants)


def _centroid_recall(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class: the share of the odd-indexed images that the nearest class centroid of the even-indexed ones puts
    in their labelled class. Labels reassigned at random pull it down for every class; a consistent swap of two
    classes does not (the mean images catch that)."""
    x = images.reshape(len(images), -1).astype(np.float32) / 255
    fit, score = slice(0, None, 2), slice(1, None, 2)
    fit_x, fit_y, score_x, score_y = x[fit], labels[fit], x[score], labels[score]
    present = np.array([k for k in CLASSES if (fit_y == k).any()])  # a class may be missing from a damaged split
    centroids = np.stack([fit_x[fit_y == k].mean(axis=0) for k in present])
    distances = (centroids**2).sum(axis=1)[None, :] - 2 * score_x @ centroids.T
    predicted = present[distances.argmin(axis=1)]
    return np.array([(predicted[score_y == k] == k).mean() if (score_y == k).any() else 0.0 for k in CLASSES])


def class_statistics(arrays: dict[str, np.ndarray]) -> dict[str, list[dict]]:
    """Per split, one record per class 0..9: its mean image (28x28, rounded to integers), mean intensity, centre of
    mass, mean slant, share of images that repeat an earlier one of the split, and nearest-centroid recall."""
    statistics = {}
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].astype(np.int64)
        row, col, slant = _moments(images)
        hashes = pixel_hashes(images)
        repeat = np.ones(len(hashes), dtype=bool)
        repeat[np.unique(hashes, return_index=True)[1]] = False
        recall = _centroid_recall(images, labels)
        records = []
        for k in CLASSES:
            members = labels == k
            count = int(members.sum())
            mean_image = images[members].mean(axis=0) if count else np.zeros((28, 28))
            records.append(
                {
                    "label": k,
                    "images": count,
                    "mean_image": np.rint(mean_image).astype(int).tolist(),
                    "intensity": round(float(mean_image.mean()), 3),
                    "centre_row": round(float(row[members].mean()), 3) if count else 0.0,
                    "centre_col": round(float(col[members].mean()), 3) if count else 0.0,
                    "slant": round(float(slant[members].mean()), 4) if count else 0.0,
                    "repeat_share": round(float(repeat[members].mean()), 5) if count else 0.0,
                    "centroid_recall": round(float(recall[k]), 4),
                }
            )
        statistics[split] = records
    return statistics


def comparison_table(statistics: dict[str, list[dict]], reference: dict[str, list[dict]]):
    """A pandas DataFrame, one row per split and class, of how far each statistic lies from the reference's:
    mean_image_corr (Pearson, of the two mean images), intensity_ratio, centre_shift (pixels), slant_shift,
    repeat_share and recall_drop (the reference's nearest-centroid recall minus this one)."""
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
                }
            )
    return pd.DataFrame(rows)


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
