"""A trained model artifact and the test digits for the inference and serving tests (a pytest plugin).

seed_cnn from training/models.py, trained for a few seconds on the synthetic digits, laid out as training lays
out SM_MODEL_DIR: model.pth, model_config.json, code/inference.py and code/models.py. Built once per session.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from inference.artifact import add_code
from training.mnist_idx import load_mnist

NORMALIZATION = {"mean": 0.1307, "std": 0.3081}
KWARGS = {"hidden_channels": 10, "kernel_size": 5, "dropout": 0.2}
LEARNING_RATE = 0.02


def pack_tarball(model_dir: Path, archive: Path) -> Path:
    """model.tar.gz as SageMaker stores it: the model directory's files at the archive root."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            if "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
    return archive


def train(model_dir: Path, data_dir: Path, epochs: int = 5) -> float:
    """Train seed_cnn for a few seconds; return its test accuracy."""
    import torch
    import torch.nn.functional as F

    from inference.artifact import load_handler

    torch.manual_seed(0)
    handler = load_handler(model_dir)  # the network comes from the artifact's own code/models.py
    network = handler.build_model("seed_cnn", **KWARGS)
    data = load_mnist(data_dir)

    def normalized(images):
        pixels = torch.from_numpy(images.astype("float32")).unsqueeze(1)
        return (pixels / 255 - NORMALIZATION["mean"]) / NORMALIZATION["std"]

    # The synthetic digits sit anywhere in the frame; MNIST's, like the pictures the handler converts, are
    # centred by mass. Train on both.
    raw = data["train_images"]
    centred = np.stack([handler.mnist_normalize(image.astype(np.float32)) for image in raw])
    images = normalized(np.concatenate([raw, centred]))
    labels = torch.from_numpy(np.tile(data["train_labels"], 2).astype("int64"))
    # SGD with momentum by hand: torch.optim imports torch._dynamo, seconds of CPU for nothing here.
    parameters = list(network.parameters())
    velocities = [torch.zeros_like(p) for p in parameters]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches on a shared 2-core machine: more threads only wait for each other
    try:
        network.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(images)).split(32):
                F.nll_loss(network(images[batch]), labels[batch]).backward()
                with torch.no_grad():
                    for parameter, velocity in zip(parameters, velocities, strict=True):
                        velocity.mul_(0.9).add_(parameter.grad)
                        parameter.sub_(velocity, alpha=LEARNING_RATE)
                        parameter.grad = None
    finally:
        torch.set_num_threads(threads)
    network.eval()
    with torch.inference_mode():
        predicted = network(normalized(data["test_images"])).argmax(1).numpy()
    torch.save(network.state_dict(), model_dir / "model.pth")
    accuracy = float((predicted == data["test_labels"]).mean())
    config = {"architecture": "seed_cnn", "kwargs": KWARGS, "normalization": NORMALIZATION,
              "input_shape": [1, 28, 28], "num_classes": 10, "hyperparameters": {"epochs": epochs, "lr": LEARNING_RATE, "momentum": 0.9},
              "test_accuracy": accuracy}  # fmt: skip
    (model_dir / "model_config.json").write_text(json.dumps(config))
    return accuracy


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, small_mnist) -> Path:
    directory = tmp_path_factory.mktemp("model")
    add_code(directory)
    accuracy = train(directory, small_mnist)
    assert accuracy >= 0.95, f"the test model learned too little to check predictions with ({accuracy:.2%})"
    return directory


@pytest.fixture(scope="session")
def test_set(small_mnist) -> tuple[np.ndarray, np.ndarray]:
    data = load_mnist(small_mnist)
    return data["test_images"], data["test_labels"]


@pytest.fixture(scope="session")
def model_tarball(model_dir, tmp_path_factory) -> Path:
    return pack_tarball(model_dir, tmp_path_factory.mktemp("packed") / "model.tar.gz")
