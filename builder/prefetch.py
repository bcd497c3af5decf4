"""Decoding that overlaps the work it feeds: a bounded, ordered thread-pool map, and image streams.

Pillow decodes and resizes with the GIL released, so a few threads decode the
next images while the main thread runs the teacher (or the device does): patch
selection and the preflight both read their images through :func:`prefetch_map`.
At most ``window`` results are in flight, so memory stays bounded however many
files a class has; results come back in input order, and the first error is
raised where its item would have been consumed.

Example:
    >>> list(prefetch_map(lambda x: x * x, range(5), workers=2))
    [0, 1, 4, 9, 16]
    >>> [b.tolist() for b in ImageStream.of(torch.arange(5), 2).batches]
    [[0, 1], [2, 3], [4]]
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))  # image decoding threads per process
IMAGE_CHUNK = 32  # images per batch handed to the device


def prefetch_map(fn: Callable, items: Iterable, workers: int = DECODE_THREADS, window: int | None = None) -> Iterator:
    """``map(fn, items)`` on ``workers`` threads, in order, with at most ``window`` (default 4x workers) pending."""
    window = window or 4 * workers
    pending: collections.deque = collections.deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="d3m-decode")
    try:
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # an error or an abandoned generator: drop what is queued, wait for what runs
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def stacked(tensors: Iterable[torch.Tensor], size: int) -> Iterator[torch.Tensor]:
    """Group a stream of equally shaped tensors into stacks of ``size`` (the last may be smaller)."""
    group = []
    for t in tensors:
        group.append(t)
        if len(group) == size:
            yield torch.stack(group)
            group = []
    if group:
        yield torch.stack(group)


@dataclass
class ImageStream:
    """A class's real images as batches ``[b, 3, H, W]`` (uint8 0..255 or float 0..1), ``count`` in all."""

    count: int
    batches: Iterable[torch.Tensor]

    @classmethod
    def of(cls, images: torch.Tensor, size: int = IMAGE_CHUNK) -> "ImageStream":
        """A stream over images already in memory."""
        return cls(len(images), images.split(size))
