"""Read and write MNIST IDX files (gzipped or raw) with numpy.

Every error names the file it is about: a training job or a validation run that fails on bad data must say
which of the four files is bad and how.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np

# The four files of the official distribution, by role.
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

_UBYTE = 0x08
# What a file may decompress to: the official training images are 47 MB, so a file over this is not MNIST but a
# decompression bomb, refused before it takes the memory.
MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024
# Magic numbers of the official files: 0x0000 (two zero bytes), type 0x08 (ubyte), number of dimensions.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


class IdxFormatError(ValueError):
    """An IDX file is missing, truncated or malformed; the message names the file."""


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise IdxFormatError(f"{path}: file not found")
    raw = path.read_bytes()
    if path.suffix != ".gz":
        return raw
    parts, size = [], 0
    try:
        while raw:  # gzip members one after another, as gzip.decompress reads them
            stream = zlib.decompressobj(wbits=31)
            part = stream.decompress(raw, MAX_DECOMPRESSED_BYTES - size + 1)
            size += len(part)
            if size > MAX_DECOMPRESSED_BYTES:
                raise IdxFormatError(f"{path}: decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes")
            if not stream.eof:
                raise IdxFormatError(f"{path}: not a complete gzip stream (it ends inside a member)")
            parts.append(part)
            raw = stream.unused_data.lstrip(b"\x00")  # gzip pads between members with zeros at most
    except zlib.error as exc:
        raise IdxFormatError(f"{path}: not a complete gzip stream ({exc})") from exc
    return b"".join(parts)


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Decode one IDX file of unsigned bytes into an array of its declared shape."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxFormatError(f"{path}: {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    zeros, dtype, ndim = data[0:2], data[2], data[3]
    if zeros != b"\x00\x00" or dtype != _UBYTE or ndim == 0:
        raise IdxFormatError(f"{path}: bad magic number 0x{magic:08x} (want 0x0000080N, unsigned bytes)")
    if expected_magic is not None and magic != expected_magic:
        raise IdxFormatError(f"{path}: magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxFormatError(f"{path}: header declares {ndim} dimensions but the file ends after {len(data)} bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected_body = int(np.prod(shape, dtype=np.int64))
    body = len(data) - header_len
    if body != expected_body:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({expected_body} bytes of data) but the body has {body} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz)."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        # mtime=0 keeps the bytes (and so the content address) reproducible.
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
    return path


def load_mnist(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load the four MNIST files from a directory; images are (N, 28, 28) uint8, labels (N,) uint8."""
    directory = Path(directory)
    arrays = {}
    for role, name in MNIST_FILES.items():
        magic = IMAGES_MAGIC if role.endswith("images") else LABELS_MAGIC
        arrays[role] = read_idx(directory / name, expected_magic=magic)
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (28, 28):
            raise IdxFormatError(
                f"{directory / MNIST_FILES[f'{split}_images']}: images are {images.shape[1:]}, not 28x28"
            )
        if len(images) != len(labels):
            raise IdxFormatError(
                f"{directory / MNIST_FILES[f'{split}_images']}: {len(images)} images but "
                f"{directory / MNIST_FILES[f'{split}_labels']} has {len(labels)} labels"
            )
    return arrays
