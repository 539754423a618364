"""How is a JSON body of pixels read, and an answer written, without a Python object per number?

A part of the inference handler (inference.py), shipped beside it in the artifact's `code/`. It needs only numpy,
and orjson where the image has it.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np

try:  # orjson parses a pixel list several times faster than json does, but the SageMaker image may not have it.
    import orjson
except ImportError:
    orjson = None

# JSON bodies from this size on (3 images and more) are read by numpy rather than as Python objects, and from
# the next on in one part per core.
NUMPY_JSON_BYTES = 8 * 1024
PARALLEL_JSON_BYTES = 1024 * 1024


def loads(body: bytes):
    """The document a JSON body holds, read by orjson where it is installed (which refuses NaN and Infinity)."""
    return orjson.loads(body) if orjson else json.loads(body)


def dumps(document) -> bytes:
    """``document`` as a JSON body, written by orjson where it is installed."""
    return orjson.dumps(document) if orjson else json.dumps(document).encode()


_INSTANCES_OPENING = re.compile(rb'[ \t\n\r]*\{[ \t\n\r]*"instances"[ \t\n\r]*:[ \t\n\r]*\[')
_JSON_SPACE = b" \t\n\r"
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
_json_threads: ThreadPoolExecutor | None = None


def integer_pixels(body: bytes, parts: int | None = None) -> np.ndarray | None:
    """The instances as a uint8 array when the body is `{"instances": [...]}` alone and they are a regular nested
    array of integers 0-255 (what clients send); None for anything else (malformed, other keys, other numbers,
    ragged): the general parser then reads it, or says what is wrong with it.

    numpy reads the body without a Python object per number, and from PARALLEL_JSON_BYTES on it reads one part per
    core, because numpy lets go of the GIL; bench/bench_endpoint.py times whole 1,000-image requests
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
