"""The script-mode training entry point (training/), the trial table and the local sweep.

Runs of train.py are real processes with the SageMaker SM_* environment, on the small synthetic digits; one test
trains the seed network on the official MNIST files.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from local_sagemaker.processes import free_port
from tasks.trials import format_trial_table, summarize_trial
from tests.conftest import ROOT
from training.augment import Augmentation, cutout
from training.cluster import Cluster, ClusterError
from training.engine import BACKGROUND, MEAN, STD, Shard, evaluate, to_tensors, train_epoch
from training.mnist_idx import MNIST_FILES, load_mnist
from training.models import MODELS, build_model, count_parameters, model_kwargs

TRAINING = ROOT / "training"
TRAIN_SCRIPT = TRAINING / "train.py"
# The sweep write-up's SageMaker metric_definitions, as tasks/training_jobs.py passes them.
METRIC_REGEXES = {
    "train:loss": r"Train Loss: (.*?);",
    "test:loss": r"Test Average loss: (.*?),",
    "test:accuracy": r"Test Accuracy: (.*?)%;",
}
# Adam learns the synthetic digits in a few seconds, where the seed preset's SGD (lr 0.01, momentum 0.5) needs more
# than the 10 steps of an epoch here.
QUICK_LEARNER = ["--optimizer", "adam", "--lr", "0.01", "--batch_size", "32", "--epochs", "3"]
SIBLINGS = ("train", "models", "augment", "cluster", "engine", "mnist_idx")


@pytest.fixture(scope="module")
def train_module():
    """training/train.py imported the way it runs: with training/ first on sys.path, its siblings top-level."""
    saved = {name: sys.modules.pop(name) for name in SIBLINGS if name in sys.modules}
    sys.path.insert(0, str(TRAINING))
    try:
        yield importlib.import_module("train")
    finally:
        sys.path.remove(str(TRAINING))
        for name in SIBLINGS:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@pytest.fixture
def one_thread():
    """Small batches gain nothing from a second thread, which only waits on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def job_env(data: Path, job: Path, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SM_", "MASTER_"))}
    return {
        **env,
        "SM_CHANNEL_TRAINING": str(data),
        "SM_MODEL_DIR": str(job / "model"),
        "SM_OUTPUT_DATA_DIR": str(job / "output"),
        "SM_OUTPUT_DIR": str(job),
        "SM_NUM_CPUS": "1",
        **extra,
    }


def run_train(data: Path, job: Path, *flags: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *flags],
        env=job_env(data, job, **env),
        cwd=job.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def normalized(images: np.ndarray, normalization: dict) -> torch.Tensor:
    pixels = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255
    return (pixels - normalization["mean"]) / normalization["std"]


def load_artifact_models(model_dir: Path):
    """The artifact's own code/models.py, as the serving container imports it."""
    spec = importlib.util.spec_from_file_location(f"artifact_models_{id(model_dir)}", model_dir / "code" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- flags and presets -------------------------------------------------------------------------------------------


def test_no_flags_reproduce_the_seed(train_module):
    args = train_module.parse_args([])
    seed = {
        "model": "seed_cnn",
        "epochs": 2,
        "hidden_channels": 10,
        "dropout": 0.2,
        "kernel_size": 5,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.5,
        "batch_size": 64,
        "test_batch_size": 1000,
        "weight_decay": 0.0,
        "lr_schedule": "none",
        "label_smoothing": 0.0,
        "augment": False,
        "backend": "gloo",
        "preset": "seed",
    }
    assert {key: getattr(args, key) for key in seed} == seed


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "accurate", "--epochs", "3", "--augment", "false"],
        ["--epochs", "3", "--augment", "False", "--preset", "accurate"],  # order does not matter
    ],
)
def test_explicit_flags_override_the_preset(train_module, argv):
    args = train_module.parse_args(argv)
    assert (args.model, args.hidden_channels, args.lr_schedule, args.label_smoothing) == ("bn_cnn", 16, "onecycle", 0.1)
    assert (args.epochs, args.augment) == (3, False)


def test_sagemaker_style_values(train_module):
    args = train_module.parse_args(["--augment", "True", "--hidden_channels", "5", "--lr", "1e-3", "--model", "mlp"])
    assert (args.augment, args.hidden_channels, args.lr, args.model) == (True, 5, 0.001, "mlp")
    assert train_module.parse_args(["--augment"]).augment is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optimizer", "rmsprop"], "--optimizer: invalid choice: 'rmsprop'"),
        (["--dropout", "1.5"], "--dropout: 1.5 is not in [0, 1)"),
        (["--epochs", "0"], "--epochs: 0 is not in [1, inf)"),
        (["--epochs", "two"], "--epochs: invalid int value: 'two'"),
        (["--lr", "-0.1"], "--lr: -0.1 is not in (0, inf)"),
        (["--lr", "nan"], "--lr: nan is not in"),
        (["--kernel_size", "13"], "kernel_size 13 does not fit a 28x28 image"),
        (["--augment", "maybe"], "--augment: 'maybe' is not a boolean"),
        (["--model", "resnet"], "--model: invalid choice: 'resnet'"),
        (["--preset", "fast"], "--preset: invalid choice: 'fast'"),
        (["--learning_rate", "0.1"], "unrecognized arguments: --learning_rate"),
    ],
)
def test_invalid_values_are_named(train_module, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train_module.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_invalid_value_stops_the_process_before_any_work(tmp_path, small_mnist):
    result = run_train(small_mnist, tmp_path / "job", "--dropout", "2")
    assert result.returncode == 2
    assert "--dropout: 2 is not in [0, 1)" in result.stderr
    assert "Train" not in result.stdout
    assert not (tmp_path / "job").exists()


def test_paths_and_threads_from_the_sagemaker_environment(train_module, monkeypatch):
    monkeypatch.setenv("SM_CHANNEL_TRAINING", "/opt/ml/input/data/training")
    monkeypatch.setenv("SM_MODEL_DIR", "/opt/ml/model")
    monkeypatch.setenv("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")
    monkeypatch.setenv("SM_NUM_CPUS", "3")
    args = train_module.parse_args([])
    assert (args.data_dir, args.model_dir, args.output_data_dir) == (
        "/opt/ml/input/data/training",
        "/opt/ml/model",
        "/opt/ml/output/data",
    )
    assert args.num_threads == 3


def test_paths_and_threads_without_the_sagemaker_environment(train_module, monkeypatch):
    for name in ("SM_CHANNEL_TRAINING", "SM_MODEL_DIR", "SM_OUTPUT_DATA_DIR", "SM_NUM_CPUS"):
        monkeypatch.delenv(name, raising=False)
    args = train_module.parse_args([])
    assert (args.data_dir, args.model_dir, args.output_data_dir) == ("data", "artifacts/model", "artifacts/output")
    assert args.num_threads == os.cpu_count()


def test_cluster_from_the_sagemaker_environment():
    cluster = Cluster.from_env({"SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "0"})
    assert (cluster.world_size, cluster.rank(0)) == (2, 1)
    assert Cluster.from_env({}).world_size == 1
    for env, message in [
        ({"SM_HOSTS": "algo-1"}, "SM_HOSTS is not a JSON list"),
        ({"SM_HOSTS": "[]"}, "non-empty JSON list"),
        ({"SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-9"}, "'algo-9' is not one of SM_HOSTS"),
        ({"SM_NUM_GPUS": "many"}, "SM_NUM_GPUS must be a whole number"),
    ]:
        with pytest.raises(ClusterError, match=re.escape(message)):
            Cluster.from_env(env)


# -- bad data ----------------------------------------------------------------------------------------------------


def _broken_copy(source: Path, target: Path, damage: str) -> Path:
    shutil.copytree(source, target)
    if damage == "missing":
        (target / MNIST_FILES["test_labels"]).unlink()
        return target / MNIST_FILES["test_labels"]
    path = target / MNIST_FILES["train_images"]
    payload = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(payload[: len(payload) - 784 * 5]))  # five images short of its header
    return path


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_bad_data_file_is_named(train_module, tmp_path, small_mnist, monkeypatch, caplog, one_thread, damage):
    bad = _broken_copy(small_mnist, tmp_path / "data", damage)
    for key, value in job_env(tmp_path / "data", tmp_path / "job").items():
        monkeypatch.setenv(key, value)
    code = train_module.main(["--num_threads", str(torch.get_num_threads())])
    assert code == 1
    assert f"bad training data: {bad}" in caplog.text
    assert str(bad) in (tmp_path / "job" / "failure").read_text()  # SageMaker's FailureReason
    assert not (tmp_path / "job" / "model").exists()


def _with_manifest(source: Path, target: Path) -> str:
    """A copy of ``source`` with its SHA256SUMS, as the pipeline uploads a dataset; the manifest's SHA-256."""
    shutil.copytree(source, target)
    lines = "".join(
        f"{hashlib.sha256((target / name).read_bytes()).hexdigest()}  {name}\n" for name in sorted(MNIST_FILES.values())
    )
    (target / "SHA256SUMS").write_text(lines)
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize("damage", ["file", "manifest", "unlisted", "no manifest"])
def test_the_script_trains_only_on_the_dataset_its_job_names(
    train_module, tmp_path, small_mnist, monkeypatch, caplog, one_thread, damage
):
    """On SageMaker nothing else checks the channel: the script holds it to its SHA256SUMS, and the manifest to the
    dataset_sha256 the pipeline passes."""
    digest = _with_manifest(small_mnist, tmp_path / "data")
    manifest = tmp_path / "data" / "SHA256SUMS"
    labels = tmp_path / "data" / MNIST_FILES["train_labels"]
    if damage == "file":  # a file swapped for another, its manifest left as it was
        labels.write_bytes((tmp_path / "data" / MNIST_FILES["test_labels"]).read_bytes())
        expected = f"{labels}: its SHA-256 is"
    elif damage == "manifest":  # the files and a manifest that agree, but not the dataset the job names
        expected = f"{manifest}: its SHA-256 is"
        digest = "0" * 64
    elif damage == "unlisted":
        manifest.write_text(
            "".join(line for line in manifest.read_text().splitlines(True) if MNIST_FILES["train_labels"] not in line)
        )
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
        expected = f"{manifest}: lists no {MNIST_FILES['train_labels']}"
    else:
        manifest.unlink()
        expected = f"{manifest}: missing; the dataset {digest} comes with its manifest"
    for key, value in job_env(tmp_path / "data", tmp_path / "job").items():
        monkeypatch.setenv(key, value)
    code = train_module.main(["--num_threads", str(torch.get_num_threads()), "--dataset_sha256", digest])
    assert code == 1
    assert expected in (tmp_path / "job" / "failure").read_text()  # SageMaker's FailureReason
    assert not (tmp_path / "job" / "model").exists()


# -- a whole run: log lines, artifact, metrics -------------------------------------------------------------------


@pytest.fixture(scope="module", params=["seed", "accurate"])
def finished_run(request, small_mnist, tmp_path_factory):
    """One epoch of train.py on the synthetic digits, with the seed preset and with the accurate preset."""
    job = tmp_path_factory.mktemp(f"run-{request.param}")
    result = run_train(small_mnist, job, "--preset", request.param, "--epochs", "1", "--log_interval", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = json.loads((job / "output" / "metrics.json").read_text())
    return {"job": job, "log": result.stdout, "metrics": metrics, "data": load_mnist(small_mnist)}


def test_the_log_names_each_file_of_the_model_by_its_sha256(finished_run):
    from training.contract import MODEL_FILES_LINE

    [line] = [line for line in finished_run["log"].splitlines() if MODEL_FILES_LINE in line]
    named = json.loads(line.split(MODEL_FILES_LINE, 1)[1])
    model_dir = finished_run["job"] / "model"
    assert named == {
        path.relative_to(model_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in model_dir.rglob("*")
        if path.is_file()
    }
    assert set(named) == {
        "code/inference.py",
        "code/predictor.py",
        "code/decoding.py",
        "code/json_fast.py",
        "code/models.py",
        "model.pth",
        "model_config.json",
    }


def test_log_lines_parse_with_the_seed_metric_definitions(finished_run):
    log, metrics = finished_run["log"], finished_run["metrics"]
    found = {name: re.findall(regex, log) for name, regex in METRIC_REGEXES.items()}
    steps = math.ceil(600 / metrics["hyperparameters"]["batch_size"])
    assert len(found["train:loss"]) == steps // 2  # --log_interval 2
    assert found["test:accuracy"] == [f"{100 * metrics['test_accuracy']:.2f}"]  # two decimals
    assert float(found["test:loss"][0]) == pytest.approx(metrics["test_loss"], abs=1e-4)
    assert all(float(value) > 0 for value in found["train:loss"])


def test_artifact_rebuilds_from_its_config_alone(finished_run):
    model_dir, data = finished_run["job"] / "model", finished_run["data"]
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")) == [
        "code",
        "code/decoding.py",
        "code/inference.py",
        "code/json_fast.py",
        "code/models.py",
        "code/predictor.py",
        "model.pth",
        "model_config.json",
    ]
    for name in ("inference.py", "predictor.py", "decoding.py", "json_fast.py"):
        assert (model_dir / "code" / name).read_bytes() == (ROOT / "inference" / name).read_bytes(), name
    assert (model_dir / "code" / "models.py").read_bytes() == (TRAINING / "models.py").read_bytes()
    config = json.loads((model_dir / "model_config.json").read_text())
    assert config["normalization"] == {"mean": MEAN, "std": STD}
    assert (config["input_shape"], config["num_classes"]) == ([1, 28, 28], 10)
    assert config["test_accuracy"] == finished_run["metrics"]["test_accuracy"]
    network = load_artifact_models(model_dir).build_model(config["architecture"], **config["kwargs"])
    network.load_state_dict(torch.load(model_dir / "model.pth", weights_only=True))
    with torch.inference_mode():
        predictions = network.eval()(normalized(data["test_images"], config["normalization"])).argmax(1).numpy()
    # The same predictions as in training, up to a float rounding flipping one close call.
    assert np.mean(predictions == data["test_labels"]) == pytest.approx(config["test_accuracy"], abs=0.011)
    misclassified = np.load(finished_run["job"] / "output" / "misclassified.npz")
    assert np.mean(predictions[misclassified["indices"]] == misclassified["predictions"]) > 0.9


def test_metrics_json(finished_run):
    metrics, data = finished_run["metrics"], finished_run["data"]
    hyperparameters = metrics["hyperparameters"]
    architecture = "seed_cnn" if hyperparameters["preset"] == "seed" else "bn_cnn"
    assert (metrics["architecture"], metrics["world_size"], hyperparameters["epochs"]) == (architecture, 1, 1)
    kwargs = model_kwargs(architecture, hyperparameters)
    assert metrics["parameters"] == count_parameters(build_model(architecture, **kwargs))
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (10, 10)
    assert confusion.sum(axis=1).tolist() == np.bincount(data["test_labels"], minlength=10).tolist()
    assert metrics["test_accuracy"] == np.trace(confusion) / confusion.sum()
    assert metrics["per_class_accuracy"] == pytest.approx(list(np.diag(confusion) / confusion.sum(axis=1)))
    (epoch,) = metrics["history"]
    assert epoch["epoch"] == 1
    assert (epoch["test_accuracy"], epoch["test_loss"], epoch["train_loss"]) == (
        metrics["test_accuracy"],
        metrics["test_loss"],
        metrics["train_loss"],
    )
    assert 0 < epoch["seconds"] <= metrics["wall_seconds"]
    assert metrics["images_per_second"] > 0


def test_misclassified_examples(finished_run):
    data, confusion = finished_run["data"], np.array(finished_run["metrics"]["confusion_matrix"])
    wrong = np.load(finished_run["job"] / "output" / "misclassified.npz")
    assert len(wrong["indices"]) == confusion.sum() - np.trace(confusion)
    assert wrong["images"].dtype == np.uint8
    assert wrong["images"].shape == (len(wrong["indices"]), 28, 28)
    assert np.array_equal(wrong["images"], data["test_images"][wrong["indices"]])
    assert np.array_equal(wrong["labels"], data["test_labels"][wrong["indices"]])
    assert np.all(wrong["predictions"] != wrong["labels"])
    for label, prediction in zip(wrong["labels"], wrong["predictions"], strict=True):
        assert confusion[label, prediction] > 0


# -- distributed -------------------------------------------------------------------------------------------------


def test_two_hosts_train_together_with_ddp(tmp_path, small_mnist):
    """Two processes as SageMaker's two hosts, gloo over loopback; only the first host writes the artifact."""
    hosts = ["algo-1", "algo-2"]
    shared = {"SM_HOSTS": json.dumps(hosts), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, str(TRAIN_SCRIPT), *QUICK_LEARNER, "--log_interval", "2"]
    processes = {}
    for host in hosts:
        env = job_env(small_mnist, tmp_path / host, SM_CURRENT_HOST=host, **shared)
        processes[host] = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    logs = {host: process.communicate(timeout=300)[0] for host, process in processes.items()}
    assert [processes[host].returncode for host in hosts] == [0, 0], logs
    metrics = json.loads((tmp_path / "algo-1" / "output" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["test_accuracy"] >= 0.6  # it learned: chance is 0.1
    assert "world size 2" in logs["algo-1"]
    # Each host takes half of every epoch, 300 images in 10 steps of 32; a log line counts both hosts' images.
    assert "Train Epoch: 3 [128/600 (20%)]" in logs["algo-1"]
    assert "Train Epoch: 3 [600/600 (100%)]" in logs["algo-1"]
    assert not re.search(METRIC_REGEXES["test:accuracy"], logs["algo-2"])  # rank 0 speaks for the job
    assert not (tmp_path / "algo-2" / "model").exists()
    assert (tmp_path / "algo-1" / "model" / "model.pth").is_file()


LISTENERS = """
import os, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from cluster import Cluster, init_process_group

cluster = Cluster.from_env()
init_process_group(cluster, 0, "gloo")
dist.barrier()
if cluster.rank(0) == 0:  # every socket this process listens on, as /proc/net shows them (hex address:port)
    sockets = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the directory's own descriptor, closed by now
            continue
        if link.startswith("socket:"):
            sockets.add(link.split("[")[1].rstrip("]"))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:
                print("LISTEN", fields[1])
dist.barrier()
"""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket tables")
def test_a_loopback_rendezvous_listens_on_loopback_only(tmp_path, small_mnist):
    """The local service's multi-host jobs: neither the rendezvous nor gloo may be reachable from the network."""
    hosts = ["algo-1", "algo-2"]
    shared = {
        "SM_HOSTS": json.dumps(hosts),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "SM_NETWORK_INTERFACE_NAME": "lo",
    }
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", LISTENERS, str(TRAIN_SCRIPT.parent)],
            text=True,
            env=job_env(small_mnist, tmp_path / host, SM_CURRENT_HOST=host, **shared),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for host in hosts
    ]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    listening = [line.split()[1] for line in outputs[0].splitlines() if line.startswith("LISTEN ")]
    assert f"{int(shared['MASTER_PORT']):04X}" in {address.split(":")[1] for address in listening}, outputs[0]
    # 127.0.0.1 in /proc/net/tcp's little-endian hex, or as an IPv4-mapped IPv6 address
    assert all(address.split(":")[0] in ("0100007F", "0000000000000000FFFF00000100007F") for address in listening), (
        listening
    )


# -- models, augmentation, loop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", sorted(MODELS))
def test_models_answer_log_probabilities(architecture):
    network = build_model(architecture).eval()
    with torch.inference_mode():
        output = network(torch.randn(5, 1, 28, 28))
    assert output.shape == (5, 10)
    assert torch.allclose(output.exp().sum(dim=1), torch.ones(5))


def test_model_sizes():
    # seed_cnn: conv1 10x1x5x5+10, conv2 20x10x5x5+20, fc1 320x50+50, fc2 50x10+10.
    assert count_parameters(build_model("seed_cnn", hidden_channels=10)) == 260 + 5020 + 16050 + 510
    assert count_parameters(build_model("mlp")) == (784 * 128 + 128) + (128 * 90 + 90) + (90 * 50 + 50) + 510
    sizes = [count_parameters(build_model("bn_cnn", hidden_channels=c)) for c in (8, 16, 32)]
    assert sizes[0] < sizes[1] < 100_000 < sizes[2]
    for kernel_size in (3, 7, 9):
        assert build_model("seed_cnn", kernel_size=kernel_size)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="kernel_size 10 does not fit"):
        build_model("seed_cnn", kernel_size=10)
    with pytest.raises(ValueError, match="unknown architecture 'lenet'"):
        build_model("lenet")
    assert model_kwargs("seed_cnn", {"hidden_channels": 4, "kernel_size": 3, "dropout": 0.1, "lr": 1}) == {
        "hidden_channels": 4,
        "kernel_size": 3,
        "dropout": 0.1,
    }


def test_augmentation_moves_digits_but_keeps_the_background(small_mnist):
    data = load_mnist(small_mnist)
    images, _ = to_tensors(data["test_images"][:32], data["test_labels"][:32], torch.device("cpu"))
    still = Augmentation(max_rotation=0, max_scale=0, max_shift=0, cutout_probability=0)(images, BACKGROUND)
    assert torch.allclose(still, images, atol=1e-5)
    moved = Augmentation(cutout_probability=0)(images, BACKGROUND)
    assert moved.shape == images.shape and not torch.allclose(moved, images, atol=0.1)
    # What moves in at the borders is background, and ink stays ink: about as much of it as before.
    empty = torch.full_like(images, BACKGROUND)
    assert torch.allclose(Augmentation()(empty, BACKGROUND), empty)
    ink_before, ink_after = (images - BACKGROUND).sum(), (moved - BACKGROUND).sum()
    assert 0.7 < ink_after / ink_before < 1.3
    blank = torch.full((4, 1, 28, 28), 1.5)
    holes = cutout(blank, size=6, probability=1.0, fill=BACKGROUND) == BACKGROUND
    assert all(0 < int(hole.sum()) <= 36 for hole in holes)


@pytest.mark.parametrize("architecture", ["mlp", "seed_cnn"])
def test_training_loop_learns(small_mnist, one_thread, architecture):
    data = load_mnist(small_mnist)
    cpu = torch.device("cpu")
    images, labels = to_tensors(data["train_images"], data["train_labels"], cpu)
    test_images, test_labels = to_tensors(data["test_images"], data["test_labels"], cpu)
    torch.manual_seed(0)
    network = build_model(architecture)
    optimizer = torch.optim.Adam(network.parameters(), lr=0.01)
    before = evaluate(network, test_images, test_labels, 1000).accuracy
    for epoch in range(1, 4):
        result = train_epoch(
            network,
            optimizer,
            None,
            images,
            labels,
            epoch=epoch,
            shard=Shard(len(labels)),
            batch_size=32,
            augment=Augmentation() if architecture == "seed_cnn" else None,
        )
    assert result.images == 600
    after = evaluate(network, test_images, test_labels, 1000)
    assert after.accuracy >= max(0.6, before + 0.3)
    assert after.confusion.sum() == 100


def test_shards_split_every_epoch_between_ranks():
    shards = [Shard(10, rank, 3, seed=7).indices(epoch=2, device=torch.device("cpu")) for rank in range(3)]
    together = torch.cat(shards)
    assert [len(s) for s in shards] == [3, 3, 3]
    assert len(set(together.tolist())) == 9  # disjoint
    assert not torch.equal(Shard(10, 0, 3, seed=7).indices(1, torch.device("cpu")), shards[0])  # reshuffled


# -- trial table and the local sweep -----------------------------------------------------------------------------


def summarized_trial() -> dict:
    """The summary of a two-epoch trial named job-5, from its metrics.json."""
    metrics = {
        "architecture": "seed_cnn",
        "hidden_channels": 5,
        "test_accuracy": 0.9714,
        "test_loss": 0.0951,
        "train_loss": 0.31,
        "wall_seconds": 14.2,
        "parameters": 9240,
        "history": [{"test_accuracy": 0.9561}, {"test_accuracy": 0.9714}],
    }
    return summarize_trial(metrics, name="job-5")


def test_trial_summary():
    row = summarized_trial()
    assert row["accuracy_min"] == 0.9561 and row["accuracy_max"] == 0.9714
    assert row["accuracy_avg"] == pytest.approx(0.96375)
    assert (row["test_accuracy"], row["epochs"], row["parameters"]) == (0.9714, 2, 9240)


def test_trial_table():
    row = summarized_trial()
    table = format_trial_table([row, {"training_job_name": "job-7", "hidden_channels": 7, "test_accuracy": 0.9}])
    lines = {line.split("│")[1].strip(): line for line in table.splitlines() if line.count("│") > 2}
    assert "95.61%" in lines["job-5"] and "96.38%" in lines["job-5"] and "9,240" in lines["job-5"]
    assert "90.00%" in lines["job-7"] and "-" in lines["job-7"]  # a row without metrics.json still shows


# -- the seed preset's result on the real data -------------------------------------------------------------------


@pytest.mark.real_data
@pytest.mark.slow
@pytest.mark.long
def test_seed_settings_reach_96_percent_on_mnist(tmp_path, real_mnist):
    result = run_train(real_mnist, tmp_path / "job", "--hidden_channels", "10", SM_NUM_CPUS=str(os.cpu_count()))
    assert result.returncode == 0, result.stdout + result.stderr
    accuracies = [float(value) for value in re.findall(METRIC_REGEXES["test:accuracy"], result.stdout)]
    assert len(accuracies) == 2
    assert accuracies[-1] >= 96.0
