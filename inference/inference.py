"""SageMaker PyTorch inference handlers for the MNIST classifier: `model_fn`, `input_fn`, `predict_fn`, `output_fn`.

This file ships inside model.tar.gz as `code/inference.py`, next to `code/models.py`; the SageMaker PyTorch
container and the local server (`python -m inference.serve`) both import it from there, with `code/` on sys.path.
It needs only torch, numpy and Pillow, which the SageMaker PyTorch inference image already has.

Requests (one or more images of raw MNIST pixels, 0-255, white ink on black):
- `application/json`: `{"instances": [image, ...]}`, each image 28x28 nested lists or 784 numbers.
- `application/x-npy`: a numeric .npy array of one image or a batch (never unpickled).
- `text/csv`: one image per row, 784 values.
- `image/png`, `image/jpeg`: a picture of one digit, any size and colour, converted the way MNIST was made.
Response (`application/json`): `{"predictions": [{"label": 7, "probabilities": [10 floats]}, ...]}`.

Bad input raises `InvalidRequest`, which carries a 4xx status code: the SageMaker toolkit answers an exception
derived from its `BaseInferenceToolkitError` with that code, and so does the local server.
"""

from __future__ import annotations

import contextlib
import copy
import http
import io
import itertools
import json
import logging
import math
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from models import build_model
from PIL import Image, ImageOps

try:  # orjson parses a pixel list several times faster than json does, but the SageMaker image may not have it.
    import orjson
except ImportError:
    orjson = None

try:  # inside the SageMaker inference container: its toolkit maps these to the HTTP status they carry
    from sagemaker_inference.errors import BaseInferenceToolkitError
except ImportError:

    class BaseInferenceToolkitError(Exception):
        """Same shape as the toolkit's class, for running anywhere else."""

        def __init__(self, status_code: int, message: str, phrase: str):
            self.status_code, self.message, self.phrase = status_code, message, phrase
            super().__init__(status_code, message, phrase)


log = logging.getLogger(__name__)

JSON = "application/json"
NPY = "application/x-npy"
CSV = "text/csv"
IMAGE_TYPES = ("image/png", "image/jpeg")
IMAGE_FORMATS = ("PNG", "JPEG")  # either is read whichever image type the request names
CONTENT_TYPES = (JSON, NPY, CSV, *IMAGE_TYPES)

PIXELS = 28 * 28
# Shapes of one image; a batch has one more, leading, dimension.
IMAGE_SHAPES = ((PIXELS,), (28, 28), (1, 28, 28))
# A 6 MB PNG can decode to gigabytes. A picture is refused before it is decoded when it has more pixels than a
# 12-megapixel phone photo, far above any digit's: decoding one then takes about 110 MB at most (RGBA, grey, float).
MAX_IMAGE_PIXELS = 12_000_000
# These batch sizes are timed when the model loads, to find the size from which oneDNN is faster; beyond the
# largest, it always is.
CALIBRATION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16)
# Larger batches run in parts of this many images, because a part's activations stay in the CPU's caches: on one
# thread, seed_cnn computed 1,000 images over twice as fast in parts of 250-500 as in one piece.
# bench/bench_endpoint.py times 1,000-image requests (bench/results/endpoint.json, `project.batch1000`).
CPU_PART = 500
# JSON bodies from this size on (3 images and more) are read by numpy rather than as Python objects, and from
# the next on in one part per core.
NUMPY_JSON_BYTES = 8 * 1024
PARALLEL_JSON_BYTES = 1024 * 1024
# A picture whose darkest and lightest parts differ by less than this holds no digit.
MIN_CONTRAST = 32
# The model's Environment (CreateModel, or a transform job's) may set the arithmetic of large batches. bfloat16
# runs bn_cnn faster on CPUs with AMX or AVX-512 BF16 (bench/results/transform_accurate.json,
# `ratio.transform_npy_bfloat16_vs_float32`), though not seed_cnn (the same key in bench/results/transform.json),
# and its probabilities are up to about a hundredth off float32's (a label in 10,000 test images may change).
PRECISION_VARIABLE = "MNIST_INFERENCE_PRECISION"
PRECISIONS = ("float32", "bfloat16")
# How far a bfloat16 variant's probabilities may be from the float32 model's on the load-time check.
BFLOAT16_TOLERANCE = 0.03
# The pixels' normalization when model_config.json names none: training's (training/engine.py's MEAN and STD,
# which this file, shipped alone, cannot import; tests/test_inference.py holds the two together).
DEFAULT_NORMALIZATION = {"mean": 0.1307, "std": 0.3081}


class InvalidRequest(BaseInferenceToolkitError):
    """The request cannot be answered as sent (4xx); the message says what is wrong with it."""

    def __init__(self, message: str, status_code: int = http.HTTPStatus.BAD_REQUEST):
        super().__init__(int(status_code), message, http.HTTPStatus(status_code).phrase)

    def __str__(self) -> str:
        return self.message


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
    matrix products in bfloat16, the normalization and the softmax in float32 (half the error of a model cast
    to bfloat16 whole, at the same speed here)."""

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
    the network, so it is timed when the model loads, in a fraction of a second: on this machine seed_cnn's small
    variant stayed faster at every calibration size, and bn_cnn's large one was faster from a few images on. The
    log line "batches of N images or more computed in ..." reports each model's crossover. In ``precision``
    bfloat16 the large variant computes in bfloat16, where the CPU has it."""

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
    (emulated, it is slower than float32, which it is only there to outrun), and on a GPU, where the whole model
    takes a fraction of a millisecond."""
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
    several times faster than torch's NCHW pooling kernel. It serves the small batches that single-image requests
    make, whose rate bench/bench_endpoint.py measures (bench/results/endpoint.json, `project.c8`).
    Even places up to the last one but not it, against odd ones: an odd last row or column is left out, as
    max_pool2d does, with no arithmetic on sizes for the trace to record."""
    maps = torch.maximum(maps[..., 0:-1:2], maps[..., 1::2])
    return torch.maximum(maps[..., 0:-1:2, :], maps[..., 1::2, :])


def model_fn(model_dir: str) -> Predictor:
    """Rebuild the network from model_config.json and load model.pth, without unpickling anything."""
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


def input_fn(request_body: bytes | str, content_type: str) -> torch.Tensor:
    """Decode a request into a float tensor (N, 1, 28, 28) of raw pixel values 0-255."""
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in CONTENT_TYPES:
        raise InvalidRequest(
            f"unsupported content type {content_type!r}; send one of {', '.join(CONTENT_TYPES)}",
            http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
        )
    if not request_body:
        raise InvalidRequest("empty request body")
    try:
        if media_type == JSON:
            batch = _json_pixels(request_body)
        elif media_type == NPY:
            batch = _npy_pixels(request_body)
        elif media_type == CSV:
            batch = _csv_pixels(request_body)
        else:
            batch = _image_pixels(request_body)[np.newaxis]
        return torch.from_numpy(_checked_batch(batch))
    # Each decoder refuses what it knows to be wrong, naming it; what a library may still raise on a body built to
    # exhaust it is the sender's too, and must never count as the endpoint failing (a 5xx).
    except MemoryError:
        raise InvalidRequest(
            f"the {media_type} body is too large to decode", http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        ) from None
    except RecursionError:
        raise InvalidRequest(f"the {media_type} body is nested too deeply to decode") from None


def predict_fn(data: torch.Tensor, model: Predictor) -> torch.Tensor:
    """Class probabilities (N, 10), on the CPU."""
    with torch.inference_mode():
        return model(data)


def output_fn(prediction: torch.Tensor, accept: str | None) -> tuple[bytes, str]:
    """Serialize the probabilities and the predicted digit of each image as JSON."""
    if accept and not any(kind in accept for kind in (JSON, "*/*")):
        raise InvalidRequest(f"cannot answer in {accept!r}; accept {JSON}", http.HTTPStatus.NOT_ACCEPTABLE)
    labels = prediction.argmax(dim=1).tolist()
    body = {
        "predictions": [
            {"label": label, "probabilities": probabilities}
            for label, probabilities in zip(labels, prediction.tolist(), strict=True)
        ]
    }
    return (orjson.dumps(body) if orjson else json.dumps(body).encode()), JSON


def _json_pixels(body: bytes | str) -> np.ndarray:
    body = body.encode() if isinstance(body, str) else body  # the SageMaker toolkit hands JSON over as text
    if len(body) >= NUMPY_JSON_BYTES and (pixels := _integer_pixels(body)) is not None:
        return pixels
    try:
        document = orjson.loads(body) if orjson else json.loads(body)
    except ValueError as exc:
        # orjson refuses NaN and Infinity; the stdlib reads them, and _checked_batch names them.
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the stdlib parser goes
            raise InvalidRequest(f"malformed JSON: {exc}") from None
    if not isinstance(document, dict) or "instances" not in document:
        raise InvalidRequest('JSON body must be an object {"instances": [image, ...]}')
    instances = document["instances"]
    if not isinstance(instances, list):
        raise InvalidRequest('"instances" must be a list of images')
    # Nothing but integers after the key (no fraction, exponent, string or object): numpy converts them to
    # uint8 directly, half again as fast, and raises for what does not fit; the general way then says why.
    values = body[body.find(b'"instances"') + 11 :]
    if not any(mark in values for mark in (b".", b"e", b"E", b'"', b"{")):
        with contextlib.suppress(ValueError, TypeError, OverflowError):
            return np.array(instances, dtype=np.uint8)
    try:
        return np.array(instances)
    except (ValueError, OverflowError) as exc:
        raise InvalidRequest(f"instances must be images of one shape (28x28 or 784 numbers each): {exc}") from None


_INSTANCES_OPENING = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"instances"[ \t\n\r]*:[ \t\n\r]*\[')
_JSON_SPACE = b" \t\n\r"
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_json_threads: ThreadPoolExecutor | None = None


def _integer_pixels(body: bytes, parts: int | None = None) -> np.ndarray | None:
    """The instances as a uint8 array when the body is `{"instances": [...]}` alone and they are a regular nested
    array of integers 0-255 (what clients send); None for anything else (malformed, other keys, other numbers,
    ragged): the general parser then reads it, or says what is wrong with it.

    numpy reads the body without a Python object per number, and from PARALLEL_JSON_BYTES on it reads one part per
    core, because numpy lets go of the GIL. That reads 1,000 images of 28x28 over twice as fast as orjson does on
    one core, and faster still on two; bench/bench_endpoint.py times whole 1,000-image requests
    (bench/results/endpoint.json, `project.batch1000`). The parts are split at commas between the instances.
    """
    opening, closing = _INSTANCES_OPENING.match(body), body.rfind(b"]")
    if opening is None or closing < opening.end() or body[closing + 1 :].strip(_JSON_SPACE) != b"}":
        return None
    start = opening.end()
    spans = _parts(body, start, closing, parts or min(_CPUS, 1 + (closing - start) // PARALLEL_JSON_BYTES))
    if len(spans) == 1:
        arrays = [_regular_integers(body, *spans[0])]
    else:
        global _json_threads
        if _json_threads is None:
            _json_threads = ThreadPoolExecutor(_CPUS, thread_name_prefix="json")
        others = [_json_threads.submit(_regular_integers, body, *span) for span in spans[1:]]
        arrays = [_regular_integers(body, *spans[0]), *(other.result() for other in others)]
    if any(array is None for array in arrays) or len({array.shape[1:] for array in arrays}) != 1:
        return None
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _parts(body: bytes, start: int, end: int, parts: int) -> list[tuple[int, int]]:
    """body[start:end], the inside of an array, as up to ``parts`` spans of its elements: split at a comma that
    follows as many "]" as the first element opens with "[" (in a regular array, a comma between elements). A
    split anywhere else makes a part that is not an array of elements, which _regular_integers turns down."""
    head = body[start : start + 64].translate(None, _JSON_SPACE)
    depth = len(head) - len(head.lstrip(b"["))
    bounds = [start]
    for part in range(1, parts if depth else 1):
        comma = body.find(b"]" * depth + b",", start + (end - start) * part // parts, end)
        if comma > bounds[-1]:
            bounds.append(comma + depth + 1)
    return list(zip(bounds, [bound - 1 for bound in bounds[1:]] + [end], strict=True))


def _regular_integers(body: bytes, start: int, end: int) -> np.ndarray | None:
    """The elements of the array whose inside is body[start:end], as uint8, if they are regular nested arrays of
    integers 0-255 in JSON; None otherwise. Vectorized: the array's skeleton (its brackets and commas, a "0" for
    each number) must be exactly that of its shape, and each number is read from its last digit and the two
    characters before it."""
    if end <= start:
        return None
    # With the two characters before it (the body has them): a number's first digits are read from there.
    before = np.frombuffer(body, np.uint8, end - start + 2, start - 2)
    text = before[2:]
    digit = (text - np.uint8(ord("0"))) < 10
    # Below "," JSON allows only white space here; '"', "+" and control characters are not for this path.
    space = text < ord(",")
    spaces = np.count_nonzero(space)
    if spaces not in (0, np.count_nonzero(text == ord(" "))) and spaces != sum(
        np.count_nonzero(text == character) for character in _JSON_SPACE
    ):
        return None
    keep = np.empty_like(digit)  # what is not space, and of a number only its last digit
    np.logical_and(digit[:-1], digit[1:], out=keep[:-1])
    keep[-1] = False
    np.logical_or(keep, space, out=keep)
    np.logical_not(keep, out=keep)
    tokens = keep.nonzero()[0]
    skeleton = bytearray(b"[" + text[tokens].tobytes() + b"]")
    shape, strides = _lattice(skeleton)
    if shape is None:
        return None
    # The numbers' places in the skeleton: each must hold a digit; with "0" there, the rest must be the shape's.
    depth = len(shape)
    numbers = np.lib.stride_tricks.as_strided(np.frombuffer(skeleton, np.uint8)[depth:], shape, strides)
    if ((numbers - np.uint8(ord("0"))) >= 10).any():
        return None
    numbers[...] = ord("0")
    if skeleton != _skeleton(shape):
        return None
    # Where each number's last digit is in the text; in `before`, at last + 2.
    last = np.lib.stride_tricks.as_strided(tokens[depth - 1 :], shape, [s * tokens.itemsize for s in strides]).ravel()
    first, second = before.take(last) ^ np.uint8(ord("0")), before.take(last + 1) ^ np.uint8(ord("0"))
    leading = _LEADING_DIGITS.take((first.astype(np.uint16) << 8) | second)
    value = leading + (text.take(last) ^ np.uint8(ord("0")))
    # Every digit is one of these numbers': one of 4 digits or more, or with a leading zero (not JSON), shows
    # as digits left uncounted.
    counted = value.size + np.count_nonzero(leading >= 10) + np.count_nonzero(leading >= 100)
    if value.max() > 255 or counted != np.count_nonzero(digit):
        return None
    return value.astype(np.uint8).reshape(shape)


def _leading_digits() -> np.ndarray:
    """The value of the digits before a number's last one, by the two characters before it (XOR "0", so that a
    digit is 0-9): key = first << 8 | second."""
    first, second = np.divmod(np.arange(1 << 16), 256)
    tens, hundreds = second < 10, (second < 10) & (first < 10)
    return (np.where(tens, 10 * second, 0) + np.where(hundreds, 100 * first, 0)).astype(np.uint16)


_LEADING_DIGITS = _leading_digits()


def _lattice(skeleton: bytes | bytearray) -> tuple[tuple[int, ...], tuple[int, ...]] | tuple[None, None]:
    """Shape of the regular nested array whose skeleton this may be, judged by its first element at each depth,
    and the strides of its numbers in the skeleton (the first sits after the opening brackets)."""
    depth = len(skeleton) - len(skeleton.lstrip(b"["))
    if not skeleton[depth : depth + 1].isdigit():
        return None, None
    shape, strides, inner = [], [], 1  # inner: the skeleton length of one element a level down
    for level in range(depth, 0, -1):
        closing = skeleton.find(b"]" * (depth - level + 1))  # where the first array at this level ends
        size, rest = divmod(closing + depth - 2 * level + 1, inner + 1)
        if closing < 0 or rest or size < 1:
            return None, None
        shape.insert(0, size)
        strides.insert(0, inner + 1)
        inner = size * (inner + 1) + 1
    # The numbers' places so found end where the first "]" * depth does, within the skeleton.
    return tuple(shape), tuple(strides)


def _skeleton(shape: tuple[int, ...]) -> bytes:
    element = b"0"
    for size in reversed(shape):
        element = b"[" + b",".join([element] * size) + b"]"
    return element


def _npy_pixels(body: bytes | str) -> np.ndarray:
    if isinstance(body, str):
        raise InvalidRequest(f"{NPY} body must be binary .npy data")
    stream = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(stream)
        if version not in _NPY_HEADER_READERS:
            raise ValueError(f".npy format version {version} (a numeric array is written as 1.0 or 2.0)")
        shape, fortran_order, dtype = _NPY_HEADER_READERS[version](stream)
    except ValueError as exc:
        raise InvalidRequest(f"not a numeric .npy array: {exc}") from None
    # The header alone says what to allocate: it is held to the bytes that follow before anything is, and nothing
    # but numbers is read.
    if dtype.hasobject:  # what np.load(allow_pickle=True) would unpickle, which can run any code
        raise InvalidRequest("not a numeric .npy array: an object array is refused, never unpickled (allow_pickle)")
    _check_numbers(dtype)
    if any(size < 0 for size in shape):
        raise InvalidRequest(f"not a numeric .npy array: its header declares shape {list(shape)}")
    count, held = math.prod(shape), len(body) - stream.tell()
    if count * dtype.itemsize != held:
        declared = f"shape {list(shape)} of {dtype} ({count * dtype.itemsize:,} bytes)"
        raise InvalidRequest(f"not a numeric .npy array: its header declares {declared}, its body holds {held:,}")
    array = np.frombuffer(body, dtype=dtype, count=count, offset=stream.tell())
    array = array.reshape(shape, order="F" if fortran_order else "C")
    return array[np.newaxis] if array.shape in IMAGE_SHAPES else array


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _csv_pixels(body: bytes | str) -> np.ndarray:
    try:
        text = body.decode() if isinstance(body, bytes) else body
        if not text.strip():
            raise InvalidRequest("no images: the CSV body has no rows")
        return np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2)
    except ValueError as exc:  # also UnicodeDecodeError
        raise InvalidRequest(f"CSV must hold one image of 784 numbers per row: {exc}") from None


def _image_pixels(body: bytes | str) -> np.ndarray:
    if isinstance(body, str):
        raise InvalidRequest("image body must be binary PNG or JPEG data")
    try:
        image = Image.open(io.BytesIO(body), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise InvalidRequest(f"image too large to decode: {exc}") from None
    except Exception:
        raise InvalidRequest("not a PNG or JPEG image (the body could not be identified as one)") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise InvalidRequest(f"image of {image.width}x{image.height} pixels is too large to decode")
    try:
        grey = _grey_on_white(image)
    except Exception as exc:  # whatever a decoder raises on a damaged file is the sender's problem
        raise InvalidRequest(f"could not decode the {image.format} image: {exc}") from None
    return mnist_normalize(grey)


def _grey_on_white(image: Image.Image) -> np.ndarray:
    # Phone photos are stored sideways with an EXIF rotation; transparent drawings sit on white paper.
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(image.convert("L"), dtype=np.float32)


def mnist_normalize(grey: np.ndarray) -> np.ndarray:
    """A grey picture of one digit, made the way MNIST made its images: light ink on black, cropped to the
    digit, scaled into a 20x20 box keeping its aspect ratio, and put in 28x28 with its centre of mass in the
    middle. Returns float32 pixels 0-255."""
    background = float(np.median(grey))
    # MNIST ink is light on black: pictures of dark ink on light paper are inverted.
    ink = grey - background if background < 128 else background - grey
    peak = float(ink.max())
    if peak < MIN_CONTRAST:
        raise InvalidRequest("no digit found: the image is blank or has almost no contrast")
    ink = ink * (255.0 / peak)
    ink[ink < 64] = 0  # paper texture and JPEG noise would otherwise widen the crop
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    scale = 20.0 / max(height, width)
    width, height = max(1, round(width * scale)), max(1, round(height * scale))
    small = np.asarray(Image.fromarray(digit).resize((width, height), Image.Resampling.BILINEAR))
    small = np.minimum(small * (255.0 / small.max()), 255.0)  # no float rounding past 255
    total = small.sum()
    centre_row = small.sum(axis=1) @ np.arange(height) / total
    centre_col = small.sum(axis=0) @ np.arange(width) / total
    # Pixel i covers [i, i+1): its centre is i + 0.5 and the field's centre 14. Clipped: the digit stays whole.
    top = int(np.clip(round(13.5 - centre_row), 0, 28 - height))
    left = int(np.clip(round(13.5 - centre_col), 0, 28 - width))
    canvas = np.zeros((28, 28), dtype=np.float32)
    canvas[top : top + height, left : left + width] = small
    return canvas


_KIND_NAMES = {"b": "true/false", "U": "strings", "S": "bytes", "O": "null, objects or mixed types", "c": "complex"}


def _check_numbers(dtype: np.dtype) -> None:
    if dtype.kind not in "uif":
        found = _KIND_NAMES.get(dtype.kind, f"dtype {dtype}")
        raise InvalidRequest(f"pixel values must be numbers 0-255, found {found}")


def _checked_batch(batch: np.ndarray) -> np.ndarray:
    """Validate a batch of images: its shape, then its pixel values. Returns float32 (N, 1, 28, 28)."""
    _check_numbers(batch.dtype)
    if batch.size == 0:
        raise InvalidRequest("no images in the request")
    if batch.shape[1:] not in IMAGE_SHAPES:
        raise InvalidRequest(f"each image must be 28x28 or 784 pixel values; got a batch of shape {list(batch.shape)}")
    if batch.dtype != np.uint8:
        low, high = batch.min(), batch.max()  # NaN propagates through min and max
        if not (np.isfinite(low) and np.isfinite(high)):
            raise InvalidRequest("pixel values must be finite numbers; found NaN or infinity")
        if low < 0 or high > 255:
            raise InvalidRequest(f"pixel values must be raw pixels within 0-255; found {low:g} to {high:g}")
    return np.ascontiguousarray(batch, dtype=np.float32).reshape(-1, 1, 28, 28)
