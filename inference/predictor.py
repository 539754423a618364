"""How does a trained artifact become a model that answers class probabilities for a batch of pixels, fast?

A part of the inference handler (inference.py), shipped beside it and models.py in the artifact's `code/`: it
loads the network without unpickling anything, puts training's normalization in front of it, and runs each batch
through the variant (TorchScript, oneDNN or not, float32 or bfloat16) that is fastest for its size.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import time
import warnings

import torch

if __package__:  # imported from the repository, as inference.predictor
    from training.models import build_model
else:  # in the artifact's code/, which the inference toolkit puts on sys.path: models.py sits beside this file
    from models import build_model

log = logging.getLogger(__name__)

# These batch sizes are timed when the model loads, to find the size from which oneDNN is faster; beyond the
# largest, it always is.
CALIBRATION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
# Larger batches run in parts of this many images, because a part's activations stay in the CPU's caches: on one
# thread, seed_cnn computed 1,000 images over twice as fast in parts of 250-500 as in one piece.
# bench/bench_endpoint.py times 1,000-image requests (bench/results/endpoint.json, `project.batch1000`).
CPU_PART = 500
# The model's Environment (CreateModel, or a transform job's) may set the arithmetic of large batches. bfloat16
# runs bn_cnn faster on CPUs with AMX or AVX-512 BF16 (bench/results/transform_accurate.json,
# `ratio.transform_npy_bfloat16_vs_float32`), though not seed_cnn (the same key in bench/results/transform.json),
# and its probabilities are up to about a hundredth off float32's (a label in 10,000 test images may change).
PRECISION_VARIABLE = "MNIST_INFERENCE_PRECISION"
PRECISIONS = ("float32", "bfloat16")
# How far a bfloat16 variant's probabilities may be from the float32 model's on the load-time check.
BFLOAT16_TOLERANCE = 0.03
# The pixels' normalization when model_config.json names none: training's (training/engine.py's MEAN and STD,
# which this file, shipped without it, cannot import; tests/test_inference.py holds the two together).
DEFAULT_NORMALIZATION = {"mean": 0.1307, "std": 0.3081}


def load(model_dir: str) -> Predictor:
    """Rebuild the network from model_config.json and load model.pth, without unpickling anything; the precision
    of large batches comes from the environment (PRECISION_VARIABLE)."""
    with open(os.path.join(model_dir, "model_config.json")) as f:
        config = json.load(f)
    network = build_model(config["architecture"], **config.get("kwargs", {}))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    weights = os.path.join(model_dir, "model.pth")
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as exc:  # torch's message (chained below) opens with a note on its change of default
        raise ValueError(f"{weights}: not a state_dict of tensors that torch.load(weights_only=True) accepts") from exc
    network.load_state_dict(state)
    normalization = config.get("normalization", DEFAULT_NORMALIZATION)
    classifier = MnistClassifier(network, normalization["mean"], normalization["std"]).to(device)
    return Predictor(classifier, device, os.environ.get(PRECISION_VARIABLE, "float32"))


class MnistClassifier(torch.nn.Module):
    """The trained network behind the normalization it was trained with; answers class probabilities."""

    def __init__(self, network: torch.nn.Module, mean: float, std: float):
        super().__init__()
        self.network = network
        self.offset, self.scale = 255.0 * mean, 1.0 / (255.0 * std)  # ((pixels / 255) - mean) / std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.network((pixels - self.offset) * self.scale).exp()


class _Bfloat16(torch.nn.Module):
    """The classifier under autocast to bfloat16, in channels-last layout (oneDNN's fast path): convolutions and
    matrix products in bfloat16, the normalization and the softmax in float32 (less error than a model cast to
    bfloat16 whole)."""

    def __init__(self, classifier: MnistClassifier):
        super().__init__()
        self.classifier = copy.deepcopy(classifier).to(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            return self.classifier(pixels.contiguous(memory_format=torch.channels_last)).float()


class Predictor:
    """Runs a batch through the variant of the classifier that is fastest for its size.

    On the CPU, TorchScript saves the Python overhead of every layer, and two variants split the batch sizes:
    oneDNN's kernels win on large batches, but their setup on every call takes longer than a single image's whole
    forward pass. Small batches therefore run a frozen trace with oneDNN off, which does its 2x2 max-pooling as
    elementwise maxima because torch's NCHW pooling kernel is slow. Where one variant overtakes the other depends on
    the network, so it is timed when the model loads; the log line "batches of N images or more computed in ..."
    reports each model's crossover. In ``precision`` bfloat16 the large variant computes in bfloat16, where the CPU
    has it."""

    def __init__(self, classifier: MnistClassifier, device: torch.device, precision: str = "float32"):
        self.classifier, self.device = classifier.eval(), device
        self.precision = _supported(precision, device)
        self.small = self.large = classifier
        self.large_from = 1
        if device.type == "cpu":
            self.small, self.large, self.precision = _traced(classifier, self.precision)
            self.large_from = self._crossover()
        log.info("batches of %d images or more computed in %s", self.large_from, self.precision)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cpu":
            return self.classifier(pixels.to(self.device)).cpu()
        large = len(pixels) >= self.large_from
        torch.backends.mkldnn.enabled = large
        variant = self.large if large else self.small
        if len(pixels) <= CPU_PART:
            return variant(pixels)
        return torch.cat([variant(part) for part in pixels.split(CPU_PART)])

    def _crossover(self) -> int:
        """The smallest calibration size from which on the large variant was faster at every size timed."""
        large_faster = {}
        with torch.inference_mode():
            for size in CALIBRATION_SIZES:
                pixels = torch.rand(size, 1, 28, 28) * 255
                large_faster[size] = _best_time(self.large, pixels, True) < _best_time(self.small, pixels, False)
        sizes = reversed(CALIBRATION_SIZES)
        return min(itertools.takewhile(large_faster.get, sizes), default=CALIBRATION_SIZES[-1] + 1)


def _best_time(variant, pixels: torch.Tensor, mkldnn: bool, calls: int = 5) -> float:
    torch.backends.mkldnn.enabled = mkldnn
    variant(pixels)  # warm
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        variant(pixels)
        times.append(time.perf_counter() - start)
    return min(times)


def bfloat16_native() -> bool:
    """Whether this CPU computes bfloat16 itself (AMX or AVX-512 BF16), as oneDNN finds."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _supported(precision: str, device: torch.device) -> str:
    """``precision``, or float32 (with a warning) where it would not pay: on a CPU without bfloat16 arithmetic
    (emulated, it is slower than float32, which it is only there to outrun), and on a GPU, where float32 is fast
    enough for a network this small."""
    if precision not in PRECISIONS:
        raise ValueError(f"{PRECISION_VARIABLE}={precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "bfloat16" and (device.type != "cpu" or not bfloat16_native()):
        log.warning(
            "serving float32: %s asks for bfloat16, which pays only on a CPU that computes it natively",
            PRECISION_VARIABLE,
        )
        return "float32"
    return precision


def _traced(classifier: MnistClassifier, precision: str = "float32") -> tuple:
    """(small-batch, large-batch) TorchScript variants of the classifier, each checked against the eager model
    on a batch of another size than the one traced; the eager model where tracing fails or disagrees. The large
    variant computes in ``precision``, which comes back third: float32 where the eager model replaced it.
    TorchScript is deprecated in favour of torch.compile, which needs a C++ toolchain and minutes per shape."""
    example, check = torch.zeros(1, 1, 28, 28), torch.rand(3, 1, 28, 28) * 255
    large_model = _Bfloat16(classifier).eval() if precision == "bfloat16" else classifier
    tolerances = (1e-5, BFLOAT16_TOLERANCE if precision == "bfloat16" else 1e-5)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notices
        expected = classifier(check)
        try:
            small = torch.jit.freeze(torch.jit.trace(_with_fast_pooling(classifier), example))
            variants = (small, torch.jit.optimize_for_inference(torch.jit.trace(large_model, example)))
        except Exception as exc:  # a model TorchScript cannot handle still serves, only slower
            log.warning("serving the eager model: tracing failed (%s)", exc)
            return classifier, classifier, "float32"
        checked = []
        for variant, large, tolerance in zip(variants, (False, True), tolerances, strict=True):
            torch.backends.mkldnn.enabled = large
            # The first calls profile and optimize the graph: make them here rather than in the first requests.
            agrees = all(torch.allclose(variant(check), expected, atol=tolerance) for _ in range(3))
            if not agrees:
                log.warning(
                    "serving the eager model for %s batches: the trace disagrees", "large" if large else "small"
                )
            checked.append(variant if agrees else classifier)
    small, large = checked
    return small, large, precision if large is not classifier else "float32"


def _with_fast_pooling(classifier: torch.nn.Module) -> torch.nn.Module:
    """The classifier with every plain 2x2 max-pooling computed by `_max_pool_2x2` (a torch.fx rewrite); as it
    is where torch.fx cannot trace it."""
    try:
        graph = torch.fx.symbolic_trace(classifier)
    except Exception:  # control flow that depends on the input: keep torch's pooling
        return classifier
    for node in graph.graph.nodes:
        if _is_plain_2x2_max_pool(node, graph):
            node.op, node.target, node.args, node.kwargs = "call_function", _max_pool_2x2, node.args[:1], {}
    graph.recompile()
    return graph


_MAX_POOL_PARAMETERS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _is_plain_2x2_max_pool(node: torch.fx.Node, graph: torch.fx.GraphModule) -> bool:
    if node.op == "call_function" and node.target is torch.nn.functional.max_pool2d:
        given = dict(zip(_MAX_POOL_PARAMETERS, node.args, strict=False)) | node.kwargs
        kernel = given["kernel_size"]
        sizes = [kernel, given.get("stride") or kernel, given.get("padding", 0), given.get("dilation", 1)]
        flags = [given.get("ceil_mode", False), given.get("return_indices", False)]
    elif node.op == "call_module" and type(module := graph.get_submodule(node.target)) is torch.nn.MaxPool2d:
        sizes = [module.kernel_size, module.stride or module.kernel_size, module.padding, module.dilation]
        flags = [module.ceil_mode, module.return_indices]
    else:
        return False
    pairs = [tuple(size) if isinstance(size, tuple | list) else (size, size) for size in sizes]
    return pairs == [(2, 2), (2, 2), (0, 0), (1, 1)] and not any(flags)


def _max_pool_2x2(maps: torch.Tensor) -> torch.Tensor:
    """max_pool2d(maps, 2) as two elementwise maxima of strided views: the same values, and on a few images
    faster than torch's NCHW pooling kernel. It serves the small batches that single-image requests make, whose
    rate bench/bench_endpoint.py measures (bench/results/endpoint.json, `project.c8`).
    Even places up to the last one but not it, against odd ones: an odd last row or column is left out, as
    max_pool2d does, with no arithmetic on sizes for the trace to record."""
    maps = torch.maximum(maps[..., 0:-1:2], maps[..., 1::2])
    return torch.maximum(maps[..., 0:-1:2, :], maps[..., 1::2, :])
