"""Training speed: training/train.py against the conventional PyTorch loop, measured in the same run.

    .venv/bin/python bench/bench_training.py --out bench/results/training.json

1. `reference`: seed_cnn (hidden_channels 10) trained the way pytorch/examples' mnist/main.py does it: a
   DataLoader over a TensorDataset of the normalized images, batch 64, SGD lr 0.01 momentum 0.5, a loss read
   every 10 batches, evaluation with torch.no_grad() in batches of 1000.
2. `seed_cnn`: the same network and settings through train.py (`ratio_vs_reference` = images/s ÷ the
   reference's).
3. `accurate`: `train.py --preset accurate` (bn_cnn, hidden_channels 16), for fewer epochs than its 10.

For each: training images per second, seconds per epoch (training and evaluation) and the seconds until the
test accuracy first reached 98% and 99% (null when it did not within the epochs run). Both loops use the same
number of threads. On a shared machine the figures are noisy: the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from operator import itemgetter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "training" / "train.py"
TARGETS = (0.98, 0.99)


def summarize(history: list[dict], images_per_second: float) -> dict:
    """Speed figures from a per-epoch history of {"test_accuracy", "seconds"}."""
    elapsed, reached = 0.0, {}
    for epoch in history:
        elapsed += epoch["seconds"]
        for target in TARGETS:
            if epoch["test_accuracy"] >= target and target not in reached:
                reached[target] = round(elapsed, 2)
    return {
        "epochs": len(history),
        "images_per_second": round(images_per_second, 1),
        "seconds_per_epoch": round(elapsed / len(history), 2),
        "time_to_98_seconds": reached.get(0.98),
        "time_to_99_seconds": reached.get(0.99),
        "test_accuracy": history[-1]["test_accuracy"],
        "history": history,
    }


def reference_loop(data_dir: Path, epochs: int, threads: int, seed: int = 1) -> dict:
    """seed_cnn trained the conventional way (pytorch/examples mnist/main.py, with the data already tensors)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from training.engine import MEAN, STD
    from training.mnist_idx import load_mnist
    from training.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = load_mnist(data_dir)

    def dataset(images, labels):
        pixels = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255
        return TensorDataset((pixels - MEAN) / STD, torch.tensor(labels, dtype=torch.int64))

    train_loader = DataLoader(dataset(data["train_images"], data["train_labels"]), batch_size=64, shuffle=True)
    test_loader = DataLoader(dataset(data["test_images"], data["test_labels"]), batch_size=1000)
    model = build_model("seed_cnn", hidden_channels=10, kernel_size=5, dropout=0.2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
    history, train_seconds = [], 0.0
    for epoch in range(1, epochs + 1):
        started = time.perf_counter()
        model.train()
        for batch_idx, (x, y) in enumerate(train_loader):
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            optimizer.step()
            if batch_idx % 10 == 0:  # the example's log_interval
                loss.item()
        trained = time.perf_counter()
        model.eval()
        test_loss, correct = 0.0, 0
        with torch.no_grad():
            for x, y in test_loader:
                output = model(x)
                test_loss += F.nll_loss(output, y, reduction="sum").item()
                correct += output.argmax(dim=1).eq(y).sum().item()
        train_seconds += trained - started
        history.append(
            {
                "epoch": epoch,
                "test_loss": test_loss / len(test_loader.dataset),
                "test_accuracy": correct / len(test_loader.dataset),
                "seconds": time.perf_counter() - started,
            }
        )
    return summarize(history, epochs * len(train_loader.dataset) / train_seconds)


def train_script(data_dir: Path, epochs: int, threads: int, *flags: str) -> dict:
    """One run of train.py as SageMaker runs it (SM_* environment); its metrics.json, summarized."""
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        env = {
            **os.environ,
            "SM_CHANNEL_TRAINING": str(data_dir),
            "SM_MODEL_DIR": f"{scratch}/model",
            "SM_OUTPUT_DATA_DIR": f"{scratch}/output",
            "SM_NUM_CPUS": str(threads),
        }
        command = [sys.executable, str(TRAIN_SCRIPT), "--epochs", str(epochs), *flags]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        metrics = json.loads(Path(scratch, "output", "metrics.json").read_text())
    summary = summarize(metrics["history"], metrics["images_per_second"])
    return {"model": metrics["architecture"], "hidden_channels": metrics["hidden_channels"], **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "mnist"), help="the four MNIST files")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="for every loop")
    parser.add_argument("--seed-epochs", type=int, default=5, help="epochs of the reference and seed_cnn runs")
    parser.add_argument("--accurate-epochs", type=int, default=3, help="epochs of the accurate preset run")
    parser.add_argument("--repeats", type=int, default=1, help="alternate the seed runs; keep each one's fastest")
    args = parser.parse_args(argv)
    data = Path(args.data)
    load_before = os.getloadavg()

    references, seeds = [], []
    for _ in range(args.repeats):  # alternating, so that a busy spell of a shared machine hits both alike
        print(f"reference loop: seed_cnn, {args.seed_epochs} epochs ...", flush=True)
        references.append(reference_loop(data, args.seed_epochs, args.threads))
        print(f"train.py: seed_cnn, {args.seed_epochs} epochs ...", flush=True)
        seeds.append(train_script(data, args.seed_epochs, args.threads, "--hidden_channels", "10"))
    speed = itemgetter("images_per_second")
    reference = {"model": "seed_cnn", "hidden_channels": 10, **max(references, key=speed)}
    seed = max(seeds, key=speed)
    seed["ratio_vs_reference"] = round(seed["images_per_second"] / reference["images_per_second"], 2)
    print(f"train.py: --preset accurate, {args.accurate_epochs} epochs ...", flush=True)
    accurate = train_script(data, args.accurate_epochs, args.threads, "--preset", "accurate")

    import torch

    result = {
        "settings": {
            "threads": args.threads,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "reference": reference,
        "seed_cnn": seed,
        "accurate": accurate,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for name in ("reference", "seed_cnn", "accurate"):
        r = result[name]
        print(
            f"{name:>9}: {r['images_per_second']:8.0f} images/s, {r['seconds_per_epoch']:6.1f} s/epoch, "
            f"to 98%: {r['time_to_98_seconds']} s, to 99%: {r['time_to_99_seconds']} s, "
            f"final {100 * r['test_accuracy']:.2f}%"
        )
    print(f"seed_cnn ratio vs reference: {seed['ratio_vs_reference']}x -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
