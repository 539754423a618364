"""The training loop and the evaluation, written for speed on a small CPU as much as on a GPU.

The whole dataset lives in one tensor on the training device and batches are taken by index: no DataLoader,
no per-sample transforms, no worker processes. The loss is read back (a device sync) only when a log line is
due, and evaluation runs under inference_mode in large batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("train")

MEAN, STD = 0.1307, 0.3081  # of MNIST's training pixels, scaled to [0, 1]
BACKGROUND = (0.0 - MEAN) / STD  # a black pixel, normalized
INPUT_SHAPE = (1, 28, 28)  # one image as the networks take it: to_tensors' (N, 1, 28, 28) without N


def model_config(architecture: str, kwargs: dict, num_classes: int, **described) -> dict:
    """What an artifact's model_config.json says of its model: the network to rebuild (``build_model(architecture,
    **kwargs)``), the normalization and input shape it was trained with, and anything ``described`` beside (the
    training job's hyperparameters and test accuracy). The model server reads it (inference/predictor.py)."""
    return {
        "architecture": architecture,
        "kwargs": kwargs,
        "normalization": {"mean": MEAN, "std": STD},
        "input_shape": list(INPUT_SHAPE),
        "num_classes": num_classes,
        **described,
    }


def to_tensors(images: np.ndarray, labels: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 28, 28) and labels (N,) as normalized float images (N, 1, 28, 28) and int64 labels."""
    pixels = torch.tensor(images, dtype=torch.float32, device=device).unsqueeze(1)
    return (pixels / 255 - MEAN) / STD, torch.tensor(labels, dtype=torch.int64, device=device)


@dataclass
class Shard:
    """This process's part of every epoch: a disjoint, equal-sized share of a permutation that all ranks draw
    alike (same seed), like DistributedSampler. Equal sizes give every rank the same number of steps."""

    size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 1

    def indices(self, epoch: int, device: torch.device) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1000 + epoch)
        order = torch.randperm(self.size, generator=generator)
        usable = self.size - self.size % self.world_size
        return order[self.rank : usable : self.world_size].to(device)


def training_loss(log_probabilities: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """nll_loss, which pytorch/examples' MNIST script (seed_cnn's origin) trains with; with label smoothing,
    cross_entropy, whose own log_softmax leaves log-probabilities as they are."""
    if label_smoothing:
        return F.cross_entropy(log_probabilities, labels, label_smoothing=label_smoothing)
    return F.nll_loss(log_probabilities, labels)


@dataclass
class EpochResult:
    train_loss: float
    images: int  # trained on by all ranks together
    seconds: float


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epoch: int,
    shard: Shard,
    batch_size: int,
    label_smoothing: float = 0.0,
    augment: Callable[[torch.Tensor, float], torch.Tensor] | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    log_interval: int = 100,
) -> EpochResult:
    model.train()
    started = time.perf_counter()
    order = shard.indices(epoch, images.device)
    batches = order.split(batch_size)
    losses = []  # kept on the device: reading one back waits for the device, so only log lines do
    for step, batch in enumerate(batches, start=1):
        x, y = images[batch], labels[batch]
        if augment is not None:
            x = augment(x, BACKGROUND)
        output = model(x.contiguous(memory_format=memory_format))
        loss = training_loss(output, y, label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
        if step % log_interval == 0:
            seen = min(step * batch_size, len(order)) * shard.world_size
            log.info(
                "Train Epoch: %d [%d/%d (%.0f%%)], Train Loss: %.6f;",
                epoch,
                seen,
                shard.size,
                100 * step / len(batches),
                torch.stack(losses[-log_interval:]).mean().item(),
            )
    return EpochResult(
        train_loss=torch.stack(losses).mean().item(),
        images=len(order) * shard.world_size,
        seconds=time.perf_counter() - started,
    )


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    # The mean probability the model gives its own answer: the drift check compares served inputs' with it.
    confidence: float
    predictions: torch.Tensor  # on the CPU
    confusion: np.ndarray  # [true digit, predicted digit] counts

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(axis=1)
        return [float(self.confusion[d, d] / totals[d]) if totals[d] else 0.0 for d in range(len(totals))]


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Evaluation:
    model.eval()
    loss = torch.zeros((), device=images.device)
    confidence = torch.zeros((), device=images.device)
    predictions = []
    for x, y in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        output = model(x.contiguous(memory_format=memory_format))
        loss += F.nll_loss(output, y, reduction="sum")
        top = output.max(dim=1)  # log-probabilities: the model ends in log_softmax
        confidence += top.values.float().exp().sum()
        predictions.append(top.indices)
    predicted = torch.cat(predictions)
    classes = 10
    confusion = torch.bincount(labels * classes + predicted, minlength=classes * classes).view(classes, classes)
    return Evaluation(
        loss=loss.item() / len(labels),
        accuracy=(predicted == labels).sum().item() / len(labels),
        confidence=confidence.item() / len(labels),
        predictions=predicted.cpu(),
        confusion=confusion.cpu().numpy(),
    )
