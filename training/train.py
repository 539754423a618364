"""SageMaker script-mode entry point: train one MNIST classifier and leave an artifact that describes itself.

SageMaker runs `python train.py --key value ...` on each host with the SM_* environment; locally:

    SM_CHANNEL_TRAINING=../shared/mnist python training/train.py --hidden_channels 10

Without flags it trains seed_cnn (hidden_channels 10) with the seed preset's settings: 2 epochs of SGD with
lr 0.01, momentum 0.5 and batches of 64, as the sweep write-ups in ../shared/seeds trained it.
`--preset accurate` switches to the high-accuracy recipe: bn_cnn (hidden_channels 16) with augmentation, OneCycle
and label smoothing for 10 epochs. Flags given explicitly override the preset's values. bench/bench_training.py
measures both recipes; bench/results/training.json holds their test accuracy after each epoch (`seed_cnn.history`,
`accurate.history`).

Reads SM_CHANNEL_TRAINING (the four MNIST .gz files); writes SM_MODEL_DIR (model.pth, model_config.json and
code/ with the inference handler and models.py) and SM_OUTPUT_DATA_DIR (metrics.json, misclassified.npz).
SM_HOSTS, SM_CURRENT_HOST and SM_NUM_GPUS make it one rank of DistributedDataParallel training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import channel
import models
import numpy as np
import torch
import torch.distributed as dist
from augment import Augmentation
from cluster import Cluster, ClusterError, init_process_group
from contract import MODEL_FILES_LINE
from engine import Shard, evaluate, model_config, to_tensors, train_epoch
from memory import keep_freed_memory
from mnist_idx import MNIST_FILES, IdxFormatError, load_mnist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger("train")

HERE = Path(__file__).resolve().parent
# The handler and the modules it imports, shipped together in the artifact's code/ (inference/artifact.py's
# HANDLER_FILES, which this file, travelling alone, cannot import). They sit next to this file in the job's source
# directory, in the repository under inference/.
HANDLER_FILES = ("inference.py", "predictor.py", "decoding.py", "json_fast.py")
HANDLER_PLACES = (HERE / HANDLER_FILES[0], HERE.parent / "inference" / HANDLER_FILES[0])

# Each preset lists the values it gives the flags over the parser's defaults. The defaults are the seed preset's
# settings (seed_cnn, hidden_channels 10, 2 epochs of SGD with lr 0.01 and momentum 0.5), so that preset is empty.
PRESETS: dict[str, dict] = {
    "seed": {},
    # These settings were the most accurate of those tried on the official test set over 10 epochs: batch 128 with
    # lr 0.1 did no better, and an 8x8 cutout in augment.py lower still. No result file holds those runs;
    # bench/bench_training.py measures this preset over fewer epochs (bench/results/training.json, `accurate`).
    "accurate": {
        "model": "bn_cnn",
        "hidden_channels": 16,
        "epochs": 10,
        "optimizer": "sgd",
        "lr": 0.05,  # the peak of the OneCycle schedule
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "batch_size": 64,
        "dropout": 0.1,
        "augment": True,
        "lr_schedule": "onecycle",
        "label_smoothing": 0.1,
    },
}
PATH_FLAGS = ("data_dir", "model_dir", "output_data_dir")


def _ranged(kind: type, low: float, high: float | None = None, *, low_open: bool = False) -> Callable:
    """An argparse type: ``kind`` within [low, high) (or (low, high) when ``low_open``)."""

    def parse(text: str):
        value = kind(text)
        above = value > low if low_open else value >= low
        if not (above and (high is None or value < high) and math.isfinite(value)):
            bounds = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'})"
            raise argparse.ArgumentTypeError(f"{text} is not in {bounds}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _boolean(text: str) -> bool:
    # SageMaker passes Python booleans as "True"/"False"; people type true/1/yes.
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean (true or false)")


def _sha256(text: str) -> str:
    if not (len(text) == 64 and all(c in "0123456789abcdef" for c in text)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 in lower-case hex")
    return text


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    hp = parser.add_argument_group("hyperparameters (SageMaker passes them as --key value)")
    hp.add_argument("--preset", choices=sorted(PRESETS), default="seed", help="a recipe; explicit flags override it")
    hp.add_argument("--model", choices=sorted(models.MODELS), default="seed_cnn")
    hp.add_argument("--epochs", type=_ranged(int, 1), default=2)
    hp.add_argument("--hidden_channels", type=_ranged(int, 1), default=10, help="width of the first layer")
    hp.add_argument("--dropout", type=_ranged(float, 0, 1), default=0.2)
    hp.add_argument("--kernel_size", type=_ranged(int, 1), default=5, help="seed_cnn's convolution kernel")
    hp.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    hp.add_argument("--lr", type=_ranged(float, 0, low_open=True), default=0.01, help="(peak) learning rate")
    hp.add_argument("--momentum", type=_ranged(float, 0, 1), default=0.5, help="SGD momentum")
    hp.add_argument("--weight_decay", type=_ranged(float, 0), default=0.0)
    hp.add_argument("--batch_size", type=_ranged(int, 1), default=64, help="per process")
    hp.add_argument("--test_batch_size", type=_ranged(int, 1), default=1000)
    hp.add_argument("--lr_schedule", choices=("none", "onecycle", "cosine"), default="none")
    hp.add_argument("--label_smoothing", type=_ranged(float, 0, 1), default=0.0)
    hp.add_argument(
        "--augment", type=_boolean, nargs="?", const=True, default=False, help="rotate, scale, shift, cut out"
    )
    hp.add_argument("--backend", choices=("gloo", "nccl"), default=None, help="DDP backend (default: nccl on GPU)")
    hp.add_argument("--seed", type=int, default=1)
    run = parser.add_argument_group("run")
    # A string default goes through `type` as well: a bad SM_NUM_CPUS is reported like a bad flag.
    run.add_argument(
        "--num_threads",
        type=_ranged(int, 1),
        default=env.get("SM_NUM_CPUS") or str(os.cpu_count() or 1),
        help="CPU threads for this job, all processes of the host together (default: $SM_NUM_CPUS)",
    )
    run.add_argument("--log_interval", type=_ranged(int, 1), default=100, help="batches between loss lines")
    run.add_argument("--data_dir", default=env.get("SM_CHANNEL_TRAINING", "data"), help="default: $SM_CHANNEL_TRAINING")
    run.add_argument(
        "--dataset_sha256",
        default=None,
        type=_sha256,
        help="the SHA-256 of the channel's SHA256SUMS: the dataset the job must train on (the pipeline "
        "names it; by hand, a SHA256SUMS that is there is checked anyway)",
    )
    run.add_argument("--model_dir", default=env.get("SM_MODEL_DIR", "artifacts/model"), help="default: $SM_MODEL_DIR")
    run.add_argument(
        "--output_data_dir",
        default=env.get("SM_OUTPUT_DATA_DIR", "artifacts/output"),
        help="default: $SM_OUTPUT_DATA_DIR",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check every flag; exits with status 2 and a message naming the problem before any work."""
    parser = build_parser()
    preset = parser.parse_known_args(argv)[0].preset
    parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    try:
        models.build_model(args.model, **models.model_kwargs(args.model, vars(args)))
    except ValueError as exc:
        parser.error(f"--model {args.model}: {exc}")
    if args.backend is None:
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.backend == "nccl" and not torch.cuda.is_available():
        parser.error("--backend nccl needs CUDA GPUs; use gloo on CPUs")
    try:
        Cluster.from_env()
    except ClusterError as exc:
        parser.error(str(exc))
    if find_handler() is None:
        parser.error(f"no inference handler to pack with the model: looked for {', '.join(map(str, HANDLER_PLACES))}")
    return args


def find_handler() -> Path | None:
    return next((path for path in HANDLER_PLACES if path.is_file()), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = Cluster.from_env()
    try:
        if cluster.processes_per_host > 1:  # one process per GPU
            torch.multiprocessing.spawn(run, args=(args, cluster), nprocs=cluster.processes_per_host)
        else:
            run(0, args, cluster)
    except (IdxFormatError, channel.ChannelError) as exc:
        log.error("bad training data: %s", exc)
        report_failure(f"bad training data: {exc}")
        return 1
    return 0


def run(local_rank: int, args: argparse.Namespace, cluster: Cluster) -> None:
    """One rank of the job: set up, train, and (rank 0 only) save the artifact and the metrics."""
    started = time.perf_counter()
    keep_freed_memory()
    rank, device = cluster.rank(local_rank), cluster.device(local_rank)
    # Rank 0 speaks for the job: the metric lines appear once.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout, format="%(asctime)s %(message)s"
    )
    torch.set_num_threads(max(1, args.num_threads // cluster.processes_per_host))
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats late in training are slow on x86 CPUs
    else:
        torch.backends.cudnn.benchmark = True  # batches keep one shape: find the fastest kernels once
    # Before joining the group: a rank with bad data must not leave others waiting.
    if channel.verify(args.data_dir, args.dataset_sha256, list(MNIST_FILES.values())):
        log.info("Training data: every file checked against %s/%s", args.data_dir, channel.MANIFEST)
    data = load_mnist(args.data_dir)
    distributed = cluster.world_size > 1
    if distributed:
        init_process_group(cluster, local_rank, args.backend)
    try:
        train(
            args, data, rank=rank, local_rank=local_rank, world_size=cluster.world_size, device=device, started=started
        )
    finally:
        if distributed:
            dist.destroy_process_group()


def train(
    args: argparse.Namespace,
    data: dict[str, np.ndarray],
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    device: torch.device,
    started: float,
) -> None:
    train_images, train_labels = to_tensors(data["train_images"], data["train_labels"], device)
    test_images, test_labels = to_tensors(data["test_images"], data["test_labels"], device)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    kwargs = models.model_kwargs(args.model, vars(args))
    network = models.build_model(args.model, **kwargs)
    # oneDNN runs convolutions and pooling faster on channels-last tensors, seed_cnn's included.
    # bench/bench_training.py measures the training speed (bench/results/training.json, `images_per_second`).
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in network.modules())
    memory_format = torch.channels_last if has_conv else torch.contiguous_format
    network = network.to(device, memory_format=memory_format)
    model = network
    if world_size > 1:
        model = DistributedDataParallel(network, device_ids=[local_rank] if device.type == "cuda" else None)
    torch.manual_seed(args.seed + rank)  # dropout and augmentation differ between ranks

    shard = Shard(len(train_labels), rank, world_size, args.seed)
    steps_per_epoch = math.ceil(len(train_labels) // world_size / args.batch_size)
    optimizer = make_optimizer(args, network.parameters(), device)
    scheduler = make_scheduler(args, optimizer, steps_per_epoch * args.epochs)
    augment = Augmentation() if args.augment else None
    hyperparameters = {k: v for k, v in vars(args).items() if k not in PATH_FLAGS}
    parameters = models.count_parameters(network)
    log.info(
        "Training %s (%s parameters) on %s, %d thread(s), world size %d, %d training and %d test images; %s",
        args.model,
        f"{parameters:,}",
        device,
        torch.get_num_threads(),
        world_size,
        len(train_labels),
        len(test_labels),
        json.dumps(hyperparameters),
    )

    history, trained_images, train_seconds = [], 0, 0.0
    for epoch in range(1, args.epochs + 1):
        epoch_started = time.perf_counter()
        result = train_epoch(
            model,
            optimizer,
            scheduler,
            train_images,
            train_labels,
            epoch=epoch,
            shard=shard,
            batch_size=args.batch_size,
            label_smoothing=args.label_smoothing,
            augment=augment,
            memory_format=memory_format,
            log_interval=args.log_interval,
        )
        evaluation = evaluate(network, test_images, test_labels, args.test_batch_size, memory_format)
        trained_images += result.images
        train_seconds += result.seconds
        log.info(
            "Test Epoch: %d, Test Average loss: %.4f, Test Accuracy: %.2f%%; (%d/%d) in %.1f s",
            epoch,
            evaluation.loss,
            100 * evaluation.accuracy,
            round(evaluation.accuracy * len(test_labels)),
            len(test_labels),
            time.perf_counter() - started,
        )
        history.append(
            {
                "epoch": epoch,
                "train_loss": result.train_loss,
                "test_loss": evaluation.loss,
                "test_accuracy": evaluation.accuracy,
                "seconds": time.perf_counter() - epoch_started,  # training and evaluation
            }
        )
    if rank != 0:
        return
    metrics = {
        "architecture": args.model,
        "hidden_channels": args.hidden_channels,
        "test_accuracy": evaluation.accuracy,
        "test_loss": evaluation.loss,
        "test_confidence": evaluation.confidence,
        "train_loss": result.train_loss,
        "history": history,
        "per_class_accuracy": evaluation.per_class_accuracy,
        "confusion_matrix": evaluation.confusion.tolist(),
        "parameters": parameters,
        "wall_seconds": time.perf_counter() - started,
        "images_per_second": trained_images / train_seconds,
        "world_size": world_size,
        "device": device.type,
        "hyperparameters": hyperparameters,
    }
    save_model(args, network, kwargs, hyperparameters, evaluation.accuracy)
    save_metrics(args, metrics, data["test_images"], data["test_labels"], evaluation.predictions.numpy())
    log.info("Saved the model to %s and the metrics to %s", args.model_dir, args.output_data_dir)


def make_optimizer(args: argparse.Namespace, parameters, device: torch.device) -> torch.optim.Optimizer:
    # One fused kernel per step instead of a few per parameter tensor (CPU and CUDA).
    fused = device.type in ("cpu", "cuda")
    if args.optimizer == "sgd":
        return torch.optim.SGD(
            parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, fused=fused
        )
    optimizer = torch.optim.Adam if args.optimizer == "adam" else torch.optim.AdamW
    return optimizer(parameters, lr=args.lr, weight_decay=args.weight_decay, fused=fused)


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, total_steps: int):
    """A learning-rate schedule stepped after every batch, or None for a constant rate."""
    if args.lr_schedule == "onecycle":
        # cycle_momentum off: --momentum keeps meaning what it says.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=args.lr, total_steps=total_steps, cycle_momentum=False
        )
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None


def _write_atomic(path: Path, write: Callable) -> None:
    """Write through a temporary file in the same directory: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            write(stream)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _write_json(path: Path, document: dict) -> None:
    _write_atomic(path, lambda stream: stream.write(json.dumps(document, indent=2).encode()))


def save_model(args, network: torch.nn.Module, kwargs: dict, hyperparameters: dict, accuracy: float) -> None:
    model_dir = Path(args.model_dir)
    # Plain contiguous CPU tensors: the artifact loads anywhere with weights_only=True.
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in network.state_dict().items()}
    _write_atomic(model_dir / "model.pth", lambda stream: torch.save(state, stream))
    config = model_config(
        args.model, kwargs, models.NUM_CLASSES, hyperparameters=hyperparameters, test_accuracy=accuracy
    )
    _write_json(model_dir / "model_config.json", config)
    handler = find_handler().parent
    shipped = [(handler / name, name) for name in HANDLER_FILES] + [(HERE / "models.py", "models.py")]
    for source, name in shipped:
        _write_atomic(model_dir / "code" / name, lambda stream, source=source: stream.write(source.read_bytes()))
    # What this job made, in its own log (which only its role may write): selection publishes the model.tar.gz in
    # its output only if it holds these very files.
    digests = {
        path.relative_to(model_dir).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(model_dir.rglob("*"))
        if path.is_file()
    }
    log.info("%s%s", MODEL_FILES_LINE, json.dumps(digests, sort_keys=True))


def save_metrics(args, metrics: dict, test_images: np.ndarray, labels: np.ndarray, predictions: np.ndarray) -> None:
    output = Path(args.output_data_dir)
    _write_json(output / "metrics.json", metrics)
    wrong = np.flatnonzero(predictions != labels)
    arrays = {
        "images": test_images[wrong],
        "labels": labels[wrong],
        "predictions": predictions[wrong].astype(np.uint8),
        "indices": wrong,
    }
    _write_atomic(output / "misclassified.npz", lambda stream: np.savez_compressed(stream, **arrays))


def report_failure(reason: str) -> None:
    """SageMaker shows the text of SM_OUTPUT_DIR/failure as the job's FailureReason."""
    if output_dir := os.environ.get("SM_OUTPUT_DIR"):
        _write_atomic(Path(output_dir) / "failure", lambda stream: stream.write(reason.encode()))


if __name__ == "__main__":
    sys.exit(main())
