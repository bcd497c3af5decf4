"""The held-out images an archive's student is scored on, labelled in the archive's own class order.

A student trained on an archive predicts the archive's class indices (its
manifest's class list, in order). Held-out images must carry the same
indices, so they are mapped by the classes' ids or names, never by position:

- ``--eval DIR`` (an ImageFolder): each archive class is matched to the
  sub-folder named like its id (e.g. a WordNet id) or, failing that for some
  class, its name; every class must be found and every folder must be a class,
  otherwise a ``D3MError`` lists what does not match;
- no ``--eval``: only an archive built from the built-in MNIST train split
  (its manifest's source name and fingerprint, and classes "0".."9") has a
  default, the held-out MNIST test split. Any other archive is an error that
  asks for ``--eval``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from d3mfmt import D3MError
from d3mfmt.terminal import printable

from .builder_adapter import ImageFolderSource, mnist_source_info

MNIST_IDS = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class HeldOut:
    images: torch.Tensor  # float32 [N, 3, side, side] in [0, 1]
    labels: torch.Tensor  # int64 [N]: indices into the archive's class list
    description: str


def match_folders(classes, folders: list[str]) -> list[str]:
    """The folder of each archive class (by id, else by name); D3MError listing every mismatch."""
    available = set(folders)
    chosen, missing = [], []
    for c in classes:
        folder = c.id if c.id in available else c.name if c.name in available else None
        (missing if folder is None else chosen).append(c if folder is None else folder)
    extra = sorted(available - set(chosen))
    duplicated = sorted({f for f in chosen if chosen.count(f) > 1})
    problems = []
    if missing:
        shown = ", ".join(f"{c.id!r} ({c.name!r})" if c.name != c.id else repr(c.id) for c in missing[:8])
        problems.append(f"{len(missing)} archive classes have no folder named by their id or name: {shown}")
    if extra:
        problems.append(f"{len(extra)} folders are not archive classes: {', '.join(map(repr, extra[:8]))}")
    if duplicated:
        problems.append(f"folders {duplicated[:8]} match more than one archive class")
    if problems:
        raise D3MError(printable("--eval: the held-out folders do not match the archive's classes: "
                                 + "; ".join(problems) + ". Name one sub-folder per archive class by its id or "
                                 "name (`d3m-inspect ARCHIVE` lists them), and nothing else"))
    return chosen


def imagefolder_heldout(classes, root: Path, side: int) -> HeldOut:
    """Held-out images from ``root``'s class folders, labelled by the archive's class order."""
    root = Path(root)
    if not root.is_dir():
        raise D3MError(f"--eval {root}: not a folder; pass an ImageFolder (one sub-folder per class)")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    source = ImageFolderSource(root, class_list=match_folders(classes, folders))
    source.check()
    xs, ys = [], []
    for c in range(len(classes)):
        images = source.images(c, side)
        xs.append(images)
        ys.append(torch.full((len(images),), c, dtype=torch.long))
    return HeldOut(torch.cat(xs), torch.cat(ys), f"{root} ({sum(len(y) for y in ys)} images, folders by class)")


def builtin_mnist_problem(manifest) -> str | None:
    """Why the built-in MNIST test split is not this archive's held-out set, or None when it is."""
    source, ids = manifest.dataset.source, tuple(c.id for c in manifest.dataset.classes)
    if source is None:
        return "its manifest names no source dataset"
    train, test = mnist_source_info("train"), mnist_source_info("test")
    if (source.name, source.fingerprint) == (test.name, test.fingerprint):
        return "it was built from the MNIST test split itself, so that split is not held out"
    if source.name != train.name:
        return f"it was built from {printable(source.name)!r}, not the built-in MNIST digits"
    if source.fingerprint != train.fingerprint:
        return "its source fingerprint differs from the built-in MNIST train split's"
    if ids != MNIST_IDS:
        return f"its classes {list(ids)[:10]} are not the digits 0-9 in order"
    return None


def heldout_for(manifest, eval_dir: str | Path | None, side: int) -> HeldOut:
    """The held-out set for an archive's ``manifest`` at patch side ``side`` (see the module docstring)."""
    classes = manifest.dataset.classes
    if eval_dir is not None:
        return imagefolder_heldout(classes, Path(eval_dir), side)
    problem = builtin_mnist_problem(manifest)
    if problem is not None:
        raise D3MError(f"no held-out set for this archive: {problem}. Pass --eval DIR, an ImageFolder of held-out "
                       "images with one sub-folder per archive class (named by its id or name)")
    return builtin_mnist_heldout(side)


def builtin_mnist_heldout(side: int = 32) -> HeldOut:
    """The built-in MNIST test split (1,000 digits, never seen by a build), resized to ``side`` if needed."""
    from d3mfmt.mnist import load_mnist, to_rgb32

    x, y = load_mnist("test")
    images = to_rgb32(x)
    if side != images.shape[-1]:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return HeldOut(images, torch.from_numpy(y), "the built-in MNIST test split (1,000 digits)")
