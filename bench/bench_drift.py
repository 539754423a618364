"""The drift statistics (data_checks/drift.py): their figures on clean and damaged windows of the official MNIST
test set, from which its thresholds come, and their speed on 100,000 inputs, as JSON.

    .venv/bin/python bench/bench_drift.py --out bench/results/drift.json

1. A real model answers: seed_cnn (hidden_channels 10) trained on the official training set for a few epochs on the
   CPU (about a minute), as training/train.py's defaults train it but with momentum 0.9. Its mean top-class
   probability on the test set is the `test_confidence` every window is compared with.
2. `clean`: random windows (without replacement) of the official test digits at 100, 500 and 1,000 requests, each
   judged with min_requests equal to its size, and the whole test set once: per figure its least, median and
   greatest value, how many windows the default thresholds call drift, and by which figures.
   `clean_contiguous`: every consecutive block of MIN_REQUESTS digits of the training set (120) and of the test set
   (20). MNIST keeps a writer's digits together, so a block holds few writers: clean data, but a narrower
   population than a random window, as served traffic from few users would be.
3. `damaged`: the whole test set damaged one way (inverted, rotated, shifted, dilated, eroded, dimmed, mirrored,
   noisy, a share of it damaged, or only its ones and sevens kept), the model's answers to the damaged digits,
   then random windows of MIN_REQUESTS requests and the whole damaged set.
4. `mean_image_alternatives`: the mean-image figure drift.py computes (the whole window's mean image against the
   reference's class means mixed in the window's predicted proportions) beside the one it does not (per predicted
   class, weighted by the classes' shares): how far each damage's windows lie from 1 over how far the worst clean
   random window and the worst training block lie (higher parts them better).
5. `timing`: drift_report on 100,000 inputs (the test set ten times over, with the model's answers), median of 3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from results_file import write_result  # noqa: E402

from data_checks import drift  # noqa: E402
from training.mnist_idx import load_mnist  # noqa: E402

CLEAN_SIZES = (100, 500, 1000)
TIMED_INPUTS = 100_000
TARGET_S = 5.0
SIDE = 28


def train_model(arrays: dict, epochs: int, seed: int):
    """seed_cnn trained on the official training set; returns a function from raw pixels (N, 28, 28) to
    probabilities (N, 10), and the training settings and results."""
    import torch
    import torch.nn.functional as F

    from training.engine import MEAN, STD
    from training.models import build_model

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    network = build_model("seed_cnn", hidden_channels=10, kernel_size=5, dropout=0.2)

    def normalized(pixels: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1) / 255 - MEAN) / STD

    images, labels = normalized(arrays["train_images"]), torch.from_numpy(arrays["train_labels"].astype(np.int64))
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
    started = time.perf_counter()
    network.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images)).split(64):
            optimizer.zero_grad(set_to_none=True)
            F.nll_loss(network(images[batch]), labels[batch]).backward()
            optimizer.step()
    network.eval()
    seconds = time.perf_counter() - started

    @torch.inference_mode()
    def probabilities(pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([network(x).exp().double().numpy() for x in normalized(pixels).split(2000)])

    return probabilities, {
        "architecture": "seed_cnn",
        "hidden_channels": 10,
        "epochs": epochs,
        "batch": 64,
        "lr": 0.01,
        "momentum": 0.9,
        "seed": seed,
        "train_seconds": round(seconds, 1),
    }


def rotated(images: np.ndarray, degrees: float) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(x).rotate(degrees, resample=Image.BILINEAR)) for x in images])


def shifted(images: np.ndarray, down: int, right: int) -> np.ndarray:
    out = np.zeros_like(images)
    out[:, down:, right:] = images[:, : SIDE - down, : SIDE - right]
    return out


def filtered(images: np.ndarray, reduce, size: int) -> np.ndarray:
    """A size x size maximum (dilation) or minimum (erosion) filter, zeros beyond the frame."""
    padded = np.pad(images, ((0, 0), (size // 2, (size - 1) // 2), (size // 2, (size - 1) // 2)))
    views = [padded[:, i : i + SIDE, j : j + SIDE] for i in range(size) for j in range(size)]
    return reduce(np.stack(views), axis=0)


def part(images: np.ndarray, damage, share: float, seed: int) -> np.ndarray:
    """A share of the images (chosen at random) damaged, the rest as they were."""
    out = images.copy()
    chosen = np.random.default_rng(seed).random(len(images)) < share
    out[chosen] = damage(images[chosen])
    return out


def noisy(images: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).integers(0, 60, images.shape)
    return np.minimum(images.astype(np.int64) + noise, 255).astype(np.uint8)


DAMAGES = {
    "inverted": lambda x: 255 - x,
    "rotated_15": lambda x: rotated(x, 15),
    "rotated_30": lambda x: rotated(x, 30),
    "rotated_45": lambda x: rotated(x, 45),
    "shifted_3_3": lambda x: shifted(x, 3, 3),
    "shifted_0_6": lambda x: shifted(x, 0, 6),
    "dilated_3x3": lambda x: filtered(x, np.max, 3),
    "eroded_2x2": lambda x: filtered(x, np.min, 2),
    "eroded_3x3": lambda x: filtered(x, np.min, 3),
    "dimmed_60pct": lambda x: np.rint(x * 0.6).astype(np.uint8),
    "mirrored": lambda x: x[:, :, ::-1].copy(),
    "noisy_0_60": lambda x: noisy(x, 1),
    "inverted_10pct": lambda x: part(x, lambda y: 255 - y, 0.1, 2),
    "rotated_30_in_50pct": lambda x: part(x, lambda y: rotated(y, 30), 0.5, 3),
}


def per_class_corr(images: np.ndarray, probabilities: np.ndarray, reference) -> float:
    """The mean-image figure drift.py does not use: per predicted class, the window's mean image of the class against
    the reference's, the correlations averaged with the classes' shares of the window as weights."""
    predicted = probabilities.argmax(axis=1)
    flat = images.reshape(len(images), -1).astype(np.float64)
    total = 0.0
    for k in np.unique(predicted):
        members = predicted == k
        mean = flat[members].mean(axis=0)
        if mean.std() > 0:
            total += members.mean() * float(np.corrcoef(mean, reference.mean_images[k])[0, 1])
    return total


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 4), "median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def judge_windows(images, probabilities, confidence, size, windows, rng, min_requests) -> dict:
    """Random windows of ``size`` requests (the whole set when it is that size)."""
    blocks = [
        np.sort(rng.choice(len(images), size, replace=False)) if size < len(images) else np.arange(size)
        for _ in range(windows)
    ]
    return judge_blocks(images, probabilities, confidence, blocks, min_requests)


def judge_blocks(images, probabilities, confidence, blocks, min_requests=drift.MIN_REQUESTS) -> dict:
    reference = drift._official_reference()
    figures, alternative, flagged, drifted = {}, [], {}, 0
    for chosen in blocks:
        report = drift.drift_report(
            images[chosen], probabilities[chosen], test_confidence=confidence, min_requests=min_requests, atypical=0
        )
        for key, value in report["figures"].items():
            figures.setdefault(key, []).append(value)
        alternative.append(per_class_corr(images[chosen], probabilities[chosen], reference))
        drifted += report["verdict"] == "drift"
        for reason in report["reasons"]:
            key = reason.split(" ", 1)[0]
            flagged[key] = flagged.get(key, 0) + 1
    return {
        "requests": len(blocks[0]),
        "windows": len(blocks),
        "drift_verdicts": drifted,
        "flagged_by": flagged,
        "figures": {key: summary(values) for key, values in figures.items()},
        "per_class_mean_image_corr": summary(alternative),
    }


def pick(result: dict, key: str) -> dict:
    """A figure's summary from judge_blocks' result (the alternative mean-image figure sits beside the others)."""
    return result["figures"][key] if key in result["figures"] else result[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "mnist"))
    parser.add_argument("--out", default="bench/results/drift.json")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--clean-windows", type=int, default=1000)
    parser.add_argument("--damaged-windows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()

    arrays = load_mnist(args.data)
    images, labels = arrays["test_images"], arrays["test_labels"]
    predict, model = train_model(arrays, args.epochs, seed=0)
    probabilities = predict(images)
    confidence = float(probabilities.max(axis=1).mean())
    model["test_accuracy"] = round(float((probabilities.argmax(axis=1) == labels).mean()), 4)
    model["test_confidence"] = round(confidence, 4)
    print(json.dumps(model), flush=True)

    rng = np.random.default_rng(0)
    clean = {}
    for size in (*CLEAN_SIZES, len(images)):
        windows = args.clean_windows if size < len(images) else 1
        clean[str(size)] = judge_windows(images, probabilities, confidence, size, windows, rng, min_requests=size)
        print(size, json.dumps(clean[str(size)]["figures"]), flush=True)

    # Consecutive blocks of official digits come from few writers each (MNIST keeps a writer's digits together):
    # clean data, but a narrower population than random windows.
    train_probabilities = predict(arrays["train_images"])
    contiguous = {}
    for split, split_images, split_probabilities in (
        ("train", arrays["train_images"], train_probabilities),
        ("test", images, probabilities),
    ):
        blocks = [
            np.arange(start, start + drift.MIN_REQUESTS) for start in range(0, len(split_images), drift.MIN_REQUESTS)
        ]
        contiguous[split] = judge_blocks(split_images, split_probabilities, confidence, blocks)
        print("contiguous", split, contiguous[split]["drift_verdicts"], contiguous[split]["flagged_by"], flush=True)

    damaged = {}
    conditions = {name: (damage(images), None) for name, damage in DAMAGES.items()}
    skewed = np.isin(labels, (1, 7))
    conditions["only_ones_and_sevens"] = (images[skewed], skewed)
    for name, (damaged_images, kept) in conditions.items():
        answers = predict(damaged_images)
        damaged[name] = {
            "windows": judge_windows(
                damaged_images, answers, confidence, drift.MIN_REQUESTS, args.damaged_windows, rng, drift.MIN_REQUESTS
            ),
            "whole_set": drift.drift_report(damaged_images, answers, test_confidence=confidence, atypical=0),
            "accuracy": round(
                float((answers.argmax(axis=1) == labels[kept if kept is not None else slice(None)]).mean()), 4
            ),
        }
        damaged[name]["whole_set"].pop("atypical")
        print(name, damaged[name]["windows"]["drift_verdicts"], damaged[name]["windows"]["flagged_by"], flush=True)

    # How well each mean-image figure parts damage from clean data: a damaged window's distance from 1 (its greatest
    # correlation's) over the worst clean one's, of random windows and of the training set's consecutive blocks.
    alternatives = {}
    for name, key in (("whole_window", "mean_image_corr"), ("per_predicted_class", "per_class_mean_image_corr")):
        worst_random = 1 - pick(clean[str(drift.MIN_REQUESTS)], key)["min"]
        worst_block = 1 - pick(contiguous["train"], key)["min"]
        alternatives[name] = {
            "worst_clean_random": round(1 - worst_random, 4),
            "worst_training_block": round(1 - worst_block, 4),
            "over_random": {
                d: round((1 - pick(r["windows"], key)["max"]) / worst_random, 2) for d, r in damaged.items()
            },
            "over_training_blocks": {
                d: round((1 - pick(r["windows"], key)["max"]) / worst_block, 2) for d, r in damaged.items()
            },
        }

    many = np.tile(images, (TIMED_INPUTS // len(images), 1, 1))
    many_probabilities = np.tile(probabilities, (TIMED_INPUTS // len(images), 1))
    runs = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        drift.drift_report(many, many_probabilities, test_confidence=confidence)
        runs.append(time.perf_counter() - started)

    result = {
        "settings": {
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "numpy": np.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "model": model,
        "min_requests": drift.MIN_REQUESTS,
        "thresholds": drift.THRESHOLDS,
        "timing": {
            "inputs": len(many),
            "runs_s": [round(r, 3) for r in runs],
            "median_s": round(statistics.median(runs), 3),
            "target_s": TARGET_S,
            "meets_target": statistics.median(runs) < TARGET_S,
        },
        "clean": clean,
        "clean_contiguous": contiguous,
        "damaged": damaged,
        "mean_image_alternatives": alternatives,
    }
    write_result(args.out, result, result["timing"])


if __name__ == "__main__":
    main()
