"""What the endpoint tests deploy and serve: real model artifacts, an endpoint of the local SageMaker service
serving one, and the environment of a model server that a test starts.

Artifacts have the layout training writes (the shared contract): model.pth, model_config.json, code/inference.py
(the project's handler) with the modules it imports beside it, and code/models.py (the project's networks). The network is trained for a few seconds
on the small synthetic MNIST. Two broken variants stand for the deployments the monitoring check must catch:
shuffled weights (answers, wrongly) and a handler that raises (every request a 5xx).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np

from inference.artifact import add_code, load_handler
from tests.conftest import EXECUTION_ROLE
from training.mnist_idx import load_mnist

LEARNING_RATE = 0.02


def server_env(aws_endpoint_url: str) -> dict[str, str]:
    """The environment of a model server that a test starts: this process's (the local credentials and region
    that conftest sets) without Airflow's settings and connections, which the server must not need, and the
    local AWS as the endpoint of every boto3 client, as the SageMaker container knows nothing but its
    environment."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    return {**env, "AWS_ENDPOINT_URL": aws_endpoint_url}


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


def train_artifact(
    model_dir: Path, data_dir: Path, hidden_channels: int = 10, seed: int = 0, epochs: int = 5, limit: int | None = None
) -> float:
    """Train seed_cnn on ``data_dir`` (its first ``limit`` training images) for a few seconds and write its artifact
    into ``model_dir``; returns its test accuracy."""
    import torch
    import torch.nn.functional as F

    from training.engine import MEAN, STD, model_config
    from training.models import NUM_CLASSES

    add_code(model_dir)
    torch.manual_seed(seed)
    handler = load_handler(model_dir)  # the network comes from the artifact's own code/models.py
    kwargs = {"hidden_channels": hidden_channels, "kernel_size": 5, "dropout": 0.2}  # every constructor argument
    network = handler.predictor.build_model("seed_cnn", **kwargs)
    data = load_mnist(data_dir)

    def normalized(images):
        pixels = torch.from_numpy(images.astype("float32")).unsqueeze(1)
        return (pixels / 255 - MEAN) / STD

    # The synthetic digits sit anywhere in the frame; MNIST's, like the pictures the handler converts, are
    # centred by mass. Train on both.
    raw = data["train_images"][:limit]
    centred = np.stack([handler.decoding.mnist_normalize(image.astype(np.float32)) for image in raw])
    images = normalized(np.concatenate([raw, centred]))
    labels = torch.from_numpy(np.tile(data["train_labels"][:limit], 2).astype("int64"))
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
    hyperparameters = {"epochs": epochs, "seed": seed, "lr": LEARNING_RATE, "momentum": 0.9}
    config = model_config("seed_cnn", kwargs, NUM_CLASSES, hyperparameters=hyperparameters, test_accuracy=accuracy)
    (model_dir / "model_config.json").write_text(json.dumps(config))
    return accuracy


def shuffled_copy(source: Path, target: Path) -> Path:
    """The same network with every weight tensor's values permuted: loads, answers 200, and answers wrongly."""
    import torch

    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(0)
    state = torch.load(source / "model.pth", weights_only=True)
    shuffled = {
        key: value.flatten()[torch.randperm(value.numel(), generator=generator)].view_as(value)
        for key, value in state.items()
    }
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
    """model.tar.gz as SageMaker packs SM_MODEL_DIR: the model directory's files at the archive root (without
    the __pycache__ that loading the handler leaves)."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(model_dir.rglob("*")):
            if "__pycache__" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
    return archive


def npy_claiming(fields: dict, data: bytes = b"", version: bytes = b"\x01\x00") -> bytes:
    """An .npy body whose header says ``fields`` (descr, fortran_order, shape), followed by ``data``."""
    header = repr(fields).encode()
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"  # padded as numpy pads it: to 64 bytes, then \n
    return b"\x93NUMPY" + version + struct.pack("<H", len(header)) + header + data


def npy_fields(descr: str | list = "<f8", shape: object = (1, 784), fortran_order: bool = False) -> dict:
    return {"descr": descr, "fortran_order": fortran_order, "shape": shape}


def serve_trained_model(
    local_sagemaker: str,
    local_aws: str,
    small_mnist: Path,
    tmp_path_factory,
    bucket: str,
    key: str,
    name: str,
    **config,
):
    """The trained model of model_artifacts in a bucket of its own at ``s3://bucket/key``, and a model, an endpoint
    config and an endpoint, each named ``name``, that serve it (``config``: more of the endpoint config's request,
    such as its DataCaptureConfig). Returns the SageMaker client and the artifacts once the endpoint is created, not
    yet in service."""
    import boto3

    built = model_artifacts(small_mnist, tmp_path_factory.getbasetemp() / "model-artifacts")
    s3 = boto3.client("s3", endpoint_url=local_aws)
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(pack(built["good"], tmp_path_factory.mktemp(name) / "model.tar.gz")), bucket, key)
    sagemaker = boto3.client("sagemaker", endpoint_url=local_sagemaker)
    model_and_config(sagemaker, name, f"s3://{bucket}/{key}", **config)
    sagemaker.create_endpoint(EndpointName=name, EndpointConfigName=name)
    return sagemaker, built


def model_and_config(sagemaker, name: str, model_data_url: str, **endpoint_config) -> None:
    """A model and an endpoint config, each named ``name``, that serve the artifact at ``model_data_url`` on one
    instance of the variant AllTraffic (``endpoint_config``: more of the config's request)."""
    sagemaker.create_model(
        ModelName=name,
        ExecutionRoleArn=EXECUTION_ROLE,
        PrimaryContainer={"Image": "pytorch-inference", "ModelDataUrl": model_data_url},
    )
    sagemaker.create_endpoint_config(
        EndpointConfigName=name,
        ProductionVariants=[{"VariantName": "AllTraffic", "ModelName": name, "InitialInstanceCount": 1}],
        **endpoint_config,
    )
