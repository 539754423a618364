"""The drift statistics of captured endpoint inputs (data_checks/drift.py), on the official MNIST test digits.

The image figures are proven on real digits, clean and damaged. The probabilities beside them are constructed:
each digit's true label gets 0.98 and the other nine share the rest, as a model that is right and sure would
answer. A trained model's answers would move the class and confidence figures too and so blur which figure sees
which damage (bench/bench_drift.py measures them all with seed_cnn trained on the official set); here the class
distribution and confidence figures are proven with probabilities constructed for that purpose.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from data_checks.drift import MIN_REQUESTS, THRESHOLDS, drift_report, sample_grid_png
from training.mnist_idx import IMAGES_MAGIC, LABELS_MAGIC, MNIST_FILES, read_idx

SURE = 0.98  # the constructed answers' top-class probability, and so the test confidence they are held to


@pytest.fixture(scope="module")
def digits(real_mnist) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(real_mnist / MNIST_FILES["test_images"], IMAGES_MAGIC)
    labels = read_idx(real_mnist / MNIST_FILES["test_labels"], LABELS_MAGIC).astype(np.int64)
    return images, labels


def answers(labels: np.ndarray, top: float = SURE) -> np.ndarray:
    probabilities = np.full((len(labels), 10), (1 - top) / 9)
    probabilities[np.arange(len(labels)), labels] = top
    return probabilities


def window(digits, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = digits
    chosen = np.random.default_rng(seed).choice(len(images), size, replace=False)
    return images[chosen], labels[chosen]


def flagged(report: dict) -> set[str]:
    """The figures a report's reasons name (each reason starts with its figure's key)."""
    return {reason.split(" ", 1)[0] for reason in report["reasons"]}


def rotated(images: np.ndarray, degrees: float) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(x).rotate(degrees, resample=Image.BILINEAR)) for x in images])


def shifted(images: np.ndarray, down: int, right: int) -> np.ndarray:
    out = np.zeros_like(images)
    out[:, down:, right:] = images[:, : 28 - down, : 28 - right]
    return out


def filtered(images: np.ndarray, reduce, size: int) -> np.ndarray:
    """A size x size maximum (dilation) or minimum (erosion) filter, zeros beyond the frame."""
    padded = np.pad(images, ((0, 0), (size // 2, (size - 1) // 2), (size // 2, (size - 1) // 2)))
    return reduce(np.stack([padded[:, i : i + 28, j : j + 28] for i in range(size) for j in range(size)]), axis=0)


@pytest.mark.real_data
@pytest.mark.parametrize("size", [MIN_REQUESTS, 1000])
def test_clean_random_windows_are_not_drift(digits, size):
    for seed in range(4):
        images, labels = window(digits, size, seed)
        report = drift_report(images, answers(labels), test_confidence=SURE)
        assert report["verdict"] == "no drift", report["reasons"]
        assert report["requests"] == size and report["reasons"] == []
        assert set(report["figures"]) == set(report["thresholds"]) == set(THRESHOLDS)
        assert sum(report["predicted_counts"]) == size


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("damage", "figures"),
    [
        ("inverted", {"mean_image_corr", "intensity_ratio"}),
        ("rotated_30", {"mean_image_corr", "slant_shift"}),
        ("rotated_45", {"mean_image_corr", "slant_shift"}),
        ("shifted_down_5", {"mean_image_corr", "centre_shift"}),
        ("shifted_right_6", {"mean_image_corr", "centre_shift"}),
        ("dilated_3x3", {"intensity_ratio"}),
        ("eroded_2x2", {"intensity_ratio"}),
        ("dimmed_60pct", {"intensity_ratio"}),
        ("mirrored", {"mean_image_corr", "centre_shift"}),
    ],
)
def test_damaged_digits_are_drift_named_by_their_figure(digits, damage, figures):
    damages = {
        "inverted": lambda x: 255 - x,
        "rotated_30": lambda x: rotated(x, 30),
        "rotated_45": lambda x: rotated(x, -45),
        "shifted_down_5": lambda x: shifted(x, 5, 0),
        "shifted_right_6": lambda x: shifted(x, 0, 6),
        "dilated_3x3": lambda x: filtered(x, np.max, 3),
        "eroded_2x2": lambda x: filtered(x, np.min, 2),
        "dimmed_60pct": lambda x: np.rint(x * 0.6).astype(np.uint8),
        "mirrored": lambda x: x[:, :, ::-1],
    }
    images, labels = window(digits, MIN_REQUESTS, seed=11)
    clean = drift_report(images, answers(labels), test_confidence=SURE)
    report = drift_report(damages[damage](images), answers(labels), test_confidence=SURE)
    assert clean["verdict"] == "no drift", clean["reasons"]
    assert report["verdict"] == "drift"
    # The answers are the clean ones: the damage alone moves the image figures, and only those.
    assert figures <= flagged(report) <= {"mean_image_corr", "intensity_ratio", "centre_shift", "slant_shift"}, report


@pytest.mark.real_data
def test_a_window_of_ones_and_sevens_is_named_by_the_class_distribution_alone(digits):
    images, labels = digits
    kept = np.flatnonzero(np.isin(labels, (1, 7)))[:1000]
    report = drift_report(images[kept], answers(labels[kept]), test_confidence=SURE)
    assert report["verdict"] == "drift"
    # The image figures hold the window to the reference's ones and sevens: thin upright ones are not drift of the
    # images.
    assert flagged(report) == {"class_psi"}, report["reasons"]
    assert report["predicted_counts"][1] + report["predicted_counts"][7] == 1000


@pytest.mark.real_data
def test_a_less_sure_model_is_named_by_the_confidence_drop(digits):
    images, labels = window(digits, MIN_REQUESTS, seed=3)
    report = drift_report(images, answers(labels, top=0.85), test_confidence=SURE)
    assert flagged(report) == {"confidence_drop"} and report["figures"]["confidence_drop"] == pytest.approx(0.13)
    # Within its bound it is not drift; an override moves the bound.
    sure = drift_report(images, answers(labels, top=0.97), test_confidence=SURE)
    assert sure["verdict"] == "no drift"
    strict = drift_report(
        images, answers(labels, top=0.97), test_confidence=SURE, thresholds={"confidence_drop": {"max": 0.005}}
    )
    assert flagged(strict) == {"confidence_drop"} and strict["thresholds"]["confidence_drop"] == {"max": 0.005}
    assert strict["thresholds"]["class_psi"] == THRESHOLDS["class_psi"]
    # A model whose test confidence is not known: every other figure is judged, the confidence is not.
    unknown = drift_report(images, answers(labels, top=0.85), test_confidence=None)
    assert unknown["verdict"] == "no drift" and unknown["figures"]["confidence_drop"] is None
    assert {k: v for k, v in unknown["figures"].items() if k != "confidence_drop"} == {
        k: v for k, v in report["figures"].items() if k != "confidence_drop"
    }


@pytest.mark.real_data
def test_too_few_requests_are_not_judged(digits):
    images, labels = window(digits, MIN_REQUESTS - 1, seed=4)
    report = drift_report(255 - images, answers(labels), test_confidence=SURE)  # inverted: drift, were it judged
    assert report["verdict"] == "not enough data"
    assert report["figures"] == {} and report["reasons"] == [] and report["requests"] == MIN_REQUESTS - 1
    assert drift_report(images, answers(labels), test_confidence=SURE, min_requests=100)["verdict"] == "no drift"
    empty = drift_report(np.zeros((0, 28, 28)), np.zeros((0, 10)), test_confidence=SURE)
    assert empty["verdict"] == "not enough data" and empty["atypical"] == []


@pytest.mark.real_data
def test_the_most_atypical_inputs_are_named(digits):
    images, labels = window(digits, 1000, seed=5)
    images = images.copy()
    planted = [17, 400, 901]
    images[planted] = 255 - images[planted]
    report = drift_report(images, answers(labels), test_confidence=SURE, atypical=5)
    indices = [entry["index"] for entry in report["atypical"]]
    assert len(indices) == 5 and set(indices[:3]) == set(planted)
    scores = [entry["score"] for entry in report["atypical"]]
    assert scores == sorted(scores, reverse=True) and scores[2] > 1.5  # an inverted digit is its class's negative
    assert report["atypical"][0]["label"] == labels[indices[0]] and report["atypical"][0]["confidence"] == SURE


@pytest.mark.real_data
def test_the_same_window_gives_the_same_report(digits):
    images, labels = window(digits, 1000, seed=6)
    first = drift_report(images, answers(labels), test_confidence=SURE)
    assert drift_report(images.copy(), answers(labels), test_confidence=SURE) == first
    # Pixels as floats are the same pixels.
    assert drift_report(images.astype(np.float32), answers(labels), test_confidence=SURE) == first


def _valid(n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 28, 28), dtype=np.uint8), np.full((n, 10), 0.1)


def _with(array: np.ndarray, index, value) -> np.ndarray:
    array = array.astype(np.float64)
    array[index] = value
    return array


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"images": np.zeros((3, 784))}, r"images: expected shape \(N, 28, 28\), got \(3, 784\)"),
        ({"images": np.zeros((3, 28, 27))}, r"images: expected shape .* got \(3, 28, 27\)"),
        ({"images": np.full((3, 28, 28), "0")}, "images: expected raw pixels as numbers"),
        ({"images": _with(_valid()[0], (1, 2, 3), np.nan)}, r"images: 1 pixels are not finite .* image 1"),
        ({"images": _with(_valid()[0], (2, 0, 0), 256)}, "images: expected raw pixels within 0-255, found 0 to 256"),
        ({"probabilities": np.full((3, 9), 1 / 9)}, r"probabilities: expected shape \(N, 10\), got \(3, 9\)"),
        ({"probabilities": np.full((4, 10), 0.1)}, "probabilities: 4 rows for 3 images"),
        ({"probabilities": _with(_valid()[1], (2, 5), np.nan)}, r"probabilities: 1 are not finite .* row 2"),
        ({"probabilities": _with(_valid()[1], (1, 0), -0.1)}, "probabilities: each must lie within 0-1; row 1"),
        (
            {"probabilities": _with(_valid()[1], (0, 0), 0.5)},
            "probabilities: each row must sum to 1; row 0 sums to 1.4",
        ),
        ({"test_confidence": 0.0}, r"test_confidence: .* within \(0, 1\], got 0.0"),
        ({"test_confidence": float("nan")}, "test_confidence"),
        ({"test_confidence": "0.9"}, "test_confidence: expected a number or None"),
        ({"min_requests": 0}, "min_requests: expected a whole number >= 1, got 0"),
        ({"atypical": 2.5}, "atypical: expected a whole number >= 0, got 2.5"),
        ({"thresholds": {"psi": {"max": 0.2}}}, "thresholds: unknown figure 'psi'; the figures are mean_image_corr"),
        ({"thresholds": {"class_psi": {"min": 0.2}}}, "thresholds\\['class_psi'\\]: unknown bound 'min'"),
        ({"thresholds": {"class_psi": 0.2}}, "thresholds\\['class_psi'\\]: expected bounds like"),
        ({"thresholds": {"class_psi": {"max": float("inf")}}}, "expected a finite number, got inf"),
        ({"thresholds": {"intensity_ratio": {"min": 2.0, "max": 1.5}}}, "min 2.0 is above max 1.5"),
        ({"reference": {"test": []}}, "reference: its 'train' split is not class statistics"),
    ],
)
def test_bad_input_is_an_error_that_names_it(arguments, message):
    images, probabilities = _valid()
    call = {"images": images, "probabilities": probabilities, "test_confidence": SURE} | arguments
    with pytest.raises(ValueError, match=message):
        drift_report(call.pop("images"), call.pop("probabilities"), **call)


@pytest.mark.real_data
def test_sample_grid_shows_the_chosen_inputs_scaled_up(digits, tmp_path):
    from PIL import Image

    images = digits[0][:20]
    chosen = [4, 0, 19, 7, 3]
    path = tmp_path / "samples.png"
    data = sample_grid_png(images, chosen, path, scale=3, columns=4)
    assert path.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == ["samples.png"]
    grid = np.asarray(Image.open(io.BytesIO(data)))
    side = 28 * 3
    assert grid.shape == (2 * (side + 1) + 1, 4 * (side + 1) + 1)
    for k, index in enumerate(chosen):
        top, left = 1 + (k // 4) * (side + 1), 1 + (k % 4) * (side + 1)
        tile = grid[top : top + side, left : left + side]
        assert (tile == images[index].repeat(3, axis=0).repeat(3, axis=1)).all()
    assert (grid[0] == 128).all() and (grid[:, side + 1] == 128).all()  # the separators
    with pytest.raises(ValueError, match="indices: 20 is not an index of the 20 images"):
        sample_grid_png(images, [1, 20], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="indices: expected a non-empty list"):
        sample_grid_png(images, [], tmp_path / "bad.png")
    assert [p.name for p in tmp_path.iterdir()] == ["samples.png"]  # nothing written for bad input


def test_the_forms_smallest_window_is_the_one_the_thresholds_were_set_for():
    """The drift check's form (tasks.policy, light for the DAG's parse) and this module name the same smallest
    window."""
    from data_checks import drift
    from tasks import policy as check

    assert check.DEFAULT_MIN_REQUESTS == check.MIN_REQUESTS_BOUNDS[0] == drift.MIN_REQUESTS
