"""Data augmentation for whole batches with torch ops: a random affine warp per image (rotation, scaling, shift)
in one affine_grid/grid_sample call, and cutout by masks. No per-image Python, so it runs as fast on a batch of
128 as the network's first layer does, and on the GPU when the batch is there."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    max_rotation: float = 8.0  # degrees, either way
    max_scale: float = 0.1  # zoom in or out by up to 10%
    max_shift: float = 2.0  # pixels, along each axis
    # The hole is small because an 8x8 one (a sixth of a digit's box) cost the accurate recipe test accuracy.
    cutout_size: int = 4  # side of the square hole, in pixels
    cutout_probability: float = 0.5

    def __call__(self, images: torch.Tensor, fill: float) -> torch.Tensor:
        """Augment a batch (N, 1, H, W); ``fill`` is the background value that moves in at the borders."""
        return cutout(random_affine(images, self, fill), self.cutout_size, self.cutout_probability, fill)


def _uniform(n: int, bound: float, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, device=device) * 2 - 1) * bound


def random_affine(images: torch.Tensor, settings: Augmentation, fill: float) -> torch.Tensor:
    n, _, height, width = images.shape
    angle = _uniform(n, math.radians(settings.max_rotation), images.device)
    # The grid maps output to input coordinates: dividing by the scale enlarges the digit by that scale.
    inverse_scale = 1 / (1 + _uniform(n, settings.max_scale, images.device))
    cos, sin = torch.cos(angle) * inverse_scale, torch.sin(angle) * inverse_scale
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / side.
    shift_x = _uniform(n, settings.max_shift * 2 / width, images.device)
    shift_y = _uniform(n, settings.max_shift * 2 / height, images.device)
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    # grid_sample pads with zeros: sample the image minus its background so that the background pads it.
    warped = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped + fill


def cutout(images: torch.Tensor, size: int, probability: float, fill: float) -> torch.Tensor:
    """Blank a size x size square at a random place (it may hang over the border) in a random share of images."""
    n, _, height, width = images.shape
    device = images.device
    top = torch.randint(-(size // 2), height - size // 2, (n, 1, 1, 1), device=device)
    left = torch.randint(-(size // 2), width - size // 2, (n, 1, 1, 1), device=device)
    rows = torch.arange(height, device=device).view(1, 1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, 1, width)
    chosen = torch.rand(n, 1, 1, 1, device=device) < probability
    hole = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size) & chosen
    return images.masked_fill(hole, fill)
