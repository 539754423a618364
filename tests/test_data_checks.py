"""The MNIST expectation suite: sound data passes, and each kind of damage is rejected with a line that names it."""

from __future__ import annotations

import gzip
import json
import re
import shutil

import numpy as np
import pytest

from cli.main import main
from data_checks.mnist_suite import DataValidationError, validate_mnist
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


def test_small_set_passes_and_writes_the_report(small_mnist, tmp_path):
    summary = validate_mnist(small_mnist, report_dir=tmp_path / "report", expected_counts=SMALL)
    assert summary["success"] and summary["failures"] == []
    assert summary["counts"] == {"train": 600, "test": 100}
    result = json.loads((tmp_path / "report" / "validation_result.json").read_text())
    assert result["success"] is True
    assert len(result["results"]) == summary["expectations"] >= 15
    index = (tmp_path / "report" / "index.html").read_text()
    assert "mnist" in index
    assert list((tmp_path / "report" / "validations").rglob("*.html")), "Data Docs hold the validation page"


def _bad_labels(a):
    a["train_labels"][[3, 7]] = 12


def _blank(a):
    a["train_images"][[0, 5]] = 0


def _leak(a):
    a["test_images"][[2, 9]] = a["train_images"][[40, 41]]


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
def test_damage_is_rejected_with_one_line_per_failure(small_mnist, tmp_path, damage, expected_lines):
    directory = damaged_copy(small_mnist, tmp_path / "damaged", damage)
    with pytest.raises(DataValidationError) as caught:
        validate_mnist(directory, expected_counts=SMALL)
    message = str(caught.value)
    for line in expected_lines:
        assert any(re.search(line, text) for text in message.splitlines()), (line, message)


def test_only_the_damaged_expectations_fail(small_mnist, tmp_path):
    directory = damaged_copy(small_mnist, tmp_path / "damaged", _leak)
    with pytest.raises(DataValidationError, match=r"failed 1 of 15 expectations:\n  no train/test leakage"):
        validate_mnist(directory, expected_counts=SMALL)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated-gzip", r"train-images-idx3-ubyte\.gz: not a complete gzip stream"),
        ("truncated-body", r"t10k-images-idx3-ubyte\.gz: header declares shape \(100, 28, 28\)"),
        ("wrong-magic", r"train-labels-idx1-ubyte\.gz: magic number 0x00000803, expected 0x00000801"),
        ("labels-disagree", r"100 images but .*t10k-labels-idx1-ubyte\.gz has 99 labels"),
    ],
)
def test_malformed_files_fail_before_any_expectation(small_mnist, tmp_path, damage, message):
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
        validate_mnist(directory, report_dir=tmp_path / "report", expected_counts=SMALL)
    assert not (tmp_path / "report").exists(), "no expectation ran"


def test_cli_exit_status(small_mnist, tmp_path, capsys, monkeypatch):
    counts = ["--expect-train", "600", "--expect-test", "100"]
    assert main(["data", "validate", str(small_mnist), "--report", str(tmp_path / "r"), *counts]) == 0
    assert "passed 15 expectations (600 train / 100 test images)" in capsys.readouterr().out
    assert (tmp_path / "r" / "index.html").is_file()

    damaged = damaged_copy(small_mnist, tmp_path / "damaged", _leak)
    assert main(["data", "validate", str(damaged), "--report", str(tmp_path / "failed"), *counts]) == 1
    assert "no train/test leakage" in capsys.readouterr().err
    result = json.loads((tmp_path / "failed" / "validation_result.json").read_text())
    assert result["success"] is False, "the report is written on failure too"
    # The configured counts apply when no flag is given.
    monkeypatch.setenv("MNIST_PIPELINE_MNIST_EXPECTED_COUNTS", "60000,10000")
    assert main(["data", "validate", str(small_mnist)]) == 1
    assert "train: 60000 images: observed 600" in capsys.readouterr().err


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
