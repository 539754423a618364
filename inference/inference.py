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
import http
import io
import json
import logging
import math
import os
import warnings

import numpy as np
import torch
from models import build_model
from PIL import Image, ImageOps

try:  # orjson parses a pixel list several times faster; the SageMaker image may not have it
    import orjson
except ImportError:
    orjson = None

try:  # simdjson reads a whole array of pixels without a Python object per number; optional as orjson
    import simdjson
except ImportError:
    simdjson = None

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
# A 6 MB PNG can decode to gigabytes; refuse pictures larger than a 40-megapixel camera's before decoding.
MAX_IMAGE_PIXELS = 40_000_000
# From this many images on, a batch runs faster through oneDNN (measured on a 2-core Xeon).
LARGE_BATCH = 8
# A picture whose darkest and lightest parts differ by less than this holds no digit.
MIN_CONTRAST = 32


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


class Predictor:
    """Runs a batch through the variant of the classifier that is fastest for its size.

    On the CPU, oneDNN's kernels win on large batches but cost ~100 us of setup per convolution, more than a
    single image's whole forward pass; and TorchScript saves the Python overhead of every layer. So small
    batches run a frozen trace with oneDNN off, large ones a trace converted to oneDNN layouts.
    """

    def __init__(self, classifier: MnistClassifier, device: torch.device):
        self.classifier, self.device = classifier.eval(), device
        self.small = self.large = classifier
        if device.type == "cpu":
            self.small, self.large = _traced(classifier)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cpu":
            return self.classifier(pixels.to(self.device)).cpu()
        large = len(pixels) >= LARGE_BATCH
        torch.backends.mkldnn.enabled = large
        return (self.large if large else self.small)(pixels)


def _traced(classifier: MnistClassifier) -> tuple:
    """(small-batch, large-batch) TorchScript variants of the classifier, each checked against the eager model
    on a batch of another size than the one traced; the eager model where tracing fails or disagrees.
    TorchScript is deprecated in favour of torch.compile, which needs a C++ toolchain and minutes per shape."""
    example, check = torch.zeros(1, 1, 28, 28), torch.rand(3, 1, 28, 28) * 255
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notices
        expected = classifier(check)
        try:
            traced = torch.jit.trace(classifier, example)
            variants = (torch.jit.freeze(traced), torch.jit.optimize_for_inference(traced))
        except Exception as exc:  # a model TorchScript cannot handle still serves, only slower
            log.warning("serving the eager model: tracing failed (%s)", exc)
            return classifier, classifier
        checked = []
        for variant, large in zip(variants, (False, True), strict=True):
            torch.backends.mkldnn.enabled = large
            # The first calls profile and optimize the graph: make them here rather than in the first requests.
            agrees = all(torch.allclose(variant(check), expected, atol=1e-5) for _ in range(3))
            if not agrees:
                log.warning(
                    "serving the eager model for %s batches: the trace disagrees", "large" if large else "small"
                )
            checked.append(variant if agrees else classifier)
    return tuple(checked)


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
    normalization = config.get("normalization", {"mean": 0.1307, "std": 0.3081})
    return Predictor(MnistClassifier(network, normalization["mean"], normalization["std"]).to(device), device)


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
    if media_type == JSON:
        batch = _json_pixels(request_body)
    elif media_type == NPY:
        batch = _npy_pixels(request_body)
    elif media_type == CSV:
        batch = _csv_pixels(request_body)
    else:
        batch = _image_pixels(request_body)[np.newaxis]
    return torch.from_numpy(_checked_batch(batch))


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
    if simdjson is not None and (pixels := _integer_pixels(body)) is not None:
        return pixels
    try:
        document = orjson.loads(body) if orjson else json.loads(body)
    except ValueError as exc:
        # orjson refuses NaN and Infinity; the stdlib reads them, and _checked_batch names them.
        try:
            document = json.loads(body)
        except ValueError:
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


def _integer_pixels(body: bytes) -> np.ndarray | None:
    """The instances as a uint8 array when the body is `{"instances": [...]}` alone and they are a regular nested
    array of integers 0-255 (what clients send), read by simdjson without a Python object per number (measured
    here, 1,000 images: 20 ms as 784 numbers each, 35-50 ms as 28x28, against 55-110 ms through orjson and
    numpy). None for anything else (malformed, other keys, other numbers, ragged):
    the general parser then reads it, or says what is wrong with it."""
    try:
        document = simdjson.Parser().parse(body)  # a parser per call: a reused one fails while its arrays live
        if not isinstance(document, simdjson.Object) or list(document.keys()) != ["instances"]:
            return None
        level = [document["instances"]]  # the arrays at one depth; every one of them as long as the first
        shape, arrays = [], 1
        while isinstance(level[0], simdjson.Array):
            size = len(level[0])
            if size == 0 or not all(isinstance(array, simdjson.Array) and len(array) == size for array in level):
                return None
            shape.append(size)
            if not isinstance(level[0][0], simdjson.Array):
                break
            level = [item for array in level for item in array]
            arrays += len(level)
        # as_buffer flattens whatever is nested: an array where a number should be would go unseen but for
        # one "[" too many.
        if not shape or body.count(b"[") != arrays:
            return None
        values = np.frombuffer(document["instances"].as_buffer(of_type="i"), dtype=np.int64)
    except (ValueError, TypeError, RuntimeError):  # not JSON, or not all integers
        return None
    if values.size != math.prod(shape) or (values >> 8).any():  # a number outside 0-255 has bits beyond the 8th
        return None
    return values.astype(np.uint8).reshape(shape)


def _npy_pixels(body: bytes | str) -> np.ndarray:
    if isinstance(body, str):
        raise InvalidRequest(f"{NPY} body must be binary .npy data")
    try:
        # allow_pickle=False: an object array is refused, never unpickled (unpickling can run any code).
        array = np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
    except ValueError as exc:
        raise InvalidRequest(f"not a numeric .npy array: {exc}") from None
    return array[np.newaxis] if array.shape in IMAGE_SHAPES else array


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


def _checked_batch(batch: np.ndarray) -> np.ndarray:
    """Validate a batch of images: its shape, then its pixel values. Returns float32 (N, 1, 28, 28)."""
    if batch.dtype.kind not in "uif":
        found = _KIND_NAMES.get(batch.dtype.kind, f"dtype {batch.dtype}")
        raise InvalidRequest(f"pixel values must be numbers 0-255, found {found}")
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
