"""What the endpoint tests deploy: real model artifacts, and endpoints in moto's SageMaker.

Artifacts have the layout training writes (the shared contract): model.pth, model_config.json, code/inference.py
(the project's handler) and code/models.py (the project's networks). The network is trained for a few seconds
on the small synthetic MNIST. Two broken variants stand for the deployments the monitoring check must catch:
shuffled weights (answers, wrongly) and a handler that raises (every request a 5xx).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "inference" / "inference.py"
MODELS = ROOT / "training" / "models.py"
NORMALIZATION = {"mean": 0.1307, "std": 0.3081}
ROLE = "arn:aws:iam::000000000000:role/mnist-pipeline-sagemaker"


def _models_module():
    spec = importlib.util.spec_from_file_location("artifact_models", MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def model_artifacts(data_dir: Path, root: Path) -> dict:
    """Once per test session: a trained model ("good", with its "test_accuracy") and its two broken variants
    ("shuffled", "raising"), as model directories under ``root``."""
    accuracy = train_artifact(root / "good", data_dir, hidden_channels=10, seed=0)
    return {
        "good": root / "good",
        "test_accuracy": accuracy,
        "shuffled": shuffled_copy(root / "good", root / "shuffled"),
        "raising": raising_copy(root / "good", root / "raising"),
    }


def train_artifact(model_dir: Path, data_dir: Path, hidden_channels: int, seed: int, epochs: int = 5) -> float:
    """Train seed_cnn on ``data_dir`` and write its artifact into ``model_dir``; returns its test accuracy."""
    import torch
    import torch.nn.functional as F

    from training.mnist_idx import load_mnist

    torch.manual_seed(seed)
    data = load_mnist(data_dir)

    def tensors(split: str):
        images = torch.from_numpy(data[f"{split}_images"].copy()).float().unsqueeze(1)
        images = (images / 255 - NORMALIZATION["mean"]) / NORMALIZATION["std"]
        return images, torch.from_numpy(data[f"{split}_labels"].astype("int64"))

    (train_x, train_y), (test_x, test_y) = tensors("train"), tensors("test")
    kwargs = {"hidden_channels": hidden_channels, "kernel_size": 5, "dropout": 0.2}  # every constructor argument
    model = _models_module().build_model("seed_cnn", **kwargs)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(train_x)).split(32):
            optimizer.zero_grad()
            F.nll_loss(model(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).sum().item() / len(test_y)

    (model_dir / "code").mkdir(parents=True)
    torch.save(model.state_dict(), model_dir / "model.pth")
    config = {"architecture": "seed_cnn", "kwargs": kwargs, "normalization": NORMALIZATION, "input_shape": [1, 28, 28],
              "num_classes": 10, "hyperparameters": {"epochs": epochs, "seed": seed}, "test_accuracy": accuracy}  # fmt: skip
    (model_dir / "model_config.json").write_text(json.dumps(config))
    shutil.copy(HANDLER, model_dir / "code" / "inference.py")
    shutil.copy(MODELS, model_dir / "code" / "models.py")
    return accuracy


def shuffled_copy(source: Path, target: Path) -> Path:
    """The same network with every weight tensor's values permuted: loads, answers 200, and answers wrongly."""
    import torch

    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(0)
    state = torch.load(source / "model.pth", weights_only=True)
    shuffled = {key: value.flatten()[torch.randperm(value.numel(), generator=generator)].view_as(value)
                for key, value in state.items()}  # fmt: skip
    torch.save(shuffled, target / "model.pth")
    return target


def raising_copy(source: Path, target: Path) -> Path:
    """The same model behind a handler whose predict_fn fails: the server starts, and every request is a 5xx."""
    shutil.copytree(source, target)
    handler = target / "code" / "inference.py"
    handler.write_text(
        handler.read_text()
        + "\n\ndef predict_fn(data, model):\n    raise RuntimeError('deliberately broken handler')\n"
    )
    return target


def pack(model_dir: Path, archive: Path) -> Path:
    """model.tar.gz with the artifact's files at the archive root, as SageMaker packs SM_MODEL_DIR."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def moto_endpoint(endpoint_url: str, name: str) -> str:
    """Create a model, an endpoint config and an endpoint in moto's SageMaker; returns the endpoint config name."""
    import boto3

    sagemaker = boto3.client("sagemaker", endpoint_url=endpoint_url)
    sagemaker.create_model(
        ModelName=f"{name}-model",
        ExecutionRoleArn=ROLE,
        PrimaryContainer={"Image": "pytorch-inference:2.5", "ModelDataUrl": f"s3://models/{name}/model.tar.gz"},
    )
    variant = {"VariantName": "AllTraffic", "ModelName": f"{name}-model", "InitialInstanceCount": 1,
               "InstanceType": "ml.m5.large"}  # fmt: skip
    sagemaker.create_endpoint_config(EndpointConfigName=f"{name}-config", ProductionVariants=[variant])
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=f"{name}-config")
    return f"{name}-config"
