"""The networks: each takes normalized images (N, 1, 28, 28), ((pixels / 255) - 0.1307) / 0.3081, and returns
log-probabilities (N, 10).

This file ships twice: in the training job's source directory and, copied by train.py, in the model artifact's
`code/` next to the inference handler. So it imports nothing but torch, and a network is rebuilt from the
artifact's model_config.json alone: `build_model(config["architecture"], **config["kwargs"])`.
"""

from __future__ import annotations

import inspect
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIDE = 28
NUM_CLASSES = 10


class SeedCNN(nn.Module):
    """The seed project's network (pytorch/examples' MNIST CNN with a variable first-layer width), unchanged."""

    def __init__(self, hidden_channels: int = 10, kernel_size: int = 5, dropout: float = 0.2):
        super().__init__()
        # Two (valid convolution, 2x2 pooling) stages: 28 -> 24 -> 12 -> 8 -> 4 with kernel 5, so 20 * 4 * 4 = 320.
        side = ((IMAGE_SIDE - kernel_size + 1) // 2 - kernel_size + 1) // 2
        if kernel_size < 1 or side < 1:
            raise ValueError(f"kernel_size {kernel_size} does not fit a 28x28 image twice (use 1 to 9)")
        self.conv1 = nn.Conv2d(1, hidden_channels, kernel_size=kernel_size)
        self.conv2 = nn.Conv2d(hidden_channels, 20, kernel_size=kernel_size)
        self.conv2_drop = nn.Dropout2d(p=dropout)
        self.fc1 = nn.Linear(20 * side * side, 50)
        self.fc2 = nn.Linear(50, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = torch.flatten(x, 1)  # This is the sweep write-up's view(-1, 320), for any kernel size and memory layout.
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)  # p=0.5 as in the sweep write-up; `dropout` sets the Dropout2d rate.
        return F.log_softmax(self.fc2(x), dim=1)


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    # No bias: the BatchNorm that follows has its own shift.
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class BNCNN(nn.Module):
    """A compact VGG-style CNN for high accuracy: 3x3 convolutions with BatchNorm in three stages of width
    c, 2c, 4c (c = hidden_channels) at 28, 14 and 7 pixels, then global average pooling and one linear layer.
    About 72k parameters at hidden_channels 16; the cost grows with hidden_channels squared."""

    def __init__(self, hidden_channels: int = 16, dropout: float = 0.1):
        super().__init__()
        c = hidden_channels
        self.features = nn.Sequential(
            *_conv_bn(1, c),
            *_conv_bn(c, c),
            nn.MaxPool2d(2),
            *_conv_bn(c, 2 * c),
            *_conv_bn(2 * c, 2 * c),
            nn.MaxPool2d(2),
            *_conv_bn(2 * c, 4 * c),
            *_conv_bn(4 * c, 4 * c),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * c, NUM_CLASSES)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.head(self.features(x)), dim=1)


class MLP(nn.Module):
    """The fully connected network of the MLP write-up (../shared/seeds/004_*), 784-128-90-50-10 with ReLU."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        sizes = [IMAGE_SIDE * IMAGE_SIDE, 128, 90, 50]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        layers.append(nn.Linear(sizes[-1], NUM_CLASSES))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.layers(x), dim=1)


MODELS: dict[str, type[nn.Module]] = {"seed_cnn": SeedCNN, "bn_cnn": BNCNN, "mlp": MLP}


def model_kwargs(architecture: str, settings: dict) -> dict:
    """The constructor arguments of ``architecture`` picked from ``settings`` (e.g. the training flags)."""
    parameters = inspect.signature(MODELS[architecture]).parameters
    return {name: settings[name] for name in parameters if name in settings}


def build_model(architecture: str, **kwargs) -> nn.Module:
    if architecture not in MODELS:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(MODELS)}")
    return MODELS[architecture](**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
