"""A trained model artifact and the test digits for the inference and serving tests (a pytest plugin).

seed_cnn from training/models.py, trained for a few seconds on the synthetic digits (see
tests.helpers.endpoints.train_artifact), laid out as training lays out SM_MODEL_DIR: model.pth,
model_config.json, code/inference.py with the modules it imports, and code/models.py. Built once per session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.endpoints import pack, train_artifact
from training.mnist_idx import load_mnist


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, small_mnist) -> Path:
    directory = tmp_path_factory.mktemp("model")
    accuracy = train_artifact(directory, small_mnist)
    assert accuracy >= 0.95, f"the test model learned too little to check predictions with ({accuracy:.2%})"
    return directory


@pytest.fixture(scope="session")
def test_set(small_mnist) -> tuple[np.ndarray, np.ndarray]:
    data = load_mnist(small_mnist)
    return data["test_images"], data["test_labels"]


@pytest.fixture(scope="session")
def model_tarball(model_dir, tmp_path_factory) -> Path:
    return pack(model_dir, tmp_path_factory.mktemp("packed") / "model.tar.gz")
