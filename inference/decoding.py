"""How does a request body become a batch of raw pixels, or a client error (4xx) that says what is wrong with it?

A part of the inference handler (inference.py), shipped beside it in the artifact's `code/`. It needs only numpy and
Pillow. Bad input raises `InvalidRequest`, which carries a 4xx status code: the SageMaker toolkit answers an
exception derived from its `BaseInferenceToolkitError` with that code, and so does the local server.
"""

from __future__ import annotations

import contextlib
import http
import io
import json
import math

import numpy as np
from PIL import Image, ImageOps

if __package__:  # imported from the repository, as inference.decoding
    from inference import json_fast
else:  # in the artifact's code/, which the inference toolkit puts on sys.path: json_fast.py sits beside this file
    import json_fast

try:  # inside the SageMaker inference container: its toolkit maps these to the HTTP status they carry
    from sagemaker_inference.errors import BaseInferenceToolkitError
except ImportError:

    class BaseInferenceToolkitError(Exception):
        """Same shape as the toolkit's class, for running anywhere else."""

        def __init__(self, status_code: int, message: str, phrase: str):
            self.status_code, self.message, self.phrase = status_code, message, phrase
            super().__init__(status_code, message, phrase)


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
# A picture whose darkest and lightest parts differ by less than this holds no digit.
MIN_CONTRAST = 32


class InvalidRequest(BaseInferenceToolkitError):
    """The request cannot be answered as sent (4xx); the message says what is wrong with it."""

    def __init__(self, message: str, status_code: int = http.HTTPStatus.BAD_REQUEST):
        super().__init__(int(status_code), message, http.HTTPStatus(status_code).phrase)

    def __str__(self) -> str:
        return self.message


def json_pixels(body: bytes | str) -> np.ndarray:
    """The images of a body `{"instances": [image, ...]}`: by the fast path where it is large and plain, else by a
    JSON parser, which names what is wrong."""
    body = body.encode() if isinstance(body, str) else body  # the SageMaker toolkit hands JSON over as text
    if len(body) >= json_fast.NUMPY_JSON_BYTES and (pixels := json_fast.integer_pixels(body)) is not None:
        return pixels
    try:
        document = json_fast.loads(body)
    except ValueError as exc:
        # orjson refuses NaN and Infinity; the stdlib reads them, and checked_batch names them.
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


def npy_pixels(body: bytes | str) -> np.ndarray:
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


def csv_pixels(body: bytes | str) -> np.ndarray:
    try:
        text = body.decode() if isinstance(body, bytes) else body
        if not text.strip():
            raise InvalidRequest("no images: the CSV body has no rows")
        return np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2)
    except ValueError as exc:  # also UnicodeDecodeError
        raise InvalidRequest(f"CSV must hold one image of 784 numbers per row: {exc}") from None


def image_pixels(body: bytes | str) -> np.ndarray:
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


def checked_batch(batch: np.ndarray) -> np.ndarray:
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
