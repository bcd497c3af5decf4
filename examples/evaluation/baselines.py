"""Real-image baselines on the built-in MNIST train split, stored the way a user would store them.

Each baseline is a set of real images kept as 8-bit grayscale PNG files plus a
label file, and trained on exactly what those files hold:

- ``random_real(ipc, seed)``: ``ipc`` random train digits per class (28-px
  PNGs, as MNIST ships them; padded to 32 px for training like the archives);
- ``real_patch_collages(ipc, seed)``: RDED-style: the teacher's lowest-loss
  crop of each real image (the builder's own patch selection), the best
  ``grid^2 * ipc`` per class tiled into ``ipc`` collages (one PNG each);
  trained on the patches cut back out of the 8-bit collages;
- ``full_split()``: all 4,000 train digits.

Label files: hard labels cost one byte per image; soft labels are the
teacher's softmax (T = 1) on each training image or patch, stored with the
archive's own label codec (top-5, u8sqrt, one zstd frame), and training reads
them back decoded, so bytes and accuracy describe the same labels.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

import d3mfmt

from . import builder_adapter as builder
from .metrics import png_bytes

PAD = 2  # the built-in model's 28 -> 32 px border (d3mfmt.mnist.to_rgb32)


@dataclass(frozen=True)
class RealSet:
    """Gray uint8 training images ``[N, 32, 32]`` with their labels and what storing them costs."""

    images: np.ndarray  # uint8 [N, 32, 32]
    soft: np.ndarray  # float32 [N, C]: the stored soft labels, decoded
    labels: np.ndarray  # int64 [N]
    image_bytes: int  # the PNG files
    soft_label_bytes: int  # the soft-label file
    hard_label_bytes: int  # one byte per stored image

    def dataset(self) -> TensorDataset:
        """``(image [3, 32, 32], soft label, class)`` items, as ``D3MDataset`` yields them."""
        return TensorDataset(_to_rgb(self.images), torch.from_numpy(self.soft), torch.from_numpy(self.labels))

    def save(self, path: Path) -> None:
        """An ``.npz`` of plain arrays (read back without pickle), written atomically."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=self.images, soft=self.soft, labels=self.labels,
                     sizes=np.array([self.image_bytes, self.soft_label_bytes, self.hard_label_bytes]))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "RealSet":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["images"], z["soft"], z["labels"], *(int(v) for v in z["sizes"]))


def stored_soft_labels(teacher, images32: torch.Tensor) -> tuple[np.ndarray, int]:
    """Teacher soft labels (T = 1) through the archive's label codec: (decoded [N, C], compressed bytes)."""
    probs = builder.teacher_probs(teacher, images32, 1.0, "cpu").float().numpy()
    table = d3mfmt.encode_labels(probs, d3mfmt.LabelEncoding())
    return table.dense(), len(d3mfmt.labels.compress(table))


def _gray32(gray28: np.ndarray) -> np.ndarray:
    return np.pad(gray28, ((0, 0), (PAD, PAD), (PAD, PAD)))


def _to_rgb(gray32: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gray32).float().div_(255)[:, None].expand(-1, 3, -1, -1).contiguous()


def random_subset_indices(labels: np.ndarray, ipc: int, seed: int) -> np.ndarray:
    """``ipc`` indices per class, drawn without replacement with ``seed``, class-major."""
    rng = np.random.default_rng([1000, seed, ipc])
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:ipc] for c in np.unique(labels)])


def real_from_digits(gray28: np.ndarray, labels: np.ndarray, teacher) -> RealSet:
    """A RealSet of whole digits (stored as 28-px PNGs)."""
    gray32 = _gray32(gray28)
    soft, soft_bytes = stored_soft_labels(teacher, _to_rgb(gray32))
    return RealSet(gray32, soft, labels.astype(np.int64), png_bytes(gray28), soft_bytes, len(labels))


def random_real(ipc: int, seed: int, teacher) -> RealSet:
    """``ipc`` random real train digits per class (subset drawn with ``seed``)."""
    from d3mfmt.mnist import load_mnist

    x, y = load_mnist("train")
    idx = random_subset_indices(y, ipc, seed)
    return real_from_digits(x[idx], y[idx], teacher)


def full_split(teacher) -> RealSet:
    """All 4,000 train digits."""
    from d3mfmt.mnist import load_mnist

    return real_from_digits(*load_mnist("train"), teacher)


def real_patch_collages(ipc: int, seed: int, teacher, grid: int = 2, side: int = 32) -> RealSet:
    """RDED-style real-patch collages: the builder's patch selection on real digits, tiled ``grid x grid``."""
    source, patches, labels = builder.MnistSource("train"), [], []
    keep = ipc * grid * grid
    for c in range(len(source.classes)):
        g = torch.Generator().manual_seed(int(np.random.default_rng([seed, c, 3]).integers(2**62)))
        p, _ = builder.select_patches(source.images(c, side=2 * side), c, teacher, keep, side,
                                      builder.PatchSettings(), g, "cpu")
        patches.append(p)
        labels += [c] * keep
    collages = builder.make_collages(torch.cat(patches), grid)  # [C * ipc, 3, grid * side, grid * side]
    gray = (collages.mean(dim=1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # what the PNGs hold
    stored = gray.reshape(len(gray), grid, side, grid, side).transpose(0, 1, 3, 2, 4).reshape(-1, side, side)
    soft, soft_bytes = stored_soft_labels(teacher, _to_rgb(stored))
    return RealSet(np.ascontiguousarray(stored), soft, np.asarray(labels, dtype=np.int64), png_bytes(gray),
                   soft_bytes, len(gray))
