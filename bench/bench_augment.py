"""The accurate recipe's augmentation (training/augment.py) beside torchvision's transforms, in one run, as JSON.

Why torchvision is not a dependency: PyPI's torchvision loads only beside a CUDA build of torch 2.14.1 (5.5 GB),
not beside the project's torch 2.13.0 CPU build. This measures what it would bring, in an environment that has it:

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision numpy
    /tmp/tv/bin/python bench/bench_augment.py --out bench/results/augment.json

Each way augments the same batches of 64 MNIST-sized images (the recipe's batch size), on the CPU with one thread
(as a local training job has it), with the same ranges: rotation up to 8 degrees, scale 0.9-1.1, shift up to
2 pixels, a 4x4 cutout in half the images, the background filling in:
- `project`: one batch in one call, random parameters drawn per image in tensor operations;
- `torchvision_per_image`: torchvision.transforms.v2 applied to each image (as a Dataset's transform is, per sample),
  so that every image gets its own parameters, as training needs;
- `torchvision_per_batch`: the same transforms applied once to the whole batch: fast, but one set of parameters
  for all 64 images, which is not the same augmentation (shown for the speed it would have).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))

from augment import Augmentation  # noqa: E402

# The fill is training's background: a black pixel, normalized as training/engine.py normalizes.
from engine import BACKGROUND  # noqa: E402
from results_file import write_result  # noqa: E402

BATCH = 64
SIDE = 28


def images_per_second(augment, batches: list[torch.Tensor], repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            augment(batch)
        rates.append(len(batches) * BATCH / (time.perf_counter() - started))
    return round(statistics.median(rates), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    batches = [torch.randn(BATCH, 1, SIDE, SIDE) for _ in range(args.batches)]
    settings = Augmentation()
    results = {"project": images_per_second(lambda batch: settings(batch, BACKGROUND), batches, args.repeats)}

    import torchvision
    from torchvision.transforms import v2

    cutout_area = settings.cutout_size**2 / SIDE**2
    transform = v2.Compose(
        [
            v2.RandomAffine(
                degrees=settings.max_rotation,
                translate=(settings.max_shift / SIDE, settings.max_shift / SIDE),
                scale=(1 - settings.max_scale, 1 + settings.max_scale),
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=BACKGROUND,
            ),
            v2.RandomErasing(
                p=settings.cutout_probability, scale=(cutout_area, cutout_area), ratio=(1, 1), value=BACKGROUND
            ),
        ]
    )
    results["torchvision_per_image"] = images_per_second(
        lambda batch: torch.stack([transform(image) for image in batch]), batches, args.repeats
    )
    results["torchvision_per_batch"] = images_per_second(transform, batches, args.repeats)
    report = {
        "images_per_second": results,
        "project_vs_torchvision_per_image": round(results["project"] / results["torchvision_per_image"], 2),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
        "settings": {
            "batch": BATCH,
            "batches": args.batches,
            "repeats": args.repeats,
            "threads": 1,
            "statistic": "median images/s over the repeats",
        },
    }
    write_result(args.out, report)


if __name__ == "__main__":
    main()
