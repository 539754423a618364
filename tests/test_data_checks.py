"""The MNIST expectation suite: sound data passes, and each kind of damage is rejected with a line that names it."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from cli.main import main
from data_checks import SPLITS
from data_checks.class_stats import class_statistics, load_reference
from data_checks.image_table import image_table
from data_checks.mnist_suite import DataValidationError, validate_arrays, validate_mnist
from training.mnist_idx import MNIST_FILES, load_mnist, write_idx

SMALL = (600, 100)


def damaged_copy(source, destination, damage):
    """Write the four files of ``source`` into ``destination`` after ``damage(arrays)`` edits the arrays."""
    arrays = {role: array.copy() for role, array in load_mnist(source).items()}
    damage(arrays)
    destination.mkdir(parents=True, exist_ok=True)
    for role, name in MNIST_FILES.items():
        write_idx(destination / name, arrays[role])
    return destination


def test_small_set_passes_and_writes_the_report(small_mnist, small_reference, tmp_path):
    summary = validate_mnist(small_mnist, tmp_path / "report", SMALL, small_reference)
    assert summary["success"] and summary["failures"] == []
    assert summary["counts"] == {"train": 600, "test": 100}
    result = json.loads((tmp_path / "report" / "validation_result.json").read_text())
    assert result["success"] is True
    assert [suite["success"] for suite in result["results"]] == [True, True], "per image, then per class"
    assert sum(len(suite["results"]) for suite in result["results"]) == summary["expectations"] == 21
    index = (tmp_path / "report" / "index.html").read_text()
    assert "mnist" in index
    assert list((tmp_path / "report" / "validations").rglob("*.html")), "Data Docs hold the validation page"


def _bad_labels(a):
    a["train_labels"][[3, 7]] = 12


def _blank(a):
    a["train_images"][[0, 5]] = 0


def _leak(a):
    """Two test images replaced by training images of their own digits."""
    for test in (2, 9):
        a["test_images"][test] = a["train_images"][np.flatnonzero(a["train_labels"] == a["test_labels"][test])[0]]


def _collapse(a):
    a["train_labels"][a["train_labels"] == 3] = 5


def _invert(a):
    a["test_images"][:] = 255 - a["test_images"]


def _drop_train_images(a):
    a["train_images"] = a["train_images"][:590]
    a["train_labels"] = a["train_labels"][:590]


@pytest.mark.parametrize(
    ("damage", "expected_lines"),
    [
        (_bad_labels, [r"labels are 0\.\.9: 2 of 700 images fail \(e\.g\. train #3 \(label 12\): 12"]),
        (_blank, [r"no blank images \(10\+ ink pixels\): 2 of 700 images fail \(e\.g\. train #0 \(label \d\): 0"]),
        (_leak, [r"no train/test leakage: .*: 2 of 700 images fail \(e\.g\. test #2 \(label \d\): True"]),
        (
            _collapse,
            [r"each class is 7%\.\.13% of its split: \d+ of 700 images fail", r"train: all 10 classes: observed"],
        ),
        (
            _invert,
            [r"the border is dark \(inverted images fail\): 100 of 700", r"image mean intensity in band: 100 of"],
        ),
        (_drop_train_images, [r"train: 600 images: observed 590"]),
    ],
    ids=["bad-labels", "blank-images", "leakage", "collapsed-class", "inverted", "mismatched-counts"],
)
def test_damage_is_rejected_with_one_line_per_failure(small_mnist, small_reference, tmp_path, damage, expected_lines):
    directory = damaged_copy(small_mnist, tmp_path / "damaged", damage)
    with pytest.raises(DataValidationError) as caught:
        validate_mnist(directory, expected_counts=SMALL, reference=small_reference)
    message = str(caught.value)
    for line in expected_lines:
        assert any(re.search(line, text) for text in message.splitlines()), (line, message)


def test_only_the_damaged_expectations_fail(small_mnist, small_reference, tmp_path):
    directory = damaged_copy(small_mnist, tmp_path / "damaged", _leak)
    with pytest.raises(DataValidationError, match=r"failed 1 of 21 expectations:\n  no train/test leakage"):
        validate_mnist(directory, expected_counts=SMALL, reference=small_reference)


def _duplicate(a):
    """Two images in five replaced by copies of others, labels and all."""
    rng = np.random.default_rng(3)
    n = len(a["train_images"])
    target, source = rng.choice(n, n * 2 // 5, replace=False), rng.choice(n, n * 2 // 5)
    a["train_images"][target], a["train_labels"][target] = a["train_images"][source], a["train_labels"][source]


def _reassign_labels(a):
    a["train_labels"][:] = np.random.default_rng(4).integers(0, 10, len(a["train_labels"]))


def _swap_classes(a):
    """Every 2 labelled 5 and every 5 labelled 2: each class keeps its share and its labels stay consistent."""
    labels = a["test_labels"]
    twos, fives = labels == 2, labels == 5
    labels[twos], labels[fives] = 5, 2


def _shift(a):
    a["train_images"][:] = np.roll(a["train_images"], (1, -2), axis=(1, 2))  # a row up, two columns left


def _dim(a):
    a["test_images"][:] = (a["test_images"] * 0.6).astype(np.uint8)


@pytest.mark.parametrize(
    ("damage", "expected_line"),
    [
        (
            _duplicate,
            r"at most 1% of each class's images repeat another of its split: 10 of 20 classes fail "
            r"\(e\.g\. train class 0: 0\.\d+",
        ),
        (_reassign_labels, r"labels agree with pixels .*: \d+ of 20 classes fail \(e\.g\. train class"),
        (
            _swap_classes,
            r"each class looks like its reference digit .*: 2 of 20 classes fail "
            r"\(e\.g\. test class 2: 0\.\d+, test class 5: 0\.\d+\)",
        ),
        (
            _shift,
            r"centre of mass is within 1\.0 px of the reference's: 10 of 20 classes fail \(e\.g\. train class 0: 2\.\d+",
        ),
        (
            _dim,
            r"mean intensity is 0\.85\.\.1\.15 of the reference's: 10 of 20 classes fail \(e\.g\. test class 0: 0\.59",
        ),
    ],
    ids=["duplicated-images", "labels-reassigned", "classes-swapped", "shifted", "dimmed"],
)
def test_statistical_damage_is_rejected(small_mnist, small_reference, tmp_path, damage, expected_line):
    """Damage that every image's own format checks pass: it shows in each class's statistics against the reference."""
    directory = damaged_copy(small_mnist, tmp_path / "damaged", damage)
    with pytest.raises(DataValidationError) as caught:
        validate_mnist(directory, expected_counts=SMALL, reference=small_reference)
    message = str(caught.value)
    assert any(re.search(expected_line, line) for line in message.splitlines()), message


def _shuffled(arrays, seed):
    """Each split's images and labels permuted together: the same examples, in another order."""
    rng = np.random.default_rng(seed)
    shuffled = {}
    for split in SPLITS:
        order = rng.permutation(len(arrays[f"{split}_labels"]))
        for role in (f"{split}_images", f"{split}_labels"):
            shuffled[role] = arrays[role][order]
    return shuffled


def test_a_shuffled_set_has_the_same_statistics_and_passes(small_mnist, small_reference, tmp_path):
    """No check depends on the order of the examples: shuffled together, images and labels give the same rows per
    image (in another order) and exactly the same class statistics, and the copy passes."""
    arrays = load_mnist(small_mnist)
    shuffled = _shuffled(arrays, seed=11)
    assert not np.array_equal(shuffled["train_labels"], arrays["train_labels"]), "the order did change"
    assert class_statistics(shuffled) == class_statistics(arrays)

    def by_image(table):
        return table.drop(columns="index").sort_values(["split", "pixel_hash"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(by_image(image_table(shuffled)), by_image(image_table(arrays)))
    directory = damaged_copy(small_mnist, tmp_path / "shuffled", lambda a: a.update(_shuffled(a, seed=11)))
    assert validate_mnist(directory, expected_counts=SMALL, reference=small_reference)["success"]


def test_a_repeat_counts_against_the_same_class_whichever_copy_comes_first(small_mnist):
    """An image that appears twice, labelled 3 and 7, is one repeat of the 7s (the larger label), in either order."""
    arrays = load_mnist(small_mnist)
    images, labels = arrays["train_images"].copy(), arrays["train_labels"]
    three, seven = np.flatnonzero(labels == 3)[0], np.flatnonzero(labels == 7)[0]
    images[seven] = images[three]
    for order in (np.arange(len(labels)), np.arange(len(labels))[::-1]):
        split = {"train_images": images[order], "train_labels": labels[order]}
        statistics = class_statistics({**arrays, **split})["train"]
        shares = [record["repeat_share"] for record in statistics if record["label"] in (3, 7)]
        assert shares == [0.0, round(1 / np.count_nonzero(labels == 7), 5)]


def test_a_missing_or_malformed_reference_is_named(small_mnist, tmp_path):
    (tmp_path / "bad.json").write_text('{"classes": {"train": []}}')
    for reference, problem in ((tmp_path / "absent.json", "FileNotFoundError"), (tmp_path / "bad.json", "KeyError")):
        with pytest.raises(DataValidationError, match=f"MNIST reference statistics {reference}: {problem}"):
            validate_mnist(small_mnist, expected_counts=SMALL, reference=reference)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated-gzip", r"train-images-idx3-ubyte\.gz: not a complete gzip stream"),
        ("truncated-body", r"t10k-images-idx3-ubyte\.gz: header declares shape \(100, 28, 28\)"),
        ("wrong-magic", r"train-labels-idx1-ubyte\.gz: magic number 0x00000803, expected 0x00000801"),
        ("labels-disagree", r"100 images but .*t10k-labels-idx1-ubyte\.gz has 99 labels"),
    ],
)
def test_malformed_files_fail_before_any_expectation(small_mnist, small_reference, tmp_path, damage, message):
    directory = tmp_path / "damaged"
    shutil.copytree(small_mnist, directory)
    if damage == "truncated-gzip":
        path = directory / MNIST_FILES["train_images"]
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "truncated-body":
        path = directory / MNIST_FILES["test_images"]
        path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    elif damage == "wrong-magic":
        write_idx(directory / MNIST_FILES["train_labels"], np.zeros((600, 28, 28), np.uint8))
    else:
        labels = load_mnist(small_mnist)["test_labels"]
        write_idx(directory / MNIST_FILES["test_labels"], labels[:-1])
    with pytest.raises(DataValidationError, match=f"malformed MNIST file: .*{message}"):
        validate_mnist(directory, tmp_path / "report", SMALL, small_reference)
    assert not (tmp_path / "report").exists(), "no expectation ran"


def test_cli_exit_status(small_mnist, tmp_path, capsys, monkeypatch):
    reference = tmp_path / "reference.json"
    assert main(["data", "reference", str(small_mnist), str(reference)]) == 0
    assert (
        json.loads(reference.read_text())["source"][MNIST_FILES["train_images"]]
        == hashlib.md5((small_mnist / MNIST_FILES["train_images"]).read_bytes()).hexdigest()
    )
    counts = ["--expect-train", "600", "--expect-test", "100", "--reference", str(reference)]
    assert main(["data", "validate", str(small_mnist), "--report", str(tmp_path / "r"), *counts]) == 0
    assert "passed 21 expectations (600 train / 100 test images)" in capsys.readouterr().out
    assert (tmp_path / "r" / "index.html").is_file()

    damaged = damaged_copy(small_mnist, tmp_path / "damaged", _leak)
    assert main(["data", "validate", str(damaged), "--report", str(tmp_path / "failed"), *counts]) == 1
    assert "no train/test leakage" in capsys.readouterr().err
    result = json.loads((tmp_path / "failed" / "validation_result.json").read_text())
    assert result["success"] is False, "the report is written on failure too"
    # The configured counts and reference (the official MNIST's) apply when no flag is given.
    monkeypatch.setenv("MNIST_PIPELINE_MNIST_EXPECTED_COUNTS", "60000,10000")
    assert main(["data", "validate", str(small_mnist)]) == 1
    error = capsys.readouterr().err
    assert "train: 60000 images: observed 600" in error
    assert "each class looks like its reference digit" in error, "seven-segment digits are not MNIST's"


@pytest.mark.real_data
def test_official_mnist_passes(real_mnist, tmp_path):
    summary = validate_mnist(real_mnist, report_dir=tmp_path / "report", expected_counts=(60000, 10000))
    assert summary["counts"] == {"train": 60000, "test": 10000} and summary["success"]


@pytest.mark.real_data
def test_damaged_official_test_split_names_every_problem(real_mnist, tmp_path):
    def damage(a):
        a["test_images"][[0, 1]] = 0
        a["test_images"][[2, 3]] = 255 - a["test_images"][[2, 3]]
        a["test_images"][[4, 5]] = a["train_images"][[100, 200]]
        a["test_labels"][6] = 10

    directory = tmp_path / "damaged"
    directory.mkdir()
    # Only the test split is rewritten (fast); the training files are the official ones.
    for role in ("train_images", "train_labels"):
        (directory / MNIST_FILES[role]).symlink_to(real_mnist / MNIST_FILES[role])
    arrays = {role: array.copy() for role, array in load_mnist(real_mnist).items()}
    damage(arrays)
    for role in ("test_images", "test_labels"):
        write_idx(directory / MNIST_FILES[role], arrays[role])
    with pytest.raises(DataValidationError) as caught:
        validate_mnist(directory, expected_counts=(60000, 10000))
    message = str(caught.value)
    for problem in ("labels are 0..9", "no blank images", "the border is dark", "no train/test leakage"):
        assert problem in message


@pytest.mark.real_data
def test_shuffled_official_set_passes(real_mnist):
    """The official set with its images and labels shuffled together has exactly the official statistics (the shipped
    reference) and passes (the label probe once scored odd positions, and failed train class 8 of such a copy)."""
    shuffled = _shuffled(load_mnist(real_mnist), seed=23)
    assert class_statistics(shuffled) == load_reference()
    assert validate_arrays(shuffled, None, (60000, 10000), load_reference(), "official MNIST, shuffled")["success"]


@pytest.mark.real_data
@pytest.mark.parametrize(
    ("damage", "problems"),
    [
        # Three in ten training labels reassigned at random: every class keeps its share of the split, and every
        # training class fails the label probe.
        ("relabel", [r"labels agree with pixels .*: 10 of 20 classes fail \(e\.g\. train class"]),
        # The test digits mirrored: every format check passes, and no image repeats.
        ("mirror", ["each class slants as the reference's", "each class looks like its reference digit"]),
        ("duplicate", ["of each class's images repeat another of its split"]),
    ],
)
def test_statistical_damage_to_the_official_set_is_rejected(real_mnist, damage, problems):
    from data_checks.class_stats import load_reference
    from data_checks.mnist_suite import validate_arrays

    arrays = {role: array.copy() for role, array in load_mnist(real_mnist).items()}
    rng = np.random.default_rng(5)
    picked = rng.choice(60000, 18000, replace=False)
    if damage == "relabel":
        arrays["train_labels"][picked] = rng.integers(0, 10, len(picked))
    elif damage == "mirror":
        arrays["test_images"] = arrays["test_images"][:, :, ::-1].copy()
    else:
        copied = rng.choice(60000, len(picked))
        arrays["train_images"][picked] = arrays["train_images"][copied]
        arrays["train_labels"][picked] = arrays["train_labels"][copied]
    with pytest.raises(DataValidationError) as caught:
        validate_arrays(arrays, None, (60000, 10000), load_reference(), f"official MNIST, {damage}")
    message = str(caught.value)
    assert all(re.search(problem, message) for problem in problems), message
    assert "no blank images" not in message and "the border is dark" not in message, "no format check sees it"
