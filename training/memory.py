"""glibc's allocator tuned for processes that free and allocate the same large buffers over and over: a training
loop's activations, a model server's request batches.

Imports nothing: it ships in the training source directory and the model server imports it as well.
"""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """Make glibc keep freed memory in the process. By default it hands every freed block over 128 KiB back to the
    kernel, so each training step page-faults its activations in again, hundreds of times a step for seed_cnn,
    which then trains noticeably slower; a server's 1,000-image requests slow down alike. bench/bench_training.py
    measures the training speed with this setting (bench/results/training.json, `seed_cnn.images_per_second`).
    Elsewhere (not glibc) there is nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 32 << 20)  # larger blocks (the dataset, big eval batches) stay mmapped
    libc.mallopt(m_trim_threshold, 256 << 20)
